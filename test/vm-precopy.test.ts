// Native pre-copy, in the VM lane: this machine's kernel has no soft-dirty,
// so a Debian kernel boots under QEMU and the real agents run inside it, on
// two netns hosts (test/vm/precopy-scenario.ts). memload migrates once idle
// and once dirtying its memory faster than rounds can follow.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ScenarioResult } from './vm/precopy-scenario.ts';
import { runInVm, vmLaneMissing } from './vm/lane.ts';

// FERRY_VM=0 (no VM lane built) skips these; otherwise a missing lane is a failure, not a silent skip.
const skipped = process.env.FERRY_VM === '0';
const missing = vmLaneMissing();
let outDir: string;
let results: ScenarioResult[] = [];

beforeAll(async () => {
  if (skipped) return;
  if (missing) throw new Error(`the VM lane cannot run: ${missing}`);
  outDir = await mkdtemp(join(tmpdir(), 'ferry-vm-precopy-'));
  const run = await runInVm({
    command: ['node', 'test/vm/precopy-scenario.ts', join(outDir, 'results.json'), '--mib', '32'],
    timeoutMs: 10 * 60_000,
    outDir,
  });
  if (run.exitCode !== 0) throw new Error(`the guest scenario exited with ${run.exitCode}:\n${run.output.slice(-4000)}`);
  const retried = /^an agent died while starting.*$/m.exec(run.output);
  if (retried) console.warn(`VM lane: ${retried[0]}`);
  results = JSON.parse(await readFile(join(outDir, 'results.json'), 'utf8')) as ScenarioResult[];
}, 11 * 60_000);

afterAll(async () => {
  if (outDir) await rm(outDir, { recursive: true, force: true });
});

function scenario(name: string): ScenarioResult {
  const result = results.find((entry) => entry.name === name);
  expect(result, `scenario ${name} ran`).toBeDefined();
  expect(result!.error).toBeUndefined();
  return result!;
}

describe.skipIf(skipped)('pre-copy in the VM lane', () => {
  it('moves an idle memory workload in pre-dump rounds whose final dump carries almost nothing', () => {
    const { report, checksumBefore, checksumAfter, verifyAfter, runningOnB } = scenario('idle');
    expect(report!.outcome).toBe('succeeded');
    expect(report!.strategy).toBe('precopy');
    expect(checksumAfter).toBe(checksumBefore);
    expect(verifyAfter).toMatch(/^verify ok pages \d+$/);
    expect(runningOnB).toBe(true);

    const rounds = report!.precopy!.rounds;
    expect(rounds.length).toBeGreaterThanOrEqual(2);
    // 32 MiB written once, then skipped because the parent round has it.
    expect(rounds[0]!.pagesWritten).toBeGreaterThanOrEqual(8192);
    for (const round of rounds.slice(1)) expect(round.pagesSkippedParent).toBeGreaterThan(0);
    expect(report!.criu.dump!.pagesSkippedParent).toBeGreaterThan(0);
    expect(report!.criu.dump!.pagesWritten).toBeLessThan(rounds[0]!.pagesWritten);
    // Idle: the final round is under 5 % of what is resident.
    expect(report!.criu.dump!.pagesWritten).toBeLessThan(0.05 * report!.criu.dump!.pagesScanned);
    expect(report!.precopy!.stopReason).toBeDefined();
    expect(report!.precopy!.predictedDowntimeMs).toBeGreaterThan(0);
    expect(report!.bytes.pages).toBeGreaterThanOrEqual(32 * 1024 * 1024);
  });

  it('stops rounds that cannot converge, says why, and still moves the workload intact', () => {
    const { report, verifyAfter, runningOnB, options } = scenario('busy');
    expect(report!.outcome).toBe('succeeded');
    expect(report!.strategy).toBe('precopy');
    expect(['not-shrinking', 'max-rounds']).toContain(report!.precopy!.stopReason);
    expect(report!.precopy!.rounds.length).toBeLessThanOrEqual(options.maxRounds);
    expect(verifyAfter).toMatch(/^verify ok pages \d+$/);
    expect(runningOnB).toBe(true);
  });
});
