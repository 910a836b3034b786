import { z } from 'zod';
import { socketSummarySchema } from '../net/sockets.ts';
import { phases } from '../errors.ts';
import { dumpStatsSchema, restoreStatsSchema } from '../criu/stats.ts';
import { containerSpecSchema } from './container.ts';
import { byteCount, count, milliseconds, rate } from './numbers.ts';
import { digestPattern } from '../digest.ts';
import { wireErrorSchema } from './errors.ts';

/** At most this many pre-dump rounds (the options allow no more). */
export const maxRoundNumber = 32;

export const migrationOptionsSchema = z.object({
  strategy: z.enum(['auto', 'precopy', 'stop-and-copy', 'postcopy']).default('auto'),
  /** Whether auto may pick post-copy (its failure window differs: the source host must stay up until the last page). */
  allowPostcopy: z.boolean().optional(),
  /** Downtime budget for the pre-copy convergence policy. */
  maxDowntimeMs: z.number().int().positive().default(300),
  maxRounds: z.number().int().min(0).max(maxRoundNumber).default(8),
  /**
   * Post-copy: how long either agent waits out a silent link (a cut) before it
   * gives up on the other. Within it the page transfer resumes and the copy
   * runs on; past it the destination's copy is stopped and the source's resumes.
   */
  postcopyGraceMs: z.number().int().min(2_000).max(10 * 60_000).optional(),
  /** Send the rootfs while the container runs, then only what changed; false sends it all during the freeze (a baseline for benchmarks). */
  rootfsPrecopy: z.boolean().default(true),
  /** Bound on the whole migration; on expiry it rolls back. */
  timeoutMs: z.number().int().positive().default(10 * 60_000),
});
export type MigrationOptions = z.infer<typeof migrationOptionsSchema>;

/** The bound on a silent link during post-copy unless the migration says otherwise. */
export const defaultPostcopyGraceMs = 30_000;

/** One pre-dump round in the report. */
export const roundReportSchema = z.object({
  round: z.number().int().positive(),
  pagesWritten: count,
  pagesSkippedParent: count,
  pagesScanned: count,
  bytesSent: byteCount,
  /** When CRIU started, from the first round's start. */
  startMs: milliseconds,
  /** CRIU's run time. */
  criuMs: milliseconds,
  /** From CRIU's start to the round's last byte handed to the link. */
  durationMs: milliseconds,
  /** How long CRIU kept the tasks frozen to collect the round's pages. */
  frozenMs: milliseconds,
  /** The downtime the policy predicted after this round (from the second round on). */
  predictedDowntimeMs: milliseconds.optional(),
});
export type RoundReport = z.infer<typeof roundReportSchema>;

export const stopReasons = ['within-budget', 'not-shrinking', 'budget-unreachable', 'max-rounds', 'no-space'] as const;

export const phaseTimingSchema = z.object({ phase: z.enum(phases), ms: milliseconds });

/** The destination's side of the restore step, timed there. */
export const restoreTimingSchema = z.object({
  /** From transfer-complete until every image was here and checked. */
  waitMs: milliseconds,
  /** Image checks and the cgroup, network and address set-up before CRIU. */
  checkMs: milliseconds,
  /** The criu restore process, start to exit. */
  criuMs: milliseconds,
  /** Recording the copy (pid, lock, store, journal) before answering. */
  recordMs: milliseconds,
});
export type RestoreTiming = z.infer<typeof restoreTimingSchema>;

/**
 * Where the downtime went, in order, on the source's clock: the parts add up
 * to downtimeMs. Pages stream while CRIU dumps, so `ship` is only what was
 * left to send once CRIU exited; `receive` is the rest of the wait for the
 * destination (its unpacking and checksums, the link's latency).
 */
export const downtimeBreakdownSchema = z.object({
  freezeMs: milliseconds,
  dumpMs: milliseconds,
  shipMs: milliseconds,
  receiveMs: milliseconds,
  checkMs: milliseconds,
  restoreMs: milliseconds,
  recordMs: milliseconds,
  resumeMs: milliseconds,
  /** Page bytes on the link by the time CRIU exited, of pageBytes in all. */
  overlappedBytes: byteCount,
  pageBytes: byteCount,
});
export type DowntimeBreakdown = z.infer<typeof downtimeBreakdownSchema>;

/** The destination's account of post-copy: how the pages came once the container ran there. */
export const postcopyStatsSchema = z.object({
  /** Page requests the lazy-pages daemon sent. */
  requests: count,
  /** Requests for one page, which the daemon sends when a task faults on it. */
  faults: count,
  faultedPages: count,
  /** Pages sent in ranges, ahead of any fault. */
  pushedPages: count,
  /** The longest a faulting task waited for its page, in microseconds. */
  maxStallUs: z.number().int().nonnegative(),
  /** From the lazy-pages daemon's start to its last page. */
  lastPageMs: milliseconds,
});
export type PostcopyStats = z.infer<typeof postcopyStatsSchema>;

