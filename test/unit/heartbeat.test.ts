// The heartbeat over a real WebSocket on loopback whose server stops
// answering pings: the usual window ends the link, a tolerated bound keeps it
// until the bound, and a peer heard again within it is reported back.
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { keepAlive } from '../../src/transport/heartbeat.ts';

const interval = 50;
let server: WebSocketServer | undefined;

afterEach(async () => {
  for (const client of server?.clients ?? []) client.terminate();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = undefined;
});

/** A client linked to a server that never answers a ping (as across a cut link), and the server's end. */
async function silentPeer(): Promise<{ client: WebSocket; peer: WebSocket }> {
  server = new WebSocketServer({ host: '127.0.0.1', port: 0, autoPong: false });
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  const accepted = once(server, 'connection');
  const client = new WebSocket(`ws://127.0.0.1:${port}`);
  await once(client, 'open');
  const [peer] = (await accepted) as [WebSocket];
  return { client, peer };
}

function closedWithin(socket: WebSocket, ms: number): Promise<boolean> {
  if (socket.readyState === socket.CLOSED) return Promise.resolve(true);
  return Promise.race([once(socket, 'close').then(() => true), sleep(ms).then(() => false)]);
}

it('ends a link silent past the usual window (3 pings)', async () => {
  const { client } = await silentPeer();
  const heartbeat = keepAlive(client, interval, 3);
  expect(heartbeat.windowMs).toBe(150);
  expect(await closedWithin(client, 1_000)).toBe(true);
});

it('keeps a silent link up to a tolerated bound, says so, then ends it', async () => {
  const { client } = await silentPeer();
  const heartbeat = keepAlive(client, interval, 3);
  const silences: number[] = [];
  heartbeat.tolerate(600, { silent: (ms) => silences.push(ms) });
  expect(heartbeat.windowMs).toBe(600);
  const started = performance.now();
  // Well past the usual 150-200 ms.
  expect(await closedWithin(client, 400)).toBe(false);
  expect(silences).toHaveLength(1);
  expect(silences[0]).toBeGreaterThanOrEqual(140);
  expect(await closedWithin(client, 2_000)).toBe(true);
  expect(performance.now() - started).toBeGreaterThanOrEqual(550);
});

it('reports the peer back after a silence within the bound, and the longest silence', async () => {
  const { client, peer } = await silentPeer();
  const heartbeat = keepAlive(client, interval, 3);
  const back: number[] = [];
  heartbeat.tolerate(2_000, { back: (ms) => back.push(ms) });
  await sleep(400);
  const arrived = once(client, 'message');
  peer.send('here');
  await arrived;
  expect(back).toHaveLength(1);
  expect(back[0]).toBeGreaterThanOrEqual(350);
  expect(heartbeat.longestSilenceMs).toBeGreaterThanOrEqual(350);
  expect(client.readyState).toBe(client.OPEN);
  // Back to the usual window: the silence that follows ends the link as before.
  heartbeat.tolerate(undefined);
  expect(heartbeat.windowMs).toBe(150);
  expect(await closedWithin(client, 1_000)).toBe(true);
});
