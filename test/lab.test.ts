// The multi-host harness itself: real netns, real links, real cgroups, real
// processes. Agents are a stand-in script here, so these tests only depend on
// the harness; the real agent is exercised by the end-to-end tests.
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startAgent } from '../lab/agents.ts';
import { cleanupStale } from '../lab/cleanup.ts';
import { createHosts, withCluster, type Cluster, type Host } from '../lab/hosts.ts';
import { findLeftovers } from '../lab/leftovers.ts';
import { runId } from '../lab/run-id.ts';
import { findCgroupRoots, ip, readMounts, run, waitFor } from '../lab/system.ts';

const TIMEOUT = { timeout: 60_000 };
const pingCommand = existsSync('/usr/bin/ping') || existsSync('/bin/ping') ? ['ping'] : ['busybox', 'ping'];

function pingArgs(address: string): string[] {
  return [...pingCommand.slice(1), '-c1', '-W1', address];
}

async function pings(host: Host, address: string): Promise<boolean> {
  const result = await host.exec(pingCommand[0] as string, pingArgs(address), { reject: false });
  return result.exitCode === 0;
}

async function pingsFromRoot(address: string): Promise<boolean> {
  return (await run(pingCommand[0] as string, pingArgs(address), { reject: false })).exitCode === 0;
}

/** Every IPv4 address of the root netns outside the cluster, and its gateways. */
async function rootNetnsAddresses(cluster: Cluster): Promise<string[]> {
  const addresses = JSON.parse((await ip(['-4', '-j', 'addr', 'show'])).stdout) as Array<{
    addr_info: Array<{ local: string }>;
  }>;
  const routes = JSON.parse((await ip(['-4', '-j', 'route', 'show'])).stdout) as Array<{ gateway?: string }>;
  return [
    ...addresses.flatMap((link) => link.addr_info.map((info) => info.local)),
    ...routes.flatMap((route) => (route.gateway ? [route.gateway] : [])),
  ].filter((address) => !address.startsWith('127.') && address !== cluster.controllerAddress);
}

describe('a cluster of 3 hosts', TIMEOUT, () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await createHosts(3);
  }, 60_000);
  afterAll(() => cluster?.destroy(), 60_000);

  it('names every resource after the run and gives each host its own state dir and cgroup', () => {
    expect(cluster.hosts.map((host) => host.name)).toEqual(['h0', 'h1', 'h2']);
    for (const host of cluster.hosts) {
      expect(host.netns.startsWith(`ferryt-${runId}-`)).toBe(true);
      expect(host.cgroupName.startsWith(`ferryt-${runId}-`)).toBe(true);
      expect(host.stateDir.startsWith(`/tmp/ferryt-${runId}/`)).toBe(true);
      expect(existsSync(host.stateDir)).toBe(true);
      expect(existsSync(join(host.cgroupRoot, 'cgroup.procs'))).toBe(true);
    }
    expect(new Set(cluster.hosts.map((host) => host.address)).size).toBe(3);
  });

  it('lets every host reach every other host', async () => {
    const pairs = cluster.hosts.flatMap((from) =>
      cluster.hosts.filter((to) => to !== from).map((to) => ({ from, to })),
    );
    const results = await Promise.all(pairs.map(({ from, to }) => pings(from, to.address)));
    expect(results).toEqual(pairs.map(() => true));
  });

  it('lets the test process reach the hosts through the controller link', async () => {
    expect(await Promise.all(cluster.hosts.map((host) => pingsFromRoot(host.address)))).toEqual([true, true, true]);
  });

  it('lets no host reach anything outside the cluster', async () => {
    const [subnetPrefix] = cluster.subnet.split('.0/');
    const outside = [...(await rootNetnsAddresses(cluster)), '1.1.1.1', `${subnetPrefix}.200`];
    expect(outside.length).toBeGreaterThan(2);
    const [host] = cluster.hosts;
    const results = await Promise.all(outside.map((address) => pings(host as Host, address)));
    expect(results).toEqual(outside.map(() => false));
  });

  it('cuts a link with setLinkDown and restores it with setLinkUp', async () => {
    const [h0, h1, h2] = cluster.hosts as [Host, Host, Host];
    await h1.setLinkDown();
    expect(await pings(h0, h1.address)).toBe(false);
    expect(await pings(h1, h0.address)).toBe(false);
    expect(await pings(h0, h2.address)).toBe(true);
    await h1.setLinkUp();
    expect(await pings(h0, h1.address)).toBe(true);
    expect(await pings(h1, h2.address)).toBe(true);
  });
});

