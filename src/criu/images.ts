import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import { FerryError } from '../errors.ts';

// Reads just enough of a CRIU image set (images/*.proto) to check that it is
// a ferry container before `criu restore` runs it: a hostile source could
// send the images of a host process, which CRIU would restore with the
// host's root and namespaces.

/** Magics CRIU writes before an image's own magic (criu/include/magic.h). */
const commonMagic = 0x54564319;
const serviceMagic = 0x55105940;

/** TaskKobjIdsEntry field numbers of the namespaces a container must own. */
const namespaceFields = { pid: 5, net: 6, ipc: 7, uts: 8, mnt: 9 } as const;
type Namespace = keyof typeof namespaceFields;

type Fields = Map<number, Array<bigint | Uint8Array>>;

/** The protobuf records of an image file, after its magic(s). */
export function imageRecords(image: Uint8Array): Uint8Array[] {
  const view = new DataView(image.buffer, image.byteOffset, image.byteLength);
  if (image.length < 4) throw new Error('image too short');
  const first = view.getUint32(0, true);
  let offset = first === commonMagic || first === serviceMagic ? 8 : 4;
  const records: Uint8Array[] = [];
  while (offset + 4 <= image.length) {
    const length = view.getUint32(offset, true);
    offset += 4;
    if (offset + length > image.length) throw new Error('image record truncated');
    records.push(image.subarray(offset, offset + length));
    offset += length;
  }
  return records;
}

/** Top-level fields of one record: varints as bigint, length-delimited as bytes. */
export function decodeFields(bytes: Uint8Array): Fields {
  const reader = new BinaryReader(bytes);
  const fields: Fields = new Map();
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    let value: bigint | Uint8Array | undefined;
    if (wireType === WireType.Varint) value = BigInt(reader.uint64());
    else if (wireType === WireType.LengthDelimited) value = reader.bytes();
    else reader.skip(wireType);
    if (value === undefined) continue;
    const values = fields.get(field) ?? [];
    values.push(value);
    fields.set(field, values);
  }
  return fields;
}

function number(fields: Fields, field: number): number | undefined {
  const value = fields.get(field)?.[0];
  return typeof value === 'bigint' ? Number(value) : undefined;
}

function message(fields: Fields, field: number): Fields | undefined {
  const value = fields.get(field)?.[0];
  return value instanceof Uint8Array ? decodeFields(value) : undefined;
}

/** Repeated uint32 fields may come packed or one per tag. */
function numbers(fields: Fields, field: number): number[] {
  const result: number[] = [];
  for (const value of fields.get(field) ?? []) {
    if (typeof value === 'bigint') {
      result.push(Number(value));
      continue;
    }
    const reader = new BinaryReader(value);
    while (reader.pos < reader.len) result.push(reader.uint32());
  }
  return result;
}

export interface ImageTask {
  pid: number;
  threads: number[];
}

export interface ImageSummary {
  root: ImageTask;
  tasks: ImageTask[];
  /** Namespaces of the root task that differ from those of the dumping CRIU (the host's). */
  ownNamespaces: Namespace[];
  /** Per thread id, from its core image. */
  creds: Map<number, ThreadCreds>;
}

export interface ThreadCreds {
  boundingSet: bigint;
  /** Inheritable, permitted and effective together. */
  heldSet: bigint;
  noNewPrivs: boolean;
}

/** The images read here describe tasks, not memory: a few KiB each; anything larger is not one of ferry's. */
const maxImageBytes = 16 * 1024 * 1024;
const maxTasks = 65_536;
/** TaskCoreEntry.task_state of an exited task (CRIU's TASK_DEAD). */
const taskDead = 2;

async function records(imagesDir: string, name: string): Promise<Fields[]> {
  const path = join(imagesDir, name);
  const size = await stat(path).then((stats) => (stats.isFile() ? stats.size : -1), () => undefined);
  if (size === undefined) throw refuse(`the image set has no ${name}`);
  if (size < 0 || size > maxImageBytes) throw refuse(`${name} is not a plain file of at most ${maxImageBytes} bytes`);
  try {
    return imageRecords(await readFile(path)).map(decodeFields);
  } catch (error) {
    throw refuse(`${name} is not a CRIU image: ${(error as Error).message}`);
  }
}

/** Decodes a nested message, turning malformed bytes into a refusal that names the image. */
function nested(fields: Fields | undefined, field: number, image: string): Fields | undefined {
  if (!fields) return undefined;
  try {
    return message(fields, field);
  } catch (error) {
    throw refuse(`${image} is not a CRIU image: ${(error as Error).message}`);
  }
}

function capabilitySet(creds: Fields, field: number): bigint {
  const [low = 0, high = 0] = numbers(creds, field);
  return (BigInt(high) << 32n) | BigInt(low);
}

