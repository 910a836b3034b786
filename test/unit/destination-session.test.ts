// The destination's state machine with an in-memory copy and peer: what each
// message and channel does in each state, in orders a real source never sends.
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { FerryError } from '../../src/errors.ts';
import type { PeerMessage } from '../../src/protocol/migration.ts';
import { DestinationSession, type SessionPeer } from '../../agent/migration/destination.ts';
import type { AcceptFacts, IncomingCopy, PageList } from '../../agent/migration/incoming.ts';

interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(error: unknown): void;
}

function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((yes, no) => {
    resolve = yes;
    reject = no;
  });
  return { promise, resolve, reject };
}

class FakeSocket {
  terminated = false;
  terminate(): void {
    this.terminated = true;
  }
}

const facts: AcceptFacts = { host: 'b', criuVersion: '4.2.1', memoryTracking: false, freeBytes: 1 << 30 };
const prepared = { restoreMs: 20, timing: { waitMs: 1, checkMs: 2, criuMs: 15, recordMs: 2 } };

/** Records what the session asked of the work, in order; each step ends when the test says. */
class FakeCopy implements IncomingCopy<FakeSocket> {
  readonly calls: string[] = [];
  readonly preflightDone = deferred<AcceptFacts>();
  readonly filesDone = deferred();
  readonly pagesDone = deferred();
  readonly restoreDone = deferred<typeof prepared>();
  readonly resumeDone = deferred();
  signal!: AbortSignal;
  staged!: () => void;
  /** Like the real writers, whose sockets the abort cuts: they end once the signal aborts. */
  writersHonourAbort = true;

  private writer(done: Deferred<void>): Promise<void> {
    const stop = () => {
      if (this.writersHonourAbort) done.reject(new FerryError('CANCELLED', 'the migration was aborted'));
    };
    if (this.signal.aborted) stop();
    else this.signal.addEventListener('abort', stop, { once: true });
    return done.promise;
  }

  preflight(): Promise<AcceptFacts> {
    this.calls.push('preflight');
    return this.preflightDone.promise;
  }
  receiveFiles(_socket: FakeSocket, staged: () => void): Promise<void> {
    this.calls.push('receiveFiles');
    this.staged = staged;
    return this.writer(this.filesDone);
  }
  receivePages(): Promise<void> {
    this.calls.push('receivePages');
    return this.writer(this.pagesDone);
  }
  /** Post-copy's hooks, for a test to say the copy runs or its page supply broke. */
  running: ((facts: typeof prepared) => void) | undefined;
  supplyLost: ((reason: string) => void) | undefined;
  async restore(files: Promise<void>, pages: PageList, running?: (facts: typeof prepared) => void, supplyLost?: (reason: string) => void): Promise<typeof prepared> {
    this.calls.push(`restore ${pages.length}`);
    this.running = running;
    this.supplyLost = supplyLost;
    await files;
    // Like the real restore, whose guard an abort stops.
    return new Promise((resolve, reject) => {
      this.restoreDone.promise.then(resolve, reject);
      const stop = () => reject(new FerryError('CANCELLED', 'the migration was aborted'));
      if (this.signal.aborted) stop();
      else this.signal.addEventListener('abort', stop, { once: true });
    });
  }
  resume(): Promise<void> {
    this.calls.push('resume');
    return this.resumeDone.promise;
  }
  async dropCommitted(): Promise<void> {
    this.calls.push('dropCommitted');
  }
  async discard(): Promise<void> {
    this.calls.push('discard');
  }
  release(): void {
    this.calls.push('release');
  }
  rejoinPages(): void {
    this.calls.push('rejoinPages');
  }
}

class FakePeer implements SessionPeer {
  open = true;
  peerName: string | undefined = 'a';
  heartbeat = { expired: false, tolerate: () => undefined };
  terminate: (() => void) | undefined;
  readonly sent: PeerMessage[] = [];
  sendPeer(message: PeerMessage): void {
    this.sent.push(message);
  }
  get types(): string[] {
    return this.sent.map((message) => message.type);
  }
  abortCode(): string | undefined {
    const abort = this.sent.find((message) => message.type === 'abort');
    return abort?.type === 'abort' ? abort.error.code : undefined;
  }
}

