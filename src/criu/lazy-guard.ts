import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Duplex } from 'node:stream';
import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { lazyGuardPath } from '../paths.ts';
import { postcopyStatsSchema, type PostcopyStats } from '../protocol/migration.ts';
import { withTimeout } from '../timeout.ts';
import { criuEnvironment } from './criu.ts';

const guardEventSchema = z.discriminatedUnion('event', [
  z.object({ event: z.literal('ready') }),
  z.object({ event: z.literal('sealed'), uffds: z.number().int() }),
  postcopyStatsSchema.extend({ event: z.literal('complete'), uffds: z.number().int() }),
  postcopyStatsSchema.extend({ event: z.literal('failed'), reason: z.string(), stopped: z.boolean(), uffds: z.number().int() }),
]);
type GuardEvent = z.infer<typeof guardEventSchema>;

/**
 * The destination's lazy-pages daemon, run by ferry-lazy-guard
 * (native/lazy-guard.c), which holds the daemon's userfaultfds so that a
 * daemon that dies stops the copy instead of leaving it to run on zero
 * pages. `socket` is the daemon's page-server connection, for the agent to
 * join to the source; `settled` resolves with the figures once every page
 * is in, and rejects once the copy was stopped.
 */
export class LazyGuard {
  readonly socket: Duplex;
  readonly settled: Promise<PostcopyStats>;
  private readonly child: ChildProcess;
  private readonly events: GuardEvent[] = [];
  /** complete or failed: the guard's last word, which answers every wait from then on. */
  private end: GuardEvent | undefined;
  private readonly waiters = new Set<() => void>();
  private exited = false;
  private readonly log: string[] = [];

  /** How many userfaultfds the guard held at its end (one per task it saw, forks included). */
  get heldUffds(): number | undefined {
    return this.end && 'uffds' in this.end ? this.end.uffds : undefined;
  }

  private constructor(child: ChildProcess) {
    this.child = child;
    this.socket = child.stdio[3] as Duplex;
    // The socket's errors show up as the guard's end; it must not throw on its own.
    this.socket.on('error', () => undefined);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const parsed = guardEventSchema.safeParse(safeJson(line));
      if (parsed.success && (parsed.data.event === 'complete' || parsed.data.event === 'failed')) this.end ??= parsed.data;
      else if (parsed.success) this.events.push(parsed.data);
      this.wakeAll();
    });
    child.stderr!.on('data', (chunk: Buffer) => {
      this.log.push(chunk.toString('utf8'));
      if (this.log.length > 20) this.log.shift();
    });
    const exit = new Promise<void>((resolve) => child.once('close', () => resolve()));
    void exit.then(() => {
      this.exited = true;
      this.wakeAll();
    });
    this.settled = (async () => {
      const end = await this.next(() => false, Infinity, 'post-copy');
      if (end.event === 'complete') return postcopyStatsSchema.parse(end);
      if (end.event !== 'failed') throw new FerryError('INTERNAL', `unexpected guard event ${end.event}`);
      throw new FerryError(
        'TRANSFER_FAILED',
        `post-copy stopped on this host: ${end.reason}; the copy here was ${end.stopped ? 'stopped before it could run on missing pages' : 'NOT confirmed stopped'}`,
        { phase: 'postcopy' },
      );
    })();
    this.settled.catch(() => undefined);
  }

  /** Starts the guard and its daemon, and waits until the daemon listens for the restore. */
  static async start(options: { cgroupDir: string; daemon: string[] }): Promise<LazyGuard> {
    const child = spawn(lazyGuardPath(), ['--cgroup', options.cgroupDir, '--', ...options.daemon], {
      stdio: ['pipe', 'pipe', 'pipe', 'pipe'],
      env: criuEnvironment(),
      // Its own process group: a signal to the agent's group must not take the copy's guard with it.
      detached: true,
    });
    child.stdin!.on('error', () => undefined);
    const guard = new LazyGuard(child);
    try {
      const ready = await guard.next((event) => event.event === 'ready', 30_000, 'restore');
      if (ready.event !== 'ready') throw await guard.settled.then(() => new FerryError('INTERNAL', 'the guard completed before the restore'), (error: unknown) => error);
    } catch (error) {
      // Not handed to anyone yet: nobody else would stop it (and the daemon it started).
      await guard.stop();
      throw error;
    }
    return guard;
  }

  /** Resolves once the guard holds every userfaultfd of the restored tasks; then they may run. */
  async seal(): Promise<number> {
    this.child.stdin!.write('seal\n');
    const sealed = await this.next((event) => event.event === 'sealed', 30_000, 'restore');
    // A small container's pages may all be in before it runs: nothing left to hold.
    if (sealed.event === 'complete') return 0;
    if (sealed.event !== 'sealed') throw await this.settled.then(() => new FerryError('INTERNAL', `the guard said ${sealed.event} before it sealed`), (error: unknown) => error);
    return sealed.uffds;
  }

  /** Stops the copy (the guard kills its cgroup while it still holds the uffds) and waits for the guard to end. */
  async stop(): Promise<void> {
    if (!this.exited) this.child.stdin!.write('stop\n');
    await withTimeout(this.settled.catch(() => undefined), 60_000, 'stopping the post-copy guard', 'postcopy').catch(() => this.child.kill('SIGKILL'));
  }

  private wakeAll(): void {
    for (const waiter of [...this.waiters]) waiter();
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  private async next(match: (event: GuardEvent) => boolean, timeoutMs: number, phase: 'restore' | 'post-copy'): Promise<GuardEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.events.findIndex(match);
      if (index >= 0) return this.events.splice(index, 1)[0]!;
      // The guard's end answers every wait: each caller tells complete from failed (settled has the error).
      if (this.end) return this.end;
      if (this.exited) {
        throw new FerryError('TRANSFER_FAILED', `the post-copy guard ended unexpectedly: ${this.log.join('').trim().split('\n').slice(-3).join(' | ')}`, {
          phase: phase === 'post-copy' ? 'postcopy' : phase,
        });
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new FerryError('TIMEOUT', `the post-copy guard did not answer in ${timeoutMs} ms`, { phase: phase === 'post-copy' ? 'postcopy' : phase });
      await new Promise<void>((resolve) => {
        const waiter = () => {
          if (timer) clearTimeout(timer);
          this.waiters.delete(waiter);
          resolve();
        };
        const timer = Number.isFinite(left) ? setTimeout(waiter, left) : undefined;
        this.waiters.add(waiter);
      });
    }
  }
}

function safeJson(line: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    return undefined;
  }
}
