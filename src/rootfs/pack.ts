import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstatSync, readdirSync, readFileSync, readlinkSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { hashing } from './digest.ts';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';

type EntryHeader = Parameters<tar.Pack['entry']>[0];

export interface PackOptions {
  /** Relative paths that are not archived. */
  exclude?: (relativePath: string) => boolean;
  /** Filled with the sha256 of every regular file archived, by relative path. */
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
  for (const [relativePath, stats] of walk(root, '', options.exclude)) {
    options.onEntry?.(relativePath, stats);
    if (options.include && !options.include(relativePath)) continue;
    const absolutePath = join(root, relativePath);
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
      await addEntry(pack, { ...header, type: 'symlink', linkname: readlinkSync(absolutePath) });
    } else if (stats.isFile()) {
      const inode = `${stats.dev}:${stats.ino}`;
      const linkTarget = stats.nlink > 1 ? firstPathOfInode.get(inode) : undefined;
      if (linkTarget) {
        await addEntry(pack, { ...header, type: 'link', linkname: linkTarget });
        continue;
      }
      if (stats.nlink > 1) firstPathOfInode.set(inode, relativePath);
      const fileHeader = { ...header, type: 'file' as const, size: stats.size };
      // A live tree (rootfs pass 1) may grow or shrink while read: send exactly
      // the size the header announced; the final pass sends the file again.
      if (stats.size <= smallFileBytes) {
        const content = exactSize(readFileSync(absolutePath), stats.size);
        options.digests?.set(relativePath, createHash('sha256').update(content).digest('hex'));
        await addEntry(pack, fileHeader, content);
        continue;
      }
      const hash = createHash('sha256');
      const content = createReadStream(absolutePath, { end: stats.size - 1 });
      await pipeline(content, padTo(stats.size), hashing(hash), pack.entry(fileHeader));
      options.digests?.set(relativePath, hash.digest('hex'));
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

/**
 * Depth-first, sorted, so archives of the same tree are identical. Metadata
 * calls are synchronous: microseconds each, cheaper than thread-pool trips.
 */
export function* walk(root: string, relativeDir: string, exclude?: (path: string) => boolean): Generator<[string, Stats]> {
  const names = readdirSync(join(root, relativeDir)).sort();
  for (const name of names) {
    const relativePath = relativeDir ? `${relativeDir}/${name}` : name;
    if (exclude?.(relativePath)) continue;
    const stats = lstatSync(join(root, relativePath));
    yield [relativePath, stats];
    if (stats.isDirectory()) yield* walk(root, relativePath, exclude);
  }
}

/** Pads a stream that ended early with zeros up to `size` bytes. */
function padTo(size: number): Transform {
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      seen += chunk.length;
      callback(null, chunk);
    },
    flush(callback) {
      callback(null, seen < size ? Buffer.alloc(size - seen) : undefined);
    },
  });
}
