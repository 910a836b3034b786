// Assembles the coordinator: store, agent pool with heartbeats, migrator,
// evacuator, events, metrics and the HTTP API; reconciles on start.
import type { Server } from 'node:http';
import type { Logger } from 'pino';
import { FerryError } from '../src/errors.ts';
import type { ContainerInfo } from '../src/protocol/container.ts';
import type { HostView, MigrationBody, MigrationView, RegisterHostBody } from '../src/protocol/coordinator.ts';
import { Evacuator } from './evacuation.ts';
import { EventBus } from './events.ts';
import { HostPool } from './hosts.ts';
import { createApiServer } from './http.ts';
import { CoordinatorMetrics } from './metrics.ts';
import { Migrator } from './migrator.ts';
import { reconcile } from './reconcile.ts';
import { Store } from './store.ts';

export interface ServiceOptions {
  host: string;
  port: number;
  token: string;
  dbFile: string;
  logger: Logger;
  hosts?: RegisterHostBody[];
  heartbeatMs?: number;
  marginBytes?: number;
  migrationTimeoutMs?: number;
  /** Migrations may move memory post-copy where stop-and-copy would outlast the downtime budget (off by default). */
  allowPostcopy?: boolean;
  /** Post-copy: the bound on a cut link (the migration option postcopyGraceMs). */
  postcopyGraceMs?: number;
}

export class Service {
  readonly token: string;
  readonly store: Store;
  readonly pool: HostPool;
  readonly events = new EventBus();
  readonly metrics: CoordinatorMetrics;
  readonly migrator: Migrator;
  readonly evacuator: Evacuator;
  private readonly logger: Logger;
  private readonly server: Server;
  private readonly options: ServiceOptions;
  url = '';

  constructor(options: ServiceOptions) {
    this.options = options;
    this.token = options.token;
    this.logger = options.logger;
    this.store = new Store(options.dbFile);
    this.pool = new HostPool(this.store, this.logger, options.heartbeatMs ?? 2_000);
    this.metrics = new CoordinatorMetrics(() => this.pool.containersByHost());
    const deps = { store: this.store, pool: this.pool, events: this.events, metrics: this.metrics, logger: this.logger };
    this.migrator = new Migrator(deps, {
      marginBytes: options.marginBytes ?? 16 * 1024 * 1024,
      migrationTimeoutMs: options.migrationTimeoutMs ?? 10 * 60_000,
      allowPostcopy: options.allowPostcopy ?? false,
      ...(options.postcopyGraceMs !== undefined ? { postcopyGraceMs: options.postcopyGraceMs } : {}),
    });
    this.evacuator = new Evacuator({ ...deps, migrator: this.migrator });
    this.server = createApiServer(this, options.logger);
  }

  /** Listens, takes a first heartbeat of every host, then picks up what a previous run left unfinished. */
  async start(): Promise<void> {
    for (const host of this.options.hosts ?? []) this.store.upsertHost(host);
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.port, this.options.host, () => resolve());
    });
    const address = this.server.address();
    const port = typeof address === 'object' && address ? address.port : this.options.port;
    this.url = `http://${this.options.host.includes(':') ? `[${this.options.host}]` : this.options.host}:${port}`;
    await this.pool.start();
    void reconcile({ store: this.store, pool: this.pool, migrator: this.migrator, evacuator: this.evacuator, logger: this.logger }).catch(
      (error: unknown) => this.logger.error({ err: error }, 'reconciliation failed'),
    );
  }

  async close(): Promise<void> {
    this.pool.stop();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.store.close();
  }

  async registerHost(body: RegisterHostBody): Promise<HostView> {
    this.store.upsertHost(body);
    await this.pool.poll(body.name);
    return this.pool.views().find((view) => view.name === body.name)!;
  }

  /**
   * Lets placement use a host again after an evacuation that is not undone.
   * Persisted like the drain; refused while the host is being evacuated, as
   * containers could be placed back onto it while they leave.
   */
  undrain(name: string): HostView {
    this.pool.row(name);
    if (this.store.evacuations({ running: true }).some((running) => running.host === name)) {
      throw new FerryError('BUSY', `${name} is being evacuated; it stays draining until that ends`);
    }
    this.store.setDraining(name, false);
    this.logger.info({ host: name }, 'host un-drained');
    return this.pool.views().find((view) => view.name === name)!;
  }

  /** Every container the last heartbeats reported, with its host. */
  containers(): Array<ContainerInfo & { host: string }> {
    return this.store.hosts().flatMap((host) => (host.info?.containers ?? []).map((container) => ({ ...container, host: host.name })));
  }

  async startMigration(body: MigrationBody): Promise<MigrationView> {
    this.pool.row(body.from);
    if (body.to) this.pool.row(body.to);
    if (body.to === body.from) throw new FerryError('BAD_REQUEST', 'source and target are the same host');
    if (this.migrator.isBusy(body.container)) throw new FerryError('BUSY', `${body.container} is already being moved`);
    // Persisted before it runs, so a restart finds it.
    const row = this.store.createMigration({ container: body.container, source: body.from, target: body.to ?? null });
    void this.migrator
      .move({ container: body.container, from: body.from, to: body.to, existing: row })
      .catch((error: unknown) => {
        const current = this.store.migration(row.id);
        if (current?.state === 'pending') this.migrator.finish(current, 'failed', { error: String(error) });
      });
    return row;
  }
}
