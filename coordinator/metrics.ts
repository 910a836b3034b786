import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** The coordinator's Prometheus metrics, served at /metrics. */
export class CoordinatorMetrics {
  readonly registry = new Registry();
  private readonly migrations: Counter<'outcome'>;
  private readonly downtime: Histogram;

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
}
