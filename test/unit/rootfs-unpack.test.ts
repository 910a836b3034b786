// Rootfs archives: unpackInto refuses entries that would write outside its
// directory, and a tree survives packDirectory → unpackInto unchanged.
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import tar from 'tar-stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FerryError } from '../../src/errors.ts';
import { packDirectory, walk } from '../../src/rootfs/pack.ts';
import { unpackInto } from '../../src/rootfs/unpack.ts';

type Header = Parameters<tar.Pack['entry']>[0];
type Entry = Header & { body?: string };

/** A tar stream of exactly these entries, in this order (hostile ones included). */
function archiveOf(entries: Entry[]): Readable {
  const pack = tar.pack();
  for (const { body, ...header } of entries) {
    if (header.type === undefined || header.type === 'file') pack.entry({ mode: 0o644, ...header }, body ?? '');
    else pack.entry({ mode: 0o777, ...header });
  }
  pack.finalize();
  return pack as unknown as Readable;
}

let base: string;
/** Where archives are unpacked. */
let target: string;
/** A sibling of target that no archive may touch. */
let outside: string;

beforeEach(() => {
  base = mkdtempSync(join(tmpdir(), 'ferry-unit-unpack-'));
  target = join(base, 'target');
  outside = join(base, 'outside');
  mkdirSync(outside);
  writeFileSync(join(outside, 'secret'), 'do not touch\n');
});

afterEach(() => rmSync(base, { recursive: true, force: true }));

/** Everything under `root`: path, type and content or link target. */
function treeListing(root: string): string[] {
  return [...walk(root, '')].map(([path, stats]) => {
    if (stats.isSymbolicLink()) return `${path} -> ${readlinkSync(join(root, path))}`;
    if (stats.isFile()) return `${path} (${stats.nlink}) ${readFileSync(join(root, path), 'utf8')}`;
    return `${path}/`;
  });
}

async function expectRefused(entries: Entry[]): Promise<void> {
  const outsideBefore = treeListing(outside);
  const error = await unpackInto(target, archiveOf(entries)).then(
    () => new Error('the archive was accepted'),
    (reason: unknown) => reason,
  );
  expect(error).toBeInstanceOf(FerryError);
  expect((error as FerryError).code).toBe('UNSAFE_ARCHIVE');
  expect(readdirSync(base).sort()).toEqual(['outside', 'target']);
  expect(treeListing(outside)).toEqual(outsideBefore);
}

describe('unpackInto refuses a hostile archive', () => {
  it('with a name going up: ../x', async () => {
    await expectRefused([{ name: 'ok.txt', body: 'fine' }, { name: '../x', body: 'escaped' }]);
    expect(existsSync(join(base, 'x'))).toBe(false);
  });

  it('with a name going up from a subdirectory: dir/../../outside/x', async () => {
    await expectRefused([{ name: 'dir/', type: 'directory' }, { name: 'dir/../../outside/x', body: 'escaped' }]);
  });

  it('with an absolute name: /etc/x', async () => {
    const name = `/etc/ferry-unit-${randomBytes(4).toString('hex')}`;
    await expectRefused([{ name, body: 'escaped' }]);
    expect(existsSync(name)).toBe(false);
  });

  it('with an absolute name into the directory next to it', async () => {
    await expectRefused([{ name: join(outside, 'x'), body: 'escaped' }]);
  });

  it('with a file written through a symlink: evil -> outside, then evil/x', async () => {
    await expectRefused([
      { name: 'evil', type: 'symlink', linkname: outside },
      { name: 'evil/x', body: 'escaped' },
    ]);
  });

  it('with a file written through a symlink to /tmp', async () => {
    const name = `ferry-unit-${randomBytes(4).toString('hex')}`;
    await expectRefused([
      { name: 'evil', type: 'symlink', linkname: '/tmp' },
      { name: `evil/${name}`, body: 'escaped' },
    ]);
    expect(existsSync(join('/tmp', name))).toBe(false);
  });

  it('with a hard link to ../../etc/passwd', async () => {
    await expectRefused([{ name: 'passwd', type: 'link', linkname: '../../etc/passwd' }]);
  });

  it('with a hard link to a file reached through a symlink', async () => {
    await expectRefused([
      { name: 'door', type: 'symlink', linkname: outside },
      { name: 'stolen', type: 'link', linkname: 'door/secret' },
    ]);
    expect(lstatSync(join(outside, 'secret')).nlink).toBe(1);
  });
});

