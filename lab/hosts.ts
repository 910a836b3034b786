// N "hosts" on this machine: one netns each, joined through a bridge in a
// switch netns, each with its own state dir and cgroup dir. A controller link
// from the root netns to the switch lets the test process itself reach the
// agents. Clusters not destroyed by the test are cleaned up on exit/signals.
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { claimRun, cleanupRun, cleanupRunSync, cleanupScope, type RunClaim } from './cleanup.ts';
import { clusterScope } from './leftovers.ts';
import { clusterNames, runId, type ClusterNames } from './run-id.ts';
import {
  LabError,
  execInNetns,
  hostCgroupParent,
  ip,
  ipIn,
  waitFor,
  type CommandResult,
  type RunOptions,
} from './system.ts';

export interface Host {
  /** Cluster-local name: h0, h1, ... */
  name: string;
  netns: string;
  /** IPv4 address of eth0, without the prefix length (/24). */
  address: string;
  stateDir: string;
  /** Absolute path of the host's cgroup dir. */
  cgroupRoot: string;
  /** Its name, directly under the cgroup mount (what the agent's --cgroup-root takes). */
  cgroupName: string;
  /** With the bridged option: the bridge (holding eth0 and the host's address) for containers with their own address. */
  bridge: string | undefined;
  /** Its port on the switch's bridge (in the cluster's switch netns). */
  switchPort: string;
  /** Runs a command to completion inside the host's netns. */
  exec(command: string, args: readonly string[], options?: RunOptions): Promise<CommandResult>;
  /** Cuts the host's link (eth0 down), e.g. in the middle of a transfer. */
  setLinkDown(): Promise<void>;
  /** Restores it; resolves once eth0 is operationally up again. */
  setLinkUp(): Promise<void>;
}

export interface Cluster {
  runId: string;
  /** c1, c2, ...: unique within the test process. */
  id: string;
  hosts: Host[];
  /** e.g. 10.203.17.0/24 */
  subnet: string;
  /** The netns of the switch that joins the hosts, and its bridge. */
  switchNetns: string;
  switchBridge: string;
  /** The root netns's address on the switch, or undefined without a controller link. */
  controllerAddress: string | undefined;
  /** Removes everything of this cluster; safe to call more than once. */
  destroy(): Promise<void>;
}

export interface CreateHostsOptions {
  /** Connect the root netns (the test process) to the switch. Default true. */
  controller?: boolean;
  /**
   * Set each host up as an operator does for containers with their own
   * address: eth0 enslaved to a bridge br0 that holds the host's address.
   */
  bridged?: boolean;
}

/** The bridge of a bridged host (what its agent's --bridge names). */
export const HOST_BRIDGE = 'br0';
/** Container addresses on a cluster's /24 start here (hosts are .1 up, the controller .254). */
const CONTAINER_HOST_PART = 100;

/** The n-th container address of a cluster (n from 0), e.g. 10.203.17.100, and its prefix length. */
export function containerAddress(cluster: Cluster, n: number): { address: string; prefix: number } {
  if (!Number.isInteger(n) || n < 0 || n > 100) throw new RangeError(`container address index ${n} is outside 0..100`);
  return { address: `${cluster.subnet.split('.').slice(0, 3).join('.')}.${CONTAINER_HOST_PART + n}`, prefix: 24 };
}

const MAX_HOSTS = 200;
const CONTROLLER_HOST_PART = 254;
const LINK_UP_TIMEOUT_MS = 10_000;

let clusterCount = 0;
const liveClusters = new Set<Cluster>();
/** Held while any cluster of this process is live. */
let runClaim: RunClaim | undefined;
/** Claiming and releasing the run are serialized, so they cannot interleave. */
let runDirQueue: Promise<unknown> = Promise.resolve();

function serialized<T>(operation: () => Promise<T>): Promise<T> {
  const result = runDirQueue.then(operation);
  runDirQueue = result.catch(() => undefined);
  return result;
}

