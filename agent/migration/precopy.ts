import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { CriuRun } from '../../src/criu/criu.ts';
import type { DumpStats } from '../../src/criu/stats.ts';
import { decide, type Prediction, type RoundMeasurement, type StopReason } from '../../src/precopy/convergence.ts';
import type { MigrationReport, RoundReport } from '../../src/protocol/migration.ts';
import type { PageImage } from './pages.ts';
import { roundMs } from './timing.ts';

/** What pre-copy needs of the migration, and nothing more. */
export interface RoundPorts {
  /** Starts CRIU's pre-dump of the running container into `imagesDir` (the round before is `../N-1`). */
  preDump(round: number, imagesDir: string): CriuRun<DumpStats | undefined>;
  /** Ships the round's page images as CRIU writes them. */
  shipPages(run: CriuRun<DumpStats | undefined>, imagesDir: string, round: number): Promise<PageImage[]>;
  /** Sends the round's other images on the files channel; returns the bytes sent. */
  sendImages(round: number, imagesDir: string): Promise<number>;
  /** Throws when the migration must stop (a cancel, a destination that gave up): no further round. */
  ensureGoing(): void;
  /** Bytes both hosts can still give to rounds, and the container's resident memory. */
  space(): Promise<{ bytes: number; residentBytes: number }>;
  progress(report: RoundReport): void;
}

/**
 * Pre-dump rounds while the container runs (both kernels track dirty
 * memory), until the convergence policy calls the final dump. Each round's
 * images go under `rounds/N` and out as CRIU writes them.
 */
export class PrecopyRounds {
  private readonly ports: RoundPorts;
  private readonly directory: string;
  private readonly logger: Logger;
  private readonly measurements: RoundMeasurement[] = [];
  private readonly reports: RoundReport[] = [];
  private stop: { reason: StopReason; prediction?: Prediction } | undefined;

  constructor(ports: RoundPorts, directory: string, logger: Logger) {
    this.ports = ports;
    this.directory = directory;
    this.logger = logger;
  }

  get count(): number {
    return this.measurements.length;
  }

  /** The last round's images, relative to the final dump's directory, for CRIU's --prev-images-dir. */
  get parent(): string | undefined {
    return this.count ? `../rounds/${this.count}` : undefined;
  }

  async run(policy: { maxDowntimeMs: number; maxRounds: number }): Promise<void> {
    const space = await this.ports.space();
    for (;;) {
      const decision = decide(this.measurements, { ...policy, space });
      const last = this.reports.at(-1);
      if (last && decision.prediction) last.predictedDowntimeMs = decision.prediction.downtimeMs;
      if (decision.next === 'dump') {
        this.stop = { reason: decision.reason, ...(decision.prediction ? { prediction: decision.prediction } : {}) };
        this.logger.info({ reason: decision.reason, prediction: decision.prediction, rounds: this.count }, 'pre-copy done');
        return;
      }
      // A destination that gave up or died must not cost more rounds (each one freezes the container briefly).
      this.ports.ensureGoing();
      await this.round(this.count + 1);
    }
  }

  /** One round: CRIU writes the pages dirtied since the last round, which go out as they are written, then its other images. */
  private async round(round: number): Promise<void> {
    const imagesDir = join(this.directory, 'rounds', String(round));
    await mkdir(imagesDir, { recursive: true });
    const startedMs = performance.now();
    const run = this.ports.preDump(round, imagesDir);
    const shipping = this.ports.shipPages(run, imagesDir, round);
    let dumpedMs = startedMs;
    const [stats, pages] = await Promise.all([run.done.finally(() => (dumpedMs = performance.now())), shipping]).catch(
      async (error: unknown) => {
        await run.letFinish('the interrupted pre-dump', 'precopy');
        throw error;
      },
    );
    const restBytes = await this.ports.sendImages(round, imagesDir);
    const sentMs = performance.now();
    const measurement: RoundMeasurement = {
      startedMs,
      dumpedMs,
      sentMs,
      pagesWritten: stats?.pagesWritten ?? 0,
      pagesSkippedParent: stats?.pagesSkippedParent ?? 0,
      pagesScanned: stats?.pagesScanned ?? 0,
      bytesSent: restBytes + pages.reduce((sum, page) => sum + page.bytes, 0),
    };
    this.measurements.push(measurement);
    const report: RoundReport = {
      round,
      pagesWritten: measurement.pagesWritten,
      pagesSkippedParent: measurement.pagesSkippedParent,
      pagesScanned: measurement.pagesScanned,
      bytesSent: measurement.bytesSent,
      startMs: roundMs(startedMs - (this.measurements[0]?.startedMs ?? startedMs)),
      criuMs: roundMs(dumpedMs - startedMs),
      durationMs: roundMs(sentMs - startedMs),
      frozenMs: roundMs((stats?.frozenTime ?? 0) / 1000),
    };
    this.reports.push(report);
    this.logger.info(report, 'pre-dump round');
    this.ports.progress(report);
  }

  /** The report's pre-copy part, once the policy has stopped the rounds. */
  report(): MigrationReport['precopy'] {
    if (!this.stop) return undefined;
    return {
      rounds: this.reports,
      stopReason: this.stop.reason,
      ...(this.stop.prediction ? { predictedDowntimeMs: this.stop.prediction.downtimeMs } : {}),
    };
  }
}
