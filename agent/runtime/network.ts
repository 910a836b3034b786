// A container's own address on a host bridge: the namespace and veth made
// before it starts, the duplicate-address probe, and the announcement that
// tells the segment where the address lives now.
import { randomBytes } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { execa } from 'execa';
import { z } from 'zod';
import { FerryError, type Phase } from '../../src/errors.ts';
import { containerInterface, hostInterfaceName, type NetworkSpec } from '../../src/net/address.ts';
import { requireOwnNamespace, unlockNetwork } from '../../src/net/lock.ts';
import { helperPath } from '../../src/paths.ts';
import { signalIfAlive } from './process.ts';

async function ip(args: string[], phase: Phase): Promise<string> {
  const result = await execa('ip', args, { reject: false, timeout: 10_000 });
  if (result.exitCode !== 0) {
    throw new FerryError('CONTAINER_SETUP_FAILED', `ip ${args.join(' ')}: ${result.stderr.trim() || result.exitCode}`, { phase });
  }
  return result.stdout;
}

/** Refuses a bridge that this host does not have (or that is not a bridge). */
export async function requireBridge(bridge: string | undefined, phase: Phase): Promise<string> {
  if (!bridge) {
    throw new FerryError('NO_BRIDGE', 'this agent has no bridge for container addresses (start it with --bridge BRIDGE)', { phase });
  }
  const result = await execa('ip', ['-j', '-d', 'link', 'show', 'dev', bridge], { reject: false, timeout: 10_000 });
  const [link] = result.exitCode === 0 ? (JSON.parse(result.stdout) as Array<{ linkinfo?: { info_kind?: string } }>) : [];
  if (!link) throw new FerryError('NO_BRIDGE', `bridge ${bridge} does not exist on this host`, { phase });
  if (link.linkinfo?.info_kind !== 'bridge') throw new FerryError('NO_BRIDGE', `${bridge} is not a Linux bridge`, { phase });
  return bridge;
}

const probeReply = z.union([
  z.object({ inUse: z.literal(false) }),
  z.object({ inUse: z.literal(true), macs: z.array(z.string()) }),
  z.object({ error: z.string(), message: z.string() }),
]);

/**
 * RFC 5227 probe on the bridge: who answers for `address`. `owner` (the
 * container's own MAC, during a migration) does not count as a conflict.
 */
export async function probeAddress(bridge: string, address: string, phase: Phase, owner?: string): Promise<void> {
  const result = await execa(helperPath(), ['arp-probe', '--dev', bridge, '--ip', address, '--timeout-ms', '1000'], { reject: false, timeout: 10_000 });
  let reply: z.infer<typeof probeReply>;
  try {
    reply = probeReply.parse(JSON.parse(`${result.stdout}`.trim().split('\n').at(-1) ?? ''));
  } catch {
    throw new FerryError('INTERNAL', `arp-probe failed: ${result.stderr || result.stdout || result.exitCode}`, { phase });
  }
  if ('error' in reply) throw new FerryError('INTERNAL', `arp-probe: ${reply.message}`, { phase });
  if (!reply.inUse) return;
  const others = reply.macs.filter((mac) => mac.toLowerCase() !== owner?.toLowerCase());
  if (others.length) {
    throw new FerryError('ADDRESS_IN_USE', `${address} is already in use on the segment of ${bridge} (answered by ${others.join(', ')})`, { phase });
  }
}

/** Gratuitous ARP from inside the container: switches and peers learn the address's new port at once. */
export async function announceAddress(pid: number, network: NetworkSpec): Promise<void> {
  await requireOwnNamespace(pid, 'confirm');
  const result = await execa(
    helperPath(),
    ['arp-announce', '--netns', `/proc/${pid}/ns/net`, '--dev', containerInterface, '--ip', network.address, '--count', '3'],
    { reject: false, timeout: 10_000 },
  );
  if (result.exitCode !== 0) {
    throw new FerryError('INTERNAL', `arp-announce failed: ${result.stdout || result.stderr}`, { phase: 'confirm' });
  }
}

