// The downtime breakdown and the report: pure arithmetic on the marks.
import { describe, expect, it } from 'vitest';
import { downtimeBreakdown } from '../../agent/migration/timing.ts';
import { buildReport, type ReportFacts } from '../../agent/migration/report.ts';

const there = { waitMs: 3, checkMs: 4, criuMs: 20, recordMs: 2 };
const marks = { freezing: 1000, frozen: 1005, dumped: 1040, sent: 1050, prepared: 1090, pagesAtDump: 100, pagesAtExit: 900 };

function parts(breakdown: NonNullable<ReturnType<typeof downtimeBreakdown>>): number {
  const { freezeMs, dumpMs, shipMs, receiveMs, checkMs, restoreMs, recordMs, resumeMs } = breakdown;
  return freezeMs + dumpMs + shipMs + receiveMs + checkMs + restoreMs + recordMs + resumeMs;
}

describe('downtimeBreakdown', () => {
  it('cuts the downtime at the marks, the destination\'s own timing inside the wait for it, and the parts add up', () => {
    const breakdown = downtimeBreakdown(marks, there, 1000, 1100)!;
    expect(breakdown).toEqual({
      freezeMs: 5,
      dumpMs: 35,
      shipMs: 10,
      receiveMs: 14,
      checkMs: 4,
      restoreMs: 20,
      recordMs: 2,
      resumeMs: 10,
      overlappedBytes: 800,
      pageBytes: 900,
    });
    expect(parts(breakdown)).toBe(1100 - marks.freezing);
  });

  it('ships nothing after the dump when every page was on the link as CRIU exited', () => {
    const breakdown = downtimeBreakdown({ ...marks, sent: 1030, pagesAtExit: 1000 }, there, 1000, 1100)!;
    expect(breakdown.shipMs).toBe(0);
    expect(breakdown.overlappedBytes).toBe(breakdown.pageBytes);
    expect(parts(breakdown)).toBe(100);
  });

  it('without the destination\'s timing (an older peer) gives its whole wait to receive', () => {
    const breakdown = downtimeBreakdown(marks, undefined, 1000, 1100)!;
    expect([breakdown.receiveMs, breakdown.checkMs, breakdown.restoreMs]).toEqual([40, 0, 0]);
    expect(parts(breakdown)).toBe(100);
  });

  it('is undefined while a mark is missing (a migration that never reached the destination)', () => {
    for (const missing of ['freezing', 'frozen', 'dumped', 'sent', 'prepared'] as const) {
      expect(downtimeBreakdown({ ...marks, [missing]: undefined }, there, 1000, 1100), missing).toBeUndefined();
    }
  });
});

describe('buildReport', () => {
  const facts = (extra: Partial<ReportFacts> = {}): ReportFacts => ({ startedAt: 0, marks: { ...marks }, warnings: [], ...extra });
  const input = (extra: Partial<ReportFacts> = {}) => ({
    who: { migrationId: 'm-0000001', container: 'web', source: 'a', destination: 'b' },
    bytes: { rootfs: 10, pages: 1000, images: 5 },
    phases: [],
    rounds: 0,
    now: 1500,
    facts: facts(extra),
  });

  it('ends the downtime at the confirmation and breaks it down', () => {
    const report = buildReport({ ...input({ runningAt: 1100, restoreTiming: there }), outcome: 'succeeded' });
    expect(report.downtimeMs).toBe(100);
    expect(report.totalMs).toBe(1500);
    expect(report.downtime?.restoreMs).toBe(20);
    expect(report.strategy).toBe('stop-and-copy');
    expect(report.warnings).toBeUndefined();
  });

  it('in doubt: the downtime runs to now, with no breakdown, and the warnings are kept', () => {
    const report = buildReport({ ...input({ warnings: ['destination: lock stayed'] }), outcome: 'in-doubt' });
    expect(report.downtimeMs).toBe(500);
    expect(report.downtime).toBeUndefined();
    expect(report.warnings).toEqual(['destination: lock stayed']);
  });

  it('says pre-copy only when rounds ran, and carries why memory moved stop-and-copy', () => {
    const precopy = { rounds: [], stopReason: 'within-budget' as const };
    expect(buildReport({ ...input(), rounds: 2, precopy, outcome: 'succeeded' }).strategy).toBe('precopy');
    const note = 'no dirty-memory tracking (soft-dirty) on a';
    const report = buildReport({ ...input({ strategyNote: note }), precopy, outcome: 'succeeded' });
    expect([report.strategy, report.strategyNote, report.precopy?.stopReason]).toEqual(['stop-and-copy', note, 'within-budget']);
  });
});
