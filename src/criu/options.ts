// Typed CRIU invocations, turned into argument lists in one place.

export interface CommonOptions {
  imagesDir: string;
  /** Absolute path of CRIU's log for this call; kept for the operator. */
  logFile: string;
}

export interface DumpOptions extends CommonOptions {
  pid: number;
  /** The container's cgroup, already frozen by the caller (CRIU issue 2572). */
  freezeCgroup: string;
  /** Keep the tasks alive after the dump: they stay frozen until thawed or killed. */
  leaveRunning: boolean;
  /** The container has its own network namespace, which CRIU locks while it works; its connections move with it. */
  privateNetwork?: boolean;
  /** The last pre-dump round, relative to imagesDir: only pages changed since then are written. */
  prevImagesDir?: string;
  /** Post-copy: no page images; once the rest is written CRIU serves the pages on `--ps-socket` (fd 3) and says so on `--status-fd` (fd 4). */
  lazyPages?: boolean;
}

/** A pre-copy round: CRIU freezes the cgroup, collects the dirty pages, thaws, then writes them. */
export interface PreDumpOptions extends CommonOptions {
  pid: number;
  freezeCgroup: string;
  /** The previous round, relative to imagesDir. */
  prevImagesDir?: string;
}

export interface RestoreOptions extends CommonOptions {
  root: string;
  pidFile: string;
  /** Leave the restored tasks stopped (SIGSTOP) so the caller decides when they run. */
  leaveStopped: boolean;
  privateNetwork?: boolean;
  /** --external resources to reconnect, e.g. the veth's host end on a bridge. */
  external?: string[];
  /** Post-copy: memory comes from the lazy-pages daemon listening in imagesDir. */
  lazyPages?: boolean;
}

/** Where a lazy dump and the lazy-pages daemon find their page socket and their status pipe. */
export const lazySocketFd = 3;
export const lazyStatusFd = 4;

/** `criu lazy-pages` for the destination: its page server is the source, over `--ps-socket`. */
export function lazyPagesArguments(options: CommonOptions): string[] {
  return ['lazy-pages', ...common(options), '--page-server', '--ps-socket', String(lazySocketFd), '--status-fd', String(lazyStatusFd)];
}

// CRIU locks a dumped network namespace with iptables by default; current
// distributions ship nftables and often no iptables binary at all.
const networkLock = ['--network-lock', 'nftables'];

function common(options: CommonOptions): string[] {
  return ['-D', options.imagesDir, '-o', options.logFile, '-v4'];
}

export function dumpArguments(options: DumpOptions): string[] {
  const args = ['dump', ...common(options), '-t', String(options.pid)];
  args.push('--freeze-cgroup', options.freezeCgroup, '--manage-cgroups=ignore');
  if (options.leaveRunning) args.push('--leave-running');
  // The whole namespace moves, so its established connections can move too.
  if (options.privateNetwork) args.push(...networkLock, '--tcp-established');
  if (options.prevImagesDir) args.push('--track-mem', '--prev-images-dir', options.prevImagesDir);
  if (options.lazyPages) args.push('--lazy-pages', '--ps-socket', String(lazySocketFd), '--status-fd', String(lazyStatusFd));
  args.push('--file-locks');
  return args;
}

export function preDumpArguments(options: PreDumpOptions): string[] {
  const args = ['pre-dump', ...common(options), '-t', String(options.pid)];
  args.push('--freeze-cgroup', options.freezeCgroup, '--manage-cgroups=ignore', '--track-mem');
  if (options.prevImagesDir) args.push('--prev-images-dir', options.prevImagesDir);
  return args;
}

export function restoreArguments(options: RestoreOptions): string[] {
  const args = ['restore', ...common(options), '--root', options.root, '--restore-detached'];
  args.push('--pidfile', options.pidFile, '--manage-cgroups=ignore', '--file-locks');
  if (options.leaveStopped) args.push('--leave-stopped');
  if (options.lazyPages) args.push('--lazy-pages');
  if (options.privateNetwork) args.push(...networkLock, '--tcp-established');
  for (const resource of options.external ?? []) args.push('--external', resource);
  return args;
}
