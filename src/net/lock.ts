// The network lock of a container with its own address: from the freeze until
// the decision, nothing enters or leaves its namespace (ARP included), so no
// byte is acknowledged by a copy that will not go on. CRIU's own lock ends
// with its dump (--leave-running), hence this one. The tables are part of the
// namespace, so CRIU carries them over: the restored copy starts locked too.
import { execa } from 'execa';
import { FerryError, type Phase } from '../errors.ts';

/** SOCCR_MARK: packets CRIU itself sends while it restores connections. */
const criuMark = '0xc114';
export const lockTable = 'ferry_lock';

const lockRuleset = `
table inet ${lockTable} {
  chain input { type filter hook input priority -300; policy drop; iifname "lo" accept; meta mark ${criuMark} accept; }
  chain output { type filter hook output priority -300; policy drop; oifname "lo" accept; meta mark ${criuMark} accept; }
}
table arp ${lockTable} {
  chain input { type filter hook input priority -300; policy drop; }
  chain output { type filter hook output priority -300; policy drop; }
}
`;

async function nft(pid: number, script: string, phase: Phase): Promise<void> {
  const result = await execa('nsenter', [`--net=/proc/${pid}/ns/net`, 'nft', '-f', '-'], { input: script, reject: false, timeout: 10_000 });
  if (result.exitCode !== 0) {
    throw new FerryError('INTERNAL', `nft in the container's network namespace failed: ${result.stderr.trim() || result.exitCode}`, { phase });
  }
}

/** Locks the network namespace of `pid`. */
export async function lockNetwork(pid: number, phase: Phase): Promise<void> {
  // "add" leaves an existing table as it is, so locking twice is harmless.
  await nft(pid, lockRuleset, phase);
}

/** Removes the lock; a namespace that holds none is left as it is. */
export async function unlockNetwork(pid: number, phase: Phase): Promise<void> {
  const listed = await execa('nsenter', [`--net=/proc/${pid}/ns/net`, 'nft', 'list', 'tables'], { reject: false, timeout: 10_000 });
  if (listed.exitCode !== 0) {
    throw new FerryError('INTERNAL', `nft list tables in the container's network namespace failed: ${listed.stderr.trim()}`, { phase });
  }
  const present = listed.stdout.split('\n').map((line) => line.trim()).filter((line) => line.endsWith(` ${lockTable}`));
  if (!present.length) return;
  await nft(pid, present.map((line) => `delete ${line}\n`).join(''), phase);
}

/** Whether the namespace of `pid` is locked (both tables present). */
export async function isNetworkLocked(pid: number): Promise<boolean> {
  const listed = await execa('nsenter', [`--net=/proc/${pid}/ns/net`, 'nft', 'list', 'tables'], { reject: false, timeout: 10_000 });
  const lines = listed.stdout.split('\n').map((line) => line.trim());
  return lines.includes(`table inet ${lockTable}`) && lines.includes(`table arp ${lockTable}`);
}
