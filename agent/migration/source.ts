import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type WebSocket from 'ws';
import type { Criu } from '../../src/criu/criu.ts';
import { readKernelRelease } from '../../src/criu/criu.ts';
import { FerryError, toFerryError, type Phase } from '../../src/errors.ts';
import type { Destination } from '../../src/protocol/messages.ts';
import {
  defaultPostcopyGraceMs,
  filesStreams,
  roundStreamName,
  type MigrationOptions,
  type MigrationReport,
  type PeerMessage,
  type ProgressEvent,
  type SourceStep,
} from '../../src/protocol/migration.ts';
import { diffRootfs, entryStamp, type RootfsManifest } from '../../src/rootfs/delta.ts';
import { packDirectory } from '../../src/rootfs/pack.ts';
import { ChannelSender } from '../../src/transport/channel.ts';
import { faultActive, faultNumber } from '../../src/faults.ts';
import { pageImagePattern } from '../../src/criu/follow.ts';
import { PagePipes } from '../../src/criu/pipes.ts';
import { dumpFrozen } from '../runtime/checkpoint.ts';
import { directorySize } from '../runtime/disk.ts';
import { freeBytes } from '../../src/host/capacity.ts';
import { residentBytes } from '../runtime/process.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import type { ContainerRecord } from '../runtime/store.ts';
import { MigrationJournal } from './journal.ts';
import type { LazyDump } from '../../src/criu/criu.ts';
import { relay, type Relay } from '../../src/transport/relay.ts';
import { quickRetransmits } from '../../src/transport/native-send.ts';
import { withTimeout } from '../../src/timeout.ts';
import { lazyPipeBytes, readPipeMaxSize } from '../../src/host/pipe-size.ts';
import { PeerLink, type PeerIdentity, type SourcePeer } from './peer.ts';
import { PageShipper } from './pages.ts';
import { connectAndRejoin, serveAgain } from './rejoin.ts';
import { PrecopyRounds } from './precopy.ts';
import { choosePostcopy } from '../../src/precopy/strategy.ts';
import { commitOnce } from './decisions.ts';
import { deliverDecision } from './recovery.ts';
import { lockNetwork, unlockNetwork } from '../../src/net/lock.ts';
import { inventorySockets, summarize, unmovable, type SocketSummary } from '../../src/net/sockets.ts';
import { announceAddress, removeHostEnd } from '../runtime/network.ts';
import { PhaseTimer } from './timing.ts';
import { buildReport, type ReportFacts } from './report.ts';
import type { AcceptFacts } from './incoming.ts';
import { TransferMeter } from './meter.ts';

/** What an outgoing migration uses of the agent's runtime and of CRIU. */
export type SourceRuntime = Pick<ContainerRuntime, 'cgroup' | 'destroy' | 'forget' | 'get' | 'hold' | 'hostName' | 'status' | 'store'>;
export type SourceCriu = Pick<Criu, 'cpuinfoDump' | 'dump' | 'lazyDump' | 'memoryTracking' | 'preDump' | 'socketCheckpoint' | 'version'>;

/** Post-copy: how many times one migration may serve its pages again on a new connection. */
const maxRejoins = 3;

export interface SourceDependencies {
  runtime: SourceRuntime;
  criu: () => Promise<SourceCriu>;
  journal: MigrationJournal;
  logger: Logger;
  identity: PeerIdentity;
}

export interface MigrateRequest {
  name: string;
  destination: Destination;
  options: MigrationOptions;
  progress: (event: ProgressEvent) => void;
  signal: AbortSignal;
}

/**
 * One outgoing migration, top to bottom: preflight, pre-copy (rootfs pass 1,
 * then pre-dump rounds where both kernels track dirty memory), freeze,
 * snapshot + dump + stream (overlapped), restore on the destination, the
 * commit decision, cleanup. Any failure before the decision thaws the
 * container here.
 */
export class MigrationSource {
  private readonly deps: SourceDependencies;
  private readonly request: MigrateRequest;
  readonly migrationId = randomUUID();
  /** Whether the request got past its checks and a migration began (the metrics tell refusals apart). */
  claimed = false;
  private readonly logger: Logger;
  private readonly timer: PhaseTimer;
  private readonly meter = new TransferMeter();
  private record!: ContainerRecord;
  private criu!: SourceCriu;
  private peer: SourcePeer | undefined;
  private channels: { files: WebSocket; pages: WebSocket } | undefined;
  private filesSender!: ChannelSender;
  private pages!: PageShipper;
  /** Set when memory moves in pre-dump rounds. */
  private precopy: PrecopyRounds | undefined;
  /** What the destination said of itself in its accept. */
  private accepted: AcceptFacts | undefined;
  /** What preflight measured: the rootfs and the resident memory. */
  private needs = { rootfsBytes: 0, memoryBytes: 0 };
  /** What rootfs pass 1 saw, to find what changed by the freeze. */
  private readonly rootfsManifest: RootfsManifest = new Map();
  /** Set by a timeout or a cancel; the run stops at the next step or wait. */
  private stopReason: FerryError | undefined;
  /** What the report tells: the downtime's marks, CRIU's and the destination's figures, warnings. */
  private readonly facts: ReportFacts = { startedAt: performance.now(), marks: {}, warnings: [] };
  /** Whether the destination may hold state of this migration (an offer went out). */
  private offered = false;
  /** Whether the container's network namespace was locked here (from the freeze). */
  private networkLocked = false;
  /** Post-copy: memory moves after the destination resumed, served from the frozen tasks here. */
  private lazy = false;
  /** Post-copy: from transfer-complete on, the destination's copy may run, so this one thaws only once it is known gone. */
  private remoteMayRun = false;
  private lazyDump: LazyDump | undefined;
  private lazyRelay: Relay | undefined;
  /** Post-copy: page bytes sent on channels before a rejoin replaced them. */
  private pageBytesBefore = 0;

