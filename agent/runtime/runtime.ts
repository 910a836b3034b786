import { createReadStream } from 'node:fs';
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createGunzip } from 'node:zlib';
import { execa } from 'execa';
import type { Logger } from 'pino';
import { Cgroup, CgroupTree } from '../../src/cgroup/cgroup.ts';
import { FerryError } from '../../src/errors.ts';
import { namespacePrefix } from '../../src/net/address.ts';
import type { ContainerInfo, ContainerSpec, ContainerStatus } from '../../src/protocol/container.ts';
import { readTailBeneath } from '../../src/rootfs/safe-fs.ts';
import { unpackInto } from '../../src/rootfs/unpack.ts';
import { consoleLogPath, startContainer } from './helper.ts';
import { announceAddress, prepareNamespace, probeAddress, removeHostEnd, requireBridge, type PreparedNamespace } from './network.ts';
import { isSameProcess, processStartTime, residentBytes } from './process.ts';
import { ContainerStore, type ContainerRecord } from './store.ts';

export interface RuntimeOptions {
  stateDir: string;
  cgroups: CgroupTree;
  /** This host's name, recorded in each container's history. */
  hostName: string;
  logger: Logger;
  /** The host bridge that containers with their own address attach to. */
  bridge?: string;
}

/** Runs containers that CRIU can dump, and remembers them across agent restarts. */
export class ContainerRuntime {
  readonly store: ContainerStore;
  readonly cgroups: CgroupTree;
  readonly hostName: string;
  readonly bridge: string | undefined;
  /** Of the network namespaces this agent prepares (see namespacePrefix). */
  readonly namespacePrefix: string;
  private readonly logger: Logger;
  /**
   * Names being created, moved away or removed right now, so two requests
   * cannot race for one name; each claim has its own token, so a claim only
   * ever releases itself.
   */
  private readonly claimed = new Map<string, symbol>();

  constructor(options: RuntimeOptions) {
    this.store = new ContainerStore(options.stateDir);
    this.cgroups = options.cgroups;
    this.hostName = options.hostName;
    this.bridge = options.bridge;
    this.namespacePrefix = namespacePrefix(options.stateDir);
    this.logger = options.logger;
  }

  cgroup(name: string): Cgroup {
    return this.cgroups.for(name);
  }

  /** Reserves a name; throws NAME_IN_USE when a container has it. */
  async claim(name: string): Promise<() => void> {
    const inUse = () => new FerryError('NAME_IN_USE', `a container named ${name} already exists on ${this.hostName}`);
    // Taken before the await, so two requests for one name cannot both pass.
    if (this.claimed.has(name)) throw inUse();
    const release = this.take(name);
    if (await this.store.read(name).catch(() => undefined)) {
      release();
      throw inUse();
    }
    return release;
  }

  /**
   * Holds an existing container for one operation that takes it away (a
   * migration out): a second one is refused until this one releases it.
   */
  hold(name: string, refusal: () => FerryError): () => void {
    if (this.claimed.has(name)) throw refusal();
    return this.take(name);
  }

  private take(name: string): () => void {
    const token = Symbol(name);
    this.claimed.set(name, token);
    return () => {
      if (this.claimed.get(name) === token) this.claimed.delete(name);
    };
  }

  async run(requested: ContainerSpec): Promise<ContainerInfo> {
    // An own address means an own network namespace.
    const spec: ContainerSpec = requested.network ? { ...requested, privateNetwork: true } : requested;
    const release = await this.claim(spec.name);
    const cgroup = this.cgroup(spec.name);
    let netns: PreparedNamespace | undefined;
    try {
      if (spec.network) {
        const bridge = await requireBridge(this.bridge, 'runtime');
        await probeAddress(bridge, spec.network.address, 'runtime');
        netns = await prepareNamespace(spec.name, spec.network, bridge, this.namespacePrefix);
      }
      const rootfs = this.store.rootfs(spec.name);
      await this.store.create(spec.name);
      await copyRootfs(spec.rootfs, rootfs);
      await cgroup.create();
      const pid = await startContainer(spec, rootfs, cgroup.procsFile, netns?.path);
      await netns?.release();
      netns = undefined;
      if (spec.network) {
        await announceAddress(pid, spec.network).catch((error: unknown) => this.logger.warn({ container: spec.name, err: error }, 'address announcement failed'));
      }
      const record: ContainerRecord = {
        spec,
        pid,
        pidStartTime: (await processStartTime(pid)) ?? 0,
        createdAt: new Date().toISOString(),
        history: [this.hostName],
      };
      await this.store.write(record);
      this.logger.info({ container: spec.name, pid }, 'container started');
      return await this.describe(record);
    } catch (error) {
      await netns?.discard();
      await cgroup.kill().catch(() => undefined);
      if (spec.network) await removeHostEnd(spec.name);
      await cgroup.remove().catch(() => undefined);
      await this.store.remove(spec.name);
      throw error;
    } finally {
      release();
    }
  }

