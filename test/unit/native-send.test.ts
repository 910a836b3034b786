// The data channel's native sender (ferry-frame-send), over a real WebSocket
// on loopback, fed by a named pipe as CRIU feeds the final dump's pages.
import { afterEach, describe, expect, it } from 'vitest';
import { once } from 'node:events';
import { closeSync, constants, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { createServer } from 'node:https';
import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa, execaSync } from 'execa';
import WebSocket, { WebSocketServer } from 'ws';
import { digestOf } from '../../src/digest.ts';
import { FerryError } from '../../src/errors.ts';
import { nativeSendAvailable } from '../../src/transport/native-send.ts';
import { openSocket } from '../../src/transport/client.ts';

// Read once, when the fault module loads: before the channel is imported.
process.env.FERRY_FAULTS = 'corrupt-chunk:spoiled:3';
const { ChannelReceiver, ChannelSender } = await import('../../src/transport/channel.ts');

const MiB = 1024 * 1024;
const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

/** A connected pair on loopback: the client sends (the native sender writes client frames); over TLS with `tls`. */
async function socketPair(tls?: { key: Buffer; cert: Buffer }): Promise<{ client: WebSocket; server: WebSocket }> {
  const https = tls ? createServer(tls) : undefined;
  const wss = https ? new WebSocketServer({ server: https }) : new WebSocketServer({ host: '127.0.0.1', port: 0 });
  https?.listen(0, '127.0.0.1');
  await once(https ?? wss, 'listening');
  const accepted = once(wss, 'connection') as Promise<[WebSocket]>;
  const port = ((https ?? wss).address() as AddressInfo).port;
  const client = new WebSocket(`${tls ? 'wss' : 'ws'}://127.0.0.1:${port}`, { generateMask: (mask) => mask.fill(0), rejectUnauthorized: false });
  await once(client, 'open');
  const [server] = await accepted;
  cleanups.push(() => {
    client.terminate();
    server.terminate();
    wss.close();
    https?.close();
  });
  return { client, server };
}

/** A named pipe open for reading, non-blocking, as the agent opens CRIU's page pipes. */
function pagePipe(): { fd: number; path: string } {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-native-'));
  const path = join(dir, 'pages-1.img');
  execaSync('mkfifo', [path]);
  const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  cleanups.push(() => {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  });
  return { fd, path };
}

/** Writes `content` into the pipe from another process, as CRIU does, after `delayMs`. */
function writeLater(path: string, content: Buffer, delayMs: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-native-src-'));
  const file = join(dir, 'content');
  const fd = openSync(file, 'w');
  writeSync(fd, content);
  closeSync(fd);
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return sleep(delayMs).then(async () => void (await execa('sh', ['-c', 'exec cat "$1" > "$2"', 'sh', file, path])));
}

async function received(receiver: InstanceType<typeof ChannelReceiver>): Promise<{ name: string; content: Buffer; end: Promise<unknown> }> {
  const stream = await receiver.next();
  const chunks: Buffer[] = [];
  const content = (async () => {
    for await (const chunk of stream.body as AsyncIterable<Buffer>) chunks.push(chunk);
    return Buffer.concat(chunks);
  })();
  return { name: stream.name, content: await content, end: stream.end };
}

const source = (fd: number) => ({ fd, readable: () => Readable.from([]) });

async function childrenNamed(name: string): Promise<string[]> {
  const { stdout } = await execa('ps', ['-o', 'pid=,comm=', '--ppid', String(process.pid)], { reject: false });
  return stdout.split('\n').filter((line) => line.includes(name));
}