  constructor(deps: SourceDependencies, request: MigrateRequest) {
    this.deps = deps;
    this.request = request;
    this.logger = deps.logger.child({ migrationId: this.migrationId, container: request.name });
    this.timer = new PhaseTimer((phase) => {
      this.logger.info({ phase }, 'phase');
      this.emit(phase);
    });
  }

  private get directory(): string {
    return this.deps.journal.directory(this.migrationId);
  }

  private get imagesDir(): string {
    return join(this.directory, 'images');
  }

  async run(): Promise<MigrationReport> {
    // Held before any await, so two requests cannot both pass the status check.
    const { name } = this.request;
    const release = this.deps.runtime.hold(
      name,
      () => new FerryError('CONTAINER_NOT_RUNNING', `container ${name} is already migrating (or being created or removed)`, { phase: 'preflight' }),
    );
    try {
      return await this.runClaimed();
    } finally {
      release();
    }
  }

  private async runClaimed(): Promise<MigrationReport> {
    await this.claim();
    // A timeout or a cancel cuts the connections, which fails whatever step is waiting.
    const stop = (reason: FerryError) => {
      this.stopReason ??= reason;
      this.disconnect();
    };
    const { timeoutMs } = this.request.options;
    const deadline = setTimeout(() => stop(new FerryError('TIMEOUT', `migration exceeded ${timeoutMs} ms`)), timeoutMs);
    const onCancel = () => stop(new FerryError('CANCELLED', 'migration cancelled'));
    this.request.signal.addEventListener('abort', onCancel);
    try {
      // A stop that lands between steps (say, while connecting) is honoured before the next one.
      for (const [phase, step] of this.steps()) {
        if (this.stopReason) throw this.stopReason;
        if (phase === 'postcopy' && !this.lazy) continue;
        this.peer?.inbox.enter(phase);
        await this.timer.run(phase, step);
      }
    } catch (error) {
      const stopReason = this.stopReason;
      const failure = stopReason
        ? new FerryError(stopReason.code, stopReason.message, { phase: this.timer.current, cause: error })
        : await this.explain(toFerryError(error, this.timer.current));
      await this.rollback(failure);
      throw failure;
    } finally {
      clearTimeout(deadline);
      this.request.signal.removeEventListener('abort', onCancel);
    }
    try {
      this.peer?.inbox.enter('confirm');
      const confirmed = await this.timer.run('confirm', () => this.commit());
      this.peer?.inbox.enter('cleanup');
      await this.timer.run('cleanup', () => this.cleanup(confirmed));
      return this.report(confirmed ? 'succeeded' : 'in-doubt');
    } finally {
      this.peer?.close();
    }
  }

  /** Everything before the commit decision, in order; a failure in any rolls back. */
  private steps(): Array<[SourceStep, () => Promise<void>]> {
    return [
      ['preflight', () => this.preflight()],
      ['precopy', () => this.copyWhileRunning()],
      ['freeze', () => this.freeze()],
      ['dump', () => (this.lazy ? this.lazyDumpAndStream() : this.snapshotDumpAndStream())],
      ['restore', () => this.restoreOnDestination()],
      ['postcopy', () => this.serveRemainingPages()],
    ];
  }

  /** A dropped connection is explained by the destination's abort when it sent one. */
  private async explain(error: FerryError): Promise<FerryError> {
    if (error.code !== 'PEER_GONE' || !this.peer) return error;
    return (await this.peer.inbox.abortReason(2_000, error.phase ?? this.timer.current)) ?? error;
  }

  private async claim(): Promise<void> {
    this.record = await this.deps.runtime.get(this.request.name);
    const status = await this.deps.runtime.status(this.record);
    if (status !== 'running') {
      throw new FerryError('CONTAINER_NOT_RUNNING', `container ${this.request.name} is ${status}`, { phase: 'preflight' });
    }
    this.record = { ...this.record, migrationId: this.migrationId };
    await this.deps.runtime.store.write(this.record);
    this.claimed = true;
  }

  private disconnect(): void {
    this.peer?.terminate();
    this.channels?.files.terminate();
    this.channels?.pages.terminate();
  }

