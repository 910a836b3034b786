// Removes everything a run (or one cluster of it) created, found by name, so
// it also works for runs whose process is gone. Also a CLI, for the
// synchronous exit path, the run watchdog, and humans:
//   node lab/cleanup.ts <runid> | --stale | --watch <runid>
import { execFileSync, spawn } from 'node:child_process';
import type { Socket } from 'node:net';
import { mkdir, readdir, readFile, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  allRunsScope,
  findCgroups,
  findMounts,
  findNetns,
  findProcesses,
  findResources,
  findRootLinks,
  findStateDirs,
  readProcStat,
  runScope,
  type Scope,
} from './leftovers.ts';
import { RUN_ID_PATTERN, ownerFile, runIdInText, runIdOf, runStateRoot } from './run-id.ts';
import { CommandError, LabError, ip, run, waitFor } from './system.ts';

const KILL_TIMEOUT_MS = 10_000;
/** A run dir younger than this without an owner file is being created right now. */
const OWNERLESS_GRACE_MS = 10_000;

const THIS_FILE = fileURLToPath(import.meta.url);
const RELEASE = 'release\n';

export interface RunClaim {
  /** The run is cleaned up: the watchdog can go. */
  release(): void;
}

/**
 * Marks the run as owned by this process, so cleanupStale() elsewhere leaves
 * it alone, and starts its watchdog: a detached process that cleans the run up
 * when this one dies without releasing it, even by SIGKILL (which is how
 * vitest ends a worker that does not exit within 500 ms of SIGTERM, or whose
 * main process is gone).
 */
export async function claimRun(id: string): Promise<RunClaim> {
  await mkdir(runStateRoot(id), { recursive: true });
  const self = await readProcStat(process.pid);
  await writeFile(ownerFile(id), `${process.pid} ${self?.startTime ?? ''}\n`);
  const watchdog = spawn(process.execPath, [THIS_FILE, '--watch', id], {
    detached: true, // its own session: a Ctrl-C meant for the tests must not reach it
    stdio: ['pipe', 'ignore', 'ignore'],
  });
  // Without a watchdog the exit handlers and cleanupStale() still cover the run.
  watchdog.on('error', () => undefined);
  watchdog.unref();
  (watchdog.stdin as Socket).unref();
  return { release: () => watchdog.stdin.end(RELEASE) };
}

/** Watchdog side: our stdin closes when the owner exits, however it exits. */
function watchRun(id: string): void {
  let input = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk: string) => (input += chunk));
  process.stdin.on('end', () => {
    if (input !== RELEASE) cleanupRun(id).catch(() => (process.exitCode = 1));
  });
}

/** The pid alone could have been reused: the start time must match too. */
async function ownerAlive(id: string): Promise<boolean> {
  const text = await readFile(ownerFile(id), 'utf8').catch(() => undefined);
  if (text === undefined) {
    const info = await stat(runStateRoot(id)).catch(() => undefined);
    return info !== undefined && Date.now() - info.mtimeMs < OWNERLESS_GRACE_MS;
  }
  const [pid, startTime] = text.trim().split(' ');
  const owner = await readProcStat(Number(pid));
  return owner !== undefined && owner.state !== 'Z' && owner.startTime === startTime;
}

export function cleanupRun(id: string): Promise<void> {
  return cleanupScope(runScope(id));
}

/** Best-effort synchronous cleanup for process exit, run by this file as a child process. */
export function cleanupRunSync(id: string): void {
  try {
    execFileSync(process.execPath, [THIS_FILE, id], { stdio: 'inherit', timeout: 60_000 });
  } catch (error) {
    console.error(`ferry lab: cleanup of run ${id} failed:`, error);
  }
}

/** Cleans the runs whose owner process is gone; returns their ids. */
export async function cleanupStale(): Promise<string[]> {
  const found = await findResources(allRunsScope);
  const ids = new Set<string | undefined>([
    ...[...found.netns, ...found.cgroups, ...found.rootLinks].map((name) => runIdOf(basename(name))),
    ...[...found.mounts, ...found.stateDirs].map(runIdInText),
    ...found.processes.map((process) => runIdInText(process.cmdline) ?? runIdOf(process.netns ?? '')),
  ]);
  const cleaned: string[] = [];
  const failures: string[] = [];
  for (const id of ids) {
    if (id === undefined || (await ownerAlive(id))) continue;
    try {
      await cleanupRun(id);
      cleaned.push(id);
    } catch (error) {
      failures.push(`run ${id}: ${messageOf(error)}`);
    }
  }
  if (failures.length) throw new LabError('CLEANUP_FAILED', failures.join('\n'));
  return cleaned;
}

