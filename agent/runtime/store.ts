import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { readJsonFile, writeJsonFile } from '../../src/json-file.ts';
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
    return readJsonFile(join(this.directory(name), 'state.json'), containerRecordSchema);
  }

  async write(record: ContainerRecord): Promise<void> {
    await writeJsonFile(join(this.directory(record.spec.name), 'state.json'), record);
  }

  async names(): Promise<string[]> {
    const entries = await readdir(this.root, { withFileTypes: true }).catch(() => []);
    return entries.filter((entry) => entry.isDirectory()).map((entry) => entry.name).sort();
  }

  async remove(name: string): Promise<void> {
    await rm(this.directory(name), { recursive: true, force: true });
  }
}
