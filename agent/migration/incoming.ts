import { constants } from 'node:fs';
import { mkdir, open, symlink, writeFile } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
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
import { faultActive, faultNumber } from '../../src/faults.ts';
import { freeBytes } from '../../src/host/capacity.ts';
import { withTimeout } from '../../src/timeout.ts';
import { restoreContainer } from '../runtime/checkpoint.ts';
import { LazyGuard } from '../../src/criu/lazy-guard.ts';
import { PageRelay, pageServerLayout } from '../../src/transport/page-relay.ts';
import { probeAddress, requireBridge } from '../runtime/network.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import type { MigrationJournal } from './journal.ts';
import { resumeContainer } from './resume.ts';
import { roundMs } from './timing.ts';

export type Offer = Extract<PeerMessage, { type: 'offer' }>;
type Prepared = Extract<PeerMessage, { type: 'prepared' }>;
type Running = Extract<PeerMessage, { type: 'running' }>;
export type AcceptFacts = Extract<PeerMessage, { type: 'accept' }>['destination'];
export type PageList = Array<{ name: string; digest: string }>;

/** A stream that stops delivering bytes for this long fails the migration. */
const STREAM_IDLE_MS = Number(process.env.FERRY_STREAM_IDLE_MS) || 60_000;

/**
 * The work of one incoming migration on this host, in the order the session
 * asks for it. Every writer stops at the next step once `signal` aborts.
 */
export interface IncomingCopy<S> {
  /** Everything that can be checked and reserved before the source freezes anything. */
  preflight(): Promise<AcceptFacts>;
  /** The files channel's streams, in the protocol's order, each unpacked as it arrives; `staged` once rootfs pass 1 is in place. */
  receiveFiles(socket: S, staged: () => void): Promise<void>;
  /** Page images, each written as it arrives. */
  receivePages(socket: S): Promise<void>;
  /**
   * Once the files and every listed page image are here: `criu restore`,
   * stopped, recorded as prepared. Post-copy: restored and resumed at once
   * (`running` is told so), then prepared once the last page is in.
   */
  restore(files: Promise<void>, pages: PageList, running: (facts: Omit<Running, 'type' | 'migrationId'>) => void, supplyLost?: (reason: string) => void): Promise<Omit<Prepared, 'type' | 'migrationId'>>;
  /** Post-copy: a new pages channel from the source, which serves what the copy still waits for. */
  rejoinPages(socket: S): void;
  /** The prepared copy runs (recorded as done). */
  resume(warn: (message: string) => void): Promise<void>;
  /** The committed copy could not resume: it goes, recorded as lost. */
  dropCommitted(reason: string): Promise<void>;
  /** Drops whatever this migration made here: tasks, cgroup, rootfs, images. */
  discard(reason: string): Promise<void>;
  /** Gives the container's name back; after the decision, or with discard. */
  release(): void;
}

export interface LocalCopyDependencies {
  runtime: ContainerRuntime;
  criu: () => Promise<Criu>;
  journal: MigrationJournal;
}

/** An incoming migration's copy on this host's disk, cgroups and CRIU. */
export class LocalCopy implements IncomingCopy<WebSocket> {
  private readonly deps: LocalCopyDependencies;
  private readonly offer: Offer;
  private readonly signal: AbortSignal;
  private readonly logger: Logger;
  private criu!: Criu;
  /** Releases the container name; set once preflight claimed it. */
  private releaseName: (() => void) | undefined;
  private readonly receivedPages = new Map<string, string>();
  private pagesFailure: unknown;
  private pagesChanged: () => void = () => undefined;
  /** Where the files channel is, for a timeout's message. */
  private filesAt = 'waiting for the rootfs stream';
  private filesFinished = false;
  /** Post-copy: the pages channel, joined to the lazy-pages daemon once it runs. */
  private lazyChannel: WebSocket | undefined;
  private guard: LazyGuard | undefined;
  private pageRelay: PageRelay | undefined;

  constructor(deps: LocalCopyDependencies, offer: Offer, signal: AbortSignal, logger: Logger) {
    this.deps = deps;
    this.offer = offer;
    this.signal = signal;
    this.logger = logger;
    // A page wait must not outlive an abort.
    signal.addEventListener('abort', () => this.pagesChanged(), { once: true });
  }

