// Hand-made tar archives for the tests, including entries a real pack would never write.
import tar from 'tar-stream';

export interface TarEntry {
  name: string;
  type?: 'file' | 'directory' | 'symlink';
  body?: string;
  linkname?: string;
}

export async function tarOf(entries: TarEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const collected = (async () => {
    for await (const chunk of pack as AsyncIterable<Buffer>) chunks.push(chunk);
  })();
  for (const entry of entries) {
    const header = { name: entry.name, type: entry.type ?? 'file', mode: 0o644, mtime: new Date(0), ...(entry.linkname ? { linkname: entry.linkname } : {}) };
    await new Promise<void>((resolve, reject) => {
      const done = (error?: Error | null) => (error ? reject(error) : resolve());
      if (header.type === 'file') pack.entry(header, entry.body ?? '', done);
      else pack.entry(header, done);
    });
  }
  pack.finalize();
  await collected;
  return Buffer.concat(chunks);
}
