import { z } from 'zod';
import { networkSpecSchema } from '../net/address.ts';
import { byteCount } from './numbers.ts';

export const containerNameSchema = z
  .string()
  .regex(/^[a-z0-9][a-z0-9_.-]{0,62}$/, 'lowercase letters, digits, "_", "." and "-", at most 63, starting alphanumeric');

/** What a user asks the runtime to start. */
export const containerSpecSchema = z.object({
  name: containerNameSchema,
  /** A rootfs directory or a rootfs tarball (.tar, .tar.gz) on the agent's host. */
  rootfs: z.string().min(1),
  command: z.array(z.string()).min(1),
  env: z.record(z.string(), z.string()).default({}),
  cwd: z.string().startsWith('/').default('/'),
  hostname: z.string().max(64).optional(),
  /** A private network namespace with only loopback; otherwise the host's. */
  privateNetwork: z.boolean().default(false),
  /** Its own address on the host's bridge (implies a private network namespace); moves with it. */
  network: networkSpecSchema.optional(),
  labels: z.record(z.string(), z.string()).default({}),
});
export type ContainerSpec = z.infer<typeof containerSpecSchema>;
export type ContainerSpecInput = z.input<typeof containerSpecSchema>;

export const containerStatusSchema = z.enum(['running', 'frozen', 'stopped', 'migrating']);
export type ContainerStatus = z.infer<typeof containerStatusSchema>;

/** What an agent reports about one container. */
export const containerInfoSchema = z.object({
  name: z.string(),
  status: containerStatusSchema,
  pid: z.number().int().positive().optional(),
  command: z.array(z.string()),
  createdAt: z.string(),
  /** Hosts the container has lived on, oldest first. */
  history: z.array(z.string()),
  memoryBytes: byteCount.optional(),
  rootfsBytes: byteCount.optional(),
  /** Its own address (ADDR/PREFIX), when it has one. */
  address: z.string().optional(),
  labels: z.record(z.string(), z.string()),
});
export type ContainerInfo = z.infer<typeof containerInfoSchema>;
