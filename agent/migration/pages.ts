import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import type { CriuRun } from '../../src/criu/criu.ts';
import { followImage, newPageImages } from '../../src/criu/follow.ts';
import type { PagePipes } from '../../src/criu/pipes.ts';
import { pageStreamName } from '../../src/protocol/migration.ts';
import type { ChannelSender, FdSource } from '../../src/transport/channel.ts';

export interface PageImage {
  name: string;
  bytes: number;
  digest: string;
}

/**
 * The pages channel, source side: every page image of the migration goes
 * out as CRIU writes it, and is remembered (name, size, digest) for the
 * transfer-complete that lists them.
 */
export class PageShipper {
  private readonly sender: ChannelSender;
  private readonly onBytes: (bytes: number) => void;
  readonly shipped: PageImage[] = [];

  constructor(sender: ChannelSender, onBytes: (bytes: number) => void) {
    this.sender = sender;
    this.onBytes = onBytes;
  }

  /** Page images whose frames left through the native sender, and its CPU time for them. */
  get native(): { streams: number; cpuMs: number } {
    return { streams: this.sender.nativeStreams, cpuMs: this.sender.nativeCpuMs };
  }

  /**
   * Sends each page image of `imagesDir` as CRIU writes it, until `run` is
   * done: those of `pipes` first, in CRIU's order, then any regular page
   * image files. Returns this run's images.
   */
  async ship(run: CriuRun<unknown>, imagesDir: string, round?: number, pipes?: PagePipes): Promise<PageImage[]> {
    const shipped: PageImage[] = [];
    const send = async (file: string, body: Readable | FdSource) => {
      const name = pageStreamName(file, round);
      const options = { onBytes: this.onBytes };
      const sent = body instanceof Readable ? await this.sender.sendStream(name, body, options) : await this.sender.sendFrom(name, body, options);
      shipped.push({ name, ...sent });
    };
    const seen = new Set<string>(pipes?.names);
    for (const file of pipes?.names ?? []) await send(file, pipes!.source(file));
    let finished = false;
    run.done.then(
      () => (finished = true),
      () => (finished = true),
    );
    for (;;) {
      const wasFinished = finished;
      const names = await newPageImages(imagesDir, seen);
      for (const file of names) {
        seen.add(file);
        await send(file, followImage(join(imagesDir, file), run));
      }
      if (!names.length && wasFinished) break;
      if (!names.length) await sleep(5);
    }
    this.shipped.push(...shipped);
    return shipped;
  }
}
