import type { StreamDigest } from '../digest.ts';
import { Transform } from 'node:stream';

/**
 * Write streams for bulk data get 1 MiB of buffer: with the default 16 KiB
 * each 64 KiB chunk waited for its own thread-pool write, which capped a
 * stream at one write's latency (~65 MB/s on a busy host); with room to
 * queue, Node writes the queued chunks together.
 */
export const bulkWriteBuffer = 1 << 20;

/** A pass-through that feeds every chunk to `hash` on its way. */
export function hashing(hash: StreamDigest): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      hash.update(chunk);
      callback(null, chunk);
    },
  });
}

/** Names of files whose digests differ or are missing on one side. */
export function compareDigests(expected: Map<string, string>, actual: Map<string, string>): string[] {
  const problems: string[] = [];
  for (const [name, digest] of expected) {
    const got = actual.get(name);
    if (got === undefined) problems.push(`${name}: missing`);
    else if (got !== digest) problems.push(`${name}: digest ${got} != ${digest}`);
  }
  for (const name of actual.keys()) if (!expected.has(name)) problems.push(`${name}: unexpected`);
  return problems;
}
