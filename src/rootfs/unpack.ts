import { streamDigest } from '../digest.ts';
import {
  closeSync,
  constants,
  createWriteStream,
  fchmodSync,
  fchownSync,
  fstatSync,
  futimesSync,
  mkdirSync,
  writeSync,
} from 'node:fs';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { FerryError } from '../errors.ts';
import { bulkWriteBuffer, hashing } from './digest.ts';
import { AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, errorCode, fsat, O_PATH, openBeneath, openDirectory, resolveBeneath, withDirectory } from './safe-fs.ts';

export interface UnpackSummary {
  entries: number;
  bytes: number;
}

/** What one archive may create at most; beyond it the archive is refused, not cut short. */
export interface UnpackLimits {
  maxEntries: number;
  /** Bytes of regular-file content; hard links add none (as in an offer's rootfsBytes). */
  maxBytes: number;
}

/** Far above any real rootfs (a full distribution holds ~100k entries); callers that know the size pass less. */
export const defaultUnpackLimits: UnpackLimits = { maxEntries: 1_000_000, maxBytes: 64 * 2 ** 30 };

export interface UnpackOptions {
  /** CRIU image directories hold plain files only; a link there would steer `criu restore`. */
  flatFilesOnly?: boolean;
  limits?: Partial<UnpackLimits>;
}

// Metadata calls are synchronous on purpose: each takes microseconds, and a
// thread-pool round trip per call made extraction of small files several
// times slower. File contents are streamed asynchronously.
//
// Every entry is made relative to an open handle of its parent directory,
// which was reached without following any link (see safe-fs.ts), so neither
// the archive nor another process changing the tree meanwhile can steer a
// write outside `root`.

/**
 * Extracts a tar stream into `root`, refusing any entry that would land
 * outside it: absolute names, `..`, paths through symlinks, hard links to
 * outside files. Symlinks are created as they are but never followed here.
 */
export async function unpackInto(
  root: string,
  source: Readable,
  digests?: Map<string, string>,
  options: UnpackOptions = {},
): Promise<UnpackSummary> {
  const limits = { ...defaultUnpackLimits, ...options.limits };
  const tree = new TargetTree(root);
  const extract = tar.extract();
  const directories: Array<{ path: string; header: tar.Header }> = [];
  const summary: UnpackSummary = { entries: 0, bytes: 0 };
  const feeding = pipeline(source, extract as unknown as NodeJS.WritableStream);
  feeding.catch(() => undefined);
  try {
    for await (const entry of extract) {
      const header = entry.header;
      const parts = entryParts(header.name);
      if (options.flatFilesOnly && (!['file', 'contiguous-file'].includes(header.type ?? '') || parts.length > 1)) {
        throw unsafe(header.name, 'an image stream holds only plain files at its top level');
      }
      count(summary, header, limits);
      await writeEntry(tree, parts, header, entry as unknown as Readable, digests);
      if (header.type === 'directory') directories.push({ path: parts.join('/'), header });
      entry.resume();
    }
    await feeding;
    // Children change a directory's mtime, so directories are finished last, deepest first.
    for (const { path, header } of directories.reverse()) tree.finishDirectory(path, header);
  } catch (error) {
    extract.destroy();
    source.destroy();
    throw error;
  } finally {
    tree.close();
  }
  return summary;
}

const smallFileBytes = 256 * 1024;

function unsafe(name: string, reason: string): FerryError {
  return new FerryError('UNSAFE_ARCHIVE', `refused archive entry "${name}": ${reason}`, { phase: 'restore' });
}

/** Counts an entry against the limits before anything of it is written. */
function count(summary: UnpackSummary, header: tar.Header, limits: UnpackLimits): void {
  summary.entries += 1;
  if (summary.entries > limits.maxEntries) throw unsafe(header.name, `the archive holds more than ${limits.maxEntries} entries`);
  if (header.type !== 'file' && header.type !== 'contiguous-file') return;
  summary.bytes += header.size ?? 0;
  if (summary.bytes > limits.maxBytes) throw unsafe(header.name, `the archive holds more than ${limits.maxBytes} bytes of files`);
}

/** The components of an entry name, refused when absolute, empty or going up. */
function entryParts(name: string): string[] {
  if (name.startsWith('/')) throw unsafe(name, 'absolute path');
  const parts = nameParts(name);
  if (parts.includes('..')) throw unsafe(name, 'path contains ..');
  if (parts.length === 0) throw unsafe(name, 'empty path');
  return parts;
}

/** Removes an entry and everything under it, by handle; nothing when a link or nothing is on its path. */
export function removeInside(root: string, name: string): void {
  const parts = entryParts(name);
  withDirectory(root, (directory) => {
    const parent = openBeneath(directory, parts.slice(0, -1).join('/'), O_PATH | constants.O_DIRECTORY);
    if (parent === undefined) return;
    try {
      fsat().removeTreeAt(parent, parts.at(-1)!);
    } finally {
      closeSync(parent);
    }
  });
}