  private async preflight(): Promise<void> {
    this.criu = await this.deps.criu();
    await mkdir(this.imagesDir, { recursive: true });
    await this.deps.journal.write({
      migrationId: this.migrationId,
      role: 'source',
      container: this.request.name,
      state: 'started',
      destination: this.request.destination,
    });
    const cpuinfoDir = join(this.directory, 'cpuinfo');
    await mkdir(cpuinfoDir, { recursive: true });
    await this.criu.cpuinfoDump(cpuinfoDir);
    const sockets = await this.checkSockets();
    this.peer = await PeerLink.connect(this.request.destination, this.deps.identity);
    if (this.stopReason) throw this.stopReason;
    // The heartbeat ends a dead control link; the data channels, perhaps blocked
    // in a send that will never complete, must end with it.
    this.peer.onClose(() => this.disconnect());
    const { bytes: rootfsBytes, entries: rootfsEntries } = directorySize(this.deps.runtime.store.rootfs(this.request.name));
    const memoryBytes = await residentBytes(await this.deps.runtime.cgroup(this.request.name).pids());
    this.meter.expect(rootfsBytes + memoryBytes);
    this.needs = { rootfsBytes, memoryBytes };
    this.lazy = await this.choosePostcopy();
    this.facts.lazy = this.lazy;
    this.peer.send({
      type: 'offer',
      migrationId: this.migrationId,
      spec: this.record.spec,
      history: this.record.history,
      source: { host: this.deps.runtime.hostName, criuVersion: this.criu.version.text, kernel: await readKernelRelease() },
      cpuinfo: (await readFile(join(cpuinfoDir, 'cpuinfo.img'))).toString('base64'),
      needs: { rootfsBytes, memoryBytes, rootfsEntries },
      sockets,
      ...(this.lazy ? { lazyPages: true, postcopyGraceMs: this.graceMs } : {}),
    });
    this.offered = true;
    const accept = await this.peer.inbox.expect('accept', 60_000, 'preflight');
    this.accepted = accept.destination;
    const lacking = await this.lackingMemoryTracking();
    if (this.request.options.strategy === 'precopy' && lacking.length) {
      // Asked for by name, so not quietly replaced by a stop-and-copy whose downtime grows with the memory.
      throw new FerryError(
        'INCOMPATIBLE',
        `--strategy precopy needs dirty-memory tracking (soft-dirty) on both hosts, and ${lacking.join(' and ')} lack it; use auto or stop-and-copy`,
        { phase: 'preflight' },
      );
    }
    // Data channels are opened before the freeze so their set-up is not downtime.
    const [files, pages] = await Promise.all([
      this.peer.openChannel(this.migrationId, 'files'),
      this.peer.openChannel(this.migrationId, 'pages'),
    ]);
    this.channels = { files, pages };
    this.filesSender = new ChannelSender(files, 'files');
    this.pages = new PageShipper(new ChannelSender(pages, 'pages'), this.meter.counter('pages'));
  }

  /** What cannot move is refused here, before anything is frozen, each socket named. */
  private async checkSockets(): Promise<SocketSummary> {
    const pids = await this.deps.runtime.cgroup(this.request.name).pids();
    const inventory = await inventorySockets(pids, this.record.pid);
    const problems = unmovable(inventory, this.record.spec.privateNetwork ? 'private' : 'host');
    if (problems.length) {
      throw new FerryError('UNMOVABLE', `container ${this.request.name} holds what cannot move: ${problems[0]}${problems.length > 1 ? ` (and ${problems.length - 1} more)` : ''}`, {
        phase: 'preflight',
        details: problems.slice(0, 20),
      });
    }
    const summary = summarize(inventory);
    if (summary.tcpListening + summary.tcpConnected + summary.udp > 0) {
      const problem = await this.criu.socketCheckpoint();
      if (problem) {
        throw new FerryError('INCOMPATIBLE', `CRIU ${this.criu.version.text} here cannot checkpoint TCP/UDP sockets on this kernel (${problem}); CRIU >= 4.2 is needed`, { phase: 'preflight' });
      }
    }
    return summary;
  }

  /** Everything that can move before the freeze: the rootfs, then memory in pre-dump rounds. */
  private async copyWhileRunning(): Promise<void> {
    await this.sendRootfsWhileRunning();
    if (await this.choosePrecopy()) {
      this.precopy = new PrecopyRounds(this.roundPorts(), this.directory, this.logger);
      const { maxDowntimeMs, maxRounds } = this.request.options;
      await this.precopy.run({ maxDowntimeMs, maxRounds });
    }
    // Test fault: a wide window between the passes, for changes the final pass must carry.
    const pause = faultNumber('pause-before-freeze');
    if (pause) await sleep(pause);
  }

  /** The hosts (of the two) whose kernels lack soft-dirty tracking. */
  private async lackingMemoryTracking(): Promise<string[]> {
    const here = await this.criu.memoryTracking();
    return [here ? undefined : this.deps.runtime.hostName, this.accepted?.memoryTracking ? undefined : this.peer!.peerName].filter(
      (host): host is string => host !== undefined,
    );
  }

