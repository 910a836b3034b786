// The container runtime of one agent, for real: a netns host, the real agent,
// ferry-helper namespaces, cgroups and CRIU. Checks what the workloads show
// (their counters, their memory checksums, their logs) and what the host keeps.
import { createReadStream, existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FerryError, type ErrorCode } from '../src/errors.ts';
import type { ContainerInfo, ContainerSpec } from '../src/protocol/container.ts';
import type { AgentClient } from '../src/transport/client.ts';
import { startAgent, type AgentOptions } from '../lab/agents.ts';
import type { Host } from '../lab/hosts.ts';
import { findLeftovers } from '../lab/leftovers.ts';
import {
  connectClient,
  containerPid,
  counterSpec,
  counts,
  lastCount,
  logsOf,
  memloadSpec,
  poll,
  requestChecksum,
  startCluster,
  waitForCount,
  waitForLog,
  type TestCluster,
} from './helpers/workloads.ts';

const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const MiB = 1024 * 1024;

let test: TestCluster;
let host: Host;
/** Client of the host's agent; replaced whenever that agent restarts. */
let client: AgentClient;

beforeAll(async () => {
  test = await startCluster(1);
  host = test.cluster.hosts[0]!;
  client = test.clients[0]!;
});

afterAll(async () => {
  await test?.close();
});

async function reconnect(): Promise<void> {
  client.close();
  client = await connectClient(test.agents[0]!);
  test.clients[0] = client;
}

function checkpointDir(label: string): string {
  return join(host.stateDir, 'checkpoints', label);
}

function shellSpec(name: string, script: string): ContainerSpec {
  return { ...counterSpec(name), command: ['/bin/sh', '-c', script] };
}

async function find(name: string): Promise<ContainerInfo | undefined> {
  return (await client.request('list', {})).containers.find((container) => container.name === name);
}

async function childDirs(path: string): Promise<string[]> {
  const entries = await readdir(path, { withFileTypes: true }).catch(() => []);
  return entries.filter((entry) => entry.isDirectory()).map((entry) => entry.name).sort();
}

async function isAlive(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return stat !== '' && !stat.includes(') Z ');
}

/** The FerryError a request fails with, checked to carry `code`. */
async function expectFailure(request: Promise<unknown>, code: ErrorCode): Promise<FerryError> {
  const error = await request.then(
    (result) => new Error(`expected ${code}, got ${JSON.stringify(result).slice(0, 200)}`),
    (reason: unknown) => reason,
  );
  expect(error).toBeInstanceOf(FerryError);
  expect((error as FerryError).code).toBe(code);
  return error as FerryError;
}

/** A file's text inside a tar archive, e.g. the console log a checkpoint captured. */
async function readFromTar(archive: string, entryName: string): Promise<string> {
  const extract = tar.extract();
  createReadStream(archive).pipe(extract as unknown as NodeJS.WritableStream);
  for await (const entry of extract) {
    if (entry.header.name !== entryName) {
      entry.resume();
      continue;
    }
    const chunks: Buffer[] = [];
    for await (const chunk of entry as AsyncIterable<Buffer>) chunks.push(chunk);
    extract.destroy();
    return Buffer.concat(chunks).toString('utf8');
  }
  throw new Error(`${entryName} is not in ${archive}`);
}

describe('a counter container', () => {
  it('runs: list shows it running in its own cgroup, logs show it counting', async () => {
    const started = await client.request('run', { spec: counterSpec('counter') });
    expect(started.status).toBe('running');
    await waitForCount(client, 'counter', 5);
    const listed = await find('counter');
    expect(listed).toMatchObject({ name: 'counter', status: 'running', pid: started.pid, command: ['/bin/counter'] });
    const procs = await readFile(join(host.cgroupRoot, 'counter', 'cgroup.procs'), 'utf8');
    expect(procs.split('\n')).toContain(String(started.pid));
    expect(counts(await logsOf(client, 'counter')).slice(0, 5)).toEqual([1, 2, 3, 4, 5]);
  });

  it('outlives a restart of its agent, which lists it running again', async () => {
    const pid = await containerPid(client, 'counter');
    await test.agents[0]!.restart();
    await reconnect();
    expect(await find('counter')).toMatchObject({ status: 'running', pid });
    const countAfterRestart = lastCount(await logsOf(client, 'counter'));
    await waitForCount(client, 'counter', countAfterRestart + 3);
  });
});

