// The VM lane's smoke test: one boot of the Debian kernel under QEMU
// (test/vm/lane.ts) runs test/vm/smoke.sh, which checks that the guest has
// what this machine lacks (soft-dirty: `ferry doctor`), that raw CRIU
// incremental pre-dumps work there, and that ferry's real agents migrate a
// container between two netns hosts inside it (`ferry demo`).
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runInVm, vmLaneMissing, type VmResult } from './vm/lane.ts';

// FERRY_VM=0 (no VM lane built) skips these; otherwise a missing lane is a failure, not a silent skip.
const skipped = process.env.FERRY_VM === '0';
const missing = vmLaneMissing();
const BOOT_TIMEOUT_MS = 10 * 60_000;
let outDir = '';
let run: VmResult | undefined;

beforeAll(async () => {
  if (skipped) return;
  if (missing) throw new Error(`the VM lane cannot run: ${missing}`);
  outDir = await mkdtemp(join(tmpdir(), 'ferry-vm-smoke-'));
  run = await runInVm({ command: ['sh', 'test/vm/smoke.sh', outDir], timeoutMs: BOOT_TIMEOUT_MS, outDir });
}, BOOT_TIMEOUT_MS + 30_000);

afterAll(async () => {
  if (outDir) await rm(outDir, { recursive: true, force: true });
});

/** One check's exit code and output, with the guest's whole output as the failure message. */
async function check(name: string): Promise<{ rc: number; out: string; context: string }> {
  expect(run, 'the VM ran').toBeDefined();
  const rc = Number((await readFile(join(outDir, `${name}.rc`), 'utf8').catch(() => 'NaN')).trim());
  const out = await readFile(join(outDir, `${name}.out`), 'utf8').catch(() => '');
  return { rc, out, context: `guest output:\n${run!.output.slice(-6000)}` };
}

describe.skipIf(skipped)('VM lane (Debian kernel under QEMU)', () => {
  it('runs the whole job', () => {
    expect(run?.exitCode, run?.output.slice(-4000)).toBe(0);
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
