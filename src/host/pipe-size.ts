import { readFile, writeFile } from 'node:fs/promises';

const file = '/proc/sys/fs/pipe-max-size';
/**
 * Post-copy's prerequisite: CRIU's page server asks for pipes of about
 * 3.3 MiB; without CAP_SYS_RESOURCE (root here lacks it) that needs
 * fs.pipe-max-size at least this large, and CRIU 4.2 ignores the refusal and
 * later splices into fd -1 ("page-pipe: splice: Bad file descriptor").
 */
export const lazyPipeBytes = 4 * 1024 * 1024;

export async function readPipeMaxSize(): Promise<number> {
  return Number((await readFile(file, 'utf8').catch(() => '0')).trim());
}

/**
 * Raises fs.pipe-max-size to lazyPipeBytes when it is lower, unless
 * FERRY_PIPE_MAX_SIZE=0. It is a host-wide limit on unprivileged pipe sizes
 * (the default is 1 MiB); only raised, never lowered. Returns what it did.
 */
export async function ensurePipeMaxSize(): Promise<{ before: number; after: number; raised: boolean }> {
  const before = await readPipeMaxSize();
  if (before >= lazyPipeBytes || process.env.FERRY_PIPE_MAX_SIZE === '0') return { before, after: before, raised: false };
  await writeFile(file, String(lazyPipeBytes)).catch(() => undefined);
  const after = await readPipeMaxSize();
  return { before, after, raised: after >= lazyPipeBytes };
}
