// The control protocol's request validation: what it refuses, and how it says so.
import { describe, expect, it } from 'vitest';
import { describeIssues, requestSchema } from '../../src/protocol/messages.ts';

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
