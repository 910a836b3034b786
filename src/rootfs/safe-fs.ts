// Paths inside a container's rootfs are resolved by handle, never by a path
// string the container (or a hostile archive) could redirect between a check
// and a use: openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS refuses any
// symlink and any step out of the directory it starts from, atomically.
import { closeSync, constants, fstatSync, readSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { FerryError } from '../errors.ts';
import { projectRoot } from '../paths.ts';

/** The native calls of native/fsat.c; each throws an Error whose code is the errno name. */
export interface Fsat {
  openat2(directory: number, path: string, flags: number, mode: number, resolve: number): number;
  mkdirat(directory: number, name: string, mode: number): void;
  mknodat(directory: number, name: string, mode: number, major: number, minor: number): void;
  symlinkat(target: string, directory: number, name: string): void;
  linkat(oldDirectory: number, oldName: string, newDirectory: number, newName: string, flags: number): void;
  unlinkat(directory: number, name: string, flags: number): void;
  /** rm -r of one entry by handle, links never followed; a missing entry is fine. */
  removeTreeAt(directory: number, name: string): void;
  /** st_mode of the entry itself, 0 when there is none. */
  modeAt(directory: number, name: string): number;
  fchownat(directory: number, name: string, uid: number, gid: number, flags: number): void;
  fchmodat(directory: number, name: string, mode: number, flags: number): void;
  utimensat(directory: number, name: string, seconds: number, nanoseconds: number, flags: number): void;
}

export const O_PATH = 0o10000000;
export const AT_FDCWD = -100;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const AT_EMPTY_PATH = 0x1000;
const RESOLVE_NO_SYMLINKS = 0x04;
const RESOLVE_BENEATH = 0x08;
/** No symlink anywhere on the path (magic links included), and never above the start. */
export const resolveBeneath = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS;

export function addonPath(): string {
  return join(projectRoot, '.build', 'bin', 'fsat.node');
}

let loaded: Fsat | undefined;

/** The addon, loaded on first use; without it nothing inside a rootfs is touched. */
export function fsat(): Fsat {
  if (loaded) return loaded;
  try {
    loaded = createRequire(import.meta.url)(addonPath()) as Fsat;
  } catch (error) {
    throw new FerryError('HELPER_MISSING', `cannot load ${addonPath()}; run \`bash scripts/setup.sh\` to build it`, {
      phase: 'runtime',
      cause: error,
    });
  }
  return loaded;
}

export function errorCode(error: unknown): string | undefined {
  return (error as NodeJS.ErrnoException | undefined)?.code;
}

/** Opens a trusted directory (one ferry made, such as a rootfs) as a handle for the *at calls. */
export function openDirectory(path: string): number {
  return fsat().openat2(AT_FDCWD, path, O_PATH | constants.O_DIRECTORY, 0, 0);
}

/** Opens `relativePath` under the directory handle, or undefined when a link, a non-directory or nothing is in the way. */
export function openBeneath(directory: number, relativePath: string, flags: number): number | undefined {
  try {
    return fsat().openat2(directory, relativePath || '.', flags, 0, resolveBeneath);
  } catch (error) {
    if (['ELOOP', 'ENOENT', 'ENOTDIR', 'EXDEV', 'ENXIO'].includes(errorCode(error) ?? '')) return undefined;
    throw error;
  }
}

/** A regular file under the handle, open for reading; undefined when it is anything else (or reached through a link). */
export function openRegularFileBeneath(directory: number, relativePath: string): number | undefined {
  // O_NONBLOCK: opening a fifo swapped in for the file must not hang the agent.
  const fd = openBeneath(directory, relativePath, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  if (fd === undefined || fstatSync(fd).isFile()) return fd;
  closeSync(fd);
  return undefined;
}

/**
 * The path of an entry of an open directory, for Node's path-taking calls:
 * /proc/self/fd/N jumps to the directory the handle holds (no lookup by
 * name), and only the last component is looked up there.
 */
export function pathAt(directory: number, name?: string): string {
  return name === undefined ? `/proc/self/fd/${directory}` : `/proc/self/fd/${directory}/${name}`;
}

/** Runs `use` with `root` open as a handle, closed afterwards. */
export function withDirectory<T>(root: string, use: (directory: number) => T): T {
  const directory = openDirectory(root);
  try {
    return use(directory);
  } finally {
    closeSync(directory);
  }
}

/**
 * The last `maxBytes` of a regular file under `root`, read by handle; empty
 * when there is none or when a link or anything but a regular file is there.
 */
export function readTailBeneath(root: string, relativePath: string, maxBytes: number): Buffer {
  return withDirectory(root, (directory) => {
    const fd = openRegularFileBeneath(directory, relativePath);
    if (fd === undefined) return Buffer.alloc(0);
    try {
      const { size } = fstatSync(fd);
      const buffer = Buffer.alloc(Math.min(size, maxBytes));
      const read = readSync(fd, buffer, 0, buffer.length, size - buffer.length);
      return buffer.subarray(0, read);
    } finally {
      closeSync(fd);
    }
  });
}
