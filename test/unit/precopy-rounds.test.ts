// The pre-dump rounds over in-memory ports: how many rounds, in which
// directories, and that a migration that must stop costs no further round.
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { CriuRun } from '../../src/criu/criu.ts';
import type { DumpStats } from '../../src/criu/stats.ts';
import { FerryError } from '../../src/errors.ts';
import { PrecopyRounds, type RoundPorts } from '../../agent/migration/precopy.ts';

const directories: string[] = [];
afterEach(() => {
  for (const directory of directories.splice(0)) rmSync(directory, { recursive: true, force: true });
});

function ports(overrides: Partial<RoundPorts> = {}) {
  const calls: string[] = [];
  const stats = { pagesWritten: 1000, pagesSkippedParent: 0, pagesScanned: 2000, frozenTime: 3000 } as DumpStats;
  const base: RoundPorts = {
    preDump: (round, imagesDir) => {
      calls.push(`pre-dump ${round} ${imagesDir.split('/').slice(-2).join('/')}`);
      return new CriuRun(Promise.resolve(stats), {} as ChildProcess);
    },
    shipPages: async (_run, _dir, round) => [{ name: `pages-${round}`, bytes: 4096 * 1000, digest: 'x' }],
    sendImages: async (round) => {
      calls.push(`images ${round}`);
      return 100;
    },
    ensureGoing: () => undefined,
    space: async () => ({ bytes: 2 ** 40, residentBytes: 2 ** 30 }),
    progress: (report) => calls.push(`progress ${report.round}`),
    ...overrides,
  };
  return { ports: base, calls };
}

function rounds(parts: RoundPorts): PrecopyRounds {
  const directory = mkdtempSync(join(tmpdir(), 'ferry-rounds-'));
  directories.push(directory);
  return new PrecopyRounds(parts, directory, pino({ level: 'silent' }));
}

describe('PrecopyRounds', () => {
  it('runs rounds in rounds/N until the policy stops them, and reports each', async () => {
    const { ports: parts, calls } = ports();
    const precopy = rounds(parts);
    // An unreachable budget: only the round limit stops it.
    await precopy.run({ maxDowntimeMs: -1, maxRounds: 2 });
    expect(calls).toEqual(['pre-dump 1 rounds/1', 'images 1', 'progress 1', 'pre-dump 2 rounds/2', 'images 2', 'progress 2']);
    expect(precopy.count).toBe(2);
    expect(precopy.parent).toBe('../rounds/2');
    const report = precopy.report()!;
    expect(report.stopReason).toBe('max-rounds');
    expect(report.rounds.map((round) => [round.round, round.pagesWritten, round.bytesSent, round.frozenMs])).toEqual([
      [1, 1000, 4096 * 1000 + 100, 3],
      [2, 1000, 4096 * 1000 + 100, 3],
    ]);
  });

  it('runs no round when the limit is zero, and gives no parent to the final dump', async () => {
    const { ports: parts, calls } = ports();
    const precopy = rounds(parts);
    await precopy.run({ maxDowntimeMs: 100, maxRounds: 0 });
    expect(calls).toEqual([]);
    expect(precopy.parent).toBeUndefined();
    expect(precopy.report()?.stopReason).toBe('max-rounds');
  });

  it('starts no further pre-dump once the migration must stop', async () => {
    let checks = 0;
    const gone = new FerryError('PEER_GONE', 'lost the connection to b');
    const { ports: parts, calls } = ports({
      ensureGoing: () => {
        checks += 1;
        if (checks > 1) throw gone;
      },
    });
    const precopy = rounds(parts);
    await expect(precopy.run({ maxDowntimeMs: -1, maxRounds: 5 })).rejects.toBe(gone);
    expect(calls.filter((call) => call.startsWith('pre-dump'))).toEqual(['pre-dump 1 rounds/1']);
    expect(precopy.report()).toBeUndefined();
  });

  it('stops before a round that would not fit on both hosts', async () => {
    const { ports: parts, calls } = ports({ space: async () => ({ bytes: 6_000_000, residentBytes: 4_000_000 }) });
    const precopy = rounds(parts);
    await precopy.run({ maxDowntimeMs: -1, maxRounds: 5 });
    expect(calls.filter((call) => call.startsWith('pre-dump'))).toHaveLength(1);
    expect(precopy.report()?.stopReason).toBe('no-space');
  });
});
