import { z } from 'zod';

// Numbers a peer sends. z.number() alone takes -1e15 for a size; these say
// what each kind of number may be (zod already refuses NaN and Infinity).

/** Sizes in bytes. */
export const byteCount = z.number().int().nonnegative();
/** Pages, rounds, attempts, containers. */
export const count = z.number().int().nonnegative();
/** Durations and offsets in milliseconds; fractions allowed (performance.now differences). */
export const milliseconds = z.number().nonnegative();
/** Rates, e.g. bytes per second. */
export const rate = z.number().nonnegative();
