import { chmod, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { destinationSchema } from '../../src/protocol/messages.ts';

// Durable migration records. The source alone decides commit or abort and
// writes the decision here before telling anyone, so after any crash both
// agents can find out which copy of the container is the one.

export const journalEntrySchema = z.object({
  migrationId: z.string(),
  role: z.enum(['source', 'destination']),
  container: z.string(),
  state: z.enum(['started', 'prepared', 'committed', 'aborted', 'done']),
  /** Source only: how to reach the destination again to deliver the decision. */
  destination: destinationSchema.optional(),
  updatedAt: z.string(),
  error: z.string().optional(),
});
export type JournalEntry = z.infer<typeof journalEntrySchema>;
export type JournalState = JournalEntry['state'];

export class MigrationJournal {
  readonly root: string;

  constructor(stateDir: string) {
    this.root = join(stateDir, 'migrations');
  }

  directory(migrationId: string): string {
    return join(this.root, migrationId);
  }

  async read(migrationId: string): Promise<JournalEntry | undefined> {
    const text = await readFile(join(this.directory(migrationId), 'journal.json'), 'utf8').catch(() => undefined);
    return text ? journalEntrySchema.parse(JSON.parse(text)) : undefined;
  }

  async write(entry: Omit<JournalEntry, 'updatedAt'>): Promise<JournalEntry> {
    const full = { ...entry, updatedAt: new Date().toISOString() };
    const directory = this.directory(entry.migrationId);
    await mkdir(directory, { recursive: true, mode: 0o700 });
    const temporary = join(directory, 'journal.json.tmp');
    // It may hold the peer's token.
    await writeFile(temporary, JSON.stringify(full, null, 2), { mode: 0o600 });
    await chmod(temporary, 0o600);
    await rename(temporary, join(directory, 'journal.json'));
    return full;
  }

  async update(migrationId: string, state: JournalState, error?: string): Promise<void> {
    const entry = await this.read(migrationId);
    if (entry) await this.write({ ...entry, state, ...(error ? { error } : {}) });
  }

  /** Entries whose migration has not reached a final state. */
  async unfinished(): Promise<JournalEntry[]> {
    const names = await readdir(this.root).catch(() => []);
    const entries = await Promise.all(names.map((name) => this.read(name).catch(() => undefined)));
    return entries.filter(
      (entry): entry is JournalEntry => !!entry && entry.state !== 'done' && entry.state !== 'aborted',
    );
  }

  /** Drops the bulky images, keeping the journal and CRIU's logs. */
  async removeImages(migrationId: string): Promise<void> {
    await rm(join(this.directory(migrationId), 'images'), { recursive: true, force: true });
  }
}
