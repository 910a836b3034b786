import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Logger } from 'pino';
import { CgroupTree } from '../src/cgroup/cgroup.ts';
import { Criu, readKernelRelease } from '../src/criu/criu.ts';
import { capacity, freeBytes } from '../src/host/capacity.ts';
import type { Capability } from '../src/protocol/host.ts';
import type { RequestHandlers } from './control.ts';
import { ControlConnection } from './control.ts';
import { AgentMetrics } from './metrics.ts';
import { DestinationSessions } from './migration/destination.ts';
import { MigrationJournal } from './migration/journal.ts';
import { recoverMigrations, tidyFinished } from './migration/recovery.ts';
import { ensurePipeMaxSize, lazyPipeBytes } from '../src/host/pipe-size.ts';
import type { PeerIdentity } from './migration/peer.ts';
import { MigrationSource } from './migration/source.ts';
import { checkpointToDirectory, restoreFromDirectory } from './runtime/checkpoint.ts';
import { removeStaleNamespaces } from './runtime/network.ts';
import { ContainerRuntime } from './runtime/runtime.ts';
import { securePrivateState } from './runtime/store.ts';
import { AgentEndpoint, type TlsFiles } from './server.ts';

export interface AgentOptions {
  name: string;
  host: string;
  port: number;
  token: string;
  stateDir: string;
  cgroupRoot: string;
  logger: Logger;
  /** The host bridge for containers with their own address. */
  bridge?: string;
  tls?: TlsFiles;
  criuPath?: string;
}

export interface RunningAgent {
  url: string;
  close(): Promise<void>;
}

