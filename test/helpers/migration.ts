// Helpers for the end-to-end migration tests: real agents on netns hosts,
// containers from the busybox test rootfs, and checks on what each host holds.
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { z } from 'zod';
import { FerryError } from '../../src/errors.ts';
import { containerSpecSchema, type ContainerSpecInput } from '../../src/protocol/container.ts';
import { migrationOptionsSchema, type MigrationReport, type ProgressEvent } from '../../src/protocol/migration.ts';
import { AgentClient } from '../../src/transport/client.ts';
import { startAgent, type AgentOptions, type AgentProcess } from '../../lab/agents.ts';
import { createHosts, type Cluster, type Host } from '../../lab/hosts.ts';
import {
  busyboxRootfs,
  containerPid as clientContainerPid,
  counts,
  lastCount,
  logsOf as clientLogsOf,
  poll,
} from './workloads.ts';


/** One host of a test cluster, with its agent and a client connected to it. */
export interface Node {
  host: Host;
  agent: AgentProcess;
  client: AgentClient;
}

export interface TestCluster {
  cluster: Cluster;
  nodes: Node[];
  /** Hosts without an agent (the clients of a service), after the nodes' hosts. */
  clients: Host[];
  /** Replaces a node's agent (e.g. to give it other faults), reconnecting its client. */
  restartAgent(index: number, options?: AgentOptions): Promise<Node>;
  close(): Promise<void>;
}

export interface NodesOptions {
  /** Hosts set up with a bridge br0, whose agents get --bridge br0. */
  bridged?: boolean;
  /** Extra hosts without an agent. */
  clients?: number;
}

export async function startNodes(
  count: number,
  options: (index: number) => AgentOptions = () => ({}),
  layout: NodesOptions = {},
): Promise<TestCluster> {
  const cluster = await createHosts(count + (layout.clients ?? 0), { bridged: layout.bridged ?? false });
  const nodes: Node[] = [];
  const replaced: AgentProcess[] = [];
  const connect = async (host: Host, agentOptions: AgentOptions): Promise<Node> => {
    const agent = await startAgent(host, agentOptions);
    const client = await AgentClient.connect({ url: agent.url, token: agent.token });
    return { host, agent, client };
  };
  const close = async () => {
    for (const node of nodes) {
      node.client.close();
      await node.agent.stop().catch(() => undefined);
    }
    await keepLogs([...replaced, ...nodes.map((node) => node.agent)]);
    await cluster.destroy();
  };
  try {
    for (const [index, host] of cluster.hosts.slice(0, count).entries()) {
      const agentOptions = options(index);
      const bridgeArgs = host.bridge ? ['--bridge', host.bridge] : [];
      nodes.push(await connect(host, { ...agentOptions, extraArgs: [...bridgeArgs, ...(agentOptions.extraArgs ?? [])] }));
    }
  } catch (error) {
    await close();
    throw error;
  }
  return {
    cluster,
    nodes,
    clients: cluster.hosts.slice(count),
    close,
    async restartAgent(index, agentOptions = {}) {
      const old = nodes[index]!;
      old.client.close();
      await old.agent.stop();
      replaced.push(old.agent);
      const bridgeArgs = old.host.bridge ? ['--bridge', old.host.bridge] : [];
      nodes[index] = await connect(old.host, { ...agentOptions, extraArgs: [...bridgeArgs, ...(agentOptions.extraArgs ?? [])] });
      return nodes[index];
    },
  };
}

/** With FERRY_TEST_LOGS=<dir>, every agent's output is kept there for a post-mortem. */
async function keepLogs(agents: AgentProcess[]): Promise<void> {
  const directory = process.env.FERRY_TEST_LOGS;
  if (!directory) return;
  await mkdir(directory, { recursive: true });
  const text = agents.map((agent) => `### ${agent.url}\n${agent.logs().join('\n')}\n`).join('\n');
  await appendFile(join(directory, 'agents.log'), text);
}

function spec(name: string, command: string[]): ContainerSpecInput {
  return { name, rootfs: busyboxRootfs, command };
}

/** /bin/counter: prints `count N` every 0.1 s and writes N to /tmp/counter. */
export function counterSpec(name: string): ContainerSpecInput {
  return spec(name, ['/bin/counter']);
}

/**
 * A counter whose state lives in a file: each step reads /data/n, adds one,
 * prints and writes it back. If the destination got a stale rootfs, the count
 * goes back after the migration.
 */
export function fileCounterSpec(name: string): ContainerSpecInput {
  const script = 'mkdir -p /data; while :; do i=$(( $(cat /data/n 2>/dev/null || echo 0) + 1 )); echo "count $i"; echo $i > /data/n; sleep 0.1; done';
  return spec(name, ['/bin/sh', '-c', script]);
}

export function memloadSpec(name: string, mib: number, seed = 7): ContainerSpecInput {
  return spec(name, ['/bin/memload', '--mib', String(mib), '--seed', String(seed)]);
}

export async function runContainer(node: Node, input: ContainerSpecInput): Promise<void> {
  await node.client.request('run', { spec: containerSpecSchema.parse(input) });
}

export { counts, lastCount, poll };

export async function logsOf(node: Node, name: string): Promise<string> {
  return clientLogsOf(node.client, name);
}

