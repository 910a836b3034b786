import { readFile } from 'node:fs/promises';

export interface CgroupMounts {
  /** Mount point of the cgroup v2 hierarchy, if any. */
  v2: string | undefined;
  /** Mount point of the cgroup v1 freezer hierarchy, if any. */
  v1Freezer: string | undefined;
}

export interface MountEntry {
  mountPoint: string;
  fsType: string;
  source: string;
  superOptions: string[];
}

/** Parses /proc/self/mountinfo (see proc(5)); octal escapes like \040 are decoded. */
export function parseMountInfo(text: string): MountEntry[] {
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    const leftFields = left.split(' ');
    const rightFields = right.split(' ');
    const mountPoint = leftFields[4];
    const [fsType, source, options] = rightFields;
    if (!mountPoint || !fsType) continue;
    entries.push({
      mountPoint: unescapeOctal(mountPoint),
      fsType,
      source: source ?? '',
      superOptions: (options ?? '').split(','),
    });
  }
  return entries;
}

function unescapeOctal(value: string): string {
  return value.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

export function findCgroupMounts(entries: MountEntry[]): CgroupMounts {
  const v2 = entries.find((entry) => entry.fsType === 'cgroup2')?.mountPoint;
  const v1Freezer = entries.find(
    (entry) => entry.fsType === 'cgroup' && entry.superOptions.includes('freezer'),
  )?.mountPoint;
  return { v2, v1Freezer };
}

export async function readCgroupMounts(): Promise<CgroupMounts> {
  return findCgroupMounts(parseMountInfo(await readFile('/proc/self/mountinfo', 'utf8')));
}
