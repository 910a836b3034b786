// Durable coordinator state in SQLite (node:sqlite). Every decision is written
// here before it is acted on, so a restarted coordinator knows what it was doing.
import { randomUUID } from 'node:crypto';
import { DatabaseSync, type SQLInputValue } from 'node:sqlite';
import { hostInfoSchema, type HostInfo } from '../src/protocol/host.ts';
import type { EvacuationView, MigrationState, MigrationView } from '../src/protocol/coordinator.ts';

const schema = `
CREATE TABLE IF NOT EXISTS hosts (
  name TEXT PRIMARY KEY, url TEXT NOT NULL, token TEXT NOT NULL, labels TEXT NOT NULL DEFAULT '{}',
  memory_limit INTEGER, draining INTEGER NOT NULL DEFAULT 0, last_heartbeat TEXT, info TEXT);
CREATE TABLE IF NOT EXISTS migrations (
  id TEXT PRIMARY KEY, container TEXT NOT NULL, source TEXT NOT NULL, target TEXT,
  state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 1, error TEXT, downtime_ms REAL,
  evacuation_id TEXT, started_at TEXT, finished_at TEXT, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evacuations (
  id TEXT PRIMARY KEY, host TEXT NOT NULL, state TEXT NOT NULL, parallel INTEGER NOT NULL,
  targets TEXT, undo_of TEXT, unplaced TEXT NOT NULL DEFAULT '[]', created_at TEXT NOT NULL, finished_at TEXT);
CREATE TABLE IF NOT EXISTS origins (
  evacuation_id TEXT NOT NULL, container TEXT NOT NULL, origin TEXT NOT NULL,
  PRIMARY KEY (evacuation_id, container));
`;

export interface HostRow {
  name: string;
  url: string;
  token: string;
  labels: Record<string, string>;
  memoryLimitBytes: number | undefined;
  draining: boolean;
  lastHeartbeat: string | undefined;
  info: HostInfo | undefined;
}

export type MigrationRow = MigrationView;

export interface EvacuationRow extends Omit<EvacuationView, 'migrations'> {}

type Row = Record<string, SQLInputValue>;
const now = () => new Date().toISOString();
const text = (value: SQLInputValue): string | null => (value === null ? null : String(value));

export class Store {
  private readonly db: DatabaseSync;
  private seq = 0;

  constructor(file: string) {
    this.db = new DatabaseSync(file);
    // WAL + synchronous=FULL: every committed step survives a SIGKILL.
    this.db.exec('PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;');
    this.db.exec(schema);
    this.seq = Number((this.get('SELECT COALESCE(MAX(seq), 0) AS seq FROM migrations') ?? { seq: 0 }).seq);
  }

  close(): void {
    this.db.close();
  }

  private get(sql: string, ...params: SQLInputValue[]): Row | undefined {
    return this.db.prepare(sql).get(...params) as Row | undefined;
  }

  private all(sql: string, ...params: SQLInputValue[]): Row[] {
    return this.db.prepare(sql).all(...params) as Row[];
  }

  private run(sql: string, ...params: SQLInputValue[]): number {
    return Number(this.db.prepare(sql).run(...params).changes);
  }

  // ---- hosts

  upsertHost(host: { name: string; url: string; token: string; labels: Record<string, string>; memoryLimitBytes?: number | undefined }): void {
    this.run(
      `INSERT INTO hosts (name, url, token, labels, memory_limit) VALUES (?, ?, ?, ?, ?)
       ON CONFLICT(name) DO UPDATE SET url = excluded.url, token = excluded.token, labels = excluded.labels, memory_limit = excluded.memory_limit`,
      host.name, host.url, host.token, JSON.stringify(host.labels), host.memoryLimitBytes ?? null,
    );
  }

  hosts(): HostRow[] {
    return this.all('SELECT * FROM hosts ORDER BY name').map(toHost);
  }

  host(name: string): HostRow | undefined {
    const row = this.get('SELECT * FROM hosts WHERE name = ?', name);
    return row ? toHost(row) : undefined;
  }

  setDraining(name: string, draining: boolean): void {
    this.run('UPDATE hosts SET draining = ? WHERE name = ?', draining ? 1 : 0, name);
  }

  recordHeartbeat(name: string, info: HostInfo): void {
    this.run('UPDATE hosts SET last_heartbeat = ?, info = ? WHERE name = ?', now(), JSON.stringify(info), name);
  }

  // ---- migrations

  createMigration(fields: { container: string; source: string; target: string | null; attempt?: number; evacuationId?: string | null }): MigrationRow {
    const id = randomUUID();
    this.seq += 1;
    this.run(
      `INSERT INTO migrations (id, container, source, target, state, attempt, evacuation_id, seq) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)`,
      id, fields.container, fields.source, fields.target, fields.attempt ?? 1, fields.evacuationId ?? null, this.seq,
    );
    return this.migration(id)!;
  }

  migration(id: string): MigrationRow | undefined {
    const row = this.get('SELECT * FROM migrations WHERE id = ?', id);
    return row ? toMigration(row) : undefined;
  }