/** Waits until the container's log shows a count of at least `atLeast`; returns its log. */
export function waitForCount(node: Node, name: string, atLeast: number, timeoutMs = 20_000): Promise<string> {
  return poll(`${name} on ${node.host.name} to count to ${atLeast}`, timeoutMs, async () => {
    const text = await logsOf(node, name);
    return lastCount(text) >= atLeast ? text : undefined;
  });
}

/** Waits for a log line matching `pattern` that was not there before (`after` lines). */
export function waitForLine(node: Node, name: string, pattern: RegExp, after: number, timeoutMs = 20_000): Promise<string> {
  return poll(`${pattern} in the log of ${name}`, timeoutMs, async () => {
    const lines = (await logsOf(node, name)).split('\n').slice(after);
    return lines.find((line) => pattern.test(line));
  });
}

export function containerPid(node: Node, name: string): Promise<number> {
  return clientContainerPid(node.client, name);
}

/** Asks memload for its checksum (SIGUSR1) and returns the new `checksum ...` line. */
export async function requestChecksum(node: Node, name: string): Promise<string> {
  return signalAndWait(node, name, 'SIGUSR1', /^checksum [0-9a-f]{16} /);
}

/** Asks memload to verify every page against its pattern (SIGUSR2). */
export async function requestVerify(node: Node, name: string): Promise<string> {
  return signalAndWait(node, name, 'SIGUSR2', /^verify /);
}

async function signalAndWait(node: Node, name: string, signal: NodeJS.Signals, pattern: RegExp): Promise<string> {
  const before = (await logsOf(node, name)).split('\n').length - 1;
  process.kill(await containerPid(node, name), signal);
  return waitForLine(node, name, pattern, before, 60_000);
}

export function waitForMemload(node: Node, name: string, timeoutMs = 60_000): Promise<string> {
  return waitForLine(node, name, /^memload ready /, 0, timeoutMs);
}

export function migrate(
  from: Node,
  to: Node,
  name: string,
  onProgress?: (event: ProgressEvent) => void,
  options: z.input<typeof migrationOptionsSchema> = {},
): Promise<MigrationReport> {
  return from.client.request(
    'migrate',
    { name, destination: { url: to.agent.url, token: to.agent.token }, options: migrationOptionsSchema.parse(options) },
    onProgress,
  );
}

/** The FerryError a promise rejects with; fails if it resolves. */
export async function failureOf(promise: Promise<unknown>): Promise<FerryError> {
  const outcome = await promise.then(
    (value) => ({ value }),
    (error: unknown) => ({ error }),
  );
  if (!('error' in outcome)) throw new Error(`expected a failure, got ${JSON.stringify(outcome.value).slice(0, 300)}`);
  if (!(outcome.error instanceof FerryError)) throw outcome.error;
  return outcome.error;
}

/** Everything a host keeps of one container: its task, cgroup, state and staged images. */
export interface Traces {
  listed: boolean;
  cgroup: boolean;
  stateDir: boolean;
  images: string[];
}

export async function tracesOf(node: Node, name: string): Promise<Traces> {
  const list = await node.client.request('list', {});
  return {
    listed: list.containers.some((container) => container.name === name),
    cgroup: existsSync(join(node.host.cgroupRoot, name)),
    stateDir: existsSync(join(node.host.stateDir, 'containers', name)),
    images: await stagedImages(node.host),
  };
}

export const noTraces: Traces = { listed: false, cgroup: false, stateDir: false, images: [] };

/** Migration directories that still hold an images dir. */
export async function stagedImages(host: Host): Promise<string[]> {
  const root = join(host.stateDir, 'migrations');
  const ids = await readdir(root).catch(() => [] as string[]);
  return ids.filter((id) => existsSync(join(root, id, 'images')));
}

/** Child cgroups of the host's cgroup dir (one per container there). */
export async function cgroupChildren(host: Host): Promise<string[]> {
  const entries = await readdir(host.cgroupRoot, { withFileTypes: true }).catch(() => []);
  return entries.filter((entry) => entry.isDirectory()).map((entry) => entry.name);
}

/** Waits until the host keeps nothing of the container (nor any other cgroup child). */
export async function waitUntilClean(node: Node, name: string, timeoutMs = 30_000): Promise<void> {
  let last: unknown;
  await poll(`${node.host.name} to hold nothing of ${name}`, timeoutMs, async () => {
    const traces = { ...(await tracesOf(node, name)), cgroupChildren: await cgroupChildren(node.host) };
    last = traces;
    const clean = !traces.listed && !traces.cgroup && !traces.stateDir && !traces.images.length && !traces.cgroupChildren.length;
    return clean ? true : undefined;
  }).catch((error: Error) => {
    throw new Error(`${error.message}; last seen: ${JSON.stringify(last)}`);
  });
}

/** A new client for the node, e.g. after a cut link ended the old one. */
export async function reconnect(node: Node): Promise<void> {
  node.client.close();
  node.client = await AgentClient.connect({ url: node.agent.url, token: node.agent.token });
}

export async function isAlive(pid: number): Promise<boolean> {
  return existsSync(`/proc/${pid}`) && !(await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '')).includes(') Z ');
}

export async function removeQuietly(node: Node | undefined, name: string): Promise<void> {
  await node?.client.request('remove', { name, force: true }).catch(() => undefined);
}
