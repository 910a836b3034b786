import type { DumpStats, RestoreStats } from '../../src/criu/stats.ts';
import type { MigrationReport, PostcopyStats, RestoreTiming } from '../../src/protocol/migration.ts';
import type { Part } from './meter.ts';
import { downtimeBreakdown, roundMs, type DowntimeMarks } from './timing.ts';

/** What an outgoing migration learns on its way, for its report. Times are performance.now() on the source. */
export interface ReportFacts {
  startedAt: number;
  /** Points of the downtime, for the breakdown. */
  marks: DowntimeMarks;
  /** Memory moved post-copy (set at the choice, so a failed one reports it too). */
  lazy?: boolean;
  /** Why memory moved stop-and-copy although pre-copy was allowed. */
  strategyNote?: string | undefined;
  dumpStats?: DumpStats | undefined;
  restoreStats?: RestoreStats | undefined;
  /** The destination's own timing of its part of the downtime. */
  restoreTiming?: RestoreTiming | undefined;
  /** When the destination confirmed that the container runs there: the end of downtime. */
  runningAt?: number | undefined;
  warnings: string[];
  /** Post-copy: the destination's figures, and when (source clock) the last page was in. */
  postcopy?: { stats: PostcopyStats; completeAt: number; pageBytes: number; longestSilenceMs?: number; graceMs?: number } | undefined;
}

export interface ReportInput {
  who: Pick<MigrationReport, 'migrationId' | 'container' | 'source' | 'destination'>;
  outcome: MigrationReport['outcome'];
  facts: ReportFacts;
  bytes: Record<Part, number>;
  phases: MigrationReport['phases'];
  /** Pre-dump rounds run, and the pre-copy part when the policy ran at all. */
  rounds: number;
  precopy?: MigrationReport['precopy'];
  now: number;
}

/**
 * The report of an outgoing migration. Downtime runs from the freeze to the
 * destination's confirmation; without one (in doubt, or failed) it runs to
 * `now`, and there is no breakdown.
 */
export function buildReport(input: ReportInput): MigrationReport {
  const { facts, now } = input;
  const end = facts.runningAt ?? now;
  return {
    ...input.who,
    outcome: input.outcome,
    strategy: facts.lazy ? 'postcopy' : input.rounds ? 'precopy' : 'stop-and-copy',
    ...(facts.strategyNote ? { strategyNote: facts.strategyNote } : {}),
    downtimeMs: roundMs(end - (facts.marks.freezing ?? end)),
    ...(facts.runningAt ? { downtime: downtimeBreakdown(facts.marks, facts.restoreTiming, input.bytes.pages, facts.runningAt) } : {}),
    totalMs: roundMs(now - facts.startedAt),
    bytes: input.bytes,
    phases: input.phases,
    criu: { ...(facts.dumpStats ? { dump: facts.dumpStats } : {}), ...(facts.restoreStats ? { restore: facts.restoreStats } : {}) },
    ...(input.precopy ? { precopy: input.precopy } : {}),
    ...(facts.postcopy && facts.runningAt
      ? {
          postcopy: {
            ...facts.postcopy.stats,
            runningMs: roundMs(facts.runningAt - facts.startedAt),
            completeMs: roundMs(facts.postcopy.completeAt - facts.startedAt),
            pageBytes: facts.postcopy.pageBytes,
            ...(facts.postcopy.graceMs ? { graceMs: facts.postcopy.graceMs, longestSilenceMs: facts.postcopy.longestSilenceMs ?? 0 } : {}),
          },
        }
      : {}),
    ...(facts.warnings.length ? { warnings: facts.warnings } : {}),
  };
}
