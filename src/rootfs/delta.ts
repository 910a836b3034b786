import { closeSync, constants, readlinkSync, type Stats } from 'node:fs';
import { basename, dirname } from 'node:path';
import { walk } from './pack.ts';
import { O_PATH, openBeneath, pathAt, withDirectory } from './safe-fs.ts';

// The rootfs two-pass: pass 1 ships the whole tree while the container runs;
// during the freeze only what changed since is shipped, plus deletions.

/** What pass 1 saw of each entry; any difference later means "send it again". */
export type RootfsManifest = Map<string, string>;

/** Type, owner, mode, size, times (ns) and inode; a symlink adds its target. */
export function entryStamp(root: string, relativePath: string, stats: Stats): string {
  const kind = stats.isDirectory() ? 'd' : stats.isSymbolicLink() ? 'l' : stats.isFile() ? 'f' : 'o';
  const target = kind === 'l' ? linkTargetBeneath(root, relativePath) : '';
  return [kind, stats.mode, stats.uid, stats.gid, stats.size, stats.mtimeMs, stats.ctimeMs, stats.ino, target].join(':');
}

/** A symlink's target, read through its parent's handle: no link on the way is followed. '' when it is gone. */
function linkTargetBeneath(root: string, relativePath: string): string {
  const parentPath = dirname(relativePath);
  return withDirectory(root, (rootDirectory) => {
    const parent = openBeneath(rootDirectory, parentPath === '.' ? '' : parentPath, O_PATH | constants.O_DIRECTORY);
    if (parent === undefined) return '';
    try {
      return readlinkSync(pathAt(parent, basename(relativePath)));
    } catch {
      return '';
    } finally {
      closeSync(parent);
    }
  });
}

export interface RootfsDelta {
  /** Paths new or changed since the manifest, in walk order. */
  changed: Set<string>;
  /** Paths in the manifest that are gone, deepest first. */
  deleted: string[];
}

export function diffRootfs(root: string, manifest: RootfsManifest): RootfsDelta {
  const changed = new Set<string>();
  const seen = new Set<string>();
  for (const [relativePath, stats] of walk(root, '')) {
    seen.add(relativePath);
    if (manifest.get(relativePath) !== entryStamp(root, relativePath, stats)) changed.add(relativePath);
  }
  const deleted = [...manifest.keys()].filter((path) => !seen.has(path)).reverse();
  return { changed, deleted };
}
