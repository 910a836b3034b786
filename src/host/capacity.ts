// What a host offers containers: free disk under a path, memory and CPUs.
import { statfs } from 'node:fs/promises';
import { cpus, freemem, totalmem } from 'node:os';
import { join } from 'node:path';

/** Free bytes where `path` (or its nearest existing parent) lives. */
export async function freeBytes(path: string): Promise<number> {
  for (let current = path; ; current = join(current, '..')) {
    const stats = await statfs(current).catch(() => undefined);
    if (stats) return stats.bavail * stats.bsize;
    if (current === '/') return 0;
  }
}

export function capacity(diskFreeBytes: number) {
  return { memoryBytes: totalmem(), memoryAvailableBytes: freemem(), cpus: cpus().length, diskFreeBytes };
}
