import { z } from 'zod';
import { containerInfoSchema } from './container.ts';
import { byteCount, count } from './numbers.ts';

/** One line of `ferry doctor`: a capability, whether this host has it, and why not. */
export const capabilitySchema = z.object({
  name: z.string(),
  ok: z.boolean(),
  value: z.string(),
  /** Migration cannot work without this one. */
  required: z.boolean(),
  hint: z.string().optional(),
});
export type Capability = z.infer<typeof capabilitySchema>;

export const hostInfoSchema = z.object({
  name: z.string(),
  kernel: z.string(),
  criu: z.object({ path: z.string(), version: z.string() }).optional(),
  capabilities: z.array(capabilitySchema),
  capacity: z.object({
    memoryBytes: byteCount,
    memoryAvailableBytes: byteCount,
    cpus: count,
    diskFreeBytes: byteCount,
  }),
  containers: z.array(containerInfoSchema),
  /** Incoming or outgoing migrations in progress. */
  migrations: count,
});
export type HostInfo = z.infer<typeof hostInfoSchema>;
