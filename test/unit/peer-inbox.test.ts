// The source's side of the peer protocol without a socket: what the
// destination may send in each of the source's steps, and what a message out
// of order, an abort or a lost link does to the source's waits.
import { describe, expect, it } from 'vitest';
import { FerryError } from '../../src/errors.ts';
import { destinationSendsInStep, sourceSteps, type PeerMessage } from '../../src/protocol/migration.ts';
import { PeerInbox } from '../../agent/migration/peer.ts';

const migrationId = 'm-0000001';
const messages: Record<'accept' | 'staged' | 'prepared' | 'decided', PeerMessage> = {
  accept: { type: 'accept', migrationId, destination: { host: 'b', criuVersion: '4.2.1', memoryTracking: false, freeBytes: 1 } },
  staged: { type: 'staged', migrationId },
  prepared: { type: 'prepared', migrationId, restoreMs: 12 },
  decided: { type: 'decided', migrationId, decision: 'commit' },
};
const text = (message: PeerMessage | object) => JSON.stringify(message);

describe('what the destination may send in each step', () => {
  it('is the one answer to what the source sent in that step, and nothing during freeze, dump or cleanup', () => {
    expect(sourceSteps).toEqual(['preflight', 'precopy', 'freeze', 'dump', 'restore', 'postcopy', 'confirm', 'cleanup']);
    expect(destinationSendsInStep).toEqual({
      preflight: ['accept'],
      precopy: ['staged'],
      freeze: [],
      dump: [],
      // Post-copy: running once the copy runs there, prepared once its last page is in.
      restore: ['prepared', 'running'],
      postcopy: ['rejoined', 'prepared'],
      confirm: ['decided'],
      cleanup: [],
    });
  });
});

describe('PeerInbox', { timeout: 5_000 }, () => {
  it('hands each answer to the step that waits for it', async () => {
    const inbox = new PeerInbox('b');
    inbox.receive(text(messages.accept));
    expect((await inbox.expect('accept', 1000, 'preflight')).destination.host).toBe('b');
    inbox.enter('restore');
    const waiting = inbox.expect('prepared', 1000, 'restore');
    inbox.receive(text(messages.prepared));
    expect((await waiting).restoreMs).toBe(12);
  });

  it('fails every wait when a message arrives out of order: a prepared during the dump is not taken later', async () => {
    const inbox = new PeerInbox('b');
    inbox.enter('dump');
    inbox.receive(text(messages.prepared));
    expect(() => inbox.ensureAlive('dump')).toThrow(/sent prepared during dump, out of order/);
    inbox.enter('restore');
    await expect(inbox.expect('prepared', 1000, 'restore')).rejects.toMatchObject({ code: 'BAD_MESSAGE', phase: 'restore' });
  });

  it('does not take a decided that came before the decision was sent', async () => {
    const inbox = new PeerInbox('b');
    inbox.enter('restore');
    inbox.receive(text(messages.decided));
    inbox.enter('confirm');
    inbox.receive(text(messages.decided));
    await expect(inbox.expect('decided', 1000, 'confirm')).rejects.toMatchObject({ code: 'BAD_MESSAGE' });
  });

  it('refuses every message type in every step where it is not the answer', () => {
    for (const step of sourceSteps) {
      for (const [type, message] of Object.entries(messages)) {
        const inbox = new PeerInbox('b');
        inbox.enter(step);
        inbox.receive(text(message));
        const allowed = (destinationSendsInStep[step] as readonly string[]).includes(type);
        if (allowed) expect(() => inbox.ensureAlive(step), `${type} in ${step}`).not.toThrow();
        else expect(() => inbox.ensureAlive(step), `${type} in ${step}`).toThrow(FerryError);
      }
    }
  });

  it('takes an abort in any step and gives the destination\'s code and phase', async () => {
    for (const step of sourceSteps) {
      const inbox = new PeerInbox('b');
      inbox.enter(step);
      inbox.receive(text({ type: 'abort', migrationId, error: { code: 'NO_SPACE', message: 'disk full', phase: 'stream' } }));
      expect((await inbox.abortReason(0, 'dump'))?.code).toBe('NO_SPACE');
      await expect(inbox.expect('prepared', 1000, 'restore')).rejects.toMatchObject({ code: 'NO_SPACE', phase: 'stream', message: 'destination b: disk full' });
      // Taken by the wait, still remembered: a post-copy source does not take it for a lost link.
      expect(inbox.heardAbort).toBe(true);
    }
    const quiet = new PeerInbox('b');
    quiet.fail(new FerryError('PEER_GONE', 'lost the connection to b'));
    expect(quiet.heardAbort).toBe(false);
  });

  it('reads a refusal on the connection as an abort, and drops frames that are not messages', async () => {
    const inbox = new PeerInbox('b');
    inbox.receive('not json');
    inbox.receive(text({ type: 'prepared' }));
    expect(() => inbox.ensureAlive('preflight')).not.toThrow();
    inbox.receive(text({ type: 'error', error: { code: 'UNAUTHORIZED', message: 'wrong token' } }));
    await expect(inbox.expect('accept', 1000, 'preflight')).rejects.toMatchObject({ code: 'UNAUTHORIZED' });
  });

  it('wakes a wait when the link is lost, and times out a wait that hears nothing', async () => {
    const inbox = new PeerInbox('b');
    const waiting = inbox.expect('accept', 10_000, 'preflight');
    inbox.fail(new FerryError('PEER_GONE', 'lost the connection to b'));
    await expect(waiting).rejects.toMatchObject({ code: 'PEER_GONE', phase: 'preflight' });
    await expect(new PeerInbox('c').expect('accept', 20, 'preflight')).rejects.toMatchObject({ code: 'TIMEOUT' });
  });
});
