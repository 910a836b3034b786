import type { Logger } from 'pino';
import type WebSocket from 'ws';
import type { Criu } from '../../src/criu/criu.ts';
import { FerryError, toFerryError, type Phase } from '../../src/errors.ts';
import type { Heartbeat } from '../../src/transport/heartbeat.ts';
import { quickRetransmits } from '../../src/transport/native-send.ts';
import type { PeerMessage } from '../../src/protocol/migration.ts';
import type { ControlConnection, PeerHandler } from '../control.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import type { MigrationJournal } from './journal.ts';
import { acknowledged, applyDecision } from './decisions.ts';
import { LocalCopy, type IncomingCopy, type Offer, type PageList } from './incoming.ts';
import { resumeContainer } from './resume.ts';

type Channel = 'files' | 'pages';

/**
 * The states of one incoming migration and where each may go. Every message
 * and every data channel is checked against the state it arrives in; what
 * does not fit is refused (before `prepared` that ends the migration).
 */
export const destinationTransitions = {
  preflight: ['receiving', 'aborting'],
  receiving: ['restoring', 'aborting'],
  restoring: ['prepared', 'postcopy', 'aborting'],
  // Post-copy: the copy runs here while its pages arrive; prepared once the last one is in.
  postcopy: ['prepared', 'aborting'],
  prepared: ['committing', 'aborting'],
  // From committing, aborted only when the committed copy could not be resumed.
  committing: ['done', 'aborted'],
  aborting: ['aborted'],
  done: [],
  aborted: [],
} as const satisfies Record<string, readonly string[]>;
export type DestinationState = keyof typeof destinationTransitions;

export interface DestinationDependencies {
  runtime: ContainerRuntime;
  criu: () => Promise<Criu>;
  journal: MigrationJournal;
  logger: Logger;
  /** Told how each accepted incoming migration ended, for metrics. */
  onOutcome?: (outcome: 'succeeded' | 'rolled-back') => void;
}

/** What a session needs of the source's control connection. */
export interface SessionPeer {
  sendPeer(message: PeerMessage): void;
  readonly open: boolean;
  /** The link's heartbeat, which post-copy lets wait out a cut up to its bound. */
  readonly heartbeat?: Pick<Heartbeat, 'tolerate' | 'expired'>;
  /** The name the source gave when it connected. */
  readonly peerName?: string | undefined;
  /** Cuts the connection now (a rejoined source replaces it). */
  terminate?(): void;
}

/** All incoming migrations of this agent, keyed by migration id. */
export class DestinationSessions implements PeerHandler {
  private readonly deps: DestinationDependencies;
  private readonly sessions = new Map<string, DestinationSession<WebSocket>>();

  constructor(deps: DestinationDependencies) {
    this.deps = deps;
  }

  get size(): number {
    return this.sessions.size;
  }

  async onPeerMessage(message: PeerMessage, connection: ControlConnection): Promise<void> {
    switch (message.type) {
      case 'offer':
        return this.offer(message, connection);
      case 'decision':
        return this.decide(message.migrationId, message.decision, connection);
      case 'transfer-complete':
        return this.withSession(message.migrationId, connection, (session) => session.transferComplete(message.pages));
      case 'abort':
        return this.withSession(message.migrationId, connection, (session) =>
          session.abort(`the source aborted: ${message.error.code}: ${message.error.message}`),
        );
      case 'rejoin':
        return this.rejoin(message.migrationId, connection);
      default:
        // accept, staged, prepared and decided travel the other way.
        return this.withSession(message.migrationId, connection, (session) => session.refuse(`a source does not send ${message.type}`));
    }
  }

  onPeerClosed(connection: ControlConnection): void {
    for (const session of this.sessions.values()) {
      if (session.peer === connection) session.sourceGone(connection);
    }
  }

