// Helpers for the fault tests (link cuts, killed agents): a seeded random
// source, the live copies of a memload workload as the kernel sees them
// (processes and cgroup trees, not what the agents say), and a wait for the
// two hosts to settle on exactly one copy.
import { chmod, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorCodes, FerryError, phases } from '../../src/errors.ts';
import type { MigrationReport } from '../../src/protocol/migration.ts';
import { execa } from 'execa';
import { readBuildEnv } from '../../lab/agents.ts';
import type { Cluster } from '../../lab/hosts.ts';
import { cgroupChildren, reconnect, stagedImages, tracesOf, type Node } from './migration.ts';
import { poll } from './workloads.ts';

/** How long an abandoned migration may take to be settled once the fault is over (link back, agent restarted). */
export const SETTLE_MS = 30_000;

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export type Outcome = { report: MigrationReport; error?: undefined } | { report?: undefined; error: unknown };

/** Whatever a migration ends with, without throwing; `settledAt` is when it ended. */
export async function outcomeOf(promise: Promise<MigrationReport>): Promise<Outcome & { settledAt: number }> {
  return promise.then(
    (report) => ({ report, settledAt: Date.now() }),
    (error: unknown) => ({ error, settledAt: Date.now() }),
  );
}

/** A typed ferry error that names a known code and phase. */
export function isTypedError(error: unknown): error is FerryError {
  return (
    error instanceof FerryError &&
    (errorCodes as readonly string[]).includes(error.code) &&
    error.phase !== undefined &&
    (phases as readonly string[]).includes(error.phase)
  );
}

export function describeOutcome(outcome: Outcome): string {
  if (outcome.report) return `${outcome.report.outcome} in ${outcome.report.totalMs} ms`;
  const error = outcome.error;
  if (error instanceof FerryError) return `${error.code} in ${error.phase ?? '(no phase)'}: ${error.message}`;
  return `non-ferry error: ${String(error)}`;
}

/**
 * Host pids of every memload process started as `/bin/memload --mib <mib> --seed <seed>`
 * (not zombies), wherever it runs: the seed makes them this test's.
 */
export async function memloadCopies(mib: number, seed: number): Promise<number[]> {
  const wanted = ['/bin/memload', '--mib', String(mib), '--seed', String(seed)].join('\0');
  const pids: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.replace(/\0$/, '') !== wanted) continue;
    const stat = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '');
    if (!stat || stat.includes(') Z ')) continue;
    pids.push(Number(entry));
  }
  return pids;
}

/** The cgroup (v2 path) of a process, as /proc says. */
export async function cgroupOf(pid: number): Promise<string | undefined> {
  const text = await readFile(`/proc/${pid}/cgroup`, 'utf8').catch(() => '');
  return /^0::(.*)$/m.exec(text)?.[1];
}

export interface CgroupState {
  populated: boolean;
  frozen: boolean;
  procs: number[];
}

export async function cgroupState(node: Node, name: string): Promise<CgroupState | undefined> {
  const dir = join(node.host.cgroupRoot, name);
  const events = await readFile(join(dir, 'cgroup.events'), 'utf8').catch(() => undefined);
  if (events === undefined) return undefined;
  const procs = (await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => ''))
    .split('\n')
    .filter(Boolean)
    .map(Number);
  return { populated: /populated 1/.test(events), frozen: /frozen 1/.test(events), procs };
}

/** One host's view, for error messages: what the agent lists and what the kernel holds. */
export async function snapshotOf(node: Node, name: string): Promise<Record<string, unknown>> {
  const list = await node.client.request('list', {}).catch((error: unknown) => ({ error: String(error) }));
  return {
    host: node.host.name,
    list: 'containers' in list ? list.containers.map((c) => [c.name, c.status, c.pid]) : list,
    cgroupChildren: await cgroupChildren(node.host),
    cgroup: await cgroupState(node, name),
    stagedImages: await stagedImages(node.host),
    journals: await journalsOf(node),
  };
}

export interface JournalSummary {
  migrationId: string;
  role: string;
  state: string;
  error?: string;
}

