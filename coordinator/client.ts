// A small client of the coordinator's API, for the CLI (`ferry evacuate`, `ferry hosts`).
import { setTimeout as sleep } from 'node:timers/promises';
import { FerryError, fromWire } from '../src/errors.ts';
import { formatBytes, table } from '../src/format.ts';
import { errorBodySchema } from '../src/protocol/errors.ts';
import {
  apiAnswerSchemas,
  type EvacuationBody,
  type EvacuationView,
  type HostView,
} from '../src/protocol/coordinator.ts';

export class CoordinatorClient {
  private readonly url: string;
  private readonly token: string;

  constructor(url: string, token: string) {
    this.url = url.replace(/\/$/, '');
    this.token = token;
  }

  async hosts(): Promise<HostView[]> {
    return apiAnswerSchemas.hosts.parse(await this.call('GET', '/v1/hosts')).hosts;
  }

  /** Makes a host schedulable again after an evacuation (nothing moves back). */
  async undrain(host: string): Promise<HostView> {
    return apiAnswerSchemas.host.parse(await this.call('POST', `/v1/hosts/${encodeURIComponent(host)}/undrain`)).host;
  }

  async evacuate(body: Partial<EvacuationBody> & { host: string }): Promise<EvacuationView> {
    return this.evacuationOf(await this.call('POST', '/v1/evacuations', body));
  }

  async undo(id: string): Promise<EvacuationView> {
    return this.evacuationOf(await this.call('POST', `/v1/evacuations/${id}/undo`));
  }

  async evacuation(id: string): Promise<EvacuationView> {
    return this.evacuationOf(await this.call('GET', `/v1/evacuations/${id}`));
  }

  /** The latest finished evacuation of a host that is not itself an undo. */
  async lastEvacuation(host: string): Promise<string> {
    const { evacuations } = apiAnswerSchemas.evacuations.parse(await this.call('GET', '/v1/evacuations'));
    const last = evacuations.filter((entry) => entry.host === host && !entry.undoOf && entry.state !== 'running').at(-1);
    if (!last) throw new FerryError('NOT_FOUND', `no finished evacuation of ${host} to undo`);
    return last.id;
  }

  /** Polls until the evacuation ends, calling onChange whenever a migration changes state. */
  async wait(id: string, onChange: (view: EvacuationView) => void = () => undefined): Promise<EvacuationView> {
    let seen = '';
    for (;;) {
      const view = await this.evacuation(id);
      const signature = view.migrations.map((migration) => migration.state).join();
      if (signature !== seen) onChange(view);
      seen = signature;
      if (view.state !== 'running') return view;
      await sleep(1_000);
    }
  }

  private evacuationOf(body: unknown): EvacuationView {
    return apiAnswerSchemas.evacuation.parse(body).evacuation;
  }

  private async call(method: string, path: string, body?: unknown): Promise<unknown> {
    let response: Response;
    try {
      response = await fetch(`${this.url}${path}`, {
        method,
        headers: { authorization: `Bearer ${this.token}`, 'content-type': 'application/json' },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
    } catch (cause) {
      throw new FerryError('PEER_GONE', `cannot reach the coordinator at ${this.url}: ${(cause as Error).message}`, { cause });
    }
    const parsed: unknown = await response.json().catch(() => undefined);
    if (response.ok) return parsed;
    const answer = errorBodySchema.safeParse(parsed);
    if (!answer.success) throw new FerryError('BAD_MESSAGE', `coordinator answered HTTP ${response.status}`);
    const { error } = answer.data;
    throw fromWire({ ...error, message: error.field ? `${error.message} (${error.field})` : error.message });
  }
}

/** container, outcome, target, downtime, time: one row per container. */
export function evacuationTable(view: EvacuationView): string {
  const latest = new Map(view.migrations.map((migration) => [migration.container, migration]));
  const rows = [...latest.values()].map((migration) => {
    const time = migration.startedAt && migration.finishedAt ? Date.parse(migration.finishedAt) - Date.parse(migration.startedAt) : undefined;
    return [
      migration.container,
      migration.state + (migration.attempt > 1 ? ` (attempt ${migration.attempt})` : ''),
      migration.target ?? '',
      migration.downtimeMs === null ? '' : `${migration.downtimeMs.toFixed(0)} ms`,
      time === undefined ? '' : `${(time / 1000).toFixed(1)} s`,
    ];
  });
  for (const entry of view.unplaced) if (!latest.has(entry.container)) rows.push([entry.container, `stayed: ${entry.reason}`, '', '', '']);
  return table(['CONTAINER', 'OUTCOME', 'TARGET', 'DOWNTIME', 'TIME'], rows);
}

export function hostsTable(hosts: HostView[]): string {
  return table(
    ['HOST', 'UP', 'DRAINING', 'CONTAINERS', 'MEM FREE', 'CRIU', 'URL'],
    hosts.map((host) => [
      host.name,
      host.up ? 'yes' : 'NO',
      host.draining ? 'yes' : '',
      String(host.info?.containers.length ?? ''),
      host.info ? formatBytes(host.info.capacity.memoryAvailableBytes) : '',
      host.info?.criu?.version ?? '',
      host.url,
    ]),
  );
}
