// Runs inside the VM lane's guest (a kernel with soft-dirty): two netns hosts
// with real agents, and memload migrated with pre-copy, once idle and once
// dirtying faster than pre-copy can follow. Writes what it saw as JSON to the
// file named by its argument; test/vm.test.ts checks it on the host.
//
//   node test/vm/precopy-scenario.ts OUT.json [--mib N]
import { writeFile } from 'node:fs/promises';
import { containerSpecSchema } from '../../src/protocol/container.ts';
import { migrationOptionsSchema, type MigrationOptions, type MigrationReport } from '../../src/protocol/migration.ts';
import {
  containerPid,
  logsOf,
  removeQuietly,
  requestChecksum,
  requestVerify,
  startNodes,
  waitForMemload,
  type Node,
} from '../helpers/migration.ts';
import { busyboxRootfs } from '../helpers/workloads.ts';

export interface ScenarioResult {
  name: string;
  options: MigrationOptions;
  report?: MigrationReport;
  error?: string;
  checksumBefore?: string;
  checksumAfter?: string;
  verifyAfter?: string;
  runningOnB?: boolean;
}

const [out, ...rest] = process.argv.slice(2);
if (!out) throw new Error('usage: precopy-scenario.ts OUT.json [--mib N]');
const mib = rest[0] === '--mib' ? Number(rest[1]) : 64;

async function scenario(
  a: Node,
  b: Node,
  name: string,
  dirtyMibps: number,
  options: Partial<MigrationOptions>,
): Promise<ScenarioResult> {
  const parsed = migrationOptionsSchema.parse({ strategy: 'precopy', timeoutMs: 15 * 60_000, ...options });
  const result: ScenarioResult = { name, options: parsed };
  const command = ['/bin/memload', '--mib', String(mib), '--seed', '11'];
  if (dirtyMibps) command.push('--dirty-mibps', String(dirtyMibps));
  try {
    await a.client.request('run', { spec: containerSpecSchema.parse({ name, rootfs: busyboxRootfs, command }) });
    await waitForMemload(a, name);
    // A dirtying workload changes its checksum all the time; only an idle one is compared.
    if (!dirtyMibps) result.checksumBefore = (await requestChecksum(a, name)).split(' ')[1];
    const started = Date.now();
    result.report = await a.client.request(
      'migrate',
      { name, destination: { url: b.agent.url, token: b.agent.token }, options: parsed },
      (event) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${event.phase}${event.message ? `: ${event.message}` : ''}`),
    );
    result.runningOnB = (await containerPid(b, name)) > 0;
    if (!dirtyMibps) result.checksumAfter = (await requestChecksum(b, name)).split(' ')[1];
    result.verifyAfter = await requestVerify(b, name);
  } catch (error) {
    result.error = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
    console.log(`${name}: ${result.error}`);
    console.log((await logsOf(a, name).catch(() => '')).slice(-2000));
  } finally {
    await removeQuietly(a, name);
    await removeQuietly(b, name);
  }
  return result;
}

/**
 * Node has died under QEMU's emulation while an agent started (a V8 internal
 * check, SIGTRAP, before ferry ran any code of a migration): one more try,
 * said out loud. Failures after the start are never retried.
 */
async function startGuestNodes(): Promise<Awaited<ReturnType<typeof startNodes>>> {
  try {
    return await startNodes(2);
  } catch (error) {
    if (!(error instanceof Error && /AGENT_EXITED|killed by SIG/.test(`${(error as { code?: string }).code} ${error.message}`))) throw error;
    console.log(`an agent died while starting under emulation (${error.message.split('\n')[0]}); starting the hosts again`);
    return startNodes(2);
  }
}

const test = await startGuestNodes();
const results: ScenarioResult[] = [];
try {
  const [a, b] = test.nodes as [Node, Node];
  results.push(await scenario(a, b, 'idle', 0, { maxRounds: 4 }));
  // Rewrites its whole memory several times a round: rounds cannot shrink.
  results.push(await scenario(a, b, 'busy', 4 * mib, { maxRounds: 3 }));
} finally {
  await test.close();
  await writeFile(out, JSON.stringify(results, null, 2));
}
for (const result of results) {
  const report = result.report;
  console.log(`${result.name}: ${report ? `${report.outcome}, downtime ${report.downtimeMs} ms, ${report.strategy}, stop ${report.precopy?.stopReason}` : result.error}`);
  for (const round of report?.precopy?.rounds ?? []) console.log(`  round ${round.round}: ${JSON.stringify(round)}`);
  if (report?.criu.dump) console.log(`  final dump: ${JSON.stringify(report.criu.dump)}`);
}
