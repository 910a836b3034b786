// The rootfs two-pass on this host's kernel (no soft-dirty, so memory moves
// stop-and-copy and the report says so): pass 1 while the container runs,
// then only what changed, plus deletions, while it is frozen.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ProgressEvent } from '../src/protocol/migration.ts';
import { migrationOptionsSchema } from '../src/protocol/migration.ts';
import {
  containerPid,
  counts,
  logsOf,
  removeQuietly,
  runContainer,
  startNodes,
  tracesOf,
  noTraces,
  waitForCount,
  waitForLine,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';
import { busyboxRootfs } from './helpers/workloads.ts';

let test: TestCluster;
let a: Node;
let b: Node;
const pauseMs = 3000;
const passOne = 'rootfs pass 1 applied on the destination';

beforeAll(async () => {
  // A holds 3 s between rootfs pass 1 and the freeze, for the container to change files in.
  test = await startNodes(2, (index) => (index === 0 ? { env: { FERRY_FAULTS: `pause-before-freeze:${pauseMs}` } } : {}));
  [a, b] = test.nodes as [Node, Node];
});

afterAll(async () => {
  await test?.close();
});

/**
 * Counts with its state in /data/n (a stale or torn snapshot would make the
 * count go back or skip); on SIGUSR1 it changes one file, creates one and
 * deletes one.
 */
function churnSpec(name: string) {
  const script = [
    'mkdir -p /data',
    'echo v1 > /data/changed',
    'echo doomed > /data/deleted',
    "trap 'echo v2 > /data/changed; echo fresh > /data/created; rm /data/deleted; echo churned' USR1",
    'while :; do i=$(( $(cat /data/n 2>/dev/null || echo 0) + 1 )); echo "count $i"; echo $i > /data/n; sleep 0.05; done',
  ].join('; ');
  return { name, rootfs: busyboxRootfs, command: ['/bin/sh', '-c', script] };
}

describe('rootfs two-pass', () => {
  const name = 'churn';
  afterAll(() => removeQuietly(b, name));

  it('carries files changed, created and deleted between pass 1 and the freeze, and a file written up to the freeze', async () => {
    await runContainer(a, churnSpec(name));
    await waitForCount(a, name, 5);
    const pid = await containerPid(a, name);
    const events: ProgressEvent[] = [];
    let churnedOnA = false;
    let churnedBeforeFreeze: boolean | undefined;
    let churn: Promise<void> | undefined;
    const report = await a.client.request(
      'migrate',
      { name, destination: { url: b.agent.url, token: b.agent.token }, options: migrationOptionsSchema.parse({ strategy: 'auto' }) },
      (event) => {
        events.push(event);
        // Pass 1 is on B and A has not frozen yet: change the tree now.
        if (event.message === passOne && !churn) {
          process.kill(pid, 'SIGUSR1');
          churn = waitForLine(a, name, /^churned$/, 0, pauseMs).then(
            () => void (churnedOnA = true),
            () => undefined,
          );
        }
        if (event.phase === 'freeze') churnedBeforeFreeze ??= churnedOnA;
      },
    );
    await churn;
    expect(report.outcome).toBe('succeeded');
    expect(events.some((event) => event.message === passOne)).toBe(true);
    // A ran the churn (its line was in A's log) before it froze for the final pass.
    expect(churnedBeforeFreeze).toBe(true);

    const rootfsOnB = join(b.host.stateDir, 'containers', name, 'rootfs');
    expect(await readFile(join(rootfsOnB, 'data/changed'), 'utf8')).toBe('v2\n');
    expect(await readFile(join(rootfsOnB, 'data/created'), 'utf8')).toBe('fresh\n');
    expect(existsSync(join(rootfsOnB, 'data/deleted'))).toBe(false);

    // /data/n was rewritten every 50 ms up to the freeze: the count goes on from
    // it without a step back or a gap, so file and memory were taken together.
    const seen = counts(await waitForCount(b, name, counts(await logsOf(b, name)).at(-1)! + 10));
    const breaks = seen.filter((value, index) => index > 0 && value !== seen[index - 1]! + 1);
    expect(seen[0]).toBe(1);
    expect(breaks).toEqual([]);
    expect(await tracesOf(a, name)).toEqual(noTraces);

    // Memory moved stop-and-copy, and the report says why.
    expect(report.strategy).toBe('stop-and-copy');
    expect(report.strategyNote).toMatch(/soft-dirty/);
    expect(report.precopy).toBeUndefined();
  });
});
