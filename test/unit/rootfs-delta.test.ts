// The rootfs final pass: what diffRootfs finds changed since pass 1's manifest.
import { chmodSync, mkdirSync, mkdtempSync, rmSync, unlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { diffRootfs, entryStamp, type RootfsManifest } from '../../src/rootfs/delta.ts';
import { walk } from '../../src/rootfs/pack.ts';

let root: string;

/** What pass 1 records of the tree as it is now. */
function manifestOf(directory: string): RootfsManifest {
  return new Map([...walk(directory, '')].map(([path, stats]) => [path, entryStamp(directory, path, stats)]));
}

/**
 * Files and directories dated in the past, so that a change made right after
 * the manifest always moves a timestamp (the kernel's clock is coarse).
 */
function write(path: string, content: string): void {
  writeFileSync(join(root, path), content);
  age(path);
}

function age(path: string): void {
  const past = new Date('2001-02-03T04:05:06Z');
  utimesSync(join(root, path), past, past);
}

beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), 'ferry-unit-delta-'));
  for (const directory of ['etc', 'var', 'var/gone']) mkdirSync(join(root, directory));
  write('etc/config', 'version=1\n');
  write('etc/untouched', 'same\n');
  write('etc/script', 'echo hi\n');
  write('var/gone/file', 'bye\n');
  for (const directory of ['etc', 'var', 'var/gone']) age(directory);
});

afterEach(() => rmSync(root, { recursive: true, force: true }));

describe('diffRootfs', () => {
  it('finds nothing in a tree that did not change', () => {
    expect(diffRootfs(root, manifestOf(root))).toEqual({ changed: new Set(), deleted: [] });
  });

  it('finds a file rewritten with the same size', () => {
    const manifest = manifestOf(root);
    writeFileSync(join(root, 'etc/config'), 'version=2\n');
    expect(diffRootfs(root, manifest)).toEqual({ changed: new Set(['etc/config']), deleted: [] });
  });

  it('finds a file whose mode changed', () => {
    const manifest = manifestOf(root);
    chmodSync(join(root, 'etc/script'), 0o755);
    expect(diffRootfs(root, manifest).changed).toEqual(new Set(['etc/script']));
  });

  it('finds a new file, and the directory it was added to', () => {
    const manifest = manifestOf(root);
    writeFileSync(join(root, 'etc/new'), 'hello\n');
    expect(diffRootfs(root, manifest)).toEqual({ changed: new Set(['etc', 'etc/new']), deleted: [] });
  });

  it('lists deleted files and directories deepest first', () => {
    const manifest = manifestOf(root);
    rmSync(join(root, 'var/gone'), { recursive: true });
    expect(diffRootfs(root, manifest)).toEqual({ changed: new Set(['var']), deleted: ['var/gone/file', 'var/gone'] });
  });

  it('finds a file replaced by a directory of the same name as changed, with its new content', () => {
    const manifest = manifestOf(root);
    unlinkSync(join(root, 'etc/untouched'));
    mkdirSync(join(root, 'etc/untouched'));
    writeFileSync(join(root, 'etc/untouched/inner'), 'x');
    const delta = diffRootfs(root, manifest);
    expect(delta.changed).toEqual(new Set(['etc', 'etc/untouched', 'etc/untouched/inner']));
    expect(delta.deleted).toEqual([]);
  });
});