describe('checkpoint, then restore under another name', () => {
  let logAtCheckpoint = '';
  let restored: ContainerInfo;

  beforeAll(async () => {
    const directory = checkpointDir('moved');
    await client.request('run', { spec: counterSpec('moved-src') });
    await waitForCount(client, 'moved-src', 10);
    await client.request('checkpoint', { name: 'moved-src', directory, keepRunning: false });
    logAtCheckpoint = await readFromTar(join(directory, 'rootfs.tar'), '.ferry/console.log');
    restored = await client.request('restore', { directory, name: 'moved-dst' });
  });

  afterAll(async () => {
    await client.request('remove', { name: 'moved-dst', force: true }).catch(() => undefined);
  });

  it('kills the checkpointed container and removes its cgroup and state', async () => {
    expect(await find('moved-src')).toBeUndefined();
    expect(existsSync(join(host.cgroupRoot, 'moved-src'))).toBe(false);
    expect(existsSync(join(host.stateDir, 'containers', 'moved-src'))).toBe(false);
  });

  it('continues counting from its last value, not from 1', async () => {
    expect(restored).toMatchObject({ name: 'moved-dst', status: 'running' });
    const lastBefore = lastCount(logAtCheckpoint);
    expect(lastBefore).toBeGreaterThanOrEqual(10);
    await waitForCount(client, 'moved-dst', lastBefore + 5);
    const afterRestore = counts((await logsOf(client, 'moved-dst')).slice(logAtCheckpoint.length));
    expect(afterRestore[0]).toBe(lastBefore + 1);
  });

  it('shows in its logs the output from before and after the checkpoint, as one run', async () => {
    const text = await logsOf(client, 'moved-dst');
    expect(text.startsWith(logAtCheckpoint)).toBe(true);
    const values = counts(text);
    expect(values.length).toBeGreaterThan(counts(logAtCheckpoint).length);
    expect(values).toEqual(values.map((_, index) => index + 1));
  });

  it('runs in its own rootfs directory and cgroup', async () => {
    const counterFile = join(host.stateDir, 'containers', 'moved-dst', 'rootfs', 'tmp', 'counter');
    const first = Number(await readFile(counterFile, 'utf8'));
    await poll('the restored counter to write its rootfs', 10_000, async () =>
      Number(await readFile(counterFile, 'utf8')) > first ? true : undefined,
    );
    const procs = await readFile(join(host.cgroupRoot, 'moved-dst', 'cgroup.procs'), 'utf8');
    expect(procs.split('\n')).toContain(String(restored.pid));
  });
});

describe('a memload container of 256 MiB', () => {
  afterAll(async () => {
    await client.request('remove', { name: 'mem-dst', force: true }).catch(() => undefined);
  });

  it('has the same memory checksum after checkpoint and restore', async () => {
    await client.request('run', { spec: memloadSpec('mem-src', 256, { seed: 11 }) });
    const ready = await waitForLog(client, 'mem-src', /^memload ready mib 256 seed 11 checksum ([0-9a-f]{16})$/m, 60_000);
    const before = await requestChecksum(client, 'mem-src');
    expect(before).toBe(ready[1]);
    const directory = checkpointDir('mem');
    await client.request('checkpoint', { name: 'mem-src', directory, keepRunning: false });
    await client.request('restore', { directory, name: 'mem-dst' });
    expect(await requestChecksum(client, 'mem-dst')).toBe(before);
    expect((await find('mem-dst'))?.memoryBytes).toBeGreaterThan(250 * MiB);
  });
});

