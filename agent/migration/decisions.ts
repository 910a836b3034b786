import type { DestinationEntry, SourceEntry } from './journal.ts';

// The commit protocol's decisions, from the journal alone: what an agent does
// with a migration it finds after a restart, and what a destination does with
// a decision, however often it arrives. Pure, so that every case is tested.

/**
 * An unfinished outgoing migration after a restart: committed means the
 * destination's copy is the one (remove this copy, deliver commit); anything
 * earlier means the decision was never taken, so it is abort (thaw here,
 * deliver abort).
 */
export function sourceRecovery(entry: SourceEntry): 'commit' | 'abort' {
  return entry.state === 'committed' || entry.state === 'done' ? 'commit' : 'abort';
}

/**
 * An unfinished incoming migration after a restart: a prepared copy may
 * already be committed on the source, so it waits for the decision; an
 * earlier one cannot be, so it is discarded.
 */
export function destinationRecovery(entry: DestinationEntry): 'await-decision' | 'discard' {
  return entry.state === 'prepared' ? 'await-decision' : 'discard';
}

/**
 * What a destination does with the source's decision. A decision already
 * applied is not applied again (the source re-delivers until it hears back);
 * only a prepared copy can be resumed, and a commit for one that is not
 * prepared discards it, as an abort does.
 */
export function applyDecision(state: DestinationEntry['state'], decision: 'commit' | 'abort'): 'resume' | 'discard' | 'already-applied' {
  if (state === 'done' || state === 'aborted') return 'already-applied';
  return decision === 'commit' && state === 'prepared' ? 'resume' : 'discard';
}

/** What the destination acknowledges: commit only once its copy runs (journal says done). */
export function acknowledged(state: DestinationEntry['state'] | undefined): 'commit' | 'abort' {
  return state === 'done' ? 'commit' : 'abort';
}