  onData(socket: WebSocket, migrationId: string, channel: string): void {
    const session = this.sessions.get(migrationId);
    const refusal = !session
      ? 'no such migration'
      : channel !== 'files' && channel !== 'pages'
        ? `no channel ${channel}`
        : session.attach(channel, socket);
    if (refusal) {
      this.deps.logger.warn({ migrationId, channel, reason: refusal }, 'data channel refused');
      socket.close(4004, refusal.slice(0, 100));
    }
  }

  /** A restarted source agent asks to serve a post-copy's pages again; refused unless the copy still waits for them. */
  private async rejoin(migrationId: string, connection: ControlConnection): Promise<void> {
    const session = this.sessions.get(migrationId);
    const refusal = session ? session.rejoin(connection) : `no post-copy of migration ${migrationId} waits here`;
    if (!refusal) return;
    this.deps.logger.warn({ migrationId, reason: refusal }, 'rejoin refused');
    connection.sendPeer({ type: 'abort', migrationId, error: { code: 'NOT_FOUND', message: refusal, phase: 'postcopy' } });
  }

  private async withSession(migrationId: string, connection: ControlConnection, act: (session: DestinationSession<WebSocket>) => Promise<void>): Promise<void> {
    const session = this.sessions.get(migrationId);
    if (session && session.peer === connection) return act(session);
    connection.sendPeer({ type: 'abort', migrationId, error: { code: 'NOT_FOUND', message: `no migration ${migrationId} on this connection` } });
  }

  private async offer(offer: Offer, connection: ControlConnection): Promise<void> {
    // A migration id names one migration, ever: a second offer must not touch the first one's state.
    const refuseKnown = () =>
      connection.sendPeer({
        type: 'abort',
        migrationId: offer.migrationId,
        error: { code: 'BAD_MESSAGE', message: `migration ${offer.migrationId} is already known here`, phase: 'preflight' },
      });
    if (this.sessions.has(offer.migrationId)) return refuseKnown();
    // Reserved before any await, so a second offer with this id cannot slip in meanwhile.
    const forget = () => {
      if (this.sessions.get(offer.migrationId) === session) this.sessions.delete(offer.migrationId);
    };
    const logger = this.deps.logger.child({ migrationId: offer.migrationId, container: offer.spec.name });
    const session = new DestinationSession<WebSocket>({
      migrationId: offer.migrationId,
      peer: connection,
      copy: (signal) => new LocalCopy(this.deps, offer, signal, logger),
      logger,
      forget,
      sourceHost: offer.source.host,
      ...(offer.postcopyGraceMs ? postcopyParts(offer.postcopyGraceMs, logger) : {}),
      ...(this.deps.onOutcome ? { onOutcome: this.deps.onOutcome } : {}),
    });
    this.sessions.set(offer.migrationId, session);
    if (await this.deps.journal.read(offer.migrationId).catch(() => undefined)) {
      forget();
      return refuseKnown();
    }
    logger.info({ phase: 'preflight', from: offer.source.host }, 'phase');
    await session.start();
  }

  /**
   * The source's decision, in the session or re-delivered after a restart
   * or a lost link; the journal makes it idempotent.
   */
  private async decide(migrationId: string, decision: 'commit' | 'abort', connection: ControlConnection): Promise<void> {
    const session = this.sessions.get(migrationId);
    const warnings: string[] = [];
    if (session) await session.decide(decision, warnings);
    else await decideFromJournal(this.deps, migrationId, decision, warnings);
    const entry = await this.deps.journal.read(migrationId).catch(() => undefined);
    const outcome = acknowledged(entry?.role === 'destination' ? entry.state : undefined);
    // Bounded as the protocol bounds them: an oversized warning must not cost the acknowledgement.
    const told = warnings.slice(0, 20).map((warning) => warning.slice(0, 2000));
    connection.sendPeer({ type: 'decided', migrationId, decision: outcome, ...(told.length ? { warnings: told } : {}) });
    // The container already runs: the images go after the source heard so.
    if (outcome === 'commit') await this.deps.journal.removeImages(migrationId).catch(() => undefined);
  }
}

