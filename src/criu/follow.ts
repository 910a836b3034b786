import { readdir, readlink } from 'node:fs/promises';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';

// Page images are shipped while CRIU writes them: each pages-*.img is read as
// it grows and ends once CRIU has closed it. CRIU writes these files
// sequentially, so a reader that follows the end sees every byte once.

export const pageImagePattern = /^pages-\d+\.img$/;
/** Read size (the channel cuts it into frames). */
const chunkBytes = 1 << 20;
const pollMs = 5;

export interface CriuProcess {
  readonly pid: number | undefined;
  readonly exited: boolean;
}

/** Page image names in `imagesDir` not yet in `seen`, in name order. */
export async function newPageImages(imagesDir: string, seen: Set<string>): Promise<string[]> {
  const names = await readdir(imagesDir).catch(() => [] as string[]);
  return names.filter((name) => pageImagePattern.test(name) && !seen.has(name)).sort();
}

/** A readable of `path` that follows its growth until `criu` has closed it. */
export function followImage(path: string, criu: CriuProcess): Readable {
  return Readable.from(follow(path, criu), { objectMode: false });
}

async function* follow(path: string, criu: CriuProcess): AsyncGenerator<Buffer> {
  const handle = await open(path, 'r');
  try {
    let position = 0;
    for (;;) {
      const buffer = Buffer.allocUnsafe(chunkBytes);
      const { bytesRead } = await handle.read(buffer, 0, chunkBytes, position);
      if (bytesRead > 0) {
        position += bytesRead;
        yield buffer.subarray(0, bytesRead);
        continue;
      }
      // Closed first, then one more read: anything written before the close is seen.
      if (await isClosed(path, criu)) {
        const tail = Buffer.allocUnsafe(chunkBytes);
        const last = await handle.read(tail, 0, chunkBytes, position);
        if (last.bytesRead === 0) return;
        position += last.bytesRead;
        yield tail.subarray(0, last.bytesRead);
        continue;
      }
      await sleep(pollMs);
    }
  } finally {
    await handle.close();
  }
}

async function isClosed(path: string, criu: CriuProcess): Promise<boolean> {
  if (criu.exited || criu.pid === undefined) return true;
  const fdDir = `/proc/${criu.pid}/fd`;
  const fds = await readdir(fdDir).catch(() => undefined);
  if (!fds) return true;
  for (const fd of fds) {
    if ((await readlink(join(fdDir, fd)).catch(() => '')) === path) return false;
  }
  return true;
}
