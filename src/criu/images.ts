import { readFile } from 'node:fs/promises';
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
  /** Per thread id: the capability bounding set and no_new_privs, from its core image. */
  creds: Map<number, { boundingSet: bigint; noNewPrivs: boolean }>;
}

async function records(imagesDir: string, name: string): Promise<Uint8Array[]> {
  const image = await readFile(join(imagesDir, name)).catch(() => undefined);
  if (!image) throw refuse(`the image set has no ${name}`);
  try {
    return imageRecords(image);
  } catch (error) {
    throw refuse(`${name} is not a CRIU image: ${(error as Error).message}`);
  }
}

/** What the image set says about its process tree, namespaces and credentials. */
export async function summarizeImages(imagesDir: string): Promise<ImageSummary> {
  const [inventory] = await records(imagesDir, 'inventory.img');
  const hostIds = inventory && message(decodeFields(inventory), 3);
  if (!hostIds) throw refuse('inventory.img has no root namespace ids');
  const tasks = (await records(imagesDir, 'pstree.img')).map((record) => {
    const fields = decodeFields(record);
    const pid = number(fields, 1);
    if (pid === undefined) throw refuse('pstree.img has an entry without a pid');
    return { pid, threads: numbers(fields, 5) };
  });
  const root = tasks[0];
  if (!root) throw refuse('pstree.img lists no task');
  const [ids] = await records(imagesDir, `ids-${root.pid}.img`);
  const rootIds = ids && decodeFields(ids);
  if (!rootIds) throw refuse(`ids-${root.pid}.img is empty`);
  const ownNamespaces = (Object.keys(namespaceFields) as Namespace[]).filter((namespace) => {
    const field = namespaceFields[namespace];
    return number(rootIds, field) !== undefined && number(rootIds, field) !== number(hostIds, field);
  });
  const creds = new Map<number, { boundingSet: bigint; noNewPrivs: boolean }>();
  for (const thread of tasks.flatMap((task) => (task.threads.length ? task.threads : [task.pid]))) {
    const [core] = await records(imagesDir, `core-${thread}.img`);
    const threadCreds = core && message(message(decodeFields(core), 5) ?? new Map(), 10);
    if (!threadCreds) throw refuse(`core-${thread}.img has no credentials`);
    const [low = 0, high = 0] = numbers(threadCreds, 12);
    creds.set(thread, { boundingSet: (BigInt(high) << 32n) | BigInt(low), noNewPrivs: number(threadCreds, 18) === 1 });
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
    if (expected.boundingSet !== undefined && (creds.boundingSet & ~expected.boundingSet) !== 0n) {
      throw refuse(`thread ${thread} holds capabilities outside a container's set (bounding set 0x${creds.boundingSet.toString(16)})`);
    }
    if (expected.noNewPrivs && !creds.noNewPrivs) throw refuse(`thread ${thread} may gain privileges (no_new_privs is off)`);
  }
  return summary;
}

function refuse(reason: string): FerryError {
  return new FerryError('UNSAFE_ARCHIVE', `refused CRIU images: ${reason}`, { phase: 'restore' });
}