/** Post-copy's bound, and the migration's links made quick to notice a return (quickRetransmits). */
function postcopyParts(boundMs: number, logger: Logger): Pick<SessionParts<WebSocket>, 'postcopyGraceMs' | 'onWaitOutCuts'> {
  return {
    postcopyGraceMs: boundMs,
    // Every peer of an agent's session is a ControlConnection.
    onWaitOutCuts: (peer, channels) =>
      quickRetransmits([(peer as ControlConnection).socket, ...channels], boundMs, (error) =>
        logger.warn({ err: error }, 'could not cap the retransmission timeout; a link back after a cut may be noticed late'),
      ),
  };
}

/** Applies a decision for a migration this agent only knows from its journal (after a restart). */
export async function decideFromJournal(
  deps: DestinationDependencies,
  migrationId: string,
  decision: 'commit' | 'abort',
  warnings: string[] = [],
): Promise<void> {
  const entry = await deps.journal.read(migrationId);
  if (entry?.role !== 'destination') return;
  const action = applyDecision(entry.state, decision);
  if (action === 'already-applied') return;
  if (action === 'resume') {
    await resumeContainer(deps.runtime, entry.container, (message) => {
      deps.logger.error({ migrationId }, message);
      warnings.push(message);
    });
    await deps.journal.update(migrationId, 'done');
    return;
  }
  await deps.runtime.destroy(entry.container);
  await deps.journal.update(migrationId, 'aborted', decision === 'commit' ? 'commit before the copy was prepared' : 'source decided abort');
  await deps.journal.removeImages(migrationId);
}

/** A data channel as the session sees it: something it can cut. */
interface Terminable {
  terminate(): void;
}

export interface SessionParts<S extends Terminable> {
  migrationId: string;
  peer: SessionPeer;
  /** The work on this host; its writers stop once `signal` aborts. */
  copy: (signal: AbortSignal) => IncomingCopy<S>;
  logger: Logger;
  /** Drops the session from the agent's table: once decided, later messages find only the journal. */
  forget: () => void;
  onOutcome?: (outcome: 'succeeded' | 'rolled-back') => void;
  /** Post-copy: how long a silent source is waited for (the offer's bound). */
  postcopyGraceMs?: number;
  /** Post-copy begins (or a source rejoins): the links to make quick to notice a returning link. */
  onWaitOutCuts?: (peer: SessionPeer, channels: S[]) => void;
  /** The host the offer came from: only it may rejoin. */
  sourceHost?: string;
}

/**
 * One incoming migration as a state machine (destinationTransitions):
 * preflight → receiving → restoring → prepared → committing → done, or →
 * aborting → aborted from any state before the commit. What each message and
 * channel does depends only on the state it meets; the work itself is the
 * IncomingCopy's. An abort stops every writer before anything is removed.
 */
export class DestinationSession<S extends Terminable> {
  readonly migrationId: string;
  private source: SessionPeer;
  private readonly parts: SessionParts<S>;
  private readonly logger: Logger;
  private readonly copy: IncomingCopy<S>;
  private readonly stopWriters = new AbortController();
  private state: DestinationState = 'preflight';
  private readonly channels = new Map<Channel, S>();
  /** Everything still writing into this migration's directories; an abort waits for all of it. */
  private readonly writers: Array<Promise<unknown>> = [];
  private filesDone: Promise<void> | undefined;
  private aborted: Promise<void> | undefined;
  private committed: Promise<void> | undefined;
  /** Whether the offer was accepted: only those count as migrations in the metrics. */
  private accepted = false;
  /** Post-copy without its source (the link or the page channel gone): when the wait for its return ends. */
  private sourceWait: NodeJS.Timeout | undefined;
  /** A rejoined source's new pages channel is expected. */
  private awaitingPages = false;
  /** What prepared said, for a source that rejoins after it was sent. */
  private preparedMessage: Extract<PeerMessage, { type: 'prepared' }> | undefined;

  constructor(parts: SessionParts<S>) {
    this.parts = parts;
    this.migrationId = parts.migrationId;
    this.source = parts.peer;
    this.logger = parts.logger;
    this.copy = parts.copy(this.stopWriters.signal);
  }

