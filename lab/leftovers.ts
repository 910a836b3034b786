// Finds the resources of a run (or of one cluster of it) by name: netns,
// cgroup dirs, root-netns links, mounts, processes and state dirs. cleanup.ts
// removes what this finds; tests assert it finds nothing after destroy().
import { readdir, readFile, readlink, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { namespacePrefix } from '../src/net/address.ts';
import { ip, netnsPath, readMounts, cgroupMountPoints } from './system.ts';
import {
  RESOURCE_PREFIX,
  STATE_BASE,
  rootLinkPrefix,
  runId as currentRunId,
  runPrefix,
  runIdOf,
  runStateRoot,
  type ClusterNames,
} from './run-id.ts';

/** Which resources a cleanup or a leftover check is about. */
export interface Scope {
  /** Prefix of netns and top-level cgroup dir names. */
  namePrefix: string;
  /** State dirs are the entries of stateParent whose names start with stateEntryPrefix. */
  stateParent: string;
  stateEntryPrefix: string;
  rootLink(name: string): boolean;
}

export function runScope(id: string): Scope {
  const links = rootLinkPrefix(id);
  return {
    namePrefix: runPrefix(id),
    stateParent: STATE_BASE,
    stateEntryPrefix: `${RESOURCE_PREFIX}${id}`,
    rootLink: (name) => name.startsWith(links),
  };
}

export function clusterScope(id: string, names: ClusterNames): Scope {
  return {
    namePrefix: names.prefix,
    stateParent: runStateRoot(id),
    stateEntryPrefix: `${names.id}-`,
    rootLink: (name) => name === names.controllerLink,
  };
}

/** Every run's resources, for finding stale runs. */
export const allRunsScope: Scope = {
  namePrefix: RESOURCE_PREFIX,
  stateParent: STATE_BASE,
  stateEntryPrefix: RESOURCE_PREFIX,
  rootLink: (name) => name.startsWith('ft') && runIdOf(name) !== undefined,
};

/** Paths (state dirs, mounts, command lines) under the scope start with this. */
function statePathPrefix(scope: Scope): string {
  return join(scope.stateParent, scope.stateEntryPrefix);
}

export interface ScopeProcess {
  pid: number;
  cmdline: string;
  /** Set when the process was found by its network namespace. */
  netns: string | undefined;
}

export interface Resources {
  netns: string[];
  /** Absolute paths of the top-level cgroup dirs, in every mounted hierarchy. */
  cgroups: string[];
  rootLinks: string[];
  /** Mount points under the state paths, deepest first. */
  mounts: string[];
  processes: ScopeProcess[];
  stateDirs: string[];
}

export async function findResources(scope: Scope): Promise<Resources> {
  const [netns, cgroups, rootLinks, mounts, processes, stateDirs] = await Promise.all([
    findNetns(scope),
    findCgroups(scope),
    findRootLinks(scope),
    findMounts(scope),
    findProcesses(scope),
    findStateDirs(scope),
  ]);
  return { netns, cgroups, rootLinks, mounts, processes, stateDirs };
}

/** Human-readable leftovers of a run; empty when it was cleaned up completely. */
export async function findLeftovers(id: string = currentRunId): Promise<string[]> {
  const found = await findResources(runScope(id));
  return [
    ...found.netns.map((name) => `netns ${name}`),
    ...found.cgroups.map((path) => `cgroup ${path}`),
    ...found.rootLinks.map((name) => `link ${name} in the root netns`),
    ...found.mounts.map((path) => `mount ${path}`),
    ...found.processes.map(
      (process) => `process ${process.pid}${process.netns ? ` in netns ${process.netns}` : ''}: ${process.cmdline}`,
    ),
    ...found.stateDirs.map((path) => `state dir ${path}`),
  ];
}

export async function findNetns(scope: Scope): Promise<string[]> {
  const names = await readdir('/run/netns').catch(() => []);
  // An agent's own namespaces, prepared for a container that never got it (a crash in between).
  const agentPrefixes = (await findStateDirs(scope)).map(namespacePrefix);
  return names.filter((name) => name.startsWith(scope.namePrefix) || agentPrefixes.some((prefix) => name.startsWith(prefix))).sort();
}

export async function findCgroups(scope: Scope): Promise<string[]> {
  const found: string[] = [];
  for (const mountPoint of cgroupMountPoints(await readMounts())) {
    const entries = await readdir(mountPoint, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) {
      if (entry.isDirectory() && entry.name.startsWith(scope.namePrefix)) found.push(join(mountPoint, entry.name));
    }
  }
  return found.sort();
}

export async function findRootLinks(scope: Scope): Promise<string[]> {
  const { stdout } = await ip(['-j', 'link', 'show']);
  const links = JSON.parse(stdout) as Array<{ ifname: string }>;
  return links.map((link) => link.ifname).filter((name) => scope.rootLink(name));
}

export async function findMounts(scope: Scope): Promise<string[]> {
  const prefix = statePathPrefix(scope);
  const points = (await readMounts()).map((mount) => mount.mountPoint).filter((path) => path.startsWith(prefix));
  // Deepest first, so each can be unmounted before the one it sits on.
  return [...new Set(points)].sort((a, b) => b.split('/').length - a.split('/').length);
}

export async function findStateDirs(scope: Scope): Promise<string[]> {
  const entries = await readdir(scope.stateParent).catch(() => []);
  return entries.filter((name) => name.startsWith(scope.stateEntryPrefix)).map((name) => join(scope.stateParent, name));
}

/**
 * Processes whose command line mentions a state path of the scope (agents,
 * criu) or that live in one of its netns (whatever was started or restored
 * there). The calling process and its ancestors are never included.
 */
export async function findProcesses(scope: Scope): Promise<ScopeProcess[]> {
  const prefix = statePathPrefix(scope);
  const netnsByInode = new Map<string, string>();
  for (const name of await findNetns(scope)) {
    const info = await stat(netnsPath(name)).catch(() => undefined);
    if (info) netnsByInode.set(`net:[${info.ino}]`, name);
  }
  const spared = await ancestors(process.pid);
  const found: ScopeProcess[] = [];
  for (const entry of await readdir('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || spared.has(pid)) continue;
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).replaceAll('\0', ' ').trim();
    const netns = netnsByInode.get(await readlink(`/proc/${pid}/ns/net`).catch(() => ''));
    // Zombies and exited tasks have an empty command line and no netns link.
    if (netns !== undefined || cmdline.includes(prefix)) found.push({ pid, cmdline, netns });
  }
  return found;
}

async function ancestors(pid: number): Promise<Set<number>> {
  const chain = new Set<number>();
  for (let current = pid; current > 1 && !chain.has(current); ) {
    chain.add(current);
    current = (await readProcStat(current))?.ppid ?? 0;
  }
  return chain;
}

export interface ProcStat {
  state: string;
  ppid: number;
  /** Clock ticks since boot: together with the pid it identifies a process for good. */
  startTime: string;
}

export async function readProcStat(pid: number): Promise<ProcStat | undefined> {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  // The command name (field 2) may contain spaces; fields after it are plain.
  const fields = text?.slice(text.lastIndexOf(')') + 2).split(' ');
  if (!fields) return undefined;
  return { state: fields[0] ?? '', ppid: Number(fields[1]), startTime: fields[19] ?? '' };
}
