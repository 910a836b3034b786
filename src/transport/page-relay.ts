import type { Duplex } from 'node:stream';
import type WebSocket from 'ws';
import { FerryError } from '../errors.ts';

const pageSize = 4096;
/** CRIU's page-server commands the lazy-pages daemon sends (criu/page-xfer.c). */
const psIovGet = 7;
const psIovClose = 0x1023;
/** What the daemon sends to end, having its page-server connection by --ps-socket. */
const psIovForceClose = 0x1024;
const psCmdMask = 0xffff;
/** Requests the daemon may have outstanding while the source is away: one per faulting task and a few pushes, in practice. */
const maxOutstanding = 65_536;

/**
 * CRIU's `struct page_server_iov`: u32 cmd, then nr_pages, vaddr and dst_id.
 * nr_pages is a u64 from CRIU 4.2 on (32 bytes with the padding), a u32
 * before (24 bytes).
 */
export interface PageServerLayout {
  bytes: 24 | 32;
}

export function pageServerLayout(criu: { major: number; minor: number }): PageServerLayout {
  return { bytes: criu.major > 4 || (criu.major === 4 && criu.minor >= 2) ? 32 : 24 };
}

interface Iov {
  cmd: number;
  nrPages: number;
  vaddr: bigint;
  dstId: bigint;
}

function readIov(layout: PageServerLayout, buffer: Buffer): Iov {
  const wide = layout.bytes === 32;
  const nrPages = wide ? buffer.readBigUInt64LE(8) : BigInt(buffer.readUInt32LE(4));
  return {
    cmd: buffer.readUInt32LE(0),
    // A count past 2^32 pages is nonsense either way; it is refused as more than was asked.
    nrPages: nrPages > 0xffffffffn ? Number.MAX_SAFE_INTEGER : Number(nrPages),
    vaddr: buffer.readBigUInt64LE(wide ? 16 : 8),
    dstId: buffer.readBigUInt64LE(wide ? 24 : 16),
  };
}

function writeIov(layout: PageServerLayout, iov: Iov): Buffer {
  const buffer = Buffer.alloc(layout.bytes);
  const wide = layout.bytes === 32;
  buffer.writeUInt32LE(iov.cmd, 0);
  if (wide) buffer.writeBigUInt64LE(BigInt(iov.nrPages), 8);
  else buffer.writeUInt32LE(iov.nrPages, 4);
  buffer.writeBigUInt64LE(iov.vaddr, wide ? 16 : 8);
  buffer.writeBigUInt64LE(iov.dstId, wide ? 24 : 16);
  return buffer;
}

/** One request of the daemon's, from when it is read until its whole answer is delivered. */
interface Outstanding {
  raw: Buffer;
  iov: Iov;
  /** Sent on the current channel. */
  sent: boolean;
  /** PS_IOV_GET: the page count of the answer whose header the daemon has; then `delivered` of its bytes. */
  answerPages?: number;
  delivered: number;
}

/** The answer being read from the channel: its header, then `length` bytes of pages starting at `start` of the request's. */
interface Incoming {
  header: Buffer[];
  headerBytes: number;
  start: number;
  length: number;
  consumed: number;
}

/**
 * The destination's end of post-copy's page traffic: joins the lazy-pages
 * daemon's page-server connection to the pages channel, reading CRIU's
 * framing both ways. That is what lets the copy outlive its channel: when
 * the channel goes, the daemon's connection stays open (its tasks wait on
 * their faults), and on a new channel (a restarted source agent serving the
 * same frozen tasks) every request that was not answered in full is asked
 * again, and an answer cut mid-way is completed from where it stopped. It
 * also holds a source to answering what was asked: an answer for another
 * address, task or size than the request's is refused, as are bytes nobody
 * asked for.
 */
export class PageRelay {
  readonly done: Promise<void>;
  private readonly local: Duplex;
  private readonly layout: PageServerLayout;
  private readonly phase = 'postcopy' as const;
  private channel: WebSocket | undefined;
  private readonly outstanding: Outstanding[] = [];
  private upstream: Buffer = Buffer.alloc(0);
  private incoming: Incoming | undefined;
  private finished = false;
  private settle: (error?: FerryError) => void = () => undefined;
  private readonly detachedListeners: Array<(reason: string) => void> = [];
  private pageBytes = 0;