/** Tries every step even when one fails, then reports all failures at once. */
export async function cleanupScope(scope: Scope): Promise<void> {
  const failures: string[] = [];
  const attempt = async (what: string, step: () => Promise<void>): Promise<void> => {
    await step().catch((error: unknown) => failures.push(`${what}: ${messageOf(error)}`));
  };
  // Agents and criu first, so nothing makes new resources while we remove them.
  await attempt('processes', () => killProcesses(scope));
  await attempt('cgroups', () => removeCgroups(scope));
  // Again: a process restored into a host's netns may sit outside its cgroup.
  await attempt('processes', () => killProcesses(scope));
  // Explicitly, because the netns (holding the peer) is torn down asynchronously.
  await attempt('links', () => removeRootLinks(scope));
  await attempt('netns', () => removeNetns(scope));
  await attempt('mounts', () => unmountAll(scope));
  await attempt('state dirs', async () => {
    for (const path of await findStateDirs(scope)) await rm(path, { recursive: true, force: true });
  });
  if (failures.length) throw new LabError('CLEANUP_FAILED', `cleanup incomplete:\n${failures.join('\n')}`);
}

async function killProcesses(scope: Scope): Promise<void> {
  const processes = await findProcesses(scope);
  for (const { pid } of processes) signal(pid, 'SIGKILL');
  await waitFor(`processes ${processes.map(({ pid }) => pid).join(', ')} to die`, KILL_TIMEOUT_MS, async () => {
    const alive = await Promise.all(processes.map(({ pid }) => isRunning(pid)));
    return alive.includes(true) ? undefined : true;
  });
}

async function isRunning(pid: number): Promise<boolean> {
  const state = (await readProcStat(pid))?.state;
  return state !== undefined && state !== 'Z' && state !== 'X';
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
  }
}

async function removeCgroups(scope: Scope): Promise<void> {
  for (const top of await findCgroups(scope)) {
    const tree = await cgroupTree(top);
    // Thaw top-down: a frozen ancestor keeps its descendants frozen, and frozen
    // tasks do not die from SIGKILL.
    for (const dir of tree) await thaw(dir);
    for (const dir of tree.toReversed()) {
      await killCgroup(dir);
      await waitFor(`cgroup ${dir} to be removed`, KILL_TIMEOUT_MS, () => tryRmdir(dir));
    }
  }
}

/** The dir and all its descendants, parents before children. */
async function cgroupTree(top: string): Promise<string[]> {
  const tree = [top];
  for (let index = 0; index < tree.length; index++) {
    const dir = tree[index] as string;
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) if (entry.isDirectory()) tree.push(join(dir, entry.name));
  }
  return tree;
}

async function thaw(dir: string): Promise<void> {
  await writeFile(join(dir, 'cgroup.freeze'), '0').catch(() => undefined); // v2
  await writeFile(join(dir, 'freezer.state'), 'THAWED').catch(() => undefined); // v1 freezer
}

async function killCgroup(dir: string): Promise<void> {
  const killed = await writeFile(join(dir, 'cgroup.kill'), '1').then(
    () => true,
    () => false, // v1, or a kernel before 5.14
  );
  if (!killed) for (const pid of await cgroupPids(dir)) signal(pid, 'SIGKILL');
}

async function cgroupPids(dir: string): Promise<number[]> {
  const text = await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => '');
  return text.split('\n').filter(Boolean).map(Number);
}

/** Resolves true once the dir is gone; undefined (retry) while tasks are still dying. */
async function tryRmdir(dir: string): Promise<true | undefined> {
  try {
    await rmdir(dir);
    return true;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return true;
    if (code !== 'EBUSY') throw error;
    await killCgroup(dir); // tasks may have forked in meanwhile (v1)
    return undefined;
  }
}

async function removeRootLinks(scope: Scope): Promise<void> {
  for (const name of await findRootLinks(scope)) await ignoreMissing(ip(['link', 'del', name]), /Cannot find device/);
}

async function removeNetns(scope: Scope): Promise<void> {
  for (const name of await findNetns(scope)) await ignoreMissing(ip(['netns', 'del', name]), /No such file/);
}

async function unmountAll(scope: Scope): Promise<void> {
  // Lazy: a busy mount must not block the teardown of everything else.
  for (const path of await findMounts(scope)) await ignoreMissing(run('umount', ['-l', path]), /not mounted|no mount point/);
}

/** Something else (an earlier step, another cleanup) already removed it: fine. */
async function ignoreMissing(command: Promise<unknown>, missing: RegExp): Promise<void> {
  try {
    await command;
  } catch (error) {
    if (!(error instanceof CommandError && missing.test(error.stderr))) throw error;
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

if (import.meta.main) {
  const argument = process.argv[2] ?? '';
  if (argument === '--stale') {
    const cleaned = await cleanupStale();
    console.log(cleaned.length ? `cleaned stale runs: ${cleaned.join(' ')}` : 'no stale runs');
  } else if (argument === '--watch' && RUN_ID_PATTERN.test(process.argv[3] ?? '')) {
    watchRun(process.argv[3] as string);
  } else if (RUN_ID_PATTERN.test(argument)) {
    await cleanupRun(argument);
  } else {
    console.error('usage: node lab/cleanup.ts <runid> | --stale | --watch <runid>');
    process.exitCode = 2;
  }
}
