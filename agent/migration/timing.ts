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

/** Rejects with a TIMEOUT FerryError if `promise` takes longer than `ms`. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string, phase: Phase): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(toFerryError(new Error(`${what} timed out after ${ms} ms`), phase, 'TIMEOUT')), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
