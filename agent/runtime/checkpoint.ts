import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, readdir, readFile, rm, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { z } from 'zod';
import type { Cgroup } from '../../src/cgroup/cgroup.ts';
import type { Criu } from '../../src/criu/criu.ts';
import { containerBoundingSet, validateImages } from '../../src/criu/images.ts';
import { faultActive } from '../../src/faults.ts';
import { isNetworkLocked, lockNetwork, unlockNetwork } from '../../src/net/lock.ts';
import type { DumpStats, RestoreStats } from '../../src/criu/stats.ts';
import { FerryError, toFerryError } from '../../src/errors.ts';
import { containerSpecSchema, type ContainerSpec } from '../../src/protocol/container.ts';
import { bulkWriteBuffer, compareDigests } from '../../src/rootfs/digest.ts';
import { packDirectory } from '../../src/rootfs/pack.ts';
import { unpackInto } from '../../src/rootfs/unpack.ts';
import { goLive, probeAddress, removeHostEnd, requireBridge, vethExternal } from './network.ts';
import { processStartTime } from './process.ts';
import type { ContainerRuntime } from './runtime.ts';
import type { ContainerRecord } from './store.ts';

// The seed's order on one host: freeze the cgroup, snapshot the rootfs while
// frozen, dump with CRIU (tasks kept frozen), then kill or thaw.

const manifestSchema = z.object({
  spec: containerSpecSchema,
  history: z.array(z.string()),
  rootfsDigests: z.record(z.string(), z.string()),
  dumpStats: z.unknown().optional(),
});

export interface CheckpointResult {
  dumpStats: DumpStats | undefined;
  frozenMs: number;
  /** Trouble after the dump succeeded: the checkpoint is complete, something was left to tidy. */
  warnings: string[];
}

/** What a checkpoint writes into the caller's directory; a failure removes these and nothing else. */
const checkpointEntries = ['images', 'rootfs.tar', 'container.json', 'dump.log'] as const;

export async function checkpointToDirectory(
  runtime: ContainerRuntime,
  criu: Criu,
  name: string,
  directory: string,
  keepRunning: boolean,
): Promise<CheckpointResult> {
  const record = await runtime.get(name);
  const cgroup = runtime.cgroup(name);
  const imagesDir = join(directory, 'images');
  const createdDirectory = await prepareCheckpointDirectory(directory);
  const frozenAt = performance.now();
  let dumpStats: DumpStats | undefined;
  /** What this checkpoint created: a failure removes these and nothing else. */
  const written: string[] = [];
  try {
    await mkdir(imagesDir);
    written.push('images');
    await freeze(cgroup);
    // Nothing the frozen copy acknowledges may be lost: the images start locked, and restore unlocks them.
    if (record.spec.network) await lockNetwork(record.pid, 'freeze');
    const digests = new Map<string, string>();
    const tarFile = createWriteStream(join(directory, 'rootfs.tar'), { flags: 'wx', highWaterMark: bulkWriteBuffer });
    tarFile.once('open', () => written.push('rootfs.tar'));
    await pipeline(packDirectory(runtime.store.rootfs(name), { digests }), tarFile)
      .catch((error: unknown) => Promise.reject(toFerryError(error, 'snapshot')));
    written.push('dump.log');
    // Test fault: a real CRIU dump failure (it cannot write inventory.img over a directory).
    if (faultActive('fail-checkpoint-dump')) await mkdir(join(imagesDir, 'inventory.img'));
    dumpStats = await dumpFrozen(criu, record, cgroup, imagesDir, join(directory, 'dump.log')).done;
    const manifest = { spec: record.spec, history: record.history, rootfsDigests: Object.fromEntries(digests), dumpStats };
    await writeFile(join(directory, 'container.json'), JSON.stringify(manifest, null, 2), { flag: 'wx' });
  } catch (error) {
    const failure = toFerryError(error, 'dump');
    if (record.spec.network) {
      await unlockNetwork(record.pid, 'rollback').catch((unlockError: unknown) =>
        failure.details.push(`the container runs again, but its network lock could not be removed: ${toFerryError(unlockError).message}`),
      );
    }
    await cgroup.thaw().catch(() => undefined);
    await removeCheckpointEntries(directory, written, createdDirectory);
    throw failure;
  }
  // From here the images are the workload: nothing may delete them, and trouble is only a warning.
  const frozenMs = performance.now() - frozenAt;
  const warnings: string[] = [];
  if (keepRunning && record.spec.network) {
    // Thawed whatever happens here; a lock that stays is said, not silently kept.
    await unlockNetwork(record.pid, 'cleanup').catch((error: unknown) =>
      warnings.push(`checkpoint written, but the container's network lock could not be removed: ${toFerryError(error).message}`),
    );
  }
  try {
    if (keepRunning) await cgroup.thaw();
    else await runtime.destroy(name);
  } catch (error) {
    warnings.push(`checkpoint written, but could not ${keepRunning ? 'thaw' : 'remove'} the container: ${toFerryError(error).message}`);
    if (!keepRunning) await runtime.forget(name).catch(() => undefined);
  }
  return { dumpStats, frozenMs, warnings };
}

