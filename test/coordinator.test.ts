// The coordinator end to end: three netns hosts with real agents, and a real
// coordinator process in the test's own netns (it reaches the hosts through
// the harness's controller link). Evacuation of six containers of different
// sizes, agent and coordinator metrics, un-drain, undo, API refusals, a target
// agent SIGKILLed mid-evacuation, and a coordinator SIGKILLed mid-evacuation.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { api, CoordinatorProcess, followEvents, maxConcurrent, sampleValue, scrape, startRefusingAgent } from './helpers/coordinator.ts';
import type { EvacuationView, HostView, MigrationView } from '../src/protocol/coordinator.ts';
import {
  cgroupChildren,
  counterSpec,
  counts,
  lastCount,
  logsOf,
  memloadSpec,
  poll,
  reconnect,
  removeQuietly,
  requestChecksum,
  runContainer,
  stagedImages,
  startNodes,
  waitForCount,
  waitForMemload,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';

const MiB = 1024 * 1024;
const TOKEN = 'coordinator-test-token';
/**
 * What placement may fill on the targets (margin 8 MiB per container). h1 cannot
 * take all six: one at a time it takes the 64 and 16 MiB memloads and two
 * counters, then neither the 32 MiB memload nor the second anti-affine counter.
 * h2 could take everything.
 */
const LIMITS: Record<string, number> = { h1: 100 * MiB, h2: 160 * MiB };
const FERRY = join(import.meta.dirname, '..', 'bin', 'ferry');

/** The ferry CLI against the test's coordinator. */
function ferry(args: string[]) {
  return execa(FERRY, [...args, '--coordinator', coordinator.url, '--token', TOKEN], { reject: false, timeout: 150_000 });
}

let test: TestCluster;
let nodes: Node[];
let coordinator: CoordinatorProcess;
let dbDir: string;
const names = { counterA: 'ctr-a', counterB: 'ctr-b', counterC: 'ctr-c', mem16: 'mem16', mem32: 'mem32', mem64: 'mem64' };
const all = Object.values(names).sort();
/** ctr-a and ctr-b share an anti-affinity group; ctr-c has none. */
const counters = [names.counterA, names.counterB, names.counterC];
const memloads = [names.mem16, names.mem32, names.mem64];
const checksums = new Map<string, string>();
/** The highest count each counter was seen at: wherever it runs next, it must count on from there. */
const seenCounts = new Map<string, number>();

const checksumOf = (line: string) => /^checksum ([0-9a-f]{16})/.exec(line)?.[1];

beforeAll(async () => {
  test = await startNodes(3);
  nodes = test.nodes;
  dbDir = mkdtempSync(join(tmpdir(), 'ferry-coordinator-'));
  const hostArgs = nodes.flatMap((node) => {
    const limit = LIMITS[node.host.name];
    return ['--host', `${node.host.name}=${node.agent.url},${node.agent.token}${limit ? `,memory=${limit}` : ''}`];
  });
  coordinator = new CoordinatorProcess([
    '--listen', '127.0.0.1:0', '--token', TOKEN, '--db', join(dbDir, 'coordinator.db'), '--margin-mib', '8', ...hostArgs,
  ], TOKEN);
  await coordinator.start();
  const [a] = nodes as [Node];
  const group = { 'anti-affinity': 'counters' };
  await runContainer(a, { ...counterSpec(names.counterA), labels: group });
  await runContainer(a, { ...counterSpec(names.counterB), labels: group });
  await runContainer(a, counterSpec(names.counterC));
  await runContainer(a, memloadSpec(names.mem16, 16, 3));
  await runContainer(a, memloadSpec(names.mem32, 32, 4));
  await runContainer(a, memloadSpec(names.mem64, 64, 5));
  for (const name of memloads) {
    await waitForMemload(a, name);
    checksums.set(name, checksumOf(await requestChecksum(a, name))!);
  }
  for (const name of counters) seenCounts.set(name, lastCount(await waitForCount(a, name, 3)));
}, 180_000);

afterAll(async () => {
  await coordinator?.kill('SIGKILL');
  // With FERRY_TEST_LOGS=<dir>, the coordinator's log is kept for a post-mortem (agents' logs too).
  if (process.env.FERRY_TEST_LOGS && coordinator) {
    mkdirSync(process.env.FERRY_TEST_LOGS, { recursive: true });
    writeFileSync(join(process.env.FERRY_TEST_LOGS, 'coordinator.log'), `${coordinator.lines.join('\n')}\n`);
  }
  for (const node of nodes ?? []) for (const name of all) await removeQuietly(node, name);
  await test?.close();
  if (dbDir) rmSync(dbDir, { recursive: true, force: true });
});

/** Where each of our containers runs now, straight from the agents. */
async function placements(): Promise<Map<string, { node: Node; memoryBytes: number; status: string }[]>> {
  const where = new Map<string, { node: Node; memoryBytes: number; status: string }[]>();
  for (const node of nodes) {
    for (const container of (await node.client.request('list', {})).containers) {
      where.set(container.name, [...(where.get(container.name) ?? []), { node, memoryBytes: container.memoryBytes ?? 0, status: container.status }]);
    }
  }
  return where;
}

/**
 * The hosts whose cgroup of the container holds processes, read from the
 * cgroup tree rather than asked of any agent (works with an agent dead).
 */
async function liveCopies(name: string): Promise<Array<{ host: string; frozen: boolean }>> {
  const copies: Array<{ host: string; frozen: boolean }> = [];
  for (const node of nodes) {
    const dir = join(node.host.cgroupRoot, name);
    if (!(await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => '')).trim()) continue;
    const events = await readFile(join(dir, 'cgroup.events'), 'utf8').catch(() => '');
    copies.push({ host: node.host.name, frozen: /^frozen 1$/m.test(events) });
  }
  return copies;
}