  private get migrationId(): string {
    return this.offer.migrationId;
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

  /** A writer that finds the migration aborted stops before writing anything more. */
  private ensureLive(): void {
    if (this.signal.aborted) throw new FerryError('CANCELLED', 'the migration was aborted', { phase: 'stream' });
  }

  async preflight(): Promise<AcceptFacts> {
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
    return { host: this.deps.runtime.hostName, criuVersion: this.criu.version.text, memoryTracking, freeBytes: free };
  }

  /** Where pre-dump round N's images go; CRIU finds them through each directory's `parent` link. */
  private roundDirectory(round: number): string {
    return join(this.directory, 'rounds', String(round));
  }

  /**
   * The files channel's streams, in this order: the rootfs (pass 1, sent
   * while the container ran), the pre-dump rounds' images, the rootfs final
   * pass (what changed by the freeze, and deletions), then the final dump's
   * non-page images.
   */
  async receiveFiles(socket: WebSocket, staged: () => void): Promise<void> {
    const receiver = new ChannelReceiver(socket);
    const rootfs = this.deps.runtime.store.rootfs(this.name);
    await this.unpackStream(await receiver.next(), filesStreams.rootfs, rootfs);
    this.ensureLive();
    staged();
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

  async receivePages(socket: WebSocket): Promise<void> {
    if (this.offer.lazyPages) {
      // Nothing arrives on it before the lazy-pages daemon asks: it is joined to the daemon at the restore.
      this.lazyChannel = socket;
      return;
    }
    try {
      await this.writePages(socket);
    } catch (error) {
      this.pagesFailure = error;
      this.pagesChanged();
      throw error;
    }
  }

  /** Page images, each written as it arrives; the source lists them in transfer-complete. */
  private async writePages(socket: WebSocket): Promise<void> {
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
  private async allPages(expected: PageList): Promise<void> {
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

  async restore(
    files: Promise<void>,
    pages: PageList,
    running: (facts: Omit<Running, 'type' | 'migrationId'>) => void,
    supplyLost: (reason: string) => void = () => undefined,
  ): Promise<Omit<Prepared, 'type' | 'migrationId'>> {
    if (this.offer.lazyPages) return this.restoreLazily(files, running, supplyLost);
    const asked = performance.now();
    await withTimeout(Promise.all([files, this.allPages(pages)]), 60_000, 'receiving the images', 'stream').catch((error: unknown) => {
      const failure = toFerryError(error, 'stream');
      if (failure.code !== 'TIMEOUT') throw failure;
      const missing = pages.filter((image) => !this.receivedPages.has(image.name)).map((image) => image.name);
      const filesState = this.filesFinished ? 'files channel done' : `files channel ${this.filesAt}`;
      throw new FerryError('TIMEOUT', `${failure.message} (${filesState}; page images missing: ${missing.join(', ') || 'none'})`, { phase: 'stream' });
    });
    this.ensureLive();
    this.logger.info({ phase: 'restore' }, 'phase');
    // Test fault: a real criu restore failure, from a pstree.img that is not a CRIU image.
    // (Deleting it made CRIU 4.1 crash with SIGSEGV, leaving no error line to report.)
    if (faultActive('fail-restore')) await writeFile(join(this.imagesDir, 'pstree.img'), 'not a CRIU image\n');
    const started = performance.now();
    const { restoreStats, timing } = await this.restoreStopped(false);
    this.ensureLive();
    const restored = performance.now();
    await this.deps.journal.update(this.migrationId, 'prepared');
    const now = performance.now();
    return {
      restoreMs: Math.round(now - started),
      ...(restoreStats ? { restoreStats } : {}),
      timing: { waitMs: roundMs(started - asked), checkMs: timing.checkMs, criuMs: timing.criuMs, recordMs: roundMs(timing.afterMs + now - restored) },
    };
  }

  /** `criu restore` of the received images, the tasks left stopped; lazily: memory from the lazy-pages daemon. */
  private restoreStopped(lazyPages: boolean): ReturnType<typeof restoreContainer> {
    return restoreContainer(this.deps.runtime, this.criu, {
      spec: this.offer.spec,
      history: this.offer.history,
      imagesDir: this.imagesDir,
      rootfs: this.deps.runtime.store.rootfs(this.name),
      leaveStopped: true,
      logFile: join(this.directory, 'restore.log'),
      migrationId: this.migrationId,
      ...(lazyPages ? { lazyPages: true } : {}),
    });
  }

  /**
   * Post-copy: the lazy-pages daemon (under its guard) listens, CRIU
   * restores the tasks stopped, the guard takes their userfaultfds, and the
   * container runs while its pages come from the source through the pages
   * channel. Resolves once every page is here; rejects (the copy stopped,
   * never run on a missing page) when the supply broke.
   */
  private async restoreLazily(
    files: Promise<void>,
    running: (facts: Omit<Running, 'type' | 'migrationId'>) => void,
    supplyLost: (reason: string) => void,
  ): Promise<Omit<Prepared, 'type' | 'migrationId'>> {
    const asked = performance.now();
    await withTimeout(files, 60_000, 'receiving the images', 'stream');
    this.ensureLive();
    const channel = this.lazyChannel;
    if (!channel) throw new FerryError('BAD_MESSAGE', 'post-copy without a pages channel', { phase: 'restore' });
    const started = performance.now();
    const cgroup = this.deps.runtime.cgroup(this.name);
    this.guard = await LazyGuard.start({
      cgroupDir: cgroup.path,
      daemon: this.criu.lazyPagesCommand(this.imagesDir, join(this.directory, 'lazy-pages.log')),
    });
    const guard = this.guard;
    this.signal.addEventListener('abort', () => void guard.stop(), { once: true });
    // The channel may go and another come (a restarted source): the daemon's connection stays open meanwhile, its faults waiting.
    const pages = new PageRelay(guard.socket, pageServerLayout(this.criu.version));
    this.pageRelay = pages;
    pages.onDetached(supplyLost);
    pages.attach(channel);
    // A source that breaks CRIU's framing ends the guard's stream: it stops the copy itself.
    void pages.done.catch((error: unknown) => {
      this.logger.error({ err: error }, 'post-copy page stream refused');
      guard.socket.destroy();
    });
    let restored = started;
    try {
      // Test fault: a real criu restore failure, as in restore(), the daemon already waiting for it.
      if (faultActive('fail-restore')) await writeFile(join(this.imagesDir, 'pstree.img'), 'not a CRIU image\n');
      const { restoreStats, timing } = await this.restoreStopped(true);
      const afterRestore = performance.now();
      this.ensureLive();
      // Test fault: the seal comes late, so a small container's pages are all in before it.
      const sealDelay = faultNumber('postcopy-seal-delay');
      if (sealDelay) await sleep(sealDelay);
      const uffds = await guard.seal();
      this.ensureLive();
      this.logger.info({ uffds, guard: guard.pid }, 'post-copy: userfaultfds held; resuming');
      await resumeContainer(this.deps.runtime, this.name, (message) => this.logger.error(message));
      restored = performance.now();
      running({
        restoreMs: Math.round(restored - started),
        ...(restoreStats ? { restoreStats } : {}),
        timing: { waitMs: roundMs(started - asked), checkMs: timing.checkMs, criuMs: timing.criuMs, recordMs: roundMs(timing.afterMs + restored - afterRestore) },
      });
      this.logger.info({ phase: 'postcopy' }, 'post-copy: running here; pages follow');
    } catch (error) {
      // A copy its guard stopped fails for the guard's reason, not for what that did to the restore or the resume.
      throw await Promise.race([guard.settled.then(() => error, (guardError: unknown) => guardError), sleep(1_000).then(() => error)]);
    }
    const stats = await guard.settled;
    this.ensureLive();
    await this.deps.journal.update(this.migrationId, 'prepared');
    this.logger.info({ phase: 'postcopy', ...stats, uffds: guard.heldUffds }, 'post-copy: every page is here');
    return { restoreMs: Math.round(restored - started), postcopy: stats };
  }

  rejoinPages(socket: WebSocket): void {
    if (!this.pageRelay) {
      socket.terminate();
      return;
    }
    const { requests, deliveredOfFirst } = this.pageRelay.pending;
    this.logger.info(
      { phase: 'postcopy', requests, deliveredOfFirst, pageBytes: this.pageRelay.received },
      'post-copy: a new page channel from the source; asking again for what is missing',
    );
    this.pageRelay.attach(socket);
  }

  async resume(warn: (message: string) => void): Promise<void> {
    // A post-copy copy runs already (resumed, and recorded as running, by restoreLazily).
    if (!this.offer.lazyPages) await resumeContainer(this.deps.runtime, this.name, warn);
    await this.deps.journal.update(this.migrationId, 'done');
  }

  async dropCommitted(reason: string): Promise<void> {
    await this.guard?.stop();
    await this.deps.runtime.destroy(this.name).catch(() => undefined);
    await this.deps.journal.update(this.migrationId, 'aborted', reason).catch(() => undefined);
  }

  async discard(reason: string): Promise<void> {
    // A post-copy copy is stopped by its guard, which holds the uffds until no task is left to fault.
    await this.guard?.stop();
    // Only a claimed name has anything of this migration under it.
    if (this.releaseName) {
      await this.deps.runtime.destroy(this.name).catch((error: unknown) => this.logger.error({ err: error }, 'cleanup failed'));
      this.release();
    }
    await this.deps.journal.update(this.migrationId, 'aborted', reason).catch(() => undefined);
    await this.deps.journal.removeImages(this.migrationId).catch(() => undefined);
  }

  release(): void {
    this.releaseName?.();
    this.releaseName = undefined;
  }
}

/** The container brings its own network namespace: this host must be able to make one. */
async function canCreateNetworkNamespace(): Promise<void> {
  const result = await execa('unshare', ['--net', 'true'], { reject: false });
  if (result.exitCode !== 0) {
    throw new FerryError('INCOMPATIBLE', `this host cannot create network namespaces: ${result.stderr}`, { phase: 'preflight' });
  }
}