/** What the image set says about its process tree, namespaces and credentials. */
export async function summarizeImages(imagesDir: string): Promise<ImageSummary> {
  const [inventory] = await records(imagesDir, 'inventory.img');
  const hostIds = nested(inventory, 3, 'inventory.img');
  if (!hostIds) throw refuse('inventory.img has no root namespace ids');
  const entries = await records(imagesDir, 'pstree.img');
  if (entries.length > maxTasks) throw refuse(`pstree.img lists more than ${maxTasks} tasks`);
  const tasks = entries.map((fields) => {
    const pid = number(fields, 1);
    if (pid === undefined) throw refuse('pstree.img has an entry without a pid');
    return { pid, threads: numbers(fields, 5) };
  });
  const root = tasks[0];
  if (!root) throw refuse('pstree.img lists no task');
  // A zombie (exited, not yet reaped) has a core image and nothing else: CRIU restores it as a
  // task that exits at once, running nothing of the image, so it has no namespaces or credentials to check.
  const zombies = new Set<number>();
  // Kept: a live task's main thread reads its core image again for the credentials below.
  const cores = new Map<number, Fields | undefined>();
  for (const task of tasks) {
    const image = `core-${task.pid}.img`;
    const [core] = await records(imagesDir, image);
    cores.set(task.pid, core);
    if (number(nested(core, 3, image) ?? new Map(), 1) === taskDead) zombies.add(task.pid);
  }
  if (zombies.has(root.pid)) throw refuse('the root task is a zombie');
  const alive = tasks.filter((task) => !zombies.has(task.pid));
  const namespacesOf = async (pid: number) => {
    const [ids] = await records(imagesDir, `ids-${pid}.img`);
    if (!ids) throw refuse(`ids-${pid}.img is empty`);
    return (Object.keys(namespaceFields) as Namespace[]).map((namespace) => number(ids, namespaceFields[namespace]));
  };
  const rootNamespaces = await namespacesOf(root.pid);
  // Every task lives in the root task's namespaces: none may sit in the host's.
  for (const task of alive.slice(1)) {
    if ((await namespacesOf(task.pid)).some((id, index) => id !== rootNamespaces[index])) {
      throw refuse(`task ${task.pid} is not in the namespaces of the container's init`);
    }
  }
  const ownNamespaces = (Object.keys(namespaceFields) as Namespace[]).filter((namespace, index) => {
    const id = rootNamespaces[index];
    return id !== undefined && id !== number(hostIds, namespaceFields[namespace]);
  });
  const threads = alive.flatMap((task) => (task.threads.length ? task.threads : [task.pid]));
  if (threads.length > maxTasks) throw refuse(`pstree.img lists more than ${maxTasks} threads`);
  const creds = new Map<number, ThreadCreds>();
  for (const thread of threads) {
    const image = `core-${thread}.img`;
    const core = cores.has(thread) ? cores.get(thread) : (await records(imagesDir, image))[0];
    const threadCreds = nested(nested(core, 5, image), 10, image);
    if (!threadCreds) throw refuse(`${image} has no credentials`);
    creds.set(thread, {
      boundingSet: capabilitySet(threadCreds, 12),
      // Permitted is not limited by the bounding set: a restored task gets what its image says.
      heldSet: capabilitySet(threadCreds, 9) | capabilitySet(threadCreds, 10) | capabilitySet(threadCreds, 11),
      noNewPrivs: number(threadCreds, 18) === 1,
    });
  }
  return { root, tasks, ownNamespaces, creds };
}

/**
 * The OCI default capabilities that ferry-helper leaves a container (chown,
 * dac_override, fowner, fsetid, kill, setgid, setuid, setpcap,
 * net_bind_service, net_raw, sys_chroot, mknod, audit_write, setfcap).
 */
export const containerBoundingSet = 0xa80425fbn;

export interface ContainerExpectations {
  privateNetwork: boolean;
  /** When set, no thread may hold a capability outside this bounding set. */
  boundingSet?: bigint;
  /** When set, every thread must have no_new_privs. */
  noNewPrivs?: boolean;
}

/**
 * Refuses (UNSAFE_ARCHIVE) an image set that is not a ferry container: the
 * root must be PID 1 of its own PID namespace, in its own mount, UTS and IPC
 * namespaces (and network, when the spec says so), with credentials no wider
 * than a container's.
 */
export async function validateImages(imagesDir: string, expected: ContainerExpectations): Promise<ImageSummary> {
  const summary = await summarizeImages(imagesDir);
  if (summary.root.pid !== 1) throw refuse(`the root task is pid ${summary.root.pid}, not the init (pid 1) of its own PID namespace`);
  const required: Namespace[] = ['pid', 'mnt', 'uts', 'ipc', ...(expected.privateNetwork ? (['net'] as const) : [])];
  const shared = required.filter((namespace) => !summary.ownNamespaces.includes(namespace));
  if (shared.length) throw refuse(`the tasks share the dumping host's ${shared.join(', ')} namespace${shared.length > 1 ? 's' : ''}`);
  for (const [thread, creds] of summary.creds) {
    if (expected.boundingSet !== undefined && ((creds.boundingSet | creds.heldSet) & ~expected.boundingSet) !== 0n) {
      const sets = `bounding 0x${creds.boundingSet.toString(16)}, held 0x${creds.heldSet.toString(16)}`;
      throw refuse(`thread ${thread} holds capabilities outside a container's set (${sets})`);
    }
    if (expected.noNewPrivs && !creds.noNewPrivs) throw refuse(`thread ${thread} may gain privileges (no_new_privs is off)`);
  }
  return summary;
}

function refuse(reason: string): FerryError {
  return new FerryError('UNSAFE_ARCHIVE', `refused CRIU images: ${reason}`, { phase: 'restore' });
}
