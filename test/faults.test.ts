// A randomized fault run, bounded in time: a memload container migrates back
// and forth between two hosts, and each round one fault hits at a random
// moment of the migration: SIGKILL of the source agent, SIGKILL of the
// destination agent, or the destination's link down for 8 s. Killed agents
// are restarted (same arguments and token, as a supervisor would). Then,
// from the kernel's side (processes, both cgroup trees) and the workload's
// (its memory checksum and page verify): exactly one live copy, memory
// intact, nothing stuck — within 30 s of the fault ending the hosts have
// settled, and the next, fault-free migration succeeds.
//
// The schedule comes from a seed, printed in the test's name; replay one with
// FERRY_FAULT_SEED=<seed> (and FERRY_FAULT_BUDGET_MS to change the ~2 minutes).
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { MigrationReport } from '../src/protocol/migration.ts';
import {
  SETTLE_MS,
  cutLink,
  describeOutcome,
  isTypedError,
  liveCopyProblems,
  outcomeOf,
  reconnectSoon,
  restartKilled,
  seededRandom,
  waitForOneCopy,
} from './helpers/faults.ts';
import {
  memloadSpec,
  migrate,
  requestChecksum,
  requestVerify,
  runContainer,
  startNodes,
  waitForMemload,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';

const SEED = Number(process.env.FERRY_FAULT_SEED ?? 1111);
const BUDGET_MS = Number(process.env.FERRY_FAULT_BUDGET_MS ?? 120_000);
/** A round (faulted migration, settling, fault-free migration, checks) takes up to about this long. */
const ROUND_RESERVE_MS = 45_000;
const CUT_MS = 8_000;
/** The fault-free migration after recovery must end within this. */
const FREE_MIGRATION_MS = 60_000;
const MIB_OF_MEMORY = 256;
/** Also tells this test's memload processes from any other's. */
const MEMLOAD_SEED = 5201;
const NAME = 'faulty';

type Fault = 'kill-source' | 'kill-destination' | 'cut-destination';
const FAULTS: Fault[] = ['kill-source', 'kill-destination', 'cut-destination'];

let test: TestCluster | undefined;

beforeAll(async () => {
  test = await startNodes(2);
});

afterAll(async () => {
  await test?.close();
});

function withBound<T>(what: string, ms: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expiry = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not end within ${ms} ms`)), ms);
  });
  return Promise.race([promise, expiry]).finally(() => clearTimeout(timer));
}

/** Injects the fault; resolves once it is over (agent restarted and reconnected, or link back up), with that time. */
async function inject(fault: Fault, source: Node, destination: Node): Promise<number> {
  if (fault === 'cut-destination') {
    await cutLink(destination, CUT_MS);
    await reconnectSoon(destination);
  } else {
    const victim = fault === 'kill-source' ? source : destination;
    await victim.agent.kill('SIGKILL');
    await restartKilled(victim);
  }
  return Date.now();
}

/** The hosts settle on one copy by `deadline`; the kernel and the workload agree. Returns [holder, other]. */
async function expectOneIntactCopy(nodes: [Node, Node], checksum: string, deadline: number): Promise<[Node, Node]> {
  const [holder, other] = await waitForOneCopy(nodes, NAME, deadline);
  expect(await liveCopyProblems(holder, other, NAME, MIB_OF_MEMORY, MEMLOAD_SEED)).toEqual([]);
  expect(await requestChecksum(holder, NAME)).toBe(checksum);
  expect(await requestVerify(holder, NAME)).toMatch(/^verify ok /);
  return [holder, other];
}

/** A migration without faults: it must succeed, in bounded time, and leave one copy on the destination. */
async function faultFreeMigration(from: Node, to: Node, checksum: string): Promise<MigrationReport> {
  const report = await withBound(
    `the fault-free migration ${from.host.name} -> ${to.host.name}`,
    FREE_MIGRATION_MS,
    migrate(from, to, NAME, undefined, { timeoutMs: FREE_MIGRATION_MS }),
  );
  expect(report.outcome).toBe('succeeded');
  const [holder] = await expectOneIntactCopy([from, to], checksum, Date.now() + SETTLE_MS);
  expect(holder.host.name).toBe(to.host.name);
  return report;
}

it(`keeps one intact copy, and nothing stuck, through random faults over repeated migrations (seed ${SEED})`, { timeout: BUDGET_MS + 120_000 }, async () => {
  const random = seededRandom(SEED);
  const started = Date.now();
  console.log(`fault run: seed ${SEED} (replay with FERRY_FAULT_SEED=${SEED}), budget ${BUDGET_MS} ms`);
  const nodes = test!.nodes as [Node, Node];
  const [a, b] = nodes;
  await runContainer(a, memloadSpec(NAME, MIB_OF_MEMORY, MEMLOAD_SEED));
  await waitForMemload(a, NAME);
  const checksum = await requestChecksum(a, NAME);

  // A fault-free first migration measures how long one takes: faults are spread over that.
  const baseline = await faultFreeMigration(a, b, checksum);
  let typicalMs = baseline.totalMs;
  let [holder, other]: [Node, Node] = [b, a];

  const seen: Fault[] = [];
  let order: Fault[] = [];
  let round = 0;
  while (Date.now() - started < BUDGET_MS - ROUND_RESERVE_MS) {
    round += 1;
    // Every three rounds bring each fault once, in a random order.
    if (!order.length) order = [...FAULTS].sort(() => random() - 0.5);
    const fault = order.shift()!;
    const delayMs = Math.round(random() * typicalMs);
    const source = holder;
    const destination = other;
    const label = `round ${round}: ${fault} ${delayMs} ms into ${source.host.name} -> ${destination.host.name}`;

    const migration = outcomeOf(migrate(source, destination, NAME, undefined, { timeoutMs: 120_000 }));
    await sleep(delayMs);
    const over = inject(fault, source, destination);
    const outcome = await withBound(`${label}: the faulted migration`, 150_000, migration);
    const overAt = await over;
    seen.push(fault);

    // Where the container must be, when the migration's result says so.
    if (outcome.report) {
      expect(['succeeded', 'in-doubt'], label).toContain(outcome.report.outcome);
    } else if (fault !== 'kill-source') {
      // The source lived to report it: a typed error naming the phase, and a rollback.
      expect(isTypedError(outcome.error), `${label}: ${describeOutcome(outcome)}`).toBe(true);
    }
    const expected = outcome.report ? destination : fault === 'kill-source' ? undefined : source;

    // Settled within the bound after the fault ended: one copy, intact.
    const [now] = await expectOneIntactCopy([source, destination], checksum, overAt + SETTLE_MS);
    if (expected) expect(now.host.name, `${label}: ${describeOutcome(outcome)}`).toBe(expected.host.name);
    const settledMs = Date.now() - overAt;

    // Nothing stuck: a fault-free migration succeeds right away.
    const next = now === source ? destination : source;
    const free = await faultFreeMigration(now, next, checksum);
    typicalMs = free.totalMs;
    [holder, other] = [next, now];
    console.log(
      `${label}: ${describeOutcome(outcome)}; settled on ${now.host.name} ${settledMs} ms after the fault ended; ` +
        `then ${now.host.name} -> ${next.host.name} succeeded in ${free.totalMs} ms`,
    );
  }
  console.log(`fault run: ${round} faulted rounds in ${Date.now() - started} ms, seed ${SEED}`);
  expect(round).toBeGreaterThanOrEqual(3);
  expect(new Set(seen)).toEqual(new Set(FAULTS));
});