  /** Pre-copy needs soft-dirty tracking on both kernels; under auto, without it memory moves stop-and-copy, and the report says why. */
  private async choosePrecopy(): Promise<boolean> {
    const { strategy } = this.request.options;
    if (strategy === 'stop-and-copy' || this.lazy) return false;
    const lacking = await this.lackingMemoryTracking();
    if (!lacking.length) return true;
    this.facts.strategyNote = `no dirty-memory tracking (soft-dirty) on ${lacking.join(' and ')}: memory moved stop-and-copy, the rootfs in two passes`;
    this.logger.warn({ strategy }, this.facts.strategyNote);
    return false;
  }

  /** Post-copy when choosePostcopy says so and this host can serve lazy pages. */
  private async choosePostcopy(): Promise<boolean> {
    const choice = choosePostcopy({ ...this.request.options, memoryBytes: this.needs.memoryBytes, softDirty: await this.criu.memoryTracking() });
    if (!choice.postcopy) return false;
    const pipeMax = await readPipeMaxSize();
    if (pipeMax < lazyPipeBytes) {
      throw new FerryError('INCOMPATIBLE', `post-copy needs fs.pipe-max-size >= ${lazyPipeBytes} here (it is ${pipeMax}); the agent raises it at start unless FERRY_PIPE_MAX_SIZE=0`, { phase: 'preflight' });
    }
    if (choice.note) this.facts.strategyNote = choice.note;
    return true;
  }

  /** What the pre-dump rounds use of this migration. */
  private roundPorts(): ConstructorParameters<typeof PrecopyRounds>[0] {
    return {
      preDump: (round, imagesDir) =>
        this.criu.preDump({
          pid: this.record.pid,
          imagesDir,
          logFile: join(this.directory, `pre-dump-${round}.log`),
          freezeCgroup: this.deps.runtime.cgroup(this.request.name).path,
          ...(round > 1 ? { prevImagesDir: `../${round - 1}` } : {}),
        }),
      shipPages: (run, imagesDir, round) => this.pages.ship(run, imagesDir, round),
      sendImages: async (round, imagesDir) => {
        const digests = new Map<string, string>();
        const sent = await this.filesSender.sendStream(roundStreamName(round), packDirectory(imagesDir, { digests, exclude: isPageImageOrParent }), {
          files: () => Object.fromEntries(digests),
          onBytes: this.meter.counter('images'),
        });
        return sent.bytes;
      },
      ensureGoing: () => {
        if (this.stopReason) throw this.stopReason;
        this.peer!.inbox.ensureAlive('precopy');
      },
      space: () => this.roundSpace(),
      progress: (report) =>
        this.request.progress({
          migrationId: this.migrationId,
          phase: 'precopy',
          message: `round ${report.round}: ${report.pagesWritten} pages written, ${report.pagesSkippedParent} unchanged`,
          ...this.meter.snapshot(),
        }),
    };
  }

  /**
   * Both hosts keep every round until the end, on top of what a stop-and-copy
   * needs (the destination's preflight reserved 1.2 × rootfs + memory).
   */
  private async roundSpace(): Promise<{ bytes: number; residentBytes: number }> {
    const reserved = 1.2 * (this.needs.rootfsBytes + this.needs.memoryBytes);
    const here = await freeBytes(this.directory);
    const there = this.accepted?.freeBytes ?? here;
    return { bytes: Math.max(0, Math.min(here, there) - reserved), residentBytes: this.needs.memoryBytes };
  }

  /**
   * Rootfs pass 1: the whole tree, while the container still runs. Without
   * rootfs pre-copy pass 1 is empty, so the final pass carries everything.
   */
  private async sendRootfsWhileRunning(): Promise<void> {
    const root = this.deps.runtime.store.rootfs(this.request.name);
    const digests = new Map<string, string>();
    const skip = !this.request.options.rootfsPrecopy;
    await this.filesSender.sendStream(
      filesStreams.rootfs,
      packDirectory(root, {
        digests,
        ...(skip ? { include: () => false } : { onEntry: (path, stats) => this.rootfsManifest.set(path, entryStamp(root, path, stats)) }),
      }),
      { files: () => Object.fromEntries(digests), onBytes: this.meter.counter('rootfs') },
    );
    await this.peer!.inbox.expect('staged', 10 * 60_000, 'precopy');
    this.request.progress({ migrationId: this.migrationId, phase: 'precopy', message: 'rootfs pass 1 applied on the destination', ...this.meter.snapshot() });
  }

  private async freeze(): Promise<void> {
    this.facts.marks.freezing = performance.now();
    await this.deps.runtime.cgroup(this.request.name).freeze();
    // Frozen first (a locked but running process would see its sends fail), then locked:
    // from here no byte reaches the copy here, which may never go on.
    if (this.record.spec.network) {
      this.networkLocked = true;
      await lockNetwork(this.record.pid, 'freeze');
    }
    this.facts.marks.frozen = performance.now();
    // Test fault: the agent dies with the container frozen (and locked); its restart must undo both.
    if (faultActive('die-after-freeze')) process.kill(process.pid, 'SIGKILL');
  }

