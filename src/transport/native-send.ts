import { spawn } from 'node:child_process';
import type WebSocket from 'ws';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { digestPattern } from '../digest.ts';
import { frameSendPath } from '../paths.ts';

// One stream's frames written by ferry-frame-send (native/frame-send.c)
// straight onto the socket under a client WebSocket, while the agent keeps
// reading that socket and writes nothing on it until the helper is done.

const resultSchema = z.object({ bytes: z.number().int().nonnegative(), digest: z.string().regex(digestPattern), frames: z.number().int().nonnegative(), cpuMs: z.number().int().nonnegative() });
export type NativeSendResult = z.infer<typeof resultSchema>;

/** Off with FERRY_NATIVE_SEND=0 (or without the helper): the JavaScript sender does the same work. */
export function nativeSendAvailable(): boolean {
  return process.env.FERRY_NATIVE_SEND !== '0' && existsSync(frameSendPath());
}

export interface NativeSendOptions {
  frameBytes: number;
  /** 1-based frame of this stream to spoil after hashing (test fault), or 0. */
  corruptFrame: number;
  onBytes?: (bytes: number) => void;
  /** Rejects the send (and kills the helper) once the channel has closed. */
  closed: Promise<void>;
}

/** Sends everything readable on `input` as binary frames on `socketFd`. */
export function sendNative(input: number, socketFd: number, options: NativeSendOptions): Promise<NativeSendResult> {
  const child = spawn(frameSendPath(), [String(options.frameBytes), String(options.corruptFrame)], {
    stdio: [input, 'pipe', 'pipe', socketFd],
  });
  let result: NativeSendResult | undefined;
  let malformed = false;
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (text: string) => {
    if (stderr.length < 4096) stderr += text;
  });
  const lines = createInterface({ input: child.stdout! });
  lines.on('line', (line) => {
    if (line.startsWith('+')) return options.onBytes?.(Number(line.slice(1)));
    const parsed = resultSchema.safeParse(safeJson(line));
    if (parsed.success) result = parsed.data;
    else malformed = true;
  });
  let channelClosed = false;
  const onClosed = () => {
    channelClosed = true;
    child.kill('SIGKILL');
  };
  void options.closed.then(onClosed, onClosed);
  return new Promise((resolve, reject) => {
    child.on('error', (error) => reject(new FerryError('HELPER_MISSING', `ferry-frame-send did not start: ${error.message}`, { cause: error })));
    // 'close', not 'exit': the result line must have been read.
    child.on('close', (code, signal) => {
      if (code === 0 && result && !malformed) return resolve(result);
      if (channelClosed || code === 3) return reject(new FerryError('PEER_GONE', 'data channel closed while sending'));
      const how = signal ? `was killed by ${signal}` : code === 4 ? 'could not read its input' : `exited ${code}`;
      reject(new FerryError('TRANSFER_FAILED', `ferry-frame-send ${how}${stderr ? `: ${stderr.trim()}` : ''}`));
    });
  });
}

function safeJson(line: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    return undefined;
  }
}

/** The retransmission timeout cap for connections that wait out a cut (post-copy). */
export const retransmitCapMs = 1_000;

/** The fd of the TCP socket under a WebSocket (a TLSSocket's handle has it too). */
export function tcpFd(socket: WebSocket): number | undefined {
  const transport = (socket as unknown as { _socket?: { _handle?: { fd?: number } } })._socket;
  const fd = transport?._handle?.fd;
  return typeof fd === 'number' && fd > 2 ? fd : undefined;
}

/**
 * Caps the TCP retransmission timeout of the connection under `socket` at
 * `ms` (TCP_RTO_MAX_MS, through ferry-frame-send: Node cannot set it), so
 * that a link back after a cut is noticed within about `ms` instead of at
 * the next exponentially backed-off retransmission. Resolves to the value
 * the kernel reports; rejects when there is no helper, no fd or no support.
 * TCP_USER_TIMEOUT is set to `userTimeoutMs` with it: left to tcp_retries2,
 * the kernel would give the connection up after ~13 s of retries at 1 s.
 */
export function capRetransmitTimeout(socket: WebSocket, ms: number, userTimeoutMs: number): Promise<number> {
  const fd = tcpFd(socket);
  if (fd === undefined) return Promise.reject(new FerryError('INCOMPATIBLE', 'no TCP socket fd under this connection'));
  if (!existsSync(frameSendPath())) return Promise.reject(new FerryError('HELPER_MISSING', `${frameSendPath()} is missing`));
  return new Promise((resolve, reject) => {
    const child = spawn(frameSendPath(), ['--rto-max', String(ms), String(userTimeoutMs)], { stdio: ['ignore', 'pipe', 'pipe', fd] });
    let out = '';
    let err = '';
    child.stdout!.setEncoding('utf8').on('data', (text: string) => (out += text.slice(0, 64)));
    child.stderr!.setEncoding('utf8').on('data', (text: string) => (err += text.slice(0, 512)));
    child.on('error', (error) => reject(new FerryError('HELPER_MISSING', `ferry-frame-send did not start: ${error.message}`, { cause: error })));
    child.on('close', (code) => {
      const value = Number(out.trim());
      if (code === 0 && Number.isInteger(value)) return resolve(value);
      reject(new FerryError('INCOMPATIBLE', `could not cap the retransmission timeout: ${err.trim() || `exit ${code}`}`));
    });
  });
}

/**
 * Post-copy waits out a cut link on these connections; TCP's retries back
 * off exponentially, so a link back after 20 s may be retried only seconds
 * later, past the bound. Capped at 1 s, it is noticed within about a
 * second. Without the cap (no helper, an older kernel) the wait still works,
 * only later: `warn` is told. TCP itself then waits for acknowledgements
 * until `boundMs` and a margin have passed; the heartbeat ends the link at
 * the bound.
 */
export function quickRetransmits(sockets: WebSocket[], boundMs: number, warn: (error: unknown) => void): void {
  for (const socket of sockets) capRetransmitTimeout(socket, retransmitCapMs, boundMs + 10_000).catch(warn);
}
