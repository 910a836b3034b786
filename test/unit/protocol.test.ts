// The control protocol's request validation: what it refuses, and how it says so.
import { describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { errorCodes, FerryError, fromWire, toFerryError, withoutPaths } from '../../src/errors.ts';
import { errorBodySchema, httpStatusOf, wireErrorSchema } from '../../src/protocol/errors.ts';
import { checkedMessage, describeIssues, maxMessageDepth, parseJsonMessage, replySchema, requestSchema } from '../../src/protocol/messages.ts';
import { maxRoundNumber, migrationReportSchema, pageStreamName, parsePageStreamName, peerMessageSchema } from '../../src/protocol/migration.ts';
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

describe('one error shape', () => {
  const error = new FerryError('BAD_REQUEST', 'parallel: too small', { phase: 'request', field: 'parallel' });

  it('is the same on a reply, a peer abort, a report and an HTTP body, and reads back as the same error', () => {
    const wire = error.toJSON();
    expect(wire).toEqual({ code: 'BAD_REQUEST', message: 'parallel: too small', phase: 'request', field: 'parallel' });
    expect(replySchema.parse({ type: 'error', id: '1', error: wire })).toMatchObject({ error: wire });
    expect(peerMessageSchema.parse({ type: 'abort', migrationId: 'abcdef12', error: wire })).toMatchObject({ error: wire });
    expect(errorBodySchema.parse({ error: wire }).error).toEqual(wire);
    const back = fromWire(wireErrorSchema.parse(wire));
    expect([back.code, back.message, back.phase, back.field]).toEqual(['BAD_REQUEST', 'parallel: too small', 'request', 'parallel']);
    const report = { migrationId: 'm', container: 'c', source: 'a', destination: 'b', outcome: 'rolled-back', strategy: 'stop-and-copy', downtimeMs: 0, totalMs: 1, bytes: { rootfs: 0, pages: 0, images: 0 }, phases: [], criu: {} };
    expect(migrationReportSchema.parse({ ...report, error: wire }).error).toEqual(wire);
  });

  it('reads a code or phase it does not know as INTERNAL and no phase, so that an abort still aborts', () => {
    const abort = peerMessageSchema.parse({ type: 'abort', migrationId: 'abcdef12', error: { code: 'FROM_THE_FUTURE', message: 'x', phase: 'warp' } });
    expect(abort).toMatchObject({ error: { code: 'INTERNAL', message: 'x' } });
    expect(abort.type === 'abort' && abort.error.phase).toBeUndefined();
    expect(wireErrorSchema.safeParse({ code: 'BUSY' }).success).toBe(false);
  });

  it('has one HTTP status per code: client mistakes 4xx, the rest 500', () => {
    expect(Object.keys(httpStatusOf).sort()).toEqual([...errorCodes].sort());
    expect([httpStatusOf.BAD_REQUEST, httpStatusOf.UNAUTHORIZED, httpStatusOf.NOT_FOUND, httpStatusOf.METHOD_NOT_ALLOWED, httpStatusOf.BUSY, httpStatusOf.TOO_LARGE]).toEqual([400, 401, 404, 405, 409, 413]);
    expect(httpStatusOf.CRIU_FAILED).toBe(500);
  });
});

describe('outgoing messages', () => {
  it('are checked before they leave: one the protocol does not allow is INTERNAL, not sent', () => {
    const decided = { type: 'decided', migrationId: 'abcdef12', decision: 'commit', warnings: ['x'.repeat(2001)] };
    expect(() => checkedMessage(peerMessageSchema, decided, 'peer message')).toThrow(expect.objectContaining({ code: 'INTERNAL', message: expect.stringMatching(/warnings\.0/) }));
    const fine = { type: 'decided', migrationId: 'abcdef12', decision: 'commit' };
    expect(checkedMessage(peerMessageSchema, fine, 'peer message')).toBe(fine);
  });
});

describe('page stream names', () => {
  it('name the final dump\'s images as they are and round N\'s under round-N/, and read back', () => {
    expect(pageStreamName('pages-1.img')).toBe('pages-1.img');
    expect(pageStreamName('pages-3.img', 2)).toBe('round-2/pages-3.img');
    expect(parsePageStreamName('round-2/pages-3.img')).toEqual({ file: 'pages-3.img', round: 2 });
    expect(parsePageStreamName('pages-1.img')).toEqual({ file: 'pages-1.img' });
  });

  it('refuse anything else: other files, paths, round 0 or beyond the last round', () => {
    for (const name of ['inventory.img', '../pages-1.img', 'round-2/../pages-1.img', 'round-0/pages-1.img', `round-${maxRoundNumber + 1}/pages-1.img`, 'round-2/sub/pages-1.img', 'pages-1.img/']) {
      expect(parsePageStreamName(name), name).toBeUndefined();
    }
    expect(parsePageStreamName(`round-${maxRoundNumber}/pages-1.img`)).toEqual({ file: 'pages-1.img', round: maxRoundNumber });
  });
});

describe('requestPath', () => {
  it('takes origin-form targets and refuses what new URL would throw on', () => {
    expect(requestPath('/control')).toBe('/control');
    expect(requestPath('/metrics?x=1#y')).toBe('/metrics');
    for (const target of ['//a:99999', 'http://a:99999/control', '*', '', undefined]) expect(requestPath(target), String(target)).toBeUndefined();
  });
});
