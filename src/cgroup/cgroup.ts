import { access, mkdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { FerryError } from '../errors.ts';
import { readCgroupMounts } from './mounts.ts';

export type CgroupVersion = 1 | 2;

/**
 * One container's cgroup: used as the freezer (the seed's pre-freeze) and as
 * the set of tasks that belong to the container and nothing else.
 */
export class Cgroup {
  readonly version: CgroupVersion;
  readonly path: string;

  constructor(version: CgroupVersion, path: string) {
    this.version = version;
    this.path = path;
  }

  /** File a task writes "0" (or a pid) into to join. */
  get procsFile(): string {
    return join(this.path, this.version === 2 ? 'cgroup.procs' : 'tasks');
  }

  async create(): Promise<void> {
    try {
      await mkdir(this.path, { recursive: true });
      await access(this.procsFile);
    } catch (cause) {
      throw new FerryError('CGROUP_FAILED', `cannot create cgroup ${this.path}: ${(cause as Error).message}`, {
        cause,
        phase: 'setup',
      });
    }
  }

  async exists(): Promise<boolean> {
    return access(this.procsFile).then(
      () => true,
      () => false,
    );
  }

  async pids(): Promise<number[]> {
    const text = await readFile(this.procsFile, 'utf8').catch(() => '');
    return text
      .split('\n')
      .filter(Boolean)
      .map((line) => Number(line));
  }

  async isFrozen(): Promise<boolean> {
    if (this.version === 2) return (await this.events()).get('frozen') === '1';
    return (await readFile(join(this.path, 'freezer.state'), 'utf8')).trim() === 'FROZEN';
  }

  async freeze(timeoutMs = 10_000): Promise<void> {
    await this.setFrozen(true);
    await this.waitUntil(() => this.isFrozen(), timeoutMs, 'freeze');
  }

  async thaw(timeoutMs = 10_000): Promise<void> {
    await this.setFrozen(false);
    await this.waitUntil(async () => !(await this.isFrozen()), timeoutMs, 'thaw');
  }

  /**
   * Kills every task, frozen or not, and waits until the group is empty:
   * no task listed and, on v2, `populated 0` (tasks freeing a large memory
   * leave cgroup.procs before they have exited, and rmdir fails until then).
   */
  async kill(timeoutMs = 30_000): Promise<void> {
    if (!(await this.exists())) return;
    const killFile = join(this.path, 'cgroup.kill');
    if (this.version === 2 && (await fileExists(killFile))) {
      await writeFile(killFile, '1');
    } else {
      for (const pid of await this.pids()) signalQuietly(pid, 'SIGKILL');
      // v1 frozen tasks only die once thawed.
      if (this.version === 1) await this.setFrozen(false);
    }
    await this.waitUntil(() => this.isEmpty(), timeoutMs, 'kill');
  }

  /** No task in the group, exiting ones included where the kernel tells (v2). */
  async isEmpty(): Promise<boolean> {
    if ((await this.pids()).length) return false;
    if (this.version === 1 || !(await this.exists())) return true;
    return (await this.events().catch(() => new Map<string, string>())).get('populated') !== '1';
  }

  /**
   * Removes the group once it is empty; a missing group is not an error.
   * EBUSY (tasks still exiting) is retried until `timeoutMs`.
   */
  async remove(timeoutMs = 30_000): Promise<void> {
    if (!(await this.exists())) return;
    if (await this.isFrozen().catch(() => false)) await this.setFrozen(false);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        await rmdir(this.path);
        return;
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') return;
        if (code !== 'EBUSY' || Date.now() > deadline) {
          throw new FerryError('CGROUP_FAILED', `cannot remove cgroup ${this.path}: ${code ?? (error as Error).message}`, {
            cause: error,
            phase: 'cleanup',
          });
        }
        await sleep(50);
      }
    }
  }

  private async setFrozen(frozen: boolean): Promise<void> {
    if (this.version === 2) await writeFile(join(this.path, 'cgroup.freeze'), frozen ? '1' : '0');
    else await writeFile(join(this.path, 'freezer.state'), frozen ? 'FROZEN' : 'THAWED');
  }

  private async events(): Promise<Map<string, string>> {
    const text = await readFile(join(this.path, 'cgroup.events'), 'utf8');
    return new Map(
      text
        .split('\n')
        .filter(Boolean)
        .map((line) => line.split(' ') as [string, string]),
    );
  }

  private async waitUntil(check: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    // Freezing idle tasks takes a few ms and every ms here is downtime: poll
    // every 2 ms at first, then back off.
    for (let attempt = 0, delay = 2; ; attempt += 1, delay = attempt < 50 ? 2 : Math.min(delay * 2, 50)) {
      if (await check()) return;
      if (Date.now() > deadline) {
        throw new FerryError('TIMEOUT', `cgroup ${this.path}: ${what} did not complete in ${timeoutMs} ms`, {
          phase: what === 'freeze' ? 'freeze' : 'runtime',
        });
      }
      await sleep(delay);
    }
  }
}

async function fileExists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

function signalQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // Already gone.
  }
}

/** Where a host's container cgroups live: <v2 mount or v1 freezer mount>/<root>/<name>. */
export class CgroupTree {
  readonly version: CgroupVersion;
  readonly rootPath: string;

  constructor(version: CgroupVersion, rootPath: string) {
    this.version = version;
    this.rootPath = rootPath;
  }

  static async open(rootName: string): Promise<CgroupTree> {
    const mounts = await readCgroupMounts();
    if (mounts.v2 && (await fileExists(join(mounts.v2, 'cgroup.procs')))) {
      return new CgroupTree(2, join(mounts.v2, rootName));
    }
    if (mounts.v1Freezer) return new CgroupTree(1, join(mounts.v1Freezer, rootName));
    throw new FerryError('CGROUP_FAILED', 'no cgroup v2 hierarchy and no v1 freezer is mounted', { phase: 'setup' });
  }

  for(name: string): Cgroup {
    return new Cgroup(this.version, join(this.rootPath, name));
  }
}
