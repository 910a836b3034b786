import { walk } from '../../src/rootfs/pack.ts';

/**
 * Bytes of regular files under `root` (hard links counted once) and the
 * number of entries. The walk goes by handle: a live container cannot steer
 * it into host trees by swapping a directory for a symlink.
 */
export function directorySize(root: string): { bytes: number; entries: number } {
  const seen = new Set<string>();
  let bytes = 0;
  let entries = 0;
  for (const [, stats] of walk(root, '')) {
    entries += 1;
    if (!stats.isFile()) continue;
    const inode = `${stats.dev}:${stats.ino}`;
    if (seen.has(inode)) continue;
    seen.add(inode);
    bytes += stats.size;
  }
  return { bytes, entries };
}
