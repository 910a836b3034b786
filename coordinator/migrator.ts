// Moves one container: settle its state on the source, pick a target, persist
// the migration, ask the SOURCE agent to migrate it, record the outcome, and
// (when the target was chosen by placement) retry once on another host.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { FerryError, toFerryError } from '../src/errors.ts';
import type { ContainerInfo } from '../src/protocol/container.ts';
import { migrationOptionsSchema, type MigrationReport } from '../src/protocol/migration.ts';
import { withTimeout } from '../src/timeout.ts';
import type { AgentClient } from '../src/transport/client.ts';
import type { EventBus } from './events.ts';
import { SETTLE_TIMEOUT_MS, whereNow, type HostPool } from './hosts.ts';
import type { CoordinatorMetrics } from './metrics.ts';
import { ANTI_AFFINITY_LABEL, place } from './placement.ts';
import type { MigrationRow, Store } from './store.ts';

export interface MoveRequest {
  container: string;
  from: string;
  /** A fixed target: no placement, no retry elsewhere. */
  to?: string | undefined;
  allowed?: readonly string[] | undefined;
  evacuationId?: string | undefined;
  /** Moving back to where it ran before (undo): anti-affinity does not apply. */
  restore?: boolean;
  /** A pending row created earlier (by the API), used for the first attempt. */
  existing?: MigrationRow | undefined;
}

export type MoveOutcome =
  | { kind: 'succeeded'; migration: MigrationRow }
  | { kind: 'failed'; migration: MigrationRow }
  | { kind: 'unplaced'; reason: string }
  /** Already where it should be (e.g. moved before a coordinator restart). */
  | { kind: 'in-place'; host: string };

export interface MigratorOptions {
  marginBytes: number;
  migrationTimeoutMs: number;
  allowPostcopy: boolean;
  postcopyGraceMs?: number;
}

const SETTLE_POLL_MS = 500;

export class Migrator {
  private readonly store: Store;
  private readonly pool: HostPool;
  private readonly events: EventBus;
  private readonly metrics: CoordinatorMetrics;
  private readonly logger: Logger;
  private readonly options: MigratorOptions;
  /** Containers being moved now: never two migrations of one container. */
  private readonly busy = new Set<string>();
  /** Dedicated connections of running migrations: closing one makes its source agent roll back. */
  private readonly running = new Map<string, AgentClient>();
  private readonly cancelled = new Set<string>();

  constructor(deps: { store: Store; pool: HostPool; events: EventBus; metrics: CoordinatorMetrics; logger: Logger }, options: MigratorOptions) {
    this.store = deps.store;
    this.pool = deps.pool;
    this.events = deps.events;
    this.metrics = deps.metrics;
    this.logger = deps.logger;
    this.options = options;
  }

  isBusy(container: string): boolean {
    return this.busy.has(container);
  }

  async move(request: MoveRequest): Promise<MoveOutcome> {
    if (this.busy.has(request.container)) throw new FerryError('BUSY', `${request.container} is already being moved`);
    this.busy.add(request.container);
    try {
      return await this.moveLocked(request);
    } finally {
      this.busy.delete(request.container);
    }
  }

  /** Cancels a pending or running migration; true when there was one to cancel. */
  cancel(id: string): boolean {
    const row = this.store.migration(id);
    if (!row || (row.state !== 'pending' && row.state !== 'running')) return false;
    this.cancelled.add(id);
    this.logger.info({ migration: id, state: row.state }, 'migration cancel requested');
    // The agent aborts what ran on this connection: before the commit it rolls back.
    // Cut at once: a polite close handshake waits on an agent busy dumping.
    this.running.get(id)?.socket.terminate();
    if (row.state === 'pending') this.finish(row, 'failed', { error: 'cancelled' });
    return true;
  }

