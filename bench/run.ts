import { randomBytes } from 'node:crypto';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { Cgroup, CgroupTree } from '../src/cgroup/cgroup.ts';
import { agentNodeFlags, projectRoot } from '../src/paths.ts';
import type { MigrationOptions, MigrationReport } from '../src/protocol/migration.ts';
import { AgentClient } from '../src/transport/client.ts';
import { readBuildEnv, startAgent, type AgentProcess } from '../lab/agents.ts';
import { containerAddress, createHosts, type Cluster, type Host } from '../lab/hosts.ts';
import { startPoller } from '../lab/poller.ts';
import { randomMac } from '../src/net/address.ts';
import { runBaseline, type BaselineResult } from './baseline.ts';

// `npm run bench`: ferry against a naive sequential baseline on the same two
// network-namespace hosts, side by side in one run; the WebSocket stream
// against a plain TCP socket; the agents' peak RSS. Writes
// bench/results/latest.json and bench/results/latest.md.

const sizes = (process.env.FERRY_BENCH_SIZES ?? '64,512,1024').split(',').map(Number);
const parts = new Set((process.env.FERRY_BENCH_PARTS ?? 'memory,small,stream,rootfs,service').split(','));
const rootfsMiB = Number(process.env.FERRY_BENCH_ROOTFS_MIB ?? 300);
const rootfs = join(projectRoot, '.build', 'rootfs', 'busybox');
const env = await readBuildEnv();

interface StreamSummary {
  tcp: PathFigures;
  native: PathFigures;
  channel: PathFigures;
  nativeRatio: number;
  channelRatio: number;
  runs: StreamRun[];
}

interface FerryRun {
  downtimeMs: number;
  totalMs: number;
  phases: MigrationReport['phases'];
  bytes: MigrationReport['bytes'];
  criu: MigrationReport['criu'];
  downtime: MigrationReport['downtime'];
  /** CPU time of each agent process over the migration, the source's with its native sender (not CRIU's). */
  cpuMs: { source: number; destination: number };
  /** Each agent's peak RSS during this migration alone (its high-water mark reset just before). */
  peakRssBytes: { source: number; destination: number };
  postcopy?: MigrationReport['postcopy'];
  /** The workload's page rewrites from just before the migration to just after it, as a share of its nominal rate. */
  progress?: number;
}

