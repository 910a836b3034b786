import type WebSocket from 'ws';

/**
 * Pings a peer may leave unanswered. FERRY_HEARTBEAT_MISSED raises it where
 * time itself runs slow: under the VM lane's emulation (test/vm/lane.ts) a
 * 6 s window is a few hundred ms of native work on a busy event loop.
 */
const defaultMissedLimit = Number(process.env.FERRY_HEARTBEAT_MISSED) || 3;

export interface SilenceWatch {
  /** The peer has been silent past the usual window; the link is kept for up to the bound. */
  silent?: (silentMs: number) => void;
  /** The peer was heard again after such a silence. */
  back?: (silentMs: number) => void;
}

export interface Heartbeat {
  /** How long the peer may stay silent before it is gone, in ms. */
  readonly windowMs: number;
  /**
   * From now on the peer may stay silent up to `boundMs` (a cut link TCP
   * carries over once it returns); undefined: back to the usual window.
   */
  tolerate(boundMs: number | undefined, watch?: SilenceWatch): void;
  /** The longest the peer was silent while a bound was tolerated, in ms. */
  readonly longestSilenceMs: number;
  /** The peer stayed silent past its window and the socket was cut for it (not closed by either end). */
  readonly expired: boolean;
}

/**
 * Pings the peer every `intervalMs`; a peer silent (no pong, no message) for
 * longer than its window (dead process, cut link) is gone and the socket is
 * terminated, which every waiter on it sees as a close.
 */
export function keepAlive(socket: WebSocket, intervalMs = 2_000, missedLimit = defaultMissedLimit): Heartbeat {
  // Counted in pings, not wall time: after the event loop stalled, the timer runs before the pongs that wait to be read.
  let limit = missedLimit;
  let missed = 0;
  let watch: SilenceWatch | undefined;
  let tolerating = false;
  let longestSilenceMs = 0;
  let heardAt = performance.now();
  let reportedSilent = false;
  let expired = false;
  // Any traffic proves the peer is alive; a busy link may delay pongs.
  const heard = () => {
    const now = performance.now();
    const silence = now - heardAt;
    heardAt = now;
    missed = 0;
    if (tolerating) longestSilenceMs = Math.max(longestSilenceMs, silence);
    if (reportedSilent) {
      reportedSilent = false;
      watch?.back?.(Math.round(silence));
    }
  };
  socket.on('pong', heard);
  socket.on('message', heard);
  const timer = setInterval(() => {
    if (missed >= limit) {
      expired = true;
      socket.terminate();
      return;
    }
    if (tolerating && missed >= missedLimit && !reportedSilent) {
      reportedSilent = true;
      watch?.silent?.(Math.round(performance.now() - heardAt));
    }
    missed += 1;
    socket.ping();
  }, intervalMs);
  timer.unref();
  socket.once('close', () => clearInterval(timer));
  return {
    get windowMs() {
      return limit * intervalMs;
    },
    tolerate(boundMs, nextWatch) {
      tolerating = boundMs !== undefined;
      limit = Math.max(missedLimit, Math.ceil((boundMs ?? 0) / intervalMs));
      watch = nextWatch;
      if (!tolerating) reportedSilent = false;
    },
    get longestSilenceMs() {
      return Math.round(longestSilenceMs);
    },
    get expired() {
      return expired;
    },
  };
}