async function hostView(name: string): Promise<HostView> {
  const { body } = await api<{ hosts: HostView[] }>(coordinator, 'GET', '/v1/hosts');
  return body.hosts.find((host) => host.name === name)!;
}

async function waitForEvacuation(id: string, timeoutMs = 150_000): Promise<EvacuationView> {
  return poll(`evacuation ${id} to finish`, timeoutMs, async () => {
    const { body } = await api<{ evacuation: EvacuationView }>(coordinator, 'GET', `/v1/evacuations/${id}`);
    return body.evacuation.state === 'running' ? undefined : body.evacuation;
  });
}

async function waitForMigration(id: string, timeoutMs = 90_000): Promise<MigrationView> {
  return poll(`migration ${id} to finish`, timeoutMs, async () => {
    const { body } = await api<{ migration: MigrationView }>(coordinator, 'GET', `/v1/migrations/${id}`);
    return body.migration.finishedAt ? body.migration : undefined;
  });
}

/** A counter counts on from the highest count seen before, and its log is one run: 1, 2, 3, ... without a restart or a gap. */
async function expectCountingOn(node: Node, name: string): Promise<void> {
  const text = await waitForCount(node, name, seenCounts.get(name)! + 2);
  const values = counts(text);
  expect(values[0], name).toBe(1);
  expect(values.filter((value, index) => index > 0 && value !== values[index - 1]! + 1), name).toEqual([]);
  seenCounts.set(name, lastCount(text));
}

/** Every container runs exactly once, in `allowed`, with its state carried over. */
async function expectIntact(allowed: string[]): Promise<Map<string, Node>> {
  const where = await placements();
  const hosts = new Map<string, Node>();
  for (const name of all) {
    const copies = where.get(name) ?? [];
    expect(copies.map((copy) => copy.status), name).toEqual(['running']);
    const host = copies[0]!.node.host.name;
    expect(allowed, name).toContain(host);
    // The same from the cgroup trees of all hosts: one live copy, not frozen.
    expect(await liveCopies(name), name).toEqual([{ host, frozen: false }]);
    hosts.set(name, copies[0]!.node);
  }
  for (const name of counters) await expectCountingOn(hosts.get(name)!, name);
  for (const name of memloads) {
    expect(checksumOf(await requestChecksum(hosts.get(name)!, name)), name).toBe(checksums.get(name));
  }
  return hosts;
}

