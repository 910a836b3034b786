// The registered agents: one control connection each (reopened when it drops),
// an `info` poll every interval as the heartbeat, and the memory promised to
// migrations in flight towards each host.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { FerryError } from '../src/errors.ts';
import type { ContainerInfo } from '../src/protocol/container.ts';
import type { HostInfo } from '../src/protocol/host.ts';
import type { HostView } from '../src/protocol/coordinator.ts';
import { withTimeout } from '../src/timeout.ts';
import { AgentClient } from '../src/transport/client.ts';
import type { CandidateHost } from './placement.ts';
import type { HostRow, Store } from './store.ts';

const MISSED_LIMIT = 3;
const QUIET_MS = 5_000;
/**
 * How long agents get to finish or roll back a migration the coordinator is not
 * (or no longer) following: one it finds already running, one whose request
 * failed, one a dead coordinator left running. As long as the agents' own
 * migration timeout (10 minutes by default), so a slow but healthy migration
 * is not declared lost.
 */
export const SETTLE_TIMEOUT_MS = 10 * 60_000;

interface Liveness {
  missed: number;
  lastOkMs: number | undefined;
  polling: boolean;
}

export class HostPool {
  private readonly clients = new Map<string, Promise<AgentClient>>();
  private readonly liveness = new Map<string, Liveness>();
  private readonly promises = new Map<string, Array<{ container: string; memoryBytes: number; group: string | undefined }>>();
  private timer: NodeJS.Timeout | undefined;

  private readonly store: Store;
  private readonly logger: Logger;
  readonly intervalMs: number;

  constructor(store: Store, logger: Logger, intervalMs: number) {
    this.store = store;
    this.logger = logger;
    this.intervalMs = intervalMs;
  }

  get staleMs(): number {
    return this.intervalMs * MISSED_LIMIT;
  }

  /** Starts the heartbeats; resolves after the first round. */
  start(): Promise<void> {
    this.timer = setInterval(() => void this.pollAll(), this.intervalMs);
    return this.pollAll();
  }

  stop(): void {
    clearInterval(this.timer);
    for (const client of this.clients.values()) void client.then((c) => c.close(), () => undefined);
    this.clients.clear();
  }

  row(name: string): HostRow {
    const row = this.store.host(name);
    if (!row) throw new FerryError('NOT_FOUND', `no host named ${name} is registered`);
    return row;
  }

  isUp(name: string): boolean {
    const state = this.liveness.get(name);
    return !!state && state.lastOkMs !== undefined && state.missed < MISSED_LIMIT;
  }

  /** The shared control connection to a host, opened on first use. */
  client(name: string): Promise<AgentClient> {
    const existing = this.clients.get(name);
    if (existing) return existing;
    const opened = this.connect(name);
    this.clients.set(name, opened);
    opened.then(
      (client) => client.socket.once('close', () => this.clients.get(name) === opened && this.clients.delete(name)),
      () => this.clients.get(name) === opened && this.clients.delete(name),
    );
    return opened;
  }

  /** A connection of its own, e.g. for a migration: closing it cancels what runs on it. */
  connect(name: string): Promise<AgentClient> {
    const row = this.row(name);
    return AgentClient.connect({ url: row.url, token: row.token, peer: 'coordinator', name: 'coordinator', timeoutMs: this.intervalMs * 2 });
  }

  /** Polls one host now; returns its info or undefined when it did not answer. */
  async poll(name: string): Promise<HostInfo | undefined> {
    const state = this.state(name);
    try {
      const client = await this.client(name);
      const info = await withTimeout(client.request('info', {}), this.intervalMs * 2, 'the info request');
      this.store.recordHeartbeat(name, info);
      state.missed = 0;
      state.lastOkMs = Date.now();
      return info;
    } catch (error) {
      state.missed += 1;
      if (state.missed === MISSED_LIMIT) this.logger.warn({ host: name, err: error }, 'host down: missed heartbeats');
      return undefined;
    }
  }