  /**
   * The rootfs final pass, the CRIU dump and the shipping of its page images
   * run at once: the first two only read the frozen container, and page
   * images go out while CRIU writes them. The other images follow CRIU's
   * exit, alongside the last pages.
   */
  private async snapshotDumpAndStream(): Promise<void> {
    const cgroup = this.deps.runtime.cgroup(this.request.name);
    const parent = this.precopy?.parent;
    // CRIU first: the rootfs walk below is synchronous. The tasks stay stopped
    // throughout (frozen, or held in ptrace-stop by CRIU), so the files cannot
    // change while CRIU runs, and CRIU writes nothing into the rootfs.
    this.facts.marks.pagesAtDump = this.meter.totals().pages;
    // One pipe per process and a few for shared memory; the tree is frozen, so the count holds.
    const pipes = PagePipes.create(this.imagesDir, (await cgroup.pids()).length + 2);
    const dump = dumpFrozen(this.criu, this.record, cgroup, this.imagesDir, join(this.directory, 'dump.log'), parent);
    // Test fault: the agent dies this many ms after CRIU's dump started (its page pipes lose their reader).
    const dieAfter = faultNumber('die-during-dump');
    if (dieAfter !== undefined) setTimeout(() => process.kill(process.pid, 'SIGKILL'), dieAfter);
    const exited = () => {
      this.facts.marks.dumped = performance.now();
      this.facts.marks.pagesAtExit = this.meter.totals().pages;
    };
    dump.done.then(exited, () => undefined);
    void dump.done.catch(() => undefined).finally(() => pipes.release());
    const rootfs = this.sendRootfsDelta();
    const progress = setInterval(() => this.emit('stream'), 250);
    try {
      // The other images are complete once CRIU exits: they go on the files channel
      // (after the rootfs delta) while the last pages are still on their way.
      const imageDigests = new Map<string, string>();
      const images = Promise.all([rootfs, dump.done]).then(() =>
        this.timer.run('stream', () =>
          this.filesSender.sendStream(
            filesStreams.images,
            packDirectory(this.imagesDir, { digests: imageDigests, exclude: isPageImageOrParent }),
            { files: () => Object.fromEntries(imageDigests), onBytes: this.meter.counter('images') },
          ),
        ),
      );
      const [, stats, shipped] = await Promise.all([rootfs, dump.done, this.pages.ship(dump, this.imagesDir, undefined, pipes), images]);
      this.facts.dumpStats = stats;
      const native = this.pages.native;
      this.logger.info({ phase: 'stream', pageImages: shipped.length, native: native.streams, nativeCpuMs: native.cpuMs }, 'page images shipped');
    } catch (error) {
      // What CRIU still writes into the pipes is discarded while it finishes.
      pipes.discard();
      await dump.letFinish('the interrupted dump', 'dump');
      throw error;
    } finally {
      clearInterval(progress);
      pipes.close();
    }
  }

  /**
   * Post-copy's final pass: the rootfs delta and CRIU's dump without the
   * pages; once CRIU has written the rest it serves the pages from the
   * frozen tasks, on a socket joined to the pages channel. The tasks stay
   * alive (frozen) whatever happens to CRIU: this copy is the safety net.
   */
  private async lazyDumpAndStream(): Promise<void> {
    const cgroup = this.deps.runtime.cgroup(this.request.name);
    const dump = this.criu.lazyDump({
      pid: this.record.pid,
      imagesDir: this.imagesDir,
      logFile: join(this.directory, 'dump.log'),
      freezeCgroup: cgroup.path,
      leaveRunning: true,
      privateNetwork: this.record.spec.privateNetwork,
    });
    this.lazyDump = dump;
    dump.socket.on('error', () => undefined);
    dump.run.done.catch(() => undefined);
    const rootfs = this.sendRootfsDelta();
    await Promise.all([rootfs, dump.ready]);
    this.facts.marks.dumped = performance.now();
    this.lazyRelay = relay(this.channels!.pages, dump.socket, 'postcopy', faultNumber('postcopy-slow'));
    const imageDigests = new Map<string, string>();
    await this.timer.run('stream', () =>
      this.filesSender.sendStream(filesStreams.images, packDirectory(this.imagesDir, { digests: imageDigests, exclude: isLazyDumpArtifact }), {
        files: () => Object.fromEntries(imageDigests),
        onBytes: this.meter.counter('images'),
      }),
    );
  }

  /**
   * Post-copy: the destination runs the container and the source holds the
   * pages, so a silent link is waited out up to the bound (TCP carries the
   * connections over a cut) instead of rolling back what runs there.
   */
  private get graceMs(): number {
    return this.request.options.postcopyGraceMs ?? defaultPostcopyGraceMs;
  }