/** Assembles the agent from its parts; each part gets only what it needs. */
export async function startAgent(options: AgentOptions): Promise<RunningAgent> {
  const { logger } = options;
  const runtime = new ContainerRuntime({
    stateDir: options.stateDir,
    cgroups: await CgroupTree.open(options.cgroupRoot),
    hostName: options.name,
    logger,
    ...(options.bridge ? { bridge: options.bridge } : {}),
  });
  const criu = lazyCriu(options.criuPath, join(options.stateDir, 'criu.kdat'));
  const journal = new MigrationJournal(options.stateDir);
  await securePrivateState(options.stateDir, runtime.store, journal.root);
  await removeStaleNamespaces(runtime.namespacePrefix);
  const metrics = new AgentMetrics(options.name, async () => (await runtime.store.names()).length);
  const destinations = new DestinationSessions({
    runtime,
    criu,
    journal,
    logger,
    onOutcome: (outcome) => (outcome === 'succeeded' ? metrics.incomingSucceeded() : metrics.migrationFailed('destination')),
  });
  const identity: PeerIdentity = {
    hostName: options.name,
    ...(options.tls ? { cert: readFileSync(options.tls.cert), key: readFileSync(options.tls.key) } : {}),
  };
  let outgoing = 0;

  const handlers: RequestHandlers = {
    info: async () => ({
      name: options.name,
      kernel: await readKernelRelease(),
      ...(await criu().then(
        (found) => ({ criu: { path: found.path, version: found.version.text } }),
        () => ({}),
      )),
      capabilities: await capabilities(criu),
      capacity: capacity(await freeBytes(options.stateDir)),
      containers: await runtime.list(),
      migrations: outgoing + destinations.size,
    }),
    run: async (request) => runtime.run(request.spec),
    list: async () => ({ containers: await runtime.list() }),
    logs: async (request) => ({ text: await runtime.logs(request.name, request.tailBytes) }),
    stop: async (request) => runtime.stop(request.name, request.graceMs),
    remove: async (request) => {
      await runtime.remove(request.name, request.force);
      return { removed: request.name };
    },
    checkpoint: async (request) => {
      const result = await checkpointToDirectory(runtime, await criu(), request.name, request.directory, request.keepRunning);
      return { directory: request.directory, frozenMs: result.frozenMs, dumpStats: result.dumpStats, ...(result.warnings.length ? { warnings: result.warnings } : {}) };
    },
    restore: async (request) => {
      const { record } = await restoreFromDirectory(runtime, await criu(), request.directory, request.name);
      return runtime.describe(record);
    },
    migrate: async (request, context) => {
      outgoing += 1;
      const source = new MigrationSource(
        { runtime, criu, journal, logger, identity },
        { ...request, progress: context.progress, signal: context.signal },
      );
      try {
        const report = await source.run();
        metrics.migrationEnded(report);
        return report;
      } catch (error) {
        // An unknown, stopped or already leaving container is refused, not rolled back.
        metrics.migrationFailed('source', source.claimed ? 'rolled-back' : 'refused');
        throw error;
      } finally {
        outgoing -= 1;
      }
    },
    cancel: async () => ({ cancelled: false }),
    'migration-status': async (request) => {
      const entry = await journal.read(request.migrationId);
      return { migrationId: request.migrationId, state: entry?.state ?? 'unknown' };
    },
  };

  const endpoint = new AgentEndpoint({
    host: options.host,
    port: options.port,
    token: options.token,
    logger,
    ...(options.tls ? { tls: options.tls } : {}),
    onControl: (socket) => new ControlConnection(socket, logger, handlers, destinations, options.name),
    onData: (socket, migrationId, channel) => destinations.onData(socket, migrationId, channel),
    onHttp: async (request, response) => {
      if (request.url !== '/metrics') return false;
      response.setHeader('content-type', metrics.registry.contentType);
      response.end(await metrics.registry.metrics());
      return true;
    },
  });
  // Post-copy needs it (src/host/pipe-size.ts); said in the log, and `ferry doctor` shows it.
  const pipes = await ensurePipeMaxSize();
  if (pipes.raised) logger.warn({ before: pipes.before, after: pipes.after }, 'raised fs.pipe-max-size for post-copy (CRIU\'s lazy page server)');
  else if (pipes.after < lazyPipeBytes) logger.warn({ pipeMaxSize: pipes.after }, 'fs.pipe-max-size is below what post-copy needs; post-copy migrations from here will be refused');
  await endpoint.listen();
  // The socket probe (a real CRIU dump, ~1 s) runs now rather than in the first migration's preflight.
  void criu().then((found) => found.socketCheckpoint()).catch(() => undefined);
  void recoverMigrations({ runtime, journal, logger, identity, criu });
  // A long-running agent drops old finished migrations too, not only at its start.
  setInterval(() => void tidyFinished({ journal, logger }).catch(() => undefined), 6 * 3600_000).unref();
  return { url: endpoint.url, close: () => endpoint.close() };
}

/** CRIU is looked up on first use, so an agent without it still serves `info` and runs nothing CRIU needs. */
function lazyCriu(explicitPath: string | undefined, probeCache: string): () => Promise<Criu> {
  let found: Promise<Criu> | undefined;
  const prepare = async () => {
    const criu = await Criu.locate(explicitPath);
    await mkdir(dirname(probeCache), { recursive: true });
    await criu.useKernelProbeCache(probeCache);
    return criu;
  };
  return () => {
    found ??= prepare().catch((error: unknown) => {
      found = undefined;
      throw error;
    });
    return found;
  };
}

async function capabilities(criu: () => Promise<Criu>): Promise<Capability[]> {
  const found = await criu().catch(() => undefined);
  if (!found) return [{ name: 'criu', ok: false, value: 'missing', required: true }];
  // Asked once per agent (every heartbeat's info lands here), not a CRIU run each time.
  const tracking = await found.memoryTracking();
  const sockets = await found.socketCheckpoint();
  return [
    { name: 'criu', ok: true, value: found.version.text, required: true },
    { name: 'memory dirty tracking', ok: tracking, value: tracking ? 'present' : 'absent', required: false },
    { name: 'socket checkpoint', ok: !sockets, value: sockets ? `fails: ${sockets}` : 'works', required: false },
  ];
}
