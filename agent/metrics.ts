import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { MigrationReport } from '../src/protocol/migration.ts';

/** The agent's Prometheus metrics, served at /metrics. */
export class AgentMetrics {
  readonly registry = new Registry();
  private readonly migrations: Counter<'role' | 'outcome'>;
  private readonly downtime: Histogram;
  private readonly duration: Histogram;
  private readonly bytes: Counter<'part'>;
  readonly containers: Gauge<'host'>;

  constructor(hostName: string, countContainers: () => Promise<number>) {
    collectDefaultMetrics({ register: this.registry, prefix: 'ferry_agent_' });
    this.migrations = new Counter({
      name: 'ferry_migrations_total',
      help: 'Migrations by role and outcome',
      labelNames: ['role', 'outcome'],
      registers: [this.registry],
    });
    this.downtime = new Histogram({
      name: 'ferry_migration_downtime_seconds',
      help: 'From freeze on the source to running on the destination',
      buckets: [0.05, 0.1, 0.15, 0.3, 0.5, 1, 2, 5, 10, 30],
      registers: [this.registry],
    });
    this.duration = new Histogram({
      name: 'ferry_migration_duration_seconds',
      help: 'Whole migration, preflight to cleanup',
      buckets: [0.1, 0.5, 1, 2, 5, 10, 30, 60, 300],
      registers: [this.registry],
    });
    this.bytes = new Counter({
      name: 'ferry_migration_bytes_total',
      help: 'Bytes sent by outgoing migrations, by part',
      labelNames: ['part'],
      registers: [this.registry],
    });
    this.containers = new Gauge({
      name: 'ferry_containers',
      help: 'Containers on this host',
      // Labelled with the agent's name, so series from several agents line up with the coordinator's.
      labelNames: ['host'],
      registers: [this.registry],
      async collect() {
        this.set({ host: hostName }, await countContainers());
      },
    });
  }

  /** A source migration that reached the decision: succeeded, or committed but not yet confirmed (in-doubt). */
  migrationEnded(report: MigrationReport): void {
    this.migrations.inc({ role: 'source', outcome: report.outcome });
    for (const [part, value] of Object.entries(report.bytes)) this.bytes.inc({ part }, value);
    // An in-doubt migration's end is not known yet: its times would be wrong.
    if (report.outcome !== 'succeeded') return;
    this.downtime.observe(report.downtimeMs / 1000);
    this.duration.observe(report.totalMs / 1000);
  }

  migrationFailed(role: 'source' | 'destination', outcome: 'rolled-back' | 'refused' = 'rolled-back'): void {
    this.migrations.inc({ role, outcome });
  }

  incomingSucceeded(): void {
    this.migrations.inc({ role: 'destination', outcome: 'succeeded' });
  }
}