/** Every migration journal on the host (read from disk, not asked of the agent). */
export async function journalsOf(node: Node): Promise<JournalSummary[]> {
  const root = join(node.host.stateDir, 'migrations');
  const out: JournalSummary[] = [];
  for (const id of await readdir(root).catch(() => [] as string[])) {
    const text = await readFile(join(root, id, 'journal.json'), 'utf8').catch(() => undefined);
    if (!text) continue;
    try {
      const entry = JSON.parse(text) as JournalSummary;
      out.push({ migrationId: entry.migrationId, role: entry.role, state: entry.state, ...(entry.error ? { error: entry.error } : {}) });
    } catch {
      // being rewritten; the next poll sees it
    }
  }
  return out;
}

export async function journalState(node: Node, migrationId: string): Promise<string | undefined> {
  return (await journalsOf(node)).find((entry) => entry.migrationId === migrationId)?.state;
}

/** True when the node holds nothing of the container and no other cgroup child. */
async function isClean(node: Node, name: string): Promise<boolean> {
  const traces = await tracesOf(node, name);
  const children = await cgroupChildren(node.host);
  return !traces.listed && !traces.cgroup && !traces.stateDir && !traces.images.length && !children.length;
}

/** True when the node runs the container (listed running, not frozen) and keeps nothing else. */
async function isRunningOnly(node: Node, name: string): Promise<boolean> {
  const { containers } = await node.client.request('list', {});
  const listed = containers.filter((container) => container.name === name);
  if (containers.length !== 1 || listed.length !== 1 || listed[0]!.status !== 'running') return false;
  const cgroup = await cgroupState(node, name);
  if (!cgroup?.populated || cgroup.frozen) return false;
  if ((await stagedImages(node.host)).length) return false;
  return (await cgroupChildren(node.host)).join(',') === name;
}

/**
 * Waits (until `deadline`, a Date.now() value) for the two nodes to settle:
 * one runs the container and keeps nothing else, the other keeps nothing.
 * Returns [holder, other]; throws with both hosts' state when time is up.
 */
export async function waitForOneCopy(nodes: [Node, Node], name: string, deadline: number): Promise<[Node, Node]> {
  const [x, y] = nodes;
  try {
    return await poll(`one of ${x.host.name}, ${y.host.name} to run ${name} and the other to hold nothing`, Math.max(0, deadline - Date.now()), async () => {
      if ((await isRunningOnly(x, name)) && (await isClean(y, name))) return [x, y] as [Node, Node];
      if ((await isRunningOnly(y, name)) && (await isClean(x, name))) return [y, x] as [Node, Node];
      return undefined;
    });
  } catch (error) {
    const state = [await snapshotOf(x, name), await snapshotOf(y, name)];
    throw new Error(`${(error as Error).message}; state: ${JSON.stringify(state)}`);
  }
}

/**
 * Checks, from the kernel's side, that exactly one copy of the memload lives:
 * one process with its command line anywhere on the machine, in the holder's
 * cgroup for the container, which is thawed; the other host has no cgroup
 * child at all. Returns a list of problems (empty when all is well).
 */
export async function liveCopyProblems(holder: Node, other: Node, name: string, mib: number, seed: number): Promise<string[]> {
  const problems: string[] = [];
  const copies = await memloadCopies(mib, seed);
  if (copies.length !== 1) problems.push(`${copies.length} memload processes (seed ${seed}) alive: ${copies.join(', ')}`);
  const { containers } = await holder.client.request('list', {});
  const pid = containers.find((container) => container.name === name)?.pid;
  if (!pid || !copies.includes(pid)) problems.push(`${holder.host.name} lists ${name} with pid ${pid}, live memload pids are [${copies.join(', ')}]`);
  if (pid) {
    const cgroup = await cgroupOf(pid);
    if (!cgroup?.endsWith(`/${holder.host.cgroupName}/${name}`)) problems.push(`pid ${pid} is in cgroup ${cgroup}, not ${holder.host.cgroupName}/${name}`);
  }
  const state = await cgroupState(holder, name);
  if (!state?.populated || state.frozen) problems.push(`${holder.host.name}'s cgroup of ${name}: ${JSON.stringify(state)}`);
  const elsewhere = await cgroupChildren(other.host);
  if (elsewhere.length) problems.push(`${other.host.name} still has cgroups ${elsewhere.join(', ')}`);
  return problems;
}

