import { toFerryError, type Phase } from './errors.ts';

/** Rejects with a TIMEOUT FerryError (in `phase`, if given) if `promise` takes longer than `ms`. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string, phase?: Phase): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(toFerryError(new Error(`${what} timed out after ${ms} ms`), phase, 'TIMEOUT')), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
