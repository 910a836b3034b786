// The data channel's flow control, over a real WebSocket on loopback.
import { afterEach, describe, expect, it } from 'vitest';
import { once } from 'node:events';
import type { AddressInfo, Socket } from 'node:net';
import { Readable } from 'node:stream';
import WebSocket, { WebSocketServer } from 'ws';
import { ChannelReceiver, ChannelSender } from '../../src/transport/channel.ts';
import { digestOf } from '../../src/digest.ts';

const MiB = 1024 * 1024;
const closers: Array<() => void> = [];
afterEach(() => {
  for (const close of closers.splice(0)) close();
});

/** A connected pair on loopback: `server` sends, `client` receives. */
async function socketPair(): Promise<{ server: WebSocket; client: WebSocket }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const accepted = once(wss, 'connection') as Promise<[WebSocket]>;
  const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as AddressInfo).port}`);
  await once(client, 'open');
  const [server] = await accepted;
  closers.push(() => {
    client.terminate();
    server.terminate();
    wss.close();
  });
  return { server, client };
}

/** An unmasked (server to client) WebSocket frame: opcode 1 is text, 2 binary. */
function frame(opcode: 1 | 2, payload: Buffer): Buffer {
  const length = payload.length;
  const header = length < 126 ? Buffer.alloc(2) : length < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
  header[0] = 0x80 | opcode;
  if (length < 126) header[1] = length;
  else if (length < 65536) {
    header[1] = 126;
    header.writeUInt16BE(length, 2);
  } else {
    header[1] = 127;
    header.writeBigUInt64BE(BigInt(length), 2);
  }
  return Buffer.concat([header, payload]);
}

const text = (value: unknown) => frame(1, Buffer.from(JSON.stringify(value)));

async function drain(body: Readable): Promise<number> {
  let bytes = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) bytes += chunk.length;
  return bytes;
}

describe('data channel', () => {
  it('goes on to the next stream when the receiver paused for one whose end it had already read', async () => {
    // One binary frame larger than everything the receiver buffers (its body holds
    // about 4 MiB) pauses the socket. Its stream-end follows in the same socket
    // write, so ws parses it from the same read while the socket is paused, and the
    // body is ended while full. Reading that body on must not leave the socket paused.
    const { server, client } = await socketPair();
    const receiver = new ChannelReceiver(client);
    const payload = Buffer.alloc(6 * MiB, 1);
    const raw = (server as unknown as { _socket: Socket })._socket;
    raw.write(
      Buffer.concat([
        text({ type: 'stream-open', name: 'first' }),
        frame(2, payload),
        text({ type: 'stream-end', bytes: payload.length, digest: digestOf(payload) }),
      ]),
    );
    const first = await receiver.next();
    expect(first.name).toBe('first');
    const ended = await Promise.race([first.end.then(() => true), new Promise<false>((resolve) => setTimeout(() => resolve(false), 5000))]);
    expect(ended, 'the stream-end was parsed while the body was full').toBe(true);
    expect(await drain(first.body)).toBe(payload.length);
    // The second stream opens only once the first was read: nothing of it was buffered.
    const sender = new ChannelSender(server, 'test');
    const sent = sender.sendStream('second', Readable.from([Buffer.alloc(MiB, 2)]));
    const second = await Promise.race([
      receiver.next(),
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the second stream never arrived')), 5000)),
    ]);
    expect(second.name).toBe('second');
    expect(await drain(second.body)).toBe(MiB);
    expect((await second.end).bytes).toBe(MiB);
    await sent;
  });

  it('refuses a stream whose bytes do not match the digest in its stream-end', async () => {
    const { server, client } = await socketPair();
    const receiver = new ChannelReceiver(client);
    const payload = Buffer.alloc(64 * 1024, 3);
    const raw = (server as unknown as { _socket: Socket })._socket;
    raw.write(
      Buffer.concat([
        text({ type: 'stream-open', name: 'bad' }),
        frame(2, payload),
        text({ type: 'stream-end', bytes: payload.length, digest: digestOf(Buffer.alloc(64 * 1024, 4)) }),
      ]),
    );
    const stream = await receiver.next();
    await expect(drain(stream.body)).rejects.toMatchObject({ code: 'CHECKSUM_MISMATCH' });
    await expect(stream.end).rejects.toMatchObject({ code: 'CHECKSUM_MISMATCH' });
  });
});
