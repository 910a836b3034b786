// Test helpers for the coordinator's end-to-end test (test/coordinator.test.ts):
// the coordinator as a child process, its API and SSE stream, and a fake agent.
import { spawn, type ChildProcess } from 'node:child_process';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { WebSocketServer } from 'ws';
import type { CoordinatorEvent } from '../../src/protocol/coordinator.ts';
import { protocolVersion } from '../../src/protocol/messages.ts';

const MAIN = join(import.meta.dirname, '..', '..', 'coordinator', 'main.ts');
const MiB = 1024 * 1024;

/** One coordinator across restarts, on the same database file. */
export class CoordinatorProcess {
  url = '';
  readonly token: string;
  lines: string[] = [];
  private child: ChildProcess | undefined;
  private readonly args: string[];

  constructor(args: string[], token: string) {
    this.args = args;
    this.token = token;
  }

  async start(): Promise<void> {
    const child = spawn(process.execPath, [MAIN, ...this.args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    createInterface({ input: child.stderr! }).on('line', (line) => this.lines.push(line));
    const lines = createInterface({ input: child.stdout! });
    this.url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`coordinator did not start:\n${this.lines.join('\n')}`)), 20_000);
      child.once('exit', (code) => reject(new Error(`coordinator exited with ${code}:\n${this.lines.join('\n')}`)));
      lines.on('line', (line) => {
        this.lines.push(line);
        const url = /"msg":"coordinator listening"/.test(line) ? (JSON.parse(line) as { url: string }).url : undefined;
        if (url) {
          clearTimeout(timer);
          resolve(url);
        }
      });
    });
  }

  async kill(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill(signal);
    await exited;
  }
}

export async function api<T>(coordinator: CoordinatorProcess, method: string, path: string, body?: unknown, token = coordinator.token): Promise<{ status: number; body: T }> {
  const response = await fetch(`${coordinator.url}${path}`, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), 'content-type': 'application/json' },
    ...(body === undefined ? {} : { body: typeof body === 'string' ? body : JSON.stringify(body) }),
  });
  return { status: response.status, body: (await response.json()) as T };
}

/** Collects the SSE stream; `close()` ends it. `onEvent` sees each event as it arrives (to act on one at once). */
export function followEvents(
  coordinator: CoordinatorProcess,
  onEvent: (event: CoordinatorEvent) => void = () => undefined,
): { events: CoordinatorEvent[]; ready: Promise<void>; close: () => void } {
  const events: CoordinatorEvent[] = [];
  let close = () => undefined as void;
  const ready = new Promise<void>((resolve, reject) => {
    const request = httpRequest(`${coordinator.url}/v1/events`, { headers: { authorization: `Bearer ${coordinator.token}` } }, (response) => {
      resolve();
      // Ends with an error when close() destroys it or the coordinator is killed: expected.
      response.on('error', () => undefined);
      const lines = createInterface({ input: response });
      lines.on('error', () => undefined);
      lines.on('line', (line) => {
        if (!line.startsWith('data: ')) return;
        const event = JSON.parse(line.slice(6)) as CoordinatorEvent;
        events.push(event);
        onEvent(event);
      });
    });
    request.on('error', (error) => (events.length ? undefined : reject(error)));
    request.end();
    close = () => request.destroy();
  });
  return { events, ready, close: () => close() };
}

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** GETs a Prometheus endpoint (coordinator or agent) with a Bearer token and parses its samples. */
export async function scrape(url: string, token: string): Promise<Sample[]> {
  const response = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
  if (!response.ok) throw new Error(`GET ${url}: HTTP ${response.status}`);
  const samples: Sample[] = [];
  for (const line of (await response.text()).split('\n')) {
    const match = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match) continue; // # HELP, # TYPE, blank
    const labels = Object.fromEntries([...(match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((label) => [label[1]!, label[2]!]));
    samples.push({ name: match[1]!, labels, value: Number(match[3]) });
  }
  return samples;
}

/** The value of the one sample of `name` whose labels include `labels`; undefined when there is none. */
export function sampleValue(samples: Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  const found = samples.filter((sample) => sample.name === name && Object.entries(labels).every(([key, value]) => sample.labels[key] === value));
  if (found.length > 1) throw new Error(`${found.length} samples of ${name} match ${JSON.stringify(labels)}`);
  return found[0]?.value;
}

/** The most migrations that were running at one time, from started/finished events. */
export function maxConcurrent(events: CoordinatorEvent[]): number {
  let running = 0;
  let most = 0;
  for (const event of events) {
    if (event.type === 'migration-started') most = Math.max(most, ++running);
    if (event.type === 'migration-finished' && event.migration.startedAt) running -= 1;
  }
  return most;
}

/**
 * An "agent" that answers hello/info/list as the least loaded host there is,
 * and hangs up on any migration offered to it: placement picks it first, the
 * migration to it fails, and the coordinator must retry elsewhere.
 */
export async function startRefusingAgent(address: string): Promise<{ url: string; close: () => Promise<void> }> {
  const server = new WebSocketServer({ host: address, port: 0 });
  await new Promise((resolve) => server.once('listening', resolve));
  const info = {
    name: 'refuser', kernel: '6.1', criu: { path: '/criu', version: '99.0' }, capabilities: [],
    capacity: { memoryBytes: 64 * 1024 * MiB, memoryAvailableBytes: 64 * 1024 * MiB, cpus: 64, diskFreeBytes: 1024 * 1024 * MiB },
    containers: [], migrations: 0,
  };
  server.on('connection', (socket) => {
    socket.on('message', (data) => {
      const message = JSON.parse(data.toString()) as { type: string; id?: string };
      const reply = (result: unknown) => socket.send(JSON.stringify({ type: 'result', id: message.id, result }));
      if (message.type === 'hello') socket.send(JSON.stringify({ type: 'hello', version: protocolVersion, peer: 'agent', name: 'refuser' }));
      else if (message.type === 'info') reply(info);
      else if (message.type === 'list') reply({ containers: [] });
      else socket.terminate(); // an offer from a source agent, or anything else
    });
  });
  const port = (server.address() as { port: number }).port;
  const close = () =>
    new Promise<void>((resolve) => {
      for (const client of server.clients) client.terminate();
      server.close(() => resolve());
    });
  return { url: `ws://${address}:${port}`, close };
}
