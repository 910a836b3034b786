import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { MigrationReport } from '../src/protocol/migration.ts';

/** The coordinator's Prometheus metrics, served at /metrics. */
export class CoordinatorMetrics {
  readonly registry = new Registry();
  private readonly migrations: Counter<'outcome'>;
  private readonly downtime: Histogram;
  private readonly duration: Histogram;
  private readonly bytes: Counter<'part'>;

  constructor(containersByHost: () => Map<string, number>) {
    collectDefaultMetrics({ register: this.registry, prefix: 'ferry_coordinator_process_' });
    this.migrations = new Counter({
      name: 'ferry_coordinator_migrations_total',
      help: 'Migrations the coordinator ran, by outcome',
      labelNames: ['outcome'],
      registers: [this.registry],
    });
    this.downtime = new Histogram({
      name: 'ferry_coordinator_migration_downtime_seconds',
      help: 'Downtime of successful migrations, as the source agent reported it',
      buckets: [0.05, 0.1, 0.15, 0.3, 0.5, 1, 2, 5, 10, 30],
      registers: [this.registry],
    });
    this.duration = new Histogram({
      name: 'ferry_coordinator_migration_duration_seconds',
      help: 'Whole time of successful migrations, preflight to cleanup, as the source agent reported it',
      buckets: [0.1, 0.5, 1, 2, 5, 10, 30, 60, 300],
      registers: [this.registry],
    });
    this.bytes = new Counter({
      name: 'ferry_coordinator_migration_bytes_total',
      help: 'Bytes the source agents reported sending, by part (rootfs, pages, images)',
      labelNames: ['part'],
      registers: [this.registry],
    });
    new Gauge({
      name: 'ferry_coordinator_containers',
      help: 'Containers per host, from the last heartbeat',
      labelNames: ['host'],
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [host, count] of containersByHost()) this.set({ host }, count);
      },
    });
  }

  migrationFinished(outcome: string, downtimeMs: number | null): void {
    this.migrations.inc({ outcome });
    if (outcome === 'succeeded' && downtimeMs !== null) this.downtime.observe(downtimeMs / 1000);
  }

  /** A report a source agent returned (a failure before its end comes as an error, without one). */
  reported(report: Pick<MigrationReport, 'outcome' | 'totalMs' | 'bytes'>): void {
    // An in-doubt migration has not ended yet; its time so far would be wrong.
    if (report.outcome === 'succeeded') this.duration.observe(report.totalMs / 1000);
    for (const [part, value] of Object.entries(report.bytes)) this.bytes.inc({ part }, value);
  }
}
