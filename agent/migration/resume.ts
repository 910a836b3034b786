import { FerryError } from '../../src/errors.ts';
import { processState } from '../runtime/process.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';

/** Lets a container restored with --leave-stopped run: SIGCONT to each of its processes. */
export async function resumeContainer(runtime: ContainerRuntime, name: string): Promise<void> {
  const record = await runtime.get(name);
  const pids = await runtime.cgroup(name).pids();
  if (!pids.length) throw new FerryError('CONTAINER_NOT_RUNNING', `restored container ${name} has no tasks`, { phase: 'confirm' });
  for (const pid of pids) process.kill(pid, 'SIGCONT');
  const { migrationId: _, ...running } = record;
  await runtime.store.write(running);
  const state = await processState(record.pid);
  if (state === undefined || state === 'Z') {
    throw new FerryError('CONTAINER_NOT_RUNNING', `container ${name} died on resume`, { phase: 'confirm' });
  }
}
