// The destination's post-copy page relay between a stand-in lazy-pages
// daemon (a loopback TCP socket speaking CRIU 4.2's page-server framing) and
// stand-in page servers on real loopback WebSockets: answers pass through
// whole; an answer cut mid-way by a lost channel is completed on the next
// channel from the byte where it stopped, even when the new server answers
// in shorter pieces; a source that answers what was not asked is refused.
import { once } from 'node:events';
import { createConnection, createServer, type Socket } from 'node:net';
import { afterEach, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { PageRelay, pageServerLayout } from '../../src/transport/page-relay.ts';

const page = 4096;
const header = 32;
const get = 7;
const forceClose = 0x1024;
const closers: Array<() => void> = [];

afterEach(() => {
  for (const close of closers.splice(0)) close();
});

/** The bytes of task `dst`'s page at `vaddr`: a pattern no other page has. */
function pageAt(dst: bigint, vaddr: bigint): Buffer {
  const bytes = Buffer.alloc(page);
  for (let offset = 0; offset < page; offset += 16) {
    bytes.writeBigUInt64LE(vaddr + BigInt(offset), offset);
    bytes.writeBigUInt64LE(dst, offset + 8);
  }
  return bytes;
}

function iov(cmd: number, nrPages: number, vaddr: bigint, dst: bigint): Buffer {
  const bytes = Buffer.alloc(header);
  bytes.writeUInt32LE(cmd, 0);
  bytes.writeBigUInt64LE(BigInt(nrPages), 8);
  bytes.writeBigUInt64LE(vaddr, 16);
  bytes.writeBigUInt64LE(dst, 24);
  return bytes;
}

/** A connected loopback TCP pair: the daemon's end and the relay's. */
async function daemonPair(): Promise<{ daemon: Socket; local: Socket }> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const daemon = createConnection((server.address() as { port: number }).port, '127.0.0.1');
  const [local] = (await accepted) as [Socket];
  closers.push(() => {
    daemon.destroy();
    local.destroy();
    server.close();
  });
  return { daemon, local };
}

interface ServerOptions {
  /** At most this many pages per answer (CRIU answers up to one page-pipe iov). */
  maxPages?: number;
  /** Cut the channel after sending this many answer bytes. */
  cutAfter?: number;
  /** Answer every GET with this instead. */
  lie?: (request: Buffer) => Buffer;
}