  constructor(local: Duplex, layout: PageServerLayout) {
    this.local = local;
    this.layout = layout;
    this.done = new Promise<void>((resolve, reject) => {
      this.settle = (error) => {
        if (this.finished) return;
        this.finished = true;
        this.local.off('data', this.onLocal);
        // Done (the daemon said goodbye), the source closes the channel; broken, it is cut here.
        this.dropChannel(error !== undefined);
        if (error) reject(error);
        else resolve();
      };
    });
    this.done.catch(() => undefined);
    local.on('data', this.onLocal);
    local.once('end', () => this.settle());
    local.once('close', () => this.settle());
    local.on('error', () => this.settle());
  }

  /** Page bytes handed to the daemon. */
  get received(): number {
    return this.pageBytes;
  }

  /** What the daemon still waits for: its requests, and how much of the first one's answer it has. */
  get pending(): { requests: number; deliveredOfFirst: number } {
    return { requests: this.outstanding.length, deliveredOfFirst: this.outstanding[0]?.delivered ?? 0 };
  }

  /** Told each time the channel goes while the daemon still waits on it. */
  onDetached(listener: (reason: string) => void): void {
    this.detachedListeners.push(listener);
  }

  /** Joins a (new) channel; what the daemon still waits for is asked on it. */
  attach(channel: WebSocket): void {
    if (this.finished) {
      channel.terminate();
      return;
    }
    this.dropChannel();
    this.channel = channel;
    channel.on('message', this.onMessage);
    channel.once('close', this.onChannelClose);
    this.flush();
  }

  /** Ends the relay (the daemon's connection is left to its owner). */
  end(): void {
    this.settle();
  }

  private readonly onChannelClose = () => {
    this.dropChannel();
    if (!this.finished) for (const listener of this.detachedListeners) listener('the post-copy page channel closed');
  };

  private dropChannel(terminate = true): void {
    const channel = this.channel;
    if (!channel) return;
    this.channel = undefined;
    channel.off('message', this.onMessage);
    channel.off('close', this.onChannelClose);
    if (terminate && channel.readyState !== channel.CLOSED) channel.terminate();
    // What was under way on it is asked again on the next one; a half-read header is dropped.
    this.incoming = undefined;
    for (const request of this.outstanding) request.sent = false;
  }

  private fail(message: string): void {
    this.settle(new FerryError('BAD_MESSAGE', message, { phase: this.phase }));
  }

  private readonly onLocal = (chunk: Buffer) => {
    this.upstream = this.upstream.length ? Buffer.concat([this.upstream, chunk]) : chunk;
    const size = this.layout.bytes;
    while (this.upstream.length >= size) {
      const raw = Buffer.from(this.upstream.subarray(0, size));
      this.upstream = this.upstream.subarray(size);
      const iov = readIov(this.layout, raw);
      const command = iov.cmd & psCmdMask;
      if (command !== psIovGet && iov.cmd !== psIovClose && iov.cmd !== psIovForceClose) return this.fail(`the lazy-pages daemon sent page-server command ${iov.cmd}, which post-copy does not carry`);
      if (this.outstanding.length >= maxOutstanding) return this.fail(`more than ${maxOutstanding} page requests outstanding`);
      this.outstanding.push({ raw, iov, sent: false, delivered: 0 });
    }
    this.flush();
  };

  /**
   * Sends what is not yet asked on this channel. While an answer is cut
   * mid-way only its rest is asked: the server answers in order, and the
   * rest may come in more than one answer.
   */
  private flush(): void {
    const channel = this.channel;
    if (!channel) return;
    const head = this.outstanding[0];
    if (head && this.partial(head)) {
      if (!head.sent) this.sendRest(channel, head);
      return;
    }
    for (const request of this.outstanding) {
      if (request.sent) continue;
      request.sent = true;
      channel.send(request.raw, { binary: true });
    }
  }

  private partial(request: Outstanding): boolean {
    return request.answerPages !== undefined && request.delivered < request.answerPages * pageSize;
  }

  private sendRest(channel: WebSocket, request: Outstanding): void {
    const donePages = Math.floor(request.delivered / pageSize);
    const rest: Iov = { ...request.iov, nrPages: request.answerPages! - donePages, vaddr: request.iov.vaddr + BigInt(donePages * pageSize) };
    request.sent = true;
    channel.send(writeIov(this.layout, rest), { binary: true });
  }

