import { PassThrough, type Duplex, type Readable } from 'node:stream';
import { TLSSocket } from 'node:tls';
import type WebSocket from 'ws';
import { FerryError } from '../errors.ts';
import { checkedMessage, parseJsonMessage } from '../protocol/messages.ts';
import { dataFrameSchema, type DataFrame } from '../protocol/migration.ts';
import { faultNumber } from '../faults.ts';
import { streamDigest, type StreamDigest } from '../digest.ts';
import { nativeSendAvailable, sendNative, tcpFd } from './native-send.ts';

/** Bytes handed to ws but not yet written to the socket before the sender waits. */
const inFlightLimit = 4 * 1024 * 1024;
/** Received bytes buffered for a slow consumer before the socket is paused. */
const receiveHighWater = 2 * 1024 * 1024;
/** Streams opened but not yet taken by the consumer. */
const maxPendingStreams = 8;
/**
 * The largest binary frame: ws reassembles a frame that spans socket reads
 * into a new buffer, and 16 KiB frames mostly do not span (256 MiB over
 * loopback: 16 KiB ~1.2 s, 64 KiB ~1.8 s, 1 MiB ~1.6 s).
 */
const frameBytes = 16 << 10;

export interface StreamResult {
  bytes: number;
  digest: string;
}

/** A stream's bytes as an fd (a page pipe), and as a Readable of the same bytes. */
export interface FdSource {
  fd: number;
  /** For a channel whose socket the native sender cannot write (TLS, or no helper). */
  readable(): Readable;
}

/**
 * Sending side of a data channel: one stream at a time, binary frames with
 * backpressure (at most `inFlightLimit` unwritten bytes), then a stream-end
 * frame carrying the digest of everything sent.
 */
export class ChannelSender {
  private readonly socket: WebSocket;
  private framesSent = 0;
  /** Streams whose frames ferry-frame-send wrote, and the CPU time it took for them. */
  nativeStreams = 0;
  nativeCpuMs = 0;
  private readonly corruptFrame: number | undefined;
  /** The TCP (or TLS) socket under the WebSocket, corked while a burst of frames is queued. */
  private readonly transport: Duplex | undefined;
  private corked = false;
  /** Settles when the channel closes: a native send in progress is then killed. */
  private readonly closed: Promise<void>;