export interface PreparedNamespace {
  /** Where ferry-helper joins it (a bind mount under /run/netns). */
  path: string;
  /** After the container holds the namespace: drop the mount (the namespace lives on with the container). */
  release(): Promise<void>;
  /** The container did not start: remove the namespace and the veth. */
  discard(): Promise<void>;
}

/**
 * A network namespace with the container's eth0 (its MAC and address, a
 * default route via the gateway) and the host end of the veth on the bridge.
 */
export async function prepareNamespace(container: string, network: NetworkSpec, bridge: string, prefix: string): Promise<PreparedNamespace> {
  const name = `${prefix}${randomBytes(4).toString('hex')}`;
  const hostEnd = hostInterfaceName(container);
  const phase: Phase = 'runtime';
  await ip(['netns', 'add', name], phase);
  const discard = async () => {
    await execa('ip', ['link', 'del', hostEnd], { reject: false });
    await execa('ip', ['netns', 'del', name], { reject: false });
  };
  try {
    await removeHostEnd(container);
    await ip(['link', 'add', hostEnd, 'type', 'veth', 'peer', 'name', containerInterface, 'netns', name], phase);
    await ip(['-n', name, 'link', 'set', containerInterface, 'address', network.mac], phase);
    await ip(['-n', name, 'addr', 'add', `${network.address}/${network.prefix}`, 'dev', containerInterface], phase);
    await ip(['-n', name, 'link', 'set', 'lo', 'up'], phase);
    await ip(['-n', name, 'link', 'set', containerInterface, 'up'], phase);
    if (network.gateway) await ip(['-n', name, 'route', 'add', 'default', 'via', network.gateway], phase);
    await ip(['link', 'set', hostEnd, 'master', bridge, 'up'], phase);
  } catch (error) {
    await discard();
    throw error;
  }
  return {
    path: `/run/netns/${name}`,
    release: async () => void (await execa('ip', ['netns', 'del', name], { reject: false })),
    discard,
  };
}

/**
 * Removes the host end of a container's veth, if one is left. The kernel
 * frees the namespace of killed tasks (and so the veth) asynchronously: a
 * copy killed moments ago can still hold the name a restore needs.
 */
export async function removeHostEnd(container: string): Promise<void> {
  await execa('ip', ['link', 'del', hostInterfaceName(container)], { reject: false, timeout: 10_000 });
}

/** Namespaces a crashed agent prepared and never handed to a container. */
export async function removeStaleNamespaces(prefix: string): Promise<void> {
  const names = await readdir('/run/netns').catch(() => [] as string[]);
  for (const name of names.filter((entry) => entry.startsWith(prefix))) {
    await execa('ip', ['netns', 'del', name], { reject: false, timeout: 10_000 });
  }
}

/** CRIU's --external for the restore: the veth's host end, on this host's bridge. */
export function vethExternal(container: string, bridge: string): string {
  return `veth[${containerInterface}]:${hostInterfaceName(container)}@${bridge}`;
}

/**
 * A copy restored stopped and locked goes on: unlocked first (a running
 * process behind the lock would see its sends fail), every task resumed,
 * then the address announced. The announcement is not awaited (its repeats
 * take 200 ms, which would count as downtime) and is best effort: without it
 * peers still find the address once their ARP entries expire.
 */
export async function goLive(
  pid: number,
  tasks: number[],
  network: NetworkSpec | undefined,
  phase: Phase,
  unlockFailed: (error: unknown) => void,
): Promise<void> {
  if (network) await unlockNetwork(pid, phase).catch(unlockFailed);
  for (const task of tasks) signalIfAlive(task, 'SIGCONT');
  if (network) void announceAddress(pid, network).catch(() => undefined);
}