  private waitOutCuts(): void {
    const bound = this.graceMs;
    const where = this.peer!.peerName;
    quickRetransmits([this.peer!.socket, ...(this.channels ? [this.channels.pages] : [])], bound, (error) =>
      this.logger.warn({ err: error }, 'could not cap the retransmission timeout; a link back after a cut may be noticed late'),
    );
    this.peer!.heartbeat.tolerate(bound, {
      silent: (silentMs) => {
        this.logger.warn({ phase: 'postcopy', silentMs, boundMs: bound }, 'post-copy: the destination is silent; waiting for the link up to the bound');
        this.request.progress({ migrationId: this.migrationId, phase: 'postcopy', message: `no word from ${where} for ${silentMs} ms; waiting up to ${bound} ms for the link`, ...this.meter.snapshot() });
      },
      back: (silentMs) => {
        this.logger.info({ phase: 'postcopy', silentMs }, 'post-copy: the destination is heard again; pages resume');
        this.facts.warnings.push(`the link to ${where} was silent for ${silentMs} ms during post-copy (bound ${bound} ms); the page transfer resumed`);
      },
    });
  }

  /** Post-copy: pages go to the destination until it says every one is there (prepared). */
  private async serveRemainingPages(): Promise<void> {
    const prepared = await this.awaitPrepared();
    // Test fault: the agent dies with every page on the destination, before its decision.
    if (faultActive('die-at-prepared')) process.kill(process.pid, 'SIGKILL');
    const heartbeat = this.peer!.heartbeat;
    heartbeat.tolerate(undefined);
    const pageBytes = this.pageBytesBefore + (this.lazyRelay?.sent ?? 0);
    this.meter.counter('pages')(pageBytes);
    if (prepared.postcopy) {
      const silence = { longestSilenceMs: heartbeat.longestSilenceMs, graceMs: this.graceMs };
      this.facts.postcopy = { stats: prepared.postcopy, completeAt: performance.now(), pageBytes, ...silence };
    }
    // The daemon said goodbye to CRIU's page server, which exits; its tasks stay frozen until the commit.
    const dump = this.lazyDump;
    if (!dump) return;
    const stats = await withTimeout(dump.run.done, 30_000, 'the lazy dump to exit', 'postcopy').catch((error: unknown) => {
      this.facts.warnings.push(`the source's page server did not exit cleanly: ${toFerryError(error).message}`);
      dump.run.kill();
      return undefined;
    });
    // The first dump's figures (the freeze's) when the pages were served again.
    this.facts.dumpStats ??= stats;
  }

  /**
   * The destination's `prepared`. A connection lost on its own (reset, not
   * silent past the bound, no abort from the destination) is not the end:
   * the destination's copy waits up to the bound, so the pages are served
   * again on a new one (rejoin).
   */
  private async awaitPrepared(): Promise<Extract<PeerMessage, { type: 'prepared' }>> {
    for (let rejoins = 0; ; rejoins += 1) {
      const prepared = this.peer!.inbox.expect('prepared', this.request.options.timeoutMs, 'postcopy');
      prepared.catch(() => undefined);
      try {
        // The pages channel lost on its own (its end here fails) is a lost connection too.
        const pagesLost = new Promise<never>((_, reject) => this.lazyRelay?.done.catch(reject));
        return await Promise.race([prepared, pagesLost]);
      } catch (error) {
        // A channel that ended with the last page: prepared follows on the control link.
        // A channel the destination closed: its abort, on the control link, says why.
        const late = await withTimeout(prepared, 1_000, 'prepared', 'postcopy').then(
          (message) => ({ message }),
          (reason: unknown) => ({ reason }),
        );
        if ('message' in late) return late.message;
        const timedOut = toFerryError(late.reason).code === 'TIMEOUT';
        const cause = timedOut ? error : late.reason;
        const lost = toFerryError(cause, 'postcopy');
        if (rejoins >= maxRejoins || !this.onlyTheLinkWasLost(lost)) throw cause;
        await this.rejoin(lost);
      }
    }
  }

  private onlyTheLinkWasLost(error: FerryError): boolean {
    const peer = this.peer!;
    return !this.stopReason && error.code === 'PEER_GONE' && !peer.heartbeat.expired && !peer.inbox.heardAbort;
  }

  /**
   * Post-copy on a new connection: the old page server goes (its socket may
   * hold half an answer), a new lazy dump of the frozen tasks serves the
   * pages on a new pages channel, and the destination's relay asks again for
   * what it lacks. Throws when the destination does not take it back within
   * the bound; the rollback follows.
   */
  private async rejoin(lost: FerryError): Promise<void> {
    const where = this.peer!.peerName;
    const deadline = performance.now() + this.graceMs;
    this.logger.warn({ phase: 'postcopy', err: lost }, 'post-copy: the connection to the destination was lost; serving the pages again on a new one');
    this.request.progress({ migrationId: this.migrationId, phase: 'postcopy', message: `lost the connection to ${where}; serving the pages again on a new one`, ...this.meter.snapshot() });
    this.pageBytesBefore += this.lazyRelay?.sent ?? 0;
    this.lazyRelay?.end();
    this.lazyRelay = undefined;
    const old = this.lazyDump;
    this.lazyDump = undefined;
    if (old) {
      old.socket.destroy();
      await old.run.letFinish('the lazy dump to exit', 'postcopy');
      this.facts.dumpStats ??= await old.run.done.catch(() => undefined);
    }
    this.disconnect();
    const link = await connectAndRejoin(this.deps.identity, { destination: this.request.destination, migrationId: this.migrationId }, this.logger, deadline);
    if (!link) throw lost;
    this.peer = link.peer;
    this.peer.onClose(() => this.disconnect());
    if (!link.prepared) {
      const served = await serveAgain(this.criu, {
        peer: this.peer,
        migrationId: this.migrationId,
        pid: this.record.pid,
        cgroupPath: this.deps.runtime.cgroup(this.request.name).path,
        directory: this.directory,
        privateNetwork: this.record.spec.privateNetwork,
      });
      this.lazyDump = served.dump;
      this.lazyRelay = served.relay;
      this.channels = { files: this.channels!.files, pages: served.channel };
    }
    this.waitOutCuts();
    this.facts.warnings.push(`the connection to ${where} was lost during post-copy (${lost.message}); the source served the pages again on a new one`);
  }

