import { describe, expect, it } from 'vitest';
import { choosePostcopy } from '../../src/precopy/strategy.ts';

const MIB = 2 ** 20;
const base = { strategy: 'auto' as const, allowPostcopy: true, maxDowntimeMs: 300, memoryBytes: 1024 * MIB, softDirty: false };

describe('choosePostcopy', () => {
  it('takes post-copy when asked for by name, whatever the rest says', () => {
    expect(choosePostcopy({ ...base, strategy: 'postcopy', allowPostcopy: false, softDirty: true, memoryBytes: 0 }).postcopy).toBe(true);
  });

  it('under auto, only where the operator allowed it', () => {
    expect(choosePostcopy({ ...base, allowPostcopy: false }).postcopy).toBe(false);
    expect(choosePostcopy({ ...base, allowPostcopy: undefined }).postcopy).toBe(false);
    const chosen = choosePostcopy(base);
    expect(chosen.postcopy).toBe(true);
    expect(chosen.note).toMatch(/1024 MiB would keep it frozen for about 1000 ms, over the 300 ms budget/);
  });

  it('under auto, not where stop-and-copy fits the budget or pre-copy is possible', () => {
    expect(choosePostcopy({ ...base, memoryBytes: 256 * MIB }).postcopy).toBe(false);
    expect(choosePostcopy({ ...base, softDirty: true }).postcopy).toBe(false);
  });

  it('never for the other strategies named', () => {
    expect(choosePostcopy({ ...base, strategy: 'stop-and-copy' }).postcopy).toBe(false);
    expect(choosePostcopy({ ...base, strategy: 'precopy' }).postcopy).toBe(false);
  });
});
