// What a hostile peer may send, written from the protocol rather than from
// ferry's own client: raw TCP for HTTP-level abuse, `ws` for messages. Nothing
// it sends may end the agent, hold its resources unbounded, reach paths
// outside the state directory, or learn host paths from an error.
import { randomUUID } from 'node:crypto';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { containerSpecSchema } from '../src/protocol/container.ts';
import { protocolVersion } from '../src/protocol/messages.ts';
import { AgentClient } from '../src/transport/client.ts';
import { startAgent, type AgentProcess } from '../lab/agents.ts';
import { createHosts, type Cluster, type Host } from '../lab/hosts.ts';
import { busyboxRootfs } from './helpers/workloads.ts';

const port = 7070;
let cluster: Cluster;
let host: Host;
let agent: AgentProcess;

beforeAll(async () => {
  cluster = await createHosts(1);
  host = cluster.hosts[0]!;
  agent = await startAgent(host, { port });
});

afterAll(async () => {
  await agent?.stop();
  await cluster?.destroy();
});

/** The same agent process still answers an authenticated `info`. */
async function expectServing(pid = agent.pid): Promise<void> {
  expect(agent.pid).toBe(pid);
  process.kill(pid, 0);
  const client = await AgentClient.connect({ url: agent.url, token: agent.token });
  try {
    expect((await client.request('info', {})).name).toBe(host.name);
  } finally {
    client.close();
  }
}

interface RawExchange {
  response: string;
  /** From the connect to the server's close; undefined if still open at the deadline. */
  closedAfterMs: number | undefined;
}

/** Sends raw bytes on a fresh TCP connection and collects what comes back until close or the deadline. */
function rawHttp(text: string, deadlineMs = 5_000): Promise<RawExchange> {
  return new Promise((resolve) => {
    const started = Date.now();
    const socket = connect(port, host.address, () => socket.write(text));
    let response = '';
    const done = (closedAfterMs: number | undefined) => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ response, closedAfterMs });
    };
    const timer = setTimeout(() => done(undefined), deadlineMs);
    socket.on('data', (chunk) => (response += chunk.toString()));
    socket.on('error', () => undefined);
    socket.on('close', () => done(Date.now() - started));
  });
}

function upgradeRequest(target: string, token?: string): string {
  return [
    `GET ${target} HTTP/1.1`,
    `Host: ${host.address}:${port}`,
    'Upgrade: websocket',
    'Connection: Upgrade',
    'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==',
    'Sec-WebSocket-Version: 13',
    ...(token ? [`Authorization: Bearer ${token}`] : []),
    '',
    '',
  ].join('\r\n');
}

type Json = Record<string, unknown> & { type?: string; id?: string; error?: { code: string; message: string } };

interface RawControl {
  socket: WebSocket;
  next: (match: (message: Json) => boolean, timeoutMs?: number) => Promise<Json>;
  closed: Promise<{ code: number; afterMs: number }>;
}

