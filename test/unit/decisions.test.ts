// The commit protocol's decisions and the destination's state table: pure logic, every case.
import { describe, expect, it } from 'vitest';
import { acknowledged, applyDecision, commitOnce, destinationRecovery, sourceRecovery, type CommitPorts } from '../../agent/migration/decisions.ts';
import { destinationTransitions, type DestinationState } from '../../agent/migration/destination.ts';
import { destinationStates, journalEntrySchema, sourceStates, type DestinationEntry, type SourceEntry } from '../../agent/migration/journal.ts';

const base = { migrationId: 'abcdef12-0000', container: 'web', updatedAt: new Date(0).toISOString() };
const source = (state: SourceEntry['state']): SourceEntry => ({ ...base, role: 'source', state, destination: { url: 'ws://10.0.0.2:7070', token: 't' } });
const destination = (state: DestinationEntry['state']): DestinationEntry => ({ ...base, role: 'destination', state });

describe('after a restart', () => {
  it('a source commits only what its journal says it committed, and aborts the rest', () => {
    expect(sourceStates.map((state) => [state, sourceRecovery(source(state))])).toEqual([
      ['started', 'abort'],
      // Abort, but delivered before the thaw (recovery.ts): the destination may run its copy.
      ['postcopy', 'abort'],
      ['committed', 'commit'],
      ['aborted', 'abort'],
      ['done', 'commit'],
    ]);
  });

  it('a destination keeps a prepared copy for the decision and discards one that was still arriving', () => {
    expect(destinationRecovery(destination('prepared'))).toBe('await-decision');
    expect(destinationRecovery(destination('started'))).toBe('discard');
  });
});

describe('a decision on the destination', () => {
  it('resumes only a prepared copy on commit; every other decision discards, and an applied one is not applied again', () => {
    const table = destinationStates.flatMap((state) => (['commit', 'abort'] as const).map((decision) => [state, decision, applyDecision(state, decision)]));
    expect(table).toEqual([
      ['started', 'commit', 'discard'],
      ['started', 'abort', 'discard'],
      ['prepared', 'commit', 'resume'],
      ['prepared', 'abort', 'discard'],
      ['aborted', 'commit', 'already-applied'],
      ['aborted', 'abort', 'already-applied'],
      ['done', 'commit', 'already-applied'],
      ['done', 'abort', 'already-applied'],
    ]);
  });

  it('is acknowledged as commit only once the copy runs', () => {
    expect(acknowledged('done')).toBe('commit');
    for (const state of ['started', 'prepared', 'aborted', undefined] as const) expect(acknowledged(state)).toBe('abort');
  });
});

describe('the destination state table', () => {
  const states = Object.keys(destinationTransitions) as DestinationState[];
  const next = (state: DestinationState): readonly DestinationState[] => destinationTransitions[state];

  it('reaches committing only from prepared, and a commit cannot be undone into an abort', () => {
    expect(states.filter((state) => next(state).includes('committing'))).toEqual(['prepared']);
    expect(next('committing')).not.toContain('aborting');
  });

  it('can abort from every state before the commit, and nothing leaves done or aborted', () => {
    for (const state of ['preflight', 'receiving', 'restoring', 'prepared'] as const) expect(next(state)).toContain('aborting');
    expect(next('done')).toEqual([]);
    expect(next('aborted')).toEqual([]);
  });

  it('gets from preflight to done and to aborted, and names only its own states', () => {
    const reachable = new Set<DestinationState>();
    const visit = (state: DestinationState): void => {
      if (reachable.has(state)) return;
      reachable.add(state);
      next(state).forEach(visit);
    };
    visit('preflight');
    expect([...reachable].sort()).toEqual([...states].sort());
  });
});

describe('journal entries', () => {
  it('hold only the states of their role, and a source entry says where its destination is', () => {
    expect(journalEntrySchema.safeParse(source('committed')).success).toBe(true);
    expect(journalEntrySchema.safeParse({ ...destination('prepared') }).success).toBe(true);
    expect(journalEntrySchema.safeParse({ ...source('started'), state: 'prepared' }).success).toBe(false);
    expect(journalEntrySchema.safeParse({ ...destination('started'), state: 'committed' }).success).toBe(false);
    const { destination: _, ...withoutPeer } = source('started');
    expect(journalEntrySchema.safeParse(withoutPeer).success).toBe(false);
  });
});

describe('the source\'s commit, with in-memory ports', () => {
  /** Ports that log what happened, in order; each step may be told to fail. */
  function ports(options: { recordFails?: boolean; decided?: 'commit' | 'abort' | 'never'; stopFails?: boolean; warnings?: string[] } = {}) {
    const steps: string[] = [];
    const port: CommitPorts = {
      record: async () => {
        steps.push('record');
        if (options.recordFails) throw new Error('disk full');
      },
      send: () => void steps.push('send'),
      stopLocalCopy: async () => {
        steps.push('stop');
        await Promise.resolve();
        if (options.stopFails) throw new Error('cgroup busy');
        steps.push('stopped');
      },
      awaitDecided: async () => {
        steps.push('await');
        if ((options.decided ?? 'commit') === 'never') throw new Error('no decided in 60000 ms');
        return { decision: options.decided === 'abort' ? 'abort' : 'commit', warnings: options.warnings };
      },
    };
    return { steps, port };
  }

  it('records before it sends, stops the local copy while it waits, and is confirmed by the acknowledgement', async () => {
    const { steps, port } = ports({ warnings: ['network lock stayed on'] });
    const outcome = await commitOnce(port);
    expect(steps).toEqual(['record', 'send', 'stop', 'await', 'stopped']);
    expect(outcome).toEqual({ confirmed: true, warnings: ['destination: network lock stayed on'] });
  });

  it('sends nothing and rejects when the decision cannot be recorded', async () => {
    const { steps, port } = ports({ recordFails: true });
    await expect(commitOnce(port)).rejects.toThrow('disk full');
    expect(steps).toEqual(['record']);
  });

  it('is in doubt, not failed, when no acknowledgement comes; the local copy is stopped all the same', async () => {
    const { steps, port } = ports({ decided: 'never' });
    const outcome = await commitOnce(port);
    expect(outcome.confirmed).toBe(false);
    expect(String(outcome.unconfirmed)).toContain('no decided');
    expect(steps).toContain('stopped');
  });

  it('says the container was lost when the destination could not resume it, and a local copy that will not stop does not undo the commit', async () => {
    const lost = await commitOnce(ports({ decided: 'abort' }).port);
    expect(lost).toMatchObject({ confirmed: true, warnings: ['the destination could not resume the committed copy: the container was lost'] });
    const stuck = await commitOnce(ports({ stopFails: true }).port);
    expect(stuck.confirmed).toBe(true);
    expect(String(stuck.stopFailure)).toContain('cgroup busy');
  });
});