  migrations(filter: { evacuationId?: string; unfinished?: boolean } = {}): MigrationRow[] {
    const where: string[] = [];
    const params: SQLInputValue[] = [];
    if (filter.evacuationId) {
      where.push('evacuation_id = ?');
      params.push(filter.evacuationId);
    }
    if (filter.unfinished) where.push(`state IN ('pending', 'running')`);
    const clause = where.length ? `WHERE ${where.join(' AND ')}` : '';
    return this.all(`SELECT * FROM migrations ${clause} ORDER BY seq`, ...params).map(toMigration);
  }

  markMigrationRunning(id: string, target: string): void {
    this.run(`UPDATE migrations SET state = 'running', target = ?, started_at = ? WHERE id = ?`, target, now(), id);
  }

  finishMigration(id: string, state: Exclude<MigrationState, 'pending' | 'running'>, fields: { error?: string; downtimeMs?: number } = {}): MigrationRow {
    this.run(
      'UPDATE migrations SET state = ?, error = ?, downtime_ms = ?, finished_at = ? WHERE id = ?',
      state, fields.error ?? null, fields.downtimeMs ?? null, now(), id,
    );
    return this.migration(id)!;
  }

  // ---- evacuations

  createEvacuation(fields: { host: string; parallel: number; targets?: string[] | undefined; undoOf?: string }): EvacuationRow {
    const id = randomUUID();
    this.run(
      `INSERT INTO evacuations (id, host, state, parallel, targets, undo_of, created_at) VALUES (?, ?, 'running', ?, ?, ?, ?)`,
      id, fields.host, fields.parallel, fields.targets ? JSON.stringify(fields.targets) : null, fields.undoOf ?? null, now(),
    );
    return this.evacuation(id)!;
  }

  evacuation(id: string): EvacuationRow | undefined {
    const row = this.get('SELECT * FROM evacuations WHERE id = ?', id);
    return row ? toEvacuation(row) : undefined;
  }

  evacuations(filter: { running?: boolean } = {}): EvacuationRow[] {
    const clause = filter.running ? `WHERE state = 'running'` : '';
    return this.all(`SELECT * FROM evacuations ${clause} ORDER BY created_at`).map(toEvacuation);
  }

  /** Records why a container stayed behind, or (reason undefined) that it no longer did. */
  addUnplaced(id: string, container: string, reason: string | undefined): void {
    const current = this.evacuation(id);
    if (!current) return;
    const others = current.unplaced.filter((entry) => entry.container !== container);
    const unplaced = reason === undefined ? others : [...others, { container, reason }];
    this.run('UPDATE evacuations SET unplaced = ? WHERE id = ?', JSON.stringify(unplaced), id);
  }

  finishEvacuation(id: string, state: 'finished' | 'failed'): EvacuationRow {
    this.run('UPDATE evacuations SET state = ?, finished_at = ? WHERE id = ?', state, now(), id);
    return this.evacuation(id)!;
  }

  // ---- origins: where each evacuated container came from, for undo

  recordOrigin(evacuationId: string, container: string, origin: string): void {
    this.run('INSERT OR IGNORE INTO origins (evacuation_id, container, origin) VALUES (?, ?, ?)', evacuationId, container, origin);
  }

  origins(evacuationId: string): Array<{ container: string; origin: string }> {
    return this.all('SELECT container, origin FROM origins WHERE evacuation_id = ? ORDER BY container', evacuationId).map((row) => ({
      container: String(row.container),
      origin: String(row.origin),
    }));
  }
}

function toHost(row: Row): HostRow {
  const info = row.info === null ? undefined : hostInfoSchema.safeParse(JSON.parse(String(row.info)));
  return {
    name: String(row.name),
    url: String(row.url),
    token: String(row.token),
    labels: JSON.parse(String(row.labels)) as Record<string, string>,
    memoryLimitBytes: row.memory_limit === null ? undefined : Number(row.memory_limit),
    draining: Number(row.draining) === 1,
    lastHeartbeat: text(row.last_heartbeat ?? null) ?? undefined,
    info: info?.success ? info.data : undefined,
  };
}

function toMigration(row: Row): MigrationRow {
  return {
    id: String(row.id),
    container: String(row.container),
    source: String(row.source),
    target: text(row.target ?? null),
    state: String(row.state) as MigrationState,
    attempt: Number(row.attempt),
    error: text(row.error ?? null),
    downtimeMs: row.downtime_ms === null ? null : Number(row.downtime_ms),
    evacuationId: text(row.evacuation_id ?? null),
    startedAt: text(row.started_at ?? null),
    finishedAt: text(row.finished_at ?? null),
  };
}

function toEvacuation(row: Row): EvacuationRow {
  return {
    id: String(row.id),
    host: String(row.host),
    state: String(row.state) as EvacuationRow['state'],
    parallel: Number(row.parallel),
    targets: row.targets === null ? null : (JSON.parse(String(row.targets)) as string[]),
    undoOf: text(row.undo_of ?? null),
    createdAt: String(row.created_at),
    finishedAt: text(row.finished_at ?? null),
    unplaced: JSON.parse(String(row.unplaced)) as Array<{ container: string; reason: string }>,
  };
}
