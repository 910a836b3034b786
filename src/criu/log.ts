import { readFile } from 'node:fs/promises';

const errorLine = /\bError\b|\bBUG\b/;
// Logged on every run on many hosts and harmless (see platform notes).
const harmless = /Can't setup RLIMIT_NOFILE for self/;

/**
 * CRIU's own explanation of a failure: the "Error (file:line): ..." lines of
 * its log, newest last, without the timestamp prefix.
 */
export function extractErrorLines(log: string, limit = 12): string[] {
  const lines = log
    .split('\n')
    .filter((line) => errorLine.test(line) && !harmless.test(line))
    .map((line) => line.replace(/^\(\s*[\d.]+\)\s*/, '').trim());
  return lines.slice(-limit);
}

export async function readErrorLines(logFile: string): Promise<string[]> {
  const log = await readFile(logFile, 'utf8').catch(() => '');
  return extractErrorLines(log);
}