  constructor(socket: WebSocket, channelName: string) {
    this.socket = socket;
    this.corruptFrame = faultNumber(`corrupt-chunk:${channelName}`);
    this.transport = (socket as unknown as { _socket?: Duplex })._socket;
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  /**
   * Sends `source` as one stream, its frames written by ferry-frame-send
   * when this is a plain TCP client socket: the same frames, stream-open
   * and stream-end as `sendStream`, so the receiver cannot tell the two
   * apart and checks them the same way.
   */
  async sendFrom(name: string, source: FdSource, options: { onBytes?: (bytes: number) => void } = {}): Promise<StreamResult> {
    const socketFd = this.nativeSocketFd();
    if (socketFd === undefined) return this.sendStream(name, source.readable(), options);
    await this.sendWritten({ type: 'stream-open', name });
    // The helper's frames must follow every byte ws has queued, and nothing ws writes may land among them.
    await this.waitBelow(1);
    const first = this.framesSent;
    const corruptFrame = this.corruptFrame !== undefined && this.corruptFrame > first ? this.corruptFrame - first : 0;
    const sent = await sendNative(source.fd, socketFd, { frameBytes, corruptFrame, closed: this.closed, ...(options.onBytes ? { onBytes: options.onBytes } : {}) });
    this.framesSent += sent.frames;
    this.nativeStreams += 1;
    this.nativeCpuMs += sent.cpuMs;
    if (this.socket.readyState !== this.socket.OPEN) throw peerGone();
    await this.sendWritten({ type: 'stream-end', bytes: sent.bytes, digest: sent.digest });
    return { bytes: sent.bytes, digest: sent.digest };
  }

  /** The fd of the TCP socket under a client WebSocket (clients mask: the helper writes client frames). */
  private nativeSocketFd(): number | undefined {
    if (!nativeSendAvailable() || !this.socket.url || !this.transport || this.transport instanceof TLSSocket) return undefined;
    if (this.socket.readyState !== this.socket.OPEN) return undefined;
    return tcpFd(this.socket);
  }

  async sendStream(
    name: string,
    source: Readable,
    options: { files?: () => Record<string, string>; onBytes?: (bytes: number) => void; deleted?: string[] } = {},
  ): Promise<StreamResult> {
    const { files, onBytes, deleted } = options;
    this.sendControl({ type: 'stream-open', name, ...(deleted ? { deleted } : {}) });
    const hash = streamDigest();
    let bytes = 0;
    for await (const chunk of source as AsyncIterable<Buffer>) {
      hash.update(chunk);
      bytes += chunk.length;
      onBytes?.(chunk.length);
      for (let offset = 0; offset < chunk.length; offset += frameBytes) {
        await this.sendBinary(offset === 0 && chunk.length <= frameBytes ? chunk : chunk.subarray(offset, offset + frameBytes));
      }
    }
    const digest = hash.hex();
    if (this.socket.readyState !== this.socket.OPEN) throw peerGone();
    // Done once the stream-end, and so every frame before it, is written to the socket.
    await this.sendWritten({ type: 'stream-end', bytes, digest, ...(files ? { files: files() } : {}) });
    return { bytes, digest };
  }

  /** Sends a control frame; resolves when it is written, rejects if the channel closed first. */
  private sendWritten(frame: DataFrame): Promise<void> {
    checkedMessage(dataFrameSchema, frame, 'data channel frame');
    return new Promise((resolve, reject) => {
      this.socket.send(JSON.stringify(frame), (error) => {
        if (error || this.socket.readyState !== this.socket.OPEN) reject(peerGone());
        else resolve();
      });
    });
  }

  sendControl(frame: DataFrame): void {
    this.socket.send(JSON.stringify(checkedMessage(dataFrameSchema, frame, 'data channel frame')));
  }

  async sendBinary(chunk: Buffer): Promise<void> {
    // ws only reports a send after close to the callback: without this a dead channel would look like a fast one.
    if (this.socket.readyState !== this.socket.OPEN) throw peerGone();
    this.cork();
    this.framesSent += 1;
    const data = this.framesSent === this.corruptFrame ? corrupt(chunk) : chunk;
    // No callback per frame (65 536 of them per GiB): ws's bufferedAmount counts what is not yet written.
    this.socket.send(data, { binary: true });
    if (this.socket.bufferedAmount > inFlightLimit) await this.waitBelow(inFlightLimit / 2);
  }

  /**
   * Frames queued in one turn of the event loop leave in one writev: ws
   * writes each frame on its own, and 16 KiB writes cost a syscall and a
   * small packet each (the veth stream ran at about half of a plain socket).
   */
  private cork(): void {
    if (this.corked || !this.transport) return;
    this.corked = true;
    this.transport.cork();
    setImmediate(() => {
      this.corked = false;
      this.transport!.uncork();
    });
  }

  /** Waits for the socket to drain below `limit` unwritten bytes; rejects once the channel is closed. */
  private waitBelow(limit: number): Promise<void> {
    if (this.socket.bufferedAmount < limit) return Promise.resolve();
    const transport = this.transport;
    return new Promise((resolve, reject) => {
      const check = () => {
        const open = this.socket.readyState === this.socket.OPEN;
        if (open && this.socket.bufferedAmount >= limit) return;
        transport?.off('drain', check);
        this.socket.off('close', check);
        clearInterval(poll);
        if (open) resolve();
        else reject(peerGone());
      };
      transport?.on('drain', check);
      this.socket.on('close', check);
      // 'drain' comes only once the buffer is empty; the poll ends the wait earlier, at the limit.
      const poll = setInterval(check, 5);
      check();
    });
  }
}

function corrupt(chunk: Buffer): Buffer {
  const copy = Buffer.from(chunk);
  copy[copy.length >> 1] = (copy[copy.length >> 1] ?? 0) ^ 0xff;
  return copy;
}

/** No phase: the sender's caller knows which step was sending (rootfs pass 1 runs in precopy). */
function peerGone(): FerryError {
  return new FerryError('PEER_GONE', 'data channel closed while sending');
}

export interface IncomingStream {
  name: string;
  deleted: string[];
  body: Readable;
  /** Resolves with the sender's stream-end once the body is fully received and checked. */
  end: Promise<{ bytes: number; digest: string; files: Record<string, string> | undefined }>;
}

/**
 * Receiving side: turns frames into one Readable per stream, pausing the
 * socket while the consumer is behind, and checks the digest at stream-end.
 */
export class ChannelReceiver {
  private readonly socket: WebSocket;
  private current: { body: PassThrough; hash: StreamDigest; bytes: number; settle: (frame: DataFrame | Error) => void } | undefined;
  private readonly pending: IncomingStream[] = [];
  private readonly waiting: Array<{ resolve: (stream: IncomingStream) => void; reject: (error: FerryError) => void }> = [];
  private closedError: FerryError | undefined;

