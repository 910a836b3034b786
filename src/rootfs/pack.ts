import { digestOf, streamDigest } from '../digest.ts';
import { closeSync, constants, createReadStream, lstatSync, readdirSync, readFileSync, readlinkSync, type Stats } from 'node:fs';
import { Readable, Transform } from 'node:stream';
import { hashing } from './digest.ts';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { O_PATH, openBeneath, openDirectory, openRegularFileBeneath, pathAt } from './safe-fs.ts';

type EntryHeader = Parameters<tar.Pack['entry']>[0];

export interface PackOptions {
  /** Relative paths that are not archived. */
  exclude?: (relativePath: string) => boolean;
  /** Filled with the digest of every regular file archived, by relative path. */
  digests?: Map<string, string>;
  /** Only entries for which this holds are archived (the walk still descends). */
  include?: (relativePath: string) => boolean;
  /** Told of every entry walked, archived or not, with its stats. */
  onEntry?: (relativePath: string, stats: Stats) => void;
}

/**
 * Streams a tar of `root` (the snapshot of a frozen container's rootfs).
 * Entries are written one at a time with backpressure; nothing is buffered
 * whole. Hard links are archived once, then as links.
 */
export function packDirectory(root: string, options: PackOptions = {}): Readable {
  const pack = tar.pack();
  writeEntries(pack, root, options).then(
    () => pack.finalize(),
    (error: Error) => pack.destroy(error),
  );
  // tar-stream is built on streamx, whose readables pipe like Node's.
  return pack as unknown as Readable;
}

async function writeEntries(pack: tar.Pack, root: string, options: PackOptions): Promise<void> {
  const firstPathOfInode = new Map<string, string>();
  for (const [relativePath, stats, place] of walk(root, '', options.exclude)) {
    options.onEntry?.(relativePath, stats);
    if (options.include && !options.include(relativePath)) continue;
    const header: EntryHeader = {
      name: relativePath,
      mode: stats.mode & 0o7777,
      uid: stats.uid,
      gid: stats.gid,
      mtime: stats.mtime,
    };
    if (stats.isDirectory()) {
      await addEntry(pack, { ...header, name: `${relativePath}/`, type: 'directory' });
    } else if (stats.isSymbolicLink()) {
      await addEntry(pack, { ...header, type: 'symlink', linkname: readlinkSync(pathAt(place.directory, place.name)) });
    } else if (stats.isFile()) {
      const inode = `${stats.dev}:${stats.ino}`;
      const linkTarget = stats.nlink > 1 ? firstPathOfInode.get(inode) : undefined;
      if (linkTarget) {
        await addEntry(pack, { ...header, type: 'link', linkname: linkTarget });
        continue;
      }
      if (stats.nlink > 1) firstPathOfInode.set(inode, relativePath);
      const fileHeader = { ...header, type: 'file' as const, size: stats.size };
      // A live tree (rootfs pass 1) may grow, shrink or be swapped for
      // something else while read: send exactly the size the header
      // announced (zeros for what is no longer a file); the final pass sends
      // the file again.
      const fd = openRegularFileBeneath(place.directory, place.name);
      if (stats.size <= smallFileBytes) {
        const content = exactSize(fd === undefined ? Buffer.alloc(0) : readAndClose(fd), stats.size);
        options.digests?.set(relativePath, digestOf(content));
        await addEntry(pack, fileHeader, content);
        continue;
      }
      const hash = streamDigest();
      const content = fd === undefined ? Readable.from([]) : createReadStream('', { fd, end: stats.size - 1 });
      await pipeline(content, padTo(stats.size), hashing(hash), pack.entry(fileHeader));
      options.digests?.set(relativePath, hash.hex());
    } else if (stats.isCharacterDevice() || stats.isBlockDevice()) {
      const type = stats.isCharacterDevice() ? 'character-device' : 'block-device';
      const devmajor = Math.floor(stats.rdev / 256) & 0xfff;
      const devminor = (stats.rdev & 0xff) | ((stats.rdev >> 12) & 0xfff00);
      await addEntry(pack, { ...header, type, devmajor, devminor });
    } else if (stats.isFIFO()) {
      await addEntry(pack, { ...header, type: 'fifo' });
    }
    // Sockets are not archived: they belong to the processes, which CRIU handles.
  }
}

function addEntry(pack: tar.Pack, header: EntryHeader, content?: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (error?: Error | null) => (error ? reject(error) : resolve());
    if (content) pack.entry(header, content, done);
    else pack.entry(header, done);
  });
}

/** Files up to this size are read in one call: a stream per small file cost more than its bytes. */
const smallFileBytes = 256 * 1024;

function exactSize(content: Buffer, size: number): Buffer {
  if (content.length === size) return content;
  return content.length > size ? content.subarray(0, size) : Buffer.concat([content, Buffer.alloc(size - content.length)]);
}

function readAndClose(fd: number): Buffer {
  try {
    return readFileSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Where a walked entry is: its parent's open handle (valid until the walk moves on) and its name there. */
export interface EntryPlace {
  directory: number;
  name: string;
}

/**
 * Depth-first, sorted, so archives of the same tree are identical. Metadata
 * calls are synchronous: microseconds each, cheaper than thread-pool trips.
 * Each directory is opened by handle from its parent without following
 * links, so a live container that swaps a directory for a symlink cannot
 * make the walk list or read anything outside `root`; what vanished or
 * stopped being a directory meanwhile is passed over.
 */
export function* walk(root: string, relativeDir: string, exclude?: (path: string) => boolean): Generator<[string, Stats, EntryPlace]> {
  const rootDirectory = openDirectory(root);
  try {
    const directory = openBeneath(rootDirectory, relativeDir, O_PATH | constants.O_DIRECTORY);
    if (directory === undefined) return;
    try {
      yield* walkDirectory(directory, relativeDir, exclude);
    } finally {
      closeSync(directory);
    }
  } finally {
    closeSync(rootDirectory);
  }
}

function* walkDirectory(directory: number, relativeDir: string, exclude?: (path: string) => boolean): Generator<[string, Stats, EntryPlace]> {
  const names = readdirSync(pathAt(directory)).sort();
  for (const name of names) {
    const relativePath = relativeDir ? `${relativeDir}/${name}` : name;
    if (exclude?.(relativePath)) continue;
    const stats = lstatSync(pathAt(directory, name), { throwIfNoEntry: false });
    if (!stats) continue;
    yield [relativePath, stats, { directory, name }];
    if (!stats.isDirectory()) continue;
    const child = openBeneath(directory, name, O_PATH | constants.O_DIRECTORY);
    if (child === undefined) continue;
    try {
      yield* walkDirectory(child, relativePath, exclude);
    } finally {
      closeSync(child);
    }
  }
}

const zeroChunk = Buffer.alloc(1 << 20);

/** Pads a stream that ended early with zeros up to `size` bytes. */
function padTo(size: number): Transform {
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      seen += chunk.length;
      callback(null, chunk);
    },
    flush(callback) {
      // In pieces: a large file truncated meanwhile must not become one huge allocation.
      for (let missing = size - seen; missing > 0; missing -= zeroChunk.length) this.push(zeroChunk.subarray(0, Math.min(missing, zeroChunk.length)));
      callback();
    },
  });
}