/** The agent lists nothing and its cgroup dir has no children left. */
async function expectEmpty(node: Node): Promise<void> {
  expect((await node.client.request('list', {})).containers).toEqual([]);
  await poll(`${node.host.name} to have no container cgroups`, 10_000, async () => ((await cgroupChildren(node.host)).length ? undefined : true));
}

const agentMetrics = (node: Node) => scrape(`${node.agent.url.replace(/^ws/, 'http')}/metrics`, node.agent.token);
const coordinatorMetrics = () => scrape(`${coordinator.url}/metrics`, TOKEN);

describe('coordinator API', () => {
  it('refuses unauthenticated calls with 401 and malformed ones with 400 naming the field', async () => {
    expect((await api(coordinator, 'GET', '/v1/hosts', undefined, '')).status).toBe(401);
    const wrong = await api<{ error: { code: string } }>(coordinator, 'GET', '/v1/hosts', undefined, 'not-the-token');
    expect(wrong).toEqual({ status: 401, body: { error: { code: 'UNAUTHORIZED', message: expect.any(String) } } });
    expect((await api(coordinator, 'POST', '/v1/hosts/h0/undrain', undefined, '')).status).toBe(401);
    expect((await fetch(`${coordinator.url}/metrics`)).status).toBe(401);
    const badField = await api<{ error: { code: string; field: string } }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', parallel: 0 });
    expect(badField.status).toBe(400);
    expect(badField.body.error).toMatchObject({ code: 'BAD_REQUEST', field: 'parallel' });
    const badName = await api<{ error: { field: string } }>(coordinator, 'POST', '/v1/migrations', { container: 'Bad Name!', from: 'h0' });
    expect(badName).toMatchObject({ status: 400, body: { error: { field: 'container' } } });
    const notJson = await api<{ error: { code: string } }>(coordinator, 'POST', '/v1/migrations', '{nope');
    expect(notJson).toMatchObject({ status: 400, body: { error: { code: 'BAD_REQUEST', field: '(body)' } } });
    const badHost = await api(coordinator, 'POST', `/v1/hosts/${encodeURIComponent('bad host!')}/undrain`);
    expect(badHost).toMatchObject({ status: 400, body: { error: { code: 'BAD_REQUEST', field: 'name' } } });
    expect((await api(coordinator, 'POST', '/v1/evacuations', { host: 'nowhere' })).status).toBe(404);
    expect((await api(coordinator, 'POST', '/v1/hosts/nowhere/undrain')).status).toBe(404);
  });

  it('lists hosts with heartbeats and serves metrics', async () => {
    const { body } = await api<{ hosts: Array<{ name: string; up: boolean; info: { containers: unknown[] } | null }> }>(coordinator, 'GET', '/v1/hosts');
    expect(body.hosts.map((host) => [host.name, host.up])).toEqual(nodes.map((node) => [node.host.name, true]));
    const expected = all.map((name) => `h0/${name}`).join();
    await poll('GET /v1/containers to show the 6 containers on h0 (from a heartbeat)', 10_000, async () => {
      const { body } = await api<{ containers: Array<{ name: string; host: string }> }>(coordinator, 'GET', '/v1/containers');
      return body.containers.map((c) => `${c.host}/${c.name}`).sort().join() === expected ? true : undefined;
    });
    const cli = await ferry(['hosts']);
    expect(cli.exitCode, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(/^HOST\s+UP\s+DRAINING\s+CONTAINERS/);
    expect(cli.stdout).toMatch(/^h0\s+yes\s+6\s/m);
    await poll('the containers gauge to count the 6 containers on h0', 10_000, async () =>
      sampleValue(await coordinatorMetrics(), 'ferry_coordinator_containers', { host: 'h0' }) === 6 ? true : undefined,
    );
  });
});

describe('evacuation', () => {
  let evacuationId: string;

  it('empties a host of 6 containers of different sizes, at most 2 migrations at once, within capacity and anti-affinity, state intact', async () => {
    const stream = followEvents(coordinator);
    await stream.ready;
    try {
      const started = await api<{ evacuation: EvacuationView }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', parallel: 2 });
      expect(started.status).toBe(202);
      evacuationId = started.body.evacuation.id;
      // While its evacuation runs, the host cannot be made schedulable again.
      expect(await api(coordinator, 'POST', '/v1/hosts/h0/undrain')).toMatchObject({ status: 409, body: { error: { code: 'BUSY' } } });
      const done = await waitForEvacuation(evacuationId);
      expect(done.unplaced).toEqual([]);
      expect(done.migrations.filter((m) => m.state === 'succeeded').map((m) => m.container).sort()).toEqual(all);
      await expectEmpty(nodes[0]!);
      const hosts = await expectIntact(['h1', 'h2']);
      expect(hosts.get(names.counterA)!.host.name).not.toBe(hosts.get(names.counterB)!.host.name);
      let total = 0;
      for (const node of nodes.slice(1)) {
        const used = (await node.client.request('list', {})).containers.reduce((sum, c) => sum + (c.memoryBytes ?? 0), 0);
        expect(used, node.host.name).toBeLessThanOrEqual(LIMITS[node.host.name]!);
        total += used;
      }
      expect(total).toBeGreaterThan(LIMITS.h1!); // so h1 alone could not have taken them
      await poll('the evacuation-finished event', 5_000, async () => (stream.events.some((e) => e.type === 'evacuation-finished') ? true : undefined));
      expect(maxConcurrent(stream.events)).toBe(2);
      expect(stream.events.some((event) => event.type === 'migration-progress')).toBe(true);
      const metrics = await coordinatorMetrics();
      expect(sampleValue(metrics, 'ferry_coordinator_migrations_total', { outcome: 'succeeded' })).toBe(6);
      expect(sampleValue(metrics, 'ferry_coordinator_migration_downtime_seconds_count')).toBe(6);
      expect(sampleValue(metrics, 'ferry_coordinator_migration_duration_seconds_count')).toBe(6);
      expect(sampleValue(metrics, 'ferry_coordinator_migration_bytes_total', { part: 'pages' })).toBeGreaterThanOrEqual(112 * MiB);
    } finally {
      stream.close();
    }
  });

  it('agents serve Prometheus metrics: migrations by outcome, downtime and duration, bytes, containers by host', async () => {
    const [h0, h1, h2] = nodes as [Node, Node, Node];
    expect((await fetch(`${h0.agent.url.replace(/^ws/, 'http')}/metrics`)).status).toBe(401);
    const source = await agentMetrics(h0);
    expect(sampleValue(source, 'ferry_migrations_total', { role: 'source', outcome: 'succeeded' })).toBe(6);
    expect(sampleValue(source, 'ferry_migration_downtime_seconds_count')).toBe(6);
    const downtime = sampleValue(source, 'ferry_migration_downtime_seconds_sum')!;
    expect(downtime).toBeGreaterThan(0);
    expect(sampleValue(source, 'ferry_migration_duration_seconds_count')).toBe(6);
    expect(sampleValue(source, 'ferry_migration_duration_seconds_sum')).toBeGreaterThan(downtime);
    expect(sampleValue(source, 'ferry_migration_bytes_total', { part: 'pages' })).toBeGreaterThanOrEqual(112 * MiB);
    expect(sampleValue(source, 'ferry_migration_bytes_total', { part: 'rootfs' })).toBeGreaterThan(0);
    expect(sampleValue(source, 'ferry_migration_bytes_total', { part: 'images' })).toBeGreaterThan(0);
    expect(sampleValue(source, 'ferry_containers', { host: 'h0' })).toBe(0);
    let total = 0;
    let received = 0;
    for (const node of [h1, h2]) {
      const listed = (await node.client.request('list', {})).containers.length;
      const metrics = await agentMetrics(node);
      expect(sampleValue(metrics, 'ferry_containers', { host: node.host.name }), node.host.name).toBe(listed);
      total += listed;
      received += sampleValue(metrics, 'ferry_migrations_total', { role: 'destination', outcome: 'succeeded' }) ?? 0;
    }
    expect(total).toBe(6);
    // The destinations counted the same six, from their side.
    expect(received).toBe(6);
  });

  it('un-drains an evacuated host (ferry undrain), kept across a restart: placement uses it again', async () => {
    expect((await hostView('h0')).draining).toBe(true);
    const from = (await placements()).get(names.counterC)![0]!.node.host.name;
    // Draining: not even a migration that names h0 may go there.
    const refused = await api<{ migration: MigrationView }>(coordinator, 'POST', '/v1/migrations', { container: names.counterC, from, to: 'h0' });
    expect(refused.status).toBe(202);
    expect(await waitForMigration(refused.body.migration.id)).toMatchObject({ state: 'failed', error: expect.stringMatching(/h0: draining/) });
    const cli = await ferry(['undrain', 'h0']);
    expect(cli.exitCode, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(/^h0 is schedulable again$/m);
    await coordinator.kill('SIGTERM');
    await coordinator.start();
    expect((await hostView('h0')).draining).toBe(false);
    // h0 runs nothing now, so placement's least loaded host is h0.
    const moved = await api<{ migration: MigrationView }>(coordinator, 'POST', '/v1/migrations', { container: names.counterC, from });
    expect(moved.status).toBe(202);
    expect(await waitForMigration(moved.body.migration.id)).toMatchObject({ state: 'succeeded', target: 'h0' });
    expect(await liveCopies(names.counterC)).toEqual([{ host: 'h0', frozen: false }]);
    await expectCountingOn(nodes[0]!, names.counterC);
  });

  it('undo brings every container back to its origin', async () => {
    // Through the CLI: `ferry evacuate h0 --undo` finds the last evacuation of h0 and waits for the undo.
    const cli = await ferry(['--json', 'evacuate', 'h0', '--undo']);
    expect(cli.exitCode, `${cli.stderr}\n${cli.stdout}`).toBe(0);
    const done = JSON.parse(cli.stdout) as EvacuationView;
    expect(done.undoOf).toBe(evacuationId);
    expect(done.state).toBe('finished');
    expect(done.unplaced).toEqual([]);
    // ctr-c is already back (previous test): nothing to move for it.
    expect(done.migrations.map((m) => [m.container, m.state, m.target]).sort()).toEqual(
      all.filter((name) => name !== names.counterC).map((name) => [name, 'succeeded', 'h0']),
    );
    await expectIntact(['h0']);
  });

  it('a target agent SIGKILLed mid-evacuation: what it was receiving rolls back and moves elsewhere, nothing runs twice or is lost', async () => {
    const [h0, h1] = nodes as [Node, Node, Node];
    const rolledBackBefore = sampleValue(await agentMetrics(h0), 'ferry_migrations_total', { role: 'source', outcome: 'rolled-back' }) ?? 0;
    const transferPhases = new Set(['precopy', 'freeze', 'snapshot', 'dump', 'stream']);
    const towardsH1 = new Set<string>();
    let victim: string | undefined;
    let killed: Promise<void> | undefined;
    const stream = followEvents(coordinator, (event) => {
      if (event.type === 'migration-started' && event.migration.target === 'h1') towardsH1.add(event.migration.id);
      // The first migration to h1 that moves data: h1's agent dies long before anything could commit there.
      if (!killed && event.type === 'migration-progress' && towardsH1.has(event.migrationId) && transferPhases.has(event.phase)) {
        victim = event.migrationId;
        killed = h1.agent.kill('SIGKILL');
      }
    });
    await stream.ready;
    let done: EvacuationView | undefined;
    let copiesWhileDead: Map<string, Array<{ host: string; frozen: boolean }>> | undefined;
    try {
      const started = await api<{ evacuation: EvacuationView }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', to: ['h1', 'h2'], parallel: 2 });
      expect(started.status).toBe(202);
      done = await waitForEvacuation(started.body.evacuation.id);
      expect(victim, 'no migration towards h1 reached a transfer phase').toBeDefined();
      await killed;
      // From the cgroup trees, with h1's agent still dead.
      copiesWhileDead = new Map(await Promise.all(all.map(async (name) => [name, await liveCopies(name)] as const)));
    } finally {
      stream.close();
      if (killed) {
        await killed;
        await h1.agent.restart();
        await reconnect(h1);
      }
    }
    expect(maxConcurrent(stream.events)).toBeLessThanOrEqual(2);
    const { migrations } = done;
    expect(migrations.find((m) => m.id === victim)).toMatchObject({ target: 'h1', state: 'rolled-back' });
    // h2 took everything it could; the second of the anti-affine counters had nowhere
    // to go with h1 dead, so it stayed on h0, running, and is reported.
    expect(done.state).toBe('finished');
    expect(done.unplaced, JSON.stringify(done.unplaced)).toHaveLength(1);
    const stayed = done.unplaced[0]!.container;
    expect([names.counterA, names.counterB]).toContain(stayed);
    for (const name of all) {
      const succeeded = migrations.filter((m) => m.container === name && m.state === 'succeeded').map((m) => m.target);
      expect(succeeded, name).toEqual(name === stayed ? [] : ['h2']);
      expect(copiesWhileDead!.get(name), name).toEqual([{ host: name === stayed ? 'h0' : 'h2', frozen: false }]);
    }
    // Nothing committed on h1: every attempt there rolled back on h0, and the container was tried again on h2.
    for (const attempt of migrations.filter((m) => m.target === 'h1')) {
      expect(attempt.state, attempt.container).toBe('rolled-back');
      const next = migrations.find((m) => m.container === attempt.container && m.attempt === attempt.attempt + 1);
      if (attempt.container !== stayed) expect(next, attempt.container).toMatchObject({ target: 'h2', state: 'succeeded' });
    }
    expect(migrations.find((m) => m.id === victim)!.container).not.toBe(stayed);
    const rolledBack = migrations.filter((m) => m.state === 'rolled-back').length;
    expect(sampleValue(await agentMetrics(h0), 'ferry_migrations_total', { role: 'source', outcome: 'rolled-back' })).toBe(rolledBackBefore + rolledBack);
    // Restarted, h1 drops the copy it was receiving.
    await h1.agent.waitForLog((entry) => entry.json?.msg === 'interrupted incoming migration discarded');
    await poll('h1 to hold nothing', 30_000, async () => {
      const listed = (await h1.client.request('list', {})).containers.length;
      return listed + (await cgroupChildren(h1.host)).length + (await stagedImages(h1.host)).length === 0 ? true : undefined;
    });
    expect((await h0.client.request('list', {})).containers.map((c) => c.name)).toEqual([stayed]);
    await expectIntact(['h0', 'h2']);

    // Undo puts them back on h0 for the tests that follow.
    const undo = await api<{ evacuation: EvacuationView }>(coordinator, 'POST', `/v1/evacuations/${done.id}/undo`);
    expect(undo.status).toBe(202);
    const back = await waitForEvacuation(undo.body.evacuation.id);
    expect(back.unplaced).toEqual([]);
    expect(back.migrations.map((m) => [m.container, m.state, m.target]).sort()).toEqual(
      all.filter((name) => name !== stayed).map((name) => [name, 'succeeded', 'h0']),
    );
    await expectIntact(['h0']);
  }, 300_000); // two evacuations and an agent restart: more than the default on a busy 2-core machine

  it('cancels a running migration: the source rolls back, the container stays intact', async () => {
    const stream = followEvents(coordinator);
    await stream.ready;
    const started = await api<{ migration: MigrationView }>(coordinator, 'POST', '/v1/migrations', { container: names.mem64, from: 'h0', to: 'h2' });
    expect(started.status).toBe(202);
    // Once the source is past preflight (its link to the target is up): an agent ignores a
    // cancel that arrives while it is still connecting to the target (see the report).
    await poll('the migration to reach precopy', 20_000, async () =>
      stream.events.some((e) => e.type === 'migration-progress' && e.migrationId === started.body.migration.id && e.phase === 'precopy') ? true : undefined,
    ).finally(() => stream.close());
    const cancel = await api<{ cancelled: boolean }>(coordinator, 'POST', `/v1/migrations/${started.body.migration.id}/cancel`);
    expect(cancel).toEqual({ status: 200, body: { cancelled: true } });
    const finished = await waitForMigration(started.body.migration.id, 60_000);
    expect(finished).toMatchObject({ state: 'rolled-back', error: 'cancelled', target: 'h2' });
    await expectIntact(['h0']);
  });

  it('leaves what fits nowhere on the source and reports it (capacity, anti-affinity)', async () => {
    // Through the CLI, human output: a table, and exit code 1 because containers stayed.
    // One at a time, so that what fits does not depend on which migration is still in flight.
    const cli = await ferry(['evacuate', 'h0', '--to', 'h1', '--parallel', '1']);
    expect(cli.exitCode, cli.stderr).toBe(1);
    expect(cli.stdout).toMatch(/^CONTAINER\s+OUTCOME\s+TARGET\s+DOWNTIME\s+TIME$/m);
    expect(cli.stdout).toMatch(/^\S+\s+succeeded\s+h1\s+\d+ ms\s+[\d.]+ s$/m);
    expect(cli.stdout).toMatch(/stayed: no host fits/);
    expect(cli.stdout).toMatch(/2 container\(s\) stayed/);
    const id = /evacuation (\S+) of h0 started/.exec(cli.stderr)?.[1];
    const done = (await api<{ evacuation: EvacuationView }>(coordinator, 'GET', `/v1/evacuations/${id}`)).body.evacuation;
    expect(done.state).toBe('finished');
    // Largest first into h1's 100 MiB: the 64 MiB memload, not the 32 MiB one, the 16 MiB one,
    // then one counter of the anti-affine pair and ctr-c.
    const moved = done.migrations.filter((m) => m.state === 'succeeded').map((m) => m.container);
    const stayed = done.unplaced.map((entry) => entry.container);
    expect([...moved, ...stayed].sort()).toEqual(all);
    expect(moved).toHaveLength(4);
    expect(moved).toEqual(expect.arrayContaining([names.mem64, names.mem16, names.counterC]));
    expect(stayed).toContain(names.mem32);
    expect(stayed.filter((name) => name === names.counterA || name === names.counterB)).toHaveLength(1);
    const reasons = new Map(done.unplaced.map((entry) => [entry.container, entry.reason]));
    expect(reasons.get(names.mem32)).toMatch(/h1: memory/);
    expect(reasons.get(stayed.find((name) => name !== names.mem32)!)).toMatch(/h1: anti-affinity/);
    const where = await placements();
    for (const name of stayed) expect(where.get(name)!.map((copy) => copy.node.host.name)).toEqual(['h0']);
    for (const name of moved) expect(where.get(name)!.map((copy) => copy.node.host.name)).toEqual(['h1']);
    const used = (await nodes[1]!.client.request('list', {})).containers.reduce((sum, c) => sum + (c.memoryBytes ?? 0), 0);
    expect(used).toBeLessThanOrEqual(LIMITS.h1!);
  });

  it('finishes an evacuation after the coordinator is SIGKILLed mid-way, without a duplicate migration', async () => {
    const stream = followEvents(coordinator);
    await stream.ready;
    // Two containers are left on h0 by the previous test.
    const started = await api<{ evacuation: EvacuationView }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', parallel: 1 });
    const id = started.body.evacuation.id;
    // Killed once the target has accepted (precopy): a source that drops its link while the
    // target is still in its preflight leaves the target holding the name until its agent
    // restarts, and the resumed evacuation would be refused there (NAME_IN_USE).
    await poll('a migration to reach precopy', 60_000, async () =>
      stream.events.some((e) => e.type === 'migration-progress' && e.phase === 'precopy') ? true : undefined,
    ).finally(() => stream.close());
    await coordinator.kill('SIGKILL');
    await coordinator.start();
    const done = await waitForEvacuation(id);
    expect(done.unplaced).toEqual([]);
    await expectEmpty(nodes[0]!);
    await expectIntact(['h1', 'h2']);
    // One successful migration per container, and never two of one container running at once.
    const byContainer = Map.groupBy(done.migrations, (migration: MigrationView) => migration.container);
    expect(byContainer.size).toBe(2);
    for (const migrations of byContainer.values()) {
      const name = migrations[0]!.container;
      expect(migrations.filter((m) => m.state === 'succeeded'), name).toHaveLength(1);
      const spans = migrations.filter((m) => m.startedAt).map((m) => [Date.parse(m.startedAt!), Date.parse(m.finishedAt!)] as const);
      spans.sort((x, y) => x[0] - y[0]);
      for (let index = 1; index < spans.length; index++) expect(spans[index]![0]).toBeGreaterThanOrEqual(spans[index - 1]![1]);
    }
    // The interrupted migration was settled from what the agents reported, not started twice.
    expect(coordinator.lines.some((line) => line.includes('interrupted migration reconciled'))).toBe(true);
    expect(done.migrations.filter((m) => m.error?.includes('coordinator restart'))).toHaveLength(1);
  });

  it('marks a host down after 3 missed heartbeats, and up again when its agent is back', async () => {
    const hostUp = async (name: string) => (await hostView(name)).up;
    const h2 = nodes[2]!;
    await h2.agent.kill('SIGKILL'); // its containers keep running; a restarted agent adopts them
    try {
      await poll('h2 to be marked down', 15_000, async () => ((await hostUp('h2')) ? undefined : true));
      expect(await hostUp('h1')).toBe(true);
    } finally {
      await h2.agent.restart();
      await reconnect(h2);
    }
    await poll('h2 to be marked up again', 15_000, async () => ((await hostUp('h2')) ? true : undefined));
  });

  it('retries a failed migration once on another target', async () => {
    const refuser = await startRefusingAgent(test.cluster.controllerAddress!);
    try {
      const registered = await api<{ host: { name: string; up: boolean } }>(coordinator, 'POST', '/v1/hosts', { name: 'refuser', url: refuser.url, token: 'x' });
      expect(registered).toMatchObject({ status: 201, body: { host: { name: 'refuser', up: true } } });
      const from = (await placements()).get(names.mem16)![0]!.node.host.name;
      const started = await api<{ migration: MigrationView }>(coordinator, 'POST', '/v1/migrations', { container: names.mem16, from });
      expect(started.status).toBe(202);
      const attempts = await poll('the retry to finish', 90_000, async () => {
        const { body } = await api<{ migrations: MigrationView[] }>(coordinator, 'GET', '/v1/migrations');
        const first = body.migrations.findIndex((m) => m.id === started.body.migration.id);
        const tail = body.migrations.slice(first).filter((m) => m.container === names.mem16);
        return tail.length === 2 && tail[1]!.finishedAt ? tail : undefined;
      });
      expect(attempts.map((m) => [m.attempt, m.target, m.state])).toEqual([
        [1, 'refuser', 'rolled-back'],
        [2, expect.not.stringMatching(new RegExp(`^(refuser|${from})$`)), 'succeeded'],
      ]);
      const where = (await placements()).get(names.mem16)!;
      expect(where.map((copy) => [copy.node.host.name, copy.status])).toEqual([[attempts[1]!.target, 'running']]);
      expect(await liveCopies(names.mem16)).toEqual([{ host: attempts[1]!.target, frozen: false }]);
      expect(checksumOf(await requestChecksum(where[0]!.node, names.mem16))).toBe(checksums.get(names.mem16));
    } finally {
      await refuser.close();
    }
  });
});