describe('a checkpoint with keepRunning', () => {
  it('leaves the original running and counting', async () => {
    await client.request('run', { spec: counterSpec('kept') });
    const pid = (await find('kept'))?.pid;
    await waitForCount(client, 'kept', 3);
    const directory = checkpointDir('kept');
    await client.request('checkpoint', { name: 'kept', directory, keepRunning: true });
    const lastAtCheckpoint = lastCount(await readFromTar(join(directory, 'rootfs.tar'), '.ferry/console.log'));
    expect(existsSync(join(directory, 'container.json'))).toBe(true);
    expect(await find('kept')).toMatchObject({ status: 'running', pid });
    await waitForCount(client, 'kept', lastAtCheckpoint + 5);
    await client.request('remove', { name: 'kept', force: true });
  });
});

describe('stop and remove', () => {
  async function expectRemovable(name: string): Promise<void> {
    await client.request('remove', { name, force: false });
    expect(await find(name)).toBeUndefined();
    expect(existsSync(join(host.cgroupRoot, name))).toBe(false);
    expect(existsSync(join(host.stateDir, 'containers', name))).toBe(false);
  }

  it('refuses to remove a running container without force', async () => {
    await client.request('run', { spec: counterSpec('busy') });
    await expectFailure(client.request('remove', { name: 'busy', force: false }), 'BAD_REQUEST');
    expect(await find('busy')).toMatchObject({ status: 'running' });
    await client.request('remove', { name: 'busy', force: true });
    expect(await find('busy')).toBeUndefined();
  });

  it('sends SIGTERM first: a container that exits on it stops before the grace period', async () => {
    await client.request('run', { spec: shellSpec('polite', 'trap "echo got TERM; exit 0" TERM; echo up; while :; do sleep 0.1; done') });
    await waitForLog(client, 'polite', /^up$/m);
    const startedAt = Date.now();
    expect(await client.request('stop', { name: 'polite', graceMs: 10_000 })).toMatchObject({ status: 'stopped' });
    expect(Date.now() - startedAt).toBeLessThan(5_000);
    expect(await logsOf(client, 'polite')).toMatch(/^got TERM$/m);
    await expectRemovable('polite');
  });

  it('kills the whole cgroup after the grace period when SIGTERM is ignored', async () => {
    await client.request('run', { spec: shellSpec('stubborn', 'trap "" TERM; sleep 1000 & echo up; while :; do sleep 0.1; done') });
    await waitForLog(client, 'stubborn', /^up$/m);
    const pids = (await readFile(join(host.cgroupRoot, 'stubborn', 'cgroup.procs'), 'utf8')).split('\n').filter(Boolean).map(Number);
    expect(pids.length).toBeGreaterThanOrEqual(2);
    const startedAt = Date.now();
    expect(await client.request('stop', { name: 'stubborn', graceMs: 1_000 })).toMatchObject({ status: 'stopped' });
    expect(Date.now() - startedAt).toBeGreaterThanOrEqual(1_000);
    expect(await Promise.all(pids.map(isAlive))).toEqual(pids.map(() => false));
    await expectRemovable('stubborn');
  });
});

