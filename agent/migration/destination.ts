import { constants, rmSync } from 'node:fs';
import { mkdir, open, symlink, writeFile } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import type { Logger } from 'pino';
import type WebSocket from 'ws';
import { compareVersions, parseCriuVersion, type Criu } from '../../src/criu/criu.ts';
import { FerryError, toFerryError } from '../../src/errors.ts';
import type { PeerMessage } from '../../src/protocol/migration.ts';
import { bulkWriteBuffer, compareDigests } from '../../src/rootfs/digest.ts';
import { resolveInside, unpackInto } from '../../src/rootfs/unpack.ts';
import { ChannelReceiver, type IncomingStream } from '../../src/transport/channel.ts';
import { parsePageStreamName } from '../../src/criu/follow.ts';
import { faultActive } from '../../src/transport/faults.ts';
import { freeBytes } from '../../src/host/doctor.ts';
import type { ControlConnection, PeerHandler } from '../control.ts';
import { restoreContainer } from '../runtime/checkpoint.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import type { MigrationJournal } from './journal.ts';
import { resumeContainer } from './resume.ts';
import { withTimeout } from './timing.ts';

type Offer = Extract<PeerMessage, { type: 'offer' }>;

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
    if (message.type === 'offer') return this.offer(message, connection);
    if (message.type === 'decision') return this.decide(message.migrationId, message.decision, connection);
    const session = this.sessions.get(message.migrationId);
    if (!session) {
      connection.send({
        type: 'abort',
        migrationId: message.migrationId,
        error: { code: 'NOT_FOUND', message: `no migration ${message.migrationId} here` },
      });
      return;
    }
    if (message.type === 'transfer-complete') await session.restore(message.pages);
    else if (message.type === 'abort') await this.finish(session, 'abort', message.error.message);
  }

  onPeerClosed(connection: ControlConnection): void {
    for (const session of this.sessions.values()) {
      if (session.connection !== connection) continue;
      // Once prepared, only the source's decision may drop the copy: it may have committed.
      if (session.state === 'prepared') {
        session.logger.warn('source disconnected after prepare; keeping the stopped copy until its decision arrives');
      } else {
        void this.finish(session, 'abort', 'source disconnected');
      }
    }
  }

  onData(socket: WebSocket, migrationId: string, channel: string): void {
    const session = this.sessions.get(migrationId);
    if (!session || (channel !== 'files' && channel !== 'pages')) {
      socket.close(4004, 'no such migration channel');
      return;
    }
    session.attach(channel, socket);
  }

  private async offer(offer: Offer, connection: ControlConnection): Promise<void> {
    const session = new DestinationSession(this.deps, offer, connection, () => this.sessions.delete(offer.migrationId));
    try {
      await session.preflight();
      // A source that left during preflight was never seen by onPeerClosed: drop what preflight made.
      if (!connection.open) throw new FerryError('PEER_GONE', 'the source disconnected during preflight');
      this.sessions.set(offer.migrationId, session);
      connection.send({
        type: 'accept',
        migrationId: offer.migrationId,
        destination: { host: this.deps.runtime.hostName, criuVersion: session.criuVersion, memoryTracking: session.memoryTracking, freeBytes: session.freeBytes },
      });
    } catch (error) {
      // Whatever refused the offer (a missing CRIU says 'setup'), the migration failed in preflight.
      const cause = toFerryError(error);
      const failure = new FerryError(cause.code, cause.message, { phase: 'preflight', cause, details: cause.details });
      session.logger.warn({ code: failure.code, err: failure }, 'offer refused');
      await session.discard();
      connection.send({ type: 'abort', migrationId: offer.migrationId, error: failure.toJSON() });
    }
  }

  /**
   * The source's decision, in the session or re-delivered after a restart;
   * the journal makes it idempotent.
   */
  private async decide(migrationId: string, decision: 'commit' | 'abort', connection: ControlConnection): Promise<void> {
    const session = this.sessions.get(migrationId);
    if (session) {
      await this.finish(session, decision, 'source decided abort');
    } else {
      await decideFromJournal(this.deps, migrationId, decision);
    }
    const entry = await this.deps.journal.read(migrationId);
    const outcome = entry?.state === 'done' ? 'commit' : 'abort';
    connection.send({ type: 'decided', migrationId, decision: outcome });
    // The container already runs: the images go after the source heard so.
    if (outcome === 'commit') await (session ? session.dropImages() : this.deps.journal.removeImages(migrationId).catch(() => undefined));
  }

  private async finish(session: DestinationSession, decision: 'commit' | 'abort', reason: string): Promise<void> {
    this.sessions.delete(session.migrationId);
    if (decision === 'commit') await session.commit();
    else await session.discard(reason);
    session.settle(decision === 'commit' ? 'succeeded' : 'rolled-back');
  }
}