export async function createHosts(count: number, options: CreateHostsOptions = {}): Promise<Cluster> {
  if (!Number.isInteger(count) || count < 1 || count > MAX_HOSTS) {
    throw new RangeError(`host count must be an integer from 1 to ${MAX_HOSTS}, got ${count}`);
  }
  clusterCount += 1;
  const names = clusterNames(runId, clusterCount);
  let destroying: Promise<void> | undefined;
  const cluster: Cluster = {
    runId,
    id: names.id,
    hosts: [],
    subnet: '',
    switchNetns: names.switchNetns,
    switchBridge: names.bridge,
    controllerAddress: undefined,
    destroy() {
      destroying ??= destroyCluster(cluster, names).catch((error: unknown) => {
        destroying = undefined; // let a later call retry
        throw error;
      });
      return destroying;
    },
  };
  // Registered before anything exists, so an interruption from here on cleans up.
  liveClusters.add(cluster);
  installInterruptHandlers();
  try {
    await serialized(async () => {
      runClaim ??= await claimRun(runId);
    });
    await buildCluster(cluster, names, count, options.controller ?? true, options.bridged ?? false);
    return cluster;
  } catch (error) {
    await cluster.destroy().catch(() => undefined);
    throw error;
  }
}

/** Creates a cluster, runs fn on it, and destroys it whatever fn does. */
export async function withCluster<T>(
  count: number,
  fn: (cluster: Cluster) => Promise<T>,
  options?: CreateHostsOptions,
): Promise<T> {
  const cluster = await createHosts(count, options);
  let result: T;
  try {
    result = await fn(cluster);
  } catch (error) {
    // The test's own error comes first; a failed teardown must not hide it.
    await cluster.destroy().catch((destroyError: unknown) => {
      throw new AggregateError([error, destroyError], 'test failed, then destroying its cluster failed too');
    });
    throw error;
  }
  await cluster.destroy();
  return result;
}

async function destroyCluster(cluster: Cluster, names: ClusterNames): Promise<void> {
  await cleanupScope(clusterScope(runId, names));
  liveClusters.delete(cluster);
  // The last cluster takes the run dir (and its owner file) with it.
  if (liveClusters.size === 0) {
    await serialized(async () => {
      if (liveClusters.size > 0) return;
      await cleanupRun(runId);
      runClaim?.release();
      runClaim = undefined;
    });
  }
}

async function buildCluster(cluster: Cluster, names: ClusterNames, count: number, controller: boolean, bridged: boolean): Promise<void> {
  const subnet = await pickSubnet(cluster);
  cluster.subnet = `${subnet}.0/24`;
  await ip(['netns', 'add', names.switchNetns]);
  await ipIn(names.switchNetns, ['link', 'set', 'lo', 'up']);
  await ipIn(names.switchNetns, ['link', 'add', names.bridge, 'type', 'bridge']);
  await ipIn(names.switchNetns, ['link', 'set', names.bridge, 'up']);
  const cgroupParent = await hostCgroupParent();
  for (let index = 0; index < count; index++) {
    cluster.hosts.push(await buildHost(names, index, `${subnet}.${index + 1}`, cgroupParent, bridged));
  }
  if (controller) {
    cluster.controllerAddress = `${subnet}.${CONTROLLER_HOST_PART}`;
    await ip(['link', 'add', names.controllerLink, 'type', 'veth', 'peer', 'name', names.controllerPeer, 'netns', names.switchNetns]);
    await ipIn(names.switchNetns, ['link', 'set', names.controllerPeer, 'master', names.bridge, 'up']);
    await ip(['addr', 'add', `${cluster.controllerAddress}/24`, 'dev', names.controllerLink]);
    await ip(['link', 'set', names.controllerLink, 'up']);
  }
  for (const host of cluster.hosts) await waitForEth0Up(host.netns);
}