describe('bad input', () => {
  interface HostSnapshot {
    containers: string[];
    cgroupChildren: string[];
    stateDirs: string[];
  }

  /** What `list` shows, the host's child cgroups and the container state dirs. */
  async function snapshot(through: AgentClient): Promise<HostSnapshot> {
    const { containers } = await through.request('list', {});
    return {
      containers: containers.map((container) => `${container.name} ${container.status} ${container.pid}`).sort(),
      cgroupChildren: await childDirs(host.cgroupRoot),
      stateDirs: await childDirs(join(host.stateDir, 'containers')),
    };
  }

  /** Runs `request` through `through`, expects `code`, and checks the host is as before. */
  async function expectRefused(through: AgentClient, request: () => Promise<unknown>, code: ErrorCode): Promise<FerryError> {
    const before = await snapshot(through);
    const error = await expectFailure(request(), code);
    expect(await snapshot(through)).toEqual(before);
    return error;
  }

  /** CRIU refusals come before the freeze: the container keeps running. */
  async function expectCounterRunning(through: AgentClient): Promise<void> {
    const { containers } = await through.request('list', {});
    expect(containers.find((container) => container.name === 'counter')?.status).toBe('running');
  }

  /** Replaces the host's agent by one started with `options` (same state and cgroups) while `work` runs. */
  async function withOtherAgent(options: AgentOptions, work: (other: AgentClient) => Promise<void>): Promise<void> {
    await test.agents[0]!.stop();
    try {
      const other = await startAgent(host, options);
      const otherClient = await connectClient(other);
      try {
        await work(otherClient);
      } finally {
        otherClient.close();
        await other.stop();
      }
    } finally {
      await test.agents[0]!.restart();
      await reconnect();
    }
  }

  it('a missing rootfs: ROOTFS_MISSING', async () => {
    const spec = { ...counterSpec('no-rootfs'), rootfs: join(host.stateDir, 'no-such-rootfs') };
    const error = await expectRefused(client, () => client.request('run', { spec }), 'ROOTFS_MISSING');
    expect(error.message).toContain('no-such-rootfs');
  });

  it('a command that is not in the rootfs: COMMAND_NOT_FOUND', async () => {
    const spec = { ...counterSpec('no-command'), command: ['/bin/no-such-command'] };
    const error = await expectRefused(client, () => client.request('run', { spec }), 'COMMAND_NOT_FOUND');
    expect(error.message).toContain('no-such-command');
  });

  it('a name already in use: NAME_IN_USE, and the running container is untouched', async () => {
    await expectRefused(client, () => client.request('run', { spec: counterSpec('counter') }), 'NAME_IN_USE');
    const count = lastCount(await logsOf(client, 'counter'));
    await waitForCount(client, 'counter', count + 2);
  });

  it('a cgroup that cannot be created: CGROUP_FAILED', async () => {
    // The agent's cgroup root is a regular file (a control file of the host's cgroup).
    const extraArgs = ['--cgroup-root', `${host.cgroupName}/cgroup.procs`];
    await withOtherAgent({ extraArgs }, async (other) => {
      const error = await expectRefused(other, () => other.request('run', { spec: counterSpec('no-cgroup') }), 'CGROUP_FAILED');
      // The wire form says what failed without the host path (the agent's log has it).
      expect(error.message).toMatch(/^cannot create cgroup <path>: ENOTDIR/);
    });
  });

  it('a missing CRIU: CRIU_MISSING, saying how to fix it', async () => {
    const env = { FERRY_CRIU: '/nonexistent/criu', PATH: '/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' };
    await withOtherAgent({ env }, async (other) => {
      const directory = checkpointDir('no-criu');
      const request = () => other.request('checkpoint', { name: 'counter', directory, keepRunning: false });
      const error = await expectRefused(other, request, 'CRIU_MISSING');
      expect(error.message).toContain('/nonexistent/criu');
      expect(error.message).toMatch(/scripts\/setup\.sh.*FERRY_CRIU/);
      expect(existsSync(directory)).toBe(false);
      await expectCounterRunning(other);
    });
  });

  it('a CRIU older than 4.0: CRIU_TOO_OLD', async () => {
    const fake = join(host.stateDir, 'old-criu', 'criu');
    await mkdir(join(host.stateDir, 'old-criu'), { recursive: true });
    await writeFile(fake, '#!/bin/sh\necho "Version: 3.17"\n');
    await chmod(fake, 0o755);
    await withOtherAgent({ env: { FERRY_CRIU: fake } }, async (other) => {
      const directory = checkpointDir('old-criu');
      const request = () => other.request('checkpoint', { name: 'counter', directory, keepRunning: false });
      const error = await expectRefused(other, request, 'CRIU_TOO_OLD');
      expect(error.message).toContain('3.17');
      expect(existsSync(directory)).toBe(false);
      await expectCounterRunning(other);
    });
  });
});