/** Refuses a directory that already holds checkpoint entries; returns whether it was created here. */
async function prepareCheckpointDirectory(directory: string): Promise<boolean> {
  const existing = await readdir(directory).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw new FerryError('BAD_REQUEST', `cannot use ${directory} for a checkpoint: ${error.code ?? error.message}`, { phase: 'dump' });
  });
  if (!existing) {
    await mkdir(directory, { recursive: true, mode: 0o700 });
    return true;
  }
  const clash = checkpointEntries.find((entry) => existing.includes(entry));
  if (clash) throw new FerryError('NAME_IN_USE', `${directory} already holds ${clash}; choose an empty directory`, { phase: 'dump' });
  return false;
}

async function removeCheckpointEntries(directory: string, written: string[], createdDirectory: boolean): Promise<void> {
  for (const entry of written) await rm(join(directory, entry), { recursive: true, force: true }).catch(() => undefined);
  if (createdDirectory) await rmdir(directory).catch(() => undefined);
}

export async function freeze(cgroup: Cgroup): Promise<void> {
  await cgroup.freeze().catch((error: unknown) => Promise.reject(toFerryError(error, 'freeze', 'CGROUP_FAILED')));
}

/** CRIU dump of a container whose cgroup the caller froze; the tasks stay frozen. With a parent, only pages changed since it are written. */
export function dumpFrozen(
  criu: Pick<Criu, 'dump'>,
  record: ContainerRecord,
  cgroup: Cgroup,
  imagesDir: string,
  logFile: string,
  prevImagesDir?: string,
) {
  return criu.dump({
    pid: record.pid,
    imagesDir,
    logFile,
    freezeCgroup: cgroup.path,
    leaveRunning: true,
    privateNetwork: record.spec.privateNetwork,
    ...(prevImagesDir ? { prevImagesDir } : {}),
  });
}

export interface RestoreRequest {
  spec: ContainerSpec;
  history: string[];
  imagesDir: string;
  /** An already unpacked rootfs inside the container's directory. */
  rootfs: string;
  /** Leave tasks stopped: the caller resumes them once the source let go. */
  leaveStopped: boolean;
  /** An incoming migration holds the restored container until its commit. */
  migrationId?: string;
  logFile: string;
  /** Post-copy: memory comes from the lazy-pages daemon already listening in imagesDir. */
  lazyPages?: boolean;
}

export interface RestoreResult {
  record: ContainerRecord;
  restoreStats: RestoreStats | undefined;
  /** Wall time of the steps: the checks and set-up before CRIU, CRIU itself, the record after. */
  timing: { checkMs: number; criuMs: number; afterMs: number };
}

