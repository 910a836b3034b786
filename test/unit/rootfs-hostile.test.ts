// Hostile archives and hostile containers: nothing ferry writes or reads
// inside a rootfs may reach outside it, through links planted in the archive,
// through links swapped in by another process meanwhile, or through links a
// live container made in its own tree.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import pino from 'pino';
import tar from 'tar-stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { CgroupTree } from '../../src/cgroup/cgroup.ts';
import { FerryError } from '../../src/errors.ts';
import { packDirectory } from '../../src/rootfs/pack.ts';
import { unpackInto, type UnpackOptions } from '../../src/rootfs/unpack.ts';
import { ContainerRuntime } from '../../agent/runtime/runtime.ts';
import { tarOf } from '../helpers/tar.ts';

type Header = Parameters<tar.Pack['entry']>[0];
type Entry = Header & { body?: string | Buffer };

/** A tar stream of exactly these entries, in this order, made as it is read (a Node stream, as the agent's sources are). */
function archiveOf(entries: Iterable<Entry>): Readable {
  return Readable.from(tarChunks(entries));
}

async function* tarChunks(entries: Iterable<Entry>): AsyncGenerator<Buffer> {
  const pack = tar.pack();
  // Stops quietly when the unpacker refuses and closes the stream early.
  void (async () => {
    for (const { body, ...header } of entries) {
      await new Promise<void>((resolve, reject) => {
        const done = (error?: Error | null) => (error ? reject(error) : resolve());
        const isFile = header.type === undefined || header.type === 'file';
        const sink = isFile ? pack.entry({ mode: 0o644, ...header }, body ?? '', done) : pack.entry({ mode: 0o755, ...header }, done);
        sink.on('error', done);
      });
    }
    pack.finalize();
  })().catch(() => undefined);
  yield* pack as AsyncIterable<Buffer>;
}

let base: string;
let target: string;
let outside: string;
/** A root-owned 0600 file next to the target, which no archive may change. */
let secret: string;

beforeEach(() => {
  base = mkdtempSync(join(tmpdir(), 'ferry-unit-hostile-'));
  target = join(base, 'target');
  outside = join(base, 'outside');
  secret = join(outside, 'secret');
  mkdirSync(outside);
  writeFileSync(secret, 'do not touch\n');
  chmodSync(secret, 0o600);
  chownSync(secret, 0, 0);
});

afterEach(() => rmSync(base, { recursive: true, force: true }));

async function outcome(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => 'accepted',
    (reason: unknown) => reason,
  );
}

async function expectRefused(entries: Entry[], options?: UnpackOptions): Promise<FerryError> {
  const error = await outcome(unpackInto(target, archiveOf(entries), undefined, options));
  expect(error).toBeInstanceOf(FerryError);
  expect((error as FerryError).code).toBe('UNSAFE_ARCHIVE');
  return error as FerryError;
}

function expectOutsideUntouched(): void {
  expect(readdirSync(base).sort()).toEqual(['outside', 'target']);
  expect(readdirSync(outside)).toEqual(['secret']);
  const stats = lstatSync(secret);
  expect({ mode: (stats.mode & 0o7777).toString(8), uid: stats.uid, gid: stats.gid, size: stats.size }).toEqual({
    mode: '600',
    uid: 0,
    gid: 0,
    size: 13,
  });
}

describe('unpackInto applies directory metadata by handle', () => {
  it('refuses a directory x/ that a later symlink x retargets to an outside file', async () => {
    const error = await expectRefused([
      { name: 'x/', type: 'directory', mode: 0o4777, uid: 4242, gid: 4242 },
      { name: 'x', type: 'symlink', linkname: secret },
    ]);
    expect(error.message).toContain('"x/"');
    expectOutsideUntouched();
  });

  it('refuses a directory whose parent becomes a symlink to outside later in the stream', async () => {
    writeFileSync(join(outside, 'inner'), 'outside file\n');
    chmodSync(join(outside, 'inner'), 0o600);
    await expectRefused([
      { name: 'a/', type: 'directory' },
      { name: 'a/inner/', type: 'directory', mode: 0o4777, uid: 4242, gid: 4242 },
      { name: 'a', type: 'symlink', linkname: outside },
    ]);
    const inner = lstatSync(join(outside, 'inner'));
    expect({ mode: (inner.mode & 0o7777).toString(8), uid: inner.uid }).toEqual({ mode: '600', uid: 0 });
  });
});

