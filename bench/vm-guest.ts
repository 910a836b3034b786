// Runs inside the VM lane's guest (bench/vm.ts boots it): memload at each
// dirty rate, migrated with pre-copy and with stop-and-copy, side by side on
// the same two netns hosts. Writes the results as JSON to its argument.
//
//   node bench/vm-guest.ts OUT.json MIB RATE[,RATE...]
import { writeFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { containerSpecSchema } from '../src/protocol/container.ts';
import { migrationOptionsSchema, type MigrationReport } from '../src/protocol/migration.ts';
import { removeQuietly, startNodes, waitForMemload, type Node } from '../test/helpers/migration.ts';
import { busyboxRootfs } from '../test/helpers/workloads.ts';

export interface VmBenchRun {
  dirtyMibps: number;
  strategy: 'precopy' | 'stop-and-copy';
  report: MigrationReport;
}

const [out, mibText, ratesText] = process.argv.slice(2);
if (!out || !mibText || !ratesText) throw new Error('usage: vm-guest.ts OUT.json MIB RATE[,RATE...]');
const mib = Number(mibText);
const rates = ratesText.split(',').map(Number);

async function once(a: Node, b: Node, dirtyMibps: number, strategy: VmBenchRun['strategy']): Promise<VmBenchRun> {
  const name = `m-${dirtyMibps}-${strategy}`;
  const command = ['/bin/memload', '--mib', String(mib), '--seed', '3'];
  if (dirtyMibps) command.push('--dirty-mibps', String(dirtyMibps));
  try {
    await a.client.request('run', { spec: containerSpecSchema.parse({ name, rootfs: busyboxRootfs, command }) });
    await waitForMemload(a, name);
    // Let the dirtying reach its pace before the migration starts.
    await sleep(2000);
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

const test = await startNodes(2);
const runs: VmBenchRun[] = [];
try {
  const [a, b] = test.nodes as [Node, Node];
  for (const rate of rates) {
    runs.push(await once(a, b, rate, 'precopy'));
    runs.push(await once(a, b, rate, 'stop-and-copy'));
  }
} finally {
  await test.close();
  await writeFile(out, JSON.stringify({ mib, runs }, null, 2));
}
