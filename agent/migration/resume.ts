import { FerryError, toFerryError } from '../../src/errors.ts';
import { goLive } from '../runtime/network.ts';
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
  // A lock that will not come off is the operator's to fix; the committed copy still runs, it is never dropped for it.
  await goLive(record.pid, pids, record.spec.network, 'confirm', (error) =>
    warn(`container ${name} runs, but its network lock could not be removed (nft delete table inet ferry_lock in its namespace): ${toFerryError(error).message}`),
  );
  const { migrationId: _, ...running } = record;
  await runtime.store.write(running);
  const state = await processState(record.pid);
  if (state === undefined || state === 'Z') {
    throw new FerryError('CONTAINER_NOT_RUNNING', `container ${name} died on resume`, { phase: 'confirm' });
  }
}
