import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { place, type CandidateHost, type PlacementRequest } from '../../coordinator/placement.ts';
import { compareVersions } from '../../src/criu/version.ts';
import { Store } from '../../coordinator/store.ts';
import type { ContainerInfo } from '../../src/protocol/container.ts';
import type { HostInfo } from '../../src/protocol/host.ts';

const MiB = 1024 * 1024;
const NOW = 1_000_000;

function container(name: string, memoryMiB: number, labels: Record<string, string> = {}): ContainerInfo {
  return { name, status: 'running', command: ['/bin/x'], createdAt: '', history: [], memoryBytes: memoryMiB * MiB, labels };
}

function host(name: string, options: { freeMiB?: number; criu?: string; containers?: ContainerInfo[]; draining?: boolean; ageMs?: number; limitMiB?: number } = {}): CandidateHost {
  const info: HostInfo = {
    name,
    kernel: '6.1',
    ...(options.criu === '' ? {} : { criu: { path: '/criu', version: options.criu ?? '4.1' } }),
    capabilities: [],
    capacity: { memoryBytes: 8192 * MiB, memoryAvailableBytes: (options.freeMiB ?? 4096) * MiB, cpus: 2, diskFreeBytes: 10_000 * MiB },
    containers: options.containers ?? [],
    migrations: 0,
  };
  return {
    name,
    draining: options.draining ?? false,
    lastHeartbeatMs: NOW - (options.ageMs ?? 0),
    info,
    ...(options.limitMiB ? { memoryLimitBytes: options.limitMiB * MiB } : {}),
  };
}

function request(hosts: CandidateHost[], overrides: Partial<PlacementRequest> = {}): PlacementRequest {
  const source = host('a', { draining: true, containers: [container('web', 32)] });
  return { container: container('web', 32), source, hosts: [source, ...hosts], nowMs: NOW, staleMs: 6_000, marginBytes: 8 * MiB, ...overrides };
}

describe('placement', () => {
  it('picks the least loaded host: fewest containers, then most free memory', () => {
    const b = host('b', { containers: [container('x', 1)] });
    const c = host('c', { freeMiB: 1000 });
    const d = host('d', { freeMiB: 2000 });
    expect(place(request([b, c, d]))).toMatchObject({ ok: true, target: 'd' });
  });

  it('never picks the source, a draining, excluded, not-allowed or stale host', () => {
    const decision = place(
      request([host('b', { draining: true }), host('c', { ageMs: 10_000 }), host('d'), host('e')], {
        exclude: new Set(['d']),
        allowed: ['b', 'c', 'd'],
      }),
    );
    expect(decision).toMatchObject({
      ok: false,
      code: 'NO_TARGET',
      rejected: { a: 'source', b: 'draining', c: 'down', d: 'excluded', e: 'not-allowed' },
    });
  });

  it('requires CRIU on both sides and a target CRIU at least as new as the source', () => {
    const decision = place(request([host('old', { criu: '3.17.1' }), host('none', { criu: '' }), host('new', { criu: '4.1.1' })]));
    expect(decision).toMatchObject({ ok: true, target: 'new' });
    expect(place(request([host('old', { criu: '3.17.1' })]))).toMatchObject({ ok: false, rejected: { old: 'criu-older' } });
    expect(place(request([host('none', { criu: '' })]))).toMatchObject({ ok: false, rejected: { none: 'no-criu' } });
  });

  it('needs the container memory plus the margin free, minus what is already promised and capped by the limit', () => {
    expect(place(request([host('b', { freeMiB: 39 })]))).toMatchObject({ ok: false, rejected: { b: 'memory' } });
    expect(place(request([host('b', { freeMiB: 40 })]))).toMatchObject({ ok: true, target: 'b' });
    const promised = { ...host('b', { freeMiB: 100 }), promised: { memoryBytes: 70 * MiB, diskBytes: 0 } };
    expect(place(request([promised]))).toMatchObject({ ok: false, rejected: { b: 'memory' } });
    const limited = host('b', { limitMiB: 64, containers: [container('x', 30)] });
    expect(place(request([limited]))).toMatchObject({ ok: false, rejected: { b: 'memory' } });
    // A container already listed on its target while it arrives is not counted twice.
    const arriving = { ...host('b', { limitMiB: 100, containers: [container('x', 40)] }), promised: { memoryBytes: 48 * MiB, diskBytes: 0, containers: ['x'] } };
    expect(place(request([arriving]))).toMatchObject({ ok: true, target: 'b' }); // 100 - 48 promised leaves 52 >= 32 + 8

  });

  it('keeps containers of one anti-affinity group apart', () => {
    const labels = { 'anti-affinity': 'web' };
    const b = host('b', { containers: [container('web-1', 1, labels)] });
    const c = host('c', { containers: [container('x', 1), container('y', 1)] });
    expect(place(request([b, c], { container: container('web-2', 1, labels) }))).toMatchObject({ ok: true, target: 'c' });
    expect(place(request([b], { container: container('web-2', 1, labels) }))).toMatchObject({ ok: false, rejected: { b: 'anti-affinity' } });
    expect(place(request([b], { container: container('web-2', 1, labels), ignoreAntiAffinity: true }))).toMatchObject({ ok: true });
    // A group member still on its way counts too.
    const incoming = { ...host('d'), promised: { memoryBytes: 0, diskBytes: 0, groups: ['web'] } };
    expect(place(request([incoming], { container: container('web-3', 1, labels) }))).toMatchObject({ ok: false, rejected: { d: 'anti-affinity' } });
  });

  it('compares versions numerically', () => {
    expect(compareVersions('4.1', '3.17.1')).toBe(1);
    expect(compareVersions('4.0', '4')).toBe(0);
    expect(compareVersions('3.9', '3.17')).toBe(-1);
  });
});

describe('coordinator store', () => {
  it('keeps hosts, migrations, evacuations and origins across reopening', () => {
    const directory = mkdtempSync(join(tmpdir(), 'ferry-store-'));
    try {
      const file = join(directory, 'c.db');
      let store = new Store(file);
      store.upsertHost({ name: 'a', url: 'ws://a', token: 't', labels: { zone: '1' } });
      store.setDraining('a', true);
      const evacuation = store.createEvacuation({ host: 'a', parallel: 2 });
      const migration = store.createMigration({ container: 'web', source: 'a', target: null, evacuationId: evacuation.id });
      store.markMigrationRunning(migration.id, 'b');
      store.recordOrigin(evacuation.id, 'web', 'a');
      store.addUnplaced(evacuation.id, 'db', 'no host fits');
      store.close();
      store = new Store(file);
      expect(store.host('a')).toMatchObject({ draining: true, labels: { zone: '1' } });
      expect(store.migrations({ unfinished: true })).toMatchObject([{ id: migration.id, state: 'running', target: 'b' }]);
      expect(store.evacuations({ running: true })).toMatchObject([{ id: evacuation.id, unplaced: [{ container: 'db' }] }]);
      expect(store.origins(evacuation.id)).toEqual([{ container: 'web', origin: 'a' }]);
      store.addUnplaced(evacuation.id, 'db', undefined); // moved after all
      expect(store.evacuation(evacuation.id)!.unplaced).toEqual([]);
      store.finishMigration(migration.id, 'succeeded', { downtimeMs: 12 });
      expect(store.migrations({ unfinished: true })).toEqual([]);
      const second = store.createMigration({ container: 'web', source: 'b', target: 'a' });
      expect(store.migrations().map((row) => row.id)).toEqual([migration.id, second.id]);
      store.close();
    } finally {
      rmSync(directory, { recursive: true, force: true });
    }
  });
});