function nameParts(name: string): string[] {
  return name.split('/').filter((part) => part !== '' && part !== '.');
}

/** The form pack uses for digests: no leading "./", no trailing slash. */
export function normalizeName(name: string): string {
  return nameParts(name).join('/');
}

function requireLinkname(header: tar.Header): string {
  if (!header.linkname) throw unsafe(header.name, 'link without a target');
  return header.linkname;
}

/** Where an entry goes: the open handle of its parent, its own name there, and its path from the root. */
interface Place {
  directory: number;
  name: string;
  path: string;
}

/** The directory unpacked into, held open, with the parent of the latest entry (entries mostly share one). */
class TargetTree {
  readonly root: number;
  private parent: { path: string; fd: number } | undefined;

  constructor(rootPath: string) {
    mkdirSync(rootPath, { recursive: true });
    this.root = openDirectory(rootPath);
  }

  close(): void {
    this.forgetParentUnder('');
    closeSync(this.root);
  }

  /** The place of an entry; its missing parents are made, and none is ever reached through a link. */
  place(entryName: string, parts: string[]): Place {
    const path = parts.join('/');
    const name = parts.at(-1)!;
    const parentPath = parts.slice(0, -1).join('/');
    if (parentPath === '') return { directory: this.root, name, path };
    if (this.parent?.path !== parentPath) {
      this.forgetParentUnder('');
      const fd = openBeneath(this.root, parentPath, O_PATH | constants.O_DIRECTORY) ?? this.makeParents(entryName, parts.slice(0, -1));
      this.parent = { path: parentPath, fd };
    }
    return { directory: this.parent!.fd, name, path };
  }

  /** Walks down one component at a time, making what is missing and naming what is in the way. */
  private makeParents(entryName: string, parents: string[]): number {
    let current = this.root;
    try {
      for (const [index, part] of parents.entries()) {
        const next = openOrMakeDirectory(current, part, () => inTheWay(entryName, `/${parents.slice(0, index + 1).join('/')}`, current, part));
        if (current !== this.root) closeSync(current);
        current = next;
      }
      return current;
    } catch (error) {
      if (current !== this.root) closeSync(current);
      throw error;
    }
  }

  /** Runs `make`; when something is already there, removes it by handle and runs `make` again. */
  replacing<T>(place: Place, make: () => T): T {
    try {
      return make();
    } catch (error) {
      if (errorCode(error) !== 'EEXIST') throw error;
      this.remove(place);
      return make();
    }
  }

  remove(place: Place): void {
    this.forgetParentUnder(place.path);
    fsat().removeTreeAt(place.directory, place.name);
  }

  /** Closes the cached parent when it lies at or under `path` ('' for any), so it is never used once removed. */
  private forgetParentUnder(path: string): void {
    if (!this.parent) return;
    if (path !== '' && this.parent.path !== path && !this.parent.path.startsWith(`${path}/`)) return;
    closeSync(this.parent.fd);
    this.parent = undefined;
  }

  /** Owner, mode and times of a directory, set through a handle opened without following links. */
  finishDirectory(path: string, header: tar.Header): void {
    const fd = openBeneath(this.root, path, constants.O_RDONLY | constants.O_DIRECTORY);
    if (fd === undefined) throw unsafe(header.name, 'the directory was replaced (by a link or another entry) before its owner and mode were set');
    try {
      setMetadataByHandle(fd, header);
    } finally {
      closeSync(fd);
    }
  }
}

/** The open child directory `name`, made (0755, like mkdir -p) when missing. */
function openOrMakeDirectory(directory: number, name: string, refuse: () => FerryError): number {
  const flags = O_PATH | constants.O_DIRECTORY;
  const existing = openBeneath(directory, name, flags);
  if (existing !== undefined) return existing;
  if (fsat().modeAt(directory, name) !== 0) throw refuse();
  fsat().mkdirat(directory, name, 0o755);
  const made = openBeneath(directory, name, flags);
  if (made === undefined) throw refuse();
  return made;
}

function inTheWay(entryName: string, path: string, directory: number, name: string): FerryError {
  const isLink = (fsat().modeAt(directory, name) & constants.S_IFMT) === constants.S_IFLNK;
  return unsafe(entryName, isLink ? `goes through the symlink ${path}` : `parent ${path} is not a directory`);
}

async function writeEntry(
  tree: TargetTree,
  parts: string[],
  header: tar.Header,
  entry: Readable,
  digests: Map<string, string> | undefined,
): Promise<void> {
  switch (header.type) {
    case 'directory':
      return makeDirectory(tree, tree.place(header.name, parts));
    case 'file':
    case 'contiguous-file':
      return writeFile(tree, tree.place(header.name, parts), entry, header, digests);
    case 'symlink': {
      const target = requireLinkname(header);
      const place = tree.place(header.name, parts);
      tree.replacing(place, () => fsat().symlinkat(target, place.directory, place.name));
      return setMetadataAt(place, header);
    }
    case 'link':
      return hardLink(tree, parts, header);
    case 'character-device':
    case 'block-device':
    case 'fifo':
      return makeNode(tree, parts, header);
    default:
      throw unsafe(header.name, `unsupported entry type ${header.type}`);
  }
}

