import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { Criu } from '../../src/criu/criu.ts';
import { toFerryError } from '../../src/errors.ts';
import { relay } from '../../src/transport/relay.ts';
import { withTimeout } from '../../src/timeout.ts';
import { removeHostEnd } from '../runtime/network.ts';
import type { ContainerRuntime } from '../runtime/runtime.ts';
import { commitOnce } from './decisions.ts';
import type { MigrationJournal, SourceEntry } from './journal.ts';
import { PeerLink, type PeerIdentity } from './peer.ts';

export interface RejoinDependencies {
  runtime: Pick<ContainerRuntime, 'cgroup' | 'destroy' | 'store'>;
  journal: MigrationJournal;
  identity: PeerIdentity;
  criu: () => Promise<Pick<Criu, 'lazyDump'>>;
}

/** How long a restarted source keeps asking a destination that still hears the dead agent's connection. */
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
  const link = await connectAndRejoin(deps, entry, logger);
  if (!link) return 'refused';
  const { peer, prepared } = link;
  let dump: ReturnType<Criu['lazyDump']> | undefined;
  try {
    if (!prepared) {
      const criu = await deps.criu();
      const directory = journal.directory(entry.migrationId);
      const imagesDir = join(directory, 'images', 'rejoin');
      await rm(imagesDir, { recursive: true, force: true });
      await mkdir(imagesDir, { recursive: true, mode: 0o700 });
      dump = criu.lazyDump({
        pid: record.pid,
        imagesDir,
        logFile: join(directory, 'dump-rejoin.log'),
        freezeCgroup: cgroup.path,
        leaveRunning: true,
        privateNetwork: record.spec.privateNetwork,
      });
      dump.socket.on('error', () => undefined);
      dump.run.done.catch(() => undefined);
      await withTimeout(dump.ready, 60_000, 'the lazy dump of the frozen copy', 'postcopy');
      const channel = await peer.openChannel(entry.migrationId, 'pages');
      const pages = relay(channel, dump.socket, 'postcopy');
      logger.warn('post-copy: serving the pages again after a restart');
      await peer.inbox.expect('prepared', pagesTimeoutMs, 'postcopy');
      logger.info({ pageBytes: pages.sent }, 'post-copy: every page is on the destination');
      await withTimeout(dump.run.done, 30_000, 'the lazy dump to exit', 'postcopy').catch(() => dump?.run.kill());
    }
  } catch (error) {
    logger.error({ err: error }, 'post-copy: could not serve the pages again');
    dump?.socket.destroy();
    if (dump) await withTimeout(dump.run.done.catch(() => undefined), 30_000, 'the lazy dump to exit', 'postcopy').catch(() => dump?.run.kill());
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

/** A link on which the destination took the rejoin; undefined when it refused or could not be reached. */
async function connectAndRejoin(deps: RejoinDependencies, entry: SourceEntry, logger: Logger): Promise<{ peer: PeerLink; prepared: boolean } | undefined> {
  for (let attempt = 1; attempt <= rejoinAttempts; attempt += 1) {
    let peer: PeerLink | undefined;
    try {
      peer = await PeerLink.connect(entry.destination, deps.identity);
      peer.inbox.enter('postcopy');
      peer.send({ type: 'rejoin', migrationId: entry.migrationId });
      const rejoined = await peer.inbox.expect('rejoined', 30_000, 'postcopy');
      return { peer, prepared: rejoined.prepared };
    } catch (error) {
      peer?.close();
      const failure = toFerryError(error);
      // The destination may not have noticed yet that the dead agent's connection is gone.
      const retry = failure.code === 'PEER_GONE' || failure.code === 'TIMEOUT' || /still connected/.test(failure.message) || !peer;
      logger.warn({ err: failure, attempt }, 'post-copy: the destination did not take the rejoin');
      if (!retry || attempt === rejoinAttempts) return undefined;
      await sleep(1_000);
    }
  }
  return undefined;
}
