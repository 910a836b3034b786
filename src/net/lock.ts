// The network lock of a container with its own address: from the freeze until
// the decision, nothing enters or leaves its namespace (ARP included), so no
// byte is acknowledged by a copy that will not go on. CRIU's own lock ends
// with its dump (--leave-running), hence this one. The tables are part of the
// namespace, so CRIU carries them over: the restored copy starts locked too.
import { execa } from 'execa';
import { FerryError, type Phase } from '../errors.ts';

import { readlink } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';

export const lockTable = 'ferry_lock';

// No exemption for CRIU's SOCCR_MARK (its own lock has one): a container with
// CAP_NET_RAW may set that mark itself, and restoring established connections
// sends nothing.
const lockRuleset = `
table inet ${lockTable} {
  chain input { type filter hook input priority -300; policy drop; iifname "lo" accept; }
  chain output { type filter hook output priority -300; policy drop; oifname "lo" accept; }
}
table arp ${lockTable} {
  chain input { type filter hook input priority -300; policy drop; }
  chain output { type filter hook output priority -300; policy drop; }
}
`;

/**
 * The namespace of `pid` must be its own, not this agent's: a spec that claims
 * an own address without an own namespace must not get the host's tables touched.
 */
export async function requireOwnNamespace(pid: number, phase: Phase): Promise<void> {
  const [theirs, ours] = await Promise.all([readlink(`/proc/${pid}/ns/net`).catch(() => ''), readlink('/proc/self/ns/net')]);
  if (!theirs || theirs === ours) {
    throw new FerryError('INTERNAL', `process ${pid} is not in a network namespace of its own`, { phase });
  }
}

async function nft(pid: number, script: string, phase: Phase): Promise<void> {
  await requireOwnNamespace(pid, phase);
  const result = await execa('nsenter', [`--net=/proc/${pid}/ns/net`, 'nft', '-f', '-'], { input: script, reject: false, timeout: 10_000 });
  if (result.exitCode !== 0) {
    throw new FerryError('INTERNAL', `nft in the container's network namespace failed: ${result.stderr.trim() || result.exitCode}`, { phase });
  }
}

/** Locks the network namespace of `pid` (a second lock adds the same rules again: harmless). */
export async function lockNetwork(pid: number, phase: Phase): Promise<void> {
  await nft(pid, lockRuleset, phase);
}

/** Removes the lock, retrying a few times (a copy left locked is cut off); a namespace without one is left as it is. */
export async function unlockNetwork(pid: number, phase: Phase): Promise<void> {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await unlockOnce(pid, phase);
    } catch (error) {
      if (attempt >= 3) throw error;
      await sleep(200 * attempt);
    }
  }
}

async function unlockOnce(pid: number, phase: Phase): Promise<void> {
  await requireOwnNamespace(pid, phase);
  const present = await lockFamilies(pid, phase);
  if (!present.length) return;
  await nft(pid, present.map((family) => `delete table ${family} ${lockTable}\n`).join(''), phase);
}

/** Whether the namespace of `pid` is locked (both tables present). */
export async function isNetworkLocked(pid: number, phase: Phase): Promise<boolean> {
  return (await lockFamilies(pid, phase)).length === 2;
}

/** The families (inet, arp) that hold a lock table in the namespace of `pid`. */
async function lockFamilies(pid: number, phase: Phase): Promise<string[]> {
  const listed = await execa('nsenter', [`--net=/proc/${pid}/ns/net`, 'nft', 'list', 'tables'], { reject: false, timeout: 10_000 });
  if (listed.exitCode !== 0) {
    throw new FerryError('INTERNAL', `nft list tables in the container's network namespace failed: ${listed.stderr.trim()}`, { phase });
  }
  // Matched by exact name: nothing of the container's listing goes back into a script.
  const lines = new Set(listed.stdout.split('\n').map((line) => line.trim()));
  return ['inet', 'arp'].filter((family) => lines.has(`table ${family} ${lockTable}`));
}
