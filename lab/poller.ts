// A client that holds one long-lived TCP connection to a service and talks
// over it every few milliseconds, for tests, the benchmark and the demo. Run
// inside a client host's netns; it reports whether the connection ever broke,
// whether any answer was lost or repeated, and the largest gap between answers.
//
//   node lab/poller.ts http|echo HOST PORT INTERVAL_MS
//
// http: GET over one keep-alive connection; each answer's `served=N` must be
// one more than the last (the server counts every request it answered).
// echo: writes "<seq>\n" and expects exactly those bytes back, in order.
// Prints a JSON line {"answers":N,...} every second and a final summary on SIGTERM.
import { request, Agent } from 'node:http';
import { connect, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import type { Host } from './hosts.ts';
import { spawnInNetns } from './system.ts';
import { agentNodeFlags } from '../src/paths.ts';
import { fileURLToPath } from 'node:url';

export interface PollerSummary {
  answers: number;
  /** TCP connections opened: 1 when the connection survived. */
  connections: number;
  errors: string[];
  /** Answers whose content broke the sequence (lost or repeated bytes or requests). */
  outOfOrder: number;
  maxGapMs: number;
  /** When the largest gap ended, ms since the poller started. */
  maxGapEndMs: number;
  /** The last answer's text. */
  last: string;
}

function summaryOf(state: PollerSummary): string {
  return JSON.stringify(state);
}

async function pollerMain(mode: string, host: string, port: number, intervalMs: number): Promise<void> {
  const started = performance.now();
  const state: PollerSummary = { answers: 0, connections: 0, errors: [], outOfOrder: 0, maxGapMs: 0, maxGapEndMs: 0, last: '' };
  let lastAnswerAt = performance.now();
  let stopping = false;
  const answered = (text: string) => {
    const now = performance.now();
    if (state.answers > 0 && now - lastAnswerAt > state.maxGapMs) {
      state.maxGapMs = Math.round(now - lastAnswerAt);
      state.maxGapEndMs = Math.round(now - started);
    }
    lastAnswerAt = now;
    state.answers += 1;
    state.last = text.trim();
  };
  const report = setInterval(() => process.stdout.write(`${summaryOf(state)}\n`), 1000);
  process.once('SIGTERM', () => {
    stopping = true;
  });
  const pause = () => new Promise((resolve) => setTimeout(resolve, intervalMs));
  // Bounded: a test or demo that forgets the poller does not leave it running.
  const deadline = started + 15 * 60_000;

  if (mode === 'http') {
    // keepAliveMsecs is also TCP keepalive's idle time, and Node probes every 1 s,
    // 10 times: at the default 1 s a pause over ~11 s (a move under the VM lane's
    // emulated CPU) ended the connection with ETIMEDOUT, which no common client does.
    const agent = new Agent({ keepAlive: true, keepAliveMsecs: 60_000, maxSockets: 1 });
    const sockets = new Set<Socket>();
    let served: number | undefined;
    while (!stopping && performance.now() < deadline) {
      const text = await new Promise<string>((resolve, reject) => {
        const req = request({ host, port, path: '/', agent, timeout: 60_000 }, (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (chunk: string) => (body += chunk));
          res.on('end', () => resolve(body));
          res.on('error', reject);
        });
        req.on('socket', (socket) => {
          if (!sockets.has(socket)) {
            sockets.add(socket);
            state.connections += 1;
          }
        });
        req.on('timeout', () => req.destroy(new Error('no answer for 60 s')));
        req.on('error', reject);
        req.end();
      }).catch((error: Error) => {
        state.errors.push(`${Math.round(performance.now() - started)} ms: ${error.message}`);
        return undefined;
      });
      if (text !== undefined) {
        const value = Number(/served=(\d+)/.exec(text)?.[1]);
        if (served !== undefined && value !== served + 1) state.outOfOrder += 1;
        served = value;
        answered(text);
      }
      await pause();
    }
    agent.destroy();
  } else {
    const socket = connect({ host, port });
    state.connections = 1;
    socket.setNoDelay(true);
    socket.on('error', (error) => state.errors.push(`${Math.round(performance.now() - started)} ms: ${error.message}`));
    socket.on('close', () => {
      if (!stopping) state.errors.push(`${Math.round(performance.now() - started)} ms: connection closed`);
      stopping = true;
    });
    const lines = createInterface({ input: socket })[Symbol.asyncIterator]();
    let seq = 0;
    while (!stopping && performance.now() < deadline) {
      seq += 1;
      socket.write(`${seq}\n`);
      const next = await lines.next().catch(() => ({ done: true, value: undefined }));
      if (next.done) break;
      if (next.value !== String(seq)) state.outOfOrder += 1;
      answered(String(next.value));
      await pause();
    }
    socket.destroy();
  }
  clearInterval(report);
  process.stdout.write(`${summaryOf(state)}\n`);
}