export const migrationReportSchema = z.object({
  migrationId: z.string(),
  container: z.string(),
  source: z.string(),
  destination: z.string(),
  outcome: z.enum(['succeeded', 'rolled-back', 'in-doubt']),
  strategy: z.enum(['precopy', 'stop-and-copy', 'postcopy']),
  strategyNote: z.string().optional(),
  /** From the freeze on the source to the container running on the destination. */
  downtimeMs: milliseconds,
  downtime: downtimeBreakdownSchema.optional(),
  totalMs: milliseconds,
  bytes: z.object({ rootfs: byteCount, pages: byteCount, images: byteCount }),
  phases: z.array(phaseTimingSchema),
  criu: z.object({ dump: dumpStatsSchema.optional(), restore: restoreStatsSchema.optional() }),
  /** Memory pre-copy: every round, why the rounds stopped, and the downtime predicted for the final dump. */
  precopy: z
    .object({
      rounds: z.array(roundReportSchema),
      stopReason: z.enum(stopReasons),
      predictedDowntimeMs: milliseconds.optional(),
    })
    .optional(),
  /** Post-copy: the container ran on the destination from runningMs (after the start), its last page arrived at lastPageMs. */
  postcopy: postcopyStatsSchema
    .extend({
      runningMs: milliseconds,
      completeMs: milliseconds,
      pageBytes: byteCount,
      /** The longest the source heard nothing from the destination during post-copy (a cut link waited out). */
      longestSilenceMs: milliseconds.optional(),
      /** The bound on such a silence. */
      graceMs: milliseconds.optional(),
    })
    .optional(),
  error: wireErrorSchema.optional(),
  /** Cleanup trouble after the commit: the migration succeeded, something was left to tidy. */
  warnings: z.array(z.string()).optional(),
});
export type MigrationReport = z.infer<typeof migrationReportSchema>;

export const progressEventSchema = z.object({
  migrationId: z.string(),
  phase: z.enum(phases),
  message: z.string().optional(),
  bytes: byteCount.optional(),
  totalBytes: byteCount.optional(),
  bytesPerSecond: rate.optional(),
});
export type ProgressEvent = z.infer<typeof progressEventSchema>;

/**
 * Every migration id that arrives (peer messages, data channel paths,
 * migration-status) is checked by this one schema: it names a directory in
 * the state directory, so it must never hold a "/" or "..".
 */
export const migrationIdSchema = z.string().regex(/^[a-zA-Z0-9-]{8,64}$/, 'letters, digits and "-", 8 to 64 of them');
const migrationId = migrationIdSchema;
/** XXH3-64 of a stream or a file (src/digest.ts). */
const digestHex = z.string().regex(digestPattern);

