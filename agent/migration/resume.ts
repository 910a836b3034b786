import { FerryError } from '../../src/errors.ts';
import { unlockNetwork } from '../../src/net/lock.ts';
import { announceAddress } from '../runtime/network.ts';
import { processState } from '../runtime/process.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';

/**
 * Lets a container restored with --leave-stopped run: its network lock comes
 * off (it came locked from the source), SIGCONT to each of its processes, and
 * the segment hears where its address is now.
 */
export async function resumeContainer(runtime: ContainerRuntime, name: string, warn: (message: string) => void = () => undefined): Promise<void> {
  const record = await runtime.get(name);
  const pids = await runtime.cgroup(name).pids();
  if (!pids.length) throw new FerryError('CONTAINER_NOT_RUNNING', `restored container ${name} has no tasks`, { phase: 'confirm' });
  // Unlocked first: a running process behind the lock would see its sends fail.
  // A lock that will not come off is the operator's to fix; the committed copy still runs, it is never dropped for it.
  if (record.spec.network) {
    await unlockNetwork(record.pid, 'confirm').catch((error: unknown) =>
      warn(`container ${name} runs, but its network lock could not be removed (nft delete table inet ferry_lock in its namespace): ${error instanceof Error ? error.message : String(error)}`),
    );
  }
  for (const pid of pids) signalIfAlive(pid, 'SIGCONT');
  const { migrationId: _, ...running } = record;
  await runtime.store.write(running);
  const state = await processState(record.pid);
  if (state === undefined || state === 'Z') {
    throw new FerryError('CONTAINER_NOT_RUNNING', `container ${name} died on resume`, { phase: 'confirm' });
  }
  // Not awaited (its repeats take 200 ms, which would count as downtime) and best effort:
  // without it peers still find the address once their ARP entries expire.
  if (record.spec.network) void announceAddress(record.pid, record.spec.network).catch(() => undefined);
}

/** A task may exit between the listing and the signal; that is not a failure to resume. */
export function signalIfAlive(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
  }
}
