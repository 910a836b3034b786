// `npm run bench:vm`: pre-copy against stop-and-copy and against the naive
// baseline of plain tools in the VM lane (a distribution kernel with
// soft-dirty, under QEMU software emulation), for memload at 256 MiB dirtying
// 0, 1 and 10 MiB/s. Writes
// bench/results/vm-latest.json and vm-latest.md.
//
// FERRY_BENCH_VM_MIB and FERRY_BENCH_VM_RATES change the workload.
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { projectRoot } from '../src/paths.ts';
import { runInVm, vmLaneMissing } from '../test/vm/lane.ts';
import type { VmBenchRun } from './vm-guest.ts';

const mib = Number(process.env.FERRY_BENCH_VM_MIB ?? 256);
const rates = process.env.FERRY_BENCH_VM_RATES ?? '0,1,10';

const missing = vmLaneMissing();
if (missing) throw new Error(`the VM lane cannot run: ${missing}`);
const outDir = await mkdtemp(join(tmpdir(), 'ferry-bench-vm-'));
try {
  const result = await runInVm({
    command: ['node', 'bench/vm-guest.ts', join(outDir, 'runs.json'), String(mib), rates],
    timeoutMs: 60 * 60_000,
    // The naive baseline holds the workload, its images, the tar on both sides and the restored copy at once.
    memoryMiB: Math.max(3072, 6 * mib + 1024),
    outDir,
    onOutput: (text) => process.stderr.write(text),
  });
  if (result.exitCode !== 0) throw new Error(`the guest's benchmark exited with ${result.exitCode}`);
  const { runs } = JSON.parse(await readFile(join(outDir, 'runs.json'), 'utf8')) as { runs: VmBenchRun[] };
  const summary = { date: new Date().toISOString(), mib, runs };
  await mkdir(join(projectRoot, 'bench', 'results'), { recursive: true });
  await writeFile(join(projectRoot, 'bench', 'results', 'vm-latest.json'), `${JSON.stringify(summary, null, 2)}\n`);
  const markdown = render(mib, runs);
  await writeFile(join(projectRoot, 'bench', 'results', 'vm-latest.md'), markdown);
  process.stdout.write(markdown);
} finally {
  await rm(outDir, { recursive: true, force: true });
}

function render(mib: number, runs: VmBenchRun[]): string {
  const rows: string[] = [];
  for (const rate of [...new Set(runs.map((run) => run.dirtyMibps))]) {
    const at = runs.filter((run) => run.dirtyMibps === rate);
    const report = (strategy: string) => at.flatMap((run) => (run.strategy === strategy && 'report' in run ? [run.report] : []))[0];
    const pre = report('precopy');
    const stop = report('stop-and-copy');
    const naive = at.flatMap((run) => ('naive' in run ? [run.naive] : []))[0];
    if (!pre || !stop || !naive) continue;
    const finalBytes = (pre.criu.dump?.pagesWritten ?? 0) * 4096;
    const resident = (pre.criu.dump?.pagesScanned ?? 0) * 4096;
    rows.push(
      `| ${rate} MiB/s | ${pre.downtimeMs} ms | ${stop.downtimeMs} ms | ${ratio(pre.downtimeMs, stop.downtimeMs)} | ${naive.downtimeMs} ms | ${ratio(pre.downtimeMs, naive.downtimeMs)} | ${pre.precopy?.rounds.length ?? 0} (${pre.precopy?.stopReason ?? '-'}) | ${pre.precopy?.predictedDowntimeMs ?? '-'} ms | ${mb(finalBytes)} (${percent(finalBytes, resident)} of RSS) | ${pre.totalMs} ms | ${stop.totalMs} ms |`,
    );
  }
  return [
    `memload ${mib} MiB in the VM lane (QEMU TCG, Debian kernel with soft-dirty), pre-copy against stop-and-copy and against the naive baseline:`,
    '',
    '| dirty rate | pre-copy downtime | stop-and-copy downtime | ratio | naive downtime | pre-copy / naive | rounds (why stopped) | predicted | final dump | pre-copy total | stop-and-copy total |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n');
}

function ratio(a: number, b: number): number {
  return Math.round((a / b) * 100) / 100;
}

function mb(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function percent(part: number, whole: number): string {
  return whole ? `${((part / whole) * 100).toFixed(1)} %` : '-';
}
