// The destination's state machine, driven by a hand-made source: messages out
// of order, ids used twice, data after an abort, a stream that stops half way.
// Each must be refused with a typed error and leave nothing behind.
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSocket } from '../src/transport/client.ts';
import { startNodes, waitUntilClean, type Node, type TestCluster } from './helpers/migration.ts';
import { closeCode, greet, offerMessage, sendStream, sourceFacts, type RawSocket } from './helpers/raw-peer.ts';
import { tarOf } from './helpers/tar.ts';

const IDLE_MS = 2_000;

let test: TestCluster;
let b: Node;
let facts: { cpuinfo: string; criuVersion: string };

beforeAll(async () => {
  // Only B is a destination here; its idle bound is short so a stalled stream fails fast.
  test = await startNodes(2, (index) => (index === 1 ? { env: { FERRY_STREAM_IDLE_MS: String(IDLE_MS) } } : {}));
  b = test.nodes[1]!;
  facts = await sourceFacts(test.nodes[0]!.host.stateDir);
});

afterAll(async () => {
  await test?.close();
});

function uniqueName(prefix: string): string {
  return `${prefix}-${randomUUID().slice(0, 8)}`;
}

/** Offers `name` and waits for the accept; returns the migration id. */
async function offerAccepted(source: RawSocket, name: string, migrationId = randomUUID()): Promise<string> {
  source.socket.send(JSON.stringify(offerMessage(facts, name, migrationId)));
  await source.next((message) => message.type === 'accept' && message.migrationId === migrationId);
  return migrationId;
}

function abortFrom(source: RawSocket, migrationId: string): void {
  source.socket.send(JSON.stringify({ type: 'abort', migrationId, error: { code: 'CANCELLED', message: 'test source gives up' } }));
}

async function journalState(migrationId: string): Promise<string | undefined> {
  const text = await readFile(join(b.host.stateDir, 'migrations', migrationId, 'journal.json'), 'utf8').catch(() => undefined);
  return text ? (JSON.parse(text) as { state: string }).state : undefined;
}

/** The destination is clean and still accepts a new migration of that name. */
async function expectCleanAndUsable(name: string): Promise<void> {
  await waitUntilClean(b, name, 15_000);
  const source = await greet(b, 'next');
  try {
    const migrationId = await offerAccepted(source, name);
    abortFrom(source, migrationId);
    await waitUntilClean(b, name, 15_000);
  } finally {
    source.socket.close();
  }
}