  /** The source's control connection: the offer's, or a rejoined source's. */
  get peer(): SessionPeer {
    return this.source;
  }

  get current(): DestinationState {
    return this.state;
  }

  private get live(): boolean {
    return this.state !== 'aborting' && this.state !== 'aborted';
  }

  /** The phase a failure in this state is reported in. */
  private get phase(): Phase {
    return this.state === 'restoring' ? 'restore' : this.state === 'postcopy' ? 'postcopy' : 'stream';
  }

  /** From `prepared` on, the source may have committed: nothing here may drop the copy on its own. */
  private get prepared(): boolean {
    return this.state === 'prepared' || this.state === 'committing' || this.state === 'done';
  }

  private transition(to: DestinationState): void {
    const allowed: readonly DestinationState[] = destinationTransitions[this.state];
    if (!allowed.includes(to)) throw new FerryError('BAD_MESSAGE', `migration ${this.migrationId} cannot go from ${this.state} to ${to}`);
    this.logger.debug({ from: this.state, to }, 'state');
    this.state = to;
    if (to !== 'postcopy') this.stopSourceWait();
  }

  /** preflight: the copy's checks, then accept; a refusal tells the source why and leaves nothing here. */
  async start(): Promise<void> {
    try {
      // Tracked: a source that leaves during preflight aborts, and the abort waits for what preflight makes.
      const facts = await this.track(this.copy.preflight());
      if (!this.live) return;
      if (!this.peer.open) throw new FerryError('PEER_GONE', 'the source disconnected during preflight');
      this.transition('receiving');
      this.accepted = true;
      this.peer.sendPeer({ type: 'accept', migrationId: this.migrationId, destination: facts });
    } catch (error) {
      // Whatever refused the offer (a missing CRIU says 'setup'), the migration failed in preflight.
      const cause = toFerryError(error);
      const failure = new FerryError(cause.code, cause.message, { phase: 'preflight', cause, details: cause.details });
      this.logger.warn({ code: failure.code, err: failure }, 'offer refused');
      await this.fail(failure);
    }
  }

  /** receiving: each data channel once; returns why it is refused, if it is. */
  attach(channel: Channel, socket: S): string | undefined {
    if (this.state === 'postcopy' && channel === 'pages' && this.awaitingPages) {
      this.awaitingPages = false;
      this.stopSourceWait();
      this.channels.get('pages')?.terminate();
      this.channels.set('pages', socket);
      this.parts.onWaitOutCuts?.(this.source, [socket]);
      this.copy.rejoinPages(socket);
      return undefined;
    }
    if (this.state !== 'receiving') return `migration is ${this.state}, not receiving`;
    if (this.channels.has(channel)) return `the ${channel} channel is already open`;
    this.channels.set(channel, socket);
    if (channel === 'files') {
      const staged = () => {
        if (this.state === 'receiving' || this.state === 'restoring') this.peer.sendPeer({ type: 'staged', migrationId: this.migrationId });
      };
      this.filesDone = this.track(this.copy.receiveFiles(socket, staged));
      this.filesDone.catch((error: unknown) => this.fail(error));
    } else {
      this.track(this.copy.receivePages(socket)).catch((error: unknown) => this.fail(error));
    }
    return undefined;
  }

  private track<T>(work: Promise<T>): Promise<T> {
    this.writers.push(work.catch(() => undefined));
    return work;
  }