  /** The rootfs final pass (the snapshot): what changed since pass 1, and the deletions; the container is frozen. */
  private sendRootfsDelta(): Promise<void> {
    const root = this.deps.runtime.store.rootfs(this.request.name);
    return this.timer.run('snapshot', async () => {
      const delta = diffRootfs(root, this.rootfsManifest);
      const digests = new Map<string, string>();
      await this.filesSender.sendStream(filesStreams.rootfsDelta, packDirectory(root, { digests, include: (path) => delta.changed.has(path) }), {
        files: () => Object.fromEntries(digests),
        onBytes: this.meter.counter('rootfs'),
        deleted: delta.deleted,
      });
    });
  }

  private async restoreOnDestination(): Promise<void> {
    if (this.lazy) {
      // From here the destination may resume its copy: a failure no longer thaws this one before the destination says its copy is gone.
      await this.deps.journal.update(this.migrationId, 'postcopy');
      this.remoteMayRun = true;
    }
    this.peer!.send({ type: 'transfer-complete', migrationId: this.migrationId, pages: this.lazy ? [] : this.pages.shipped });
    this.facts.marks.sent = performance.now();
    if (this.lazy) {
      const running = await this.peer!.inbox.expect('running', 5 * 60_000, 'restore');
      this.waitOutCuts();
      this.facts.marks.prepared = performance.now();
      this.facts.runningAt = this.facts.marks.prepared;
      this.facts.restoreStats = running.restoreStats;
      this.facts.restoreTiming = running.timing;
      this.request.progress({ migrationId: this.migrationId, phase: 'postcopy', message: `running on ${this.peer!.peerName}; its pages follow`, ...this.meter.snapshot() });
      return;
    }
    const prepared = await this.peer!.inbox.expect('prepared', 5 * 60_000, 'restore');
    this.facts.marks.prepared = performance.now();
    this.facts.restoreStats = prepared.restoreStats;
    this.facts.restoreTiming = prepared.timing;
  }

  /** The decision (commitOnce), here; returns whether the destination confirmed that the copy runs. */
  private async commit(): Promise<boolean> {
    const outcome = await commitOnce({
      record: async () => {
        await this.deps.journal.update(this.migrationId, 'committed');
        // Test fault: the agent dies between writing the decision and sending it.
        if (faultActive('die-after-commit')) process.kill(process.pid, 'SIGKILL');
      },
      send: () => this.peer!.send({ type: 'decision', migrationId: this.migrationId, decision: 'commit' }),
      // Off the bridge first: nothing the dying copy sends (a FIN, an RST) can reach the segment.
      stopLocalCopy: async () => {
        if (this.record.spec.network) await removeHostEnd(this.request.name);
        await this.deps.runtime.cgroup(this.request.name).kill();
      },
      awaitDecided: async () => {
        const decided = await this.peer!.inbox.expect('decided', 60_000, 'confirm');
        this.facts.runningAt ??= performance.now();
        return decided;
      },
    });
    this.facts.warnings.push(...outcome.warnings);
    // Committed but unconfirmed: recovery re-delivers the decision.
    if (!outcome.confirmed) this.logger.error({ err: outcome.unconfirmed }, 'destination did not confirm the commit; will retry');
    if (outcome.stopFailure) this.logger.error({ err: outcome.stopFailure }, 'could not kill the frozen copy; cleanup retries');
    return outcome.confirmed;
  }

  /** After the commit nothing here may fail the migration: trouble becomes a warning in the report. */
  private async cleanup(confirmed: boolean): Promise<void> {
    const { runtime, journal } = this.deps;
    const name = this.request.name;
    await this.tidy('remove the frozen copy', () => runtime.destroy(name), () => runtime.forget(name));
    await this.tidy('remove the images', () => journal.removeImages(this.migrationId));
    if (confirmed) {
      await this.tidy('record the migration as done', () => journal.update(this.migrationId, 'done'));
      return;
    }
    const entry = await journal.read(this.migrationId).catch(() => undefined);
    if (entry?.role === 'source') void deliverDecision(this.deps, entry, 'commit', this.logger);
  }

