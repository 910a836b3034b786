import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { Readable } from 'node:stream';
import WebSocket, { WebSocketServer } from 'ws';
import { ChannelReceiver, ChannelSender, type FdSource } from '../src/transport/channel.ts';

// One side of the stream-throughput benchmark, run inside a host's netns:
//   node bench/throughput.ts serve ADDRESS        (destination: raw TCP on 9201, WebSocket on 9202)
//   node bench/throughput.ts send ADDRESS BYTES   (source: prints one JSON line of figures)
// Three paths carry the same random bytes, cycled from a 64 MiB pool so they
// are not cache-hot:
// - tcp: a plain socket writes them from memory in 1 MiB chunks (its best);
// - channel: the data channel sends them from a Readable in its 16 KiB
//   frames, from JavaScript, as it sends tar streams and followed images;
// - native: the data channel sends them from an fd, its frames written by
//   ferry-frame-send, as it sends the final dump's page pipes. The fd is a
//   file on tmpfs, so this path also pays a copy out of the page cache that
//   the plain socket does not.
// The receiver is the same ChannelReceiver for both channel paths, and
// discards what it gets, as the plain socket's receiver does. CPU times are
// user + system; the sender's include its children (ferry-frame-send).

const pool = randomBytes(64 << 20);
const [mode, address, size] = process.argv.slice(2);

/** CPU time (user + system) this process used since `since`. */
function cpuMs(since: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(since);
  return Math.round((used.user + used.system) / 1000);
}

/** This process's CPU time and its reaped children's, in ms (100 Hz ticks). */
function cpuWithChildrenMs(): number {
  const fields = readFileSync('/proc/self/stat', 'utf8').split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12]) + Number(fields[13]) + Number(fields[14])) * 10;
}

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
  createServer({ allowHalfOpen: true }, (socket) => {
    const started = process.cpuUsage();
    socket.resume().on('end', () => socket.end(String(cpuMs(started))));
  }).listen(9201, address);
  const server = new WebSocketServer({ host: address, port: 9202, maxPayload: 16 * 1024 * 1024, perMessageDeflate: false });
  server.on('connection', (socket) => {
    const started = process.cpuUsage();
    const receiver = new ChannelReceiver(socket);
    void receiver.next().then(async (stream) => {
      stream.body.resume();
      await stream.end;
      socket.send(JSON.stringify({ type: 'done', cpuMs: cpuMs(started) }));
    });
  });
  process.stdout.write('ready\n');
} else {
  const bytes = Number(size);
  const mbps = (ms: number) => Math.round((bytes * 8) / (ms / 1000) / 1e6);

  /** Runs one path; returns its rate and both sides' CPU. */
  const timed = async (send: () => Promise<number>) => {
    const started = performance.now();
    const cpu = cpuWithChildrenMs();
    const receiverCpuMs = await send();
    return { mbps: mbps(performance.now() - started), senderCpuMs: cpuWithChildrenMs() - cpu, receiverCpuMs };
  };
  const overChannel = (send: (sender: InstanceType<typeof ChannelSender>) => Promise<unknown>) =>
    new Promise<number>((resolve, reject) => {
      const socket = new WebSocket(`ws://${address}:9202`, { perMessageDeflate: false, generateMask: (mask) => mask.fill(0) });
      socket.on('open', () => void send(new ChannelSender(socket, 'bench')).catch(reject));
      socket.on('message', (data) => resolve((JSON.parse(String(data)) as { cpuMs: number }).cpuMs));
      socket.on('error', reject);
    });

  const tcp = await timed(
    () =>
      new Promise<number>((resolve, reject) => {
        const socket = connect({ port: 9201, host: address!, allowHalfOpen: true }, () => {
          source(bytes, 1 << 20).pipe(socket);
        });
        socket.on('data', (data) => resolve(Number(data.toString())));
        socket.on('error', reject);
      }),
  );
  const channel = await timed(() => overChannel((sender) => sender.sendStream('bench', source(bytes, 1 << 20))));

  const file = `/dev/shm/ferry-bench-stream-${process.pid}`;
  let native: typeof tcp;
  try {
    const out = openSync(file, 'w');
    for (let written = 0; written < bytes; written += pool.length) writeSync(out, pool, 0, Math.min(pool.length, bytes - written));
    closeSync(out);
    const fd = openSync(file, 'r');
    const from: FdSource = { fd, readable: () => source(bytes, 1 << 20) };
    let streams = 0;
    native = await timed(() =>
      overChannel(async (sender) => {
        await sender.sendFrom('bench', from);
        streams = sender.nativeStreams;
      }),
    );
    closeSync(fd);
    if (streams !== 1) throw new Error('the native path did not run: is ferry-frame-send built?');
  } finally {
    rmSync(file, { force: true });
  }
  process.stdout.write(`${JSON.stringify({ tcp, channel, native })}\n`);
  process.exit(0);
}
