import { readFile } from 'node:fs/promises';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import { z } from 'zod';

// CRIU's stats images (images/stats.proto): after two 32-bit magics comes one
// length-prefixed StatsEntry with an optional dump (1) and restore (2) part.
// Times are in microseconds.

export const dumpStatsSchema = z.object({
  freezingTime: z.number(),
  frozenTime: z.number(),
  memdumpTime: z.number(),
  memwriteTime: z.number(),
  pagesScanned: z.number(),
  pagesSkippedParent: z.number(),
  pagesWritten: z.number(),
  pagesLazy: z.number(),
});
export type DumpStats = z.infer<typeof dumpStatsSchema>;

export const restoreStatsSchema = z.object({
  pagesCompared: z.number(),
  pagesSkippedCow: z.number(),
  forkingTime: z.number(),
  restoreTime: z.number(),
  pagesRestored: z.number(),
});
export type RestoreStats = z.infer<typeof restoreStatsSchema>;

const dumpFields: Record<number, keyof DumpStats> = {
  1: 'freezingTime',
  2: 'frozenTime',
  3: 'memdumpTime',
  4: 'memwriteTime',
  5: 'pagesScanned',
  6: 'pagesSkippedParent',
  7: 'pagesWritten',
  9: 'pagesLazy',
};

const restoreFields: Record<number, keyof RestoreStats> = {
  1: 'pagesCompared',
  2: 'pagesSkippedCow',
  3: 'forkingTime',
  4: 'restoreTime',
  5: 'pagesRestored',
};

const headerBytes = 8;

export interface StatsEntry {
  dump?: DumpStats;
  restore?: RestoreStats;
}

export function parseStatsImage(image: Uint8Array): StatsEntry {
  if (image.length < headerBytes + 4) throw new Error(`stats image too short (${image.length} bytes)`);
  const view = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const length = view.getUint32(headerBytes, true);
  const body = image.subarray(headerBytes + 4, headerBytes + 4 + length);
  if (body.length !== length) throw new Error('stats image truncated');
  const reader = new BinaryReader(body);
  const entry: StatsEntry = {};
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) {
      entry.dump = readNumbers(reader.bytes(), dumpFields, emptyDumpStats());
    } else if (field === 2 && wireType === WireType.LengthDelimited) {
      entry.restore = readNumbers(reader.bytes(), restoreFields, emptyRestoreStats());
    } else {
      reader.skip(wireType);
    }
  }
  return entry;
}

function readNumbers<T extends Record<string, number>>(bytes: Uint8Array, fields: Record<number, keyof T>, into: T): T {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    const key = fields[field];
    if (key && wireType === WireType.Varint) into[key] = Number(reader.uint64()) as T[keyof T];
    else reader.skip(wireType);
  }
  return into;
}

function emptyDumpStats(): DumpStats {
  return {
    freezingTime: 0,
    frozenTime: 0,
    memdumpTime: 0,
    memwriteTime: 0,
    pagesScanned: 0,
    pagesSkippedParent: 0,
    pagesWritten: 0,
    pagesLazy: 0,
  };
}

function emptyRestoreStats(): RestoreStats {
  return { pagesCompared: 0, pagesSkippedCow: 0, forkingTime: 0, restoreTime: 0, pagesRestored: 0 };
}

/** Reads IMAGES/stats-dump or stats-restore; undefined when CRIU wrote none. */
export async function readStats(path: string): Promise<StatsEntry | undefined> {
  const image = await readFile(path).catch(() => undefined);
  return image ? parseStatsImage(image) : undefined;
}