describe('the destination state machine', () => {
  it('refuses a second offer with a migration id it already knows, and the first migration is untouched', async () => {
    const first = uniqueName('first');
    const source = await greet(b, 'intruder');
    try {
      const migrationId = await offerAccepted(source, first);
      source.socket.send(JSON.stringify(offerMessage(facts, uniqueName('second'), migrationId)));
      const refusal = await source.next((message) => message.type === 'abort' && message.migrationId === migrationId);
      expect(refusal.error).toMatchObject({ code: 'BAD_MESSAGE', message: expect.stringContaining('already known') });
      // The first one still owns its name and cgroup until its source ends it.
      expect(existsSync(join(b.host.cgroupRoot, first))).toBe(true);
      abortFrom(source, migrationId);
      await waitUntilClean(b, first, 15_000);
      expect(await journalState(migrationId)).toBe('aborted');
    } finally {
      source.socket.close();
    }
    await expectCleanAndUsable(first);
  });

  it('refuses a rejoin of a migration that is not in post-copy, and of one it does not know; the migration goes on', async () => {
    const name = uniqueName('rejoin');
    const source = await greet(b, 'intruder');
    const other = await greet(b, 'intruder');
    try {
      const migrationId = await offerAccepted(source, name);
      for (const id of [migrationId, randomUUID()]) {
        other.socket.send(JSON.stringify({ type: 'rejoin', migrationId: id }));
        const refusal = await other.next((message) => message.type === 'abort' && message.migrationId === id);
        expect(refusal.error).toMatchObject({ code: 'NOT_FOUND', phase: 'postcopy' });
        expect(refusal.error?.message).toBe(id === migrationId ? `migration ${id} is receiving here` : `no post-copy of migration ${id} waits here`);
      }
      // Still the first connection's: its abort is taken.
      expect(existsSync(join(b.host.cgroupRoot, name))).toBe(true);
      abortFrom(source, migrationId);
      await waitUntilClean(b, name, 15_000);
      expect(await journalState(migrationId)).toBe('aborted');
    } finally {
      source.socket.close();
      other.socket.close();
    }
    await expectCleanAndUsable(name);
  });

  it('refuses a commit before the copy is prepared: decided abort, and nothing is left', async () => {
    const name = uniqueName('early-commit');
    const source = await greet(b, 'intruder');
    try {
      const migrationId = await offerAccepted(source, name);
      source.socket.send(JSON.stringify({ type: 'decision', migrationId, decision: 'commit' }));
      const decided = await source.next((message) => message.type === 'decided' && message.migrationId === migrationId);
      expect(decided.decision).toBe('abort');
      await waitUntilClean(b, name, 15_000);
      expect(await journalState(migrationId)).toBe('aborted');
      expect(b.agent.logs().some((line) => line.includes('commit refused: the copy is not prepared'))).toBe(true);
    } finally {
      source.socket.close();
    }
    await expectCleanAndUsable(name);
  });

  it('accepts only one of two offers for one new name made at once; the other is refused NAME_IN_USE', async () => {
    const name = uniqueName('contested');
    const [one, two] = await Promise.all([greet(b, 'one'), greet(b, 'two')]);
    try {
      const ids = [randomUUID(), randomUUID()];
      one.socket.send(JSON.stringify(offerMessage(facts, name, ids[0])));
      two.socket.send(JSON.stringify(offerMessage(facts, name, ids[1])));
      const answers = await Promise.all(
        [one, two].map((source, index) => source.next((message) => message.migrationId === ids[index] && (message.type === 'accept' || message.type === 'abort'))),
      );
      expect(answers.map((answer) => answer.type).sort()).toEqual(['abort', 'accept']);
      expect(answers.find((answer) => answer.type === 'abort')!.error).toMatchObject({ code: 'NAME_IN_USE' });
      const winner = answers.findIndex((answer) => answer.type === 'accept');
      abortFrom([one, two][winner]!, ids[winner]!);
      await waitUntilClean(b, name, 15_000);
    } finally {
      one.socket.close();
      two.socket.close();
    }
    await expectCleanAndUsable(name);
  });

  it('refuses a second files channel for one migration', async () => {
    const name = uniqueName('two-channels');
    const source = await greet(b, 'intruder');
    try {
      const migrationId = await offerAccepted(source, name);
      const first = await openSocket({ url: b.agent.url, token: b.agent.token }, `/migrations/${migrationId}/files`, 'stream');
      const second = await openSocket({ url: b.agent.url, token: b.agent.token }, `/migrations/${migrationId}/files`, 'stream');
      expect(await closeCode(second)).toBe(4004);
      // The agent logs the refusal before it closes, but its log comes by a pipe that may lag the close frame.
      await b.agent.waitForLog((entry) => entry.line.includes('the files channel is already open'), 5_000);
      expect(first.readyState).toBe(first.OPEN);
      first.terminate();
      abortFrom(source, migrationId);
      await waitUntilClean(b, name, 15_000);
    } finally {
      source.socket.close();
    }
  });

  it('writes nothing that arrives after an abort, and says nothing more of that migration', async () => {
    const name = uniqueName('after-abort');
    const source = await greet(b, 'intruder');
    try {
      const migrationId = await offerAccepted(source, name);
      const files = await openSocket({ url: b.agent.url, token: b.agent.token }, `/migrations/${migrationId}/files`, 'stream');
      // The abort and the rootfs leave together, abort first.
      abortFrom(source, migrationId);
      sendStream(files, 'rootfs', await tarOf([{ name: 'late-file', body: 'written after the abort' }]));
      await waitUntilClean(b, name, 15_000);
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      expect(existsSync(join(b.host.stateDir, 'containers', name))).toBe(false);
      expect(source.received.filter((message) => message.migrationId === migrationId && message.type === 'staged')).toEqual([]);
      files.terminate();
    } finally {
      source.socket.close();
    }
  });

  it('fails a stream that stops in the middle of a tar entry with TIMEOUT, while the source stays connected', async () => {
    const name = uniqueName('stalled');
    const source = await greet(b, 'intruder');
    try {
      const migrationId = await offerAccepted(source, name);
      const files = await openSocket({ url: b.agent.url, token: b.agent.token }, `/migrations/${migrationId}/files`, 'stream');
      const tar = await tarOf([{ name: 'big', body: 'x'.repeat(100_000) }]);
      files.send(JSON.stringify({ type: 'stream-open', name: 'rootfs' }));
      files.send(tar.subarray(0, 20_000), { binary: true });
      const started = Date.now();
      const abort = await source.next((message) => message.type === 'abort' && message.migrationId === migrationId, 30_000);
      expect(abort.error).toMatchObject({ code: 'TIMEOUT', message: expect.stringContaining('no data for') });
      expect(Date.now() - started).toBeLessThan(IDLE_MS + 10_000);
      expect(source.socket.readyState).toBe(source.socket.OPEN);
      await waitUntilClean(b, name, 15_000);
      files.terminate();
    } finally {
      source.socket.close();
    }
  });
});