/** A control connection opened with plain `ws`, optionally already past hello. */
async function rawControl(greet: boolean): Promise<RawControl> {
  const started = Date.now();
  const socket = new WebSocket(`${agent.url}/control`, { headers: { authorization: `Bearer ${agent.token}` }, maxPayload: 64 * 1024 * 1024 });
  const received: Json[] = [];
  socket.on('message', (data, isBinary) => {
    if (!isBinary) received.push(JSON.parse(data.toString()) as Json);
  });
  socket.on('error', () => undefined);
  const closed = new Promise<{ code: number; afterMs: number }>((resolve) =>
    socket.on('close', (code) => resolve({ code, afterMs: Date.now() - started })),
  );
  await new Promise((resolve, reject) => {
    socket.once('open', resolve);
    socket.once('error', reject);
  });
  const next = async (match: (message: Json) => boolean, timeoutMs = 15_000): Promise<Json> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = received.findIndex(match);
      if (index >= 0) return received.splice(index, 1)[0]!;
      if (Date.now() > deadline) throw new Error(`no matching message; got ${JSON.stringify(received).slice(0, 500)}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  if (greet) {
    socket.send(JSON.stringify({ type: 'hello', version: protocolVersion, peer: 'agent', name: 'hostile' }));
    await next((message) => message.type === 'hello');
  }
  return { socket, next, closed };
}

/** Resolves with the close, or undefined if the socket is still open after `ms`. */
function closedWithin<T>(closed: Promise<T>, ms: number): Promise<T | undefined> {
  return Promise.race([closed, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), ms))]);
}

async function rssBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1]) * 1024;
}

describe('a hostile peer', () => {
  it('cannot end the agent with a request target that is not a valid URL', async () => {
    const pid = agent.pid;
    for (const target of ['//a:99999', 'http://a:99999/control', '/control?%', '*']) {
      const anonymous = await rawHttp(upgradeRequest(target));
      expect(anonymous.response, target).toMatch(/^HTTP\/1\.1 4\d\d /);
      const withToken = await rawHttp(upgradeRequest(target, agent.token), 1_000);
      expect(withToken.response, target).toMatch(/^HTTP\/1\.1 (4\d\d|101) /);
      const plain = await rawHttp(`GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
      expect(plain.response, target).toMatch(/^HTTP\/1\.1 4\d\d /);
    }
    await expectServing(pid);
  });

  it('cannot make the agent read a journal outside its state directory', async () => {
    const migrationId = '../../outside/fake';
    const planted = join(host.stateDir, 'migrations', migrationId, 'journal.json');
    await mkdir(dirname(planted), { recursive: true });
    const entry = { migrationId: 'fake', role: 'source', container: 'x', state: 'committed', updatedAt: new Date().toISOString() };
    await writeFile(planted, JSON.stringify(entry));
    const client = await AgentClient.connect({ url: agent.url, token: agent.token });
    try {
      const refused = await client.request('migration-status', { migrationId }).then(
        (result) => ({ accepted: result }),
        (error: { code: string; message: string }) => ({ code: error.code, message: error.message }),
      );
      expect(refused).toMatchObject({ code: 'BAD_MESSAGE', message: expect.stringMatching(/^migrationId: /) });
      const known = await client.request('migration-status', { migrationId: randomUUID() });
      expect(known.state).toBe('unknown');
    } finally {
      client.close();
      await rm(join(host.stateDir, '..', 'outside'), { recursive: true, force: true });
    }
    const data = await rawHttp(upgradeRequest('/migrations/..%2F..%2Foutside%2Ffake/files', agent.token));
    expect(data.response).toMatch(/^HTTP\/1\.1 404 /);
  });

  it('cannot hold connections with headers sent slowly, or many of them at once', async () => {
    const slow = rawHttp(`GET /control HTTP/1.1\r\nHost: x\r\n`, 25_000);
    const sockets: Socket[] = [];
    const closedEarly: Promise<boolean>[] = [];
    for (let i = 0; i < 80; i++) {
      const socket = connect(port, host.address);
      socket.on('error', () => undefined);
      sockets.push(socket);
      closedEarly.push(new Promise((resolve) => {
        const timer = setTimeout(() => resolve(false), 3_000);
        socket.once('close', () => {
          clearTimeout(timer);
          resolve(true);
        });
      }));
    }
    const early = (await Promise.all(closedEarly)).filter(Boolean).length;
    for (const socket of sockets) socket.destroy();
    expect(early, 'connections beyond the cap are closed at once').toBeGreaterThanOrEqual(40);
    const { closedAfterMs } = await slow;
    expect(closedAfterMs, 'a connection whose headers never end is closed').toBeDefined();
    expect(closedAfterMs!).toBeLessThan(15_000);
    await expectServing();
  });

  it('closes a control connection that never says hello', async () => {
    const { closed } = await rawControl(false);
    const close = await closedWithin(closed, 20_000);
    expect(close, 'closed by the agent').toBeDefined();
    expect(close!.afterMs).toBeLessThan(15_000);
    await expectServing();
  });

  it('cannot exhaust memory with a large or deeply nested message', async () => {
    const pid = agent.pid;
    const before = await rssBytes(pid);
    const big = await rawControl(true);
    const depth = 2 * 1024 * 1024;
    big.socket.send(`${'['.repeat(depth)}${']'.repeat(depth)}`);
    const close = await closedWithin(big.closed, 10_000);
    expect(close?.code, 'a 4 MiB control message closes the connection as too big').toBe(1009);
    const nested = await rawControl(true);
    try {
      const deep = 100_000;
      nested.socket.send(`${'{"a":'.repeat(deep)}1${'}'.repeat(deep)}`);
      const refused = await nested.next((message) => message.type === 'error');
      expect(refused.error).toMatchObject({ code: 'BAD_MESSAGE', message: expect.stringMatching(/nested/) });
      nested.socket.send(JSON.stringify({ type: 'list', id: 'after' }));
      expect(await nested.next((message) => message.id === 'after')).toMatchObject({ type: 'result' });
    } finally {
      nested.socket.close();
    }
    expect((await rssBytes(pid)) - before).toBeLessThan(64 * 1024 * 1024);
    await expectServing(pid);
  });

  it('refuses an offer with negative sizes', async () => {
    const { socket, next } = await rawControl(true);
    try {
      const migrationId = randomUUID();
      socket.send(JSON.stringify({
        type: 'offer',
        migrationId,
        spec: { name: `neg-${migrationId.slice(0, 8)}`, rootfs: '/nonexistent', command: ['/bin/true'] },
        history: [],
        source: { host: 'hostile', criuVersion: '3.19', kernel: '6.1.0' },
        cpuinfo: '',
        needs: { rootfsBytes: -1e15, memoryBytes: -1 },
      }));
      const reply = await next((message) => message.type === 'error' || message.migrationId === migrationId);
      expect(reply).toMatchObject({ type: 'error', error: { code: 'BAD_MESSAGE', message: expect.stringMatching(/needs\.rootfsBytes/) } });
    } finally {
      socket.close();
    }
  });

  it('does not learn host paths from an internal error', async () => {
    // A file where the container's state directory goes makes `run` fail inside the agent's state.
    const name = 'blocked';
    await mkdir(join(host.stateDir, 'containers'), { recursive: true });
    await writeFile(join(host.stateDir, 'containers', name), 'in the way\n');
    const client = await AgentClient.connect({ url: agent.url, token: agent.token });
    try {
      const spec = containerSpecSchema.parse({ name, rootfs: busyboxRootfs, command: ['/bin/true'] });
      const failure = await client.request('run', { spec }).then(
        () => undefined,
        (error: { code: string; message: string }) => error,
      );
      expect(failure).toMatchObject({ code: 'INTERNAL', message: expect.stringMatching(/^E[A-Z]+/) });
      expect(failure!.message).not.toContain(host.stateDir);
      expect(failure!.message).not.toMatch(/\/\w/);
    } finally {
      client.close();
      await rm(join(host.stateDir, 'containers', name), { force: true });
    }
    await agent.waitForLog((entry) => JSON.stringify(entry.json ?? {}).includes(join(host.stateDir, 'containers', name)));
    await expectServing();
  });
});
