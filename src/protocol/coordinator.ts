import { z } from 'zod';
import { containerInfoSchema, containerNameSchema } from './container.ts';
import { hostInfoSchema } from './host.ts';
import { byteCount, count, milliseconds } from './numbers.ts';

// The coordinator's HTTP+JSON API: request bodies (validated by the service),
// the views it returns, and the events of its SSE stream. Shared with the CLI.

export const hostNameSchema = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/, 'letters, digits, "_", "." and "-", at most 63');

export const registerHostBodySchema = z.object({
  name: hostNameSchema,
  url: z.string().url().regex(/^wss?:\/\//, 'a ws:// or wss:// URL'),
  token: z.string().min(1),
  labels: z.record(z.string(), z.string()).default({}),
  /** Caps the memory placement may fill on this host, below what it reports free. */
  memoryLimitBytes: z.number().int().positive().optional(),
});
export type RegisterHostBody = z.infer<typeof registerHostBodySchema>;

export const migrationBodySchema = z.object({
  container: containerNameSchema,
  from: hostNameSchema,
  to: hostNameSchema.optional(),
});
export type MigrationBody = z.infer<typeof migrationBodySchema>;

export const evacuationBodySchema = z.object({
  host: hostNameSchema,
  to: z.array(hostNameSchema).min(1).optional(),
  parallel: z.number().int().min(1).max(16).default(2),
});
export type EvacuationBody = z.infer<typeof evacuationBodySchema>;

export const migrationStates = ['pending', 'running', 'succeeded', 'failed', 'rolled-back'] as const;
export type MigrationState = (typeof migrationStates)[number];

export const migrationViewSchema = z.object({
  id: z.string(),
  container: z.string(),
  source: z.string(),
  target: z.string().nullable(),
  state: z.enum(migrationStates),
  attempt: count,
  error: z.string().nullable(),
  downtimeMs: milliseconds.nullable(),
  evacuationId: z.string().nullable(),
  startedAt: z.string().nullable(),
  finishedAt: z.string().nullable(),
});
export type MigrationView = z.infer<typeof migrationViewSchema>;

export const evacuationStates = ['running', 'finished', 'failed'] as const;

export const evacuationViewSchema = z.object({
  id: z.string(),
  host: z.string(),
  state: z.enum(evacuationStates),
  parallel: z.number().int(),
  targets: z.array(z.string()).nullable(),
  undoOf: z.string().nullable(),
  createdAt: z.string(),
  finishedAt: z.string().nullable(),
  migrations: z.array(migrationViewSchema),
  /** Containers that stayed where they were, and why. */
  unplaced: z.array(z.object({ container: z.string(), reason: z.string() })),
});
export type EvacuationView = z.infer<typeof evacuationViewSchema>;

export const hostViewSchema = z.object({
  name: z.string(),
  url: z.string(),
  labels: z.record(z.string(), z.string()),
  draining: z.boolean(),
  up: z.boolean(),
  lastHeartbeat: z.string().nullable(),
  info: hostInfoSchema.nullable(),
});
export type HostView = z.infer<typeof hostViewSchema>;


/** What each API route answers on success: the server checks it before sending, the client parses it. */
export const apiAnswerSchemas = {
  hosts: z.object({ hosts: z.array(hostViewSchema) }),
  host: z.object({ host: hostViewSchema }),
  containers: z.object({ containers: z.array(containerInfoSchema.extend({ host: z.string() })) }),
  migrations: z.object({ migrations: z.array(migrationViewSchema) }),
  migration: z.object({ migration: migrationViewSchema }),
  cancelled: z.object({ cancelled: z.boolean() }),
  evacuations: z.object({ evacuations: z.array(evacuationViewSchema.omit({ migrations: true })) }),
  evacuation: z.object({ evacuation: evacuationViewSchema }),
} satisfies Record<string, z.ZodType>;
export type ApiAnswer = keyof typeof apiAnswerSchemas;

/** Events on GET /v1/events. */
export const coordinatorEventSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('migration-started'), at: z.string(), migration: migrationViewSchema }),
  z.object({ type: z.literal('migration-progress'), at: z.string(), migrationId: z.string(), phase: z.string(), bytes: byteCount.optional() }),
  z.object({ type: z.literal('migration-finished'), at: z.string(), migration: migrationViewSchema }),
  z.object({ type: z.literal('evacuation-finished'), at: z.string(), evacuation: evacuationViewSchema }),
]);
export type CoordinatorEvent = z.infer<typeof coordinatorEventSchema>;
