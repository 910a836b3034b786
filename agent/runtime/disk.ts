import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';

/** Bytes of regular files under `root`, hard links counted once. */
export async function directorySize(root: string): Promise<number> {
  const seen = new Set<string>();
  let total = 0;
  const visit = async (directory: string): Promise<void> => {
    for (const entry of await readdir(directory, { withFileTypes: true })) {
      const path = join(directory, entry.name);
      if (entry.isDirectory()) await visit(path);
      else if (entry.isFile()) {
        const stats = await lstat(path);
        const inode = `${stats.dev}:${stats.ino}`;
        if (seen.has(inode)) continue;
        seen.add(inode);
        total += stats.size;
      }
    }
  };
  await visit(root);
  return total;
}
