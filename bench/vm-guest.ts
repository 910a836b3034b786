// Runs inside the VM lane's guest (bench/vm.ts boots it): memload at each
// dirty rate, migrated with pre-copy and with stop-and-copy, and moved by the
// naive baseline of plain tools (bench/baseline.ts), side by side on the same
// two netns hosts. Writes the results as JSON to its argument.
//
//   node bench/vm-guest.ts OUT.json MIB RATE[,RATE...]
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { setTimeout as sleep } from 'node:timers/promises';
import { containerSpecSchema } from '../src/protocol/container.ts';
import { migrationOptionsSchema, type MigrationReport } from '../src/protocol/migration.ts';
import { removeQuietly, startNodes, waitForMemload, type Node } from '../test/helpers/migration.ts';
import { busyboxRootfs } from '../test/helpers/workloads.ts';
import { readBuildEnv } from '../lab/agents.ts';
import { CgroupTree } from '../src/cgroup/cgroup.ts';
import { runBaseline, type BaselineResult } from './baseline.ts';

export type VmBenchRun =
  | { dirtyMibps: number; strategy: 'precopy' | 'stop-and-copy'; report: MigrationReport }
  | { dirtyMibps: number; strategy: 'naive'; naive: BaselineResult };

const [out, mibText, ratesText] = process.argv.slice(2);
if (!out || !mibText || !ratesText) throw new Error('usage: vm-guest.ts OUT.json MIB RATE[,RATE...]');
const mib = Number(mibText);
const rates = ratesText.split(',').map(Number);

const criuPath = (await readBuildEnv()).FERRY_CRIU ?? 'criu';

async function once(a: Node, b: Node, dirtyMibps: number, strategy: VmBenchRun['strategy']): Promise<VmBenchRun> {
  const name = `m-${dirtyMibps}-${strategy}`;
  const command = ['/bin/memload', '--mib', String(mib), '--seed', '3'];
  if (dirtyMibps) command.push('--dirty-mibps', String(dirtyMibps));
  try {
    await a.client.request('run', { spec: containerSpecSchema.parse({ name, rootfs: busyboxRootfs, command }) });
    await waitForMemload(a, name, 10 * 60_000);
    // Let the dirtying reach its pace before the migration starts.
    await sleep(2000);
    if (strategy === 'naive') {
      const pid = (await a.client.request('list', {})).containers.find((container) => container.name === name)!.pid!;
      const naive = await runBaseline({
        criu: criuPath,
        source: a.host,
        destination: b.host,
        pid,
        cgroup: (await CgroupTree.open(a.host.cgroupName)).for(name),
        rootfs: join(a.host.stateDir, 'containers', name, 'rootfs'),
        workDir: join(a.host.stateDir, `naive-${name}`),
      });
      console.log(`${name}: downtime ${naive.downtimeMs} ms, steps ${JSON.stringify(naive.steps)}`);
      return { dirtyMibps, strategy, naive };
    }
    const report = await a.client.request('migrate', {
      name,
      destination: { url: b.agent.url, token: b.agent.token },
      options: migrationOptionsSchema.parse({ strategy, timeoutMs: 30 * 60_000 }),
    });
    console.log(`${name}: downtime ${report.downtimeMs} ms, total ${report.totalMs} ms, rounds ${report.precopy?.rounds.length ?? 0}, stop ${report.precopy?.stopReason ?? '-'}, final pages ${report.criu.dump?.pagesWritten}`);
    return { dirtyMibps, strategy, report };
  } finally {
    await removeQuietly(a, name);
    await removeQuietly(b, name);
  }
}

// The guest's /tmp is a tmpfs of half its memory; the naive baseline keeps the
// images, the tar on both sides and the unpacked copy there at once.
if (process.getuid?.() === 0) await execa('mount', ['-o', 'remount,size=90%', '/tmp']).catch(() => undefined);

const test = await startNodes(2);
const runs: VmBenchRun[] = [];
try {
  const [a, b] = test.nodes as [Node, Node];
  for (const rate of rates) {
    runs.push(await once(a, b, rate, 'precopy'));
    runs.push(await once(a, b, rate, 'stop-and-copy'));
    runs.push(await once(a, b, rate, 'naive'));
  }
} finally {
  await test.close();
  await writeFile(out, JSON.stringify({ mib, runs }, null, 2));
}