/** Applies a decision for a migration this agent only knows from its journal (after a restart). */
export async function decideFromJournal(
  deps: DestinationDependencies,
  migrationId: string,
  decision: 'commit' | 'abort',
): Promise<void> {
  const entry = await deps.journal.read(migrationId);
  if (!entry || entry.role !== 'destination' || entry.state === 'done' || entry.state === 'aborted') return;
  if (decision === 'commit' && entry.state === 'prepared') {
    await resumeContainer(deps.runtime, entry.container);
    await deps.journal.update(migrationId, 'done');
    return;
  }
  await deps.runtime.destroy(entry.container);
  await deps.journal.update(migrationId, 'aborted', 'source decided abort');
  await deps.journal.removeImages(migrationId);
}

/** One incoming migration: preflight, receive, restore stopped, then commit or discard. */
class DestinationSession {
  readonly migrationId: string;
  readonly connection: ControlConnection;
  readonly logger: Logger;
  state: 'receiving' | 'prepared' = 'receiving';
  criuVersion = '';
  memoryTracking = false;
  freeBytes = 0;
  private readonly deps: DestinationDependencies;
  private readonly offer: Offer;
  private criu!: Criu;
  private releaseName: (() => void) | undefined;
  private files: Promise<void> | undefined;
  private pages: Promise<void> | undefined;
  private readonly receivedPages = new Map<string, string>();
  private pagesArrived: () => void = () => undefined;
  private channels: WebSocket[] = [];

  /** Drops this session from the agent's table once it failed on its own. */
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

  /** Everything that can be checked before the source freezes anything. */
  async preflight(): Promise<void> {
    this.logger.info({ phase: 'preflight', from: this.offer.source.host }, 'phase');
    this.criu = await this.deps.criu();
    this.criuVersion = this.criu.version.text;
    this.memoryTracking = await this.criu.memoryTracking();
    const sourceVersion = parseCriuVersion(`Version: ${this.offer.source.criuVersion}`);
    if (!sourceVersion || compareVersions(this.criu.version, sourceVersion) < 0) {
      throw new FerryError(
        'INCOMPATIBLE',
        `CRIU ${this.criu.version.text} here is older than the source's ${this.offer.source.criuVersion}`,
        { phase: 'preflight' },
      );
    }
    this.releaseName = await this.deps.runtime.claim(this.name);
    await mkdir(this.imagesDir, { recursive: true });
    const cpuinfoDir = join(this.directory, 'cpuinfo');
    await mkdir(cpuinfoDir, { recursive: true });
    await writeFile(join(cpuinfoDir, 'cpuinfo.img'), Buffer.from(this.offer.cpuinfo, 'base64'));
    const cpuProblem = await this.criu.cpuinfoCheck(cpuinfoDir);
    if (cpuProblem) throw new FerryError('INCOMPATIBLE', `CPU of this host cannot run the source's images: ${cpuProblem}`);
    const needed = Math.ceil((this.offer.needs.rootfsBytes + this.offer.needs.memoryBytes) * 1.2);
    const free = await freeBytes(this.deps.runtime.store.root);
    this.freeBytes = free;
    if (free < needed) throw new FerryError('NO_SPACE', `needs ${needed} bytes in the state directory, ${free} free`);
    await this.deps.runtime.cgroup(this.name).create();
    if (this.offer.spec.privateNetwork) await canCreateNetworkNamespace();
    await this.deps.journal.write({
      migrationId: this.migrationId,
      role: 'destination',
      container: this.name,
      state: 'started',
    });
  }