/** A stand-in for the source's page server, on the client end of a loopback WebSocket; returns the server end for the relay. */
async function pageServer(options: ServerOptions = {}): Promise<{ channel: WebSocket; asked: Buffer[] }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const accepted = once(wss, 'connection');
  const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as { port: number }).port}`);
  await once(client, 'open');
  const [channel] = (await accepted) as [WebSocket];
  closers.push(() => {
    client.terminate();
    wss.close();
  });
  const asked: Buffer[] = [];
  let sent = 0;
  let pending = Buffer.alloc(0);
  client.on('message', (data: Buffer) => {
    pending = Buffer.concat([pending, data]);
    while (pending.length >= header) {
      const request = pending.subarray(0, header);
      pending = pending.subarray(header);
      asked.push(Buffer.from(request));
      const cmd = request.readUInt32LE(0);
      let answer: Buffer;
      if (cmd === forceClose) answer = Buffer.from([0, 0, 0, 0]);
      else if (options.lie) answer = options.lie(request);
      else {
        const vaddr = request.readBigUInt64LE(16);
        const dst = request.readBigUInt64LE(24);
        const count = Math.min(Number(request.readBigUInt64LE(8)), options.maxPages ?? Infinity);
        const pages = Array.from({ length: count }, (_, index) => pageAt(dst, vaddr + BigInt(index * page)));
        answer = Buffer.concat([iov(6 | (1 << 16), count, vaddr, dst), ...pages]);
      }
      if (options.cutAfter !== undefined && sent + answer.length > options.cutAfter) {
        // Part of this answer goes out (in small frames, as over a real link), then the channel dies.
        const part = answer.subarray(0, options.cutAfter - sent);
        for (let offset = 0; offset < part.length; offset += 1000) client.send(part.subarray(offset, offset + 1000));
        sent = options.cutAfter;
        setTimeout(() => client.terminate(), 50);
        return;
      }
      sent += answer.length;
      client.send(answer);
    }
  });
  return { channel, asked };
}

/** What the daemon reads: answers, each a header and its pages, checked against the pattern as it goes. */
function readAnswers(daemon: Socket): { answers: Array<{ nrPages: number; vaddr: bigint }>; bytes: () => number; status: Buffer[]; goodbyeNext: () => void } {
  const answers: Array<{ nrPages: number; vaddr: bigint }> = [];
  const status: Buffer[] = [];
  let buffer = Buffer.alloc(0);
  let total = 0;
  let expectStatus = false;
  daemon.on('data', (chunk: Buffer) => {
    total += chunk.length;
    buffer = Buffer.concat([buffer, chunk]);
    for (;;) {
      if (expectStatus) {
        if (buffer.length < 4) return;
        status.push(buffer.subarray(0, 4));
        buffer = buffer.subarray(4);
        continue;
      }
      if (buffer.length < header) return;
      const nrPages = Number(buffer.readBigUInt64LE(8));
      if (buffer.length < header + nrPages * page) return;
      const vaddr = buffer.readBigUInt64LE(16);
      const dst = buffer.readBigUInt64LE(24);
      for (let index = 0; index < nrPages; index += 1) {
        const body = buffer.subarray(header + index * page, header + (index + 1) * page);
        if (!body.equals(pageAt(dst, vaddr + BigInt(index * page)))) throw new Error(`page ${index} of the answer at 0x${vaddr.toString(16)} is not as written`);
      }
      answers.push({ nrPages, vaddr });
      buffer = buffer.subarray(header + nrPages * page);
    }
  });
  return { answers, bytes: () => total, status, goodbyeNext: () => (expectStatus = true) };
}

async function until(check: () => boolean, what: string, ms = 5_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const layout = pageServerLayout({ major: 4, minor: 2 });

it('reads CRIU 4.2 framing as 32-byte requests and 4.1 as 24', () => {
  expect(layout.bytes).toBe(32);
  expect(pageServerLayout({ major: 4, minor: 1 }).bytes).toBe(24);
  expect(pageServerLayout({ major: 5, minor: 0 }).bytes).toBe(32);
});

it('passes answers through whole, and the page server goodbye', async () => {
  const { daemon, local } = await daemonPair();
  const relay = new PageRelay(local, layout);
  const { channel } = await pageServer();
  relay.attach(channel);
  const read = readAnswers(daemon);
  daemon.write(Buffer.concat([iov(get, 1, 0x10000n, 5n), iov(get, 300, 0x7f0000000000n, 5n), iov(get, 2, 0x20000n, 9n)]));
  await until(() => read.answers.length === 3, 'three answers');
  expect(read.answers.map((answer) => answer.nrPages)).toEqual([1, 300, 2]);
  expect(relay.received).toBe(303 * page);
  expect(relay.pending.requests).toBe(0);
});

it('completes an answer cut mid-way on the next channel, from the byte where it stopped, with a server that answers in shorter pieces', async () => {
  const { daemon, local } = await daemonPair();
  const relay = new PageRelay(local, layout);
  const detached: string[] = [];
  relay.onDetached((reason) => detached.push(reason));
  // Cut 10 000 bytes into the second answer: mid-page, its header delivered.
  const first = await pageServer({ cutAfter: header + 4 * page + header + 10_000 });
  relay.attach(first.channel);
  const read = readAnswers(daemon);
  daemon.write(Buffer.concat([iov(get, 4, 0x10000n, 5n), iov(get, 64, 0x400000n, 5n), iov(get, 8, 0x900000n, 7n)]));
  await until(() => detached.length === 1, 'the channel to go');
  expect(read.answers).toHaveLength(1);
  expect(relay.pending).toEqual({ requests: 2, deliveredOfFirst: 10_000 });
  const second = await pageServer({ maxPages: 5 });
  relay.attach(second.channel);
  await until(() => read.answers.length === 3 && relay.pending.requests === 0, 'every answer');
  // The daemon saw the cut answer once, whole (64 pages under its first header), and then the short answers of the new server.
  expect(read.answers.slice(0, 2)).toEqual([
    { nrPages: 4, vaddr: 0x10000n },
    { nrPages: 64, vaddr: 0x400000n },
  ]);
  expect(read.answers.slice(2).map((answer) => answer.nrPages)).toEqual([5]);
  // The rest was asked from page 2 (byte 8192 of the answer): 62 pages, in pieces of at most 5; then the third request as the daemon sent it.
  const asked = second.asked.map((request) => ({ nr: Number(request.readBigUInt64LE(8)), vaddr: request.readBigUInt64LE(16) }));
  expect(asked[0]).toEqual({ nr: 62, vaddr: 0x400000n + 2n * BigInt(page) });
  expect(asked.length).toBe(Math.ceil(62 / 5) + 1);
  expect(asked.at(-1)).toEqual({ nr: 8, vaddr: 0x900000n });
  expect(relay.received).toBe((4 + 64 + 5) * page);
  expect(read.bytes()).toBe(3 * header + (4 + 64 + 5) * page);
  // The daemon re-asks the short answer's rest itself, as CRIU's does.
  daemon.write(iov(get, 3, 0x900000n + 5n * BigInt(page), 7n));
  await until(() => read.answers.length === 4, 'the daemon\'s own rest');
  read.goodbyeNext();
  daemon.write(iov(forceClose, 0, 0n, 0n));
  await until(() => read.status.length === 1, 'the goodbye');
  expect(read.status[0]).toEqual(Buffer.from([0, 0, 0, 0]));
});

for (const [what, lie] of [
  ['another address', (request: Buffer) => Buffer.concat([iov(6, 1, request.readBigUInt64LE(16) + 4096n, request.readBigUInt64LE(24)), pageAt(1n, 0n)])],
  ['another task', (request: Buffer) => Buffer.concat([iov(6, 1, request.readBigUInt64LE(16), 99n), pageAt(1n, 0n)])],
  ['more pages than asked', (request: Buffer) => Buffer.concat([iov(6, 2, request.readBigUInt64LE(16), request.readBigUInt64LE(24)), pageAt(1n, 0n), pageAt(1n, 4096n)])],
  ['no pages', (request: Buffer) => iov(6, 0, request.readBigUInt64LE(16), request.readBigUInt64LE(24))],
] as const) {
  it(`refuses an answer for ${what}, and the daemon gets nothing of it`, async () => {
    const { daemon, local } = await daemonPair();
    const relay = new PageRelay(local, layout);
    const { channel } = await pageServer({ lie });
    relay.attach(channel);
    let got = 0;
    daemon.on('data', (chunk: Buffer) => (got += chunk.length));
    daemon.write(iov(get, 1, 0x10000n, 5n));
    await expect(relay.done).rejects.toMatchObject({ code: 'BAD_MESSAGE', phase: 'postcopy' });
    expect(got).toBe(0);
  });
}

it('refuses bytes nobody asked for, and a text frame', async () => {
  for (const send of [(client: WebSocket) => client.send(Buffer.alloc(64)), (client: WebSocket) => client.send('hello')]) {
    const { local } = await daemonPair();
    const relay = new PageRelay(local, layout);
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await once(wss, 'listening');
    const accepted = once(wss, 'connection');
    const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as { port: number }).port}`);
    closers.push(() => {
      client.terminate();
      wss.close();
    });
    await once(client, 'open');
    const [channel] = (await accepted) as [WebSocket];
    relay.attach(channel);
    send(client);
    await expect(relay.done).rejects.toMatchObject({ code: 'BAD_MESSAGE' });
  }
});

it('refuses a daemon command post-copy does not carry', async () => {
  const { daemon, local } = await daemonPair();
  const relay = new PageRelay(local, layout);
  daemon.write(iov(1, 1, 0n, 0n));
  await expect(relay.done).rejects.toMatchObject({ code: 'BAD_MESSAGE' });
});
