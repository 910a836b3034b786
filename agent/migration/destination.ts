import { constants } from 'node:fs';
import { mkdir, open, symlink, writeFile } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import type { Logger } from 'pino';
import type WebSocket from 'ws';
import type { Criu } from '../../src/criu/criu.ts';
import { compareVersions, parseCriuVersion } from '../../src/criu/version.ts';
import { FerryError, toFerryError } from '../../src/errors.ts';
import { filesStreams, parsePageStreamName, roundStreamName, type PeerMessage } from '../../src/protocol/migration.ts';
import { bulkWriteBuffer, compareDigests } from '../../src/rootfs/digest.ts';
import { removeInside, unpackInto } from '../../src/rootfs/unpack.ts';
import { ChannelReceiver, type IncomingStream } from '../../src/transport/channel.ts';
import { idleGuard } from '../../src/transport/idle.ts';
import { faultActive } from '../../src/faults.ts';
import { freeBytes } from '../../src/host/capacity.ts';
import type { ControlConnection, PeerHandler } from '../control.ts';
import { restoreContainer } from '../runtime/checkpoint.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import type { MigrationJournal } from './journal.ts';
import { acknowledged, applyDecision } from './decisions.ts';
import { resumeContainer } from './resume.ts';
import { roundMs } from './timing.ts';
import { probeAddress, requireBridge } from '../runtime/network.ts';
import { withTimeout } from '../../src/timeout.ts';

type Offer = Extract<PeerMessage, { type: 'offer' }>;
type Channel = 'files' | 'pages';

/** A stream that stops delivering bytes for this long fails the migration. */
const STREAM_IDLE_MS = Number(process.env.FERRY_STREAM_IDLE_MS) || 60_000;

/**
 * The states of one incoming migration and where each may go. Every message
 * and every data channel is checked against the state it arrives in; what
 * does not fit is refused (before `prepared` that ends the migration).
 */