/**
 * A process that, once target/d exists, keeps exchanging it with a symlink to
 * `outside` (renameat2 RENAME_EXCHANGE, atomic: d is always there, now the
 * directory, now the link). Node has no renameat2, Python's ctypes reaches it.
 */
function startSwapper(): { stop: () => Promise<void> } {
  const script = [
    'import ctypes, os, sys',
    'renameat2 = ctypes.CDLL(None).renameat2',
    'd, link, outside = (argument.encode() for argument in sys.argv[1:])',
    'while not os.path.exists(d): pass',
    'os.symlink(outside, link)',
    'while True: renameat2(-100, d, -100, link, 2)',
  ].join('\n');
  const child = spawn('python3', ['-c', script, join(target, 'd'), join(target, 'd.link'), outside], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    stop: async () => {
      child.kill('SIGKILL');
      await exited;
    },
  };
}

function* raceEntries(): Generator<Entry> {
  yield { name: 'd/', type: 'directory' };
  const large = randomBytes(300 * 1024);
  for (let index = 0; index < 400; index++) {
    yield { name: `d/file-${index}`, body: index % 4 === 0 ? large : 'x'.repeat(4096), mode: 0o4755 };
  }
}

describe('unpackInto races with another writer', () => {
  it('writes nothing outside when a directory becomes a symlink to outside while an entry in it is read', async () => {
    const archive = await tarOf([{ name: 'd/', type: 'directory' }, { name: 'd/planted', body: 'x'.repeat(1000) }]);
    async function* swappingMidEntry(): AsyncGenerator<Buffer> {
      // Both headers (512 bytes each), then a pause while the unpacker waits for the body.
      yield archive.subarray(0, 1024);
      await sleep(100);
      renameSync(join(target, 'd'), join(target, 'd.real'));
      symlinkSync(outside, join(target, 'd'));
      yield archive.subarray(1024);
    }
    const result = await outcome(unpackInto(target, Readable.from(swappingMidEntry())));
    expectOutsideUntouched();
    expect(existsSync(join(target, 'd.real/planted'))).toBe(true);
    expect((result as FerryError).code).toBe('UNSAFE_ARCHIVE');
  });

  it('writes nothing outside while another process keeps exchanging a directory with a symlink to outside', async () => {
    const swapper = startSwapper();
    let result: unknown;
    try {
      result = await outcome(unpackInto(target, archiveOf(raceEntries())));
    } finally {
      await swapper.stop();
    }
    expectOutsideUntouched();
    // Written into the directory it holds open (whatever its name by then), or refused when it finds the link.
    if (result !== 'accepted') expect((result as FerryError).code).toBe('UNSAFE_ARCHIVE');
  });
});

describe('unpackInto refuses devices a container does not get', () => {
  it('refuses a block device', async () => {
    await expectRefused([{ name: 'sda', type: 'block-device', devmajor: 8, devminor: 0, mode: 0o666 }]);
    expect(existsSync(join(target, 'sda'))).toBe(false);
  });

  it('refuses a character device outside the default set (/dev/mem)', async () => {
    await expectRefused([{ name: 'mem', type: 'character-device', devmajor: 1, devminor: 1, mode: 0o666 }]);
    expect(existsSync(join(target, 'mem'))).toBe(false);
  });

  it('makes the default ones (null, ptmx) and fifos', async () => {
    await unpackInto(
      target,
      archiveOf([
        { name: 'dev/', type: 'directory' },
        { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666 },
        { name: 'dev/ptmx', type: 'character-device', devmajor: 5, devminor: 2, mode: 0o666 },
        { name: 'pipe', type: 'fifo', mode: 0o640 },
      ]),
    );
    const nullDevice = lstatSync(join(target, 'dev/null'));
    expect(nullDevice.isCharacterDevice()).toBe(true);
    expect([nullDevice.rdev, (nullDevice.mode & 0o7777).toString(8)]).toEqual([lstatSync('/dev/null').rdev, '666']);
    expect(lstatSync(join(target, 'dev/ptmx')).rdev).toBe(lstatSync('/dev/ptmx').rdev);
    expect(lstatSync(join(target, 'pipe')).isFIFO()).toBe(true);
  });
});

