// Failures before the commit roll back: whatever breaks (the destination
// agent dies, CRIU cannot restore, a chunk arrives corrupted, the link goes
// down), the container keeps running on the source as if nothing happened,
// the destination keeps nothing, and the error says what and in which phase.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { phases, type FerryError } from '../src/errors.ts';
import type { AgentOptions } from '../lab/agents.ts';
import {
  containerPid,
  counterSpec,
  counts,
  failureOf,
  lastCount,
  logsOf,
  memloadSpec,
  migrate,
  reconnect,
  removeQuietly,
  requestChecksum,
  requestVerify,
  runContainer,
  stagedImages,
  startNodes,
  waitForCount,
  waitForMemload,
  waitUntilClean,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';

let test: TestCluster;

beforeAll(async () => {
  test = await startNodes(2);
});

afterAll(async () => {
  await test?.close();
});

/** Fresh agents on A and B with these options (faults are read at agent start). */
async function agents(onA: AgentOptions = {}, onB: AgentOptions = {}): Promise<[Node, Node]> {
  return [await test.restartAgent(0, onA), await test.restartAgent(1, onB)];
}

function faults(value: string): AgentOptions {
  return { env: { FERRY_FAULTS: value } };
}

function expectNamesPhase(error: FerryError): void {
  expect(error.phase).toBeDefined();
  expect(phases).toContain(error.phase);
}

/** Still the same task, running (not frozen, not held by a migration), and no staged images left. */
async function expectRunning(node: Node, name: string, pid: number): Promise<void> {
  const list = await node.client.request('list', {});
  expect(list.containers.map((container) => [container.name, container.status, container.pid])).toEqual([
    [name, 'running', pid],
  ]);
  expect(await stagedImages(node.host)).toEqual([]);
}

/** Runs the counter on A, migrates it to B, expects a failure; then checks A and B. */
async function counterRollback(a: Node, b: Node, name: string): Promise<FerryError> {
  await runContainer(a, counterSpec(name));
  const pid = await containerPid(a, name);
  const before = lastCount(await waitForCount(a, name, 5));
  const error = await failureOf(migrate(a, b, name));
  expectNamesPhase(error);
  await expectRunning(a, name, pid);
  // It goes on counting from where it was: no restart, no repeat.
  const text = await waitForCount(a, name, lastCount(await logsOf(a, name)) + 5);
  expect(lastCount(text)).toBeGreaterThan(before + 5);
  const values = counts(text);
  expect(values).toEqual(values.map((_, index) => index + 1));
  await waitUntilClean(b, name);
  await removeQuietly(a, name);
  return error;
}

/**
 * Runs a 512 MiB memload on A and migrates it to B, calling `interrupt` once
 * when the dump has shipped 96 MiB; expects a failure, then checks that A
 * still runs it with the same memory.
 */
async function memloadRollback(a: Node, b: Node, name: string, interrupt: () => Promise<void>): Promise<FerryError> {
  await runContainer(a, memloadSpec(name, 512));
  await waitForMemload(a, name);
  const pid = await containerPid(a, name);
  const checksum = await requestChecksum(a, name);
  let interrupted: Promise<void> | undefined;
  const error = await failureOf(
    migrate(a, b, name, (event) => {
      const shipping = event.phase === 'dump' || event.phase === 'stream';
      if (shipping && (event.bytes ?? 0) > 96 * 1024 * 1024) interrupted ??= interrupt();
    }),
  );
  expect(interrupted).toBeDefined();
  await interrupted;
  expectNamesPhase(error);
  await expectRunning(a, name, pid);
  expect(await requestChecksum(a, name)).toBe(checksum);
  expect(await requestVerify(a, name)).toMatch(/^verify ok /);
  return error;
}

describe('rollback', () => {
  it('when the destination agent is killed in the middle of the dump', async () => {
    const [a, b] = await agents();
    const error = await memloadRollback(a, b, 'killed', () => b.agent.kill('SIGKILL'));
    expect(error.code).toBe('PEER_GONE');
    expect(['dump', 'stream']).toContain(error.phase);
    // The restarted agent finds the interrupted incoming migration and drops it.
    const restarted = await test.restartAgent(1);
    await restarted.agent.waitForLog((entry) => entry.json?.msg === 'interrupted incoming migration discarded');
    await waitUntilClean(restarted, 'killed');
    await removeQuietly(a, 'killed');
  });

  it('when CRIU fails to restore on the destination', async () => {
    const [a, b] = await agents({}, faults('fail-restore'));
    const error = await counterRollback(a, b, 'restore-fails');
    expect(error.code).toBe('CRIU_FAILED');
    expect(error.phase).toBe('restore');
    expect(error.message).toContain('criu restore failed');
    // CRIU's own error lines, from its restore log on B.
    expect(error.details.length).toBeGreaterThan(0);
    expect(error.details.join('\n')).toMatch(/Error|pstree/);
  });

  it('when a rootfs chunk arrives corrupted', async () => {
    const [a, b] = await agents(faults('corrupt-chunk:files:3'));
    const error = await counterRollback(a, b, 'bad-files');
    expect(error.code).toBe('CHECKSUM_MISMATCH');
    expect(b.agent.logs().some((line) => line.includes('CHECKSUM_MISMATCH'))).toBe(true);
  });

  it('when a memory page chunk arrives corrupted', async () => {
    const [a, b] = await agents(faults('corrupt-chunk:pages:2'));
    const error = await counterRollback(a, b, 'bad-pages');
    expect(['CHECKSUM_MISMATCH', 'CRIU_FAILED']).toContain(error.code);
  });

  it('when a chunk of pages arrives corrupted on its way from CRIU through a page pipe', async () => {
    // Frame 1000 of 16 KiB lies some 16 MiB into the final dump's page image, which CRIU
    // writes into a named pipe while the agent ships it: the destination's digest catches it.
    const [a, b] = await agents(faults('corrupt-chunk:pages:1000'));
    await runContainer(a, memloadSpec('bad-pipe', 128));
    await waitForMemload(a, 'bad-pipe');
    const pid = await containerPid(a, 'bad-pipe');
    const checksum = await requestChecksum(a, 'bad-pipe');
    const error = await failureOf(migrate(a, b, 'bad-pipe'));
    expect(error.code).toBe('CHECKSUM_MISMATCH');
    expectNamesPhase(error);
    await expectRunning(a, 'bad-pipe', pid);
    expect(await requestChecksum(a, 'bad-pipe')).toBe(checksum);
    expect(await requestVerify(a, 'bad-pipe')).toMatch(/^verify ok /);
    await waitUntilClean(b, 'bad-pipe');
    await removeQuietly(a, 'bad-pipe');
  });

  it('when the link to the destination goes down during the dump', async () => {
    const [a, b] = await agents();
    const started = Date.now();
    try {
      const error = await memloadRollback(a, b, 'cut', () => b.host.setLinkDown());
      // Ended by the heartbeat (2 s, 3 missed), not by the 10-minute migration timeout.
      expect(Date.now() - started).toBeLessThan(60_000);
      expect(['PEER_GONE', 'TIMEOUT', 'TRANSFER_FAILED']).toContain(error.code);
    } finally {
      await b.host.setLinkUp();
    }
    // The cut ended this test's own connection to B too.
    await reconnect(b);
    await waitUntilClean(b, 'cut', 60_000);
    await removeQuietly(a, 'cut');
  });
});
