// The VM lane: the Debian kernel under QEMU (test/vm/lane.ts), booted twice at
// once, one vCPU each, since each emulated guest keeps one host core busy:
// - the smoke job (test/vm/smoke.sh) checks that the guest has what this
//   machine lacks (soft-dirty: `ferry doctor`), that raw CRIU incremental
//   pre-dumps work there, and that ferry's real agents migrate a container
//   between two netns hosts inside it (`ferry demo`);
// - native pre-copy (test/vm/precopy-scenario.ts): the real agents on two
//   netns hosts in the guest migrate memload once idle and once dirtying its
//   memory faster than rounds can follow.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ScenarioResult } from './vm/precopy-scenario.ts';
import { runInVm, vmLaneMissing, type VmResult } from './vm/lane.ts';

// FERRY_VM=0 (no VM lane built) skips these; otherwise a missing lane is a failure, not a silent skip.
const skipped = process.env.FERRY_VM === '0';
const missing = vmLaneMissing();
const BOOT_TIMEOUT_MS = 10 * 60_000;
let smokeDir = '';
let precopyDir = '';
let smoke: VmResult | undefined;
let smokeFailure: unknown;
let results: ScenarioResult[] = [];
let precopyFailure: unknown;

async function runPrecopy(): Promise<ScenarioResult[]> {
  const run = await runInVm({
    command: ['node', 'test/vm/precopy-scenario.ts', join(precopyDir, 'results.json'), '--mib', '32'],
    timeoutMs: BOOT_TIMEOUT_MS,
    outDir: precopyDir,
  });
  if (run.exitCode !== 0) throw new Error(`the guest scenario exited with ${run.exitCode}:\n${run.output.slice(-4000)}`);
  const retried = /^an agent died while starting.*$/m.exec(run.output);
  if (retried) console.warn(`VM lane: ${retried[0]}`);
  return JSON.parse(await readFile(join(precopyDir, 'results.json'), 'utf8')) as ScenarioResult[];
}

beforeAll(async () => {
  if (skipped) return;
  if (missing) throw new Error(`the VM lane cannot run: ${missing}`);
  smokeDir = await mkdtemp(join(tmpdir(), 'ferry-vm-smoke-'));
  precopyDir = await mkdtemp(join(tmpdir(), 'ferry-vm-precopy-'));
  // Each job's failure is its own tests' failure, not the other's.
  await Promise.all([
    runInVm({ command: ['sh', 'test/vm/smoke.sh', smokeDir], timeoutMs: BOOT_TIMEOUT_MS, outDir: smokeDir }).then(
      (run) => void (smoke = run),
      (error: unknown) => void (smokeFailure = error),
    ),
    runPrecopy().then(
      (found) => void (results = found),
      (error: unknown) => void (precopyFailure = error),
    ),
  ]);
}, BOOT_TIMEOUT_MS + 60_000);

afterAll(async () => {
  for (const directory of [smokeDir, precopyDir]) if (directory) await rm(directory, { recursive: true, force: true });
});

/** One smoke check's exit code and output, with the guest's whole output as the failure message. */
async function check(name: string): Promise<{ rc: number; out: string; context: string }> {
  if (smokeFailure) throw smokeFailure;
  expect(smoke, 'the VM ran').toBeDefined();
  const rc = Number((await readFile(join(smokeDir, `${name}.rc`), 'utf8').catch(() => 'NaN')).trim());
  const out = await readFile(join(smokeDir, `${name}.out`), 'utf8').catch(() => '');
  return { rc, out, context: `guest output:\n${smoke!.output.slice(-6000)}` };
}

function scenario(name: string): ScenarioResult {
  if (precopyFailure) throw precopyFailure;
  const result = results.find((entry) => entry.name === name);
  expect(result, `scenario ${name} ran`).toBeDefined();
  expect(result!.error).toBeUndefined();
  return result!;
}

describe.skipIf(skipped)('VM lane (Debian kernel under QEMU)', () => {
  it('runs the whole job', () => {
    if (smokeFailure) throw smokeFailure;
    expect(smoke?.exitCode, smoke?.output.slice(-4000)).toBe(0);
  });

  it('has what this machine lacks: ferry doctor reports memory dirty tracking', async () => {
    const { rc, out, context } = await check('doctor');
    expect(rc, context).toBe(0);
    const report = JSON.parse(out) as { kernel: string; ok: boolean; capabilities: Array<{ name: string; ok: boolean }> };
    expect(report.ok, context).toBe(true);
    expect(report.kernel).toMatch(/^\d+\.\d+\.\d+-\d+-(cloud-)?amd64$/);
    const capability = (name: string) => report.capabilities.find((entry) => entry.name === name)?.ok;
    expect(capability('memory dirty tracking'), context).toBe(true);
    expect(capability('criu check'), context).toBe(true);
    expect(capability('cgroup v2 freezer'), context).toBe(true);
  });

  it('runs raw CRIU pre-dump --track-mem rounds, a parented dump and a restore', async () => {
    const { rc, out, context } = await check('criu-precopy');
    expect(rc, context).toBe(0);
    expect(out).toMatch(/verify ok pages \d+/);
    expect(out).toMatch(/criu-precopy: ok$/m);
  });

  it('migrates a running container between two netns hosts with real agents (ferry demo)', async () => {
    const { rc, out, context } = await check('demo');
    expect(rc, context).toBe(0);
    expect(out, context).toMatch(/web host-a → host-b: succeeded/);
    expect(out, context).toMatch(/host-b\s+web\s+running/);
    // This kernel tracks dirty memory: the demo's default strategy (auto) moved memory in pre-dump rounds.
    expect(out, context).toMatch(/strategy precopy/);
    expect(out, context).toMatch(/Pre-copy: [1-9]\d* rounds, stopped: [a-z-]+/);
    const leftovers = await check('leftovers');
    expect(leftovers.out.trim(), 'left behind in the guest').toBe('');
  });
});

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
