import { chmod, mkdir, readdir, rm } from 'node:fs/promises';
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

  /** Creates a container's directory, private to root like the rest of the state. */
  async create(name: string): Promise<void> {
    await mkdir(this.directory(name), { recursive: true, mode: 0o700 });
    await chmod(this.directory(name), 0o700);
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

/**
 * The state directory and what holds container rootfs and images are 0700:
 * a rootfs may hold setuid files that no other local user may reach. Run at
 * every start, so an older or hand-made state directory is narrowed too.
 */
export async function securePrivateState(stateDir: string, store: ContainerStore, migrationsRoot: string): Promise<void> {
  for (const directory of [stateDir, store.root, migrationsRoot]) {
    await mkdir(directory, { recursive: true, mode: 0o700 });
    await chmod(directory, 0o700);
  }
  for (const name of await store.names()) await chmod(store.directory(name), 0o700).catch(() => undefined);
}
