import { createHash } from 'node:crypto';
import {
  chmodSync,
  constants,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  rmSync,
  symlinkSync,
  utimesSync,
  closeSync,
  openSync,
  writeSync,
  type Stats,
} from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { execa } from 'execa';
import tar from 'tar-stream';
import { FerryError } from '../errors.ts';
import { bulkWriteBuffer, hashing } from './digest.ts';

export interface UnpackSummary {
  entries: number;
  bytes: number;
}

// Metadata calls are synchronous on purpose: each takes microseconds, and a
// thread-pool round trip per call made extraction of small files several
// times slower. File contents are streamed asynchronously.

/**
 * Extracts a tar stream into `root`, refusing any entry that would land
 * outside it: absolute names, `..`, paths through symlinks, hard links to
 * outside files. Symlinks are created as they are but never followed here.
 */
export async function unpackInto(
  root: string,
  source: Readable,
  digests?: Map<string, string>,
  options: { flatFilesOnly?: boolean } = {},
): Promise<UnpackSummary> {
  mkdirSync(root, { recursive: true });
  const extract = tar.extract();
  const directories: Array<{ path: string; header: tar.Header }> = [];
  const summary: UnpackSummary = { entries: 0, bytes: 0 };
  const feeding = pipeline(source, extract as unknown as NodeJS.WritableStream);
  feeding.catch(() => undefined);
  try {
    for await (const entry of extract) {
      const header = entry.header;
      const path = resolveInside(root, header.name);
      // CRIU image directories hold plain files only; a link there would steer `criu restore`.
      if (options.flatFilesOnly && (!['file', 'contiguous-file'].includes(header.type ?? '') || header.name.includes('/'))) {
        throw unsafe(header.name, 'an image stream holds only plain files at its top level');
      }
      summary.entries += 1;
      switch (header.type) {
        case 'directory':
          makeDirectory(path);
          directories.push({ path, header });
          break;
        case 'file':
        case 'contiguous-file':
          await replaceWithFile(path, entry as unknown as Readable, header, digests);
          summary.bytes += header.size ?? 0;
          break;
        case 'symlink':
          clear(path);
          symlinkSync(requireLinkname(header), path);
          break;
        case 'link':
          hardLink(root, path, header);
          break;
        case 'character-device':
        case 'block-device':
        case 'fifo':
          clear(path);
          await makeNode(path, header);
          break;
        default:
          throw unsafe(header.name, `unsupported entry type ${header.type}`);
      }
      entry.resume();
      if (header.type !== 'directory') applyMetadata(path, header);
    }
    await feeding;
  } catch (error) {
    extract.destroy();
    source.destroy();
    throw error;
  }
  // Children change a directory's mtime, so directories are finished last, deepest first.
  for (const { path, header } of directories.reverse()) applyMetadata(path, header);
  return summary;
}

const smallFileBytes = 256 * 1024;

function unsafe(name: string, reason: string): FerryError {
  return new FerryError('UNSAFE_ARCHIVE', `refused archive entry "${name}": ${reason}`, { phase: 'restore' });
}

function lstatOrUndefined(path: string): Stats | undefined {
  return lstatSync(path, { throwIfNoEntry: false });
}

/** The absolute path for an entry name, checked to stay inside `root`. */
export function resolveInside(root: string, name: string): string {
  if (name.startsWith('/')) throw unsafe(name, 'absolute path');
  const parts = nameParts(name);
  if (parts.includes('..')) throw unsafe(name, 'path contains ..');
  if (parts.length === 0) throw unsafe(name, 'empty path');
  let current = root;
  for (const part of parts.slice(0, -1)) {
    current = join(current, part);
    const stats = lstatOrUndefined(current);
    if (!stats) continue;
    if (stats.isSymbolicLink()) throw unsafe(name, `goes through the symlink ${current.slice(root.length)}`);
    if (!stats.isDirectory()) throw unsafe(name, `parent ${current.slice(root.length)} is not a directory`);
  }
  return join(root, ...parts);
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

function makeDirectory(path: string): void {
  const stats = lstatOrUndefined(path);
  if (stats?.isDirectory()) return;
  if (stats) rmSync(path, { force: true });
  mkdirSync(path, { recursive: true });
}

/** Removes whatever is at `path`, so the entry replaces it instead of writing through it. */
function clear(path: string): void {
  const stats = lstatOrUndefined(path);
  if (stats) rmSync(path, { recursive: stats.isDirectory(), force: true });
}

async function replaceWithFile(
  path: string,
  entry: Readable,
  header: tar.Header,
  digests: Map<string, string> | undefined,
): Promise<void> {
  clear(path);
  mkdirSync(join(path, '..'), { recursive: true });
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
  const mode = (header.mode ?? 0o644) & 0o777;
  const hash = createHash('sha256');
  if ((header.size ?? 0) <= smallFileBytes) {
    // One write for a small file: a stream per file cost more than its bytes.
    const chunks: Buffer[] = [];
    for await (const chunk of entry as AsyncIterable<Buffer>) chunks.push(chunk);
    const content = Buffer.concat(chunks);
    const fd = openSync(path, flags, mode);
    try {
      writeSync(fd, content);
    } finally {
      closeSync(fd);
    }
    digests?.set(normalizeName(header.name), hash.update(content).digest('hex'));
    return;
  }
  const handle = await open(path, flags, mode);
  await pipeline(entry, hashing(hash), handle.createWriteStream({ highWaterMark: bulkWriteBuffer }));
  digests?.set(normalizeName(header.name), hash.digest('hex'));
}

function hardLink(root: string, path: string, header: tar.Header): void {
  const target = resolveInside(root, requireLinkname(header));
  if (!lstatOrUndefined(target)?.isFile()) {
    throw unsafe(header.name, 'hard link to something that is not a regular file in the archive');
  }
  clear(path);
  linkSync(target, path);
}

async function makeNode(path: string, header: tar.Header): Promise<void> {
  const mode = ((header.mode ?? 0o644) & 0o777).toString(8);
  if (header.type === 'fifo') {
    await execa('mkfifo', ['-m', mode, path]);
    return;
  }
  const kind = header.type === 'character-device' ? 'c' : 'b';
  await execa('mknod', ['-m', mode, path, kind, String(header.devmajor ?? 0), String(header.devminor ?? 0)]);
}

function applyMetadata(path: string, header: tar.Header): void {
  lchownSync(path, header.uid ?? 0, header.gid ?? 0);
  const mtime = header.mtime ?? new Date();
  if (header.type === 'symlink') {
    lutimesSync(path, mtime, mtime);
    return;
  }
  // After chown: chown clears set-id bits.
  chmodSync(path, (header.mode ?? 0o644) & 0o7777);
  utimesSync(path, mtime, mtime);
}
