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

/** What the source's commit needs, and nothing more: the journal, the peer link and the cgroup in an agent, fakes in a unit test. */
export interface CommitPorts {
  /** Makes the decision durable; nothing is sent before it is. */
  record(): Promise<void>;
  send(): void;
  /** Stops the frozen copy here, alongside the wait: it can never run again, and freeing its memory is not downtime. */
  stopLocalCopy(): Promise<void>;
  /** The destination's acknowledgement; rejects when it does not come. */
  awaitDecided(): Promise<{ decision: 'commit' | 'abort'; warnings?: string[] | undefined }>;
}

export interface CommitOutcome {
  /** The destination said so; false means in doubt, and recovery re-delivers the decision. */
  confirmed: boolean;
  warnings: string[];
  /** Why it is in doubt. */
  unconfirmed?: unknown;
  /** The local copy would not stop (cleanup retries); the commit stands. */
  stopFailure?: unknown;
}

/**
 * The commit, in its order: durable first, then sent, then the local copy
 * stopped while the destination resumes. Once recorded nothing undoes it: a
 * missing acknowledgement leaves it in doubt, a destination that could not
 * resume is a warning. Rejects only if the decision could not be recorded,
 * and then nothing was sent.
 */
export async function commitOnce(ports: CommitPorts): Promise<CommitOutcome> {
  await ports.record();
  ports.send();
  const stopping = ports.stopLocalCopy();
  const outcome: CommitOutcome = { confirmed: false, warnings: [] };
  try {
    const decided = await ports.awaitDecided();
    outcome.confirmed = true;
    if (decided.decision !== 'commit') outcome.warnings.push('the destination could not resume the committed copy: the container was lost');
    for (const warning of decided.warnings ?? []) outcome.warnings.push(`destination: ${warning}`);
  } catch (error) {
    outcome.unconfirmed = error;
  }
  await stopping.catch((error: unknown) => (outcome.stopFailure = error));
  return outcome;
}
