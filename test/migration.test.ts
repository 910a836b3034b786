// Live migration end to end: real agents on two netns hosts, real CRIU, real
// containers. Each test checks what the workload itself shows (its counter,
// its memory checksum, its files) and what each host keeps afterwards.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { poll } from './helpers/workloads.ts';
import { sampleValue, scrape } from './helpers/coordinator.ts';
import type { FerryError } from '../src/errors.ts';
import type { MigrationReport } from '../src/protocol/migration.ts';
import {
  containerPid,
  counterSpec,
  counts,
  fileCounterSpec,
  isAlive,
  lastCount,
  logsOf,
  memloadSpec,
  migrate,
  noTraces,
  removeQuietly,
  requestChecksum,
  requestVerify,
  runContainer,
  startNodes,
  tracesOf,
  waitForCount,
  waitForMemload,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';

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

/** The log is one run: 1, 2, 3, ... with no restart, no repeat, no gap. */
function expectOneRun(values: number[]): void {
  expect(values[0]).toBe(1);
  const breaks = values.filter((value, index) => index > 0 && value !== values[index - 1]! + 1);
  expect(breaks).toEqual([]);
}

function expectSucceeded(report: MigrationReport, from: Node, to: Node): void {
  expect(report.outcome).toBe('succeeded');
  expect(report.source).toBe(from.host.name);
  expect(report.destination).toBe(to.host.name);
  expect(report.error).toBeUndefined();
  expect(report.downtimeMs).toBeGreaterThan(0);
  expect(report.downtimeMs).toBeLessThanOrEqual(report.totalMs);
  expect(report.bytes.pages).toBeGreaterThan(0);
  expect(report.bytes.rootfs).toBeGreaterThan(0);
  expect(report.criu.dump?.pagesWritten).toBeGreaterThan(0);
  const phases = report.phases.map((timing) => timing.phase);
  expect(phases).toEqual(expect.arrayContaining(['preflight', 'freeze', 'dump', 'restore', 'confirm']));
  expect(phases.indexOf('freeze')).toBeLessThan(phases.indexOf('restore'));
  // The downtime's parts, timed on both hosts, add up to it; CRIU's own restore time lies within the destination's restore part.
  const parts = report.downtime!;
  const sum = parts.freezeMs + parts.dumpMs + parts.shipMs + parts.receiveMs + parts.checkMs + parts.restoreMs + parts.recordMs + parts.resumeMs;
  expect(Math.abs(sum - report.downtimeMs)).toBeLessThan(2);
  expect(parts.restoreMs).toBeGreaterThanOrEqual((report.criu.restore?.restoreTime ?? 0) / 1000);
  expect(parts.pageBytes).toBe(report.bytes.pages);
  expect(parts.overlappedBytes).toBeLessThanOrEqual(parts.pageBytes);
}

/** The source keeps nothing: no task, no cgroup, no container state, no staged images. */
async function expectGoneFrom(node: Node, name: string, pid: number, migrationId: string): Promise<void> {
  expect(await tracesOf(node, name)).toEqual(noTraces);
  expect(await isAlive(pid)).toBe(false);
  expect(existsSync(join(node.host.stateDir, 'migrations', migrationId, 'images'))).toBe(false);
}

async function expectRunningOn(node: Node, name: string): Promise<void> {
  const list = await node.client.request('list', {});
  expect(list.containers.map((container) => [container.name, container.status])).toEqual([[name, 'running']]);
}

describe('a counter container', () => {
  const name = 'counter';
  afterAll(async () => {
    await removeQuietly(a, name);
    await removeQuietly(b, name);
  });

  it('moves A → B and keeps counting from where it was, with its whole log', async () => {
    await runContainer(a, counterSpec(name));
    const pidOnA = await containerPid(a, name);
    const seenOnA = lastCount(await waitForCount(a, name, 10));
    const progress: string[] = [];
    const report = await migrate(a, b, name, (event) => progress.push(event.phase));
    expectSucceeded(report, a, b);
    expect(progress).toEqual(expect.arrayContaining(['preflight', 'freeze', 'dump', 'restore']));

    await expectRunningOn(b, name);
    const afterMove = lastCount(await logsOf(b, name));
    expect(afterMove).toBeGreaterThan(seenOnA);
    const text = await waitForCount(b, name, afterMove + 10);
    expectOneRun(counts(text));
    // Written by the container on B, in B's copy of the rootfs.
    const onDisk = Number(await readFile(join(b.host.stateDir, 'containers', name, 'rootfs/tmp/counter'), 'utf8'));
    expect(onDisk).toBeGreaterThan(afterMove);
    await expectGoneFrom(a, name, pidOnA, report.migrationId);
    expect((await b.client.request('list', {})).containers[0]?.history).toEqual([a.host.name, b.host.name]);
  });

  it('moves back B → A and still counts on', async () => {
    const pidOnB = await containerPid(b, name);
    const before = lastCount(await logsOf(b, name));
    const report = await migrate(b, a, name);
    expectSucceeded(report, b, a);
    await expectRunningOn(a, name);
    const text = await waitForCount(a, name, lastCount(await logsOf(a, name)) + 10);
    expect(lastCount(text)).toBeGreaterThan(before + 10);
    expectOneRun(counts(text));
    await expectGoneFrom(b, name, pidOnB, report.migrationId);
    expect((await a.client.request('list', {})).containers[0]?.history).toEqual([a.host.name, b.host.name, a.host.name]);
  });
});

describe('a container that keeps its state in a file', () => {
  const name = 'filecount';
  afterAll(() => removeQuietly(b, name));

  it('finds on B the file it wrote on A just before the freeze', async () => {
    await runContainer(a, fileCounterSpec(name));
    const seenOnA = lastCount(await waitForCount(a, name, 15));
    const report = await migrate(a, b, name);
    expectSucceeded(report, a, b);
    // The count is read back from /data/n on every step: a stale file would make it go back.
    const afterMove = lastCount(await logsOf(b, name));
    expect(afterMove).toBeGreaterThan(seenOnA);
    const text = await waitForCount(b, name, afterMove + 10);
    expectOneRun(counts(text));
    // `echo $i > /data/n` truncates before it writes: a read in between finds the file empty.
    const file = join(b.host.stateDir, 'containers', name, 'rootfs/data/n');
    const onDisk = await poll('a whole count in /data/n on B', 2_000, async () => {
      const text = (await readFile(file, 'utf8')).trim();
      return text ? Number(text) : undefined;
    });
    expect(onDisk).toBeGreaterThan(afterMove);
    expect(await tracesOf(a, name)).toEqual(noTraces);
  });
});

describe('a 256 MiB memory workload', () => {
  const name = 'memload';
  afterAll(() => removeQuietly(b, name));

  it('arrives on B with every page intact', async () => {
    await runContainer(a, memloadSpec(name, 256));
    await waitForMemload(a, name);
    const before = await requestChecksum(a, name);
    const pidOnA = await containerPid(a, name);
    const report = await migrate(a, b, name);
    expectSucceeded(report, a, b);
    expect(report.bytes.pages).toBeGreaterThanOrEqual(256 * 1024 * 1024);
    expect(report.criu.dump!.pagesWritten).toBeGreaterThanOrEqual(256 * 256);
    // The final dump's pages left through ferry-frame-send, not through JavaScript.
    const shipped = a.agent.logs().filter((line) => line.includes(report.migrationId) && line.includes('page images shipped'));
    expect(shipped.map((line) => (JSON.parse(line) as { native: number }).native)).toEqual([expect.any(Number)]);
    expect((JSON.parse(shipped[0]!) as { native: number }).native).toBeGreaterThanOrEqual(1);

    await expectRunningOn(b, name);
    expect(await requestChecksum(b, name)).toBe(before);
    expect(await requestVerify(b, name)).toMatch(/^verify ok pages \d+$/);
    await expectGoneFrom(a, name, pidOnA, report.migrationId);
  });
});

describe('a container with its own network namespace', () => {
  it('moves with its namespace (CRIU locks it with nftables) and keeps counting', async () => {
    const name = 'private-net';
    await runContainer(a, { ...counterSpec(name), privateNetwork: true });
    const pid = await containerPid(a, name);
    const before = lastCount(await waitForCount(a, name, 5));
    const report = await migrate(a, b, name);
    expectSucceeded(report, a, b);
    await expectRunningOn(b, name);
    const text = await waitForCount(b, name, before + 5);
    expectOneRun(counts(text));
    await expectGoneFrom(a, name, pid, report.migrationId);
    await removeQuietly(b, name);
  });
});

describe('two migrate requests for one container at once', () => {
  it('runs one; the other is refused, and the container runs once, on B', async () => {
    const name = 'twice';
    await runContainer(a, counterSpec(name));
    const before = lastCount(await waitForCount(a, name, 5));
    const sourceCount = async (outcome: string) =>
      sampleValue(await scrape(`${a.agent.url.replace(/^ws/, 'http')}/metrics`, a.agent.token), 'ferry_migrations_total', { role: 'source', outcome }) ?? 0;
    const countsBefore = { succeeded: await sourceCount('succeeded'), refused: await sourceCount('refused'), rolledBack: await sourceCount('rolled-back') };
    const outcomes = await Promise.allSettled([migrate(a, b, name), migrate(a, b, name)]);
    const succeeded = outcomes.filter((outcome) => outcome.status === 'fulfilled');
    const refused = outcomes.flatMap((outcome) => (outcome.status === 'rejected' ? [outcome.reason as FerryError] : []));
    expect(succeeded).toHaveLength(1);
    expect(refused.map((error) => error.code)).toEqual(['CONTAINER_NOT_RUNNING']);
    // The agent's metrics count the second request as refused, not as a migration rolled back.
    expect({ succeeded: await sourceCount('succeeded'), refused: await sourceCount('refused'), rolledBack: await sourceCount('rolled-back') }).toEqual({
      succeeded: countsBefore.succeeded + 1,
      refused: countsBefore.refused + 1,
      rolledBack: countsBefore.rolledBack,
    });
    await expectRunningOn(b, name);
    expect((await a.client.request('list', {})).containers).toEqual([]);
    expectOneRun(counts(await waitForCount(b, name, before + 5)));
    await removeQuietly(b, name);
  });
});

describe('a container holding an exited child it never reaped (a zombie)', () => {
  it('moves, zombie and all', async () => {
    const name = 'zombie';
    // The subshell exits at once; memload, exec'd as the container's init, never waits for it.
    await runContainer(a, { ...memloadSpec(name, 16), command: ['/bin/sh', '-c', '(exit 3) & exec /bin/memload --mib 16 --seed 7'] });
    await waitForMemload(a, name);
    const zombiesOf = async (node: Node) => {
      const pid = await containerPid(node, name);
      const children = (await readFile(`/proc/${pid}/task/${pid}/children`, 'utf8')).trim().split(/\s+/).filter(Boolean);
      return Promise.all(children.map(async (child) => (await readFile(`/proc/${child}/stat`, 'utf8')).replace(/^.*\) /, '')[0]));
    };
    expect(await zombiesOf(a)).toEqual(['Z']);
    const checksum = await requestChecksum(a, name);
    const report = await migrate(a, b, name);
    expectSucceeded(report, a, b);
    expect(await zombiesOf(b)).toEqual(['Z']);
    expect(await requestChecksum(b, name)).toBe(checksum);
    expect(await requestVerify(b, name)).toMatch(/^verify ok /);
    await removeQuietly(b, name);
  });
});
