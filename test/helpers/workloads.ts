// Shared helpers for tests that run real workloads in real agents: container
// specs for the busybox test rootfs, reading a container's console log, and a
// cluster of hosts with one agent and one connected client each.
//
//   const test = await startCluster(1);
//   try {
//     const [client] = test.clients;
//     await client.request('run', { spec: counterSpec('c1') });
//     await waitForCount(client, 'c1', 5);
//   } finally {
//     await test.close();
//   }
//
// Every wait polls the agent's `logs` (the container's stdout and stderr) and
// throws with what it saw last when the time is up.
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { containerSpecSchema, type ContainerSpec } from '../../src/protocol/container.ts';
import { AgentClient } from '../../src/transport/client.ts';
import { startAgent, type AgentOptions, type AgentProcess } from '../../lab/agents.ts';
import { createHosts, type Cluster } from '../../lab/hosts.ts';

/** The busybox test rootfs that `scripts/setup.sh` builds (has /bin/counter and /bin/memload). */
export const busyboxRootfs = fileURLToPath(new URL('../../.build/rootfs/busybox', import.meta.url));

/** Enough to hold the whole console log of a test container. */
const LOG_TAIL_BYTES = 4 * 1024 * 1024;
const POLL_MS = 100;

/** A container running /bin/counter: prints `count N` every 0.1 s and writes N to /tmp/counter. */
export function counterSpec(name: string): ContainerSpec {
  return containerSpecSchema.parse({ name, rootfs: busyboxRootfs, command: ['/bin/counter'] });
}

export interface MemloadOptions {
  /** Seed of the page pattern; default 7. */
  seed?: number;
  /** MiB per second rewritten after the fill; default 0 (memory stays as filled). */
  dirtyMibps?: number;
  /** Every this many ms, a forked child verifies its copy of the memory; default 0 (never). */
  forkVerifyMs?: number;
}

/**
 * A container running /bin/memload with `mib` MiB filled. It prints
 * `memload ready mib N seed S checksum HEX` once filled; see requestChecksum.
 */
export function memloadSpec(name: string, mib: number, options: MemloadOptions = {}): ContainerSpec {
  const command = ['/bin/memload', '--mib', String(mib), '--seed', String(options.seed ?? 7)];
  if (options.dirtyMibps) command.push('--dirty-mibps', String(options.dirtyMibps));
  if (options.forkVerifyMs) command.push('--fork-verify-ms', String(options.forkVerifyMs));
  return containerSpecSchema.parse({ name, rootfs: busyboxRootfs, command });
}

/** Every `count N` of a counter's log, in order. */
export function counts(logText: string): number[] {
  return [...logText.matchAll(/^count (\d+)$/gm)].map((match) => Number(match[1]));
}

/** The last `count N` of a counter's log; 0 when it printed none yet. */
export function lastCount(logText: string): number {
  return counts(logText).at(-1) ?? 0;
}

/** The container's whole console log (stdout and stderr). */
export async function logsOf(client: AgentClient, name: string): Promise<string> {
  return (await client.request('logs', { name, tailBytes: LOG_TAIL_BYTES })).text;
}

/** Calls `check` until it returns a value (not undefined); errors of `check` count as "not yet". */
export async function poll<T>(what: string, timeoutMs: number, check: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) {
      const why = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${why}`);
    }
    await sleep(POLL_MS);
  }
}

/**
 * Waits until the container's log matches `pattern` and returns the match
 * (use a /m pattern to anchor lines, groups to pick values out).
 */
export async function waitForLog(client: AgentClient, name: string, pattern: RegExp, timeoutMs = 20_000): Promise<RegExpExecArray> {
  let text = '';
  return poll(`${pattern} in the log of ${name}`, timeoutMs, async () => {
    text = await logsOf(client, name);
    return pattern.exec(text) ?? undefined;
  }).catch((error: Error) => {
    throw new Error(`${error.message}; log ends with: ${JSON.stringify(text.slice(-300))}`);
  });
}

/** Waits until a counter's last `count N` is at least `atLeast`; returns that count. */
export async function waitForCount(client: AgentClient, name: string, atLeast: number, timeoutMs = 20_000): Promise<number> {
  let seen = 0;
  return poll(`${name} to count to ${atLeast}`, timeoutMs, async () => {
    seen = lastCount(await logsOf(client, name));
    return seen >= atLeast ? seen : undefined;
  }).catch((error: Error) => {
    throw new Error(`${error.message}; last count seen: ${seen}`);
  });
}

/** The host pid of the container's init, as the agent lists it. */
export async function containerPid(client: AgentClient, name: string): Promise<number> {
  const { containers } = await client.request('list', {});
  const pid = containers.find((container) => container.name === name)?.pid;
  if (!pid) throw new Error(`${name} is not listed with a pid`);
  return pid;
}

const checksumLine = /^checksum ([0-9a-f]+) pages \d+ generation-sum \d+$/gm;

/**
 * Asks a memload container for the checksum of its memory (SIGUSR1 to its
 * init) and returns the hex of the checksum line it prints in reply; lines
 * from earlier requests are not taken for the answer.
 */
export async function requestChecksum(client: AgentClient, name: string, timeoutMs = 60_000): Promise<string> {
  const checksums = async () => [...(await logsOf(client, name)).matchAll(checksumLine)].map((match) => match[1]!);
  const before = (await checksums()).length;
  process.kill(await containerPid(client, name), 'SIGUSR1');
  return poll(`a new checksum line from ${name}`, timeoutMs, async () => {
    const all = await checksums();
    return all.length > before ? all.at(-1) : undefined;
  });
}

export interface TestCluster {
  cluster: Cluster;
  /** agents[i] runs on cluster.hosts[i]. */
  agents: AgentProcess[];
  /** clients[i] is connected to agents[i]; replace it after restarting that agent (see connectClient). */
  clients: AgentClient[];
  /** Stops the agents, closes the clients and destroys the cluster; never throws before all three were tried. */
  close(): Promise<void>;
}

/** A client connected to the agent's current process. */
export function connectClient(agent: AgentProcess): Promise<AgentClient> {
  return AgentClient.connect({ url: agent.url, token: agent.token });
}

/**
 * `count` netns hosts with one agent (started with `agentOptions`) and one
 * client each. On failure everything created so far is removed; call close()
 * in afterAll or finally.
 */
export async function startCluster(count: number, agentOptions: AgentOptions = {}): Promise<TestCluster> {
  const cluster = await createHosts(count);
  const test: TestCluster = { cluster, agents: [], clients: [], close: () => closeCluster(test) };
  try {
    for (const host of cluster.hosts) {
      const agent = await startAgent(host, agentOptions);
      test.agents.push(agent);
      test.clients.push(await connectClient(agent));
    }
  } catch (error) {
    await test.close().catch(() => undefined);
    throw error;
  }
  return test;
}

async function closeCluster(test: TestCluster): Promise<void> {
  const failures: unknown[] = [];
  for (const client of test.clients) client.close();
  for (const agent of test.agents) await agent.stop().catch((error: unknown) => failures.push(error));
  // Destroying the cluster also kills what the agents left running (containers outlive agents).
  await test.cluster.destroy().catch((error: unknown) => failures.push(error));
  if (failures.length) throw new AggregateError(failures, 'closing the test cluster failed');
}
