// Requests an agent must refuse, harmlessly: a wrong token, malformed
// messages, an unknown container, a destination without CRIU, an archive
// whose entries try to escape the staging directory. Each refusal names its
// reason, changes nothing, and leaves the agent serving.
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorBodySchema } from '../src/protocol/errors.ts';
import { AgentClient, openSocket } from '../src/transport/client.ts';
import {
  containerPid,
  counterSpec,
  counts,
  failureOf,
  lastCount,
  logsOf,
  migrate,
  removeQuietly,
  runContainer,
  startNodes,
  waitForCount,
  waitUntilClean,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';
import { greet, offerMessage, sendStream, sourceFacts, type Json } from './helpers/raw-peer.ts';
import { tarOf, type TarEntry } from './helpers/tar.ts';

let test: TestCluster;
let a: Node;
let b: Node;

beforeAll(async () => {
  test = await startNodes(2);
  [a, b] = test.nodes as [Node, Node];
});

afterAll(async () => {
  await test?.close();
});

async function expectServing(node: Node): Promise<void> {
  const client = await AgentClient.connect({ url: node.agent.url, token: node.agent.token });
  try {
    expect((await client.request('info', {})).name).toBe(node.host.name);
  } finally {
    client.close();
  }
}

async function migrationIds(node: Node): Promise<string[]> {
  return readdir(join(node.host.stateDir, 'migrations')).catch(() => []);
}

describe('refusals', () => {
  it('refuses a wrong token, logs it, and keeps serving good clients', async () => {
    const refused = await failureOf(AgentClient.connect({ url: a.agent.url, token: 'not-the-token' }));
    expect(refused.code).toBe('UNAUTHORIZED');
    expect(refused.phase).toBe('auth');
    const data = await failureOf(openSocket({ url: a.agent.url, token: 'nope' }, `/migrations/${randomUUID()}/files`));
    expect(data.code).toBe('UNAUTHORIZED');
    await a.agent.waitForLog((entry) => entry.json?.msg === 'refused connection: wrong or missing token');
    await expectServing(a);
  });

  it('refuses HTTP requests and upgrades with the one error shape, at the status of its code', async () => {
    const base = a.agent.url.replace(/^ws/, 'http');
    const noToken = await fetch(`${base}/metrics`);
    expect(noToken.status).toBe(401);
    expect(errorBodySchema.parse(await noToken.json()).error).toMatchObject({ code: 'UNAUTHORIZED', message: 'wrong or missing token' });
    const nowhere = await fetch(`${base}/nowhere`, { headers: { authorization: `Bearer ${a.agent.token}` } });
    expect(nowhere.status).toBe(404);
    expect(errorBodySchema.parse(await nowhere.json()).error).toMatchObject({ code: 'NOT_FOUND', message: 'no route /nowhere' });
    // The client reads the agent's reason out of a refused upgrade's body.
    const upgrade = await failureOf(openSocket({ url: a.agent.url, token: a.agent.token }, '/nowhere'));
    expect(upgrade.message).toMatch(/refused the connection: no endpoint \/nowhere$/);
    await expectServing(a);
  });

  it('answers malformed messages with BAD_MESSAGE naming the field, and keeps working', async () => {
    const { socket, next } = await greet(a, 'raw');
    try {
      socket.send('this is {not json');
      expect((await next((message) => message.type === 'error')).error).toMatchObject({ code: 'BAD_MESSAGE', message: 'message is not JSON' });
      socket.send(JSON.stringify({ id: 'no-type', name: 'x' }));
      const untyped = await next((message) => message.id === 'no-type');
      expect(untyped.error).toMatchObject({ code: 'BAD_MESSAGE', message: expect.stringMatching(/^type: /) });
      socket.send(JSON.stringify({ type: 'run', id: 'bad-run', spec: { name: 'Not A Name!', rootfs: '/x', command: ['/bin/true'] } }));
      const badRun = await next((message) => message.id === 'bad-run');
      expect(badRun.type).toBe('error');
      expect(badRun.error).toMatchObject({ code: 'BAD_MESSAGE', message: expect.stringMatching(/^spec\.name: /) });
      socket.send(JSON.stringify({ type: 'list', id: 'then-list' }));
      expect(await next((message) => message.id === 'then-list')).toMatchObject({ type: 'result', result: { containers: [] } });
    } finally {
      socket.close();
    }
    expect(a.agent.logs().filter((line) => line.includes('malformed message refused')).length).toBeGreaterThanOrEqual(3);
    await expectServing(a);
  });

  it('refuses to migrate a container that does not exist, touching nothing on B', async () => {
    const [onA, onB] = [await migrationIds(a), await migrationIds(b)];
    const error = await failureOf(migrate(a, b, 'ghost'));
    expect(error.code).toBe('NOT_FOUND');
    expect(error.message).toContain('ghost');
    expect(await migrationIds(a)).toEqual(onA);
    expect(await migrationIds(b)).toEqual(onB);
    expect((await b.client.request('list', {})).containers).toEqual([]);
    expect(b.agent.logs().some((line) => line.includes('"phase":"preflight"'))).toBe(false);
  });

  it('refuses --strategy precopy between hosts without soft-dirty in preflight, before the container is frozen', async () => {
    const name = 'wants-precopy';
    try {
      await runContainer(a, counterSpec(name));
      const pid = await containerPid(a, name);
      await waitForCount(a, name, 3);
      const watch = watchFrozen(join(a.host.cgroupRoot, name));
      const error = await failureOf(migrate(a, b, name, undefined, { strategy: 'precopy' })).finally(() => watch.stop());
      expect(error.code).toBe('INCOMPATIBLE');
      expect(error.phase).toBe('preflight');
      expect(error.message).toMatch(/soft-dirty.*h0 and h1 lack it/);
      expect((await watch.result).frozen).toBe(0);
      await expectStillRunning(a, name, pid);
      await waitUntilClean(b, name, 5_000);
      // auto, on the same hosts, moves it stop-and-copy and says why.
      const report = await migrate(a, b, name);
      expect(report.strategy).toBe('stop-and-copy');
      expect(report.strategyNote).toMatch(/no dirty-memory tracking/);
      await removeQuietly(b, name);
    } finally {
      await removeQuietly(a, name);
    }
  });

  it('is refused in preflight by a destination without CRIU; the container is never frozen', async () => {
    b = await test.restartAgent(1, { extraArgs: ['--criu', '/nonexistent/criu'] });
    const name = 'stays';
    try {
      await runContainer(a, counterSpec(name));
      const pid = await containerPid(a, name);
      await waitForCount(a, name, 5);
      const watch = watchFrozen(join(a.host.cgroupRoot, name));
      const error = await failureOf(migrate(a, b, name)).finally(() => watch.stop());
      expect(error.code).toBe('CRIU_MISSING');
      expect(error.phase).toBe('preflight');
      expect(error.message).toContain('/nonexistent/criu');
      const sampled = await watch.result;
      expect(sampled.samples).toBeGreaterThan(10);
      expect(sampled.frozen).toBe(0);
      await expectStillRunning(a, name, pid);
      const text = await waitForCount(a, name, lastCount(await logsOf(a, name)) + 5);
      expect(counts(text)).toEqual(counts(text).map((_, index) => index + 1));
      await waitUntilClean(b, name, 5_000);
    } finally {
      await removeQuietly(a, name);
      b = await test.restartAgent(1);
    }
  });
});

/** The node runs just this container, as the same process as before. */
async function expectStillRunning(node: Node, name: string, pid: number): Promise<void> {
  const list = await node.client.request('list', {});
  expect(list.containers.map((container) => [container.name, container.status, container.pid])).toEqual([[name, 'running', pid]]);
}

/** Samples the cgroup's frozen state every few ms until stopped. */
function watchFrozen(cgroupDir: string): { stop: () => void; result: Promise<{ samples: number; frozen: number }> } {
  let running = true;
  const result = (async () => {
    let samples = 0;
    let frozen = 0;
    while (running) {
      const events = await readFile(join(cgroupDir, 'cgroup.events'), 'utf8');
      samples += 1;
      if (events.includes('frozen 1')) frozen += 1;
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    return { samples, frozen };
  })();
  return { stop: () => (running = false), result };
}

describe('an archive that escapes the staging directory', () => {
  let facts: { cpuinfo: string; criuVersion: string };
  /** Outside B's state dir: in A's, which goes with the cluster. */
  let outside: string;

  beforeAll(async () => {
    facts = await sourceFacts(a.host.stateDir);
    outside = join(a.host.stateDir, 'outside');
    await mkdir(outside);
  });

  /** Offers a container as a (hand-made) source agent would, then sends `entries` as its rootfs. */
  async function sendRootfs(name: string, entries: TarEntry[]): Promise<Json> {
    const migrationId = randomUUID();
    const { socket, next } = await greet(b, 'intruder');
    try {
      socket.send(JSON.stringify(offerMessage(facts, name, migrationId)));
      await next((message) => message.type === 'accept' && message.migrationId === migrationId);
      const files = await openSocket({ url: b.agent.url, token: b.agent.token }, `/migrations/${migrationId}/files`);
      sendStream(files, 'rootfs', await tarOf(entries));
      const abort = await next((message) => message.type === 'abort');
      files.terminate();
      return abort;
    } finally {
      socket.close();
    }
  }

  const cases: Array<[string, (outsideDir: string) => TarEntry[], string]> = [
    ['a path with ..', (dir) => [{ name: `../../../../../../../..${dir}/dotdot`, body: 'x' }], 'path contains ..'],
    ['an absolute path', (dir) => [{ name: `${dir}/absolute`, body: 'x' }], 'absolute path'],
    [
      'a file through a symlink it just made',
      (dir) => [
        { name: 'bin/', type: 'directory' },
        { name: 'evil', type: 'symlink', linkname: dir },
        { name: 'evil/through-symlink', body: 'x' },
      ],
      'goes through the symlink',
    ],
  ];

  it.each(cases)('refuses %s: abort UNSAFE_ARCHIVE, nothing written outside, nothing left', async (_, entries, reason) => {
    const name = `unsafe-${randomUUID().slice(0, 8)}`;
    const abort = await sendRootfs(name, entries(outside));
    expect(abort.error).toMatchObject({ code: 'UNSAFE_ARCHIVE', message: expect.stringContaining(reason) });
    expect(await readdir(outside)).toEqual([]);
    expect(existsSync('/dotdot') || existsSync('/absolute')).toBe(false);
    await waitUntilClean(b, name, 10_000);
    await expectServing(b);
  });
});
