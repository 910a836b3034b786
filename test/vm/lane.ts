// The VM test lane: runs a command inside a Debian distribution kernel booted
// by QEMU with software emulation (TCG), for what this machine's kernel cannot
// do (soft-dirty tracking, so `criu pre-dump --track-mem`). The guest sees the
// host's filesystem read-only at the same paths (node, CRIU, ip, nsenter) with
// a throw-away writable layer on top, and the repo the same way: nothing the
// guest writes reaches the host, except in `outDir`. Built by
// scripts/build-vm.sh; the guest's side is test/vm/guest-init.sh.
//
//   const { exitCode, output } = await runInVm({ command: ['bin/ferry', 'demo'], timeoutMs: 300_000 });
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');
export const VM_DIR = join(REPO_ROOT, '.build', 'vm');
const QEMU = 'qemu-system-x86_64';
const KILL_GRACE_MS = 2_000;
const JOB_DIR_PREFIX = 'ferry-vm-job-';

export interface VmOptions {
  /** argv run in the guest (no shell; use ['sh', '-c', ...] for one). */
  command: string[];
  /** Guest working directory; default the repo root. */
  cwd?: string;
  /**
   * Added to the guest command's environment, which is otherwise clean:
   * PATH (the host Node's directory first), HOME=/root, LANG=C.UTF-8, TERM=dumb,
   * NODE_COMPILE_CACHE (a tmpfs directory), FERRY_TEST_AGENT_READY_MS=120000,
   * FERRY_HEARTBEAT_MISSED=15.
   */
  env?: Record<string, string>;
  /** Default 2048. */
  memoryMiB?: number;
  /**
   * vCPUs; default 1. With 2 (multi-threaded TCG) agents died while starting
   * in 2 of 3 pre-copy scenario runs (a V8 internal check); with 1, 4 of 4
   * ran clean, about 25 % slower.
   */
  cpus?: number;
  /** Boot, command and power-off together; QEMU is killed when it runs out. */
  timeoutMs: number;
  /** A host directory the guest can write, mounted at the same path (created if missing). */
  outDir?: string;
  /** The repo shared into the guest; default this one. */
  repo?: string;
  /** Console output as it arrives (e.g. `(text) => process.stderr.write(text)`). */
  onOutput?: (text: string) => void;
}

export interface VmResult {
  /** The guest command's exit code. */
  exitCode: number;
  /** What the command printed (stdout and stderr, as on a terminal). */
  output: string;
  /** The whole serial console: boot messages, output, kernel warnings after it. */
  console: string;
  /** QEMU's wall time, start to exit. */
  durationMs: number;
}

/** Boot, or the guest's set-up, failed, or the run timed out: no exit code to report. */
export class VmLaneError extends Error {
  override name = 'VmLaneError';
  readonly console: string;

  constructor(message: string, consoleText: string) {
    super(`${message}\n--- console (last 40 lines) ---\n${tail(consoleText, 40)}`);
    this.console = consoleText;
  }
}

/** Why the lane cannot run here, or undefined when it can. */
export function vmLaneMissing(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  for (const file of ['vmlinux', 'initrd.cpio']) {
    if (!existsSync(join(VM_DIR, file))) return `${join(VM_DIR, file)} is missing (run bash scripts/build-vm.sh)`;
  }
  if (!onPath(QEMU)) return `${QEMU} is not installed (run bash scripts/build-vm.sh)`;
  return undefined;
}

export async function runInVm(options: VmOptions): Promise<VmResult> {
  const missing = vmLaneMissing();
  if (missing) throw new Error(`VM lane unavailable: ${missing}`);
  if (!options.command.length) throw new Error('runInVm: empty command');
  const repo = options.repo ?? REPO_ROOT;
  for (const path of [repo, options.outDir, options.cwd]) {
    // 9p tags, mount options and vm.conf are parsed by the guest's sh
    if (path !== undefined && !/^\/[\w./+@-]*$/.test(path)) throw new Error(`runInVm: unsupported path ${path}`);
  }
  if (options.outDir) await mkdir(options.outDir, { recursive: true });
  await removeStaleJobDirs();
  // Not under the lab's /tmp/ferryt-* names: its cleanup would take it.
  const jobDir = await mkdtemp(join(tmpdir(), JOB_DIR_PREFIX));
  try {
    await writeFile(join(jobDir, 'owner'), `${process.pid}\n`);
    const mark = `@@ferry-vm-${randomBytes(6).toString('hex')}`;
    await writeFile(
      join(jobDir, 'vm.conf'),
      `FERRY_VM_REPO=${repo}\nFERRY_VM_OUT=${options.outDir ?? ''}\nFERRY_VM_MARK=${mark}\n`,
    );
    await writeFile(join(jobDir, 'job.sh'), jobScript(options, repo));
    const args = qemuArgs(options, repo, jobDir);
    const run = await runQemu(args, options.timeoutMs, options.onOutput);
    const consoleText = run.console;
    const begin = consoleText.indexOf(`${mark} begin\n`);
    const exit = new RegExp(`^${mark} exit (\\d+)$`, 'm').exec(consoleText);
    if (run.timedOut) throw new VmLaneError(`VM timed out after ${options.timeoutMs} ms`, consoleText);
    if (begin < 0 || !exit) {
      const how = run.signal ? `was killed by ${run.signal}` : `exited with code ${run.code}`;
      throw new VmLaneError(`the guest did not run the command (QEMU ${how})${run.stderr ? `\nQEMU: ${run.stderr.trim()}` : ''}`, consoleText);
    }
    const exitCode = Number(exit[1]);
    const recorded = await readFile(join(jobDir, 'exit-code'), 'utf8').catch(() => undefined);
    if (recorded !== undefined && Number(recorded) !== exitCode) {
      throw new VmLaneError(`console says exit ${exitCode}, exit-code file says ${recorded.trim()}`, consoleText);
    }
    return {
      exitCode,
      output: consoleText.slice(begin + mark.length + ' begin\n'.length, exit.index),
      console: consoleText,
      durationMs: run.durationMs,
    };
  } finally {
    await rm(jobDir, { recursive: true, force: true });
  }
}

