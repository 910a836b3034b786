import type { Duplex } from 'node:stream';
import type WebSocket from 'ws';
import { FerryError, type Phase } from '../errors.ts';

/** Bytes handed to ws but not yet on the socket before the local side is paused. */
const inFlightLimit = 4 * 1024 * 1024;

export interface Relay {
  /** Resolves when either side ends; rejects when the data channel died first. */
  done: Promise<void>;
  /** Bytes from the local side to the channel. */
  readonly sent: number;
  end(): void;
}

/**
 * Joins a local byte stream (CRIU's page-server socket) to a data channel,
 * both ways, with backpressure each way. Post-copy's pages travel so: the
 * lazy-pages daemon's requests one way, the source's pages the other, on the
 * channel the peers authenticated.
 */
export function relay(socket: WebSocket, local: Duplex, phase: Phase, delayMs?: number): Relay {
  let sent = 0;
  let finished = false;
  let settle: (error?: FerryError) => void = () => undefined;
  const done = new Promise<void>((resolve, reject) => {
    settle = (error) => {
      if (finished) return;
      finished = true;
      local.off('data', onLocal);
      socket.off('message', onMessage);
      if (error) reject(error);
      else resolve();
    };
  });
  done.catch(() => undefined);
  const onLocal = (chunk: Buffer) => {
    sent += chunk.length;
    socket.send(chunk, { binary: true }, () => {
      if (local.isPaused() && socket.bufferedAmount < inFlightLimit / 2) local.resume();
    });
    if (socket.bufferedAmount > inFlightLimit) local.pause();
    else if (delayMs) {
      // Test fault: a slow link, so that faults can land mid-post-copy.
      local.pause();
      setTimeout(() => local.resume(), delayMs);
    }
  };
  const onMessage = (data: WebSocket.RawData, isBinary: boolean) => {
    if (!isBinary) return settle(new FerryError('BAD_MESSAGE', 'a text frame on a post-copy page channel', { phase }));
    // ws hands over Buffers (its default binaryType), fragmented frames as a list: no copy of each chunk.
    const chunk = Array.isArray(data) ? Buffer.concat(data) : (data as Buffer);
    if (!local.write(chunk)) {
      socket.pause();
      local.once('drain', () => socket.resume());
    }
  };
  local.on('data', onLocal);
  local.once('end', () => settle());
  local.once('close', () => settle());
  local.on('error', () => settle());
  socket.on('message', onMessage);
  socket.once('close', () => settle(new FerryError('PEER_GONE', 'the post-copy page channel closed', { phase })));
  return {
    done,
    get sent() {
      return sent;
    },
    end: () => {
      settle();
      local.end();
    },
  };
}
