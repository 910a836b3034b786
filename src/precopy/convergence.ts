// When to stop pre-dumping and freeze for the final dump.
//
// P.Haul stops when a round writes < 64 pages or shrinks by < 10 %; Incus
// when it wrote < 70 % of the first. Neither knows what the final dump will
// cost. This policy predicts it from what the rounds measured: the dirty
// rate (pages a round wrote over the time since the previous round froze the
// tasks), the time per page to dump and ship, and CRIU's fixed cost per call.
// It stops when the prediction fits the budget, when rounds stop shrinking,
// when the budget is out of reach because of costs more rounds cannot cut, or
// at the round limit.

/** One pre-dump round as the source measured it; times in ms on one monotonic clock. */
export interface RoundMeasurement {
  /** When CRIU started the round (it freezes the tasks right away). */
  startedMs: number;
  /** When CRIU exited: its images are written. */
  dumpedMs: number;
  /** When the last byte of the round's images was handed to the link. */
  sentMs: number;
  pagesWritten: number;
  pagesSkippedParent: number;
  /** Pages CRIU looked at: roughly the resident memory. */
  pagesScanned: number;
  bytesSent: number;
}

export interface ConvergenceOptions {
  maxDowntimeMs: number;
  maxRounds: number;
  /**
   * Disk both hosts can give the rounds (beyond what the final dump needs),
   * and the resident memory, which is what a first round writes.
   */
  space?: { bytes: number; residentBytes: number };
}

export type StopReason =
  /** The predicted final dump, transfer and restore fit in the budget. */
  | 'within-budget'
  /** The last round wrote nearly as much as the one before: the dirty rate outruns the link. */
  | 'not-shrinking'
  /** What more rounds could save is small next to costs they cannot cut (restore, CRIU start). */
  | 'budget-unreachable'
  | 'max-rounds'
  /** Another round might not fit on the disk of either host: rounds are kept until the restore. */
  | 'no-space';

export interface Prediction {
  /** Pages the final dump is expected to write. */
  finalPages: number;
  downtimeMs: number;
  /** The part of downtimeMs that does not depend on the final dump's size. */
  fixedMs: number;
}

export type Decision = { next: 'pre-dump'; prediction?: Prediction } | { next: 'dump'; reason: StopReason; prediction?: Prediction };

/** A round that wrote more than this share of the previous round's pages is not converging. */
export const shrinkFactor = 0.8;
/** Another round is worth it only if it can save at least this share of the predicted downtime. */
const minimumGain = 0.1;

/**
 * The time model, fitted on the rounds: per page, dumping costs what the
 * largest round took per page between its start and CRIU's exit, and
 * shipping what it took from start to last byte sent; each CRIU call costs
 * the last round's time not explained by its pages. Restore is taken to
 * cost what dumping does, for all the resident pages, since it rebuilds the
 * whole memory from the chain.
 */
export function predict(rounds: RoundMeasurement[]): Prediction | undefined {
  if (rounds.length < 2) return undefined;
  const last = rounds.at(-1)!;
  const previous = rounds.at(-2)!;
  const largest = rounds.reduce((a, b) => (b.pagesWritten > a.pagesWritten ? b : a));
  const pages = Math.max(largest.pagesWritten, 1);
  const dumpMsPerPage = (largest.dumpedMs - largest.startedMs) / pages;
  const roundMsPerPage = Math.max(largest.sentMs - largest.startedMs, largest.dumpedMs - largest.startedMs) / pages;
  const callMs = Math.max(0, last.sentMs - last.startedMs - last.pagesWritten * roundMsPerPage);

  // The last round wrote what was dirtied since the previous one froze the
  // tasks; the final dump will write what is dirtied from this round's start
  // until the freeze, at the same rate, never more than is resident.
  const dirtyPagesPerMs = last.pagesWritten / Math.max(last.startedMs - previous.startedMs, 1);
  const window = last.sentMs - last.startedMs;
  const finalPages = Math.min(Math.ceil(dirtyPagesPerMs * window), Math.max(last.pagesScanned, last.pagesWritten));

  const fixedMs = 2 * callMs + last.pagesScanned * dumpMsPerPage;
  return { finalPages, fixedMs: round(fixedMs), downtimeMs: round(fixedMs + finalPages * roundMsPerPage) };
}

/** What to do after the rounds so far. */
export function decide(rounds: RoundMeasurement[], options: ConvergenceOptions): Decision {
  if (rounds.length === 0) {
    if (options.maxRounds === 0) return { next: 'dump', reason: 'max-rounds' };
    return outOfSpace(rounds, options) ? { next: 'dump', reason: 'no-space' } : { next: 'pre-dump' };
  }
  const prediction = predict(rounds);
  const stop = (reason: StopReason): Decision => ({ next: 'dump', reason, ...(prediction ? { prediction } : {}) });
  if (prediction && prediction.downtimeMs <= options.maxDowntimeMs) return stop('within-budget');
  if (rounds.length >= options.maxRounds) return stop('max-rounds');
  if (outOfSpace(rounds, options)) return stop('no-space');
  if (!prediction) return { next: 'pre-dump' };

  const last = rounds.at(-1)!;
  const previous = rounds.at(-2)!;
  if (last.pagesWritten > shrinkFactor * previous.pagesWritten) return stop('not-shrinking');
  const variableMs = prediction.downtimeMs - prediction.fixedMs;
  if (prediction.fixedMs >= options.maxDowntimeMs && variableMs < minimumGain * prediction.downtimeMs) {
    return stop('budget-unreachable');
  }
  return { next: 'pre-dump', prediction };
}

/** Whether the next round, taken as large as the last one (or as the resident memory for the first), may not fit. */
function outOfSpace(rounds: RoundMeasurement[], options: ConvergenceOptions): boolean {
  if (!options.space) return false;
  const spent = rounds.reduce((sum, entry) => sum + entry.bytesSent, 0);
  const next = rounds.at(-1)?.bytesSent ?? options.space.residentBytes;
  return spent + next > options.space.bytes;
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}
