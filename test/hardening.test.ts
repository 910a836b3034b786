// What a large container, a failed checkpoint, a foreign image set and a
// local user must not be able to do: be reported lost after a successful
// move, take the caller's files with it, run with the host's namespaces, or
// reach the state directory.
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Criu } from '../src/criu/criu.ts';
import {
  cgroupChildren,
  failureOf,
  migrate,
  memloadSpec,
  counterSpec,
  removeQuietly,
  requestVerify,
  runContainer,
  startNodes,
  waitForCount,
  waitForMemload,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';

let test: TestCluster;
let a: Node;
let b: Node;

beforeAll(async () => {
  test = await startNodes(2);
  [a, b] = test.nodes as [Node, Node];
});

afterAll(async () => {
  await test?.close();
});

function scratch(label: string): string {
  return join(a.host.stateDir, '..', `${a.host.name}-scratch-${label}`);
}

describe('a large container', () => {
  it('moves 512 MiB: the report says succeeded, the source keeps no cgroup, the memory verifies', async () => {
    const name = 'large';
    try {
      await runContainer(a, memloadSpec(name, 512));
      await waitForMemload(a, name, 120_000);
      const report = await migrate(a, b, name);
      expect(report.outcome).toBe('succeeded');
      expect(report.warnings ?? []).toEqual([]);
      expect(await cgroupChildren(a.host)).toEqual([]);
      expect(existsSync(join(a.host.stateDir, 'containers', name))).toBe(false);
      expect(await requestVerify(b, name)).toMatch(/^verify ok/);
    } finally {
      await removeQuietly(b, name);
      await removeQuietly(a, name);
    }
  });

  it('checkpoints 512 MiB without keeping it running: succeeds, keeps the images, leaves no cgroup, restores intact', async () => {
    const name = 'large-ckpt';
    const directory = scratch('large');
    try {
      await runContainer(a, memloadSpec(name, 512, 11));
      await waitForMemload(a, name, 120_000);
      const result = await a.client.request('checkpoint', { name, directory, keepRunning: false });
      expect(result.warnings ?? []).toEqual([]);
      expect((await readdir(join(directory, 'images'))).some((file) => file.startsWith('pages-'))).toBe(true);
      expect(await cgroupChildren(a.host)).toEqual([]);
      await a.client.request('restore', { directory, name });
      expect(await requestVerify(a, name)).toMatch(/^verify ok/);
    } finally {
      await removeQuietly(a, name);
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('checkpoint into a directory that holds other files', () => {
  it('a failed checkpoint removes only what it wrote, and the container keeps running', async () => {
    const name = 'ckpt-fails';
    const directory = scratch('keep');
    await mkdir(directory, { recursive: true });
    await writeFile(join(directory, 'precious.txt'), 'the operator put this here');
    // This agent's CRIU dump fails for real: the fault puts a directory where CRIU writes its inventory.
    a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'fail-checkpoint-dump' } });
    try {
      await runContainer(a, counterSpec(name));
      await waitForCount(a, name, 3);
      const error = await failureOf(a.client.request('checkpoint', { name, directory, keepRunning: true }));
      expect(error.code).toBe('CRIU_FAILED');
      expect(error.phase).toBe('dump');
      expect(await readdir(directory)).toEqual(['precious.txt']);
      const listed = (await a.client.request('list', {})).containers.find((container) => container.name === name);
      expect(listed?.status).toBe('running');
    } finally {
      await removeQuietly(a, name);
      await rm(directory, { recursive: true, force: true });
      a = await test.restartAgent(0);
    }
  });

  it('refuses a directory that already holds a checkpoint, touching nothing', async () => {
    const name = 'ckpt-clash';
    const directory = scratch('clash');
    await mkdir(join(directory, 'images'), { recursive: true });
    await writeFile(join(directory, 'images', 'older.img'), 'an older checkpoint');
    try {
      await runContainer(a, counterSpec(name));
      const error = await failureOf(a.client.request('checkpoint', { name, directory, keepRunning: true }));
      expect(error.code).toBe('NAME_IN_USE');
      expect(await readdir(join(directory, 'images'))).toEqual(['older.img']);
    } finally {
      await removeQuietly(a, name);
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('restore of a foreign image set', () => {
  it('refuses the images of a plain host process (UNSAFE_ARCHIVE) and runs nothing', async () => {
    const name = 'to-forge';
    const directory = scratch('forged');
    const hostProcess = execa('setsid', ['sleep', '987654'], { stdin: 'ignore', stdout: 'ignore', stderr: 'ignore', reject: false });
    try {
      await runContainer(a, counterSpec(name));
      await waitForCount(a, name, 2);
      await a.client.request('checkpoint', { name, directory, keepRunning: true });
      // The container's images are replaced by those of a host process, dumped by the same CRIU.
      await rm(join(directory, 'images'), { recursive: true });
      await mkdir(join(directory, 'images'));
      const criu = await Criu.locate();
      await execa(criu.path, ['dump', '-t', String(hostProcess.pid), '-D', join(directory, 'images'), '--shell-job', '--leave-running', '-o', 'dump.log']);
      const error = await failureOf(a.client.request('restore', { directory, name: 'forged' }));
      expect(error.code).toBe('UNSAFE_ARCHIVE');
      expect(error.message).toMatch(/not the init \(pid 1\)|share the dumping host's/);
      const names = (await a.client.request('list', {})).containers.map((container) => container.name);
      expect(names).toEqual([name]);
      expect(await cgroupChildren(a.host)).toEqual([name]);
      // Only the original: no second copy was restored from its images.
      const sleepers = await execa('pgrep', ['-f', '-x', 'sleep 987654'], { reject: false });
      expect(sleepers.stdout.split('\n').filter(Boolean)).toEqual([String(hostProcess.pid)]);
    } finally {
      hostProcess.kill('SIGKILL');
      await removeQuietly(a, name);
      await removeQuietly(a, 'forged');
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('the state directory', () => {
  async function mode(path: string): Promise<number> {
    return (await stat(path)).mode & 0o777;
  }

  it('is 0700 with what holds rootfs and images, and is narrowed again at a restart', async () => {
    const name = 'private';
    try {
      await runContainer(b, counterSpec(name));
      const paths = [b.host.stateDir, join(b.host.stateDir, 'containers'), join(b.host.stateDir, 'migrations'), join(b.host.stateDir, 'containers', name)];
      for (const path of paths) expect(await mode(path), path).toBe(0o700);
      for (const path of paths) await chmod(path, 0o755);
      b = await test.restartAgent(1, { token: b.agent.token });
      for (const path of paths) expect(await mode(path), path).toBe(0o700);
    } finally {
      await removeQuietly(b, name);
    }
  });
});