  async get(name: string): Promise<ContainerRecord> {
    const record = await this.store.read(name);
    if (!record) throw new FerryError('NOT_FOUND', `no container named ${name} on ${this.hostName}`);
    return record;
  }

  async list(): Promise<ContainerInfo[]> {
    const records = await Promise.all((await this.store.names()).map((name) => this.store.read(name)));
    return Promise.all(records.filter((record) => record !== undefined).map((record) => this.describe(record)));
  }

  async status(record: ContainerRecord): Promise<ContainerStatus> {
    if (record.migrationId) return 'migrating';
    const cgroup = this.cgroup(record.spec.name);
    if (!(await isSameProcess(record.pid, record.pidStartTime)) || !(await cgroup.pids()).length) return 'stopped';
    return (await cgroup.isFrozen().catch(() => false)) ? 'frozen' : 'running';
  }

  async describe(record: ContainerRecord): Promise<ContainerInfo> {
    const pids = await this.cgroup(record.spec.name).pids();
    return {
      name: record.spec.name,
      status: await this.status(record),
      pid: record.pid,
      command: record.spec.command,
      createdAt: record.createdAt,
      history: record.history,
      memoryBytes: await residentBytes(pids),
      ...(record.spec.network ? { address: `${record.spec.network.address}/${record.spec.network.prefix}` } : {}),
      labels: record.spec.labels,
    };
  }

  logPath(name: string): string {
    return join(this.store.rootfs(name), consoleLogPath);
  }

  /** The last `tailBytes` of the container's console log. */
  async logs(name: string, tailBytes = 64 * 1024): Promise<string> {
    await this.get(name);
    // The container controls its rootfs: read by handle, never through a link it planted.
    return readTailBeneath(this.store.rootfs(name), consoleLogPath, tailBytes).toString('utf8');
  }

  /** SIGTERM to the init, then SIGKILL through the cgroup after the grace period. */
  async stop(name: string, graceMs = 5_000): Promise<ContainerInfo> {
    const record = await this.get(name);
    const cgroup = this.cgroup(name);
    if (await cgroup.isFrozen().catch(() => false)) await cgroup.thaw();
    if (await isSameProcess(record.pid, record.pidStartTime)) process.kill(record.pid, 'SIGTERM');
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline && (await cgroup.pids()).length) await sleep(50);
    await cgroup.kill();
    this.logger.info({ container: name }, 'container stopped');
    return this.describe(record);
  }

  /** Removes a stopped container (or any, with force) and everything it owns. */
  async remove(name: string, force = false): Promise<void> {
    const record = await this.get(name);
    if (!force && (await this.status(record)) !== 'stopped') {
      throw new FerryError('BAD_REQUEST', `container ${name} is not stopped; stop it first or use --force`);
    }
    await this.destroy(name);
    this.logger.info({ container: name }, 'container removed');
  }

  /** Kills the tasks and removes cgroup and state; used by rm and after a migration left. */
  async destroy(name: string): Promise<void> {
    const cgroup = this.cgroup(name);
    await cgroup.kill();
    // Its own address's veth goes now, not when the kernel gets round to freeing the namespace.
    await removeHostEnd(name);
    await cgroup.remove();
    await this.store.remove(name);
  }

  /**
   * After a destroy failed for a container that now lives elsewhere: its
   * state goes at once, and the cgroup is retried for a bounded time.
   */
  async forget(name: string): Promise<void> {
    await this.store.remove(name);
    // The name stays claimed meanwhile: a new container of that name must not share the cgroup being killed.
    const release = this.take(name);
    const cgroup = this.cgroup(name);
    void (async () => {
      try {
        for (let attempt = 1; attempt <= 10; attempt += 1) {
          await sleep(10_000);
          const removed = await cgroup.kill().then(() => cgroup.remove()).then(() => true, (error: unknown) => {
            this.logger.warn({ container: name, err: error, attempt }, 'cgroup of a departed container not removed yet');
            return false;
          });
          if (removed) return;
        }
      } finally {
        release();
      }
    })();
  }
}

/** Copies a rootfs directory, or unpacks a rootfs tarball, into the container's own directory. */
async function copyRootfs(source: string, destination: string): Promise<void> {
  const stats = await stat(source).catch(() => undefined);
  if (!stats) throw new FerryError('ROOTFS_MISSING', `rootfs ${source} does not exist`, { phase: 'runtime' });
  await mkdir(destination, { recursive: true });
  if (stats.isDirectory()) {
    // cp -a keeps owners, modes, links and device nodes, which fs.cp does not.
    await execa('cp', ['-a', '--', `${source}/.`, destination]);
    return;
  }
  const input = createReadStream(source);
  await unpackInto(destination, /\.t?gz$/.test(source) ? input.pipe(createGunzip()) : input);
}
