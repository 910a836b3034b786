import { closeSync, constants, fstatSync, openSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { Socket } from 'node:net';
import { PassThrough, type Readable } from 'node:stream';
import { AT_FDCWD, fsat } from '../rootfs/safe-fs.ts';
import type { FdSource } from '../transport/channel.ts';

// The final dump's page images are named pipes, made before CRIU starts:
// CRIU opens pages-N.img with O_CREAT|O_TRUNC, which an existing FIFO
// takes, and splices the pages into it. They go from the frozen tasks to
// the data channel without a page-cache copy of the whole memory on this
// host (on a VM that returns freed memory to its host, writing 1 GiB of
// fresh page cache took seconds of the downtime), and an image ends when
// CRIU closes it, with no polling.

const S_IFIFO = 0o010000;
/**
 * Buffered per pipe when the agent reads one itself (no native sender). The
 * native sender enlarges the pipe it reads to 4 MiB; read from JavaScript,
 * 1 MiB pipes were no faster than the kernel's default in the runs we made.
 */
const bodyBytes = 256 << 10;

interface PagePipe {
  name: string;
  path: string;
  fd: number;
  /** Made when the image is read in the agent (not by the native sender): it owns the fd from then on. */
  reader: { socket: Socket; body: PassThrough } | undefined;
  closed: boolean;
}

export class PagePipes {
  private readonly pipes: PagePipe[];
  private released = false;

  private constructor(pipes: PagePipe[]) {
    this.pipes = pipes;
  }

  /**
   * pages-1.img … pages-`count`.img in `imagesDir`, each open for reading.
   * CRIU numbers page images from 1 in the order it writes them, one per
   * process with memory and per shared-memory segment; past `count` it makes
   * regular files, which the caller follows as before.
   */
  static create(imagesDir: string, count: number): PagePipes {
    const pipes: PagePipe[] = [];
    try {
      for (let id = 1; id <= count; id += 1) {
        const name = `pages-${id}.img`;
        const path = join(imagesDir, name);
        fsat().mknodat(AT_FDCWD, path, S_IFIFO | 0o600, 0, 0);
        // Non-blocking, or the open would wait for CRIU to open the other end.
        const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW);
        pipes.push({ name, path, fd, reader: undefined, closed: false });
      }
    } catch (error) {
      for (const pipe of pipes) closeSync(pipe.fd);
      throw error;
    }
    return new PagePipes(pipes);
  }

  get names(): string[] {
    return this.pipes.map((pipe) => pipe.name);
  }

  /** What CRIU writes into page image `name`, ending when CRIU has closed it (or never opened it, once released). */
  source(name: string): FdSource {
    const pipe = this.pipes.find((candidate) => candidate.name === name);
    if (!pipe) throw new Error(`no page pipe ${name}`);
    return { fd: pipe.fd, readable: () => this.reader(pipe).body };
  }

  private reader(pipe: PagePipe): { socket: Socket; body: PassThrough } {
    if (pipe.reader) return pipe.reader;
    const socket = new Socket({ fd: pipe.fd, readable: true, writable: false });
    const body = new PassThrough({ highWaterMark: bodyBytes });
    // A read error fails this image's stream (and so the migration), never the agent.
    socket.on('error', (error) => body.destroy(error));
    socket.pipe(body);
    pipe.reader = { socket, body };
    return pipe.reader;
  }

  /**
   * CRIU has exited: a pipe it never opened would never see an end, so each
   * gets a writer that closes at once, which ends it after whatever is
   * still buffered (images CRIU did not need are sent empty).
   */
  release(): void {
    if (this.released) return;
    this.released = true;
    for (const pipe of this.pipes) {
      if (pipe.closed || pipe.reader?.socket.readableEnded || pipe.reader?.socket.destroyed) continue;
      try {
        closeSync(openSync(pipe.path, constants.O_WRONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW));
      } catch {
        // ENXIO: its reader is gone already, so nothing waits for its end.
      }
    }
  }

  /**
   * The shipping failed: read on and discard, so a CRIU still writing never
   * blocks on a full pipe (killing it mid-dump could harm the frozen tasks).
   */
  discard(): void {
    for (const pipe of this.pipes) {
      if (pipe.closed) continue;
      const { socket, body } = this.reader(pipe);
      socket.unpipe(body);
      body.destroy();
      socket.on('data', () => undefined);
      socket.on('error', () => undefined);
      socket.resume();
    }
  }

  /** Closes every read end (CRIU has exited). */
  close(): void {
    for (const pipe of this.pipes) {
      if (pipe.closed) continue;
      pipe.closed = true;
      if (pipe.reader) pipe.reader.socket.destroy();
      else closeSync(pipe.fd);
    }
  }
}

/**
 * After the agent that made the page pipes in `imagesDir` died: a CRIU it
 * started may be blocked opening one (a FIFO's writer waits for a reader)
 * or writing into one, with the tasks seized and its parasite inside them.
 * Reads every pipe there and discards what comes, until no task of
 * `tasks()` is traced any more (CRIU has let them go, as it found them) or
 * `timeoutMs` passes. Resolves whether the tasks were let go.
 */
export async function drainOrphanedPipes(imagesDir: string, tasks: () => Promise<number[]>, timeoutMs = 60_000): Promise<boolean> {
  const readers: Socket[] = [];
  for (const name of await readdir(imagesDir).catch(() => [] as string[])) {
    if (!/^pages-\d+\.img$/.test(name)) continue;
    try {
      const fd = openSync(join(imagesDir, name), constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW);
      if (!fstatSync(fd).isFIFO()) {
        closeSync(fd);
        continue;
      }
      const reader = new Socket({ fd, readable: true, writable: false });
      reader.on('error', () => undefined);
      reader.on('data', () => undefined);
      readers.push(reader);
    } catch {
      // gone, or not ours to read
    }
  }
  try {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const traced = await Promise.all((await tasks().catch(() => [] as number[])).map(isTraced));
      if (!traced.includes(true)) return true;
      if (Date.now() > deadline) return false;
      await sleep(50);
    }
  } finally {
    for (const reader of readers) reader.destroy();
  }
}

async function isTraced(pid: number): Promise<boolean> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  return /^TracerPid:\s*[1-9]/m.test(status);
}
