// Thin wrappers for the system tools the lab drives (ip, nsenter), and
// the mount-table reading that cgroup discovery and cleanup share.
import { readFile } from 'node:fs/promises';
import { execa, type ResultPromise } from 'execa';

export type LabErrorCode =
  | 'COMMAND_FAILED'
  | 'TIMEOUT'
  | 'NAME_TOO_LONG'
  | 'NO_CGROUP_ROOT'
  | 'NO_SUBNET'
  | 'AGENT_EXITED'
  | 'CLEANUP_FAILED';

export class LabError extends Error {
  override name = 'LabError';
  readonly code: LabErrorCode;

  constructor(code: LabErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(message, options);
    this.code = code;
  }
}

/** A command that exited non-zero; callers branch on exitCode/stderr (e.g. "already gone"). */
export class CommandError extends LabError {
  override name = 'CommandError';
  readonly command: string;
  readonly exitCode: number | undefined;
  readonly stdout: string;
  readonly stderr: string;

  constructor(command: string, result: CommandResult & { reason: string }) {
    const stderr = result.stderr.trim();
    super('COMMAND_FAILED', `${command}: ${result.reason}${stderr ? `\n${stderr}` : ''}`);
    this.command = command;
    this.exitCode = result.exitCode;
    this.stdout = result.stdout;
    this.stderr = result.stderr;
  }
}

export interface CommandResult {
  exitCode: number | undefined;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Resolve with the result instead of throwing when the command fails. */
  reject?: boolean;
  timeoutMs?: number;
}

export async function run(file: string, args: readonly string[], options: RunOptions = {}): Promise<CommandResult> {
  const result = await execa(file, args, {
    reject: false,
    stdin: 'ignore',
    timeout: options.timeoutMs ?? 30_000,
    encoding: 'utf8',
  });
  const output: CommandResult = { exitCode: result.exitCode, stdout: result.stdout, stderr: result.stderr };
  if (result.failed && options.reject !== false) {
    const reason = result.timedOut
      ? 'timed out'
      : result.signal
        ? `killed by ${result.signal}`
        : result.exitCode === undefined
          ? String(result.originalMessage ?? 'could not start')
          : `exit code ${result.exitCode}`;
    throw new CommandError([file, ...args].join(' '), { ...output, reason });
  }
  return output;
}

export function netnsPath(netns: string): string {
  return `/run/netns/${netns}`;
}

/** `ip ...` in the root netns. */
export function ip(args: readonly string[], options?: RunOptions): Promise<CommandResult> {
  return run('ip', args, options);
}

/** `ip -n NETNS ...`: ip's own netns switch only affects the ip process itself. */
export function ipIn(netns: string, args: readonly string[], options?: RunOptions): Promise<CommandResult> {
  return run('ip', ['-n', netns, ...args], options);
}

// nsenter, not `ip netns exec`: the latter remounts /sys and hides the cgroup mounts.
function nsenterArgs(netns: string, command: string, args: readonly string[]): string[] {
  return [`--net=${netnsPath(netns)}`, '--', command, ...args];
}

/** Runs a command to completion inside a netns. */
export function execInNetns(
  netns: string,
  command: string,
  args: readonly string[],
  options?: RunOptions,
): Promise<CommandResult> {
  return run('nsenter', nsenterArgs(netns, command, args), options);
}

export interface SpawnOptions {
  cwd?: string;
  env?: Record<string, string>;
}

/**
 * Starts a long-running process inside a netns. nsenter execs the command
 * without forking (only --pid needs a fork), so the subprocess pid is the
 * command's own pid.
 */
export function spawnInNetns(
  netns: string,
  command: string,
  args: readonly string[],
  options: SpawnOptions = {},
): ResultPromise<{ buffer: false; reject: false; stdin: 'ignore'; encoding: 'utf8' }> {
  return execa('nsenter', nsenterArgs(netns, command, args), {
    buffer: false,
    reject: false,
    stdin: 'ignore',
    encoding: 'utf8',
    ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
    ...(options.env === undefined ? {} : { env: options.env }),
  });
}

export interface MountEntry {
  mountPoint: string;
  fsType: string;
  superOptions: string[];
}

/** Parses /proc/self/mountinfo (proc(5)); octal escapes such as \040 are decoded. */
export async function readMounts(): Promise<MountEntry[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const [left, right] = line.split(' - ');
    const mountPoint = left?.split(' ')[4];
    const [fsType, , options] = right?.split(' ') ?? [];
    if (!mountPoint || !fsType) continue;
    entries.push({ mountPoint: unescapeOctal(mountPoint), fsType, superOptions: (options ?? '').split(',') });
  }
  return entries;
}

function unescapeOctal(value: string): string {
  return value.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

export interface CgroupRoots {
  v2: string | undefined;
  v1Freezer: string | undefined;
}

export function findCgroupRoots(mounts: readonly MountEntry[]): CgroupRoots {
  return {
    v2: mounts.find((mount) => mount.fsType === 'cgroup2')?.mountPoint,
    v1Freezer: mounts.find((mount) => mount.fsType === 'cgroup' && mount.superOptions.includes('freezer'))
      ?.mountPoint,
  };
}

/** Where the lab makes per-host cgroup dirs: v2 if mounted, else the v1 freezer. */
export async function hostCgroupParent(): Promise<string> {
  const roots = findCgroupRoots(await readMounts());
  const parent = roots.v2 ?? roots.v1Freezer;
  if (!parent) throw new LabError('NO_CGROUP_ROOT', 'neither cgroup v2 nor the v1 freezer is mounted');
  return parent;
}

/** Every cgroup hierarchy mounted (v2 and each v1 controller): cleanup sweeps them all. */
export function cgroupMountPoints(mounts: readonly MountEntry[]): string[] {
  const points = mounts.filter((mount) => mount.fsType === 'cgroup' || mount.fsType === 'cgroup2');
  return [...new Set(points.map((mount) => mount.mountPoint))];
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls until check() returns a value other than undefined, or throws TIMEOUT. */
export async function waitFor<T>(what: string, timeoutMs: number, check: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new LabError('TIMEOUT', `timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}
