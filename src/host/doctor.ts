import { existsSync } from 'node:fs';
import { access, mkdir, rmdir } from 'node:fs/promises';
import { cpus, freemem, totalmem } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { readCgroupMounts } from '../cgroup/mounts.ts';
import { Criu, readKernelRelease } from '../criu/criu.ts';
import { FerryError } from '../errors.ts';
import { frameSendPath, helperExists, helperPath } from '../paths.ts';
import { nativeSendAvailable } from '../transport/native-send.ts';
import type { Capability } from '../protocol/host.ts';
import { formatBytes } from '../format.ts';
import { freeBytes } from './capacity.ts';

export interface DoctorReport {
  kernel: string;
  criu: Criu | undefined;
  capabilities: Capability[];
  /** Migration cannot work on this host: the failed required capabilities. */
  blockers: Capability[];
}

import { lazyPipeBytes, readPipeMaxSize } from './pipe-size.ts';

/** Probes what this host can do for ferry; every check is a real call, nothing assumed. */
export async function examineHost(stateDir: string, criuPath?: string): Promise<DoctorReport> {
  const capabilities: Capability[] = [];
  const add = (capability: Capability) => capabilities.push(capability);
  const kernel = await readKernelRelease();
  add({ name: 'kernel', ok: true, value: kernel, required: false });

  let criu: Criu | undefined;
  try {
    criu = await Criu.locate(criuPath);
    add({ name: 'criu', ok: true, value: `${criu.version.text} (${criu.path})`, required: true });
  } catch (error) {
    const message = error instanceof FerryError ? error.message : String(error);
    add({ name: 'criu', ok: false, value: 'unusable', required: true, hint: message });
  }
  if (criu) {
    const complaint = await criu.check();
    add({
      name: 'criu check',
      ok: !complaint,
      value: complaint ? lastLine(complaint) : 'looks good',
      required: true,
      ...(complaint ? { hint: 'this kernel lacks something CRIU needs; see `criu check` output' } : {}),
    });
    const dirty = await criu.check('mem_dirty_track');
    add({
      name: 'memory dirty tracking',
      ok: !dirty,
      value: dirty ? 'absent (no soft-dirty): stop-and-copy only' : 'present: incremental pre-copy possible',
      required: false,
    });
    const sockets = await criu.socketCheckpoint();
    add({
      name: 'socket checkpoint',
      ok: !sockets,
      value: sockets ? `fails: ${sockets}` : 'TCP, UDP and unix sockets dump (a probe process was checkpointed)',
      required: false,
      ...(sockets ? { hint: 'containers holding TCP or UDP sockets cannot migrate; CRIU >= 4.2 is needed on Linux >= 6.16 (bash scripts/setup.sh provisions it)' } : {}),
    });
    const nft = await execa('nft', ['--version'], { reject: false });
    add({
      name: 'nftables (network lock)',
      ok: nft.exitCode === 0,
      value: nft.exitCode === 0 ? nft.stdout.trim() : 'nft not found',
      required: false,
      ...(nft.exitCode === 0 ? {} : { hint: 'containers with their own address (--ip) need nft: apt-get install nftables' }),
    });
    const lazy = await criu.check('uffd-noncoop');
    add({ name: 'userfaultfd (lazy pages)', ok: !lazy, value: lazy ? 'absent' : 'present', required: false });
    const pipeMax = await readPipeMaxSize();
    add({
      name: 'fs.pipe-max-size (post-copy)',
      ok: pipeMax >= lazyPipeBytes,
      value: String(pipeMax),
      required: false,
      ...(pipeMax >= lazyPipeBytes ? {} : { hint: `post-copy needs >= ${lazyPipeBytes}; the agent raises it at start (FERRY_PIPE_MAX_SIZE=0 stops that)` }),
    });
  }

  const mounts = await readCgroupMounts();
  const v2Freeze = mounts.v2 ? await probeV2Freeze(mounts.v2) : false;
  add({
    name: 'cgroup v2 freezer',
    ok: v2Freeze,
    value: mounts.v2 ? `${mounts.v2}${v2Freeze ? '' : ' (no cgroup.freeze)'}` : 'not mounted',
    required: false,
  });
  add({ name: 'cgroup v1 freezer', ok: !!mounts.v1Freezer, value: mounts.v1Freezer ?? 'not mounted', required: false });
  add({
    name: 'a freezer',
    ok: v2Freeze || !!mounts.v1Freezer,
    value: v2Freeze ? 'cgroup v2' : mounts.v1Freezer ? 'cgroup v1' : 'none',
    required: true,
    hint: 'mount cgroup2 (or the v1 freezer controller)',
  });

  const netns = await execa('unshare', ['--net', 'true'], { reject: false });
  add({ name: 'network namespaces', ok: netns.exitCode === 0, value: netns.exitCode === 0 ? 'yes' : 'no', required: true });

  add({
    name: 'ferry-helper',
    ok: helperExists(),
    value: helperPath(),
    required: true,
    hint: 'run `bash scripts/setup.sh` to build it',
  });

  const native = nativeSendAvailable();
  add({
    name: 'ferry-frame-send (page sender)',
    ok: native,
    value: native ? frameSendPath() : process.env.FERRY_NATIVE_SEND === '0' ? 'off (FERRY_NATIVE_SEND=0)' : 'absent: the agent sends page images itself, slower',
    required: false,
    ...(native ? {} : { hint: 'bash scripts/build-native.sh builds it' }),
  });

  // The sysctl and the socket option came together (Linux 6.15); the option is what post-copy sets.
  const rtoCap = existsSync('/proc/sys/net/ipv4/tcp_rto_max_ms');
  add({
    name: 'TCP_RTO_MAX_MS (post-copy notices a link back within 1 s)',
    ok: rtoCap && existsSync(frameSendPath()),
    value: !rtoCap ? 'not in this kernel: after a cut, post-copy waits for TCP\'s backed-off retry' : existsSync(frameSendPath()) ? 'in the kernel; set through ferry-frame-send' : 'in the kernel, but ferry-frame-send is missing to set it',
    required: false,
  });

  const free = await freeBytes(stateDir);
  add({ name: 'state directory free space', ok: free > 1 << 30, value: `${formatBytes(free)} at ${stateDir}`, required: false });
  add({ name: 'memory', ok: true, value: `${formatBytes(freemem())} free of ${formatBytes(totalmem())}`, required: false });
  add({ name: 'cpus', ok: true, value: String(cpus().length), required: false });

  return { kernel, criu, capabilities, blockers: capabilities.filter((capability) => capability.required && !capability.ok) };
}

async function probeV2Freeze(mountPoint: string): Promise<boolean> {
  const probe = join(mountPoint, `ferry-probe-${process.pid}`);
  try {
    await mkdir(probe);
    await access(join(probe, 'cgroup.freeze'));
    return true;
  } catch {
    return false;
  } finally {
    await rmdir(probe).catch(() => undefined);
  }
}

function lastLine(text: string): string {
  return text.trim().split('\n').at(-1) ?? text;
}