/** User + system CPU time of one process so far (clock ticks are 100 Hz on Linux). */
async function cpuMs(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

/** A migration through agent `from` to `to`, with the CPU each agent spent on it. */
async function timedMigrate(from: AgentClient, fromAgent: AgentProcess, toAgent: AgentProcess, name: string, options: MigrationOptions): Promise<FerryRun> {
  const before = [await cpuMs(fromAgent.pid), await cpuMs(toAgent.pid)];
  await resetPeakRss(fromAgent.pid);
  await resetPeakRss(toAgent.pid);
  const report = await from.request('migrate', { name, destination: { url: toAgent.url, token: toAgent.token }, options });
  const after = [await cpuMs(fromAgent.pid), await cpuMs(toAgent.pid)];
  const peakRssBytes = { source: await peakRss(fromAgent.pid), destination: await peakRss(toAgent.pid) };
  const { downtimeMs, totalMs, phases, bytes, criu, downtime, postcopy } = report;
  const source = after[0]! - before[0]! + nativeSendCpuMs(fromAgent, report.migrationId);
  return { downtimeMs, totalMs, phases, bytes, criu, downtime, ...(postcopy ? { postcopy } : {}), cpuMs: { source, destination: after[1]! - before[1]! }, peakRssBytes };
}

/** The CPU time of the source's ferry-frame-send runs for a migration, as the agent logged it. */
function nativeSendCpuMs(agent: AgentProcess, migrationId: string): number {
  const line = agent.logs().find((entry) => entry.includes(migrationId) && entry.includes('page images shipped'));
  return line ? Number((JSON.parse(line) as { nativeCpuMs?: number }).nativeCpuMs ?? 0) : 0;
}

/**
 * Each size runs `reps` pairs in alternating order (ferry first, then the
 * baseline first, ...): on this VM the first large run after a pause is the
 * slowest, and a single pair moves by ±30 %. Ratios are of the medians.
 */
interface SizeResult {
  mib: number;
  ferry: FerryRun[];
  baseline: Array<BaselineResult>;
  median: { ferryDowntimeMs: number; baselineDowntimeMs: number; ferryTotalMs: number; baselineTotalMs: number };
  downtimeRatio: number;
  /** The same workload moved post-copy, in the same alternation. */
  postcopy: FerryRun[];
}

const reps = Number(process.env.FERRY_BENCH_REPS ?? 3);
if (!Number.isInteger(reps) || reps < 1) throw new Error(`FERRY_BENCH_REPS must be a whole number ≥ 1, not ${process.env.FERRY_BENCH_REPS}`);
const ratio = (x: number, y: number) => Math.round((x / y) * 100) / 100;
function median(values: number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** Every memory run rewrites this much per second, so that progress during a migration can be measured. */
const dirtyMiBps = 16;
const memload = (name: string, mib: number) => ({
  name,
  rootfs,
  command: ['/bin/memload', '--mib', String(mib), ...(mib ? ['--dirty-mibps', String(dirtyMiBps)] : [])],
  env: {},
  cwd: '/',
  privateNetwork: false,
  labels: {},
});

async function waitReady(client: AgentClient, name: string): Promise<void> {
  for (let attempt = 0; attempt < 600; attempt += 1) {
    if ((await client.request('logs', { name })).text.includes('memload ready')) return;
    await sleep(100);
  }
  throw new Error(`${name} never became ready`);
}

const stopAndCopy: MigrationOptions = { strategy: 'stop-and-copy', maxDowntimeMs: 300, maxRounds: 8, rootfsPrecopy: true, timeoutMs: 600_000 };

const postcopy: MigrationOptions = { ...stopAndCopy, strategy: 'postcopy' };

/** memload's generation sum (pages rewritten since it started) and when it said so. */
async function generations(client: AgentClient, name: string): Promise<{ at: number; sum: number }> {
  const pid = (await client.request('list', {})).containers.find((container) => container.name === name)!.pid!;
  const seen = (await client.request('logs', { name })).text.split('\n').length;
  process.kill(pid, 'SIGUSR1');
  for (let attempt = 0; attempt < 600; attempt += 1) {
    const lines = (await client.request('logs', { name })).text.split('\n').slice(seen - 1);
    const match = lines.map((line) => /^checksum \S+ pages \d+ generation-sum (\d+)/.exec(line)).find(Boolean);
    if (match) return { at: performance.now(), sum: Number(match[1]) };
    await sleep(20);
  }
  throw new Error(`${name} never answered SIGUSR1`);
}

async function ferryRun(a: AgentClient, agentA: AgentProcess, agentB: AgentProcess, clientB: AgentClient, mib: number, options = stopAndCopy): Promise<FerryRun> {
  const name = `ferry-${options.strategy}-${mib}`;
  try {
    await a.request('run', { spec: memload(name, mib) });
    await waitReady(a, name);
    await sleep(1_000);
    const before = await generations(a, name);
    const run = await timedMigrate(a, agentA, agentB, name, options);
    const after = await generations(clientB, name);
    const nominal = ((after.at - before.at) / 1000) * ((dirtyMiBps * 2 ** 20) / 4096);
    return { ...run, progress: Math.round(((after.sum - before.sum) / nominal) * 100) / 100 };
  } finally {
    // Wherever it ended up (a failed migration leaves it on A).
    await a.request('remove', { name, force: true }).catch(() => undefined);
    await clientB.request('remove', { name, force: true }).catch(() => undefined);
  }
}

async function baselineRun(a: AgentClient, hostA: Host, hostB: Host, mib: number): Promise<BaselineResult> {
  const name = `naive-${mib}`;
  try {
    await a.request('run', { spec: memload(name, mib) });
    await waitReady(a, name);
    const info = (await a.request('list', {})).containers.find((container) => container.name === name)!;
    const tree = await CgroupTree.open(hostA.cgroupName);
    return await runBaseline({
      criu: env.FERRY_CRIU ?? 'criu',
      source: hostA,
      destination: hostB,
      pid: info.pid!,
      cgroup: tree.for(name),
      rootfs: join(hostA.stateDir, 'containers', name, 'rootfs'),
      workDir: join(hostA.stateDir, `naive-${mib}`),
    });
  } finally {
    await a.request('remove', { name, force: true }).catch(() => undefined);
  }
}

interface RootfsResult {
  mib: number;
  twoPass: { downtimeMs: number; totalMs: number; frozenRootfsMs: number; rootfsBytes: number };
  singlePass: { downtimeMs: number; totalMs: number; frozenRootfsMs: number; rootfsBytes: number };
  downtimeRatio: number;
}

/**
 * The rootfs two-pass against one pass during the freeze: a counter in a
 * rootfs of `mib` MiB of files that rewrites three small files all the time.
 */
async function rootfsRun(a: AgentClient, agentB: AgentProcess, clientB: AgentClient, mib: number): Promise<RootfsResult> {
  const directory = await mkdtemp(join(tmpdir(), 'ferry-bench-rootfs-'));
  try {
    const tree = join(directory, 'rootfs');
    await cp(rootfs, tree, { recursive: true, verbatimSymlinks: true });
    await mkdir(join(tree, 'data', 'blobs'), { recursive: true });
    for (let index = 0; index < mib; index += 1) await writeFile(join(tree, 'data', 'blobs', `blob-${index}`), randomBytes(1 << 20));
    const script = 'while :; do for f in 1 2 3; do date +%s%N > /data/hot-$f; done; echo tick; sleep 0.05; done';
    const once = async (name: string, rootfsPrecopy: boolean) => {
      await a.request('run', { spec: { ...memload(name, 0), rootfs: tree, command: ['/bin/sh', '-c', script] } });
      await sleep(500);
      const report = await a.request('migrate', {
        name,
        destination: { url: agentB.url, token: agentB.token },
        options: { strategy: 'stop-and-copy', maxDowntimeMs: 300, maxRounds: 8, rootfsPrecopy, timeoutMs: 600_000 },
      });
      await clientB.request('remove', { name, force: true });
      const snapshot = report.phases.find((phase) => phase.phase === 'snapshot')?.ms ?? 0;
      return { downtimeMs: report.downtimeMs, totalMs: report.totalMs, frozenRootfsMs: snapshot, rootfsBytes: report.bytes.rootfs };
    };
    const twoPass = await once('rootfs-two-pass', true);
    const singlePass = await once('rootfs-one-pass', false);
    return { mib, twoPass, singlePass, downtimeRatio: Math.round((twoPass.downtimeMs / singlePass.downtimeMs) * 100) / 100 };
  } finally {
    await rm(directory, { recursive: true, force: true });
  }
}

/** The largest VmHWM seen of each process before its mark was reset, so the whole run's peak survives resets. */
const peaksBeforeReset = new Map<number, number>();

/** Resets a process's VmHWM to its current RSS (clear_refs 5), so the next peak is one migration's. */
async function resetPeakRss(pid: number): Promise<void> {
  peaksBeforeReset.set(pid, Math.max(peaksBeforeReset.get(pid) ?? 0, await peakRss(pid)));
  await writeFile(`/proc/${pid}/clear_refs`, '5');
}

/** The peak RSS of a process over the whole run. */
async function runPeakRss(pid: number): Promise<number> {
  return Math.max(peaksBeforeReset.get(pid) ?? 0, await peakRss(pid));
}

async function peakRss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024;
}

interface PathFigures {
  mbps: number;
  senderCpuMs: number;
  receiverCpuMs: number;
}
type StreamRun = Record<'tcp' | 'channel' | 'native', PathFigures>;

/** One run of bench/throughput.ts: the same bytes over a plain socket and both paths of the data channel. */
async function throughput(hostA: Host, hostB: Host, bytes: number): Promise<StreamRun> {
  const server = execa('nsenter', [`--net=/run/netns/${hostB.netns}`, process.execPath, ...agentNodeFlags, join(projectRoot, 'bench', 'throughput.ts'), 'serve', hostB.address]);
  await new Promise<void>((resolve) => server.stdout!.once('data', () => resolve()));
  try {
    const { stdout } = await execa('nsenter', [`--net=/run/netns/${hostA.netns}`, process.execPath, ...agentNodeFlags, join(projectRoot, 'bench', 'throughput.ts'), 'send', hostB.address, String(bytes)]);
    return JSON.parse(stdout) as StreamRun;
  } finally {
    server.kill();
    await server.catch(() => undefined);
  }
}

/**
 * The demo's counter (a shell loop, a few hundred KiB of memory) moved A → B
 * and back, 2 × reps times: the fixed cost of a migration, next to CRIU's
 * own frozen and restore times in the same runs.
 */
async function smallRuns(clientA: AgentClient, clientB: AgentClient, agentA: AgentProcess, agentB: AgentProcess): Promise<FerryRun[]> {
  const script = 'i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done';
  await clientA.request('run', { spec: { ...memload('bench-counter', 0), command: ['/bin/sh', '-c', script] } });
  const sides = [
    { client: clientA, agent: agentA },
    { client: clientB, agent: agentB },
  ] as const;
  const runs: FerryRun[] = [];
  let at = 0;
  try {
    await sleep(500);
    for (let rep = 0; rep < 2 * reps; rep += 1) {
      const from = sides[at]!;
      const to = sides[1 - at]!;
      runs.push(await timedMigrate(from.client, from.agent, to.agent, 'bench-counter', stopAndCopy));
      at = 1 - at;
      await sleep(300);
    }
  } finally {
    await sides[at]!.client.request('remove', { name: 'bench-counter', force: true }).catch(() => undefined);
  }
  return runs;
}

/** The machine's own cost of memory first touched: 1 GiB written into a new tmpfs file, the best of two. */
async function freshMemoryMs(): Promise<number> {
  const times: number[] = [];
  for (let run = 0; run < 2; run += 1) {
    const started = performance.now();
    await execa('dd', ['if=/dev/zero', 'of=/dev/shm/ferry-bench-fresh', 'bs=1M', 'count=1024', 'status=none']);
    times.push(performance.now() - started);
    await rm('/dev/shm/ferry-bench-fresh', { force: true });
    await sleep(3_000);
  }
  return Math.round(Math.min(...times));
}

interface ServiceRun {
  downtimeMs: number;
  /** The largest gap between two answers the client saw. */
  stallMs: number;
  answers: number;
  errors: number;
  connections: number;
}

/**
 * A small web server with its own address, a client on the third host asking
 * for a page every 10 ms over one keep-alive connection: the stall the client
 * sees next to ferry's downtime, moving A → B and back, `reps` times.
 */
async function serviceRuns(clientA: AgentClient, clientB: AgentClient, agentA: AgentProcess, agentB: AgentProcess, hostC: Host): Promise<ServiceRun[]> {
  const { address, prefix } = containerAddress(cluster, 0);
  await clientA.request('run', {
    spec: { name: 'bench-web', rootfs, command: ['/bin/netload', 'http', '8080'], env: {}, cwd: '/', privateNetwork: true, network: { address, prefix, mac: randomMac() }, labels: {} },
  });
  const runs: ServiceRun[] = [];
  let here = clientA;
  let there = { client: clientB, agent: agentB };
  let back = { client: clientA, agent: agentA };
  try {
    for (let rep = 0; rep < 2 * reps; rep += 1) {
      // A poller (one connection) per move, so each move's stall is its own.
      const poller = startPoller(hostC, 'http', address, 8080, 10);
      try {
        await poller.waitForAnswers(100);
        const report = await here.request('migrate', { name: 'bench-web', destination: { url: there.agent.url, token: there.agent.token }, options: { strategy: 'auto', maxDowntimeMs: 300, maxRounds: 8, rootfsPrecopy: true, timeoutMs: 120_000 } });
        await poller.waitForMore(100);
        const after = await poller.stop();
        runs.push({ downtimeMs: report.downtimeMs, stallMs: after.maxGapMs, answers: after.answers, errors: after.errors.length, connections: after.connections });
      } catch (error) {
        await poller.stop().catch(() => undefined);
        throw error;
      }
      here = there.client;
      [there, back] = [back, there];
    }
  } finally {
    await here.request('remove', { name: 'bench-web', force: true }).catch(() => undefined);
  }
  return runs;
}

const cluster: Cluster = await createHosts(3, { bridged: true });
const agents: AgentProcess[] = [];
const clients: AgentClient[] = [];
try {
  const [hostA, hostB, hostC] = cluster.hosts as [Host, Host, Host];
  for (const host of [hostA, hostB]) {
    const agent = await startAgent(host, { extraArgs: ['--bridge', host.bridge!] });
    agents.push(agent);
    clients.push(await AgentClient.connect({ url: agent.url, token: agent.token }));
  }
  const [clientA, clientB] = clients as [AgentClient, AgentClient];
  const freshMs = await freshMemoryMs();
  const results: SizeResult[] = [];
  for (const mib of parts.has('memory') ? sizes : []) {
    const ferry: FerryRun[] = [];
    const lazy: FerryRun[] = [];
    const baseline: Array<BaselineResult> = [];
    for (let rep = 0; rep < reps; rep += 1) {
      const runFerry = async () => {
        process.stderr.write(`bench: ${mib} MiB: ferry (${rep + 1}/${reps})…\n`);
        ferry.push(await ferryRun(clientA, agents[0]!, agents[1]!, clientB, mib));
      };
      const runPostcopy = async () => {
        process.stderr.write(`bench: ${mib} MiB: ferry post-copy (${rep + 1}/${reps})…\n`);
        lazy.push(await ferryRun(clientA, agents[0]!, agents[1]!, clientB, mib, postcopy));
      };
      const runBaseline = async () => {
        process.stderr.write(`bench: ${mib} MiB: baseline (${rep + 1}/${reps})…\n`);
        baseline.push(await baselineRun(clientA, hostA, hostB, mib));
      };
      if (rep % 2 === 0) {
        await runFerry();
        await runPostcopy();
        await runBaseline();
      } else {
        await runBaseline();
        await runPostcopy();
        await runFerry();
      }
    }
    const medians = {
      ferryDowntimeMs: median(ferry.map((run) => run.downtimeMs)),
      baselineDowntimeMs: median(baseline.map((run) => run.downtimeMs)),
      ferryTotalMs: median(ferry.map((run) => run.totalMs)),
      baselineTotalMs: median(baseline.map((run) => run.totalMs)),
    };
    results.push({ mib, ferry, baseline, postcopy: lazy, median: medians, downtimeRatio: ratio(medians.ferryDowntimeMs, medians.baselineDowntimeMs) });
  }
  let stream: StreamSummary | undefined;
  if (parts.has('stream')) {
    process.stderr.write('bench: stream throughput…\n');
    // Five runs, medians: single runs of either path vary by ±30 % here.
    const runs: StreamRun[] = [];
    for (let run = 0; run < 5; run += 1) runs.push(await throughput(hostA, hostB, 1 << 30));
    const figures = (path: keyof StreamRun) => ({
      mbps: median(runs.map((run) => run[path].mbps)),
      senderCpuMs: median(runs.map((run) => run[path].senderCpuMs)),
      receiverCpuMs: median(runs.map((run) => run[path].receiverCpuMs)),
    });
    const tcp = figures('tcp');
    const native = figures('native');
    const channel = figures('channel');
    const ratio = (path: PathFigures) => Math.round((path.mbps / tcp.mbps) * 100) / 100;
    stream = { tcp, native, channel, nativeRatio: ratio(native), channelRatio: ratio(channel), runs };
  }
  let small: FerryRun[] | undefined;
  if (parts.has('small')) {
    process.stderr.write('bench: a small counter, moved back and forth…\n');
    small = await smallRuns(clientA, clientB, agents[0]!, agents[1]!);
  }
  const rss = { sourceBytes: await runPeakRss(agents[0]!.pid), destinationBytes: await runPeakRss(agents[1]!.pid) };
  let rootfsPasses: RootfsResult | undefined;
  if (parts.has('rootfs')) {
    process.stderr.write(`bench: rootfs of ${rootfsMiB} MiB, two passes against one…\n`);
    rootfsPasses = await rootfsRun(clientA, agents[1]!, clientB, rootfsMiB);
  }
  let service: ServiceRun[] | undefined;
  if (parts.has('service')) {
    process.stderr.write('bench: web server with a keep-alive client, moved back and forth…\n');
    service = await serviceRuns(clientA, clientB, agents[0]!, agents[1]!, hostC);
  }
  const summary = { date: new Date().toISOString(), kernel: (await execa('uname', ['-r'])).stdout, freshMemoryMs: freshMs, sizes: results, small, stream, peakRss: rss, rootfsPasses, service };
  await mkdir(join(projectRoot, 'bench', 'results'), { recursive: true });
  await writeFile(join(projectRoot, 'bench', 'results', 'latest.json'), `${JSON.stringify(summary, null, 2)}\n`);
  const markdown = render(summary);
  await writeFile(join(projectRoot, 'bench', 'results', 'latest.md'), markdown);
  process.stdout.write(markdown);
} finally {
  for (const client of clients) client.close();
  for (const agent of agents) await agent.stop().catch(() => undefined);
  await cluster.destroy();
}

function ms(value: number | undefined): string {
  return value === undefined ? '' : String(Math.round(value));
}

function criuMs(us: number | undefined): string {
  return us === undefined ? '' : String(Math.round(us / 1000));
}

/** One run's downtime, part by part (see downtimeBreakdownSchema). */
function breakdownCells(run: FerryRun): string {
  const parts = run.downtime;
  if (!parts) return '| | | | | | | | |';
  const overlap = parts.pageBytes ? `${Math.round((parts.overlappedBytes / parts.pageBytes) * 100)} %` : '–';
  return `| ${ms(parts.freezeMs)} | ${ms(parts.dumpMs)} | ${overlap} | ${ms(parts.shipMs)} | ${ms(parts.receiveMs)} | ${ms(parts.checkMs)} | ${ms(parts.restoreMs)} | ${ms(parts.recordMs)} | ${ms(parts.resumeMs)} |`;
}
function render(summary: {
  freshMemoryMs: number;
  sizes: SizeResult[];
  small: FerryRun[] | undefined;
  stream: StreamSummary | undefined;
  peakRss: { sourceBytes: number; destinationBytes: number };
  rootfsPasses: RootfsResult | undefined;
  service: ServiceRun[] | undefined;
}): string {
  const mib = (bytes: number) => `${Math.round(bytes / 1048576)} MiB`;
  const breakdownHeader = 'freeze | dump | pages sent during dump | ship rest | receive | check | criu restore | record | resume';
  const lines: string[] = [`This machine: 1 GiB of memory first touched (dd into a new tmpfs file) took ${summary.freshMemoryMs} ms.`, ''];
  if (summary.sizes.length) {
    const spread = (values: number[]) => `${Math.round(median(values))} ms (${Math.round(Math.min(...values))}–${Math.round(Math.max(...values))})`;
    const perGiB = (run: FerryRun, side: 'source' | 'destination') => {
      const moved = run.bytes.pages + run.bytes.images + run.bytes.rootfs;
      return moved ? (run.cpuMs[side] / 1000 / (moved / 2 ** 30)).toFixed(2) : '';
    };
    lines.push(
      `Medians of ${reps} runs each, alternating which goes first (min–max in brackets):`,
      '',
      '| memory | ferry downtime | naive downtime | ratio | ferry total | naive total | ratio |',
      '| --- | --- | --- | --- | --- | --- | --- |',
      ...summary.sizes.map(
        (size) =>
          `| ${size.mib} MiB | ${spread(size.ferry.map((run) => run.downtimeMs))} | ${spread(size.baseline.map((run) => run.downtimeMs))} | ${size.downtimeRatio} | ${spread(size.ferry.map((run) => run.totalMs))} | ${spread(size.baseline.map((run) => run.totalMs))} | ${ratio(size.median.ferryTotalMs, size.median.baselineTotalMs)} |`,
      ),
      '',
      "Where ferry's downtime went, run by run (ms, on the source's clock; the parts add up to the downtime): the freeze (and network lock); CRIU's dump, with the share of the page bytes already on the link when it exited; the rest of the shipping after it; the wait for the destination to have and check everything; its image checks and set-up, criu restore and recording; the commit and resume. Then CRIU's own frozen and restore times, each agent's CPU seconds per GiB moved, and the naive steps.",
      '',
      `| memory | run | downtime | ${breakdownHeader} | CRIU frozen | CRIU restore | CPU s/GiB source | destination | naive dump | tar | copy | untar | restore |`,
      `| --- | --- | --- |${' --- |'.repeat(9)} --- | --- | --- | --- | --- | --- | --- | --- | --- |`,
      ...summary.sizes.flatMap((size) =>
        size.ferry.map((run, index) => {
          const naive = size.baseline[index]!;
          return `| ${size.mib} MiB | ${index + 1} | ${ms(run.downtimeMs)} ${breakdownCells(run)} ${criuMs(run.criu.dump?.frozenTime)} | ${criuMs(run.criu.restore?.restoreTime)} | ${perGiB(run, 'source')} | ${perGiB(run, 'destination')} | ${naive.steps.dump} | ${naive.steps.tar} | ${naive.steps.copy} | ${naive.steps.untar} | ${naive.steps.restore} |`;
        }),
      ),
      '',
      "Each agent's peak RSS during one migration (its high-water mark reset just before; the largest of the runs):",
      '',
      '| memory | stop-and-copy source | destination | post-copy source | destination |',
      '| --- | --- | --- | --- | --- |',
      ...summary.sizes.map((size) => {
        const peak = (runs: FerryRun[], side: 'source' | 'destination') => mib(Math.max(...runs.map((run) => run.peakRssBytes[side])));
        return `| ${size.mib} MiB | ${peak(size.ferry, 'source')} | ${peak(size.ferry, 'destination')} | ${peak(size.postcopy, 'source')} | ${peak(size.postcopy, 'destination')} |`;
      }),
      '',
    );
    lines.push(
      `Post-copy against stop-and-copy and the naive baseline, same runs (medians; the workload rewrites ${dirtyMiBps} MiB/s; "progress" is how much of that it managed from just before the migration until just after it ended, last page included):`,
      '',
      '| memory | post-copy downtime | stop-and-copy downtime | naive downtime | post-copy total | stop-and-copy total | total ratio | last page after resume | faulted / pushed pages | largest stall | progress post-copy | progress stop-and-copy |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
      ...summary.sizes.map((size) => {
        const lazy = size.postcopy;
        const pc = (pick: (run: FerryRun) => number) => median(lazy.map(pick));
        const tail = pc((run) => (run.postcopy ? run.postcopy.completeMs - run.postcopy.runningMs : 0));
        return `| ${size.mib} MiB | ${spread(lazy.map((run) => run.downtimeMs))} | ${Math.round(size.median.ferryDowntimeMs)} ms | ${Math.round(size.median.baselineDowntimeMs)} ms | ${Math.round(pc((run) => run.totalMs))} ms | ${Math.round(size.median.ferryTotalMs)} ms | ${ratio(pc((run) => run.totalMs), size.median.ferryTotalMs)} | ${Math.round(tail)} ms | ${Math.round(pc((run) => run.postcopy?.faultedPages ?? 0))} / ${Math.round(pc((run) => run.postcopy?.pushedPages ?? 0))} | ${ms(pc((run) => (run.postcopy?.maxStallUs ?? 0) / 1000))} ms | ${pc((run) => run.progress ?? 0).toFixed(2)} | ${median(size.ferry.map((run) => run.progress ?? 0)).toFixed(2)} |`;
      }),
      '',
    );
  }
  if (summary.small?.length) {
    const runs = summary.small;
    lines.push(
      `A small counter (a shell loop), moved back and forth ${runs.length} times (ms):`,
      '',
      `| move | downtime | ${breakdownHeader} | CRIU frozen | CRIU restore |`,
      `| --- | --- |${' --- |'.repeat(9)} --- | --- |`,
      ...runs.map((run, index) => `| ${index + 1} | ${ms(run.downtimeMs)} ${breakdownCells(run)} ${criuMs(run.criu.dump?.frozenTime)} | ${criuMs(run.criu.restore?.restoreTime)} |`),
      '',
      `Medians: downtime ${ms(median(runs.map((run) => run.downtimeMs)))} ms; CRIU frozen ${criuMs(median(runs.map((run) => run.criu.dump?.frozenTime ?? 0)))} ms and restore ${criuMs(median(runs.map((run) => run.criu.restore?.restoreTime ?? 0)))} ms of it.`,
      '',
    );
  }
  if (summary.stream) {
    const { tcp, native, channel } = summary.stream;
    const cpu = (path: PathFigures) => `${(path.senderCpuMs / 1000).toFixed(2)} / ${(path.receiverCpuMs / 1000).toFixed(2)}`;
    lines.push(
      'Stream, 1 GiB over the same veth link, medians of 5 runs (CPU: seconds per GiB, sender / receiver; the native sender reads its bytes from a tmpfs file, a copy the plain socket does not make):',
      '',
      '| path | Mbit/s | of plain TCP | CPU s/GiB |',
      '| --- | --- | --- | --- |',
      `| plain TCP socket | ${tcp.mbps} | 1 | ${cpu(tcp)} |`,
      `| data channel, native sender (the final dump's page pipes) | ${native.mbps} | ${summary.stream.nativeRatio} | ${cpu(native)} |`,
      `| data channel from JavaScript (tar streams, followed images) | ${channel.mbps} | ${summary.stream.channelRatio} | ${cpu(channel)} |`,
      '',
    );
  }
  lines.push(`Peak RSS of the agents over the whole run (every part; each moves containers both ways): host A's ${mib(summary.peakRss.sourceBytes)}, host B's ${mib(summary.peakRss.destinationBytes)}.`, '');
  const passes = summary.rootfsPasses;
  if (passes) {
    lines.push(
      `Rootfs of ${passes.mib} MiB, three small files rewritten every 50 ms:`,
      '',
      '| rootfs | downtime | rootfs work while frozen | rootfs bytes | total |',
      '| --- | --- | --- | --- | --- |',
      `| two passes | ${passes.twoPass.downtimeMs} ms | ${passes.twoPass.frozenRootfsMs} ms | ${mib(passes.twoPass.rootfsBytes)} | ${passes.twoPass.totalMs} ms |`,
      `| one pass, frozen | ${passes.singlePass.downtimeMs} ms | ${passes.singlePass.frozenRootfsMs} ms | ${mib(passes.singlePass.rootfsBytes)} | ${passes.singlePass.totalMs} ms |`,
      '',
      `Downtime ratio, two passes / one: ${passes.downtimeRatio}.`,
      '',
    );
  }
  if (summary.service?.length) {
    const runs = summary.service;
    lines.push(
      'Web server with its own address, one keep-alive client on a third host asking every 10 ms (each move measured on its own):',
      '',
      '| move | ferry downtime | client-visible stall (largest gap between answers) | client errors | connections |',
      '| --- | --- | --- | --- | --- |',
      ...runs.map((run, index) => `| ${index + 1} (${index % 2 === 0 ? 'A → B' : 'B → A'}) | ${Math.round(run.downtimeMs)} ms | ${run.stallMs} ms | ${run.errors} | ${run.connections} |`),
      '',
      `Medians: downtime ${Math.round(median(runs.map((run) => run.downtimeMs)))} ms, stall ${Math.round(median(runs.map((run) => run.stallMs)))} ms.`,
      '',
    );
  }
  return lines.join('\n');
}