describe('ferry doctor --json', () => {
  it('reports CRIU >= 4.2, sockets that checkpoint (a real probe dump), nftables, no memory dirty tracking, a freezer, and exits 0', async () => {
    const result = await execa(join(repoRoot, 'bin/ferry'), ['doctor', '--json'], { reject: false, cwd: repoRoot });
    expect(result.exitCode).toBe(0);
    const report = JSON.parse(result.stdout) as {
      criu: { version: string } | null;
      capabilities: Array<{ name: string; ok: boolean; value: string }>;
      ok: boolean;
    };
    const capability = (name: string) => report.capabilities.find((entry) => entry.name === name);
    expect(report.ok).toBe(true);
    const [major = 0, minor = 0] = (report.criu?.version ?? '').split('.').map(Number);
    expect(major * 100 + minor).toBeGreaterThanOrEqual(402);
    expect(capability('criu')?.ok).toBe(true);
    expect(capability('socket checkpoint')).toMatchObject({ ok: true, value: expect.stringMatching(/^TCP, UDP and unix sockets dump/) });
    expect(capability('nftables (network lock)')?.ok).toBe(true);
    expect(capability('memory dirty tracking')).toMatchObject({ ok: false, value: expect.stringMatching(/^absent/) });
    expect(capability('a freezer')?.ok).toBe(true);
    expect(capability('ferry-frame-send (page sender)')).toMatchObject({ ok: true, value: expect.stringMatching(/ferry-frame-send$/) });
    // This kernel (6.18) has it, and the set-up builds the helper that sets it.
    expect(capability('TCP_RTO_MAX_MS (post-copy notices a link back within 1 s)')).toMatchObject({ ok: true, value: 'in the kernel; set through ferry-frame-send' });
  });
});

describe('ferry run --ip', () => {
  it('refuses a bad address or gateway with BAD_REQUEST before it contacts an agent', async () => {
    // Port 1 on loopback: nothing listens, so only a check made before connecting can answer.
    const run = (args: string[]) =>
      execa(join(repoRoot, 'bin/ferry'), ['-H', 'ws://127.0.0.1:1', '--token', 'x', 'run', 'web', '--rootfs', '/', ...args, '--', 'sh'], { reject: false, cwd: repoRoot });
    for (const [args, why] of [
      [['--ip', '10.0.0.0/24'], /network address/],
      [['--ip', '10.0.0.5'], /ADDR\/PREFIX/],
      [['--ip', '10.0.0.5/24', '--gateway', '10.1.0.1'], /outside/],
      [['--gateway', '10.0.0.1'], /--gateway needs --ip/],
    ] as const) {
      const result = await run([...args]);
      expect(result.exitCode, args.join(' ')).toBe(2);
      expect(result.stderr).toMatch(/BAD_REQUEST/);
      expect(result.stderr).toMatch(why);
    }
  });
});

describe('ferry migrate options', () => {
  it('refuses a post-copy bound out of range with BAD_REQUEST before it contacts an agent', async () => {
    const migrate = (grace: string) =>
      execa(join(repoRoot, 'bin/ferry'), ['--token', 'x', 'migrate', 'web', '--from', 'ws://127.0.0.1:1', '--to', 'ws://127.0.0.1:2', '--postcopy-grace', grace], {
        reject: false,
        cwd: repoRoot,
      });
    for (const grace of ['500', '600001', 'soon']) {
      const result = await migrate(grace);
      expect(result.exitCode, grace).toBe(2);
      expect(result.stderr).toMatch(/BAD_REQUEST: migrate options: postcopyGraceMs/);
    }
  });
});

describe('the end of the run', () => {
  it('leaves nothing behind: no netns, cgroup, mount, process or state of the run', async () => {
    for (const { name } of (await client.request('list', {})).containers) {
      await client.request('remove', { name, force: true });
    }
    expect(await childDirs(host.cgroupRoot)).toEqual([]);
    expect(await childDirs(join(host.stateDir, 'containers'))).toEqual([]);
    await test.close();
    expect(await findLeftovers()).toEqual([]);
  });
});
