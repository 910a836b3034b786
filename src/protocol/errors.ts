import { z } from 'zod';
import { errorCodes, phases, type ErrorCode } from '../errors.ts';

// One error shape on every wire: agent replies, peer aborts, migration
// reports, the agent's refused upgrades and the coordinator's HTTP API.

/**
 * A code or phase this build does not know (a newer peer's) reads as
 * INTERNAL, or no phase, rather than making the whole message unreadable:
 * an abort must still abort.
 */
export const wireErrorSchema = z.object({
  code: z.enum(errorCodes).catch('INTERNAL'),
  message: z.string(),
  phase: z.enum(phases).optional().catch(undefined),
  details: z.array(z.string()).optional(),
  /** The request field at fault, for a BAD_REQUEST. */
  field: z.string().optional(),
});

/** The body of every refused HTTP request. */
export const errorBodySchema = z.object({ error: wireErrorSchema });
export type ErrorBody = z.infer<typeof errorBodySchema>;

/** The HTTP status of each code, for the agent's upgrade refusals and the coordinator's API. */
export const httpStatusOf: Record<ErrorCode, number> = {
  BAD_REQUEST: 400,
  BAD_MESSAGE: 400,
  UNAUTHORIZED: 401,
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  BUSY: 409,
  TOO_LARGE: 413,
  PROTOCOL_VERSION: 500,
  NAME_IN_USE: 500,
  ROOTFS_MISSING: 500,
  COMMAND_NOT_FOUND: 500,
  CGROUP_FAILED: 500,
  CONTAINER_SETUP_FAILED: 500,
  CONTAINER_NOT_RUNNING: 500,
  CRIU_MISSING: 500,
  CRIU_TOO_OLD: 500,
  CRIU_FAILED: 500,
  HELPER_MISSING: 500,
  INCOMPATIBLE: 500,
  UNMOVABLE: 500,
  ADDRESS_IN_USE: 500,
  NO_BRIDGE: 500,
  NO_SPACE: 500,
  UNSAFE_ARCHIVE: 500,
  CHECKSUM_MISMATCH: 500,
  TRANSFER_FAILED: 500,
  PEER_GONE: 500,
  TIMEOUT: 500,
  CANCELLED: 500,
  INTERNAL: 500,
};
