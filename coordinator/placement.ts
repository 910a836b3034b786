// Pure placement: which host should a container move to? No I/O, so it can be
// tested on fabricated host infos and called repeatedly while planning.
import type { ContainerInfo } from '../src/protocol/container.ts';
import { compareVersions } from '../src/criu/version.ts';
import type { HostInfo } from '../src/protocol/host.ts';

export const ANTI_AFFINITY_LABEL = 'anti-affinity';

export interface CandidateHost {
  name: string;
  draining: boolean;
  /** ms since the epoch of the last successful heartbeat. */
  lastHeartbeatMs: number | undefined;
  info: HostInfo | undefined;
  /** Cap on the memory all containers on this host may use. */
  memoryLimitBytes?: number | undefined;
  /** What migrations in flight towards this host will bring: memory, disk, anti-affinity groups. */
  promised?: { memoryBytes: number; diskBytes: number; groups?: readonly string[]; containers?: readonly string[] };
}

export interface PlacementRequest {
  container: Pick<ContainerInfo, 'name' | 'labels'> & { memoryBytes?: number | undefined; rootfsBytes?: number | undefined };
  source: CandidateHost;
  hosts: CandidateHost[];
  /** Hosts not to choose (e.g. one where this container's migration already failed). */
  exclude?: ReadonlySet<string>;
  /** Only these hosts, when given (`evacuate --to B,C`). */
  allowed?: readonly string[] | undefined;
  nowMs: number;
  /** A heartbeat older than this means the host is down. */
  staleMs: number;
  marginBytes: number;
  /** Undo puts containers back where they ran together before: their groups were already there. */
  ignoreAntiAffinity?: boolean;
}

export type RejectReason =
  | 'source'
  | 'draining'
  | 'excluded'
  | 'not-allowed'
  | 'down'
  | 'no-criu'
  | 'criu-older'
  | 'memory'
  | 'disk'
  | 'anti-affinity';

export type PlacementDecision =
  | { ok: true; target: string; freeMemoryBytes: number }
  | { ok: false; code: 'NO_TARGET'; message: string; rejected: Record<string, RejectReason> };

/** Chooses a target, or says for each host why it cannot take the container. */
export function place(request: PlacementRequest): PlacementDecision {
  const rejected: Record<string, RejectReason> = {};
  const fitting: Array<{ host: CandidateHost; free: number; containers: number }> = [];
  for (const host of request.hosts) {
    const reason = rejectReason(request, host);
    if (reason) {
      rejected[host.name] = reason;
      continue;
    }
    fitting.push({ host, free: freeMemory(host), containers: host.info!.containers.length });
  }
  // Least loaded: fewest containers, then most free memory, then name (stable).
  fitting.sort((a, b) => a.containers - b.containers || b.free - a.free || a.host.name.localeCompare(b.host.name));
  const best = fitting[0];
  if (best) return { ok: true, target: best.host.name, freeMemoryBytes: best.free };
  const why = Object.entries(rejected).map(([name, reason]) => `${name}: ${reason}`).join(', ');
  return { ok: false, code: 'NO_TARGET', message: `no host fits ${request.container.name} (${why || 'no hosts'})`, rejected };
}

function rejectReason(request: PlacementRequest, host: CandidateHost): RejectReason | undefined {
  const { container } = request;
  if (host.name === request.source.name) return 'source';
  if (request.allowed && !request.allowed.includes(host.name)) return 'not-allowed';
  if (request.exclude?.has(host.name)) return 'excluded';
  if (host.draining) return 'draining';
  if (!host.info || host.lastHeartbeatMs === undefined || request.nowMs - host.lastHeartbeatMs > request.staleMs) return 'down';
  const sourceCriu = request.source.info?.criu?.version;
  const targetCriu = host.info.criu?.version;
  if (!sourceCriu || !targetCriu) return 'no-criu';
  if (compareVersions(targetCriu, sourceCriu) < 0) return 'criu-older';
  // Anti-affinity first: it holds whatever the sizes, so it is the truer reason.
  const group = container.labels[ANTI_AFFINITY_LABEL];
  if (group !== undefined && !request.ignoreAntiAffinity && groupsOn(host).includes(group)) return 'anti-affinity';
  if ((container.memoryBytes ?? 0) + request.marginBytes > freeMemory(host)) return 'memory';
  if ((container.rootfsBytes ?? 0) + request.marginBytes > host.info.capacity.diskFreeBytes - (host.promised?.diskBytes ?? 0)) return 'disk';
  return undefined;
}

/** Anti-affinity groups on a host, counting containers still on their way there. */
function groupsOn(host: CandidateHost): string[] {
  const running = (host.info?.containers ?? []).map((other) => other.labels[ANTI_AFFINITY_LABEL]);
  return [...running, ...(host.promised?.groups ?? [])].filter((group): group is string => group !== undefined);
}

/** What placement may still fill: the reported free memory, capped by the configured limit, minus promises. */
export function freeMemory(host: CandidateHost): number {
  if (!host.info) return 0;
  let free = host.info.capacity.memoryAvailableBytes;
  if (host.memoryLimitBytes !== undefined) {
    // A container still arriving is already counted in the promise, not twice.
    const arriving = new Set(host.promised?.containers ?? []);
    const used = host.info.containers
      .filter((container) => !arriving.has(container.name))
      .reduce((sum, container) => sum + (container.memoryBytes ?? 0), 0);
    free = Math.min(free, host.memoryLimitBytes - used);
  }
  return free - (host.promised?.memoryBytes ?? 0);
}