/** Messages between the source and the destination agent of one migration. */
export const peerMessageSchema = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('offer'),
    migrationId,
    spec: containerSpecSchema,
    history: z.array(z.string()),
    source: z.object({ host: z.string(), criuVersion: z.string(), kernel: z.string() }),
    /** `criu cpuinfo dump` of the source, base64. */
    cpuinfo: z.string(),
    /** rootfsEntries bounds how many entries the destination unpacks (absent from older sources). */
    needs: z.object({ rootfsBytes: byteCount, memoryBytes: byteCount, rootfsEntries: count.optional() }),
    /** The sockets the container holds: the destination refuses what its CRIU cannot restore. */
    sockets: socketSummarySchema.optional(),
    /** Post-copy: memory pages are not sent as images; the destination's lazy-pages daemon asks for them on the pages channel. */
    lazyPages: z.boolean().optional(),
    /** Post-copy: the bound on a silent link (migration option postcopyGraceMs). */
    postcopyGraceMs: z.number().int().min(2_000).max(10 * 60_000).optional(),
  }),
  z.object({
    type: z.literal('accept'),
    migrationId,
    /** memoryTracking: this kernel has soft-dirty, so pre-copy is possible if the source has it too. */
    destination: z.object({
      host: z.string(),
      criuVersion: z.string(),
      memoryTracking: z.boolean().default(false),
      /** Free bytes in its state directory, which bounds the pre-dump rounds it keeps. */
      freeBytes: byteCount.optional(),
    }),
  }),
  /** The destination has applied rootfs pass 1, so the freeze will not compete with unpacking it. */
  z.object({ type: z.literal('staged'), migrationId }),
  /** Everything is sent: restore, leaving the tasks stopped. */
  z.object({
    type: z.literal('transfer-complete'),
    migrationId,
    /**
     * The page images sent on the pages channel, pre-dump rounds' as
     * round-N/pages-K.img; the destination restores once it has them all.
     */
    pages: z.array(z.object({ name: z.string(), bytes: byteCount, digest: digestHex })),
  }),
  z.object({
    type: z.literal('prepared'),
    migrationId,
    restoreStats: restoreStatsSchema.optional(),
    restoreMs: milliseconds,
    timing: restoreTimingSchema.optional(),
    /** Post-copy: every page is on the destination, whose copy runs; it waits for the decision like a stopped one. */
    postcopy: postcopyStatsSchema.optional(),
  }),
  /** Post-copy: the destination restored the container and it runs there, its pages still arriving. */
  z.object({ type: z.literal('running'), migrationId, restoreMs: milliseconds, restoreStats: restoreStatsSchema.optional(), timing: restoreTimingSchema.optional() }),
  /** The source's decision, sent in the session or again after a restart until acknowledged. */
  z.object({ type: z.literal('decision'), migrationId, decision: z.enum(['commit', 'abort']) }),
  /** Acknowledges a decision: the destination's copy runs (commit) or is gone (abort). */
  z.object({
    type: z.literal('decided'),
    migrationId,
    decision: z.enum(['commit', 'abort']),
    /** Trouble of a copy that runs (its network lock would not come off, say): for the source's report. */
    warnings: z.array(z.string().max(2000)).max(20).optional(),
  }),
  /**
   * Post-copy, from a restarted source agent on a new connection: it serves
   * the pages of the still-frozen tasks again, if the copy still waits here.
   */
  z.object({ type: z.literal('rejoin'), migrationId }),
  /** The copy waits: the source opens a new pages channel (prepared: every page is here already; only the decision is missing). */
  z.object({ type: z.literal('rejoined'), migrationId, prepared: z.boolean() }),
  /** Either side gives up before the decision, saying why. */
  z.object({
    type: z.literal('abort'),
    migrationId,
    error: wireErrorSchema,
  }),
]);
export type PeerMessage = z.infer<typeof peerMessageSchema>;

/**
 * The source's steps, in order, and what the destination may send during
 * each (besides an abort, at any time): the answer to what the source sent
 * in that step. Anything else is out of order and ends the migration.
 */
export const destinationSendsInStep = {
  preflight: ['accept'],
  precopy: ['staged'],
  freeze: [],
  dump: [],
  restore: ['prepared', 'running'],
  postcopy: ['rejoined', 'prepared'],
  confirm: ['decided'],
  cleanup: [],
} as const satisfies Record<string, ReadonlyArray<PeerMessage['type']>>;
export type SourceStep = keyof typeof destinationSendsInStep;
export const sourceSteps = Object.keys(destinationSendsInStep) as SourceStep[];

/** Text frames on a data channel; binary frames between them are the payload. */
export const dataFrameSchema = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('stream-open'),
    name: z.string(),
    /** Paths to remove before this stream is applied (the rootfs final pass). */
    deleted: z.array(z.string()).optional(),
  }),
  z.object({
    type: z.literal('stream-end'),
    bytes: byteCount,
    digest: digestHex,
    /** The digest of every regular file in a tar stream, by path. */
    files: z.record(z.string(), digestHex).optional(),
  }),
]);
export type DataFrame = z.infer<typeof dataFrameSchema>;

export const dataChannels = ['files', 'pages'] as const;
export type DataChannel = (typeof dataChannels)[number];

/**
 * The files channel's streams, in this order: the rootfs (pass 1, sent while
 * the container runs), each pre-dump round's non-page images (round-1 …
 * round-N), the rootfs final pass (what changed by the freeze, and the
 * deletions), then the final dump's non-page images. Only the final pass may
 * delete.
 */
export const filesStreams = { rootfs: 'rootfs', rootfsDelta: 'rootfs-delta', images: 'images' } as const;
export type FilesStream = (typeof filesStreams)[keyof typeof filesStreams];

/** Pre-dump round N's non-page images on the files channel. */
export function roundStreamName(round: number): string {
  return `round-${round}`;
}

/**
 * The pages channel carries page images in any order, each as soon as CRIU
 * writes it: the final dump's under its own name, round N's as
 * round-N/pages-K.img. The destination restores once it has every one that
 * transfer-complete lists.
 */
export function pageStreamName(file: string, round?: number): string {
  return round === undefined ? file : `round-${round}/${file}`;
}

/** The inverse of pageStreamName; undefined for anything else. */
export function parsePageStreamName(name: string): { file: string; round?: number } | undefined {
  const match = /^(?:round-([1-9]\d?)\/)?(pages-\d+\.img)$/.exec(name);
  if (!match) return undefined;
  const [, round, file] = match;
  if (round === undefined) return { file: file! };
  return Number(round) <= maxRoundNumber ? { file: file!, round: Number(round) } : undefined;
}