async function buildHost(names: ClusterNames, index: number, address: string, cgroupParent: string, bridged: boolean): Promise<Host> {
  const { name, netns, cgroupName, stateDir, switchPort } = names.host(index);
  await ip(['netns', 'add', netns]);
  // Both ends are created directly in their netns: nothing appears in the root netns.
  await ipIn(names.switchNetns, ['link', 'add', switchPort, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns]);
  await ipIn(names.switchNetns, ['link', 'set', switchPort, 'master', names.bridge, 'up']);
  if (bridged) {
    // The bridge keeps eth0's MAC: left to itself it takes the lowest MAC of its ports, and a
    // container's veth joining or leaving would change the host's own MAC under its peers' ARP caches.
    const { stdout } = await ipIn(netns, ['-j', 'link', 'show', 'eth0']);
    const [eth0] = JSON.parse(stdout) as Array<{ address: string }>;
    await ipIn(netns, ['link', 'add', HOST_BRIDGE, 'address', eth0!.address, 'type', 'bridge']);
    await ipIn(netns, ['link', 'set', 'eth0', 'master', HOST_BRIDGE]);
    await ipIn(netns, ['addr', 'add', `${address}/24`, 'dev', HOST_BRIDGE]);
    await ipIn(netns, ['link', 'set', HOST_BRIDGE, 'up']);
  } else {
    await ipIn(netns, ['addr', 'add', `${address}/24`, 'dev', 'eth0']);
  }
  await ipIn(netns, ['link', 'set', 'lo', 'up']);
  await ipIn(netns, ['link', 'set', 'eth0', 'up']);
  await mkdir(stateDir, { recursive: true });
  const cgroupRoot = join(cgroupParent, cgroupName);
  await mkdir(cgroupRoot);
  return {
    name,
    netns,
    address,
    stateDir,
    cgroupRoot,
    cgroupName,
    bridge: bridged ? HOST_BRIDGE : undefined,
    switchPort,
    exec: (command, args, options) => execInNetns(netns, command, args, options),
    async setLinkDown() {
      await ipIn(netns, ['link', 'set', 'eth0', 'down']);
    },
    async setLinkUp() {
      await ipIn(netns, ['link', 'set', 'eth0', 'up']);
      await waitForEth0Up(netns);
    },
  };
}

async function waitForEth0Up(netns: string): Promise<void> {
  await waitFor(`eth0 in ${netns} to come up`, LINK_UP_TIMEOUT_MS, async () => {
    const { stdout } = await ipIn(netns, ['-j', 'link', 'show', 'eth0']);
    const [link] = JSON.parse(stdout) as Array<{ operstate?: string }>;
    return link?.operstate === 'UP' ? true : undefined;
  });
}

/**
 * A /24 in 10.200.0.0/13 derived from the run id and cluster, moved on past
 * any subnet the root netns already routes, so that concurrent runs' controller
 * links do not collide. Returns the first three octets.
 */
async function pickSubnet(cluster: Cluster): Promise<string> {
  const { stdout } = await ip(['-4', '-j', 'route', 'show', 'table', 'all']);
  const used = new Set((JSON.parse(stdout) as Array<{ dst?: string }>).map((route) => route.dst));
  const slots = 8 * 256;
  const start = parseInt(cluster.runId, 16) + Number(cluster.id.slice(1));
  for (let offset = 0; offset < slots; offset++) {
    const slot = (start + offset) % slots;
    const prefix = `10.${200 + Math.floor(slot / 256)}.${slot % 256}`;
    if (!used.has(`${prefix}.0/24`)) return prefix;
  }
  throw new LabError('NO_SUBNET', 'every /24 in 10.200.0.0/13 is already routed');
}

let handlersInstalled = false;

/** Signals and exit leave no time for async work: clean up through a child process. */
function installInterruptHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  const cleanupLive = () => {
    if (liveClusters.size === 0) return;
    liveClusters.clear();
    cleanupRunSync(runId);
  };
  process.on('exit', cleanupLive);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      cleanupLive();
      // Re-raise for the default action (exit), unless someone else handles it.
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    });
  }
}
