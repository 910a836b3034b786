// The control protocol's request validation: what it refuses, and how it says so.
import { describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { FerryError, toFerryError, withoutPaths } from '../../src/errors.ts';
import { describeIssues, maxMessageDepth, parseJsonMessage, requestSchema } from '../../src/protocol/messages.ts';
import { peerMessageSchema } from '../../src/protocol/migration.ts';
import { requestPath } from '../../src/transport/limits.ts';

const spec = { name: 'web-1', rootfs: '/srv/rootfs', command: ['/bin/counter'] };

/** The one-line description of why `message` is refused; fails if it is accepted. */
function refusal(message: unknown): string {
  const result = requestSchema.safeParse(message);
  if (result.success) throw new Error(`accepted: ${JSON.stringify(result.data)}`);
  return describeIssues(result.error);
}

describe('requestSchema', () => {
  it('accepts well-formed requests and fills in the defaults', () => {
    expect(requestSchema.parse({ type: 'run', id: '1', spec })).toMatchObject({
      spec: { ...spec, env: {}, cwd: '/', privateNetwork: false, labels: {} },
    });
    expect(requestSchema.parse({ type: 'remove', id: '2', name: 'web-1' })).toMatchObject({ force: false });
    expect(requestSchema.parse({ type: 'checkpoint', id: '3', name: 'web-1', directory: '/ck' })).toMatchObject({
      keepRunning: false,
    });
  });

  it('refuses a request without an id', () => {
    expect(refusal({ type: 'list' })).toMatch(/^id: /);
  });

  it('refuses an unknown request type, naming the type field', () => {
    expect(refusal({ type: 'reboot', id: '1' })).toMatch(/^type: /);
  });

  it('refuses a container name with capitals or spaces, naming spec.name', () => {
    expect(refusal({ type: 'run', id: '1', spec: { ...spec, name: 'Web 1' } })).toMatch(/^spec\.name: .*lowercase/);
  });

  it('refuses an empty command, naming spec.command', () => {
    expect(refusal({ type: 'run', id: '1', spec: { ...spec, command: [] } })).toMatch(/^spec\.command: /);
  });

  it('refuses a relative checkpoint directory, naming directory', () => {
    expect(refusal({ type: 'checkpoint', id: '1', name: 'web-1', directory: 'ck' })).toMatch(/^directory: /);
  });

  it('refuses a negative grace period, naming graceMs', () => {
    expect(refusal({ type: 'stop', id: '1', name: 'web-1', graceMs: -1 })).toMatch(/^graceMs: /);
  });

  it('names every bad field at once, and "(message)" when the message itself is wrong', () => {
    const both = refusal({ type: 'run', id: '1', spec: { ...spec, rootfs: '', cwd: 'relative' } });
    expect(both).toContain('spec.rootfs: ');
    expect(both).toContain('spec.cwd: ');
    expect(both.split('; ')).toHaveLength(2);
    expect(refusal('not an object')).toMatch(/^\(message\): /);
  });
});

describe('ids that become paths', () => {
  it('refuses a migration-status id with "/" or "..", naming migrationId', () => {
    for (const migrationId of ['../../outside/fake', 'a/b/c/d/e/f', '..', 'short', `${'a'.repeat(65)}`]) {
      expect(refusal({ type: 'migration-status', id: '1', migrationId }), migrationId).toMatch(/^migrationId: /);
    }
    expect(requestSchema.parse({ type: 'migration-status', id: '1', migrationId: randomUUID() })).toMatchObject({ type: 'migration-status' });
  });

  it('refuses the same ids in peer messages', () => {
    const result = peerMessageSchema.safeParse({ type: 'staged', migrationId: '../../x/y/z' });
    expect(result.success).toBe(false);
  });
});

describe('numbers from a peer', () => {
  const offer = {
    type: 'offer',
    migrationId: randomUUID(),
    spec,
    history: [],
    source: { host: 'a', criuVersion: '3.19', kernel: '6.1' },
    cpuinfo: '',
    needs: { rootfsBytes: 1024, memoryBytes: 4096 },
  };

  it('accepts an offer with sizes in bytes', () => {
    expect(peerMessageSchema.safeParse(offer).success).toBe(true);
  });

  it('refuses negative, fractional or unbounded sizes, naming the field', () => {
    for (const rootfsBytes of [-1, 1.5, Number.POSITIVE_INFINITY, Number.NaN]) {
      const result = peerMessageSchema.safeParse({ ...offer, needs: { ...offer.needs, rootfsBytes } });
      expect(result.success, String(rootfsBytes)).toBe(false);
      if (!result.success) expect(describeIssues(result.error)).toMatch(/^needs\.rootfsBytes: /);
    }
  });

  it('refuses a negative page image size or a restore time below zero', () => {
    const pages = [{ name: 'pages-1.img', bytes: -4096, digest: 'a'.repeat(16) }];
    expect(peerMessageSchema.safeParse({ type: 'transfer-complete', migrationId: offer.migrationId, pages }).success).toBe(false);
    expect(peerMessageSchema.safeParse({ type: 'prepared', migrationId: offer.migrationId, restoreMs: -1 }).success).toBe(false);
  });
});

describe('parseJsonMessage', () => {
  it('parses ordinary messages, brackets inside strings included', () => {
    expect(parseJsonMessage('{"a":[1,{"b":"[[[[{{{{\\"]]"}]}')).toEqual({ a: [1, { b: '[[[[{{{{"]]' }] });
  });

  it('refuses nesting deeper than the bound before parsing', () => {
    const deep = `${'['.repeat(maxMessageDepth + 1)}${']'.repeat(maxMessageDepth + 1)}`;
    expect(() => parseJsonMessage(deep)).toThrow(/nested deeper/);
    const atBound = `${'['.repeat(maxMessageDepth)}${']'.repeat(maxMessageDepth)}`;
    expect(parseJsonMessage(atBound)).toBeInstanceOf(Array);
  });

  it('says BAD_MESSAGE for text that is not JSON', () => {
    expect(() => parseJsonMessage('{not json')).toThrow(expect.objectContaining({ code: 'BAD_MESSAGE', message: 'message is not JSON' }));
  });
});

describe('errors on the wire', () => {
  it('an internal error made from a failed system call carries no host path', async () => {
    const failed = await mkdir('/proc/self/ferry-test/x', { recursive: false }).catch((error: unknown) => error);
    const error = toFerryError(failed);
    expect(error.message).toContain('/proc/self/ferry-test/x');
    const wire = error.toJSON();
    expect(wire.code).toBe('INTERNAL');
    expect(wire.message).toMatch(/^ENOENT: .*mkdir '<path>'$/);
  });

  it('paths are cut from INTERNAL messages but URLs and deliberate messages stay', () => {
    expect(new FerryError('INTERNAL', 'cannot read /var/lib/ferry/x/state.json now').toJSON().message).toBe('cannot read <path> now');
    expect(withoutPaths("rename '/a b/x.tmp' -> '/a b/x'")).toBe("rename '<path>' -> '<path>'");
    expect(withoutPaths('ws://10.0.0.1:7070/control refused')).toBe('ws://10.0.0.1:7070/control refused');
    expect(new FerryError('ROOTFS_MISSING', 'no rootfs at /srv/rootfs').toJSON().message).toBe('no rootfs at /srv/rootfs');
  });
});

describe('requestPath', () => {
  it('takes origin-form targets and refuses what new URL would throw on', () => {
    expect(requestPath('/control')).toBe('/control');
    expect(requestPath('/metrics?x=1#y')).toBe('/metrics');
    for (const target of ['//a:99999', 'http://a:99999/control', '*', '', undefined]) expect(requestPath(target), String(target)).toBeUndefined();
  });
});