  private async moveLocked(request: MoveRequest): Promise<MoveOutcome> {
    const settled = await this.settle(request.container, request.from, request.to);
    if (settled.kind !== 'ready') {
      if (request.existing) this.finish(request.existing, 'failed', { error: settled.kind === 'unplaced' ? settled.reason : 'already moved' });
      return settled.kind === 'unplaced' ? settled : { kind: 'in-place', host: settled.host };
    }
    const exclude = new Set<string>();
    const attempts = request.to ? 1 : 2;
    let last: MigrationRow | undefined;
    let info = settled.info;
    for (let attempt = 1; attempt <= attempts; attempt++) {
      if (attempt > 1) {
        // The failed attempt's rollback may still be thawing it on the source.
        const again = await this.settle(request.container, request.from, request.to);
        if (again.kind !== 'ready') break;
        info = again.info;
      }
      const target = this.chooseTarget(request, info, exclude);
      if (!target.ok) {
        if (request.existing && attempt === 1) this.finish(request.existing, 'failed', { error: target.reason });
        return last ? { kind: 'failed', migration: last } : { kind: 'unplaced', reason: target.reason };
      }
      const row =
        attempt === 1 && request.existing
          ? request.existing
          : this.store.createMigration({ container: request.container, source: request.from, target: target.name, attempt, evacuationId: request.evacuationId ?? null });
      if (this.cancelled.has(row.id)) return { kind: 'failed', migration: this.store.migration(row.id)! };
      last = await this.attempt(row, target.name, info);
      if (last.state === 'succeeded') return { kind: 'succeeded', migration: last };
      if (this.cancelled.has(row.id)) break; // a cancelled migration is not retried elsewhere
      exclude.add(target.name);
    }
    return { kind: 'failed', migration: last! };
  }

  /** Waits out a migration the source agent already runs, and finds where the container is. */
  private async settle(
    container: string,
    from: string,
    to: string | undefined,
  ): Promise<{ kind: 'ready'; info: ContainerInfo } | { kind: 'unplaced'; reason: string } | { kind: 'in-place'; host: string }> {
    const deadline = Date.now() + SETTLE_TIMEOUT_MS;
    for (;;) {
      const found = (await this.pool.list(from)).find((entry) => entry.name === container);
      if (found?.status === 'running') return { kind: 'ready', info: found };
      if (found?.status !== 'migrating') {
        // Gone, or a stopped copy a committed migration is still cleaning up: it may run elsewhere.
        const elsewhere = await this.locate(container);
        if (elsewhere && elsewhere !== from && (to === undefined || elsewhere === to)) return { kind: 'in-place', host: elsewhere };
        if (found) return { kind: 'unplaced', reason: `${container} is ${found.status} on ${from}` };
        return { kind: 'unplaced', reason: elsewhere ? `${container} is on ${elsewhere}, not ${from}` : `${container} is not on ${from}` };
      }
      if (Date.now() > deadline) return { kind: 'unplaced', reason: `${container} stayed in a migration on ${from}` };
      await sleep(SETTLE_POLL_MS);
    }
  }

  /** The host on which the container runs (not mid-migration), asking every reachable host. */
  async locate(container: string): Promise<string | undefined> {
    for (const host of this.store.hosts()) {
      const listed = await this.pool.list(host.name).catch(() => [] as ContainerInfo[]);
      if (listed.some((entry) => entry.name === container && entry.status === 'running')) return host.name;
    }
    return undefined;
  }

  private chooseTarget(request: MoveRequest, info: ContainerInfo, exclude: Set<string>): { ok: true; name: string } | { ok: false; reason: string } {
    const hosts = this.pool.candidates();
    const source = hosts.find((host) => host.name === request.from);
    if (!source) return { ok: false, reason: `source ${request.from} is not registered` };
    const decision = place({
      container: info,
      source,
      hosts: request.to ? hosts.filter((host) => host.name === request.to) : hosts,
      exclude,
      allowed: request.allowed,
      nowMs: Date.now(),
      staleMs: this.pool.staleMs,
      marginBytes: this.options.marginBytes,
      ignoreAntiAffinity: !!request.restore,
    });
    return decision.ok ? { ok: true, name: decision.target } : { ok: false, reason: decision.message };
  }

