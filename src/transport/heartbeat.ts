import type WebSocket from 'ws';

/**
 * Pings the peer every `intervalMs`; a peer that has not answered the previous
 * ping by the next one is gone (dead process, cut link) and the socket is
 * terminated, which every waiter on it sees as a close.
 */
/**
 * Pings a peer may leave unanswered. FERRY_HEARTBEAT_MISSED raises it where
 * time itself runs slow: under the VM lane's emulation (test/vm/lane.ts) a
 * 6 s window is a few hundred ms of native work on a busy event loop.
 */
const defaultMissedLimit = Number(process.env.FERRY_HEARTBEAT_MISSED) || 3;

export function keepAlive(socket: WebSocket, intervalMs = 2_000, missedLimit = defaultMissedLimit): void {
  let missed = 0;
  socket.on('pong', () => {
    missed = 0;
  });
  // Any traffic proves the peer is alive; a busy link may delay pongs.
  socket.on('message', () => {
    missed = 0;
  });
  const timer = setInterval(() => {
    if (missed >= missedLimit) {
      socket.terminate();
      return;
    }
    missed += 1;
    socket.ping();
  }, intervalMs);
  timer.unref();
  socket.once('close', () => clearInterval(timer));
}
