// The source agent dies in the middle of a migration: the container is left
// frozen on A (running nowhere), B drops its partial copy, and the restarted
// source agent reads its journal, finds no commit, and thaws the container,
// which goes on with its memory intact. Never both, never neither for good.
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  containerPid,
  failureOf,
  memloadSpec,
  migrate,
  poll,
  requestChecksum,
  requestVerify,
  runContainer,
  startNodes,
  waitForMemload,
  waitUntilClean,
  type TestCluster,
} from './helpers/migration.ts';

let test: TestCluster;

beforeAll(async () => {
  test = await startNodes(2);
});

afterAll(async () => {
  await test?.close();
});

it('rolls back on the source after its agent was killed mid-dump and restarted', async () => {
  const [a, b] = test.nodes as [TestCluster['nodes'][0], TestCluster['nodes'][0]];
  const name = 'orphaned';
  await runContainer(a, memloadSpec(name, 512));
  await waitForMemload(a, name);
  const pid = await containerPid(a, name);
  const checksum = await requestChecksum(a, name);

  let killed: Promise<void> | undefined;
  const error = await failureOf(
    migrate(a, b, name, (event) => {
      const shipping = event.phase === 'dump' || event.phase === 'stream';
      if (shipping && (event.bytes ?? 0) > 96 * 1024 * 1024) killed ??= a.agent.kill('SIGKILL');
    }),
  );
  expect(killed).toBeDefined();
  await killed;
  expect(error.code).toBe('PEER_GONE');

  // With the source agent gone, nothing runs the container: it stays frozen on A.
  // (CRIU, which the agent started, may still hold the tasks for a moment: it
  // finishes its dump on its own and leaves the cgroup frozen as it found it.)
  await poll('the container frozen on A', 60_000, async () =>
    /frozen 1/.test(await readFile(join(a.host.cgroupRoot, name, 'cgroup.events'), 'utf8')) || undefined,
  );
  // B dropped what it had received once the source disconnected.
  await waitUntilClean(b, name);

  const restarted = await test.restartAgent(0);
  await restarted.agent.waitForLog((entry) => entry.json?.msg === 'interrupted outgoing migration rolled back: container thawed here');
  const list = await restarted.client.request('list', {});
  expect(list.containers.map((container) => [container.name, container.status, container.pid])).toEqual([[name, 'running', pid]]);
  expect(await requestChecksum(restarted, name)).toBe(checksum);
  expect(await requestVerify(restarted, name)).toMatch(/^verify ok /);
  // The interrupted migration's images are gone; its journal and CRIU logs stay.
  const migrations = join(a.host.stateDir, 'migrations');
  for (const id of await readdir(migrations)) {
    expect(await readdir(join(migrations, id))).not.toEqual(expect.arrayContaining(['images']));
  }
  await waitUntilClean(b, name);
  await restarted.client.request('remove', { name, force: true });
});

it('completes on the destination after the source agent died between writing the commit and sending it', async () => {
  const [a0] = test.nodes as [TestCluster['nodes'][0]];
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'die-after-commit' } });
  const b = test.nodes[1]!;
  expect(a).not.toBe(a0);
  const name = 'committed';
  await runContainer(a, memloadSpec(name, 64));
  await waitForMemload(a, name);
  const checksum = await requestChecksum(a, name);

  const error = await failureOf(migrate(a, b, name));
  expect(error.code).toBe('PEER_GONE');
  // The decision is on A's disk only: B holds a stopped copy, A a frozen one; neither runs.
  const events = await readFile(join(a.host.cgroupRoot, name, 'cgroup.events'), 'utf8');
  expect(events).toMatch(/frozen 1/);
  const onB = await b.client.request('list', {});
  expect(onB.containers.map((container) => [container.name, container.status])).not.toContainEqual([name, 'running']);

  // The restarted source removes its copy and re-delivers the commit; B resumes its copy.
  const restarted = await test.restartAgent(0);
  await restarted.agent.waitForLog((entry) => entry.json?.msg === 'decision delivered');
  expect((await restarted.client.request('list', {})).containers).toEqual([]);
  const list = await b.client.request('list', {});
  expect(list.containers.map((container) => [container.name, container.status])).toEqual([[name, 'running']]);
  expect(await requestChecksum(b, name)).toBe(checksum);
  expect(await requestVerify(b, name)).toMatch(/^verify ok /);
  await b.client.request('remove', { name, force: true });
});

it('removes the images of a finished migration that outlived an agent killed before it removed them', async () => {
  const [a, b] = test.nodes as [TestCluster['nodes'][0], TestCluster['nodes'][0]];
  const name = 'leftover';
  await runContainer(a, memloadSpec(name, 16));
  await waitForMemload(a, name);
  const report = await migrate(a, b, name);
  expect(report.outcome).toBe('succeeded');
  await b.agent.kill('SIGKILL');
  // What a kill between the journal's `done` and the removal leaves: the images, next to a final journal.
  const directory = join(b.host.stateDir, 'migrations', report.migrationId);
  expect(JSON.parse(await readFile(join(directory, 'journal.json'), 'utf8')).state).toBe('done');
  await mkdir(join(directory, 'images'), { recursive: true });
  await writeFile(join(directory, 'images', 'pages-1.img'), Buffer.alloc(4096));
  const restarted = await test.restartAgent(1);
  await poll('the leftover images removed', 15_000, async () => !existsSync(join(directory, 'images')) || undefined);
  expect(await readdir(directory)).toContain('journal.json');
  const list = await restarted.client.request('list', {});
  expect(list.containers.map((container) => [container.name, container.status])).toEqual([[name, 'running']]);
  await restarted.client.request('remove', { name, force: true });
});

it('drops the whole directory of a migration finished over a week ago, and keeps a recent one', async () => {
  const [a, b] = test.nodes as [TestCluster['nodes'][0], TestCluster['nodes'][0]];
  const name = 'aged';
  await runContainer(a, memloadSpec(name, 16));
  await waitForMemload(a, name);
  const there = await migrate(a, b, name);
  const back = await migrate(b, a, name);
  expect([there.outcome, back.outcome]).toEqual(['succeeded', 'succeeded']);
  await b.agent.kill('SIGKILL');
  // B took part in both: destination of the first, source of the second. The first is made 8 days old.
  const old = join(b.host.stateDir, 'migrations', there.migrationId);
  const recent = join(b.host.stateDir, 'migrations', back.migrationId);
  const journal = JSON.parse(await readFile(join(old, 'journal.json'), 'utf8')) as { state: string; updatedAt: string };
  expect(journal.state).toBe('done');
  journal.updatedAt = new Date(Date.now() - 8 * 24 * 3600_000).toISOString();
  await writeFile(join(old, 'journal.json'), JSON.stringify(journal), { mode: 0o600 });
  await test.restartAgent(1);
  await poll('the week-old migration dropped', 15_000, async () => !existsSync(old) || undefined);
  expect(JSON.parse(await readFile(join(recent, 'journal.json'), 'utf8')).state).toBe('done');
  await a.client.request('remove', { name, force: true });
});
