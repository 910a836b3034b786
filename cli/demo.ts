import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { startAgent, type AgentProcess } from '../lab/agents.ts';
import { createHosts, type Cluster } from '../lab/hosts.ts';
import { projectRoot } from '../src/paths.ts';
import type { ProgressEvent } from '../src/protocol/migration.ts';
import { AgentClient } from '../src/transport/client.ts';
import { containersTable, progressPrinter, reportText } from './output.ts';

// The README's demo: two hosts (network namespaces joined by a switch) on this
// machine, an agent on each, a container that counts on A, live-migrated to B
// while it runs. Everything is removed at the end. (No HTTP server: CRIU 4.1
// cannot dump TCP sockets on kernels >= 6.16, see the README's limits.)

const say = (text: string) => process.stdout.write(`\n\x1b[1m== ${text}\x1b[0m\n`);
const command = ['/bin/counter'];

export async function runDemo(options: { keep: boolean }): Promise<void> {
  say('creating two hosts (network namespaces) and starting an agent on each');
  const cluster: Cluster = await createHosts(2);
  const agents: AgentProcess[] = [];
  const clients: AgentClient[] = [];
  try {
    const [hostA, hostB] = cluster.hosts as [Cluster['hosts'][0], Cluster['hosts'][0]];
    for (const [host, name] of [[hostA, 'host-a'], [hostB, 'host-b']] as const) {
      const agent = await startAgent(host, { extraArgs: ['--name', name] });
      agents.push(agent);
      clients.push(await AgentClient.connect({ url: agent.url, token: agent.token }));
      process.stdout.write(`   ${name}: agent at ${agent.url} (netns ${host.netns})\n`);
    }
    const [agentA, agentB] = agents as [AgentProcess, AgentProcess];
    const [clientA, clientB] = clients as [AgentClient, AgentClient];

    say('starting container "web" on host-a: it prints and stores a counter every 0.1 s');
    await clientA.request('run', {
      spec: {
        name: 'web',
        rootfs: join(projectRoot, '.build', 'rootfs', 'busybox'),
        command,
        env: {},
        cwd: '/',
        privateNetwork: false,
        labels: { app: 'demo' },
      },
    });
    await sleep(1500);
    process.stdout.write(`${containersTable('host-a', (await clientA.request('list', {})).containers)}\n`);
    process.stdout.write(`   last log line on host-a: ${lastLine((await clientA.request('logs', { name: 'web' })).text)}\n`);

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
    await sleep(1000);
    const leftOnA = (await clientA.request('list', {})).containers;
    process.stdout.write(leftOnA.length ? `${containersTable('host-a', leftOnA)}\n` : '   host-a: no containers left\n');
    process.stdout.write(`${containersTable('host-b', (await clientB.request('list', {})).containers)}\n`);
    const logs = (await clientB.request('logs', { name: 'web' })).text.trim().split('\n');
    process.stdout.write(`   log on host-b (kept across the move; the count went on): ${logs.slice(-3).join(' | ')}\n`);
    if (options.keep) {
      say('hosts are kept; press Ctrl-C to remove everything');
      await new Promise((resolve) => process.once('SIGINT', resolve));
    }
  } finally {
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

function lastLine(text: string): string {
  return text.trim().split('\n').at(-1) ?? '';
}
