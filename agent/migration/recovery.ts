import type { Logger } from 'pino';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { drainOrphanedPipes } from '../../src/criu/pipes.ts';
import { unlockNetwork } from '../../src/net/lock.ts';
import { announceAddress } from '../runtime/network.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import { finishedRetentionMs, isFinal, type DestinationEntry, type JournalEntry, type MigrationJournal, type SourceEntry } from './journal.ts';
import { destinationRecovery, sourceRecovery } from './decisions.ts';
import { PeerLink, type PeerIdentity } from './peer.ts';
import type { Criu } from '../../src/criu/criu.ts';
import { rejoinPostcopy } from './rejoin.ts';

export interface RecoveryDependencies {
  runtime: Pick<ContainerRuntime, 'cgroup' | 'destroy' | 'store'>;
  journal: MigrationJournal;
  logger: Logger;
  identity: PeerIdentity;
  /** Post-copy's rejoin dumps the frozen tasks again. */
  criu: () => Promise<Pick<Criu, 'lazyDump'>>;
}

/**
 * After a restart, finish what a crash interrupted. The source decides: with
 * no decision written it aborts (thaws here, tells the destination); with a
 * commit written it makes sure the local copy is gone and re-delivers the
 * commit. A destination drops unprepared copies and waits for prepared ones.
 */
export async function recoverMigrations(deps: RecoveryDependencies): Promise<void> {
  const entries = await deps.journal.entries();
  await tidyFinished(deps, entries);
  for (const entry of entries.filter((each) => !isFinal(each.state))) {
    const logger = deps.logger.child({ migrationId: entry.migrationId, container: entry.container });
    try {
      if (entry.role === 'source') await recoverSource(deps, entry, logger);
      else await recoverDestination(deps, entry, logger);
    } catch (error) {
      logger.error({ err: error }, 'recovery failed');
    }
  }
}

/**
 * Finished migrations: their images go (they outlive one when the agent
 * died between its last journal write and their removal), and the whole
 * directory once it is older than `finishedRetentionMs`.
 */
export async function tidyFinished(deps: Pick<RecoveryDependencies, 'journal' | 'logger'>, entries?: JournalEntry[], now = Date.now()): Promise<void> {
  for (const entry of (entries ?? (await deps.journal.entries())).filter((each) => isFinal(each.state))) {
    const expired = now - Date.parse(entry.updatedAt) > finishedRetentionMs;
    await (expired ? deps.journal.remove(entry.migrationId) : deps.journal.removeImages(entry.migrationId)).catch((error: unknown) =>
      deps.logger.warn({ err: error, migrationId: entry.migrationId }, expired ? 'could not remove a finished migration' : 'could not remove images'),
    );
  }
}

async function recoverSource(deps: RecoveryDependencies, entry: SourceEntry, logger: Logger): Promise<void> {
  const decision = sourceRecovery(entry);
  // A dump this agent started before it died may hold the tasks, stuck on a page pipe nobody reads.
  const cgroup = deps.runtime.cgroup(entry.container);
  const imagesDir = join(deps.journal.directory(entry.migrationId), 'images');
  if (!(await drainOrphanedPipes(imagesDir, () => cgroup.pids()))) logger.error('the tasks are still traced after 60 s (a CRIU of the dead agent?)');
  if (entry.state === 'postcopy') {
    // The destination's copy may still run on pages only these frozen tasks hold: serve them again.
    // If it no longer waits, it may still run: this copy thaws only once it says that copy is gone.
    void rejoinPostcopy(deps, entry, logger)
      .catch((error: unknown) => {
        logger.error({ err: error }, 'post-copy: rejoin failed');
        return 'refused' as const;
      })
      .then(async (rejoined) => {
        if (rejoined === 'committed') {
          const after = await deps.journal.read(entry.migrationId).catch(() => undefined);
          if (after?.role === 'source' && after.state === 'committed') void deliverDecision(deps, after, 'commit', logger);
          return;
        }
        if (!(await deliverDecision(deps, entry, 'abort', logger))) {
          return logger.error('post-copy in doubt: the destination never confirmed its copy is gone; the container stays frozen here');
        }
        await thawAborted(deps, entry, logger);
        await deps.journal.removeImages(entry.migrationId).catch(() => undefined);
      });
    return;
  }
  if (decision === 'abort') {
    await thawAborted(deps, entry, logger);
  } else {
    await deps.runtime.destroy(entry.container);
    logger.warn('interrupted outgoing migration was committed: local copy removed');
  }
  // Images and pre-dump rounds can be as large as the container's memory.
  await deps.journal.removeImages(entry.migrationId).catch((error: unknown) => logger.warn({ err: error }, 'could not remove images'));
  void deliverDecision(deps, entry, decision, logger);
}

async function thawAborted(deps: RecoveryDependencies, entry: SourceEntry, logger: Logger): Promise<void> {
  const cgroup = deps.runtime.cgroup(entry.container);
  const record = await deps.runtime.store.read(entry.container);
  if (record) {
    // Locked at the freeze (a container with its own address): unlocked before the thaw, as in a rollback.
    if (record.spec.network) await unlockNetwork(record.pid, 'rollback').catch((error: unknown) => logger.error({ err: error }, 'network unlock failed'));
    await cgroup.thaw().catch(() => undefined);
    // The destination may have announced the address before the source went down.
    if (record.spec.network) await announceAddress(record.pid, record.spec.network).catch((error: unknown) => logger.warn({ err: error }, 'address announcement failed'));
    const { migrationId: _, ...rest } = record;
    await deps.runtime.store.write(rest);
  }
  await deps.journal.update(entry.migrationId, 'aborted', 'source agent restarted before the decision');
  logger.warn('interrupted outgoing migration rolled back: container thawed here');
}

async function recoverDestination(deps: RecoveryDependencies, entry: DestinationEntry, logger: Logger): Promise<void> {
  if (destinationRecovery(entry) === 'await-decision') {
    logger.warn('incoming migration prepared before a restart; waiting for the source\'s decision');
    return;
  }
  await deps.runtime.destroy(entry.container);
  await deps.journal.update(entry.migrationId, 'aborted', 'destination agent restarted while receiving');
  await deps.journal.removeImages(entry.migrationId);
  logger.warn('interrupted incoming migration discarded');
}

/** Retries until the destination acknowledges the decision (bounded: about 10 minutes); whether it did. */
export async function deliverDecision(
  deps: Pick<RecoveryDependencies, 'journal' | 'identity'>,
  entry: SourceEntry,
  decision: 'commit' | 'abort',
  logger: Logger,
  attempts = 120,
): Promise<boolean> {
  for (let attempt = 0; attempt < attempts; attempt += 1) {
    try {
      const link = await PeerLink.connect(entry.destination, deps.identity);
      try {
        link.inbox.enter('confirm');
        link.send({ type: 'decision', migrationId: entry.migrationId, decision });
        const decided = await link.inbox.expect('decided', 30_000, 'confirm');
        if (decision === 'commit') await deps.journal.update(entry.migrationId, 'done');
        logger.info({ decision, outcome: decided.decision }, 'decision delivered');
        return true;
      } finally {
        link.close();
      }
    } catch (error) {
      logger.warn({ err: error, attempt }, 'could not deliver the decision yet');
      if (attempt + 1 < attempts) await sleep(5_000);
    }
  }
  return false;
}