function makeDirectory(tree: TargetTree, place: Place): void {
  // Private until finishDirectory gives it the archive's owner and mode.
  const make = () => fsat().mkdirat(place.directory, place.name, 0o700);
  try {
    make();
  } catch (error) {
    if (errorCode(error) !== 'EEXIST') throw error;
    if ((fsat().modeAt(place.directory, place.name) & constants.S_IFMT) === constants.S_IFDIR) return;
    tree.remove(place);
    make();
  }
}

async function writeFile(
  tree: TargetTree,
  place: Place,
  entry: Readable,
  header: tar.Header,
  digests: Map<string, string> | undefined,
): Promise<void> {
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
  // Private until its owner and mode are set.
  const create = () => fsat().openat2(place.directory, place.name, flags, 0o600, resolveBeneath);
  const hash = streamDigest();
  if ((header.size ?? 0) <= smallFileBytes) {
    // One write for a small file: a stream per file cost more than its bytes.
    const chunks: Buffer[] = [];
    for await (const chunk of entry as AsyncIterable<Buffer>) chunks.push(chunk);
    const content = Buffer.concat(chunks);
    const fd = tree.replacing(place, create);
    try {
      writeSync(fd, content);
      setMetadataByHandle(fd, header);
    } finally {
      closeSync(fd);
    }
    hash.update(content);
    digests?.set(place.path, hash.hex());
    return;
  }
  const fd = tree.replacing(place, create);
  try {
    await pipeline(entry, hashing(hash), createWriteStream('', { fd, autoClose: false, highWaterMark: bulkWriteBuffer }));
    setMetadataByHandle(fd, header);
  } finally {
    closeSync(fd);
  }
  digests?.set(place.path, hash.hex());
}

function hardLink(tree: TargetTree, parts: string[], header: tar.Header): void {
  const targetPath = entryParts(requireLinkname(header)).join('/');
  // The inode is checked and linked through one handle, so what is linked is what was checked.
  const target = openBeneath(tree.root, targetPath, O_PATH | constants.O_NOFOLLOW);
  try {
    if (target === undefined || !fstatSync(target).isFile()) {
      throw unsafe(header.name, 'hard link to something that is not a regular file in the archive');
    }
    const place = tree.place(header.name, parts);
    tree.replacing(place, () => fsat().linkat(target, '', place.directory, place.name, AT_EMPTY_PATH));
    setMetadataAt(place, header);
  } finally {
    if (target !== undefined) closeSync(target);
  }
}

/** The character devices OCI runtimes give every container; nothing else may be created. */
const defaultCharacterDevices = new Set(['1:3', '1:5', '1:7', '1:8', '1:9', '5:0', '5:1', '5:2']);

function makeNode(tree: TargetTree, parts: string[], header: tar.Header): void {
  const device = `${header.devmajor ?? 0}:${header.devminor ?? 0}`;
  if (header.type === 'block-device') throw unsafe(header.name, `block device ${device}`);
  if (header.type === 'character-device' && !defaultCharacterDevices.has(device)) {
    throw unsafe(header.name, `character device ${device} is none of those a container gets by default`);
  }
  const kind = header.type === 'fifo' ? constants.S_IFIFO : constants.S_IFCHR;
  const place = tree.place(header.name, parts);
  const mode = kind | ((header.mode ?? 0o644) & 0o777);
  tree.replacing(place, () => fsat().mknodat(place.directory, place.name, mode, header.devmajor ?? 0, header.devminor ?? 0));
  setMetadataAt(place, header);
}

function setMetadataByHandle(fd: number, header: tar.Header): void {
  fchownSync(fd, header.uid ?? 0, header.gid ?? 0);
  // After chown: chown clears set-id bits.
  fchmodSync(fd, (header.mode ?? 0o644) & 0o7777);
  const mtime = header.mtime ?? new Date();
  futimesSync(fd, mtime, mtime);
}

/** For entries that cannot be opened safely (links, devices, fifos): by name in the open parent, never followed. */
function setMetadataAt(place: Place, header: tar.Header): void {
  const at = fsat();
  at.fchownat(place.directory, place.name, header.uid ?? 0, header.gid ?? 0, AT_SYMLINK_NOFOLLOW);
  if (header.type !== 'symlink') at.fchmodat(place.directory, place.name, (header.mode ?? 0o644) & 0o7777, AT_SYMLINK_NOFOLLOW);
  const milliseconds = (header.mtime ?? new Date()).getTime();
  const seconds = Math.floor(milliseconds / 1000);
  at.utimensat(place.directory, place.name, seconds, (milliseconds - seconds * 1000) * 1e6, AT_SYMLINK_NOFOLLOW);
}
