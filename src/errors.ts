// One error type for the whole project: a stable machine-readable code, the
// migration phase it happened in, and the cause. The code travels on the wire.

export const phases = [
  'setup',
  'connect',
  'auth',
  'request',
  'preflight',
  'precopy',
  'freeze',
  'snapshot',
  'dump',
  'stream',
  'restore',
  'postcopy',
  'confirm',
  'cleanup',
  'rollback',
  'runtime',
] as const;
export type Phase = (typeof phases)[number];

export const errorCodes = [
  'BAD_REQUEST',
  'BAD_MESSAGE',
  'UNAUTHORIZED',
  'PROTOCOL_VERSION',
  'NOT_FOUND',
  'METHOD_NOT_ALLOWED',
  'TOO_LARGE',
  'NAME_IN_USE',
  'ROOTFS_MISSING',
  'COMMAND_NOT_FOUND',
  'CGROUP_FAILED',
  'CONTAINER_SETUP_FAILED',
  'CONTAINER_NOT_RUNNING',
  'CRIU_MISSING',
  'CRIU_TOO_OLD',
  'CRIU_FAILED',
  'HELPER_MISSING',
  'INCOMPATIBLE',
  'UNMOVABLE',
  'ADDRESS_IN_USE',
  'NO_BRIDGE',
  'NO_SPACE',
  'UNSAFE_ARCHIVE',
  'CHECKSUM_MISMATCH',
  'TRANSFER_FAILED',
  'PEER_GONE',
  'TIMEOUT',
  'CANCELLED',
  'BUSY',
  'INTERNAL',
] as const;
export type ErrorCode = (typeof errorCodes)[number];

export interface FerryErrorOptions {
  phase?: Phase;
  cause?: unknown;
  /** Extra lines worth showing the operator, e.g. CRIU's own error lines. */
  details?: string[];
  /** The request field at fault (a BAD_REQUEST). */
  field?: string;
}

export class FerryError extends Error {
  override name = 'FerryError';
  readonly code: ErrorCode;
  readonly phase: Phase | undefined;
  readonly details: string[];
  readonly field: string | undefined;

  constructor(code: ErrorCode, message: string, options: FerryErrorOptions = {}) {
    super(message, { cause: options.cause });
    this.code = code;
    this.phase = options.phase;
    this.details = options.details ?? [];
    this.field = options.field;
  }

  /** Same error, attributed to a phase when it has none yet. */
  inPhase(phase: Phase): FerryError {
    if (this.phase) return this;
    return new FerryError(this.code, this.message, { phase, cause: this.cause, details: this.details, ...(this.field ? { field: this.field } : {}) });
  }

  /** The wire form, for peers and clients. */
  toJSON(): WireError {
    return {
      code: this.code,
      message: this.hidesPaths ? withoutPaths(this.message) : this.message,
      ...(this.phase ? { phase: this.phase } : {}),
      ...(this.details.length ? { details: this.hidesPaths ? this.details.map(withoutPaths) : this.details } : {}),
      ...(this.field ? { field: this.field } : {}),
    };
  }

  /**
   * An internal error, or one made from a failed system call, tells a peer
   * what failed but not where on this host: paths are cut from its wire
   * form (the agent's log keeps the full error).
   */
  private get hidesPaths(): boolean {
    return this.code === 'INTERNAL' || isSystemError(this.cause);
  }
}

/** A Node system error (ENOENT, EEXIST, ...): its message names the paths involved. */
function isSystemError(error: unknown): boolean {
  return error instanceof Error && typeof (error as NodeJS.ErrnoException).syscall === 'string';
}

/** Replaces absolute paths, quoted (Node's form) or bare, with <path>; URLs stay. */
export function withoutPaths(text: string): string {
  return text.replace(/'\/[^']*'/g, "'<path>'").replace(/(?<![\w.~:/<-])\/[^\s'",;:()[\]{}<>]+/g, '<path>');
}

export interface WireError {
  code: ErrorCode;
  message: string;
  phase?: Phase;
  details?: string[];
  field?: string | undefined;
}

export class CriuError extends FerryError {
  override name = 'CriuError';
  readonly logFile: string | undefined;

  constructor(message: string, options: FerryErrorOptions & { logFile?: string } = {}) {
    super('CRIU_FAILED', message, options);
    this.logFile = options.logFile;
  }
}

/** Wraps anything thrown into a FerryError, keeping FerryErrors as they are. */
export function toFerryError(error: unknown, phase?: Phase, fallback: ErrorCode = 'INTERNAL'): FerryError {
  if (error instanceof FerryError) return phase ? error.inPhase(phase) : error;
  const message = error instanceof Error ? error.message : String(error);
  return new FerryError(fallback, message, { phase, cause: error });
}

export function fromWire(error: WireError): FerryError {
  return new FerryError(error.code, error.message, {
    ...(error.phase ? { phase: error.phase } : {}),
    ...(error.details ? { details: error.details } : {}),
    ...(error.field ? { field: error.field } : {}),
  });
}
