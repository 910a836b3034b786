import type { MigrationOptions } from '../protocol/migration.ts';

/** Stop-and-copy's rate, for auto's estimate of its downtime (above what the data path moves here today). */
export const stopAndCopyRate = 1024 * 1024 * 1024;

export interface PostcopyInputs extends Pick<MigrationOptions, 'strategy' | 'allowPostcopy' | 'maxDowntimeMs'> {
  /** The container's resident memory. */
  memoryBytes: number;
  /** Whether this host tracks dirty memory (pre-copy possible, given the destination too). */
  softDirty: boolean;
}

/**
 * Post-copy when asked for by name; under auto only when the operator allowed
 * it (its failure window differs: the source host must stay up until the last
 * page), pre-copy is impossible here (no soft-dirty), and moving the memory
 * while frozen would outlast the downtime budget. Pure, for its unit test.
 */
export function choosePostcopy(inputs: PostcopyInputs): { postcopy: boolean; note?: string } {
  if (inputs.strategy === 'postcopy') return { postcopy: true };
  if (inputs.strategy !== 'auto' || !inputs.allowPostcopy || inputs.softDirty) return { postcopy: false };
  const frozenMs = Math.round((inputs.memoryBytes / stopAndCopyRate) * 1000);
  if (frozenMs <= inputs.maxDowntimeMs) return { postcopy: false };
  return {
    postcopy: true,
    note: `post-copy (allowed): no soft-dirty here, and stop-and-copy of ${Math.round(inputs.memoryBytes / 2 ** 20)} MiB would keep it frozen for about ${frozenMs} ms, over the ${inputs.maxDowntimeMs} ms budget`,
  };
}
