import cliProgress from 'cli-progress';
import { formatBytes, table } from '../src/format.ts';
import type { Capability } from '../src/protocol/host.ts';
import type { ContainerInfo } from '../src/protocol/container.ts';
import type { MigrationReport, ProgressEvent } from '../src/protocol/migration.ts';

export function containersTable(host: string, containers: ContainerInfo[]): string {
  return table(
    ['HOST', 'NAME', 'STATUS', 'PID', 'ADDRESS', 'MEMORY', 'COMMAND', 'HISTORY'],
    containers.map((container) => [
      host,
      container.name,
      container.status,
      String(container.pid ?? ''),
      container.address ?? '',
      container.memoryBytes ? formatBytes(container.memoryBytes) : '',
      container.command.join(' ').slice(0, 40),
      container.history.join(' → '),
    ]),
  );
}

export function doctorTable(capabilities: Capability[]): string {
  return table(
    ['CHECK', 'OK', 'VALUE'],
    capabilities.map((capability) => [
      capability.name,
      capability.ok ? 'yes' : capability.required ? 'NO (required)' : 'no',
      capability.value,
    ]),
  );
}

const ms = (value: number) => `${value.toFixed(value < 10 ? 1 : 0)} ms`;
const us = (value: number | undefined) => (value === undefined ? '-' : ms(value / 1000));

/** Where the downtime went, in order (they add up to it). */
function downtimeParts(parts: NonNullable<MigrationReport['downtime']>): string {
  const overlap = parts.pageBytes ? ` (${Math.round((parts.overlappedBytes / parts.pageBytes) * 100)} % of the pages on the link by its end)` : '';
  return [
    `freeze ${ms(parts.freezeMs)}`,
    `dump ${ms(parts.dumpMs)}${overlap}`,
    `ship ${ms(parts.shipMs)}`,
    `receive ${ms(parts.receiveMs)}`,
    `check ${ms(parts.checkMs)}`,
    `restore ${ms(parts.restoreMs)}`,
    `record ${ms(parts.recordMs)}`,
    `resume ${ms(parts.resumeMs)}`,
  ].join(', ');
}

export function reportText(report: MigrationReport): string {
  const lines = [
    `migration ${report.migrationId}: ${report.container} ${report.source} → ${report.destination}: ${report.outcome}`,
    `  downtime ${ms(report.downtimeMs)} (freeze → running on ${report.destination}), total ${ms(report.totalMs)}, strategy ${report.strategy}${report.strategyNote ? ` (${report.strategyNote})` : ''}`,
    `  bytes: rootfs ${formatBytes(report.bytes.rootfs)}, memory pages ${formatBytes(report.bytes.pages)}, other images ${formatBytes(report.bytes.images)}`,
    ...(report.downtime ? [`  downtime by part: ${downtimeParts(report.downtime)}`] : []),
    '',
    table(['PHASE', 'TIME'], report.phases.map((phase) => [phase.phase, ms(phase.ms)])),
  ];
  for (const warning of report.warnings ?? []) lines.push(`  warning: ${warning}`);
  if (report.postcopy) {
    const p = report.postcopy;
    lines.push(
      '',
      `Post-copy: running on ${report.destination} ${ms(p.runningMs)} after the start, last page ${ms(p.completeMs)} after the start (${ms(p.completeMs - p.runningMs)} later); ` +
        `${p.faultedPages} pages faulted on demand (${p.faults} faults), ${p.pushedPages} pushed; largest stall ${ms(Math.round(p.maxStallUs / 1000))}; ${formatBytes(p.pageBytes)} of pages`,
    );
  }
  if (report.precopy) {
    const { rounds, stopReason, predictedDowntimeMs } = report.precopy;
    const predicted = predictedDowntimeMs === undefined ? 'no prediction' : `predicted downtime ${ms(predictedDowntimeMs)}, actual ${ms(report.downtimeMs)}`;
    lines.push(
      '',
      `Pre-copy: ${rounds.length} rounds, stopped: ${stopReason}; ${predicted}`,
      table(
        ['ROUND', 'PAGES WRITTEN', 'SKIPPED (PARENT)', 'SENT', 'TIME', 'FROZEN', 'PREDICTED'],
        rounds.map((round) => [
          String(round.round),
          String(round.pagesWritten),
          String(round.pagesSkippedParent),
          formatBytes(round.bytesSent),
          ms(round.durationMs),
          ms(round.frozenMs),
          round.predictedDowntimeMs === undefined ? '-' : ms(round.predictedDowntimeMs),
        ]),
      ),
    );
  }
  const dump = report.criu.dump;
  const restore = report.criu.restore;
  if (dump || restore) {
    lines.push('', 'CRIU:');
    if (dump) {
      lines.push(
        `  dump: frozen_time ${us(dump.frozenTime)}, memdump_time ${us(dump.memdumpTime)}, memwrite_time ${us(dump.memwriteTime)}, pages_written ${dump.pagesWritten}, pages_skipped_parent ${dump.pagesSkippedParent}`,
      );
    }
    if (restore) {
      lines.push(`  restore: restore_time ${us(restore.restoreTime)}, forking_time ${us(restore.forkingTime)}, pages_restored ${restore.pagesRestored}`);
    }
  }
  return lines.join('\n');
}

/** Live progress: a bar on a terminal, JSON lines otherwise. */
export function progressPrinter(json: boolean): { update: (event: ProgressEvent) => void; stop: () => void } {
  if (json || !process.stderr.isTTY) {
    return { update: (event) => process.stdout.write(`${JSON.stringify({ progress: event })}\n`), stop: () => undefined };
  }
  const bar = new cliProgress.SingleBar(
    {
      format: '{phase} |{bar}| {done} / {total} at {rate}/s, ETA {eta_formatted}',
      stream: process.stderr,
      hideCursor: true,
    },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update: (event) => {
      const total = event.totalBytes ?? 0;
      const payload = {
        phase: event.phase.padEnd(9),
        done: formatBytes(event.bytes ?? 0),
        total: formatBytes(total),
        rate: formatBytes(event.bytesPerSecond ?? 0),
      };
      if (!started) {
        bar.start(Math.max(total, 1), event.bytes ?? 0, payload);
        started = true;
      } else {
        bar.setTotal(Math.max(total, 1));
        bar.update(event.bytes ?? 0, payload);
      }
    },
    stop: () => started && bar.stop(),
  };
}