function session(postcopyGraceMs?: number) {
  const copy = new FakeCopy();
  const peer = new FakePeer();
  const outcomes: string[] = [];
  let forgotten = 0;
  const machine = new DestinationSession<FakeSocket>({
    migrationId: 'm-1',
    peer,
    copy: (signal) => {
      copy.signal = signal;
      return copy;
    },
    logger: pino({ level: 'silent' }),
    forget: () => (forgotten += 1),
    onOutcome: (outcome) => outcomes.push(outcome),
    sourceHost: 'a',
    ...(postcopyGraceMs ? { postcopyGraceMs } : {}),
  });
  return { machine, copy, peer, outcomes, forgotten: () => forgotten };
}

/** Lets every settled promise's continuations run. */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

/** A session that accepted, with both channels attached. */
async function receiving(postcopyGraceMs?: number) {
  const parts = session(postcopyGraceMs);
  const started = parts.machine.start();
  parts.copy.preflightDone.resolve(facts);
  await started;
  expect(parts.machine.attach('files', new FakeSocket())).toBeUndefined();
  expect(parts.machine.attach('pages', new FakeSocket())).toBeUndefined();
  return parts;
}

async function preparedSession() {
  const parts = await receiving();
  parts.copy.filesDone.resolve();
  const restoring = parts.machine.transferComplete([{ name: 'pages-1.img', digest: 'x' }]);
  parts.copy.restoreDone.resolve(prepared);
  await restoring;
  expect(parts.machine.current).toBe('prepared');
  return parts;
}

/** A post-copy session whose copy runs here, its pages still to come. */
async function postcopySession(boundMs: number) {
  const parts = await receiving(boundMs);
  parts.copy.filesDone.resolve();
  const restoring = parts.machine.transferComplete([]);
  await settle();
  parts.copy.running!(prepared);
  expect(parts.machine.current).toBe('postcopy');
  return { ...parts, restoring };
}

describe('post-copy without its source', { timeout: 5_000 }, () => {
  it('waits for a source that closed, takes its rejoin from the offer\'s host once the old link is gone, and a new pages channel', async () => {
    const { machine, copy, peer, restoring } = await postcopySession(2_000);
    peer.open = false;
    machine.sourceGone();
    await settle();
    expect(machine.current).toBe('postcopy');
    const stranger = new FakePeer();
    stranger.peerName = 'c';
    expect(machine.rejoin(stranger)).toBe('only a may rejoin migration m-1');
    // No channel before the rejoin.
    expect(machine.attach('pages', new FakeSocket())).toBe('migration is postcopy, not receiving');
    const back = new FakePeer();
    expect(machine.rejoin(back)).toBeUndefined();
    expect(back.sent).toEqual([{ type: 'rejoined', migrationId: 'm-1', prepared: false }]);
    expect(machine.peer).toBe(back);
    expect(machine.attach('pages', new FakeSocket())).toBeUndefined();
    expect(copy.calls.at(-1)).toBe('rejoinPages');
    // Only one new channel per rejoin.
    expect(machine.attach('pages', new FakeSocket())).toBe('migration is postcopy, not receiving');
    copy.restoreDone.resolve(prepared);
    await restoring;
    expect(machine.current).toBe('prepared');
    expect(back.types).toEqual(['rejoined', 'prepared']);
  });

  it('stops the copy once the bound passes without a rejoin', async () => {
    const { machine, copy, peer } = await postcopySession(100);
    copy.supplyLost!('the post-copy page channel closed');
    peer.open = false;
    machine.sourceGone();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(machine.current).toBe('postcopy');
    await new Promise((resolve) => setTimeout(resolve, 150));
    await settle();
    expect(machine.current).toBe('aborted');
    expect(copy.calls.at(-1)).toBe('discard');
    expect(machine.rejoin(new FakePeer())).toBe('migration m-1 is aborted here');
  });

  it('does not wait for a source whose link went silent past the bound', async () => {
    const { machine, copy, peer } = await postcopySession(2_000);
    peer.open = false;
    peer.heartbeat.expired = true;
    machine.sourceGone();
    await settle();
    await settle();
    expect(machine.current).toBe('aborted');
    expect(copy.calls.at(-1)).toBe('discard');
  });

  it('tells a source that rejoins a prepared copy that only the decision is missing', async () => {
    const { machine, peer, copy, restoring } = await postcopySession(2_000);
    copy.restoreDone.resolve(prepared);
    await restoring;
    peer.open = false;
    machine.sourceGone();
    const back = new FakePeer();
    expect(machine.rejoin(back)).toBeUndefined();
    expect(back.sent).toEqual([{ type: 'rejoined', migrationId: 'm-1', prepared: true }, { type: 'prepared', migrationId: 'm-1', ...prepared }]);
    expect(machine.attach('pages', new FakeSocket())).toBe('migration is prepared, not receiving');
  });

  it('takes a rejoin while it still holds the old connection, and cuts that one', async () => {
    const { machine, peer } = await postcopySession(2_000);
    let cut = false;
    peer.terminate = () => {
      cut = true;
      peer.open = false;
      // Its close reaches the session, which knows it is no longer the source's.
      machine.sourceGone(peer);
    };
    const back = new FakePeer();
    expect(machine.rejoin(back)).toBeUndefined();
    expect(cut).toBe(true);
    expect(machine.peer).toBe(back);
    await settle();
    expect(machine.current).toBe('postcopy');
    expect(machine.attach('pages', new FakeSocket())).toBeUndefined();
  });

  it('refuses a rejoin of a migration that is not post-copy', async () => {
    const { machine, peer } = await receiving();
    peer.open = false;
    expect(machine.rejoin(new FakePeer())).toBe('migration m-1 is receiving here');
  });
});

