// The destination's link is cut for 8 s at each phase of a migration, then
// brought back. Whatever the phase, within 30 s of the link coming back: the
// migration has ended (failed with a typed error naming the phase, or
// succeeded if the cut came after the commit or in post-copy within its
// bound), exactly one copy of the
// workload lives (the kernel's process list and both cgroup trees say so, and
// its memory verifies), the other host keeps nothing (no cgroup, images,
// state or claim on the name), and a migration back or again succeeds.
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FerryError, type Phase } from '../src/errors.ts';
import type { MigrationOptions, ProgressEvent } from '../src/protocol/migration.ts';
import type { AgentOptions } from '../lab/agents.ts';
import {
  SETTLE_MS,
  cutLink,
  describeOutcome,
  isTypedError,
  journalState,
  liveCopyProblems,
  outcomeOf,
  reconnectSoon,
  slowRestoreCriu,
  waitForOneCopy,
} from './helpers/faults.ts';
import {
  containerPid,
  memloadSpec,
  migrate,
  poll,
  requestChecksum,
  requestVerify,
  runContainer,
  startNodes,
  waitForMemload,
  type Node,
} from './helpers/migration.ts';

const CUT_MS = 8_000;
const MIB = 1024 * 1024;

interface CutCase {
  name: string;
  mib: number;
  /** Distinct per case: memload processes are found by their command line. */
  seed: number;
  options?: Partial<MigrationOptions>;
  /** Options of the destination's agent. */
  destination?: AgentOptions;
  /** Options of the source's agent. */
  source?: AgentOptions;
  /** Runs on the source before the migration (e.g. to grow the rootfs). */
  prepare?: (a: Node, name: string) => Promise<void>;
  /** The progress event (of the source) at which the link is cut... */
  when?: (event: ProgressEvent) => boolean;
  /** ...or the destination's log line. */
  atDestinationLog?: (line: Record<string, unknown>) => boolean;
  /** How long the link stays down (CUT_MS unless set). */
  cutMs?: number;
  /** Runs while the link is down (e.g. to see the destination reach a state). */
  whileDown?: (b: Node, migrationId: string) => Promise<void>;
}

interface CutResult {
  outcome: Awaited<ReturnType<typeof outcomeOf>>;
  /** Progress events seen before the link was down. */
  beforeCut: ProgressEvent[];
  /** Every progress event. */
  events: ProgressEvent[];
  upAt: number;
  migrationId: string;
}

/**
 * Runs the memload on A (h0), migrates it to B (h1) cutting B's link at the
 * case's moment for 8 s, and checks everything the header says. `expectOutcome`
 * checks the migration's own result and says where the container must be.
 */
async function cutAndCheck(c: CutCase, expectOutcome: (result: CutResult) => 'source' | 'destination'): Promise<CutResult> {
  const test = await startNodes(2, (index) => (index === 1 ? (c.destination ?? {}) : (c.source ?? {})));
  try {
    const [a, b] = test.nodes as [Node, Node];
    await runContainer(a, memloadSpec(c.name, c.mib, c.seed));
    await waitForMemload(a, c.name);
    const pid = await containerPid(a, c.name);
    const checksum = await requestChecksum(a, c.name);
    await c.prepare?.(a, c.name);

    const events: ProgressEvent[] = [];
    const beforeCut: ProgressEvent[] = [];
    let down = false;
    let cut: Promise<{ downAt: number; upAt: number }> | undefined;
    let whileDown: Promise<void> | undefined;
    let ended = false;
    const startCut = (migrationId: string) => {
      if (cut || ended) return;
      cut = cutLink(b, c.cutMs ?? CUT_MS);
      // cutLink resolves after the link is up again; `down` is set once it is down.
      void poll('the link to go down', 5_000, async () => ((await linkIsDown(b)) ? true : undefined)).then(() => {
        down = true;
      });
      if (c.whileDown) {
        whileDown = c.whileDown(b, migrationId);
        whileDown.catch(() => undefined); // awaited (and rethrown) below
      }
    };
    // A moment only the destination knows of is seen in its log.
    if (c.atDestinationLog) {
      void b.agent.waitForLog((entry) => entry.json !== undefined && c.atDestinationLog!(entry.json), 120_000).then(
        (entry) => startCut(String(entry.json!.migrationId)),
        () => undefined,
      );
    }
    const outcome = await outcomeOf(
      migrate(
        a,
        b,
        c.name,
        (event) => {
          events.push(event);
          if (!down) beforeCut.push(event);
          if (c.when?.(event)) startCut(event.migrationId);
        },
        c.options ?? {},
      ),
    );
    ended = true;
    expect(cut, `the cut's moment never came; events: ${JSON.stringify(events.map((e) => e.phase))}`).toBeDefined();
    const { upAt } = await cut!;
    await whileDown;
    const result: CutResult = { outcome, beforeCut, events, upAt, migrationId: events[0]!.migrationId };
    console.log(`${c.name}: ${describeOutcome(outcome)}; ended ${outcome.settledAt - upAt} ms after the link came back`);

    // The migration ended within the bound (a cut may end it while the link is still down).
    expect(outcome.settledAt - upAt).toBeLessThan(SETTLE_MS);
    const where = expectOutcome(result);

    // The cut ended this test's own connection to B as well.
    await reconnectSoon(b);
    const [holder, other] = await waitForOneCopy([a, b], c.name, upAt + SETTLE_MS);
    expect(holder.host.name).toBe((where === 'source' ? a : b).host.name);
    expect(await liveCopyProblems(holder, other, c.name, c.mib, c.seed)).toEqual([]);
    if (where === 'source') expect(await containerPid(a, c.name)).toBe(pid);
    expect(await requestChecksum(holder, c.name)).toBe(checksum);
    expect(await requestVerify(holder, c.name)).toMatch(/^verify ok /);

    // Nothing is stuck: the next migration (back, or again) succeeds and leaves one copy.
    const again = await migrate(holder, other, c.name);
    expect(again.outcome).toBe('succeeded');
    const [next, previous] = await waitForOneCopy([a, b], c.name, Date.now() + SETTLE_MS);
    expect(next.host.name).toBe(other.host.name);
    expect(await liveCopyProblems(next, previous, c.name, c.mib, c.seed)).toEqual([]);
    expect(await requestChecksum(next, c.name)).toBe(checksum);
    expect(await requestVerify(next, c.name)).toMatch(/^verify ok /);
    return result;
  } finally {
    await test.close();
  }
}

