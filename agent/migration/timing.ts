import type { Phase } from '../../src/errors.ts';
import { toFerryError } from '../../src/errors.ts';

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