  private readonly onMessage = (data: WebSocket.RawData, isBinary: boolean) => {
    if (!isBinary) return this.fail('a text frame on a post-copy page channel');
    let chunk = Array.isArray(data) ? Buffer.concat(data) : (data as Buffer);
    while (chunk.length && !this.finished) chunk = this.consume(chunk);
  };

  /** Takes what it can of `chunk` for the request at the head; returns the rest. */
  private consume(chunk: Buffer): Buffer {
    const head = this.outstanding[0];
    if (!head || !head.sent) {
      this.fail('the source sent page-server bytes nobody asked for');
      return Buffer.alloc(0);
    }
    if (head.iov.cmd === psIovClose || head.iov.cmd === psIovForceClose) return this.consumeClose(head, chunk);
    let incoming = this.incoming;
    if (!incoming) incoming = this.incoming = { header: [], headerBytes: 0, start: 0, length: 0, consumed: 0 };
    if (incoming.headerBytes < this.layout.bytes) {
      const take = Math.min(this.layout.bytes - incoming.headerBytes, chunk.length);
      incoming.header.push(chunk.subarray(0, take));
      incoming.headerBytes += take;
      if (incoming.headerBytes === this.layout.bytes && !this.answerHeader(head, incoming)) return Buffer.alloc(0);
      return chunk.subarray(take);
    }
    const take = Math.min(incoming.length - incoming.consumed, chunk.length);
    const position = incoming.start + incoming.consumed;
    // Of a completing answer, the bytes the daemon already has are dropped.
    const skip = Math.min(take, Math.max(0, head.delivered - position));
    if (take > skip) this.deliver(chunk.subarray(skip, take), head);
    incoming.consumed += take;
    if (incoming.consumed === incoming.length) this.answered(head);
    return chunk.subarray(take);
  }

  /** The answer's header is in: checked against the request; the daemon gets it unless it has one. */
  private answerHeader(request: Outstanding, incoming: Incoming): boolean {
    const raw = Buffer.concat(incoming.header);
    const answer = readIov(this.layout, raw);
    const donePages = Math.floor(request.delivered / pageSize);
    const vaddr = request.iov.vaddr + BigInt(donePages * pageSize);
    const most = (request.answerPages ?? request.iov.nrPages) - donePages;
    if (answer.dstId !== request.iov.dstId || answer.vaddr !== vaddr || answer.nrPages < 1 || answer.nrPages > most) {
      this.fail(`the source answered a request for ${most} pages at 0x${vaddr.toString(16)} of ${request.iov.dstId} with ${answer.nrPages} at 0x${answer.vaddr.toString(16)} of ${answer.dstId}`);
      return false;
    }
    incoming.start = donePages * pageSize;
    incoming.length = answer.nrPages * pageSize;
    if (request.answerPages === undefined) {
      request.answerPages = answer.nrPages;
      this.write(raw);
    }
    return true;
  }

  private consumeClose(head: Outstanding, chunk: Buffer): Buffer {
    // The page server's 4-byte goodbye status, handed over whole.
    let incoming = this.incoming;
    if (!incoming) incoming = this.incoming = { header: [], headerBytes: 0, start: 0, length: 4, consumed: 0 };
    const take = Math.min(4 - incoming.headerBytes, chunk.length);
    incoming.header.push(chunk.subarray(0, take));
    incoming.headerBytes += take;
    if (incoming.headerBytes === 4) {
      this.write(Buffer.concat(incoming.header));
      head.answerPages = 0;
      this.answered(head);
    }
    return chunk.subarray(take);
  }

  private answered(head: Outstanding): void {
    this.incoming = undefined;
    if (this.partial(head)) {
      // A short answer to a rest: ask for what is still missing.
      head.sent = false;
    } else {
      this.outstanding.shift();
    }
    this.flush();
  }

  private deliver(bytes: Buffer, request: Outstanding): void {
    request.delivered += bytes.length;
    this.pageBytes += bytes.length;
    this.write(bytes);
  }

  private write(bytes: Buffer): void {
    if (this.local.write(bytes)) return;
    const channel = this.channel;
    if (!channel || channel.isPaused) return;
    channel.pause();
    this.local.once('drain', () => {
      if (this.channel === channel) channel.resume();
    });
  }
}