async function linkIsDown(node: Node): Promise<boolean> {
  const { stdout } = await node.host.exec('ip', ['-j', 'link', 'show', 'eth0']);
  const [link] = JSON.parse(stdout) as Array<{ flags?: string[] }>;
  return !link?.flags?.includes('UP');
}

/** The migration failed before the commit with a typed error naming one of `phases`: the container stays on the source. */
function expectFailedIn(phases: Phase[]): (result: CutResult) => 'source' {
  return ({ outcome }) => {
    expect(outcome.error, `expected a failure, got ${describeOutcome(outcome)}`).toBeInstanceOf(FerryError);
    const error = outcome.error as FerryError;
    expect(isTypedError(error), `${error.code} in ${error.phase}`).toBe(true);
    // Soft: a wrong phase is a defect of its own; the checks after this one still run.
    expect.soft(phases, `the phase named by ${error.code}: ${error.message}`).toContain(error.phase);
    expect(['PEER_GONE', 'TIMEOUT', 'TRANSFER_FAILED']).toContain(error.code);
    return 'source';
  };
}

/** Appends `mib` MiB (incompressible, not sparse) to the container's rootfs, so that rootfs pass 1 takes a while. */
async function growRootfs(node: Node, name: string, mib: number): Promise<void> {
  const chunk = randomBytes(MIB);
  const file = await open(join(node.host.stateDir, 'containers', name, 'rootfs', 'ballast'), 'wx', 0o644);
  try {
    for (let index = 0; index < mib; index++) {
      chunk.writeUInt32LE(index, 0);
      await file.write(chunk);
    }
  } finally {
    await file.close();
  }
}

