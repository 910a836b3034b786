import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { readJsonFile, writeJsonFile } from '../../src/json-file.ts';
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
    return readJsonFile(join(this.directory(migrationId), 'journal.json'), journalEntrySchema);
  }

  async write(entry: Omit<JournalEntry, 'updatedAt'>): Promise<JournalEntry> {
    const full = { ...entry, updatedAt: new Date().toISOString() };
    // It may hold the peer's token. Durable: after a power loss the decision must still be the one sent.
    await writeJsonFile(join(this.directory(entry.migrationId), 'journal.json'), full, 0o600, { durable: true });
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
    await rm(join(this.directory(migrationId), 'rounds'), { recursive: true, force: true });
  }
}