  private async attempt(row: MigrationRow, target: string, info: ContainerInfo): Promise<MigrationRow> {
    this.store.markMigrationRunning(row.id, target);
    const started = this.store.migration(row.id)!;
    this.events.emit({ type: 'migration-started', migration: started });
    const release = this.pool.promise(target, row.container, (info.memoryBytes ?? 0) + this.options.marginBytes, info.labels[ANTI_AFFINITY_LABEL]);
    const logger = this.logger.child({ migration: row.id, container: row.container, source: row.source, target });
    logger.info('migration started');
    try {
      const report = await this.runOnSource(row, target);
      this.metrics.reported(report);
      const state = report.outcome === 'rolled-back' ? 'rolled-back' : 'succeeded';
      const note = report.outcome === 'in-doubt' ? 'in-doubt: the destination did not confirm' : report.error?.message;
      return this.finish(started, state, { downtimeMs: report.downtimeMs, ...(note ? { error: note } : {}) });
    } catch (error) {
      const failure = toFerryError(error);
      const reason = this.cancelled.has(row.id) ? 'cancelled' : `${failure.code}: ${failure.message}`;
      // Our connection may have failed, not the migration: ask the agents how it ended.
      const where = await whereNow(this.pool, row.container, row.source, target, SETTLE_TIMEOUT_MS);
      logger.warn({ err: failure, where }, 'migration request failed');
      if (where === 'target') return this.finish(started, 'succeeded', { error: `${reason}; but it runs on ${target}` });
      return this.finish(started, where === 'source' ? 'rolled-back' : 'failed', { error: reason });
    } finally {
      // Fresh heartbeats before the promise goes, so placement never counts the memory zero times.
      await Promise.all([this.pool.poll(target), this.pool.poll(row.source)]);
      release();
      this.running.delete(row.id);
    }
  }

  private async runOnSource(row: MigrationRow, target: string): Promise<MigrationReport> {
    const destination = this.pool.row(target);
    const client = await this.pool.connect(row.source);
    this.running.set(row.id, client);
    if (this.cancelled.has(row.id)) client.socket.terminate(); // cancelled while connecting
    let lastProgress = 0;
    let lastPhase = '';
    try {
      return await withTimeout(
        client.request(
          'migrate',
          {
            name: row.container,
            destination: { url: destination.url, token: destination.token },
            options: migrationOptionsSchema.parse({
              timeoutMs: this.options.migrationTimeoutMs,
              ...(this.options.allowPostcopy ? { allowPostcopy: true } : {}),
              ...(this.options.postcopyGraceMs !== undefined ? { postcopyGraceMs: this.options.postcopyGraceMs } : {}),
            }),
          },
          (event) => {
            // Phase changes always, byte counts at most twice a second.
            if (event.phase === lastPhase && Date.now() - lastProgress < 500) return;
            lastProgress = Date.now();
            lastPhase = event.phase;
            this.events.emit({ type: 'migration-progress', migrationId: row.id, phase: event.phase, ...(event.bytes !== undefined ? { bytes: event.bytes } : {}) });
          },
        ),
        this.options.migrationTimeoutMs + 30_000,
        'the migrate request',
      );
    } finally {
      client.close();
    }
  }

  finish(row: MigrationRow, state: 'succeeded' | 'failed' | 'rolled-back', fields: { error?: string; downtimeMs?: number }): MigrationRow {
    const current = this.store.migration(row.id);
    if (current?.finishedAt) return current; // e.g. cancelled while pending: the first outcome stands
    const finished = this.store.finishMigration(row.id, state, fields);
    this.metrics.migrationFinished(state, finished.downtimeMs);
    this.events.emit({ type: 'migration-finished', migration: finished });
    this.logger.info({ migration: row.id, container: row.container, state, error: fields.error }, 'migration finished');
    return finished;
  }
}