describe('a cut of the destination link', { timeout: 150_000 }, () => {
  it('during preflight: fails in preflight, runs on the source, B keeps nothing, then migrates', async () => {
    await cutAndCheck(
      { name: 'cut-preflight', mib: 64, seed: 5101, when: (event) => event.phase === 'preflight' },
      (result) => {
        // The link was down before preflight was over.
        expect(result.beforeCut.map((event) => event.phase)).not.toContain('precopy');
        // Connecting may also wait out the cut and go on: then it must have succeeded.
        if (result.outcome.report) {
          expect(result.outcome.report.outcome).toBe('succeeded');
          return 'destination';
        }
        return expectFailedIn(['connect', 'preflight'])(result);
      },
    );
  });

  it('during rootfs pass 1: fails in precopy, runs on the source, B keeps nothing, then migrates', async () => {
    await cutAndCheck(
      {
        name: 'cut-rootfs',
        mib: 64,
        seed: 5102,
        prepare: (a, name) => growRootfs(a, name, 384),
        when: (event) => event.phase === 'precopy',
      },
      (result) => {
        // The cut came before the destination had applied pass 1.
        expect(result.events.map((event) => event.message)).not.toContain('rootfs pass 1 applied on the destination');
        return expectFailedIn(['precopy'])(result);
      },
    );
  });

  it('during the dump and stream: fails in dump or stream, runs on the source, B keeps nothing, then migrates', async () => {
    await cutAndCheck(
      {
        name: 'cut-dump',
        mib: 512,
        seed: 5103,
        options: { strategy: 'stop-and-copy' },
        when: (event) => (event.phase === 'dump' || event.phase === 'stream') && (event.bytes ?? 0) > 96 * MIB,
      },
      (result) => {
        expect(result.beforeCut.map((event) => event.phase)).not.toContain('restore');
        return expectFailedIn(['snapshot', 'dump', 'stream'])(result);
      },
    );
  });

  it('after B prepared, before the decision: fails in restore, B drops its prepared copy within 30 s, then migrates', async () => {
    // The cut comes as B starts its restore (everything received); B's CRIU
    // waits 2 s before restoring, so the cut lands before B sends `prepared`.
    const criu = await slowRestoreCriu(2_000);
    try {
      let sawPrepared = false;
      await cutAndCheck(
        {
          name: 'cut-prepared',
          mib: 64,
          seed: 5104,
          destination: { env: { FERRY_CRIU: criu.path } },
          atDestinationLog: (line) => line.msg === 'phase' && line.phase === 'restore',
          whileDown: async (b, migrationId) => {
            // B finishes the restore and reaches `prepared` while the link is still down.
            await poll('B to journal the migration as prepared', CUT_MS - 1_000, async () =>
              (await journalState(b, migrationId)) === 'prepared' ? true : undefined,
            );
            sawPrepared = true;
          },
        },
        (result) => {
          expect(sawPrepared).toBe(true);
          expect(result.events.map((event) => event.phase)).not.toContain('confirm');
          return expectFailedIn(['restore'])(result);
        },
      );
    } finally {
      await criu.remove();
    }
  });

  it('around the commit: succeeds (or is in doubt and then delivered), runs on B only, A keeps nothing, then migrates back', async () => {
    await cutAndCheck(
      { name: 'cut-commit', mib: 64, seed: 5105, when: (event) => event.phase === 'confirm' },
      ({ outcome }) => {
        expect(outcome.report, `expected a report after the commit, got ${describeOutcome(outcome)}`).toBeDefined();
        expect(['succeeded', 'in-doubt']).toContain(outcome.report!.outcome);
        return 'destination';
      },
    );
  });

  // 13 s down: twice the usual 6 s window, within the 16 s bound (test/postcopy.test.ts cuts on the switch instead).
  it('mid-post-copy, within the bound: both wait a 13 s cut out, the pages resume, the move succeeds, runs on B only', async () => {
    await cutAndCheck(
      {
        name: 'cut-postcopy-wait',
        mib: 128,
        seed: 5107,
        options: { strategy: 'postcopy', postcopyGraceMs: 16_000 },
        cutMs: 13_000,
        // Slow pages, so that the cut lands while they still arrive.
        source: { env: { FERRY_FAULTS: 'postcopy-slow:2' } },
        atDestinationLog: (line) => line.msg === 'post-copy: running here; pages follow',
      },
      ({ outcome, events }) => {
        expect(outcome.report, `expected a report, got ${describeOutcome(outcome)}`).toBeDefined();
        const report = outcome.report!;
        expect(report.outcome).toBe('succeeded');
        expect(report.postcopy?.graceMs).toBe(16_000);
        // Longer than the usual window (3 pings 2 s apart), which the cut would have ended in any other phase.
        expect(report.postcopy?.longestSilenceMs).toBeGreaterThan(12_000);
        expect(report.warnings?.join('\n')).toMatch(/silent for \d+ ms during post-copy \(bound 16000 ms\); the page transfer resumed/);
        expect(events.some((event) => /^no word from h1 for \d+ ms; waiting up to 16000 ms/.test(event.message ?? ''))).toBe(true);
        return 'destination';
      },
    );
  });

  it('mid-post-copy, past the bound: B stops its running copy, A thaws only once B says so, one copy, then migrates', async () => {
    await cutAndCheck(
      {
        name: 'cut-postcopy',
        mib: 128,
        seed: 5106,
        // The least bound there is: the usual heartbeat window (6 s), shorter than the cut.
        options: { strategy: 'postcopy', postcopyGraceMs: 2_000 },
        source: { env: { FERRY_FAULTS: 'postcopy-slow:2' } },
        atDestinationLog: (line) => line.msg === 'post-copy: running here; pages follow',
      },
      (result) => expectFailedIn(['postcopy'])(result),
    );
  });
});