describe('unpackInto bounds what an archive may create', () => {
  const files = (count: number, size: number) => Array.from({ length: count }, (_, index) => ({ name: `f${index}`, body: 'x'.repeat(size) }));

  it('refuses more entries than allowed', async () => {
    const error = await expectRefused(files(50, 1), { limits: { maxEntries: 20 } });
    expect(error.message).toContain('more than 20 entries');
    expect(readdirSync(target).length).toBeLessThanOrEqual(20);
  });

  it('refuses more bytes than allowed, before writing the file that exceeds them', async () => {
    const error = await expectRefused(files(3, 800), { limits: { maxBytes: 2000 } });
    expect(error.message).toContain('"f2"');
    expect(readdirSync(target).sort()).toEqual(['f0', 'f1']);
  });

  it('takes an archive within the limits', async () => {
    const summary = await unpackInto(target, archiveOf(files(20, 100)), undefined, { limits: { maxEntries: 20, maxBytes: 2000 } });
    expect(summary).toEqual({ entries: 20, bytes: 2000 });
  });
});

/** Every entry of a tar stream: name and content. */
async function entriesOf(stream: Readable): Promise<Map<string, string>> {
  const extract = tar.extract();
  const entries = new Map<string, string>();
  const feeding = new Promise((resolve, reject) => stream.pipe(extract as unknown as NodeJS.WritableStream).on('finish', resolve).on('error', reject));
  for await (const entry of extract) {
    const chunks: Buffer[] = [];
    for await (const chunk of entry as AsyncIterable<Buffer>) chunks.push(chunk);
    entries.set(entry.header.name, Buffer.concat(chunks).toString('latin1'));
  }
  await feeding;
  return entries;
}

describe('packDirectory of a live tree whose directory becomes a symlink to outside', () => {
  /** Replaces source/d by a symlink to `outside`, as a container can do in its own rootfs at any moment. */
  const swapToOutside = (source: string) => {
    renameSync(join(source, 'd'), join(source, 'd.real'));
    symlinkSync(outside, join(source, 'd'));
  };

  it.each([
    ['a small file', 100],
    ['a large file', 400 * 1024],
  ])('reads nothing outside when it is swapped before %s in it is read', async (_what, size) => {
    const source = join(base, 'source');
    mkdirSync(join(source, 'd'), { recursive: true });
    writeFileSync(join(source, 'd/secret'), 'i'.repeat(size));
    writeFileSync(secret, 'o'.repeat(size));
    const packed = packDirectory(source, { onEntry: (path) => path === 'd/secret' && swapToOutside(source) });
    const entries = await entriesOf(packed);
    expect(entries.get('d/secret')).toBe('i'.repeat(size));
  });

  it('lists nothing outside when it is swapped before the walk enters it', async () => {
    const source = join(base, 'source');
    mkdirSync(join(source, 'd'), { recursive: true });
    writeFileSync(join(source, 'd/inside'), 'inside\n');
    const packed = packDirectory(source, { onEntry: (path) => path === 'd' && swapToOutside(source) });
    const entries = await entriesOf(packed);
    expect([...entries.keys()].filter((name) => name.startsWith('d/') && name !== 'd/')).toEqual([]);
    expect([...entries.values()]).not.toContain('do not touch\n');
  });
});

describe('ContainerRuntime.logs', () => {
  const name = 'c1';
  const runtimeWithContainer = async () => {
    const runtime = new ContainerRuntime({ stateDir: join(base, 'state'), cgroups: {} as CgroupTree, hostName: 'here', logger: pino({ level: 'silent' }) });
    await runtime.store.create(name);
    await runtime.store.write({ spec: { name, rootfs: '/x', command: ['sh'], env: {}, cwd: '/', privateNetwork: false, labels: {} }, pid: 1, pidStartTime: 0, createdAt: '', history: [] });
    const rootfs = runtime.store.rootfs(name);
    mkdirSync(rootfs, { recursive: true });
    return { runtime, rootfs };
  };

  it('returns the tail of the console log', async () => {
    const { runtime, rootfs } = await runtimeWithContainer();
    mkdirSync(join(rootfs, '.ferry'));
    writeFileSync(join(rootfs, '.ferry/console.log'), 'one\ntwo\n');
    expect(await runtime.logs(name, 4)).toBe('two\n');
  });

  it('does not follow a console.log the container made a symlink to an outside 0600 file', async () => {
    const { runtime, rootfs } = await runtimeWithContainer();
    mkdirSync(join(rootfs, '.ferry'));
    symlinkSync(secret, join(rootfs, '.ferry/console.log'));
    expect(await runtime.logs(name)).toBe('');
  });

  it('does not follow a .ferry directory the container made a symlink to outside', async () => {
    const { runtime, rootfs } = await runtimeWithContainer();
    writeFileSync(join(outside, 'console.log'), 'outside log\n');
    symlinkSync(outside, join(rootfs, '.ferry'));
    expect(await runtime.logs(name)).toBe('');
  });
});