describe.skipIf(!nativeSendAvailable())('the native sender', () => {
  it('sends a page pipe whose writer comes late, byte for byte, and the channel goes on after it', async () => {
    const { client, server } = await socketPair();
    const receiver = new ChannelReceiver(server);
    const sender = new ChannelSender(client, 'clean');
    const pipe = pagePipe();
    const content = randomBytes(8 * MiB + 12_345);
    let counted = 0;
    // The writer opens the pipe only after the helper waits on it: a FIFO without one reads as ended.
    const writer = writeLater(pipe.path, content, 300);
    const sent = sender.sendFrom('pages-1.img', source(pipe.fd), { onBytes: (bytes) => (counted += bytes) });
    const got = await received(receiver);
    await expect(got.end).resolves.toMatchObject({ bytes: content.length, digest: digestOf(content) });
    await writer;
    expect(await sent).toEqual({ bytes: content.length, digest: digestOf(content) });
    expect(got.name).toBe('pages-1.img');
    expect(got.content.equals(content)).toBe(true);
    expect(counted).toBe(content.length);
    expect(sender.nativeStreams).toBe(1);
    // A stream from JavaScript after it: the helper left the framing where ws expects it.
    const next = Buffer.alloc(MiB, 7);
    const js = sender.sendStream('after', Readable.from([next]));
    const after = await received(receiver);
    expect(after.content.equals(next)).toBe(true);
    await js;
  });

  it('spoils the frame the fault names after hashing it: the receiver sees CHECKSUM_MISMATCH', async () => {
    const { client, server } = await socketPair();
    const receiver = new ChannelReceiver(server);
    const sender = new ChannelSender(client, 'spoiled');
    const pipe = pagePipe();
    const content = randomBytes(MiB);
    const writer = writeLater(pipe.path, content, 0);
    const sent = sender.sendFrom('pages-1.img', source(pipe.fd));
    const stream = await receiver.next();
    stream.body.resume();
    const error = await stream.end.then(
      () => undefined,
      (reason: unknown) => reason,
    );
    expect(error).toBeInstanceOf(FerryError);
    expect((error as FerryError).code).toBe('CHECKSUM_MISMATCH');
    await writer;
    // The sender's digest is of the bytes as they were read.
    expect((await sent).digest).toBe(digestOf(content));
    expect(sender.nativeStreams).toBe(1);
  });

  it('ends with PEER_GONE when the receiver goes away mid-stream, and the helper goes too', async () => {
    const { client, server } = await socketPair();
    const receiver = new ChannelReceiver(server);
    const sender = new ChannelSender(client, 'clean');
    const pipe = pagePipe();
    // A writer that never finishes: it keeps the pipe open and full.
    const writer = execa('sh', ['-c', 'exec cat /dev/zero > "$1"', 'sh', pipe.path]);
    cleanups.push(() => writer.kill('SIGKILL'));
    void writer.catch(() => undefined);
    const sent = sender.sendFrom('pages-1.img', source(pipe.fd));
    const stream = await receiver.next();
    let bytes = 0;
    stream.body.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (bytes > 4 * MiB) server.terminate();
    });
    const error = await sent.then(
      () => undefined,
      (reason: unknown) => reason,
    );
    expect(error).toBeInstanceOf(FerryError);
    expect((error as FerryError).code).toBe('PEER_GONE');
    for (let tries = 0; tries < 20 && (await childrenNamed('ferry-frame-send')).length; tries += 1) await sleep(50);
    expect(await childrenNamed('ferry-frame-send')).toEqual([]);
  });

  it('is not used for a server socket: the stream goes through JavaScript, the same bytes', async () => {
    const { client, server } = await socketPair();
    const receiver = new ChannelReceiver(client);
    const sender = new ChannelSender(server, 'clean');
    const content = randomBytes(2 * MiB);
    const sent = sender.sendFrom('pages-1.img', { fd: -1, readable: () => Readable.from([content]) });
    const got = await received(receiver);
    expect(got.content.equals(content)).toBe(true);
    expect(await sent).toEqual({ bytes: content.length, digest: digestOf(content) });
    expect(sender.nativeStreams).toBe(0);
  });

  it("leaves a data channel's pings unanswered, so that ws writes nothing among the helper's frames; the control link answers", async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await once(wss, 'listening');
    cleanups.push(() => wss.close());
    const url = `ws://127.0.0.1:${(wss.address() as AddressInfo).port}`;
    const pongs = async (path: string): Promise<number> => {
      const accepted = once(wss, 'connection') as Promise<[WebSocket]>;
      const client = await openSocket({ url, token: 't' }, path);
      cleanups.push(() => client.terminate());
      const [server] = await accepted;
      let count = 0;
      server.on('pong', () => (count += 1));
      server.ping();
      await sleep(300);
      return count;
    };
    expect(await pongs('/migrations/m-1/pages')).toBe(0);
    expect(await pongs('/control')).toBe(1);
  });
});

describe('capRetransmitTimeout', () => {
  it('caps TCP_RTO_MAX_MS on both ends of a real connection, and refuses an out-of-range value', async () => {
    const { capRetransmitTimeout } = await import('../../src/transport/native-send.ts');
    const { client, server } = await socketPair();
    expect(await capRetransmitTimeout(client, 1_000, 30_000)).toBe(1_000);
    expect(await capRetransmitTimeout(server, 1_500, 30_000)).toBe(1_500);
    const refused = await capRetransmitTimeout(client, 0, 30_000).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(FerryError);
    expect((refused as FerryError).message).toMatch(/must be 1\.\.120000, USER_TIMEOUT_MS/);
    // The connection is still the agent's: it carries on.
    const echoed = once(server, 'message');
    client.send('after');
    expect(String((await echoed)[0])).toBe('after');
  });

  it('reaches the TCP socket under a TLS connection too', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-rto-tls-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    execaSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1', '-subj', '/CN=localhost', '-keyout', 'key.pem', '-out', 'cert.pem'], { cwd: dir });
    const { client, server } = await socketPair({ key: readFileSync(join(dir, 'key.pem')), cert: readFileSync(join(dir, 'cert.pem')) });
    const { capRetransmitTimeout } = await import('../../src/transport/native-send.ts');
    expect(await capRetransmitTimeout(client, 1_000, 30_000)).toBe(1_000);
    expect(await capRetransmitTimeout(server, 1_000, 30_000)).toBe(1_000);
    const echoed = once(server, 'message');
    client.send('still');
    expect(String((await echoed)[0])).toBe('still');
  });
});
