import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import type WebSocket from 'ws';
import type { Criu, LazyDump } from '../../src/criu/criu.ts';
import type { Destination } from '../../src/protocol/messages.ts';
import { toFerryError } from '../../src/errors.ts';
import { relay, type Relay } from '../../src/transport/relay.ts';
import { withTimeout } from '../../src/timeout.ts';
import { removeHostEnd } from '../runtime/network.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import { commitOnce } from './decisions.ts';
import type { MigrationJournal, SourceEntry } from './journal.ts';
import { PeerLink, type PeerIdentity, type SourcePeer } from './peer.ts';

export interface RejoinDependencies {
  runtime: Pick<ContainerRuntime, 'cgroup' | 'destroy' | 'store'>;
  journal: MigrationJournal;
  identity: PeerIdentity;
  criu: () => Promise<Pick<Criu, 'lazyDump'>>;
}

/** How many seconds a restarted source keeps trying to reach the destination (its link may still be down). */
const rejoinAttempts = 10;
/** A post-copy's last pages: as long as the migration's own default timeout. */
const pagesTimeoutMs = 30 * 60_000;

/**
 * Post-copy after this (source) agent restarted: the destination's copy may
 * still run, waiting on pages only the frozen tasks here hold. A new lazy
 * dump of those tasks (frozen since the freeze, so the same memory) serves
 * them again on a new pages channel; once every page is there the
 * migration is committed as the dead agent would have. Resolves with
 * 'committed', or 'refused' when the destination's copy no longer waits or
 * the tasks here cannot serve it: then the caller aborts as before.
 */
export async function rejoinPostcopy(deps: RejoinDependencies, entry: SourceEntry, logger: Logger): Promise<'committed' | 'refused'> {
  const { runtime, journal } = deps;
  const record = await runtime.store.read(entry.container);
  const cgroup = runtime.cgroup(entry.container);
  if (!record || !(await cgroup.isFrozen()) || !(await cgroup.pids()).includes(record.pid)) {
    logger.warn('post-copy: the frozen copy here is not whole; not serving its pages again');
    return 'refused';
  }
  const link = await connectAndRejoin(deps.identity, entry, logger);
  if (!link) return 'refused';
  const { peer, prepared } = link;
  let served: ServedAgain | undefined;
  try {
    if (!prepared) {
      served = await serveAgain(await deps.criu(), {
        peer,
        migrationId: entry.migrationId,
        pid: record.pid,
        cgroupPath: cgroup.path,
        directory: journal.directory(entry.migrationId),
        privateNetwork: record.spec.privateNetwork,
      });
      logger.warn('post-copy: serving the pages again after a restart');
      await peer.inbox.expect('prepared', pagesTimeoutMs, 'postcopy');
      logger.info({ pageBytes: served.relay.sent }, 'post-copy: every page is on the destination');
      await served.finish();
    }
  } catch (error) {
    logger.error({ err: error }, 'post-copy: could not serve the pages again');
    await served?.stop();
    peer.close();
    return 'refused';
  }
  peer.inbox.enter('confirm');
  const outcome = await commitOnce({
    record: () => journal.update(entry.migrationId, 'committed'),
    send: () => peer.send({ type: 'decision', migrationId: entry.migrationId, decision: 'commit' }),
    stopLocalCopy: async () => {
      if (record.spec.network) await removeHostEnd(entry.container);
      await cgroup.kill();
    },
    awaitDecided: () => peer.inbox.expect('decided', 60_000, 'confirm'),
  });
  peer.close();
  for (const warning of outcome.warnings) logger.warn(warning);
  await runtime.destroy(entry.container).catch((error: unknown) => logger.error({ err: error }, 'could not remove the frozen copy'));
  await journal.removeImages(entry.migrationId).catch(() => undefined);
  if (outcome.confirmed) await journal.update(entry.migrationId, 'done');
  logger.warn({ confirmed: outcome.confirmed }, 'post-copy finished after a restart: committed, the container runs on the destination');
  // Unconfirmed: the recovery of 'committed' re-delivers it (the caller).
  return 'committed';
}

/** A lazy dump serving the frozen tasks' pages again, joined to a new pages channel. */
export interface ServedAgain {
  dump: LazyDump;
  relay: Relay;
  channel: WebSocket;
  /** Every page is there: the page server exits (killed if it does not). */
  finish(): Promise<void>;
  /** Ends it early: the page server goes, the tasks stay frozen. */
  stop(): Promise<void>;
}

/**
 * A new `criu dump --lazy-pages` of the frozen tasks (the same memory as at
 * the freeze) into its own directory, its page server joined to a new pages
 * channel on `peer`. The destination's page relay asks again for whatever
 * it still lacks.
 */
export async function serveAgain(
  criu: Pick<Criu, 'lazyDump'>,
  target: { peer: SourcePeer; migrationId: string; pid: number; cgroupPath: string; directory: string; privateNetwork: boolean | undefined },
): Promise<ServedAgain> {
  const imagesDir = join(target.directory, 'images', `again-${Date.now()}`);
  await mkdir(imagesDir, { recursive: true, mode: 0o700 });
  const dump = criu.lazyDump({
    pid: target.pid,
    imagesDir,
    logFile: join(target.directory, 'dump-again.log'),
    freezeCgroup: target.cgroupPath,
    leaveRunning: true,
    ...(target.privateNetwork ? { privateNetwork: true } : {}),
  });
  dump.socket.on('error', () => undefined);
  dump.run.done.catch(() => undefined);
  const finish = () => dump.run.letFinish('the lazy dump to exit', 'postcopy');
  const stop = async () => {
    dump.socket.destroy();
    await finish();
  };
  try {
    await withTimeout(dump.ready, 60_000, 'the lazy dump of the frozen copy', 'postcopy');
    const channel = await target.peer.openChannel(target.migrationId, 'pages');
    return { dump, relay: relay(channel, dump.socket, 'postcopy'), channel, finish, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

/**
 * A link on which the destination took the rejoin; undefined when it
 * refused (its copy no longer waits) or could not be reached in time.
 */
export async function connectAndRejoin(
  identity: PeerIdentity,
  entry: { destination: Destination; migrationId: string },
  logger: Logger,
  deadline = performance.now() + rejoinAttempts * 1_000,
): Promise<{ peer: PeerLink; prepared: boolean } | undefined> {
  for (let attempt = 1; ; attempt += 1) {
    let peer: PeerLink | undefined;
    try {
      peer = await PeerLink.connect(entry.destination, identity);
      peer.inbox.enter('postcopy');
      peer.send({ type: 'rejoin', migrationId: entry.migrationId });
      const rejoined = await peer.inbox.expect('rejoined', 30_000, 'postcopy');
      return { peer, prepared: rejoined.prepared };
    } catch (error) {
      peer?.close();
      const failure = toFerryError(error);
      // Not reached (the link may still be down): asked again until the deadline. Refused: its copy no longer waits.
      // Nobody listening there: that agent is down, and its copy with it (its guard stops it); the caller settles that.
      const refused = (peer !== undefined && failure.code === 'NOT_FOUND') || /ECONNREFUSED/.test(failure.message);
      logger.warn({ err: failure, attempt }, 'post-copy: the destination did not take the rejoin');
      if (refused || performance.now() + 1_000 > deadline) return undefined;
      await sleep(1_000);
    }
  }
}
