import { spawn } from 'node:child_process';
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