export interface Poller {
  /** The latest progress line. */
  current(): PollerSummary | undefined;
  /** Waits until a report made after this call counts at least `count` answers. */
  waitForAnswers(count: number, timeoutMs?: number): Promise<PollerSummary>;
  /**
   * Waits for `count` more answers than a report made after this call shows:
   * answers the client got after whatever the caller did just before (a
   * migration, say). waitForAnswers(before + n) is not that: the answers
   * counted while the caller acted may already reach it.
   */
  waitForMore(count: number, timeoutMs?: number): Promise<PollerSummary>;
  /** SIGTERM, then the final summary. */
  stop(): Promise<PollerSummary>;
}

/** Starts the poller in `client`'s netns against HOST:PORT. */
export function startPoller(client: Host, mode: 'http' | 'echo', host: string, port: number, intervalMs = 10): Poller {
  const script = fileURLToPath(import.meta.url);
  const child = spawnInNetns(client.netns, process.execPath, [...agentNodeFlags, script, mode, host, String(port), String(intervalMs)]);
  let latest: PollerSummary | undefined;
  let reports = 0;
  const waiters = new Set<() => void>();
  createInterface({ input: child.stdout! }).on('line', (line) => {
    try {
      latest = JSON.parse(line) as PollerSummary;
      reports += 1;
    } catch {
      return;
    }
    for (const wake of waiters) wake();
  });
  const ended = child.then(() => undefined);
  return {
    current: () => latest,
    async waitForAnswers(count, timeoutMs = 20_000) {
      const deadline = Date.now() + timeoutMs;
      // A report from before the call may predate what the caller waits to see (a freeze, say).
      const after = reports;
      while (!latest || reports === after || latest.answers < count) {
        if (Date.now() > deadline) throw new Error(`poller: ${latest?.answers ?? 0} answers after ${timeoutMs} ms, wanted ${count} (${JSON.stringify(latest)})`);
        await new Promise<void>((resolve) => {
          const wake = () => {
            waiters.delete(wake);
            resolve();
          };
          waiters.add(wake);
          setTimeout(wake, 250);
        });
      }
      return latest;
    },
    async waitForMore(count, timeoutMs = 20_000) {
      const now = await this.waitForAnswers(0, timeoutMs);
      return this.waitForAnswers(now.answers + count, timeoutMs);
    },
    async stop() {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await ended;
      clearTimeout(timer);
      if (!latest) throw new Error('poller reported nothing');
      return latest;
    },
  };
}

if (import.meta.main) {
  const [mode = '', host = '', port = '', interval = '10'] = process.argv.slice(2);
  if ((mode !== 'http' && mode !== 'echo') || !host || !Number(port)) {
    process.stderr.write('usage: node lab/poller.ts http|echo HOST PORT [INTERVAL_MS]\n');
    process.exit(2);
  }
  await pollerMain(mode, host, Number(port), Number(interval));
}