  /** receiving → restoring, with both channels open; prepared once the copy is restored, stopped. */
  async transferComplete(pages: PageList): Promise<void> {
    if (this.state !== 'receiving') return this.refuse(`transfer-complete while ${this.state}`);
    if (!this.filesDone || !this.channels.has('pages')) return this.refuse('transfer-complete before both data channels opened');
    this.transition('restoring');
    try {
      const prepared = await this.track(
        this.copy.restore(
          this.filesDone,
          pages,
          (facts) => {
            if (!this.live) return;
            this.transition('postcopy');
            this.waitOutCuts(true);
            this.peer.sendPeer({ type: 'running', migrationId: this.migrationId, ...facts });
          },
          (reason) => this.awaitSource(reason),
        ),
      );
      this.waitOutCuts(false);
      if (!this.live) return;
      this.transition('prepared');
      this.preparedMessage = { type: 'prepared', migrationId: this.migrationId, ...prepared };
      this.peer.sendPeer(this.preparedMessage);
    } catch (error) {
      this.waitOutCuts(false);
      await this.fail(error);
    }
  }

  /**
   * While the copy runs here on pages still to come, a silent source is
   * waited for up to the bound: the link may only be cut, and the transfer
   * resumes when it returns. Past the bound the link is dropped (sourceGone).
   */
  private waitOutCuts(on: boolean, channels = [...this.channels.values()]): void {
    const bound = this.parts.postcopyGraceMs;
    if (!bound) return;
    if (!on) return this.peer.heartbeat?.tolerate(undefined);
    this.parts.onWaitOutCuts?.(this.source, channels);
    this.peer.heartbeat?.tolerate(bound, {
      silent: (silentMs) => this.logger.warn({ phase: 'postcopy', silentMs, boundMs: bound }, 'post-copy: the source is silent; waiting for the link up to the bound'),
      back: (silentMs) => this.logger.info({ phase: 'postcopy', silentMs }, 'post-copy: the source is heard again; pages resume'),
    });
  }

  /** The source's decision. A commit is only taken once prepared; earlier it is refused and the copy dropped. */
  async decide(decision: 'commit' | 'abort', warnings: string[] = []): Promise<void> {
    // A decision re-delivered while the commit resumes the copy waits for it, and then finds it applied.
    if (this.committed) return this.committed;
    if (decision === 'abort') return this.abort('the source decided abort');
    if (this.state !== 'prepared') {
      this.logger.warn({ state: this.state }, 'commit refused: the copy is not prepared');
      return this.abort(`commit arrived while ${this.state}`);
    }
    this.committed = this.commit(warnings);
    return this.committed;
  }

  private async commit(warnings: string[]): Promise<void> {
    this.transition('committing');
    try {
      await this.copy.resume((message) => {
        this.logger.error(message);
        warnings.push(message);
      });
      this.transition('done');
      this.parts.onOutcome?.('succeeded');
      this.logger.info({ phase: 'confirm' }, 'container running here');
    } catch (error) {
      // The source has committed: nothing can be rolled back, but nothing may stay claimed or half there either.
      this.logger.error({ err: error }, 'the committed copy could not be resumed; it is lost');
      await this.copy.dropCommitted(`resume after the commit failed: ${toFerryError(error).message}`);
      this.transition('aborted');
      this.parts.onOutcome?.('rolled-back');
    } finally {
      this.closeChannels();
      this.copy.release();
      // Forgotten only now, as after an abort: later messages find the journal with the outcome in it.
      this.parts.forget();
    }
  }

  /**
   * The source's control connection closed. Once prepared, only its decision
   * may drop the copy: it may have committed. During post-copy a source that
   * closed (its agent died, say) may come back to serve the pages again: the
   * copy waits for it up to the bound. One that went silent past the bound
   * had its chance.
   */
  sourceGone(connection: SessionPeer = this.source): void {
    // A connection a rejoined source replaced says nothing of the source.
    if (connection !== this.source) return;
    if (this.state === 'prepared') {
      this.logger.warn('source disconnected after prepare; keeping the copy until its decision arrives');
      return;
    }
    if (this.state === 'postcopy' && this.parts.postcopyGraceMs && !this.peer.heartbeat?.expired) {
      this.awaitingPages = false;
      return this.awaitSource('the source disconnected');
    }
    void this.abort('the source disconnected');
  }