/** criu restore into a fresh cgroup of this host; on failure nothing is left. */
export async function restoreContainer(
  runtime: ContainerRuntime,
  criu: Criu,
  request: RestoreRequest,
): Promise<RestoreResult> {
  const name = request.spec.name;
  const cgroup = runtime.cgroup(name);
  const pidFile = join(request.imagesDir, 'restore.pid');
  const started = performance.now();
  let criuStarted = started;
  let criuDone = started;
  try {
    // The images decide what runs with which root and namespaces: only a container's are restored.
    // (The fail-restore test fault corrupts them on purpose, to see CRIU itself fail.)
    const network = request.spec.network;
    if (!faultActive('fail-restore')) {
      // An own address means an own namespace: never the host's.
      await validateImages(request.imagesDir, { privateNetwork: request.spec.privateNetwork || !!network, boundingSet: containerBoundingSet, noNewPrivs: true });
    }
    // The veth's host end is made on this host's bridge.
    const bridge = network ? await requireBridge(runtime.bridge, 'restore') : undefined;
    const external = network && bridge ? [vethExternal(name, bridge)] : [];
    // A checkpoint restored while its original (or another restore of it) runs would take its address over.
    // (A migration's own preflight probed already, allowing the container's own MAC.)
    if (network && bridge && !request.leaveStopped) await probeAddress(bridge, network.address, 'restore');
    if (network) await removeHostEnd(name);
    await cgroup.create();
    criuStarted = performance.now();
    const restoreStats = await criu.restore(
      {
        imagesDir: request.imagesDir,
        logFile: request.logFile,
        root: request.rootfs,
        pidFile,
        // Restored locked (the lock is in the images): stopped until it is off, so no send fails.
        leaveStopped: request.leaveStopped || !!network,
        privateNetwork: request.spec.privateNetwork,
        external,
        ...(request.lazyPages ? { lazyPages: true } : {}),
      },
      cgroup.procsFile,
    );
    criuDone = performance.now();
    const pid = Number((await readFile(pidFile, 'utf8')).trim());
    if (network && request.leaveStopped) {
      // A migration's copy stays locked until its commit, also if the images did not carry the lock.
      if (!(await isNetworkLocked(pid, 'restore'))) await lockNetwork(pid, 'restore');
    } else if (network) {
      // A restored checkpoint goes on now; one that cannot be unlocked fails its restore.
      await goLive(pid, await cgroup.pids(), network, 'restore', (error) => {
        throw error;
      });
    }
    const record: ContainerRecord = {
      spec: request.spec,
      pid,
      pidStartTime: (await processStartTime(pid)) ?? 0,
      createdAt: new Date().toISOString(),
      history: [...request.history, runtime.hostName],
      ...(request.migrationId ? { migrationId: request.migrationId } : {}),
    };
    await runtime.store.write(record);
    const ms = (from: number, to: number) => Math.round((to - from) * 10) / 10;
    return { record, restoreStats, timing: { checkMs: ms(started, criuStarted), criuMs: ms(criuStarted, criuDone), afterMs: ms(criuDone, performance.now()) } };
  } catch (error) {
    await cgroup.kill().catch(() => undefined);
    if (request.spec.network) await removeHostEnd(name);
    await cgroup.remove().catch(() => undefined);
    throw toFerryError(error, 'restore');
  }
}

/** Restores a checkpoint directory written by checkpointToDirectory. */
export async function restoreFromDirectory(
  runtime: ContainerRuntime,
  criu: Criu,
  directory: string,
  newName?: string,
): Promise<RestoreResult> {
  const text = await readFile(join(directory, 'container.json'), 'utf8').catch(() => undefined);
  if (!text) throw new FerryError('NOT_FOUND', `${directory} holds no ferry checkpoint (container.json)`, { phase: 'restore' });
  const manifest = manifestSchema.parse(JSON.parse(text));
  const spec = { ...manifest.spec, name: newName ?? manifest.spec.name };
  const release = await runtime.claim(spec.name);
  const rootfs = runtime.store.rootfs(spec.name);
  try {
    const digests = new Map<string, string>();
    await unpackInto(rootfs, createReadStream(join(directory, 'rootfs.tar')), digests);
    const problems = compareDigests(new Map(Object.entries(manifest.rootfsDigests)), digests);
    if (problems.length) {
      throw new FerryError('CHECKSUM_MISMATCH', `rootfs differs from the checkpoint: ${problems[0]}`, {
        phase: 'restore',
        details: problems.slice(0, 20),
      });
    }
    const imagesDir = join(directory, 'images');
    const logFile = join(directory, 'restore.log');
    return await restoreContainer(runtime, criu, { spec, history: manifest.history, imagesDir, rootfs, leaveStopped: false, logFile });
  } catch (error) {
    await runtime.store.remove(spec.name);
    throw toFerryError(error, 'restore');
  } finally {
    release();
  }
}