function jobScript(options: VmOptions, repo: string): string {
  const node = dirname(process.execPath);
  const env: Record<string, string> = {
    PATH: [node, '/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'].join(':'),
    HOME: '/root',
    LANG: 'C.UTF-8',
    TERM: 'dumb',
    // Every Node process (CLI, agents) compiles the same modules: under
    // emulation the shared code cache saves ~30 % of a start.
    NODE_COMPILE_CACHE: '/var/tmp/node-compile-cache',
    // the lab's wait for an agent to listen (lab/agents.ts)
    FERRY_TEST_AGENT_READY_MS: '120000',
    // heartbeats (src/transport/heartbeat.ts): 30 s of silence instead of 6 s before a peer counts as gone
    FERRY_HEARTBEAT_MISSED: '15',
    ...options.env,
  };
  const assignments = Object.entries(env).map(([key, value]) => {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new Error(`runInVm: bad environment variable name ${key}`);
    return quote(`${key}=${value}`);
  });
  return [
    '# written by test/vm/lane.ts; run by the guest init',
    `cd ${quote(options.cwd ?? repo)} || exit 125`,
    `exec /usr/bin/env -i ${assignments.join(' ')} ${options.command.map(quote).join(' ')}`,
    '',
  ].join('\n');
}

function quote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

function qemuArgs(options: VmOptions, repo: string, jobDir: string): string[] {
  const share = (path: string, tag: string, readonly: boolean) => [
    '-virtfs',
    // remap: the host's / spans several filesystems whose inode numbers would collide
    `local,path=${path},mount_tag=${tag},security_model=passthrough,multidevs=remap${readonly ? ',readonly=on' : ''}`,
  ];
  return [
    // KVM cannot run a stock kernel on this machine's paravirtual /dev/kvm (or there is none)
    // No AVX: QEMU 7.2 was the first to emulate it, and an agent once died in
    // the guest on a V8 internal check; V8 runs fine on SSE4.2 alone.
    ...['-accel', 'tcg', '-cpu', 'max,-avx,-avx2,-fma,-f16c,-avx512f'],
    ...['-m', String(options.memoryMiB ?? 2048), '-smp', String(options.cpus ?? 1)],
    // -nodefaults: no VGA, NIC or disk to emulate; the serial console on stdio
    // is the guest's output (-nographic, without the monitor mixed in)
    ...['-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio', '-no-reboot'],
    ...['-kernel', join(VM_DIR, 'vmlinux'), '-initrd', join(VM_DIR, 'initrd.cpio')],
    // mitigations=off: page-table isolation and friends cost a lot under emulation;
    // tsc=reliable: with 2 vCPUs the TSCs look unsynchronized and the kernel would
    // fall back to the HPET, whose every read is an emulated device access
    ...['-append', 'console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable'],
    ...['-device', 'virtio-rng-pci'], // Node's startup wants entropy
    ...share('/', 'ferryroot', true),
    ...share(repo, 'ferryrepo', true),
    ...share(jobDir, 'ferryjob', false),
    ...(options.outDir ? share(options.outDir, 'ferryout', false) : []),
  ];
}

interface QemuRun {
  console: string;
  stderr: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  durationMs: number;
}

function runQemu(args: string[], timeoutMs: number, onOutput?: (text: string) => void): Promise<QemuRun> {
  const started = Date.now();
  // setpriv --pdeathsig: QEMU dies with this process, even when it is SIGKILLed
  const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', QEMU, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let consoleText = '';
  let stderr = '';
  let timedOut = false;
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', (chunk: string) => {
    const text = chunk.replaceAll('\r', ''); // the serial tty's ONLCR turns \n into \r\n
    consoleText += text;
    onOutput?.(text);
  });
  child.stderr.on('data', (chunk: string) => (stderr += chunk));
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), KILL_GRACE_MS).unref();
  }, timeoutMs);
  return new Promise((resolve, reject) => {
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ console: consoleText, stderr, code, signal, timedOut, durationMs: Date.now() - started });
    });
  });
}

/** Job dirs of runs whose process was killed (QEMU died with it: --pdeathsig). */
async function removeStaleJobDirs(): Promise<void> {
  for (const name of await readdir(tmpdir()).catch(() => [])) {
    if (!name.startsWith(JOB_DIR_PREFIX)) continue;
    const owner = Number(await readFile(join(tmpdir(), name, 'owner'), 'utf8').catch(() => 'NaN'));
    if (Number.isInteger(owner) && !existsSync(`/proc/${owner}`)) await rm(join(tmpdir(), name), { recursive: true, force: true });
  }
}

function onPath(file: string): boolean {
  return (process.env.PATH ?? '').split(delimiter).some((dir) => {
    try {
      accessSync(join(dir, file), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

function tail(text: string, lines: number): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}