describe('destroy', TIMEOUT, () => {
  it('leaves nothing behind and can be called again', async () => {
    const cluster = await createHosts(2);
    expect(await findLeftovers()).not.toEqual([]);
    await cluster.destroy();
    expect(await findLeftovers()).toEqual([]);
    await cluster.destroy();
    expect(await findLeftovers()).toEqual([]);
  });

  it('happens in withCluster even when the test code throws', async () => {
    let created: Cluster | undefined;
    const failing = withCluster(2, async (cluster) => {
      created = cluster;
      throw new Error('test code failed');
    });
    await expect(failing).rejects.toThrow('test code failed');
    expect(created?.hosts).toHaveLength(2);
    expect(await findLeftovers()).toEqual([]);
  });

  it('kills processes in the hosts, in their cgroups (even frozen ones) and on their state dirs', async () => {
    const cluster = await createHosts(2);
    const [h0, h1] = cluster.hosts as [Host, Host];
    // In h0's netns only.
    const inNetns = execa('nsenter', [`--net=/run/netns/${h0.netns}`, '--', 'sleep', '1000'], { reject: false });
    // In a frozen child cgroup of h1.
    const inCgroup = execa('sleep', ['1000'], { reject: false });
    const frozen = join(h1.cgroupRoot, 'container');
    await mkdir(frozen);
    await writeFile(join(frozen, 'cgroup.procs'), String(inCgroup.pid));
    await writeFile(join(frozen, 'cgroup.freeze'), '1');
    await waitFor('the cgroup to freeze', 5_000, async () =>
      (await readFile(join(frozen, 'cgroup.events'), 'utf8')).includes('frozen 1') ? true : undefined,
    );
    // Only its command line ties this one to the cluster.
    const onStateDir = execa(process.execPath, ['-e', 'setInterval(() => {}, 1000)', h1.stateDir], { reject: false });

    await cluster.destroy();
    expect(await findLeftovers()).toEqual([]);
    for (const subprocess of [inNetns, inCgroup, onStateDir]) expect((await subprocess).signal).toBe('SIGKILL');
  });

  it('sweeps the v1 freezer hierarchy too, thawing what is frozen there', async (context) => {
    const { v1Freezer } = findCgroupRoots(await readMounts());
    if (!v1Freezer) return context.skip();
    const cluster = await createHosts(1);
    const frozen = join(v1Freezer, (cluster.hosts[0] as Host).cgroupName, 'container');
    await mkdir(frozen, { recursive: true });
    const inFreezer = execa('sleep', ['1000'], { reject: false });
    await writeFile(join(frozen, 'cgroup.procs'), String(inFreezer.pid));
    await writeFile(join(frozen, 'freezer.state'), 'FROZEN');
    await waitFor('the v1 cgroup to freeze', 5_000, async () =>
      (await readFile(join(frozen, 'freezer.state'), 'utf8')).trim() === 'FROZEN' ? true : undefined,
    );
    await cluster.destroy();
    expect(await findLeftovers()).toEqual([]);
    expect((await inFreezer).signal).toBe('SIGKILL');
  });

  it('unmounts what was mounted in the state dirs, nested mounts first', async () => {
    const cluster = await createHosts(1);
    const rootfs = join((cluster.hosts[0] as Host).stateDir, 'rootfs');
    await mkdir(rootfs);
    await run('mount', ['-t', 'tmpfs', 'ferryt-test', rootfs]);
    await mkdir(join(rootfs, 'proc'));
    await run('mount', ['-t', 'tmpfs', 'ferryt-test', join(rootfs, 'proc')]);
    expect(await findLeftovers()).toContain(`mount ${join(rootfs, 'proc')}`);
    await cluster.destroy();
    expect(await findLeftovers()).toEqual([]);
  });
});