  private async tidy(what: string, work: () => Promise<void>, fallback?: () => Promise<void>): Promise<void> {
    try {
      await work();
    } catch (error) {
      const message = `could not ${what}: ${toFerryError(error).message}`;
      this.facts.warnings.push(message);
      this.logger.warn({ err: error }, message);
      await fallback?.().catch((fallbackError: unknown) => this.logger.error({ err: fallbackError }, 'fallback cleanup failed'));
    }
  }

  /**
   * Before the decision: the destination drops its copy, the container thaws
   * here. Once a post-copy destination may have resumed its copy, this one
   * thaws only after the destination confirmed that copy is gone; until then
   * it stays frozen (in doubt), and the agent keeps asking.
   */
  private async rollback(error: FerryError): Promise<void> {
    this.logger.error({ code: error.code, phase: error.phase, err: error }, 'migration failed; rolling back');
    this.peer?.send({
      type: 'abort',
      migrationId: this.migrationId,
      error: { code: error.code, message: error.message, ...(error.phase ? { phase: error.phase } : {}) },
    });
    this.disconnect();
    // CRIU's page server ends with its socket; the tasks it served stay alive and frozen.
    if (this.lazyDump) {
      this.lazyRelay?.end();
      this.lazyDump.socket.destroy();
      await withTimeout(this.lazyDump.run.done.catch(() => undefined), 30_000, 'the lazy dump to exit', 'rollback').catch(() => this.lazyDump!.run.kill());
    }
    const entry = this.offered ? await this.deps.journal.read(this.migrationId).catch(() => undefined) : undefined;
    this.peer?.close();
    if (this.remoteMayRun && entry?.role === 'source') {
      const where = this.peer?.peerName ?? this.request.destination.url;
      if (!(await deliverDecision(this.deps, entry, 'abort', this.logger, 6))) {
        error.details.push(
          `in doubt: ${where} did not confirm that its copy is gone, so the container stays frozen here (never two copies running); the agent keeps asking and thaws it once ${where} answers`,
        );
        void deliverDecision(this.deps, entry, 'abort', this.logger).then((gone) => (gone ? this.thawHere(error) : undefined));
        return;
      }
      error.details.push(`the container runs here again from its state at the freeze: what it did on ${where} since it resumed there was discarded`);
      await this.thawHere(error);
      return;
    }
    await this.thawHere(error);
    // The abort above may never arrive (a cut link), and a prepared copy waits for a decision:
    // it is delivered again on a new connection until the destination acknowledges it.
    if (entry?.role === 'source') void deliverDecision(this.deps, entry, 'abort', this.logger);
  }

  /** The container goes on here: unlocked, thawed, announced, and the migration recorded as aborted. */
  private async thawHere(error: FerryError): Promise<void> {
    const cgroup = this.deps.runtime.cgroup(this.request.name);
    const network = this.record.spec.network;
    if (network && this.networkLocked) {
      // Unlocked before the thaw, so the connections go on here; then the segment hears the address is still here.
      await unlockNetwork(this.record.pid, 'rollback').catch((unlockError: unknown) => {
        this.logger.error({ err: unlockError }, 'network unlock failed');
        error.details.push(`the container runs here again, but its network lock could not be removed: ${toFerryError(unlockError).message}`);
      });
    }
    await cgroup.thaw().catch((thawError: unknown) => this.logger.error({ err: thawError }, 'thaw failed'));
    if (network && this.networkLocked) {
      await announceAddress(this.record.pid, network).catch((announceError: unknown) => this.logger.warn({ err: announceError }, 'address announcement failed'));
    }
    const { migrationId: _, ...record } = this.record;
    await this.deps.runtime.store.write(record);
    await this.deps.journal.update(this.migrationId, 'aborted', `${error.code}: ${error.message}`).catch(() => undefined);
    await this.deps.journal.removeImages(this.migrationId).catch(() => undefined);
  }

  private emit(phase: Phase): void {
    this.request.progress({ migrationId: this.migrationId, phase, ...this.meter.snapshot() });
  }

  private report(outcome: MigrationReport['outcome']): MigrationReport {
    const precopy = this.precopy?.report();
    return buildReport({
      who: {
        migrationId: this.migrationId,
        container: this.request.name,
        source: this.deps.runtime.hostName,
        destination: this.peer?.peerName ?? this.request.destination.url,
      },
      outcome,
      facts: this.facts,
      bytes: this.meter.totals(),
      phases: this.timer.timings,
      rounds: this.precopy?.count ?? 0,
      ...(precopy ? { precopy } : {}),
      now: performance.now(),
    });
  }
}

/** A lazy dump's images all go on the files channel (its few page images hold what cannot be lazy). */
function isLazyDumpArtifact(path: string): boolean {
  return path === 'parent';
}


/** Page images travel on the pages channel; the `parent` link is remade by the destination. */
function isPageImageOrParent(path: string): boolean {
  return path === 'parent' || pageImagePattern.test(path);
}
