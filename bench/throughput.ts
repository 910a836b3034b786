import { randomBytes } from 'node:crypto';
import { createServer, connect } from 'node:net';
import { Readable } from 'node:stream';
import WebSocket, { WebSocketServer } from 'ws';
import { ChannelReceiver, ChannelSender } from '../src/transport/channel.ts';

// One side of the stream-throughput benchmark, run inside a host's netns:
//   node bench/throughput.ts serve ADDRESS        (destination: raw TCP on 9201, WebSocket on 9202)
//   node bench/throughput.ts send ADDRESS BYTES   (source: prints {"tcpMbps":..,"wsMbps":..})
// Both paths send the same random bytes, cycled from a 64 MiB pool so they are
// not cache-hot, in 1 MiB chunks: the plain socket writes them as they are
// (its best), the channel cuts them into its 16 KiB frames as it does every
// stream. The ratio is the cost of ferry's framing, hashing and backpressure
// over a plain socket.

const pool = randomBytes(64 << 20);
const [mode, address, size] = process.argv.slice(2);

function source(bytes: number, chunkBytes: number): Readable {
  let left = bytes;
  let offset = 0;
  return new Readable({
    read() {
      if (left <= 0) return void this.push(null);
      const size = Math.min(chunkBytes, left);
      if (offset + size > pool.length) offset = 0;
      this.push(pool.subarray(offset, offset + size));
      offset += size;
      left -= size;
    },
  });
}

if (mode === 'serve') {
  createServer({ allowHalfOpen: true }, (socket) => socket.resume().on('end', () => socket.end('done'))).listen(9201, address);
  const server = new WebSocketServer({ host: address, port: 9202, maxPayload: 16 * 1024 * 1024, perMessageDeflate: false });
  server.on('connection', (socket) => {
    const receiver = new ChannelReceiver(socket);
    void receiver.next().then(async (stream) => {
      stream.body.resume();
      await stream.end;
      socket.send(JSON.stringify({ type: 'done' }));
    });
  });
  process.stdout.write('ready\n');
} else {
  const bytes = Number(size);
  const tcpStarted = performance.now();
  await new Promise<void>((resolve, reject) => {
    const socket = connect({ port: 9201, host: address!, allowHalfOpen: true }, () => {
      source(bytes, 1 << 20).pipe(socket);
    });
    socket.on('data', () => resolve());
    socket.on('error', reject);
  });
  const tcpSeconds = (performance.now() - tcpStarted) / 1000;
  const wsStarted = performance.now();
  await new Promise<void>((resolve, reject) => {
    const socket = new WebSocket(`ws://${address}:9202`, { perMessageDeflate: false, generateMask: (mask) => mask.fill(0) });
    socket.on('open', () => {
      void new ChannelSender(socket, 'bench').sendStream('bench', source(bytes, 1 << 20));
    });
    socket.on('message', () => resolve());
    socket.on('error', reject);
  });
  const wsSeconds = (performance.now() - wsStarted) / 1000;
  const mbps = (seconds: number) => Math.round((bytes * 8) / seconds / 1e6);
  process.stdout.write(`${JSON.stringify({ tcpMbps: mbps(tcpSeconds), wsMbps: mbps(wsSeconds) })}\n`);
  process.exit(0);
}
