// Evacuating a host: drain it, then move each of its containers with at most
// `parallel` migrations at once. Undo moves them back to where they came from.
import pLimit from 'p-limit';
import type { Logger } from 'pino';
import { FerryError, toFerryError } from '../src/errors.ts';
import type { EvacuationBody, EvacuationView } from '../src/protocol/coordinator.ts';
import type { EventBus } from './events.ts';
import type { HostPool } from './hosts.ts';
import type { Migrator, MoveOutcome } from './migrator.ts';
import type { EvacuationRow, Store } from './store.ts';

interface Item {
  container: string;
  from: string;
  to?: string;
  memoryBytes: number;
}

export class Evacuator {
  private readonly store: Store;
  private readonly pool: HostPool;
  private readonly migrator: Migrator;
  private readonly events: EventBus;
  private readonly logger: Logger;
  private readonly active = new Map<string, Promise<void>>();

  constructor(deps: { store: Store; pool: HostPool; migrator: Migrator; events: EventBus; logger: Logger }) {
    this.store = deps.store;
    this.pool = deps.pool;
    this.migrator = deps.migrator;
    this.events = deps.events;
    this.logger = deps.logger;
  }

  start(body: EvacuationBody): EvacuationView {
    this.pool.row(body.host);
    for (const target of body.to ?? []) this.pool.row(target);
    if (body.to?.includes(body.host)) throw new FerryError('BAD_REQUEST', `cannot evacuate ${body.host} onto itself`);
    if (this.store.evacuations({ running: true }).some((running) => running.host === body.host)) {
      throw new FerryError('BUSY', `${body.host} is already being evacuated`);
    }
    // Draining first, persisted: from now on placement sends nothing to this host.
    this.store.setDraining(body.host, true);
    const row = this.store.createEvacuation({ host: body.host, parallel: body.parallel, targets: body.to });
    this.resume(row);
    return this.view(row.id);
  }

  undo(id: string): EvacuationView {
    const original = this.store.evacuation(id);
    if (!original) throw new FerryError('NOT_FOUND', `no evacuation ${id}`);
    if (original.undoOf) throw new FerryError('BAD_REQUEST', `evacuation ${id} is itself an undo`);
    if (original.state === 'running') throw new FerryError('BUSY', `evacuation ${id} is still running`);
    this.store.setDraining(original.host, false);
    const row = this.store.createEvacuation({ host: original.host, parallel: original.parallel, undoOf: id });
    this.resume(row);
    return this.view(row.id);
  }

  /** Runs (or, after a restart, continues) an evacuation in the background. */
  resume(row: EvacuationRow): void {
    if (this.active.has(row.id)) return;
    const run = this.run(row)
      .catch((error: unknown) => {
        this.logger.error({ evacuation: row.id, err: error }, 'evacuation failed');
        this.store.addUnplaced(row.id, '*', toFerryError(error).message);
        this.complete(row.id, 'failed');
      })
      .finally(() => this.active.delete(row.id));
    this.active.set(row.id, run);
  }

  /** Resolves when every evacuation running in this process has ended (for shutdown and tests). */
  async idle(): Promise<void> {
    await Promise.all(this.active.values());
  }

  view(id: string): EvacuationView {
    const row = this.store.evacuation(id);
    if (!row) throw new FerryError('NOT_FOUND', `no evacuation ${id}`);
    return { ...row, migrations: this.store.migrations({ evacuationId: id }) };
  }

  private async run(row: EvacuationRow): Promise<void> {
    const items = row.undoOf ? await this.undoItems(row) : await this.evacuationItems(row);
    // Largest first: the big ones get the most room to choose from.
    items.sort((a, b) => b.memoryBytes - a.memoryBytes);
    const limit = pLimit(row.parallel);
    await Promise.all(items.map((item) => limit(() => this.moveOne(row, item))));
    this.complete(row.id, 'finished');
  }

  private async evacuationItems(row: EvacuationRow): Promise<Item[]> {
    const containers = await this.pool.list(row.host);
    return containers.map((container) => {
      // Where it came from, written before it moves, for undo.
      this.store.recordOrigin(row.id, container.name, row.host);
      return { container: container.name, from: row.host, memoryBytes: container.memoryBytes ?? 0 };
    });
  }

  private async undoItems(row: EvacuationRow): Promise<Item[]> {
    const items: Item[] = [];
    for (const { container, origin } of this.store.origins(row.undoOf!)) {
      const current = await this.migrator.locate(container);
      if (current === undefined) {
        this.store.addUnplaced(row.id, container, `${container} runs nowhere the coordinator can see`);
      } else if (current !== origin) {
        items.push({ container, from: current, to: origin, memoryBytes: 0 });
      }
    }
    return items;
  }

  private async moveOne(row: EvacuationRow, item: Item): Promise<void> {
    let outcome: MoveOutcome;
    try {
      outcome = await this.migrator.move({
        container: item.container,
        from: item.from,
        to: item.to,
        allowed: row.targets ?? undefined,
        evacuationId: row.id,
        restore: !!row.undoOf,
      });
    } catch (error) {
      outcome = { kind: 'unplaced', reason: toFerryError(error).message };
    }
    // After a restart an earlier pass may have left a reason here: the latest outcome wins.
    const reason = outcome.kind === 'unplaced' ? outcome.reason : outcome.kind === 'failed' ? (outcome.migration.error ?? 'migration failed') : undefined;
    this.store.addUnplaced(row.id, item.container, reason);
  }

  private complete(id: string, state: 'finished' | 'failed'): void {
    this.store.finishEvacuation(id, state);
    const view = this.view(id);
    this.events.emit({ type: 'evacuation-finished', evacuation: view });
    this.logger.info({ evacuation: id, host: view.host, unplaced: view.unplaced.length }, 'evacuation finished');
  }
}
