// The downtime breakdown in the report: pure arithmetic on the marks.
import { describe, expect, it } from 'vitest';
import { downtimeBreakdown } from '../../agent/migration/timing.ts';

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