  /** Post-copy's page supply broke: the copy waits (its faults held) for the source to rejoin, up to the bound. */
  private awaitSource(reason: string): void {
    const bound = this.parts.postcopyGraceMs;
    if (this.state !== 'postcopy' || !bound) {
      if (this.live && !this.prepared) void this.fail(new FerryError('PEER_GONE', reason, { phase: this.phase }));
      return;
    }
    if (this.sourceWait) return;
    this.logger.warn({ phase: 'postcopy', boundMs: bound, reason }, 'post-copy: the page supply broke; the copy waits for the source to come back');
    this.sourceWait = setTimeout(() => {
      this.sourceWait = undefined;
      void this.fail(new FerryError('PEER_GONE', `${reason}, and did not come back to serve the pages within ${bound} ms`, { phase: 'postcopy' }));
    }, bound);
  }

  private stopSourceWait(): void {
    if (this.sourceWait) clearTimeout(this.sourceWait);
    this.sourceWait = undefined;
  }

  /**
   * The source, on a new connection (its agent restarted, or its old
   * connection was reset), asks to serve the pages again. Taken while the
   * copy waits on them (post-copy) or waits for the decision (prepared), from
   * the offer's host; returns why not otherwise. The old connection, if this
   * side still holds it, is cut: the source has given it up.
   */
  rejoin(connection: SessionPeer): string | undefined {
    if (this.state !== 'postcopy' && this.state !== 'prepared') return `migration ${this.migrationId} is ${this.state} here`;
    if (this.parts.sourceHost !== undefined && connection.peerName !== this.parts.sourceHost) {
      return `only ${this.parts.sourceHost} may rejoin migration ${this.migrationId}`;
    }
    const old = this.source;
    this.source = connection;
    // Replaced first, so that its close is not taken for the new source's.
    if (old !== connection && old.open) old.terminate?.();
    const prepared = this.state === 'prepared';
    this.logger.warn({ phase: 'postcopy', prepared }, 'the source rejoined');
    if (!prepared) {
      this.awaitingPages = true;
      // Its pages channel is made quick to notice a return once it comes (attach).
      this.waitOutCuts(true, []);
    }
    connection.sendPeer({ type: 'rejoined', migrationId: this.migrationId, prepared });
    // It may not have heard it on the old connection.
    if (prepared && this.preparedMessage) connection.sendPeer(this.preparedMessage);
    return undefined;
  }

  /** A message that does not fit the state: before `prepared` it ends the migration; after, it is only logged. */
  async refuse(reason: string): Promise<void> {
    this.logger.warn({ state: this.state, reason }, 'out-of-order message refused');
    if (this.prepared) return;
    await this.fail(new FerryError('BAD_MESSAGE', `refused: ${reason}`, { phase: this.phase }));
  }

  /** Our own failure: the source hears why, then everything here goes. */
  private async fail(error: unknown): Promise<void> {
    if (!this.live || this.prepared) return;
    const failure = toFerryError(error, this.phase);
    this.logger.error({ code: failure.code, phase: failure.phase, err: failure }, 'incoming migration failed');
    this.peer.sendPeer({ type: 'abort', migrationId: this.migrationId, error: failure.toJSON() });
    await this.abort(failure.message);
  }

  /** Stops every writer, then drops what this migration made here. Idempotent; nothing once committing. */
  abort(reason: string): Promise<void> {
    if (this.state === 'committing' || this.state === 'done') return Promise.resolve();
    this.aborted ??= this.discard(reason);
    return this.aborted;
  }

  private async discard(reason: string): Promise<void> {
    this.transition('aborting');
    this.waitOutCuts(false);
    this.stopWriters.abort();
    this.closeChannels();
    await Promise.all(this.writers);
    await this.copy.discard(reason);
    this.transition('aborted');
    // Forgotten only now: a decision that arrives meanwhile waits for this abort instead of racing it from the journal.
    this.parts.forget();
    if (this.accepted) this.parts.onOutcome?.('rolled-back');
    this.logger.warn({ reason }, 'incoming migration discarded');
  }

  private closeChannels(): void {
    for (const socket of this.channels.values()) socket.terminate();
  }
}