describe('the destination session', { timeout: 5_000 }, () => {
  it('in order: accept, staged, prepared, then resumes on commit and counts a success', async () => {
    const { machine, copy, peer, outcomes } = await preparedSession();
    copy.staged();
    // staged came after prepared here only because the fake let it; the session still tells the source.
    const deciding = machine.decide('commit');
    copy.resumeDone.resolve();
    await deciding;
    expect(machine.current).toBe('done');
    expect(copy.calls).toEqual(['preflight', 'receiveFiles', 'receivePages', 'restore 1', 'resume', 'release']);
    expect(peer.types).toEqual(['accept', 'prepared']);
    expect(peer.sent[1]).toMatchObject({ type: 'prepared', migrationId: 'm-1', restoreMs: 20 });
    expect(outcomes).toEqual(['succeeded']);
  });

  it('sends staged while receiving, once the copy has rootfs pass 1', async () => {
    const { copy, peer } = await receiving();
    copy.staged();
    expect(peer.types).toEqual(['accept', 'staged']);
  });

  it('refuses transfer-complete before both channels opened, tells the source, and discards', async () => {
    const { machine, copy, peer, outcomes } = session();
    const started = machine.start();
    copy.preflightDone.resolve(facts);
    await started;
    machine.attach('files', new FakeSocket());
    await machine.transferComplete([]);
    expect(machine.current).toBe('aborted');
    expect(peer.abortCode()).toBe('BAD_MESSAGE');
    expect(copy.calls).not.toContain('restore 0');
    expect(copy.calls.at(-1)).toBe('discard');
    expect(copy.signal.aborted).toBe(true);
    expect(outcomes).toEqual(['rolled-back']);
  });

  it('refuses transfer-complete during preflight without restoring anything', async () => {
    const { machine, copy, peer } = session();
    const started = machine.start();
    const refusing = machine.transferComplete([]);
    await settle();
    // The abort waits for preflight's own work before discarding it.
    expect(copy.calls).toEqual(['preflight']);
    copy.preflightDone.resolve(facts);
    await Promise.all([started, refusing]);
    expect(copy.calls).toEqual(['preflight', 'discard']);
    expect(peer.types).toEqual(['abort']);
    expect(machine.current).toBe('aborted');
  });

  it('refuses a data channel outside receiving and a second one of a kind, without ending the migration for the latter', async () => {
    const { machine } = session();
    expect(machine.attach('files', new FakeSocket())).toMatch(/preflight, not receiving/);
    const { machine: open } = await receiving();
    expect(open.attach('files', new FakeSocket())).toMatch(/already open/);
    expect(open.current).toBe('receiving');
  });

  it('takes a commit that arrives before prepared as an abort: nothing is resumed', async () => {
    const { machine, copy } = await receiving();
    await machine.decide('commit');
    expect(machine.current).toBe('aborted');
    expect(copy.calls).not.toContain('resume');
    expect(copy.calls.at(-1)).toBe('discard');
  });

  it('keeps a prepared copy when the source goes away, and drops it when the decision is abort', async () => {
    const { machine, copy, peer } = await preparedSession();
    machine.sourceGone();
    await settle();
    expect(machine.current).toBe('prepared');
    expect(copy.calls).not.toContain('discard');
    await machine.decide('abort');
    expect(machine.current).toBe('aborted');
    expect(copy.calls.at(-1)).toBe('discard');
    // The destination does not send its own abort for the source's decision.
    expect(peer.types).toEqual(['accept', 'prepared']);
  });

  it('after prepared, an out-of-order message or a failing writer is only logged: the source may have committed', async () => {
    const { machine, copy, peer } = await preparedSession();
    await machine.refuse('a source does not send staged');
    copy.pagesDone.reject(new FerryError('PEER_GONE', 'the pages channel closed'));
    await settle();
    expect(machine.current).toBe('prepared');
    expect(peer.types).toEqual(['accept', 'prepared']);
  });

  it('discards a source that goes away while receiving, after its writers stopped', async () => {
    const { machine, copy } = await receiving();
    copy.writersHonourAbort = false;
    machine.sourceGone();
    await settle();
    // The files writer has not finished: nothing is removed under it.
    expect(copy.signal.aborted).toBe(true);
    expect(copy.calls).not.toContain('discard');
    copy.filesDone.reject(new FerryError('CANCELLED', 'the migration was aborted'));
    copy.pagesDone.reject(new FerryError('CANCELLED', 'the migration was aborted'));
    await settle();
    expect(copy.calls.at(-1)).toBe('discard');
    expect(machine.current).toBe('aborted');
  });

  it('a failed restore tells the source in the restore phase and discards', async () => {
    const { machine, copy, peer } = await receiving();
    copy.filesDone.resolve();
    const restoring = machine.transferComplete([]);
    copy.restoreDone.reject(new FerryError('CRIU_FAILED', 'criu restore failed', { phase: 'restore' }));
    await restoring;
    const abort = peer.sent.find((message) => message.type === 'abort');
    expect(abort).toMatchObject({ error: { code: 'CRIU_FAILED', phase: 'restore' } });
    expect(copy.calls.at(-1)).toBe('discard');
  });

  it('a commit applied once: a second commit or an abort after it does nothing', async () => {
    const { machine, copy, outcomes } = await preparedSession();
    const deciding = machine.decide('commit');
    copy.resumeDone.resolve();
    await deciding;
    await machine.decide('commit');
    await machine.decide('abort');
    expect(copy.calls.filter((call) => call === 'resume' || call === 'discard')).toEqual(['resume']);
    expect(outcomes).toEqual(['succeeded']);
  });

  it('a commit re-delivered while the first one resumes waits for it; nothing resumes twice', async () => {
    const { machine, copy, outcomes, forgotten } = await preparedSession();
    const first = machine.decide('commit');
    let againDone = false;
    const again = machine.decide('commit').then(() => (againDone = true));
    const abort = machine.decide('abort');
    await settle();
    // Still in the agent's table: a later delivery must not go to the journal, which says prepared until the resume ends.
    expect(againDone).toBe(false);
    expect(forgotten()).toBe(0);
    copy.resumeDone.resolve();
    await Promise.all([first, again, abort]);
    expect(againDone).toBe(true);
    expect(machine.current).toBe('done');
    expect(copy.calls.filter((call) => call === 'resume' || call === 'discard')).toEqual(['resume']);
    expect(forgotten()).toBe(1);
    expect(outcomes).toEqual(['succeeded']);
  });

  it('a committed copy that cannot resume is dropped and counted, never left claimed', async () => {
    const { machine, copy, outcomes } = await preparedSession();
    const deciding = machine.decide('commit');
    copy.resumeDone.reject(new Error('no such cgroup'));
    await deciding;
    expect(machine.current).toBe('aborted');
    expect(copy.calls.slice(-3)).toEqual(['resume', 'dropCommitted', 'release']);
    expect(outcomes).toEqual(['rolled-back']);
  });

  it('an offer refused in preflight counts as no migration and keeps its code and phase', async () => {
    const { machine, copy, peer, outcomes } = session();
    const started = machine.start();
    copy.preflightDone.reject(new FerryError('NO_SPACE', 'needs 2 GiB'));
    await started;
    expect(peer.sent).toMatchObject([{ type: 'abort', error: { code: 'NO_SPACE', phase: 'preflight' } }]);
    expect(copy.calls).toEqual(['preflight', 'discard']);
    expect(outcomes).toEqual([]);
  });

  it('does not accept for a source that left during preflight', async () => {
    const { machine, copy, peer } = session();
    const started = machine.start();
    peer.open = false;
    copy.preflightDone.resolve(facts);
    await started;
    expect(peer.types).not.toContain('accept');
    expect(peer.abortCode()).toBe('PEER_GONE');
    expect(machine.current).toBe('aborted');
  });
});