const FAKE_AGENT = `
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
const option = (name) => process.argv[process.argv.indexOf(name) + 1];
const log = (msg, fields = {}) => console.log(JSON.stringify({ level: 30, msg, ...fields }));
if (process.env.FAKE_AGENT_MODE === 'fail') {
  console.error('fake agent: refusing to start');
  process.exit(3);
}
if (process.env.FAKE_AGENT_MODE !== 'silent') {
  // Stands in for a container: it must outlive the agent.
  const container = spawn('sleep', ['1000'], { detached: true, stdio: 'ignore' });
  container.unref();
  const [host, port] = option('--listen').split(':');
  const server = createServer((request, response) => {
    log('request', { path: request.url });
    response.end(JSON.stringify({
      argv: process.argv.slice(2), pid: process.pid, container: container.pid, env: process.env.FAKE_AGENT_VALUE,
    }));
  });
  server.listen(Number(port), host, () => log('agent listening', { url: 'ws://' + host + ':' + port }));
}
process.once('SIGTERM', () => {
  log('agent stopping');
  process.exit(0);
});
setInterval(() => {}, 1000);
`;

interface FakeAgentReply {
  argv: string[];
  pid: number;
  container: number;
  env: string | undefined;
}

describe('startAgent', TIMEOUT, () => {
  let cluster: Cluster;
  let script: string;
  beforeAll(async () => {
    cluster = await createHosts(2);
    // In a state dir, so that it goes with the cluster however the run ends.
    script = join((cluster.hosts[0] as Host).stateDir, 'fake-agent.mjs');
    await writeFile(script, FAKE_AGENT);
  }, 60_000);
  afterAll(() => cluster?.destroy(), 60_000);

  async function ask(url: string): Promise<FakeAgentReply> {
    const response = await fetch(`${url.replace(/^ws:/, 'http:')}/status`);
    return (await response.json()) as FakeAgentReply;
  }

  it('starts the agent in the host netns with the contract arguments, and follows its log', async () => {
    const host = cluster.hosts[0] as Host;
    const agent = await startAgent(host, { script, token: 'secret', extraArgs: ['--extra'], env: { FAKE_AGENT_VALUE: 'x' } });
    expect(agent.url).toBe(`ws://${host.address}:7070`);
    const reply = await ask(agent.url);
    expect(reply.pid).toBe(agent.pid);
    expect(reply.env).toBe('x');
    expect(reply.argv).toEqual([
      ...['--name', host.name, '--listen', `${host.address}:7070`, '--state-dir', host.stateDir],
      ...['--cgroup-root', host.cgroupName, '--token', 'secret', '--insecure', '--extra'],
    ]);
    const request = await agent.waitForLog((entry) => entry.json?.msg === 'request', 5_000);
    expect(request.json?.path).toBe('/status');
    expect(agent.logs().some((line) => line.includes('agent listening'))).toBe(true);
    expect(await readFile(join(host.stateDir, 'agent.log'), 'utf8')).toContain('agent listening');
    await agent.stop();
    expect(agent.logs().at(-1)).toContain('agent stopping');
  });

  it('kills only the agent, and restarts it', async () => {
    const agent = await startAgent(cluster.hosts[1] as Host, { script });
    const before = await ask(agent.url);
    await agent.kill();
    expect(existsSync(`/proc/${before.container}`)).toBe(true);
    await agent.restart();
    const after = await ask(agent.url);
    expect(after.pid).toBe(agent.pid);
    expect(after.pid).not.toBe(before.pid);
    await agent.stop();
  });

  it('rejects with the agent output when it exits before listening', async () => {
    const failing = startAgent(cluster.hosts[0] as Host, { script, env: { FAKE_AGENT_MODE: 'fail' } });
    await expect(failing).rejects.toMatchObject({ code: 'AGENT_EXITED', message: expect.stringContaining('refusing to start') });
  });

  it('rejects and kills the agent when it never listens', async () => {
    const host = cluster.hosts[0] as Host;
    const silent = startAgent(host, { script, env: { FAKE_AGENT_MODE: 'silent' }, readyTimeoutMs: 1_000 });
    await expect(silent).rejects.toMatchObject({ code: 'TIMEOUT' });
    const pids = (await ip(['netns', 'pids', host.netns])).stdout.split('\n').filter(Boolean);
    const commands = await Promise.all(pids.map((pid) => readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')));
    expect(commands.filter((command) => command.includes(script))).toEqual([]);
  });
});

const owners: Array<{ kill(signal: NodeJS.Signals): boolean }> = [];

/** A separate test process that creates a cluster and then meets its end in `ending`. */
async function clusterOwner(ending: 'exit' | 'wait') {
  const hostsUrl = new URL('../lab/hosts.ts', import.meta.url).href;
  const source = `
    const { createHosts } = await import(${JSON.stringify(hostsUrl)});
    const cluster = await createHosts(2);
    console.log(cluster.runId);
    if (${JSON.stringify(ending)} === 'exit') process.exit(0);
    // Ends with the test process, however that ends (stdin is a pipe from it).
    process.stdin.on('end', () => process.exit(0));
    process.stdin.resume();
  `;
  const child = execa(process.execPath, ['--input-type=module', '-e', source], { reject: false, buffer: { stdout: false } });
  owners.push(child);
  const childRunId = await new Promise<string>((resolve, reject) => {
    child.stdout.once('data', (data: Buffer) => resolve(String(data).trim()));
    void child.then((result) => reject(new Error(`the cluster owner exited early:\n${result.stderr}`)));
  });
  return { child, childRunId };
}

async function watchdogPid(id: string): Promise<number> {
  for (const entry of await readdir('/proc')) {
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(`cleanup.ts\0--watch\0${id}`)) return Number(entry);
  }
  throw new Error(`no watchdog for run ${id}`);
}

describe('interruption', TIMEOUT, () => {
  // A failed test must not leave a live owner behind: SIGTERM makes it clean up.
  afterEach(() => {
    for (const owner of owners.splice(0)) owner.kill('SIGTERM');
  });

  it('cleans up a cluster whose owner exits without destroying it', async () => {
    const { child, childRunId } = await clusterOwner('exit');
    expect((await child).exitCode).toBe(0);
    expect(await findLeftovers(childRunId)).toEqual([]);
  });

  it.each(['SIGINT', 'SIGTERM'] as const)('cleans up when the owner gets %s', async (signal) => {
    const { child, childRunId } = await clusterOwner('wait');
    expect(await findLeftovers(childRunId)).not.toEqual([]);
    child.kill(signal);
    expect((await child).signal).toBe(signal);
    expect(await findLeftovers(childRunId)).toEqual([]);
  });

  it('cleans up after an owner killed by SIGKILL, through its watchdog', async () => {
    const { child, childRunId } = await clusterOwner('wait');
    child.kill('SIGKILL');
    await child;
    await waitFor('the watchdog to clean up', 20_000, async () =>
      (await findLeftovers(childRunId)).length === 0 ? true : undefined,
    );
  });

  it('cleanupStale removes the runs of dead owners only', async () => {
    await withCluster(1, async (own) => {
      const killed = await clusterOwner('wait');
      const alive = await clusterOwner('wait');
      // Without its watchdog and killed without warning, this run is left behind.
      process.kill(await watchdogPid(killed.childRunId), 'SIGKILL');
      killed.child.kill('SIGKILL');
      await killed.child;
      expect(await findLeftovers(killed.childRunId)).not.toEqual([]);

      const cleaned = await cleanupStale();
      expect(cleaned).toContain(killed.childRunId);
      expect(cleaned).not.toContain(alive.childRunId);
      expect(cleaned).not.toContain(own.runId);
      expect(await findLeftovers(killed.childRunId)).toEqual([]);
      expect(await findLeftovers(alive.childRunId)).not.toEqual([]);
      expect(await pingsFromRoot((own.hosts[0] as Host).address)).toBe(true);

      alive.child.kill('SIGTERM');
      await alive.child;
      expect(await findLeftovers(alive.childRunId)).toEqual([]);
    });
  });
});