/** A new client for the node; retried, since a link just brought up may take a moment to carry traffic. */
export async function reconnectSoon(node: Node, timeoutMs = 15_000): Promise<void> {
  await poll(`a new connection to ${node.host.name}`, timeoutMs, async () => {
    await reconnect(node);
    return true;
  });
}

/** SIGKILLs the agent (its containers stay), starts it again with the same arguments and token, and reconnects. */
export async function killAndRestart(node: Node): Promise<void> {
  await node.agent.kill('SIGKILL');
  await restartKilled(node);
}

export async function restartKilled(node: Node): Promise<void> {
  await node.agent.restart();
  await reconnectSoon(node);
}

/** Cuts the node's link for `downMs`, then brings it up; returns when it went down and came back. */
export async function cutLink(node: Node, downMs: number): Promise<{ downAt: number; upAt: number }> {
  await node.host.setLinkDown();
  const downAt = Date.now();
  try {
    await sleep(downMs);
  } finally {
    await node.host.setLinkUp();
  }
  return { downAt, upAt: Date.now() };
}

/**
 * A CRIU for one agent that sleeps `delayMs` before every `criu restore`
 * (and is CRIU otherwise): a wide, reliable window in which the destination
 * is restoring, so a fault can land between `transfer-complete` and `prepared`.
 */
export async function slowRestoreCriu(delayMs: number): Promise<{ path: string; remove: () => Promise<void> }> {
  const criu = (await readBuildEnv()).FERRY_CRIU ?? process.env.FERRY_CRIU;
  if (!criu) throw new Error('no FERRY_CRIU in .build/env');
  const dir = await mkdtemp(join(tmpdir(), 'ferry-slow-criu-'));
  const path = join(dir, 'criu');
  const seconds = (delayMs / 1000).toFixed(3);
  await writeFile(path, `#!/bin/sh\nif [ "$1" = restore ]; then sleep ${seconds}; fi\nexec '${criu}' "$@"\n`);
  await chmod(dir, 0o755);
  await chmod(path, 0o755);
  return { path, remove: () => rm(dir, { recursive: true, force: true }) };
}

/**
 * Cuts `node` off in the middle of the path for `downMs`: the switch drops
 * every frame to or from its port, while both ends' own links stay up (so
 * each end's TCP backs off as across a failed switch, unlike cutLink, where
 * the destination's own sends fail at once and are retried every 0.5 s).
 */
export async function cutOnSwitch(cluster: Cluster, node: Node, downMs: number): Promise<{ downAt: number; upAt: number }> {
  const table = `ferry_cut_${node.host.switchPort.replace(/[^a-zA-Z0-9_]/g, '_')}`;
  const port = node.host.switchPort;
  const rules = `table bridge ${table} {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    iifname "${port}" drop\n    oifname "${port}" drop\n  }\n}\n`;
  await execa('ip', ['netns', 'exec', cluster.switchNetns, 'nft', '-f', '-'], { input: rules });
  const downAt = Date.now();
  try {
    await sleep(downMs);
  } finally {
    await execa('ip', ['netns', 'exec', cluster.switchNetns, 'nft', 'delete', 'table', 'bridge', table]);
  }
  return { downAt, upAt: Date.now() };
}

/**
 * Resets `from`'s established TCP connections to `to`'s agent for `ms`:
 * each packet `from` sends on one is answered, locally, with an RST. The
 * link stays up and new connections work once it ends: connections broken,
 * not cut.
 */
export async function resetConnections(from: Node, to: Node, ms: number): Promise<void> {
  const { hostname, port } = new URL(to.agent.url);
  const table = 'ferry_reset';
  const rules = `table inet ${table} {\n  chain output {\n    type filter hook output priority 0; policy accept;\n    ip daddr ${hostname} tcp dport ${port} ct state established reject with tcp reset\n  }\n}\n`;
  await execa('ip', ['netns', 'exec', from.host.netns, 'nft', '-f', '-'], { input: rules });
  try {
    await sleep(ms);
  } finally {
    await execa('ip', ['netns', 'exec', from.host.netns, 'nft', 'delete', 'table', 'inet', table]);
  }
}
