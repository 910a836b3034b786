import { join } from 'node:path';
import { startAgent, type AgentProcess } from '../lab/agents.ts';
import { containerAddress, createHosts, type Cluster } from '../lab/hosts.ts';
import { startPoller, type Poller } from '../lab/poller.ts';
import { randomMac } from '../src/net/address.ts';
import { projectRoot } from '../src/paths.ts';
import type { ProgressEvent } from '../src/protocol/migration.ts';
import { AgentClient } from '../src/transport/client.ts';
import { containersTable, progressPrinter, reportText } from './output.ts';

// The README's demo: three hosts (network namespaces on one switch) on this
// machine, an agent on two of them, a web server container with its own
// address on A, and a client on the third host that asks it for a page every
// 10 ms over one keep-alive connection. The server is live-migrated to B while
// the client talks to it; the client's verdict is printed at the end.
// Everything is removed at the end.

const say = (text: string) => process.stdout.write(`\n\x1b[1m== ${text}\x1b[0m\n`);
const port = 8080;

export async function runDemo(options: { keep: boolean }): Promise<void> {
  say('creating three hosts (network namespaces on one switch) and starting an agent on two of them');
  const cluster: Cluster = await createHosts(3, { bridged: true });
  const agents: AgentProcess[] = [];
  const clients: AgentClient[] = [];
  let poller: Poller | undefined;
  try {
    const [hostA, hostB, hostC] = cluster.hosts as [Cluster['hosts'][0], Cluster['hosts'][0], Cluster['hosts'][0]];
    for (const [host, name] of [[hostA, 'host-a'], [hostB, 'host-b']] as const) {
      const agent = await startAgent(host, { extraArgs: ['--name', name, '--bridge', host.bridge!] });
      agents.push(agent);
      clients.push(await AgentClient.connect({ url: agent.url, token: agent.token }));
      process.stdout.write(`   ${name}: agent at ${agent.url} (netns ${host.netns})\n`);
    }
    const [agentA, agentB] = agents as [AgentProcess, AgentProcess];
    const [clientA, clientB] = clients as [AgentClient, AgentClient];

    const { address, prefix } = containerAddress(cluster, 0);
    say(`starting container "web" on host-a: an HTTP server at its own address ${address}, port ${port}`);
    await clientA.request('run', {
      spec: {
        name: 'web',
        rootfs: join(projectRoot, '.build', 'rootfs', 'busybox'),
        command: ['/bin/netload', 'http', String(port)],
        env: {},
        cwd: '/',
        hostname: 'web',
        privateNetwork: true,
        network: { address, prefix, mac: randomMac() },
        labels: { app: 'demo' },
      },
    });
    process.stdout.write(`${containersTable('host-a', (await clientA.request('list', {})).containers)}\n`);

    say(`a client on the third host (${hostC.address}) asks http://${address}:${port}/ every 10 ms over one keep-alive connection`);
    poller = startPoller(hostC, 'http', address, port, 10);
    const before = await poller.waitForAnswers(100);
    process.stdout.write(`   ${before.answers} answers so far; the last: ${before.last}\n`);

    say('live-migrating "web" from host-a to host-b (freeze → snapshot → dump → stream → restore)');
    const progress = process.stderr.isTTY ? progressPrinter(false) : phaseLines();
    const report = await clientA.request(
      'migrate',
      { name: 'web', destination: { url: agentB.url, token: agentB.token }, options: { strategy: 'auto', maxDowntimeMs: 300, maxRounds: 8, rootfsPrecopy: true, timeoutMs: 120_000 } },
      progress.update,
    );
    progress.stop();
    process.stdout.write(`${reportText(report)}\n`);

    say('after the migration');
    await poller.waitForMore(100);
    const verdict = await poller.stop();
    poller = undefined;
    const leftOnA = (await clientA.request('list', {})).containers;
    process.stdout.write(leftOnA.length ? `${containersTable('host-a', leftOnA)}\n` : '   host-a: no containers left\n');
    process.stdout.write(`${containersTable('host-b', (await clientB.request('list', {})).containers)}\n`);
    const clean = verdict.errors.length === 0 && verdict.connections === 1 && verdict.outOfOrder === 0;
    process.stdout.write(
      `   the client: ${verdict.answers} answers over ${verdict.connections} connection, ` +
        `${verdict.errors.length} errors, ${verdict.outOfOrder} lost or repeated; the last: ${verdict.last}\n` +
        `   largest gap between two answers: ${verdict.maxGapMs} ms (ferry's downtime: ${report.downtimeMs} ms)\n` +
        `   ${clean ? 'the client never saw an error: same connection, every answer in order' : `the client saw trouble: ${verdict.errors.slice(0, 3).join('; ')}`}\n`,
    );
    if (!clean) process.exitCode = 1;
    if (options.keep) {
      say('hosts are kept; press Ctrl-C to remove everything');
      await new Promise((resolve) => process.once('SIGINT', resolve));
    }
  } finally {
    await poller?.stop().catch(() => undefined);
    say('cleaning up: agents, containers, cgroups, namespaces');
    for (const client of clients) client.close();
    for (const agent of agents) await agent.stop().catch(() => undefined);
    await cluster.destroy();
    process.stdout.write('   done\n');
  }
}

/** Without a terminal, one line per phase instead of a progress bar. */
function phaseLines(): { update: (event: ProgressEvent) => void; stop: () => void } {
  let last = '';
  return {
    update: (event) => {
      if (event.phase === last) return;
      last = event.phase;
      process.stdout.write(`   ${event.phase}\n`);
    },
    stop: () => undefined,
  };
}
