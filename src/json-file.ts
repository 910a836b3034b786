import { chmod, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { z } from 'zod';

/** A JSON file checked against its schema; undefined when there is none. */
export async function readJsonFile<T>(path: string, schema: z.ZodType<T>): Promise<T | undefined> {
  const text = await readFile(path, 'utf8').catch(() => undefined);
  return text ? schema.parse(JSON.parse(text)) : undefined;
}

/** Atomic: a temporary file renamed over the old one, so a crash leaves one or the other. */
export async function writeJsonFile(path: string, value: unknown, mode = 0o644): Promise<void> {
  // A private file lives in a private directory.
  await mkdir(dirname(path), { recursive: true, mode: mode & 0o077 ? 0o755 : 0o700 });
  const temporary = `${path}.tmp`;
  await writeFile(temporary, JSON.stringify(value, null, 2), { mode });
  // A temporary left by a crash keeps its old mode through writeFile.
  await chmod(temporary, mode);
  await rename(temporary, path);
}
