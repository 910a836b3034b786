// The coordinator end to end: three netns hosts with real agents, and a real
// coordinator process in the test's own netns (it reaches the hosts through
// the harness's controller link). Evacuation, undo, API refusals, and a
// coordinator SIGKILLed mid-evacuation.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { api, CoordinatorProcess, followEvents, maxConcurrent, startRefusingAgent } from '../coordinator/testing.ts';
import type { EvacuationView, MigrationView } from '../src/protocol/coordinator.ts';
import {
  counterSpec,
  lastCount,
  logsOf,
  memloadSpec,
  poll,
  reconnect,
  removeQuietly,
  requestChecksum,
  runContainer,
  startNodes,
  waitForCount,
  waitForMemload,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';

const MiB = 1024 * 1024;
const TOKEN = 'coordinator-test-token';
/** Targets may fill this much: the 40 MiB and the 16 MiB memload (+ margins) cannot share a host. */
const LIMIT_BYTES = 72 * MiB;
const FERRY = join(import.meta.dirname, '..', 'bin', 'ferry');

/** The ferry CLI against the test's coordinator. */
function ferry(args: string[]) {
  return execa(FERRY, [...args, '--coordinator', coordinator.url, '--token', TOKEN], { reject: false, timeout: 150_000 });
}

let test: TestCluster;
let nodes: Node[];
let coordinator: CoordinatorProcess;
let dbDir: string;
const names = { counterA: 'ctr-a', counterB: 'ctr-b', mem16: 'mem16', mem40: 'mem40' };
const checksums = new Map<string, string>();

const checksumOf = (line: string) => /^checksum ([0-9a-f]{16})/.exec(line)?.[1];

beforeAll(async () => {
  test = await startNodes(3);
  nodes = test.nodes;
  dbDir = mkdtempSync(join(tmpdir(), 'ferry-coordinator-'));
  const hostArgs = nodes.flatMap((node, index) => [
    '--host',
    `${node.host.name}=${node.agent.url},${node.agent.token}${index > 0 ? `,memory=${LIMIT_BYTES}` : ''}`,
  ]);
  coordinator = new CoordinatorProcess([
    '--listen', '127.0.0.1:0', '--token', TOKEN, '--db', join(dbDir, 'coordinator.db'), '--margin-mib', '8', ...hostArgs,
  ], TOKEN);
  await coordinator.start();
  const [a] = nodes as [Node];
  const group = { 'anti-affinity': 'counters' };
  await runContainer(a, { ...counterSpec(names.counterA), labels: group });
  await runContainer(a, { ...counterSpec(names.counterB), labels: group });
  await runContainer(a, memloadSpec(names.mem16, 16, 3));
  await runContainer(a, memloadSpec(names.mem40, 40, 5));
  for (const name of [names.mem16, names.mem40]) {
    await waitForMemload(a, name);
    checksums.set(name, checksumOf(await requestChecksum(a, name))!);
  }
  await waitForCount(a, names.counterB, 3);
}, 180_000);

afterAll(async () => {
  await coordinator?.kill('SIGKILL');
  // With FERRY_TEST_LOGS=<dir>, the coordinator's log is kept for a post-mortem (agents' logs too).
  if (process.env.FERRY_TEST_LOGS && coordinator) {
    mkdirSync(process.env.FERRY_TEST_LOGS, { recursive: true });
    writeFileSync(join(process.env.FERRY_TEST_LOGS, 'coordinator.log'), `${coordinator.lines.join('\n')}\n`);
  }
  for (const node of nodes ?? []) for (const name of Object.values(names)) await removeQuietly(node, name);
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

async function waitForEvacuation(id: string, timeoutMs = 150_000): Promise<EvacuationView> {
  return poll(`evacuation ${id} to finish`, timeoutMs, async () => {
    const { body } = await api<{ evacuation: EvacuationView }>(coordinator, 'GET', `/v1/evacuations/${id}`);
    return body.evacuation.state === 'running' ? undefined : body.evacuation;
  });
}

/** Every container runs on exactly one host, in `allowed`, with its state carried over. */
async function expectIntact(allowed: string[]): Promise<Map<string, Node>> {
  const where = await placements();
  const hosts = new Map<string, Node>();
  for (const name of Object.values(names)) {
    const copies = where.get(name) ?? [];
    expect(copies.map((copy) => copy.status), name).toEqual(['running']);
    expect(allowed).toContain(copies[0]!.node.host.name);
    hosts.set(name, copies[0]!.node);
  }
  for (const name of [names.counterA, names.counterB]) {
    const node = hosts.get(name)!;
    const before = lastCount(await logsOf(node, name));
    await waitForCount(node, name, before + 2); // it counts on from where it was
  }
  for (const name of [names.mem16, names.mem40]) {
    expect(checksumOf(await requestChecksum(hosts.get(name)!, name)), name).toBe(checksums.get(name));
  }
  return hosts;
}

describe('coordinator API', () => {
  it('refuses unauthenticated calls with 401 and malformed ones with 400 naming the field', async () => {
    expect((await api(coordinator, 'GET', '/v1/hosts', undefined, '')).status).toBe(401);
    const wrong = await api<{ error: { code: string } }>(coordinator, 'GET', '/v1/hosts', undefined, 'not-the-token');
    expect(wrong).toEqual({ status: 401, body: { error: { code: 'UNAUTHORIZED', message: expect.any(String) } } });
    const badField = await api<{ error: { code: string; field: string } }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', parallel: 0 });
    expect(badField.status).toBe(400);
    expect(badField.body.error).toMatchObject({ code: 'BAD_REQUEST', field: 'parallel' });
    const badName = await api<{ error: { field: string } }>(coordinator, 'POST', '/v1/migrations', { container: 'Bad Name!', from: 'h0' });
    expect(badName).toMatchObject({ status: 400, body: { error: { field: 'container' } } });
    const notJson = await api<{ error: { code: string } }>(coordinator, 'POST', '/v1/migrations', '{nope');
    expect(notJson).toMatchObject({ status: 400, body: { error: { code: 'BAD_REQUEST', field: '(body)' } } });
    expect((await api(coordinator, 'POST', '/v1/evacuations', { host: 'nowhere' })).status).toBe(404);
  });

  it('lists hosts with heartbeats and serves metrics', async () => {
    const { body } = await api<{ hosts: Array<{ name: string; up: boolean; info: { containers: unknown[] } | null }> }>(coordinator, 'GET', '/v1/hosts');
    expect(body.hosts.map((host) => [host.name, host.up])).toEqual(nodes.map((node) => [node.host.name, true]));
    const expected = Object.values(names).map((name) => `h0/${name}`).sort().join();
    await poll('GET /v1/containers to show the 4 containers on h0 (from a heartbeat)', 10_000, async () => {
      const { body } = await api<{ containers: Array<{ name: string; host: string }> }>(coordinator, 'GET', '/v1/containers');
      return body.containers.map((c) => `${c.host}/${c.name}`).sort().join() === expected ? true : undefined;
    });
    const cli = await ferry(['hosts']);
    expect(cli.exitCode, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(/^HOST\s+UP\s+DRAINING\s+CONTAINERS/);
    expect(cli.stdout).toMatch(/^h0\s+yes\s+4\s/m);
    await poll('the containers gauge to count the 4 containers on h0', 10_000, async () => {
      const metrics = await fetch(`${coordinator.url}/metrics`, { headers: { authorization: `Bearer ${TOKEN}` } }).then((r) => r.text());
      return /ferry_coordinator_containers\{host="h0"\} 4/.test(metrics) ? true : undefined;
    });
  });
});

describe('evacuation', () => {
  let evacuationId: string;

  it('empties a host with at most 2 migrations at once, within capacity and anti-affinity, state intact', async () => {
    const stream = followEvents(coordinator);
    await stream.ready;
    try {
      const started = await api<{ evacuation: EvacuationView }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', parallel: 2 });
      expect(started.status).toBe(202);
      evacuationId = started.body.evacuation.id;
      const done = await waitForEvacuation(evacuationId);
      expect(done.unplaced).toEqual([]);
      expect(done.migrations.filter((m) => m.state === 'succeeded').map((m) => m.container).sort()).toEqual(Object.values(names).sort());
      expect((await nodes[0]!.client.request('list', {})).containers).toEqual([]);
      const hosts = await expectIntact(['h1', 'h2']);
      expect(hosts.get(names.counterA)!.host.name).not.toBe(hosts.get(names.counterB)!.host.name);
      for (const node of nodes.slice(1)) {
        const used = (await node.client.request('list', {})).containers.reduce((sum, c) => sum + (c.memoryBytes ?? 0), 0);
        expect(used, node.host.name).toBeLessThanOrEqual(LIMIT_BYTES);
      }
      await poll('the evacuation-finished event', 5_000, async () => (stream.events.some((e) => e.type === 'evacuation-finished') ? true : undefined));
      expect(maxConcurrent(stream.events)).toBe(2);
      expect(stream.events.some((event) => event.type === 'migration-progress')).toBe(true);
      const metrics = await fetch(`${coordinator.url}/metrics`, { headers: { authorization: `Bearer ${TOKEN}` } }).then((r) => r.text());
      expect(metrics).toMatch(/ferry_coordinator_migrations_total\{outcome="succeeded"\} 4/);
      expect(metrics).toMatch(/ferry_coordinator_migration_downtime_seconds_count 4/);
    } finally {
      stream.close();
    }
  });

  it('undo brings every container back to its origin', async () => {
    const hostsBefore = await api<{ hosts: Array<{ name: string; draining: boolean }> }>(coordinator, 'GET', '/v1/hosts');
    expect(hostsBefore.body.hosts.find((host) => host.name === 'h0')!.draining).toBe(true);
    // Through the CLI: `ferry evacuate h0 --undo` finds the last evacuation of h0 and waits for the undo.
    const cli = await ferry(['--json', 'evacuate', 'h0', '--undo']);
    expect(cli.exitCode, cli.stderr).toBe(0);
    const done = JSON.parse(cli.stdout) as EvacuationView;
    expect(done.undoOf).toBe(evacuationId);
    expect(done.state).toBe('finished');
    expect(done.unplaced).toEqual([]);
    expect(done.migrations.map((m) => [m.container, m.state, m.target]).sort()).toEqual(
      Object.values(names).sort().map((name) => [name, 'succeeded', 'h0']),
    );
    await expectIntact(['h0']);
  });

  it('cancels a running migration: the source rolls back, the container stays intact', async () => {
    const stream = followEvents(coordinator);
    await stream.ready;
    const started = await api<{ migration: MigrationView }>(coordinator, 'POST', '/v1/migrations', { container: names.mem40, from: 'h0', to: 'h2' });
    expect(started.status).toBe(202);
    // Once the source is past preflight (its link to the target is up): an agent ignores a
    // cancel that arrives while it is still connecting to the target (see the report).
    await poll('the migration to reach precopy', 20_000, async () =>
      stream.events.some((e) => e.type === 'migration-progress' && e.migrationId === started.body.migration.id && e.phase === 'precopy') ? true : undefined,
    ).finally(() => stream.close());
    const cancel = await api<{ cancelled: boolean }>(coordinator, 'POST', `/v1/migrations/${started.body.migration.id}/cancel`);
    expect(cancel).toEqual({ status: 200, body: { cancelled: true } });
    const finished = await poll('the cancelled migration to end', 60_000, async () => {
      const { body } = await api<{ migration: MigrationView }>(coordinator, 'GET', `/v1/migrations/${started.body.migration.id}`);
      return body.migration.finishedAt ? body.migration : undefined;
    });
    expect(finished).toMatchObject({ state: 'rolled-back', error: 'cancelled', target: 'h2' });
    await expectIntact(['h0']);
  });

  it('leaves what fits nowhere on the source and reports it (capacity, anti-affinity)', async () => {
    // Through the CLI, human output: a table, and exit code 1 because containers stayed.
    const cli = await ferry(['evacuate', 'h0', '--to', 'h1', '--parallel', '2']);
    expect(cli.exitCode, cli.stderr).toBe(1);
    expect(cli.stdout).toMatch(/^CONTAINER\s+OUTCOME\s+TARGET\s+DOWNTIME\s+TIME$/m);
    expect(cli.stdout).toMatch(/^\S+\s+succeeded\s+h1\s+\d+ ms\s+[\d.]+ s$/m);
    expect(cli.stdout).toMatch(/stayed: no host fits/);
    expect(cli.stdout).toMatch(/2 container\(s\) stayed/);
    const id = /evacuation (\S+) of h0 started/.exec(cli.stderr)?.[1];
    const done = (await api<{ evacuation: EvacuationView }>(coordinator, 'GET', `/v1/evacuations/${id}`)).body.evacuation;
    expect(done.state).toBe('finished');
    // One counter may join h1 (anti-affinity), and only one of the memloads (72 MiB cap).
    const moved = done.migrations.filter((m) => m.state === 'succeeded').map((m) => m.container);
    const stayed = done.unplaced.map((entry) => entry.container);
    expect([...moved, ...stayed].sort()).toEqual(Object.values(names).sort());
    expect(moved).toHaveLength(2);
    expect(stayed.filter((name) => name.startsWith('ctr-'))).toHaveLength(1);
    expect(stayed.filter((name) => name.startsWith('mem'))).toHaveLength(1);
    const reasons = done.unplaced.map((entry) => entry.reason).join('\n');
    expect(reasons).toMatch(/h1: anti-affinity/);
    expect(reasons).toMatch(/h1: memory/);
    const where = await placements();
    for (const name of stayed) expect(where.get(name)!.map((copy) => copy.node.host.name)).toEqual(['h0']);
    for (const name of moved) expect(where.get(name)!.map((copy) => copy.node.host.name)).toEqual(['h1']);
  });

  it('finishes an evacuation after the coordinator is SIGKILLed mid-way, without a duplicate migration', async () => {
    const stream = followEvents(coordinator);
    await stream.ready;
    // Two containers are left on h0 by the previous test.
    const started = await api<{ evacuation: EvacuationView }>(coordinator, 'POST', '/v1/evacuations', { host: 'h0', parallel: 1 });
    const id = started.body.evacuation.id;
    await poll('a migration to start', 30_000, async () => (stream.events.some((e) => e.type === 'migration-started') ? true : undefined));
    stream.close();
    await coordinator.kill('SIGKILL');
    await coordinator.start();
    const done = await waitForEvacuation(id);
    expect(done.unplaced).toEqual([]);
    expect((await nodes[0]!.client.request('list', {})).containers).toEqual([]);
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
    const hostUp = async (name: string) => {
      const { body } = await api<{ hosts: Array<{ name: string; up: boolean }> }>(coordinator, 'GET', '/v1/hosts');
      return body.hosts.find((host) => host.name === name)!.up;
    };
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
      expect(checksumOf(await requestChecksum(where[0]!.node, names.mem16))).toBe(checksums.get(names.mem16));
    } finally {
      await refuser.close();
    }
  });
});
