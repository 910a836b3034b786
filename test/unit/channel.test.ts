// The data channel's flow control, over a real WebSocket on loopback.
import { afterEach, describe, expect, it } from 'vitest';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import WebSocket, { WebSocketServer } from 'ws';
import { ChannelReceiver, ChannelSender } from '../../src/transport/channel.ts';

const MiB = 1024 * 1024;
const closers: Array<() => void> = [];
afterEach(() => {
  for (const close of closers.splice(0)) close();
});

async function channelPair(): Promise<{ sender: ChannelSender; receiver: ChannelReceiver }> {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(server, 'listening');
  const accepted = once(server, 'connection') as Promise<[WebSocket]>;
  const client = new WebSocket(`ws://127.0.0.1:${(server.address() as AddressInfo).port}`);
  await once(client, 'open');
  const [peer] = await accepted;
  closers.push(() => {
    client.terminate();
    peer.terminate();
    server.close();
  });
  return { sender: new ChannelSender(client, 'test'), receiver: new ChannelReceiver(peer) };
}

async function drain(body: Readable): Promise<number> {
  let bytes = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) bytes += chunk.length;
  return bytes;
}

describe('data channel', () => {
  it('goes on to the next stream when the receiver paused for one whose end it had already read', async () => {
    // One frame larger than the receiver's buffer pauses the socket; the stream-end
    // behind it in the same socket read is still parsed, so the first body is ended
    // while the socket is paused. Reading that body on must not leave the socket paused.
    const { sender, receiver } = await channelPair();
    let firstRead!: () => void;
    const secondMayGo = new Promise<void>((resolve) => (firstRead = resolve));
    const sent = (async () => {
      await sender.sendStream('first', Readable.from([Buffer.alloc(4 * MiB, 1)]));
      // The second stream opens only once the first was read: nothing of it is buffered yet.
      await secondMayGo;
      await sender.sendStream('second', Readable.from([Buffer.alloc(MiB, 2)]));
    })();
    const first = await receiver.next();
    const ended = await Promise.race([first.end.then(() => true), new Promise<false>((resolve) => setTimeout(() => resolve(false), 2000))]);
    expect(ended, 'the stream-end was parsed while the body was full').toBe(true);
    expect(await drain(first.body)).toBe(4 * MiB);
    firstRead();
    const second = await Promise.race([
      receiver.next(),
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the second stream never arrived')), 5000)),
    ]);
    expect(second.name).toBe('second');
    expect(await drain(second.body)).toBe(MiB);
    expect((await second.end).bytes).toBe(MiB);
    await sent;
  });
});
