// Tidying finished migrations: what goes, what stays, and nothing outside the journal's root.
import { afterEach, describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { MigrationJournal } from '../../agent/migration/journal.ts';
import { tidyFinished } from '../../agent/migration/recovery.ts';

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

const day = 24 * 3600_000;
const logger = pino({ level: 'silent' });

function stateDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-journal-'));
  dirs.push(dir);
  return dir;
}

function entry(dir: string, name: string, fields: Record<string, unknown>): string {
  const path = join(dir, 'migrations', name);
  mkdirSync(join(path, 'images'), { recursive: true });
  writeFileSync(join(path, 'journal.json'), JSON.stringify({ migrationId: name, role: 'destination', container: 'c', ...fields }));
  return path;
}

describe('tidying finished migrations', () => {
  it('drops a week-old finished one whole, only the images of a recent one, nothing of an unfinished one', async () => {
    const dir = stateDir();
    const now = Date.now();
    const old = entry(dir, 'old-00000001', { state: 'done', updatedAt: new Date(now - 8 * day).toISOString() });
    const recent = entry(dir, 'new-00000002', { state: 'aborted', updatedAt: new Date(now - day).toISOString() });
    const running = entry(dir, 'run-00000003', { state: 'prepared', updatedAt: new Date(now - 30 * day).toISOString() });
    await tidyFinished({ journal: new MigrationJournal(dir), logger }, undefined, now);
    expect(existsSync(old)).toBe(false);
    expect([existsSync(join(recent, 'journal.json')), existsSync(join(recent, 'images'))]).toEqual([true, false]);
    expect(existsSync(join(running, 'images'))).toBe(true);
  });

  it('never follows an id that names a path: an entry whose id is not one is not read at all', async () => {
    const dir = stateDir();
    const victim = join(dir, 'victim');
    mkdirSync(victim);
    const path = entry(dir, 'bad-00000001', { state: 'done', updatedAt: new Date(0).toISOString() });
    writeFileSync(join(path, 'journal.json'), JSON.stringify({ migrationId: '../victim', role: 'destination', container: 'c', state: 'done', updatedAt: new Date(0).toISOString() }));
    await tidyFinished({ journal: new MigrationJournal(dir), logger });
    expect(existsSync(victim)).toBe(true);
    expect(existsSync(path)).toBe(true);
  });
});
