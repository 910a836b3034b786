import { execa } from 'execa';
import { z } from 'zod';
import { FerryError, type ErrorCode } from '../../src/errors.ts';
import { helperExists, helperPath } from '../../src/paths.ts';
import type { ContainerSpec } from '../../src/protocol/container.ts';

/** Where a container's stdout and stderr go, relative to its rootfs. */
export const consoleLogPath = '.ferry/console.log';

const helperReply = z.union([
  z.object({ pid: z.number().int().positive() }),
  z.object({ error: z.string(), message: z.string() }),
]);

const helperCodes: Record<string, ErrorCode> = {
  ROOTFS_MISSING: 'ROOTFS_MISSING',
  COMMAND_NOT_FOUND: 'COMMAND_NOT_FOUND',
  CGROUP_JOIN_FAILED: 'CGROUP_FAILED',
};

/**
 * Starts the container through the native helper, which makes the namespaces,
 * pivots into the rootfs and joins the cgroup before exec (joining the network
 * namespace at `netnsPath` when given). Returns the host pid of the container's init.
 */
export async function startContainer(spec: ContainerSpec, rootfs: string, cgroupProcsFile: string, netnsPath?: string): Promise<number> {
  if (!helperExists()) {
    throw new FerryError('HELPER_MISSING', `${helperPath()} is missing; run \`bash scripts/setup.sh\``, {
      phase: 'runtime',
    });
  }
  const args = ['run', '--rootfs', rootfs, '--cgroup-procs', cgroupProcsFile, '--cwd', spec.cwd, '--log', consoleLogPath];
  if (spec.hostname) args.push('--hostname', spec.hostname);
  if (netnsPath) args.push('--netns-path', netnsPath);
  else if (spec.privateNetwork) args.push('--netns');
  for (const [key, value] of Object.entries(spec.env)) args.push('--env', `${key}=${value}`);
  const result = await execa(helperPath(), [...args, '--', ...spec.command], { reject: false, timeout: 30_000 });
  const line = `${result.stdout}`.trim().split('\n').at(-1) ?? '';
  let reply: z.infer<typeof helperReply>;
  try {
    reply = helperReply.parse(JSON.parse(line));
  } catch {
    throw new FerryError('CONTAINER_SETUP_FAILED', `ferry-helper failed: ${result.stderr || line || result.exitCode}`, {
      phase: 'runtime',
    });
  }
  if ('pid' in reply) return reply.pid;
  throw new FerryError(helperCodes[reply.error] ?? 'CONTAINER_SETUP_FAILED', reply.message, { phase: 'runtime' });
}