  attach(channel: 'files' | 'pages', socket: WebSocket): void {
    this.channels.push(socket);
    const work = channel === 'files' ? this.receiveFiles(socket) : this.receivePages(socket);
    work.catch((error: unknown) => this.fail(error));
    if (channel === 'files') this.files = work;
    else this.pages = work;
  }

  /** Where pre-dump round N's images go; CRIU finds them through each directory's `parent` link. */
  private roundDirectory(round: number): string {
    return join(this.directory, 'rounds', String(round));
  }

  /**
   * The rootfs (pass 1, sent while the container ran), the pre-dump rounds'
   * images in order, the rootfs final pass (what changed by the freeze, and
   * deletions), then the final dump's non-page images; each is unpacked
   * while it arrives.
   */
  private async receiveFiles(socket: WebSocket): Promise<void> {
    const receiver = new ChannelReceiver(socket);
    const rootfs = this.deps.runtime.store.rootfs(this.name);
    await this.unpackStream(await receiver.next(), 'rootfs', rootfs);
    this.connection.send({ type: 'staged', migrationId: this.migrationId });
    let stream = await receiver.next();
    let rounds = 0;
    while (stream.name === `round-${rounds + 1}`) {
      rounds += 1;
      const directory = this.roundDirectory(rounds);
      await mkdir(directory, { recursive: true });
      await this.unpackStream(stream, stream.name, directory, { images: true });
      // The chain's links are made here, never taken from the source (O_EXCL-like: symlink fails if one exists).
      if (rounds > 1) await symlink(`../${rounds - 1}`, join(directory, 'parent'));
      stream = await receiver.next();
    }
    await this.unpackStream(stream, 'rootfs-delta', rootfs);
    await this.unpackStream(await receiver.next(), 'images', this.imagesDir, { images: true });
    if (rounds > 0) await symlink(`../rounds/${rounds}`, join(this.imagesDir, 'parent'));
  }

  private async unpackStream(stream: IncomingStream, expected: string, into: string, options: { images?: boolean } = {}): Promise<void> {
    if (stream.name !== expected) throw new FerryError('BAD_MESSAGE', `expected the ${expected} stream, got ${stream.name}`);
    if (stream.deleted.length && expected !== 'rootfs-delta') {
      throw new FerryError('BAD_MESSAGE', `the ${expected} stream may not delete anything`, { phase: 'stream' });
    }
    for (const path of stream.deleted) rmSync(resolveInside(into, path), { recursive: true, force: true });
    const digests = new Map<string, string>();
    const [, end] = await Promise.all([unpackInto(into, stream.body, digests, { flatFilesOnly: options.images }), stream.end]);
    const problems = compareDigests(new Map(Object.entries(end.files ?? {})), digests);
    if (problems.length) {
      throw new FerryError('CHECKSUM_MISMATCH', `${expected}: ${problems[0]}`, { phase: 'stream', details: problems.slice(0, 20) });
    }
    this.logger.info({ stream: expected, bytes: end.bytes }, 'stream received');
  }

  /** Page images, each written as it arrives; the source lists them in transfer-complete. */
  private async receivePages(socket: WebSocket): Promise<void> {
    const receiver = new ChannelReceiver(socket);
    for (;;) {
      const stream = await receiver.next();
      const image = parsePageStreamName(stream.name);
      if (!image) throw new FerryError('BAD_MESSAGE', `not a page image name: ${stream.name}`);
      const directory = image.round === undefined ? this.imagesDir : this.roundDirectory(image.round);
      await mkdir(directory, { recursive: true });
      const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
      const handle = await open(join(directory, image.file), flags, 0o600);
      const [, end] = await Promise.all([pipeline(stream.body, handle.createWriteStream({ highWaterMark: bulkWriteBuffer })), stream.end]);
      this.receivedPages.set(stream.name, end.sha256);
      this.pagesArrived();
    }
  }

  /** Resolves once every page image the source sent is here with the same sha256. */
  private async allPages(expected: Array<{ name: string; sha256: string }>): Promise<void> {
    for (;;) {
      const missing = expected.filter((image) => !this.receivedPages.has(image.name));
      const wrong = expected.find((image) => this.receivedPages.has(image.name) && this.receivedPages.get(image.name) !== image.sha256);
      if (wrong) throw new FerryError('CHECKSUM_MISMATCH', `page image ${wrong.name} differs from what the source sent`, { phase: 'stream' });
      if (!missing.length) return;
      await new Promise<void>((resolve) => (this.pagesArrived = resolve));
    }
  }

