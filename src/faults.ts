// Fault injection for the rollback tests, off unless FERRY_FAULTS names one.
// Format: comma-separated names, e.g. "corrupt-chunk:files:3,fail-restore".

const active = new Set((process.env.FERRY_FAULTS ?? '').split(',').filter(Boolean));

export function faultActive(name: string): boolean {
  return active.has(name);
}

export function faultNumber(prefix: string): number | undefined {
  for (const fault of active) {
    if (fault.startsWith(`${prefix}:`)) return Number(fault.slice(prefix.length + 1));
  }
  return undefined;
}
