import type { Phase } from '../../src/errors.ts';
import { toFerryError } from '../../src/errors.ts';
import type { DowntimeBreakdown, RestoreTiming } from '../../src/protocol/migration.ts';

/** Runs named steps, recording each one's duration and attributing its errors to it. */
export class PhaseTimer {
  readonly timings: Array<{ phase: Phase; ms: number }> = [];
  private readonly onPhase: (phase: Phase) => void;
  current: Phase = 'preflight';

  constructor(onPhase: (phase: Phase) => void = () => undefined) {
    this.onPhase = onPhase;
  }

  async run<T>(phase: Phase, step: () => Promise<T>): Promise<T> {
    this.current = phase;
    this.onPhase(phase);
    const started = performance.now();
    try {
      return await step();
    } catch (error) {
      throw toFerryError(error, phase);
    } finally {
      this.timings.push({ phase, ms: Math.round((performance.now() - started) * 10) / 10 });
    }
  }
}

/** Milliseconds to a tenth, as reports give them. */
export function roundMs(ms: number): number {
  return Math.round(ms * 10) / 10;
}

/**
 * Points of the downtime on the source's clock (performance.now()): the
 * freeze began (`freezing`) and ended (`frozen`), CRIU's dump exited, the last
 * byte was handed to the link, the destination said prepared; and the page
 * bytes sent by the dump's start and by CRIU's exit.
 */
export interface DowntimeMarks {
  freezing?: number;
  frozen?: number;
  dumped?: number;
  sent?: number;
  prepared?: number;
  pagesAtDump?: number;
  pagesAtExit?: number;
}

/**
 * The downtime cut at the marks, up to `runningAt`, the destination's
 * confirmation: the parts add up to it. Pages stream while CRIU dumps, so
 * `ship` is only what was left once CRIU exited; the destination's own
 * timing is taken out of the wait for it, and `receive` is the rest (its
 * unpacking and checksums, the link's latency). Undefined while a mark is
 * missing.
 */
export function downtimeBreakdown(marks: DowntimeMarks, there: RestoreTiming | undefined, pageTotal: number, runningAt: number): DowntimeBreakdown | undefined {
  const { freezing, frozen, dumped, sent, prepared, pagesAtDump = 0, pagesAtExit = 0 } = marks;
  if (freezing === undefined || frozen === undefined || dumped === undefined || sent === undefined || prepared === undefined) return undefined;
  const destinationMs = there ? there.checkMs + there.criuMs + there.recordMs : 0;
  const pageBytes = pageTotal - pagesAtDump;
  return {
    freezeMs: roundMs(frozen - freezing),
    dumpMs: roundMs(dumped - frozen),
    shipMs: roundMs(Math.max(0, sent - dumped)),
    receiveMs: roundMs(Math.max(0, prepared - Math.max(sent, dumped) - destinationMs)),
    checkMs: there?.checkMs ?? 0,
    restoreMs: there?.criuMs ?? 0,
    recordMs: there?.recordMs ?? 0,
    resumeMs: roundMs(runningAt - prepared),
    overlappedBytes: Math.min(pageBytes, pagesAtExit - pagesAtDump),
    pageBytes,
  };
}
