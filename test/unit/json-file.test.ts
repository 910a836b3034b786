// The atomic JSON files that hold container state and the migration journal.
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { readJsonFile, writeJsonFile } from '../../src/json-file.ts';

const schema = z.object({ state: z.string(), round: z.number() });
let directory: string;

beforeAll(async () => {
  directory = await mkdtemp(join(tmpdir(), 'ferry-json-file-'));
});

afterAll(async () => {
  await rm(directory, { recursive: true, force: true });
});

describe('writeJsonFile', () => {
  for (const durable of [false, true]) {
    it(`replaces the file whole${durable ? ', synced' : ''}, leaving no temporary`, async () => {
      const path = join(directory, durable ? 'durable' : 'plain', 'journal.json');
      await writeJsonFile(path, { state: 'started', round: 1 }, 0o600, { durable });
      await writeJsonFile(path, { state: 'committed', round: 2 }, 0o600, { durable });
      expect(await readJsonFile(path, schema)).toEqual({ state: 'committed', round: 2 });
      expect(await readdir(join(directory, durable ? 'durable' : 'plain'))).toEqual(['journal.json']);
    });
  }

  it('keeps a private file private, even over a temporary a crash left with a wider mode', async () => {
    const path = join(directory, 'private', 'journal.json');
    await writeJsonFile(path, { state: 'started', round: 1 }, 0o600, { durable: true });
    await writeFile(`${path}.tmp`, 'left by a crash', { mode: 0o666 });
    await writeJsonFile(path, { state: 'done', round: 1 }, 0o600, { durable: true });
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect((await stat(join(directory, 'private'))).mode & 0o777).toBe(0o700);
    expect(await readJsonFile(path, schema)).toEqual({ state: 'done', round: 1 });
  });

  it('survives writers of one file at once: each rename lands, and the file is one of them whole', async () => {
    const path = join(directory, 'racing', 'journal.json');
    await Promise.all(Array.from({ length: 20 }, (_, round) => writeJsonFile(path, { state: 'started', round }, 0o600, { durable: true })));
    const written = await readJsonFile(path, schema);
    expect(written?.state).toBe('started');
    expect(await readdir(join(directory, 'racing'))).toEqual(['journal.json']);
  });

  it('reads a missing file as undefined and a malformed one as an error', async () => {
    expect(await readJsonFile(join(directory, 'none.json'), schema)).toBeUndefined();
    const path = join(directory, 'bad.json');
    await writeFile(path, JSON.stringify({ state: 'x', round: 'one' }));
    await expect(readJsonFile(path, schema)).rejects.toThrow();
  });
});
