export type Part = 'rootfs' | 'pages' | 'images';

/** Counts the bytes of each part as they are sent, for progress events and the report. */
export class TransferMeter {
  private readonly bytes: Record<Part, number> = { rootfs: 0, pages: 0, images: 0 };
  private expected = 0;
  private readonly startedAt = performance.now();

  expect(totalBytes: number): void {
    this.expected = totalBytes;
  }

  counter(part: Part): (bytes: number) => void {
    return (bytes) => {
      this.bytes[part] += bytes;
    };
  }

  totals(): Record<Part, number> {
    return { ...this.bytes };
  }

  snapshot(): { bytes: number; totalBytes: number; bytesPerSecond: number } {
    const bytes = this.bytes.rootfs + this.bytes.pages + this.bytes.images;
    const seconds = (performance.now() - this.startedAt) / 1000;
    return { bytes, totalBytes: Math.max(this.expected, bytes), bytesPerSecond: Math.round(bytes / Math.max(seconds, 0.001)) };
  }
}
