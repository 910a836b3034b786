// The naming scheme of every resource the lab creates. Everything is
// named from the run id, so cleanup and leftover checks can find a run's
// resources by name alone, even after the process that made them is gone.
import { randomBytes } from 'node:crypto';
import { LabError } from './system.ts';

/** Fresh per test process (per module instance), 6 hex chars. */
export const runId: string = randomBytes(3).toString('hex');

export const RUN_ID_PATTERN = /^[0-9a-f]{6}$/;
/** Every netns, cgroup dir and /tmp dir of the lab starts with this. */
export const RESOURCE_PREFIX = 'ferryt-';
export const STATE_BASE = '/tmp';
/** The kernel's limit on interface names (IFNAMSIZ - 1). */
const MAX_LINK_NAME = 15;

export function runPrefix(id: string): string {
  return `${RESOURCE_PREFIX}${id}-`;
}

export function runStateRoot(id: string): string {
  return `${STATE_BASE}/${RESOURCE_PREFIX}${id}`;
}

/** Holds "<pid> <starttime>" of the process owning the run; see cleanup.ts. */
export function ownerFile(id: string): string {
  return `${runStateRoot(id)}/owner.pid`;
}

/** Link names are ft<runid>...: netns-style names would not fit in 15 characters. */
export function rootLinkPrefix(id: string): string {
  return `ft${id}`;
}

/** The run id a resource name belongs to, if it follows the scheme. */
export function runIdOf(name: string): string | undefined {
  const match = /^(?:ferryt-([0-9a-f]{6})(?:-|$)|ft([0-9a-f]{6})c\d+$)/.exec(name);
  return match?.[1] ?? match?.[2];
}

/** The run id of the first state path (e.g. /tmp/ferryt-1a2b3c/...) in a path or command line. */
export function runIdInText(text: string): string | undefined {
  return new RegExp(`${STATE_BASE}/${RESOURCE_PREFIX}([0-9a-f]{6})(?![0-9a-f])`).exec(text)?.[1];
}

export interface HostNames {
  name: string;
  netns: string;
  cgroupName: string;
  stateDir: string;
  /** The host's port on the switch bridge (lives in the switch netns). */
  switchPort: string;
}

export interface ClusterNames {
  /** Cluster-local id, e.g. "c1": a process may hold several clusters. */
  id: string;
  /** Prefix of this cluster's netns and cgroup names. */
  prefix: string;
  switchNetns: string;
  bridge: string;
  /** Root-netns end of the controller link, and its peer in the switch netns. */
  controllerLink: string;
  controllerPeer: string;
  host(index: number): HostNames;
}

export function clusterNames(id: string, clusterIndex: number): ClusterNames {
  const clusterId = `c${clusterIndex}`;
  const prefix = `${runPrefix(id)}${clusterId}-`;
  const statePrefix = `${runStateRoot(id)}/${clusterId}-`;
  const links = rootLinkPrefix(id);
  return {
    id: clusterId,
    prefix,
    switchNetns: `${prefix}sw`,
    bridge: linkName(`${links}br`),
    controllerLink: linkName(`${links}${clusterId}`),
    controllerPeer: linkName(`${links}ctl`),
    host(index: number): HostNames {
      const name = `h${index}`;
      return {
        name,
        netns: `${prefix}${name}`,
        cgroupName: `${prefix}${name}`,
        stateDir: `${statePrefix}${name}`,
        switchPort: linkName(`${links}p${index}`),
      };
    },
  };
}

function linkName(name: string): string {
  if (name.length > MAX_LINK_NAME) {
    throw new LabError('NAME_TOO_LONG', `link name ${name} is longer than ${MAX_LINK_NAME} characters`);
  }
  return name;
}
