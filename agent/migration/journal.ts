import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { readJsonFile, writeJsonFile } from '../../src/json-file.ts';
import { FerryError } from '../../src/errors.ts';
import { describeIssues, destinationSchema } from '../../src/protocol/messages.ts';
import { migrationIdSchema } from '../../src/protocol/migration.ts';

// Durable migration records. The source alone decides commit or abort and
// writes the decision here before telling anyone, so after any crash both
// agents can find out which copy of the container is the one. Each role has
// its own states.

const entryBase = {
  // It names the entry's directory, which recovery may remove whole: never a path.
  migrationId: migrationIdSchema,
  container: z.string(),
  updatedAt: z.string(),
  error: z.string().optional(),
};

/** started → (postcopy →) committed → done, or → aborted. The source alone decides. postcopy: the destination may run its copy. */
export const sourceStates = ['started', 'postcopy', 'committed', 'aborted', 'done'] as const;
/** started → prepared → done, or → aborted, as the source decided. */
export const destinationStates = ['started', 'prepared', 'aborted', 'done'] as const;

export const journalEntrySchema = z.discriminatedUnion('role', [
  z.object({
    ...entryBase,
    role: z.literal('source'),
    state: z.enum(sourceStates),
    /** How to reach the destination again to deliver the decision. */
    destination: destinationSchema,
  }),
  z.object({ ...entryBase, role: z.literal('destination'), state: z.enum(destinationStates) }),
]);
export type JournalEntry = z.infer<typeof journalEntrySchema>;
export type SourceEntry = Extract<JournalEntry, { role: 'source' }>;
export type DestinationEntry = Extract<JournalEntry, { role: 'destination' }>;
export type JournalState = JournalEntry['state'];
type Unstamped<T> = T extends unknown ? Omit<T, 'updatedAt'> : never;

export function isFinal(state: JournalState): boolean {
  return state === 'done' || state === 'aborted';
}

/** How long a finished migration's journal and CRIU's logs stay for whoever wants to see what happened. */
export const finishedRetentionMs = 7 * 24 * 3600_000;

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

  async write(entry: Unstamped<JournalEntry>): Promise<JournalEntry> {
    const full = { ...entry, updatedAt: new Date().toISOString() } as JournalEntry;
    // A state the entry's role does not have is a bug here; it must not reach the disk.
    const checked = journalEntrySchema.safeParse(full);
    if (!checked.success) throw new FerryError('INTERNAL', `journal entry for ${entry.migrationId}: ${describeIssues(checked.error)}`);
    // It may hold the peer's token. Durable: after a power loss the decision must still be the one sent.
    await writeJsonFile(join(this.directory(entry.migrationId), 'journal.json'), full, 0o600, { durable: true });
    return full;
  }

  async update(migrationId: string, state: JournalState, error?: string): Promise<void> {
    const entry = await this.read(migrationId);
    if (entry) await this.write({ ...entry, state, ...(error ? { error } : {}) } as Unstamped<JournalEntry>);
  }

  /** Every readable entry. */
  async entries(): Promise<JournalEntry[]> {
    const names = await readdir(this.root).catch(() => []);
    const entries = await Promise.all(names.map((name) => this.read(name).catch(() => undefined)));
    return entries.filter((entry): entry is JournalEntry => !!entry);
  }

  /** Drops a migration's whole directory: its journal, CRIU's logs, any images. */
  async remove(migrationId: string): Promise<void> {
    await rm(this.directory(migrationId), { recursive: true, force: true });
  }

  /** Drops the bulky images, keeping the journal and CRIU's logs. */
  async removeImages(migrationId: string): Promise<void> {
    await rm(join(this.directory(migrationId), 'images'), { recursive: true, force: true });
    await rm(join(this.directory(migrationId), 'rounds'), { recursive: true, force: true });
  }
}
