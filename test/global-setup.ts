// vitest globalSetup: removes what interrupted earlier runs left behind (runs
// whose owner process is gone), before any test creates hosts. Live runs of
// other test processes are left alone.
import { cleanupStale } from '../lab/cleanup.ts';

export default async function setup(): Promise<void> {
  const cleaned = await cleanupStale();
  if (cleaned.length) console.warn(`ferry lab: removed leftovers of interrupted runs ${cleaned.join(', ')}`);
}