/** A small rootfs with what a real one has: nested dirs, modes, symlinks, hard links, a large file. */
function buildTree(root: string): void {
  mkdirSync(join(root, 'bin'), { recursive: true });
  mkdirSync(join(root, 'etc/conf.d'), { recursive: true });
  mkdirSync(join(root, 'empty'));
  writeFileSync(join(root, 'bin/busybox'), randomBytes(600 * 1024));
  chmodSync(join(root, 'bin/busybox'), 0o4755);
  linkSync(join(root, 'bin/busybox'), join(root, 'bin/sh'));
  symlinkSync('busybox', join(root, 'bin/ls'));
  symlinkSync('/nowhere/at/all', join(root, 'dangling'));
  writeFileSync(join(root, 'etc/passwd'), 'root:x:0:0::/root:/bin/sh\n');
  writeFileSync(join(root, 'etc/conf.d/secret'), 'key\n');
  chmodSync(join(root, 'etc/conf.d/secret'), 0o600);
  writeFileSync(join(root, 'etc/empty-file'), '');
  linkSync(join(root, 'etc/passwd'), join(root, 'etc/passwd.hard'));
  chmodSync(join(root, 'etc/conf.d'), 0o750);
}

interface Shape {
  path: string;
  mode: string;
  size: number;
  digest?: string;
  link?: string;
  /** Index of the first path with the same inode: hard links share one. */
  inode: number;
}

function shapeOf(root: string): Shape[] {
  const firstOfInode = new Map<number, number>();
  return [...walk(root, '')].map(([path, stats], index) => {
    if (!firstOfInode.has(stats.ino)) firstOfInode.set(stats.ino, index);
    return {
      path,
      mode: stats.mode.toString(8),
      size: stats.isFile() ? stats.size : 0,
      ...(stats.isFile() ? { digest: createHash('sha256').update(readFileSync(join(root, path))).digest('hex') } : {}),
      ...(stats.isSymbolicLink() ? { link: readlinkSync(join(root, path)) } : {}),
      inode: firstOfInode.get(stats.ino)!,
    };
  });
}

describe('packDirectory → unpackInto', () => {
  it('reproduces the tree: contents, modes, symlinks, hard links', async () => {
    const source = join(base, 'source');
    buildTree(source);
    const packed = new Map<string, string>();
    const unpacked = new Map<string, string>();
    const summary = await unpackInto(target, packDirectory(source, { digests: packed }), unpacked);

    expect(shapeOf(target)).toEqual(shapeOf(source));
    expect(unpacked).toEqual(packed);
    expect([...packed.keys()].sort()).toEqual(['bin/busybox', 'etc/conf.d/secret', 'etc/empty-file', 'etc/passwd']);
    expect(summary.entries).toBe(shapeOf(source).length);
    expect(lstatSync(join(target, 'bin/sh')).ino).toBe(lstatSync(join(target, 'bin/busybox')).ino);
  });

  it('keeps modification times of files and directories', async () => {
    const source = join(base, 'source');
    buildTree(source);
    await unpackInto(target, packDirectory(source));
    const seconds = (root: string, path: string) => Math.floor(lstatSync(join(root, path)).mtimeMs / 1000);
    for (const path of ['bin', 'etc/conf.d', 'etc/passwd', 'bin/busybox', 'empty']) {
      expect(seconds(target, path), path).toBe(seconds(source, path));
    }
  });
});

describe('unpackInto for CRIU image streams (flatFilesOnly)', () => {
  const flat = (entries: Entry[]) => unpackInto(target, archiveOf(entries), undefined, { flatFilesOnly: true });

  it('takes plain top-level files', async () => {
    await flat([{ name: 'pagemap-1.img', body: 'p' }, { name: 'inventory.img', body: 'i' }]);
    expect(readdirSync(target).sort()).toEqual(['inventory.img', 'pagemap-1.img']);
  });

  it.each([
    ['a parent link, which would steer criu restore', { name: 'parent', type: 'symlink', linkname: '../../other-migration/images' }],
    ['a symlink image', { name: 'pages-1.img', type: 'symlink', linkname: '/etc/shadow' }],
    ['a hard link', { name: 'pages-2.img', type: 'link', linkname: 'pagemap-1.img' }],
    ['a nested file', { name: 'sub/pages-1.img', body: 'x' }],
    ['a directory', { name: 'sub/', type: 'directory' }],
  ] as Array<[string, Entry]>)('refuses %s', async (_what, entry) => {
    const error = await flat([{ name: 'pagemap-1.img', body: 'p' }, entry]).then(
      () => new Error('the archive was accepted'),
      (reason: unknown) => reason,
    );
    expect((error as FerryError).code).toBe('UNSAFE_ARCHIVE');
    expect(readdirSync(target)).not.toContain('parent');
  });
});