  async restore(pages: Array<{ name: string; sha256: string }>): Promise<void> {
    try {
      if (!this.files || !this.pages) throw new FerryError('BAD_MESSAGE', 'restore requested before all data channels opened');
      await withTimeout(Promise.all([this.files, this.allPages(pages)]), 60_000, 'receiving the images', 'stream');
      this.logger.info({ phase: 'restore' }, 'phase');
      // Test fault: a real criu restore failure, from a pstree.img that is not a CRIU image.
      // (Deleting it made CRIU 4.1 crash with SIGSEGV, leaving no error line to report.)
      if (faultActive('fail-restore')) await writeFile(join(this.imagesDir, 'pstree.img'), 'not a CRIU image\n');
      const started = performance.now();
      const { restoreStats } = await restoreContainer(this.deps.runtime, this.criu, {
        spec: this.offer.spec,
        history: this.offer.history,
        imagesDir: this.imagesDir,
        rootfs: this.deps.runtime.store.rootfs(this.name),
        leaveStopped: true,
        logFile: join(this.directory, 'restore.log'),
        migrationId: this.migrationId,
      });
      await this.deps.journal.update(this.migrationId, 'prepared');
      this.state = 'prepared';
      this.connection.send({
        type: 'prepared',
        migrationId: this.migrationId,
        restoreMs: Math.round(performance.now() - started),
        ...(restoreStats ? { restoreStats } : {}),
      });
    } catch (error) {
      await this.fail(error);
    }
  }

  async commit(): Promise<void> {
    await resumeContainer(this.deps.runtime, this.name);
    await this.deps.journal.update(this.migrationId, 'done');
    this.closeChannels();
    this.releaseName?.();
    this.logger.info({ phase: 'confirm' }, 'container running here');
  }

  async dropImages(): Promise<void> {
    await this.deps.journal.removeImages(this.migrationId).catch((error: unknown) => this.logger.warn({ err: error }, 'could not remove images'));
  }

  /** Drops everything this migration made here: tasks, cgroup, rootfs, images. */
  async discard(reason?: string): Promise<void> {
    this.closeChannels();
    // A failure here and the source's abort may both discard: only the first destroys.
    const release = this.releaseName;
    this.releaseName = undefined;
    if (release) {
      await this.deps.runtime.destroy(this.name).catch((error: unknown) => this.logger.error({ err: error }, 'cleanup failed'));
      release();
    }
    await this.deps.journal.update(this.migrationId, 'aborted', reason).catch(() => undefined);
    await this.deps.journal.removeImages(this.migrationId).catch(() => undefined);
    if (reason) this.logger.warn({ reason }, 'incoming migration discarded');
  }

  private failed = false;
  private settled = false;

  /** Reports the outcome once, however many paths end the session. */
  settle(outcome: 'succeeded' | 'rolled-back'): void {
    if (this.settled) return;
    this.settled = true;
    this.deps.onOutcome?.(outcome);
  }

  private async fail(error: unknown): Promise<void> {
    if (this.failed || this.state === 'prepared') return;
    this.failed = true;
    const failure = toFerryError(error, 'restore');
    this.logger.error({ code: failure.code, phase: failure.phase, err: failure }, 'incoming migration failed');
    this.connection.send({ type: 'abort', migrationId: this.migrationId, error: failure.toJSON() });
    this.forget();
    await this.discard(failure.message);
    this.settle('rolled-back');
  }

  private closeChannels(): void {
    for (const socket of this.channels) socket.close();
  }
}

/** The container brings its own network namespace: this host must be able to make one. */
async function canCreateNetworkNamespace(): Promise<void> {
  const result = await execa('unshare', ['--net', 'true'], { reject: false });
  if (result.exitCode !== 0) {
    throw new FerryError('INCOMPATIBLE', `this host cannot create network namespaces: ${result.stderr}`, { phase: 'preflight' });
  }
}