  private async pollAll(): Promise<void> {
    await Promise.all(
      this.store.hosts().map(async (host) => {
        const state = this.state(host.name);
        if (state.polling) {
          state.missed += 1; // the previous poll still waits: this one is missed
          return;
        }
        state.polling = true;
        await this.poll(host.name).finally(() => (state.polling = false));
      }),
    );
  }

  private state(name: string): Liveness {
    let state = this.liveness.get(name);
    if (!state) {
      state = { missed: 0, lastOkMs: undefined, polling: false };
      this.liveness.set(name, state);
    }
    return state;
  }

  /** Containers a host runs, asked now (not from the last heartbeat). */
  async list(name: string): Promise<ContainerInfo[]> {
    const client = await this.client(name);
    return (await withTimeout(client.request('list', {}), 30_000, 'the list request')).containers;
  }

  /** Reserves room on a target while a migration towards it runs; returns the release. */
  promise(host: string, container: string, memoryBytes: number, group: string | undefined): () => void {
    const entry = { container, memoryBytes, group };
    this.promises.set(host, [...(this.promises.get(host) ?? []), entry]);
    return () => this.promises.set(host, (this.promises.get(host) ?? []).filter((other) => other !== entry));
  }

  private promised(host: string): NonNullable<CandidateHost['promised']> {
    const entries = this.promises.get(host) ?? [];
    return {
      memoryBytes: entries.reduce((sum, entry) => sum + entry.memoryBytes, 0),
      diskBytes: 0,
      groups: entries.flatMap((entry) => (entry.group === undefined ? [] : [entry.group])),
      containers: entries.map((entry) => entry.container),
    };
  }

  candidates(): CandidateHost[] {
    return this.store.hosts().map((row) => ({
      name: row.name,
      draining: row.draining,
      lastHeartbeatMs: this.liveness.get(row.name)?.lastOkMs,
      info: row.info,
      memoryLimitBytes: row.memoryLimitBytes,
      promised: this.promised(row.name),
    }));
  }

  views(): HostView[] {
    return this.store.hosts().map((row) => ({
      name: row.name,
      url: row.url,
      labels: row.labels,
      draining: row.draining,
      up: this.isUp(row.name),
      lastHeartbeat: row.lastHeartbeat ?? null,
      info: row.info ?? null,
    }));
  }

  containersByHost(): Map<string, number> {
    return new Map(this.store.hosts().map((row) => [row.name, row.info?.containers.length ?? 0]));
  }
}

export type Whereabouts = 'target' | 'source' | 'neither';

/**
 * Where a container of an interrupted or failed migration runs, once neither
 * agent reports it `migrating` any more (they finish or roll back on their
 * own; acting earlier would race them). A running copy on the target means
 * the source committed: only the source decides, and its own copy may still
 * be in clean-up.
 */
export async function whereNow(pool: HostPool, container: string, source: string, target: string, timeoutMs: number): Promise<Whereabouts> {
  const deadline = Date.now() + timeoutMs;
  let quietSince: number | undefined;
  for (;;) {
    const [onSource, onTarget] = await Promise.all(
      [source, target].map(async (host) => (await pool.list(host).catch(() => undefined))?.find((entry) => entry.name === container) ?? null),
    );
    if (onTarget?.status === 'running') return 'target';
    if (onSource?.status === 'running') return 'source';
    // Unreachable or mid-migration: wait. Settled elsewhere (stopped, gone) for a few
    // seconds: that is the answer (a copy being resumed is only briefly not running).
    const settled = onSource !== undefined && onTarget !== undefined && onSource?.status !== 'migrating' && onTarget?.status !== 'migrating';
    quietSince = settled ? (quietSince ?? Date.now()) : undefined;
    if (Date.now() > deadline || (quietSince !== undefined && Date.now() - quietSince > QUIET_MS)) return 'neither';
    await sleep(500);
  }
}