export const destinationTransitions = {
  preflight: ['receiving', 'aborting'],
  receiving: ['restoring', 'aborting'],
  restoring: ['prepared', 'aborting'],
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

/** All incoming migrations of this agent, keyed by migration id. */
export class DestinationSessions implements PeerHandler {
  private readonly deps: DestinationDependencies;
  private readonly sessions = new Map<string, DestinationSession>();

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
      default:
        // accept, staged, prepared and decided travel the other way.
        return this.withSession(message.migrationId, connection, (session) => session.refuse(`a source does not send ${message.type}`));
    }
  }

  onPeerClosed(connection: ControlConnection): void {
    for (const session of this.sessions.values()) {
      if (session.connection === connection) session.sourceGone();
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

  private async withSession(migrationId: string, connection: ControlConnection, act: (session: DestinationSession) => Promise<void>): Promise<void> {
    const session = this.sessions.get(migrationId);
    if (session && session.connection === connection) return act(session);
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
    const session: DestinationSession = new DestinationSession(this.deps, offer, connection, forget);
    this.sessions.set(offer.migrationId, session);
    if (await this.deps.journal.read(offer.migrationId).catch(() => undefined)) {
      forget();
      return refuseKnown();
    }
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

/**
 * One incoming migration as a state machine: preflight → receiving →
 * restoring → prepared → committing → done, or → aborting → aborted from any
 * state before the commit. An abort stops every writer before cleaning up.
 */
class DestinationSession {
  readonly migrationId: string;
  readonly connection: ControlConnection;
  readonly logger: Logger;
  private state: DestinationState = 'preflight';
  private readonly deps: DestinationDependencies;
  private readonly offer: Offer;
  private criu!: Criu;
  /** Releases the container name; set once preflight claimed it. */
  private releaseName: (() => void) | undefined;
  private readonly channels = new Map<Channel, WebSocket>();
  /** Everything still writing into this migration's directories; an abort waits for all of it. */
  private readonly writers: Array<Promise<unknown>> = [];
  private filesDone: Promise<void> | undefined;
  private readonly receivedPages = new Map<string, string>();
  /** Where the files channel is, for a timeout's message. */
  private filesAt = 'waiting for the rootfs stream';
  private filesFinished = false;
  private pagesFailure: unknown;
  private pagesChanged: () => void = () => undefined;
  private aborted: Promise<void> | undefined;
  /** Whether the offer was accepted: only those count as migrations in the metrics. */
  private accepted = false;
  private readonly forget: () => void;

  constructor(deps: DestinationDependencies, offer: Offer, connection: ControlConnection, forget: () => void) {
    this.deps = deps;
    this.forget = forget;
    this.offer = offer;
    this.migrationId = offer.migrationId;
    this.connection = connection;
    this.logger = deps.logger.child({ migrationId: offer.migrationId, container: offer.spec.name });
  }

  private get name(): string {
    return this.offer.spec.name;
  }

  private get directory(): string {
    return this.deps.journal.directory(this.migrationId);
  }

  private get imagesDir(): string {
    return join(this.directory, 'images');
  }

  private get live(): boolean {
    return this.state !== 'aborting' && this.state !== 'aborted';
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
  }

  /** Preflight, then accept; a refusal tells the source why and leaves nothing here. */
  async start(): Promise<void> {
    try {
      // Tracked: a source that leaves during preflight aborts, and the abort waits for what preflight makes.
      const facts = await this.track(this.preflight());
      if (!this.live) return;
      if (!this.connection.open) throw new FerryError('PEER_GONE', 'the source disconnected during preflight');
      this.transition('receiving');
      this.accepted = true;
      this.connection.sendPeer({
        type: 'accept',
        migrationId: this.migrationId,
        destination: { host: this.deps.runtime.hostName, ...facts },
      });
    } catch (error) {
      // Whatever refused the offer (a missing CRIU says 'setup'), the migration failed in preflight.
      const cause = toFerryError(error);
      const failure = new FerryError(cause.code, cause.message, { phase: 'preflight', cause, details: cause.details });
      this.logger.warn({ code: failure.code, err: failure }, 'offer refused');
      await this.fail(failure);
    }
  }

  /** Everything that can be checked before the source freezes anything. */
  private async preflight(): Promise<{ criuVersion: string; memoryTracking: boolean; freeBytes: number }> {
    this.logger.info({ phase: 'preflight', from: this.offer.source.host }, 'phase');
    this.criu = await this.deps.criu();
    const memoryTracking = await this.criu.memoryTracking();
    const sourceVersion = parseCriuVersion(`Version: ${this.offer.source.criuVersion}`);
    if (!sourceVersion || compareVersions(this.criu.version, sourceVersion) < 0) {
      throw new FerryError(
        'INCOMPATIBLE',
        `CRIU ${this.criu.version.text} here is older than the source's ${this.offer.source.criuVersion}`,
        { phase: 'preflight' },
      );
    }
    const sockets = this.offer.sockets;
    if (sockets && sockets.tcpListening + sockets.tcpConnected + sockets.udp > 0) {
      const problem = await this.criu.socketCheckpoint();
      if (problem) {
        throw new FerryError('INCOMPATIBLE', `the container holds TCP/UDP sockets, and CRIU ${this.criu.version.text} here cannot checkpoint them on this kernel (${problem}); CRIU >= 4.2 is needed`, { phase: 'preflight' });
      }
    }
    const network = this.offer.spec.network;
    if (network && !this.offer.spec.privateNetwork) {
      throw new FerryError('BAD_MESSAGE', 'a container with its own address must have its own network namespace (privateNetwork)', { phase: 'preflight' });
    }
    if (network) {
      const bridge = await requireBridge(this.deps.runtime.bridge, 'preflight');
      // The container itself still answers from the source: only another MAC is a conflict.
      await probeAddress(bridge, network.address, 'preflight', network.mac);
    }
    this.releaseName = await this.deps.runtime.claim(this.name);
    // The journal first: from here a restarted agent knows what to remove.
    await this.deps.journal.write({ migrationId: this.migrationId, role: 'destination', container: this.name, state: 'started' });
    await this.deps.runtime.store.create(this.name);
    await mkdir(this.imagesDir, { recursive: true, mode: 0o700 });
    const cpuinfoDir = join(this.directory, 'cpuinfo');
    await mkdir(cpuinfoDir, { recursive: true });
    await writeFile(join(cpuinfoDir, 'cpuinfo.img'), Buffer.from(this.offer.cpuinfo, 'base64'));
    const cpuProblem = await this.criu.cpuinfoCheck(cpuinfoDir);
    if (cpuProblem) throw new FerryError('INCOMPATIBLE', `CPU of this host cannot run the source's images: ${cpuProblem}`);
    // Every entry costs at least a block on disk: a declared million empty files must fit too.
    const entryBytes = (this.offer.needs.rootfsEntries ?? 0) * 4096;
    const needed = Math.ceil((this.offer.needs.rootfsBytes + this.offer.needs.memoryBytes + entryBytes) * 1.2);
    const free = await freeBytes(this.deps.runtime.store.root);
    if (free < needed) throw new FerryError('NO_SPACE', `needs ${needed} bytes in the state directory, ${free} free`);
    await this.deps.runtime.cgroup(this.name).create();
    if (this.offer.spec.privateNetwork) await canCreateNetworkNamespace();
    return { criuVersion: this.criu.version.text, memoryTracking, freeBytes: free };
  }

  /** A data channel of this migration; returns why it is refused, if it is. */
  attach(channel: Channel, socket: WebSocket): string | undefined {
    if (this.state !== 'receiving') return `migration is ${this.state}, not receiving`;
    if (this.channels.has(channel)) return `the ${channel} channel is already open`;
    this.channels.set(channel, socket);
    if (channel === 'files') {
      this.filesDone = this.track(this.receiveFiles(socket));
      this.filesDone.catch((error: unknown) => this.fail(error));
    } else {
      const pages = this.track(this.receivePages(socket));
      pages.catch((error: unknown) => {
        this.pagesFailure = error;
        this.pagesChanged();
        void this.fail(error);
      });
    }
    return undefined;
  }

  private track<T>(work: Promise<T>): Promise<T> {
    this.writers.push(work.catch(() => undefined));
    return work;
  }

  /** Where pre-dump round N's images go; CRIU finds them through each directory's `parent` link. */
  private roundDirectory(round: number): string {
    return join(this.directory, 'rounds', String(round));
  }

  /**
   * The files channel's streams, in this order: the rootfs (pass 1, sent
   * while the container ran), the pre-dump rounds' images, the rootfs final
   * pass (what changed by the freeze, and deletions), then the final dump's
   * non-page images; each is unpacked while it arrives.
   */
  private async receiveFiles(socket: WebSocket): Promise<void> {
    const receiver = new ChannelReceiver(socket);
    const rootfs = this.deps.runtime.store.rootfs(this.name);
    await this.unpackStream(await receiver.next(), filesStreams.rootfs, rootfs);
    this.ensureLive();
    this.connection.sendPeer({ type: 'staged', migrationId: this.migrationId });
    let stream = await this.nextStream(receiver);
    let rounds = 0;
    while (stream.name === roundStreamName(rounds + 1)) {
      rounds += 1;
      const directory = this.roundDirectory(rounds);
      await mkdir(directory, { recursive: true });
      await this.unpackStream(stream, stream.name, directory, { images: true });
      // The chain's links are made here, never taken from the source (O_EXCL-like: symlink fails if one exists).
      if (rounds > 1) await symlink(`../${rounds - 1}`, join(directory, 'parent'));
      stream = await this.nextStream(receiver);
    }
    await this.unpackStream(stream, filesStreams.rootfsDelta, rootfs);
    await this.unpackStream(await this.nextStream(receiver), filesStreams.images, this.imagesDir, { images: true });
    receiver.close();
    if (rounds > 0) await symlink(`../rounds/${rounds}`, join(this.imagesDir, 'parent'));
    this.filesFinished = true;
  }

  private async nextStream(receiver: ChannelReceiver): Promise<IncomingStream> {
    const stream = await receiver.next();
    this.ensureLive();
    return stream;
  }

  /** A writer that finds the migration aborted stops before writing anything more. */
  private ensureLive(): void {
    if (!this.live) throw new FerryError('CANCELLED', 'the migration was aborted', { phase: 'stream' });
  }

  private async unpackStream(stream: IncomingStream, expected: string, into: string, options: { images?: boolean } = {}): Promise<void> {
    this.ensureLive();
    this.filesAt = `unpacking the ${expected} stream`;
    if (stream.name !== expected) throw new FerryError('BAD_MESSAGE', `expected the ${expected} stream, got ${stream.name}`, { phase: 'stream' });
    if (stream.deleted.length && expected !== filesStreams.rootfsDelta) {
      throw new FerryError('BAD_MESSAGE', `the ${expected} stream may not delete anything`, { phase: 'stream' });
    }
    for (const path of stream.deleted) removeInside(into, path);
    const digests = new Map<string, string>();
    const body = idleGuard(stream.body, STREAM_IDLE_MS, `the ${expected} stream`, 'stream');
    const limits = this.streamLimits(options.images === true);
    const [, end] = await Promise.all([unpackInto(into, body, digests, { flatFilesOnly: options.images, limits }), stream.end]);
    const problems = compareDigests(new Map(Object.entries(end.files ?? {})), digests);
    if (problems.length) {
      throw new FerryError('CHECKSUM_MISMATCH', `${expected}: ${problems[0]}`, { phase: 'stream', details: problems.slice(0, 20) });
    }
    this.logger.info({ stream: expected, bytes: end.bytes }, 'stream received');
    this.filesAt = `waiting for the stream after ${expected}`;
  }

  /**
   * What one stream may hold, from the sizes the offer declared (with room
   * for a tree that grew since): a stream may not become a disk bomb.
   */
  private streamLimits(images: boolean): { maxBytes: number; maxEntries?: number } {
    const slack = 64 * 1024 * 1024;
    if (images) return { maxBytes: this.offer.needs.memoryBytes + slack, maxEntries: 100_000 };
    const entries = this.offer.needs.rootfsEntries;
    return { maxBytes: Math.ceil(this.offer.needs.rootfsBytes * 1.2) + slack, ...(entries !== undefined ? { maxEntries: Math.ceil(entries * 1.2) + 10_000 } : {}) };
  }

  /** Page images, each written as it arrives; the source lists them in transfer-complete. */
  private async receivePages(socket: WebSocket): Promise<void> {
    const receiver = new ChannelReceiver(socket);
    for (;;) {
      const stream = await this.nextStream(receiver);
      const image = parsePageStreamName(stream.name);
      if (!image) throw new FerryError('BAD_MESSAGE', `not a page image name: ${stream.name}`, { phase: 'stream' });
      const directory = image.round === undefined ? this.imagesDir : this.roundDirectory(image.round);
      await mkdir(directory, { recursive: true });
      const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
      const handle = await open(join(directory, image.file), flags, 0o600);
      const body = idleGuard(stream.body, STREAM_IDLE_MS, `page image ${stream.name}`, 'stream');
      const [, end] = await Promise.all([pipeline(body, handle.createWriteStream({ highWaterMark: bulkWriteBuffer })), stream.end]);
      this.receivedPages.set(stream.name, end.digest);
      this.pagesChanged();
    }
  }

  /** Resolves once every page image the source sent is here with the same digest. */
  private async allPages(expected: Array<{ name: string; digest: string }>): Promise<void> {
    for (;;) {
      this.ensureLive();
      if (this.pagesFailure) throw toFerryError(this.pagesFailure, 'stream');
      const missing = expected.filter((image) => !this.receivedPages.has(image.name));
      const wrong = expected.find((image) => this.receivedPages.has(image.name) && this.receivedPages.get(image.name) !== image.digest);
      if (wrong) throw new FerryError('CHECKSUM_MISMATCH', `page image ${wrong.name} differs from what the source sent`, { phase: 'stream' });
      if (!missing.length) return;
      await new Promise<void>((resolve) => (this.pagesChanged = resolve));
    }
  }

  /** transfer-complete: only while receiving, with both channels open. */
  async transferComplete(pages: Array<{ name: string; digest: string }>): Promise<void> {
    if (this.state !== 'receiving') return this.refuse(`transfer-complete while ${this.state}`);
    if (!this.filesDone || !this.channels.has('pages')) return this.refuse('transfer-complete before both data channels opened');
    this.transition('restoring');
    const restoring = this.track(this.restore(this.filesDone, pages));
    await restoring.catch((error: unknown) => this.fail(error));
  }

  private async restore(filesDone: Promise<void>, pages: Array<{ name: string; digest: string }>): Promise<void> {
    const asked = performance.now();
    await withTimeout(Promise.all([filesDone, this.allPages(pages)]), 60_000, 'receiving the images', 'stream').catch((error: unknown) => {
      const failure = toFerryError(error, 'stream');
      if (failure.code !== 'TIMEOUT') throw failure;
      const missing = pages.filter((image) => !this.receivedPages.has(image.name)).map((image) => image.name);
      const files = this.filesFinished ? 'files channel done' : `files channel ${this.filesAt}`;
      throw new FerryError('TIMEOUT', `${failure.message} (${files}; page images missing: ${missing.join(', ') || 'none'})`, { phase: 'stream' });
    });
    this.ensureLive();
    this.logger.info({ phase: 'restore' }, 'phase');
    // Test fault: a real criu restore failure, from a pstree.img that is not a CRIU image.
    // (Deleting it made CRIU 4.1 crash with SIGSEGV, leaving no error line to report.)
    if (faultActive('fail-restore')) await writeFile(join(this.imagesDir, 'pstree.img'), 'not a CRIU image\n');
    const started = performance.now();
    const { restoreStats, timing } = await restoreContainer(this.deps.runtime, this.criu, {
      spec: this.offer.spec,
      history: this.offer.history,
      imagesDir: this.imagesDir,
      rootfs: this.deps.runtime.store.rootfs(this.name),
      leaveStopped: true,
      logFile: join(this.directory, 'restore.log'),
      migrationId: this.migrationId,
    });
    this.ensureLive();
    const restored = performance.now();
    await this.deps.journal.update(this.migrationId, 'prepared');
    this.transition('prepared');
    const now = performance.now();
    this.connection.sendPeer({
      type: 'prepared',
      migrationId: this.migrationId,
      restoreMs: Math.round(now - started),
      ...(restoreStats ? { restoreStats } : {}),
      timing: { waitMs: roundMs(started - asked), checkMs: timing.checkMs, criuMs: timing.criuMs, recordMs: roundMs(timing.afterMs + now - restored) },
    });
  }

  /** The source's decision. A commit is only taken once prepared; earlier it is refused and the copy dropped. */
  async decide(decision: 'commit' | 'abort', warnings: string[] = []): Promise<void> {
    if (decision === 'abort') return this.abort('the source decided abort');
    if (this.state !== 'prepared') {
      this.logger.warn({ state: this.state }, 'commit refused: the copy is not prepared');
      return this.abort(`commit arrived while ${this.state}`);
    }
    this.transition('committing');
    this.forget();
    try {
      await resumeContainer(this.deps.runtime, this.name, (message) => {
        this.logger.error(message);
        warnings.push(message);
      });
      await this.deps.journal.update(this.migrationId, 'done');
      this.transition('done');
      this.deps.onOutcome?.('succeeded');
      this.logger.info({ phase: 'confirm' }, 'container running here');
    } catch (error) {
      // The source has committed: nothing can be rolled back, but nothing may stay claimed or half there either.
      this.logger.error({ err: error }, 'the committed copy could not be resumed; it is lost');
      await this.deps.runtime.destroy(this.name).catch(() => undefined);
      await this.deps.journal.update(this.migrationId, 'aborted', `resume after the commit failed: ${toFerryError(error).message}`).catch(() => undefined);
      this.transition('aborted');
      this.deps.onOutcome?.('rolled-back');
    } finally {
      this.closeChannels();
      this.releaseName?.();
      this.releaseName = undefined;
    }
  }

  /** The source's control connection closed. Once prepared, only its decision may drop the copy: it may have committed. */
  sourceGone(): void {
    if (this.state === 'prepared') {
      this.logger.warn('source disconnected after prepare; keeping the stopped copy until its decision arrives');
      return;
    }
    void this.abort('the source disconnected');
  }

  /** A message that does not fit the state: before `prepared` it ends the migration; after, it is only logged. */
  async refuse(reason: string): Promise<void> {
    this.logger.warn({ state: this.state, reason }, 'out-of-order message refused');
    if (this.prepared) return;
    await this.fail(new FerryError('BAD_MESSAGE', `refused: ${reason}`, { phase: this.state === 'restoring' ? 'restore' : 'stream' }));
  }

  /** Our own failure: the source hears why, then everything here goes. */
  private async fail(error: unknown): Promise<void> {
    if (!this.live || this.prepared) return;
    const failure = toFerryError(error, this.state === 'restoring' ? 'restore' : 'stream');
    this.logger.error({ code: failure.code, phase: failure.phase, err: failure }, 'incoming migration failed');
    this.connection.sendPeer({ type: 'abort', migrationId: this.migrationId, error: failure.toJSON() });
    await this.abort(failure.message);
  }

  /** Stops every writer, then drops what this migration made here: tasks, cgroup, rootfs, images. Idempotent. */
  abort(reason: string): Promise<void> {
    if (this.state === 'committing' || this.state === 'done') return Promise.resolve();
    this.aborted ??= this.discard(reason);
    return this.aborted;
  }

  private async discard(reason: string): Promise<void> {
    this.transition('aborting');
    this.forget();
    this.closeChannels();
    this.pagesChanged();
    await Promise.all(this.writers);
    if (this.releaseName) {
      await this.deps.runtime.destroy(this.name).catch((error: unknown) => this.logger.error({ err: error }, 'cleanup failed'));
      this.releaseName();
      this.releaseName = undefined;
    }
    await this.deps.journal.update(this.migrationId, 'aborted', reason).catch(() => undefined);
    await this.deps.journal.removeImages(this.migrationId).catch(() => undefined);
    this.transition('aborted');
    if (this.accepted) this.deps.onOutcome?.('rolled-back');
    this.logger.warn({ reason }, 'incoming migration discarded');
  }

  private closeChannels(): void {
    for (const socket of this.channels.values()) socket.terminate();
  }
}

/** The container brings its own network namespace: this host must be able to make one. */
async function canCreateNetworkNamespace(): Promise<void> {
  const result = await execa('unshare', ['--net', 'true'], { reject: false });
  if (result.exitCode !== 0) {
    throw new FerryError('INCOMPATIBLE', `this host cannot create network namespaces: ${result.stderr}`, { phase: 'preflight' });
  }
}
