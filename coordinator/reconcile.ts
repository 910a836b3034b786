// After a (re)start: settle the migrations the store says were in flight
// against what the agents report, then continue unfinished evacuations.
import type { Logger } from 'pino';
import type { Evacuator } from './evacuation.ts';
import { SETTLE_TIMEOUT_MS, whereNow, type HostPool } from './hosts.ts';
import type { Migrator } from './migrator.ts';
import type { MigrationRow, Store } from './store.ts';

export interface ReconcileDeps {
  store: Store;
  pool: HostPool;
  migrator: Migrator;
  evacuator: Evacuator;
  logger: Logger;
}

export async function reconcile(deps: ReconcileDeps): Promise<void> {
  const interrupted = deps.store.migrations({ unfinished: true });
  const retry: MigrationRow[] = [];
  for (const row of interrupted) {
    const outcome = await settleMigration(deps, row).catch((error: unknown) => {
      deps.logger.error({ migration: row.id, err: error }, 'cannot settle an interrupted migration');
      return 'unknown' as const;
    });
    deps.logger.info({ migration: row.id, container: row.container, outcome }, 'interrupted migration reconciled');
    if (outcome === 'on-source' && !row.evacuationId) retry.push(row);
  }
  // Evacuations list their host's containers again: what already left is not moved twice.
  for (const evacuation of deps.store.evacuations({ running: true })) deps.evacuator.resume(evacuation);
  for (const row of retry) {
    void deps.migrator
      .move({ container: row.container, from: row.source, ...(row.target ? { to: row.target } : {}) })
      .catch((error: unknown) => deps.logger.warn({ container: row.container, err: error }, 'retry after restart failed'));
  }
}

type Settled = 'on-target' | 'on-source' | 'missing';

/** Decides one interrupted migration from where its container runs now. */
async function settleMigration(deps: ReconcileDeps, row: MigrationRow): Promise<Settled> {
  const restart = 'interrupted by a coordinator restart';
  if (!row.target) {
    deps.migrator.finish(row, 'failed', { error: `${restart} before a target was chosen` });
    return 'on-source';
  }
  const where = await whereNow(deps.pool, row.container, row.source, row.target, SETTLE_TIMEOUT_MS);
  if (where === 'target') {
    deps.migrator.finish(row, 'succeeded', { error: `${restart}; found running on ${row.target}` });
    return 'on-target';
  }
  if (where === 'source') {
    deps.migrator.finish(row, row.state === 'running' ? 'rolled-back' : 'failed', { error: `${restart}; still on ${row.source}` });
    return 'on-source';
  }
  deps.migrator.finish(row, 'failed', { error: `${restart}; running on neither host` });
  return 'missing';
}
