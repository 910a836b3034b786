import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { wireErrorSchema } from './errors.ts';
import { containerInfoSchema, containerNameSchema, containerSpecSchema } from './container.ts';
import { hostInfoSchema } from './host.ts';
import { migrationIdSchema, migrationOptionsSchema, migrationReportSchema, progressEventSchema } from './migration.ts';

// Every control message, defined once and imported by agents, coordinator and
// CLI. Text frames carry these as JSON; bulk data travels on data channels.

export const protocolVersion = 2;


const requestId = z.string().min(1).max(64);

export const helloSchema = z.object({
  type: z.literal('hello'),
  version: z.number().int(),
  peer: z.enum(['cli', 'agent', 'coordinator']),
  name: z.string().max(256).optional(),
});
export type Hello = z.infer<typeof helloSchema>;

export const destinationSchema = z.object({
  url: z.string().url(),
  token: z.string().min(1),
  /** PEM of the CA that signed the destination's certificate, for wss. */
  ca: z.string().optional(),
});
export type Destination = z.infer<typeof destinationSchema>;

/** Requests a client (CLI, coordinator, peer agent) sends to an agent. */
export const requestSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('info'), id: requestId }),
  z.object({ type: z.literal('run'), id: requestId, spec: containerSpecSchema }),
  z.object({ type: z.literal('list'), id: requestId }),
  z.object({ type: z.literal('logs'), id: requestId, name: containerNameSchema, tailBytes: z.number().int().positive().optional() }),
  z.object({ type: z.literal('stop'), id: requestId, name: containerNameSchema, graceMs: z.number().int().min(0).optional() }),
  z.object({ type: z.literal('remove'), id: requestId, name: containerNameSchema, force: z.boolean().default(false) }),
  z.object({
    type: z.literal('checkpoint'),
    id: requestId,
    name: containerNameSchema,
    directory: z.string().startsWith('/'),
    keepRunning: z.boolean().default(false),
  }),
  z.object({
    type: z.literal('restore'),
    id: requestId,
    directory: z.string().startsWith('/'),
    name: containerNameSchema.optional(),
  }),
  z.object({
    type: z.literal('migrate'),
    id: requestId,
    name: containerNameSchema,
    destination: destinationSchema,
    options: migrationOptionsSchema.default(migrationOptionsSchema.parse({})),
  }),
  z.object({ type: z.literal('cancel'), id: requestId, target: requestId }),
  z.object({ type: z.literal('migration-status'), id: requestId, migrationId: migrationIdSchema }),
]);
export type Request = z.infer<typeof requestSchema>;
export type RequestType = Request['type'];

/** Replies and events an agent sends back on the same connection. */
export const replySchema = z.discriminatedUnion('type', [
  helloSchema,
  z.object({ type: z.literal('result'), id: requestId, result: z.unknown() }),
  z.object({ type: z.literal('error'), id: requestId.optional(), error: wireErrorSchema }),
  z.object({ type: z.literal('progress'), id: requestId, event: progressEventSchema }),
]);
export type Reply = z.infer<typeof replySchema>;

/** Result shape of each request, validated by the caller. */
export const resultSchemas = {
  info: hostInfoSchema,
  run: containerInfoSchema,
  list: z.object({ containers: z.array(containerInfoSchema) }),
  logs: z.object({ text: z.string() }),
  stop: containerInfoSchema,
  remove: z.object({ removed: z.string() }),
  checkpoint: z.object({ directory: z.string(), frozenMs: z.number(), dumpStats: z.unknown().optional(), warnings: z.array(z.string()).optional() }),
  restore: containerInfoSchema,
  migrate: migrationReportSchema,
  cancel: z.object({ cancelled: z.boolean() }),
  'migration-status': z.object({ migrationId: z.string(), state: z.string() }),
} satisfies Record<RequestType, z.ZodType>;
export type ResultOf<T extends RequestType> = z.infer<(typeof resultSchemas)[T]>;

/** Turns a zod failure into a one-line message naming the fields. */
export function describeIssues(error: z.ZodError): string {
  return error.issues
    .slice(0, 5)
    .map((issue) => `${issue.path.length ? issue.path.join('.') : '(message)'}: ${issue.message}`)
    .join('; ');
}

/**
 * Nothing leaves unchecked: a message this side built that the protocol does
 * not allow is a bug here, thrown as INTERNAL rather than sent. Returns the
 * message as it was (not zod's parsed copy).
 */
export function checkedMessage<T>(schema: z.ZodType, message: T, what: string): T {
  const result = schema.safeParse(message);
  if (!result.success) throw new FerryError('INTERNAL', `built a ${what} the protocol does not allow: ${describeIssues(result.error)}`);
  return message;
}

/** Deeper than any message ferry sends (about 6 levels); a bound on what JSON.parse builds. */
export const maxMessageDepth = 64;

/**
 * JSON.parse for text from a peer: refuses nesting deeper than
 * `maxMessageDepth` before parsing, since a few MiB of "[[[[" costs
 * hundreds of MiB once parsed. Throws BAD_MESSAGE.
 */
export function parseJsonMessage(text: string): unknown {
  if (jsonDepthExceeds(text, maxMessageDepth)) {
    throw new FerryError('BAD_MESSAGE', `message nested deeper than ${maxMessageDepth} levels`);
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new FerryError('BAD_MESSAGE', 'message is not JSON');
  }
}

/** One pass over the text, counting brackets outside strings. */
function jsonDepthExceeds(text: string, limit: number): boolean {
  let depth = 0;
  let inString = false;
  for (let index = 0; index < text.length; index++) {
    const char = text.charCodeAt(index);
    if (inString) {
      if (char === 0x5c) index++; // backslash: skip the escaped character
      else if (char === 0x22) inString = false;
    } else if (char === 0x22) {
      inString = true;
    } else if (char === 0x7b || char === 0x5b) {
      if (++depth > limit) return true;
    } else if (char === 0x7d || char === 0x5d) {
      depth--;
    }
  }
  return false;
}
