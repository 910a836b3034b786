// CRIU versions: parsed from `criu --version`, compared part by part. Pure, so the
// coordinator's placement can use it too.

export interface CriuVersion {
  major: number;
  minor: number;
  patch: number;
  text: string;
}

export function parseCriuVersion(output: string): CriuVersion | undefined {
  const match = /Version:\s*(\d+)\.(\d+)(?:\.(\d+))?/.exec(output);
  if (!match) return undefined;
  const [, major, minor, patch] = match;
  return {
    major: Number(major),
    minor: Number(minor),
    patch: Number(patch ?? 0),
    text: `${major}.${minor}${patch ? `.${patch}` : ''}`,
  };
}

/**
 * Compares versions numerically, part by part ("4.1" > "3.17.1", "4.0" = "4"): parsed ones,
 * or dotted strings such as a host's reported CRIU version (text after the numbers is ignored).
 */
export function compareVersions(left: CriuVersion | string, right: CriuVersion | string): number {
  const parts = (version: CriuVersion | string) =>
    typeof version === 'string'
      ? (/\d+(?:\.\d+)*/.exec(version)?.[0] ?? '0').split('.').map(Number)
      : [version.major, version.minor, version.patch];
  const a = parts(left);
  const b = parts(right);
  for (let index = 0; index < Math.max(a.length, b.length); index++) {
    const difference = (a[index] ?? 0) - (b[index] ?? 0);
    if (difference !== 0) return Math.sign(difference);
  }
  return 0;
}
