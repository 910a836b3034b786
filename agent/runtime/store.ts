import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { containerSpecSchema } from '../../src/protocol/container.ts';

/** What the agent remembers of a container, so a restarted agent finds it again. */
export const containerRecordSchema = z.object({
  spec: containerSpecSchema,
  pid: z.number().int(),
  /** Start time of the pid in clock ticks (/proc/PID/stat), to detect pid reuse. */
  pidStartTime: z.number().int(),
  createdAt: z.string(),
  history: z.array(z.string()),
  /** Set while an outgoing migration holds the container. */
  migrationId: z.string().optional(),
});
export type ContainerRecord = z.infer<typeof containerRecordSchema>;

/** Durable per-container state under <stateDir>/containers/<name>/. */
export class ContainerStore {
  readonly root: string;

  constructor(stateDir: string) {
    this.root = join(stateDir, 'containers');
  }

  directory(name: string): string {
    return join(this.root, name);
  }

  rootfs(name: string): string {
    return join(this.root, name, 'rootfs');
  }

  async read(name: string): Promise<ContainerRecord | undefined> {
    const text = await readFile(join(this.directory(name), 'state.json'), 'utf8').catch(() => undefined);
    return text ? containerRecordSchema.parse(JSON.parse(text)) : undefined;
  }

  /** Atomic: write a temporary file and rename it over the old one. */
  async write(record: ContainerRecord): Promise<void> {
    const directory = this.directory(record.spec.name);
    await mkdir(directory, { recursive: true });
    const temporary = join(directory, 'state.json.tmp');
    await writeFile(temporary, JSON.stringify(record, null, 2));
    await rename(temporary, join(directory, 'state.json'));
  }

  async names(): Promise<string[]> {
    const entries = await readdir(this.root, { withFileTypes: true }).catch(() => []);
    return entries.filter((entry) => entry.isDirectory()).map((entry) => entry.name).sort();
  }

  async remove(name: string): Promise<void> {
    await rm(this.directory(name), { recursive: true, force: true });
  }
}
