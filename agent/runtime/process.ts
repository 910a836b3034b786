import { readFile } from 'node:fs/promises';

/** Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot. */
export async function processStartTime(pid: number): Promise<number | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  if (!stat) return undefined;
  // The command name (field 2) may contain spaces; fields after it are plain.
  const afterName = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const value = afterName[22 - 3];
  return value === undefined ? undefined : Number(value);
}

/** True when `pid` is still the process that started at `startTime`. */
export async function isSameProcess(pid: number, startTime: number): Promise<boolean> {
  return (await processStartTime(pid)) === startTime;
}

/** The one-letter state of /proc/PID/stat (R, S, T, ...). */
export async function processState(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  return stat?.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
}

export async function residentBytes(pids: number[]): Promise<number> {
  let total = 0;
  for (const pid of pids) {
    const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
    const match = /VmRSS:\s+(\d+) kB/.exec(status);
    if (match) total += Number(match[1]) * 1024;
  }
  return total;
}

/** A task may exit between a listing and its signal; that is not a failure. */
export function signalIfAlive(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
  }
}
