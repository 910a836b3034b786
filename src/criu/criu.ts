import { access, constants, mkdtemp, readFile, rm, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { execa } from 'execa';
import { CriuError, FerryError, type Phase } from '../errors.ts';
import { faultActive } from '../faults.ts';
import { helperPath } from '../paths.ts';
import { withTimeout } from '../timeout.ts';
import { readErrorLines } from './log.ts';
import type { Duplex } from 'node:stream';
import {
  dumpArguments,
  lazyPagesArguments,
  lazySocketFd,
  lazyStatusFd,
  preDumpArguments,
  restoreArguments,
  type DumpOptions,
  type PreDumpOptions,
  type RestoreOptions,
} from './options.ts';
import { readStats, type DumpStats, type RestoreStats } from './stats.ts';
import { parseCriuVersion, type CriuVersion } from './version.ts';

export const minimumCriuVersion = [4, 0] as const;
const tmpfsMagic = 0x01021994;
const setupHint = 'run `bash scripts/setup.sh` (it provisions CRIU 4.x), or set FERRY_CRIU to a CRIU >= 4.0';

/** Everything CRIU is asked to do goes through here. */
export class Criu {
  readonly path: string;
  readonly version: CriuVersion;
  private kernelProbeCache: string | undefined;
  private memoryTrackingProbe: Promise<boolean> | undefined;
  private socketProbe: Promise<string | undefined> | undefined;

  constructor(path: string, version: CriuVersion) {
    this.path = path;
    this.version = version;
  }

  /**
   * Finds a usable CRIU. A path given explicitly (the argument, else FERRY_CRIU)
   * is used alone: a configured CRIU that is missing is an error, not a reason
   * to pick another one. Without one: the set-up's prefix, then PATH.
   */
  static async locate(explicitPath?: string): Promise<Criu> {
    const explicit = explicitPath || process.env.FERRY_CRIU;
    const candidates = explicit ? [explicit] : ['/opt/ferry/criu/bin/criu', ...pathEntries('criu')];
    const path = await firstExecutable(candidates);
    if (!path) {
      const where = explicit ? ` at ${explicit}` : '';
      throw new FerryError('CRIU_MISSING', `CRIU not found${where}; ${setupHint}`, { phase: 'setup' });
    }
    const result = await execa(path, ['--version'], { reject: false, timeout: 10_000 });
    const version = parseCriuVersion(`${result.stdout}`);
    if (result.exitCode !== 0 || !version) {
      throw new FerryError('CRIU_MISSING', `${path} --version failed: ${result.stderr || result.stdout}; ${setupHint}`, {
        phase: 'setup',
      });
    }
    if (version.major < minimumCriuVersion[0]) {
      throw new FerryError(
        'CRIU_TOO_OLD',
        `CRIU ${version.text} at ${path} is too old (need >= ${minimumCriuVersion.join('.')}: older CRIU fails on current kernels); ${setupHint}`,
        { phase: 'setup' },
      );
    }
    return new Criu(path, version);
  }

  /** `criu check`: undefined when it passes, else CRIU's complaint. */
  async check(feature?: string): Promise<string | undefined> {
    const args = feature ? ['check', '--feature', feature] : ['check'];
    const result = await execa(this.path, args, { reject: false, timeout: 30_000, all: true });
    if (result.exitCode === 0) return undefined;
    return `${result.all ?? ''}`.trim() || `exit code ${result.exitCode}`;
  }

  /** Whether this kernel tracks dirty memory (soft-dirty), which pre-dump rounds need. Asked once. */
  memoryTracking(): Promise<boolean> {
    this.memoryTrackingProbe ??= this.check('mem_dirty_track').then((problem) => problem === undefined);
    return this.memoryTrackingProbe;
  }

  /**
   * Whether CRIU can checkpoint TCP and UDP sockets here (CRIU 4.1 cannot on
   * Linux >= 6.16): a throw-away process holding a TCP listener, a UDP socket
   * and a unix pair is dumped for real. Undefined when it can, else why not. Asked once.
   */
  socketCheckpoint(): Promise<string | undefined> {
    // Test fault: this host's CRIU behaves like 4.1 on Linux >= 6.16 (the probe's verdict only; the probe does not run).
    if (faultActive('no-socket-checkpoint')) return Promise.resolve("Can't get 1:16 opt (test fault no-socket-checkpoint)");
    // A probe that could not run says nothing about CRIU: asked again next time, and reported as such now.
    this.socketProbe ??= probeSocketDump(this).catch((error: unknown) => {
      this.socketProbe = undefined;
      return `could not probe: ${error instanceof Error ? error.message : String(error)}`;
    });
    return this.socketProbe;
  }

  /** One pre-copy round while the container runs. */
  preDump(options: PreDumpOptions): CriuRun<DumpStats | undefined> {
    return this.start(preDumpArguments(options), options.logFile, 'precopy').map(() => readDumpStats(options.imagesDir));
  }

  /** Dumps the frozen container; the returned run exposes CRIU's pid while it writes images. */
  dump(options: DumpOptions): CriuRun<DumpStats | undefined> {
    return this.start(dumpArguments(options), options.logFile, 'dump').map(() => readDumpStats(options.imagesDir));
  }

  /**
   * Post-copy's dump of the frozen container: every image but the pages,
   * then CRIU serves the pages on `socket` until the lazy-pages daemon at the
   * other end closes. `ready` resolves once the images are written. The tasks
   * are left alive (frozen), so this copy can go on if the destination's fails.
   */
  lazyDump(options: DumpOptions): LazyDump {
    const run = this.start(dumpArguments({ ...options, lazyPages: true }), options.logFile, 'dump', { extraPipes: 2 });
    const child = run.process;
    const socket = child.stdio[lazySocketFd] as Duplex;
    const status = child.stdio[lazyStatusFd] as Duplex;
    const ready = new Promise<void>((resolve, reject) => {
      status.once('data', () => resolve());
      run.done.then(() => reject(new FerryError('CRIU_FAILED', 'criu dump --lazy-pages exited before its page server started', { phase: 'dump' })), reject);
    });
    ready.catch(() => undefined);
    return { run: run.map(() => readDumpStats(options.imagesDir)), socket, ready };
  }

  /** The argument list of the destination's lazy-pages daemon (run by ferry-lazy-guard). */
  lazyPagesCommand(imagesDir: string, logFile: string): string[] {
    // Through criu-exec where it gives CRIU its kernel probe cache: the daemon's start is downtime.
    const [file, args] = this.command(lazyPagesArguments({ imagesDir, logFile }));
    return [file, ...args];
  }

  /**
   * Restores with the criu process placed in `cgroupProcsFile` first, so the
   * restored tasks are born inside the container's cgroup.
   */
  async restore(options: RestoreOptions, cgroupProcsFile: string): Promise<RestoreStats | undefined> {
    await this.start(restoreArguments(options), options.logFile, 'restore', { cgroupProcsFile }).done;
    return (await readStats(join(options.imagesDir, 'stats-restore')))?.restore;
  }

  /**
   * CRIU probes the kernel for ~50 ms on every start unless it can keep a
   * cache in /run, which it does only when /run is a tmpfs. Where it is not,
   * the cache is made once here and each call gets a private tmpfs /run
   * holding a copy of it (in its own mount namespace, invisible outside).
   */
  async useKernelProbeCache(cacheFile: string): Promise<void> {
    const run = await statfs('/run').catch(() => undefined);
    if (run?.type === tmpfsMagic) return;
    const script = 'mount -t tmpfs -o size=1m criu-kdat /run && "$CRIU" check >/dev/null 2>&1; cp /run/criu.kdat "$KDAT"';
    const result = await execa('unshare', ['-m', '/bin/sh', '-c', script], {
      reject: false,
      env: { ...criuEnvironment(), CRIU: this.path, KDAT: cacheFile },
    });
    if (result.exitCode === 0) this.kernelProbeCache = cacheFile;
  }

  /** The program to spawn: CRIU itself, or ferry-helper preparing its cgroup and probe cache first. */
  private command(criuArgs: string[], cgroupProcsFile?: string): [string, string[]] {
    const preparations = [
      ...(this.kernelProbeCache ? ['--kdat', this.kernelProbeCache] : []),
      ...(cgroupProcsFile ? ['--cgroup-procs', cgroupProcsFile] : []),
    ];
    if (!preparations.length) return [this.path, criuArgs];
    return [helperPath(), ['criu-exec', ...preparations, '--', this.path, ...criuArgs]];
  }

  async cpuinfoDump(imagesDir: string): Promise<void> {
    await this.start(['cpuinfo', 'dump', '-D', imagesDir], undefined, 'preflight').done;
  }

  /** Undefined when this host can run images dumped where `imagesDir`'s cpuinfo came from. */
  async cpuinfoCheck(imagesDir: string): Promise<string | undefined> {
    const result = await execa(this.path, ['cpuinfo', 'check', '-D', imagesDir], {
      reject: false,
      all: true,
      env: criuEnvironment(),
    });
    return result.exitCode === 0 ? undefined : `${result.all ?? ''}`.trim() || `exit code ${result.exitCode}`;
  }

  private start(
    criuArgs: string[],
    logFile: string | undefined,
    phase: Phase,
    options: { cgroupProcsFile?: string; extraPipes?: number } = {},
  ): CriuRun<void> {
    const [file, args] = this.command(criuArgs, options.cgroupProcsFile);
    const extra = Array.from({ length: options.extraPipes ?? 0 }, () => 'pipe' as const);
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe', ...extra], env: criuEnvironment() });
    const output = new BoundedOutput();
    child.stdout?.on('data', (chunk: Buffer) => output.add(chunk));
    child.stderr?.on('data', (chunk: Buffer) => output.add(chunk));
    const done = new Promise<void>((resolve, reject) => {
      child.once('error', (cause) =>
        reject(new FerryError('CRIU_MISSING', `cannot run ${file}: ${cause.message}`, { phase, cause })),
      );
      child.once('close', (exitCode, signal) => {
        if (exitCode === 0) return resolve();
        failure(criuArgs[0] ?? 'criu', exitCode, signal, logFile, output.text(), phase).then(reject, reject);
      });
    });
    return new CriuRun(done, child);
  }
}

/**
 * CRIU_FAULT=130 makes compel step to sigreturn with PTRACE_SYSCALL instead of
 * a hardware breakpoint. In VMs without debug-register support (Firecracker,
 * some Xen) the breakpoint never fires and every dump hangs after the parasite
 * is cured; CRIU itself once disabled breakpoints by default for this reason.
 */
export function criuEnvironment(): NodeJS.ProcessEnv {
  if (process.env.FERRY_CRIU_BREAKPOINTS === '1') return process.env;
  return { ...process.env, CRIU_FAULT: process.env.CRIU_FAULT ?? '130' };
}

/** The probe's verdict: CRIU's complaint, or undefined; throws when the probe itself could not run (not cached). */
async function probeSocketDump(criu: Criu): Promise<string | undefined> {
  const started = await execa(helperPath(), ['socket-probe'], { reject: false, timeout: 10_000 });
  const pid = Number((/"pid":(\d+)/.exec(`${started.stdout}`) ?? [])[1]);
  if (!pid) throw new Error(`the socket probe did not start: ${started.stderr || started.stdout || started.exitCode}`);
  let directory: string | undefined;
  try {
    directory = await mkdtemp(join(tmpdir(), 'ferry-socket-probe-'));
    const log = join(directory, 'dump.log');
    const result = await execa(criu.path, ['dump', '-t', String(pid), '-D', directory, '-o', log, '-v4', '--leave-running'], {
      reject: false,
      timeout: 60_000,
      env: criuEnvironment(),
    });
    // Only CRIU's own verdict is an answer (and cached); a killed or timed-out dump is not.
    if (result.timedOut || result.signal || typeof result.exitCode !== 'number') throw new Error(`the socket probe dump did not finish (${result.signal ?? 'timeout'})`);
    if (result.exitCode === 0) return undefined;
    const lines = await readErrorLines(log);
    return lines.at(-1) ?? `criu dump exit code ${result.exitCode}`;
  } finally {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
    if (directory) await rm(directory, { recursive: true, force: true });
  }
}

/** A running CRIU call: its completion, and its process while it runs. */
export class CriuRun<T> {
  readonly done: Promise<T>;
  private readonly child: ChildProcess;

  constructor(done: Promise<T>, child: ChildProcess) {
    this.done = done;
    this.child = child;
  }

  map<U>(next: (value: T) => Promise<U> | U): CriuRun<U> {
    return new CriuRun(this.done.then(next), this.child);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get process(): ChildProcess {
    return this.child;
  }

  get exited(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }

  /**
   * After the caller gave up on this run (the link failed, say): CRIU holds
   * the frozen tasks while it collects their pages, and killing it with its
   * parasite inside them could damage them, so it is let finish for up to
   * a minute, and only then killed. Never rejects.
   */
  async letFinish(what: string, phase: Phase): Promise<void> {
    await withTimeout(this.done, 60_000, what, phase).catch(() => this.kill());
  }
}

/** A lazy dump under way: its run, the page server's socket, and when its images are complete. */
export interface LazyDump {
  run: CriuRun<DumpStats | undefined>;
  socket: Duplex;
  ready: Promise<void>;
}

async function failure(
  command: string,
  exitCode: number | null,
  signal: NodeJS.Signals | null,
  logFile: string | undefined,
  output: string,
  phase: Phase,
): Promise<CriuError> {
  const details = logFile ? await readErrorLines(logFile) : [];
  if (!details.length && output.trim()) details.push(...output.trim().split('\n').slice(-12));
  const reason = signal ? `killed by ${signal}` : `exit code ${exitCode}`;
  // The last error line explains the failure, unless it is only an echo of an earlier one.
  const last = details.findLast((line) => !consequential.test(line)) ?? details.at(-1);
  return new CriuError(`criu ${command} failed (${reason})${last ? `: ${last}` : ''}`, {
    phase,
    details,
    ...(logFile ? { logFile } : {}),
  });
}

/** Error lines CRIU logs because an earlier step failed (its helpers see their peers go). */
const consequential = /cgroupd: recv req error|Restoring FAILED/;

/** Keeps the last few KiB of a child's output for error messages. */
class BoundedOutput {
  private chunks: Buffer[] = [];
  private size = 0;

  add(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.size += chunk.length;
    while (this.size > 16_384 && this.chunks.length > 1) this.size -= this.chunks.shift()!.length;
  }

  text(): string {
    return Buffer.concat(this.chunks).toString('utf8');
  }
}

async function readDumpStats(imagesDir: string): Promise<DumpStats | undefined> {
  return (await readStats(join(imagesDir, 'stats-dump')))?.dump;
}

function pathEntries(binary: string): string[] {
  return (process.env.PATH ?? '').split(delimiter).map((directory) => join(directory, binary));
}

async function firstExecutable(candidates: string[]): Promise<string | undefined> {
  for (const candidate of candidates) {
    if (await access(candidate, constants.X_OK).then(() => true, () => false)) return candidate;
  }
  return undefined;
}

export async function readKernelRelease(): Promise<string> {
  return (await readFile('/proc/sys/kernel/osrelease', 'utf8')).trim();
}
