import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { Cgroup } from '../src/cgroup/cgroup.ts';
import { criuEnvironment } from '../src/criu/criu.ts';
import type { Host } from '../lab/hosts.ts';

// The naive sequential baseline made of plain tools, run on the same hosts:
// criu dump to a directory, tar it, copy it over a TCP socket, untar, restore.
// Downtime runs from the dump's start to the restored task running.

export interface BaselineResult {
  downtimeMs: number;
  /** Up to the restored task checked running; the teardown after it is not counted. */
  totalMs: number;
  steps: Record<string, number>;
  bytes: number;
}

export interface BaselineInput {
  criu: string;
  source: Host;
  destination: Host;
  pid: number;
  cgroup: Cgroup;
  rootfs: string;
  workDir: string;
}

const port = 9123;

export async function runBaseline(input: BaselineInput): Promise<BaselineResult> {
  const { criu, source, destination } = input;
  const sourceDir = join(input.workDir, 'src');
  const destinationDir = join(input.workDir, 'dst');
  await mkdir(join(sourceDir, 'images'), { recursive: true });
  await mkdir(destinationDir, { recursive: true });
  const steps: Record<string, number> = {};
  const timed = async (name: string, step: () => Promise<unknown>) => {
    const started = performance.now();
    await step();
    steps[name] = Math.round(performance.now() - started);
  };
  const env = criuEnvironment();
  const target = new Cgroup(input.cgroup.version, `${input.cgroup.path}-baseline`);
  const started = performance.now();
  try {
    // CRIU runs in the source host's netns, as the agent's does: the container shares it.
    await timed('dump', () =>
      execa('nsenter', [`--net=/run/netns/${source.netns}`, criu, 'dump', '-t', String(input.pid), '-D', join(sourceDir, 'images'),
        '-o', 'dump.log', '--freeze-cgroup', input.cgroup.path, '--manage-cgroups=ignore'], { env }),
    );
    await timed('tar', () => execa('tar', ['-cf', join(sourceDir, 'bundle.tar'), '-C', sourceDir, 'images', '-C', input.rootfs, '.', '--transform', 's,^\\./,rootfs/,']));
    await timed('copy', async () => {
      const receiver = execa('nsenter', [`--net=/run/netns/${destination.netns}`, 'socat', '-u', '-b', '1048576',
        `TCP-LISTEN:${port},reuseaddr`, `CREATE:${join(destinationDir, 'bundle.tar')}`]);
      await waitForListener(destination);
      await execa('nsenter', [`--net=/run/netns/${source.netns}`, 'socat', '-u', '-b', '1048576',
        `OPEN:${join(sourceDir, 'bundle.tar')}`, `TCP:${destination.address}:${port}`]);
      await receiver;
    });
    await timed('untar', () => execa('tar', ['-xf', join(destinationDir, 'bundle.tar'), '-C', destinationDir]));
    await target.create();
    await timed('restore', () =>
      execa('nsenter', [`--net=/run/netns/${destination.netns}`, 'sh', '-c', 'echo 0 > "$1"; shift; exec "$@"', 'sh',
        target.procsFile, criu, 'restore', '-D', join(destinationDir, 'images'), '-o', 'restore.log', '--root',
        join(destinationDir, 'rootfs'), '--restore-detached', '--manage-cgroups=ignore', '--pidfile', join(destinationDir, 'pid')], { env }),
    );
    const downtimeMs = Math.round(performance.now() - started);
    const restoredPid = Number((await readFile(join(destinationDir, 'pid'), 'utf8')).trim());
    if (!(await target.pids()).includes(restoredPid)) throw new Error('baseline restore left no running task');
    const totalMs = Math.round(performance.now() - started);
    const bytes = (await execa('stat', ['-c', '%s', join(destinationDir, 'bundle.tar')])).stdout;
    return { downtimeMs, totalMs, steps, bytes: Number(bytes) };
  } finally {
    // A failed step may have left a restored copy, or gigabytes of images and tars.
    await target.kill().catch(() => undefined);
    await target.remove().catch(() => undefined);
    await rm(input.workDir, { recursive: true, force: true });
  }
}

async function waitForListener(host: Host): Promise<void> {
  for (let attempt = 0; attempt < 100; attempt += 1) {
    const { stdout } = await execa('nsenter', [`--net=/run/netns/${host.netns}`, 'ss', '-ltn']);
    if (stdout.includes(`:${port}`)) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error('baseline receiver did not listen');
}
