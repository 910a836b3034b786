// CRIU glue that needs no CRIU: its version line, its stats images, its logs.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { afterAll, describe, expect, it } from 'vitest';
import { compareVersions, parseCriuVersion, type CriuVersion } from '../../src/criu/version.ts';
import { extractErrorLines, readErrorLines } from '../../src/criu/log.ts';
import { parseStatsImage, readStats } from '../../src/criu/stats.ts';

const scratch = mkdtempSync(join(tmpdir(), 'ferry-unit-criu-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe('parseCriuVersion', () => {
  it('reads major, minor and patch from `criu --version`', () => {
    expect(parseCriuVersion('Version: 4.1.1\nGitID: v4.1.1\n')).toEqual({ major: 4, minor: 1, patch: 1, text: '4.1.1' });
  });

  it('takes a missing patch as 0 and keeps the text as printed', () => {
    expect(parseCriuVersion('Version: 3.17\n')).toEqual({ major: 3, minor: 17, patch: 0, text: '3.17' });
  });

  it('returns undefined for output without a version', () => {
    expect(parseCriuVersion('criu: command not found')).toBeUndefined();
    expect(parseCriuVersion('Version: unknown')).toBeUndefined();
  });
});

describe('compareVersions', () => {
  const version = (text: string): CriuVersion => parseCriuVersion(`Version: ${text}`)!;

  it('orders by major, then minor, then patch, numerically', () => {
    expect(compareVersions(version('4.0'), version('3.17'))).toBeGreaterThan(0);
    expect(compareVersions(version('4.9'), version('4.10'))).toBeLessThan(0);
    expect(compareVersions(version('4.1.1'), version('4.1'))).toBeGreaterThan(0);
    expect(compareVersions(version('4.1.0'), version('4.1'))).toBe(0);
  });
});

// images/stats.proto: stats_entry { dump = 1; restore = 2; }
const IMG_SERVICE_MAGIC = 0x55105940;
const STATS_MAGIC = 0x57093306;

function statsImage(entry: Uint8Array): Uint8Array {
  const header = Buffer.alloc(12);
  header.writeUInt32LE(IMG_SERVICE_MAGIC, 0);
  header.writeUInt32LE(STATS_MAGIC, 4);
  header.writeUInt32LE(entry.length, 8);
  return Buffer.concat([header, entry]);
}

function varints(writer: BinaryWriter, fields: Record<number, number | bigint>): BinaryWriter {
  for (const [field, value] of Object.entries(fields)) writer.tag(Number(field), WireType.Varint).uint64(value);
  return writer;
}

/** dump_stats_entry with every required field, plus irmap_resolve (8) and page_pipes (10), which ferry skips. */
function dumpEntry(): Uint8Array {
  const fields = { 1: 1200, 2: 45_000, 3: 3000, 4: 9000, 5: 2n ** 33n, 6: 17, 7: 65_536, 8: 5, 9: 3, 10: 12 };
  return varints(new BinaryWriter(), fields).finish();
}

function restoreEntry(): Uint8Array {
  return varints(new BinaryWriter(), { 1: 10, 2: 20, 3: 300, 4: 4000, 5: 65_536 }).finish();
}

describe('parseStatsImage', () => {
  it('decodes a dump entry, 64-bit counters included, and skips fields it does not know', () => {
    const entry = new BinaryWriter().tag(1, WireType.LengthDelimited).bytes(dumpEntry()).finish();
    expect(parseStatsImage(statsImage(entry))).toEqual({
      dump: {
        freezingTime: 1200,
        frozenTime: 45_000,
        memdumpTime: 3000,
        memwriteTime: 9000,
        pagesScanned: 2 ** 33,
        pagesSkippedParent: 17,
        pagesWritten: 65_536,
        pagesLazy: 3,
      },
    });
  });

  it('decodes a restore entry next to an unknown top-level field', () => {
    const entry = new BinaryWriter()
      .tag(7, WireType.LengthDelimited).bytes(new Uint8Array([1, 2, 3]))
      .tag(2, WireType.LengthDelimited).bytes(restoreEntry())
      .finish();
    expect(parseStatsImage(statsImage(entry))).toEqual({
      restore: { pagesCompared: 10, pagesSkippedCow: 20, forkingTime: 300, restoreTime: 4000, pagesRestored: 65_536 },
    });
  });

  it('refuses an image shorter than its header or its announced length', () => {
    expect(() => parseStatsImage(new Uint8Array(10))).toThrow(/too short/);
    const entry = new BinaryWriter().tag(2, WireType.LengthDelimited).bytes(restoreEntry()).finish();
    expect(() => parseStatsImage(statsImage(entry).subarray(0, 20))).toThrow(/truncated/);
  });

  it('reads a stats file from disk, and undefined when CRIU wrote none', async () => {
    const path = join(scratch, 'stats-restore');
    writeFileSync(path, statsImage(new BinaryWriter().tag(2, WireType.LengthDelimited).bytes(restoreEntry()).finish()));
    expect((await readStats(path))?.restore?.restoreTime).toBe(4000);
    expect(await readStats(join(scratch, 'stats-dump'))).toBeUndefined();
  });
});

const failedDumpLog = [
  '(00.000000) Version: 4.1.1 (gitid 0)',
  "(00.000021) Error (criu/util.c:1650): Can't setup RLIMIT_NOFILE for self: Operation not permitted",
  '(00.004100) Dumping task (pid: 4242)',
  '(00.120000) Error (criu/mem.c:700): Can\'t dump page with parasite',
  '(00.120100) BUG at criu/pie/parasite.c:80',
  '(00.120200) Errors are not found here: ErrorCount is not a word match',
  '(00.130000) Error (criu/cr-dump.c:2100): Dumping FAILED.',
].join('\n');

describe('extractErrorLines', () => {
  it("keeps CRIU's Error and BUG lines in order, without timestamps", () => {
    expect(extractErrorLines(failedDumpLog)).toEqual([
      "Error (criu/mem.c:700): Can't dump page with parasite",
      'BUG at criu/pie/parasite.c:80',
      'Error (criu/cr-dump.c:2100): Dumping FAILED.',
    ]);
  });

  it('ignores the harmless RLIMIT_NOFILE error CRIU logs on many hosts', () => {
    const lines = extractErrorLines(failedDumpLog);
    expect(lines.some((line) => line.includes('RLIMIT_NOFILE'))).toBe(false);
  });

  it('keeps only the newest lines when asked for fewer', () => {
    expect(extractErrorLines(failedDumpLog, 1)).toEqual(['Error (criu/cr-dump.c:2100): Dumping FAILED.']);
  });

  it('reads a log file, and finds nothing in a missing one', async () => {
    const path = join(scratch, 'dump.log');
    writeFileSync(path, failedDumpLog);
    expect(await readErrorLines(path)).toHaveLength(3);
    expect(await readErrorLines(join(scratch, 'missing.log'))).toEqual([]);
  });
});