  constructor(socket: WebSocket) {
    this.socket = socket;
    socket.on('message', (data, isBinary) => this.onMessage(data as Buffer, isBinary));
    socket.on('close', () => this.fail(new FerryError('PEER_GONE', 'data channel closed', { phase: 'stream' })));
  }

  /** The next stream the peer opens. */
  next(): Promise<IncomingStream> {
    const ready = this.pending.shift();
    if (ready) return Promise.resolve(ready);
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  private onMessage(data: Buffer, isBinary: boolean): void {
    if (isBinary) return this.onData(data);
    let frame: DataFrame;
    try {
      frame = dataFrameSchema.parse(parseJsonMessage(data.toString('utf8')));
    } catch {
      return this.fail(new FerryError('BAD_MESSAGE', 'malformed data channel frame', { phase: 'stream' }));
    }
    if (frame.type === 'stream-open') this.open(frame.name, frame.deleted ?? []);
    else this.finish(frame);
  }

  /** The consumer expects no more streams: anything the peer still sends ends the channel. */
  close(): void {
    this.fail(new FerryError('BAD_MESSAGE', 'no more streams expected on this channel', { phase: 'stream' }));
  }

  private open(name: string, deleted: string[]): void {
    if (this.closedError) return void this.socket.terminate();
    if (this.current) return this.fail(new FerryError('BAD_MESSAGE', 'a stream opened before the previous one ended', { phase: 'stream' }));
    // Streams queue only while the consumer finishes the one before; a peer may not pile them up.
    if (this.pending.length >= maxPendingStreams) return this.fail(new FerryError('BAD_MESSAGE', 'too many streams opened ahead of the receiver', { phase: 'stream' }));
    const body = new PassThrough({ highWaterMark: receiveHighWater });
    // A failed stream is destroyed with its error even when no consumer reads it
    // any more (the receiver gave up on an earlier one): that must not crash the agent.
    body.on('error', () => undefined);
    body.on('drain', () => this.socket.resume());
    let settle!: (frame: DataFrame | Error) => void;
    const end = new Promise<{ bytes: number; digest: string; files: Record<string, string> | undefined }>(
      (resolve, reject) => {
        settle = (frame) => {
          if (frame instanceof Error) return reject(frame);
          if (frame.type === 'stream-end') resolve({ bytes: frame.bytes, digest: frame.digest, files: frame.files });
        };
      },
    );
    end.catch(() => undefined);
    this.current = { body, hash: streamDigest(), bytes: 0, settle };
    const stream = { name, deleted, body, end };
    const waiter = this.waiting.shift();
    if (waiter) waiter.resolve(stream);
    else this.pending.push(stream);
  }

  private onData(data: Buffer): void {
    if (this.closedError) return void this.socket.terminate();
    const current = this.current;
    if (!current) return this.fail(new FerryError('BAD_MESSAGE', 'data frame outside a stream', { phase: 'stream' }));
    current.hash.update(data);
    current.bytes += data.length;
    if (!current.body.write(data)) this.socket.pause();
  }

  private finish(frame: DataFrame & { type: 'stream-end' }): void {
    const current = this.current;
    if (!current) return this.fail(new FerryError('BAD_MESSAGE', 'stream-end without a stream', { phase: 'stream' }));
    this.current = undefined;
    const digest = current.hash.hex();
    if (digest !== frame.digest || current.bytes !== frame.bytes) {
      const error = new FerryError(
        'CHECKSUM_MISMATCH',
        `stream ${frame.digest.slice(0, 12)}…: received ${current.bytes} bytes with digest ${digest}, sender says ${frame.bytes} bytes ${frame.digest}`,
        { phase: 'stream' },
      );
      current.body.destroy(error);
      current.settle(error);
      return;
    }
    current.body.end();
    // A body paused the socket when full; ws still parsed what it had read, this
    // stream-end among it. An ended body never emits 'drain', so it cannot resume
    // the socket: resume here (the next stream has a body of its own to fill).
    this.socket.resume();
    current.settle(frame);
  }

  private fail(error: FerryError): void {
    this.closedError ??= error;
    // A consumer waiting for the next stream must hear of the end too, or it waits forever.
    for (const waiter of this.waiting.splice(0)) waiter.reject(this.closedError);
    if (this.current) {
      this.current.body.destroy(error);
      this.current.settle(error);
      this.current = undefined;
    }
  }
}
