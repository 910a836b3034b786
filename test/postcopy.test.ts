// Post-copy between two netns hosts with real CRIU: the container runs on
// the destination before its memory is there, pages come over the pages
// channel on demand and in the background, and when the page supply breaks
// mid-way the destination's copy is stopped (its guard holds the
// userfaultfds, so no task ever sees a zero page for a missing one) and the
// frozen copy on the source goes on, memory intact.
import { readFile } from 'node:fs/promises';
import { execa } from 'execa';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  containerPid,
  failureOf,
  isAlive,
  logsOf,
  memloadSpec,
  migrate,
  removeQuietly,
  requestChecksum,
  requestVerify,
  runContainer,
  startNodes,
  waitForMemload,
  waitUntilClean,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';
import { memloadSpec as memloadWith, poll } from './helpers/workloads.ts';
import { cutLink, cutOnSwitch, reconnectSoon, resetConnections } from './helpers/faults.ts';

let test: TestCluster;

beforeAll(async () => {
  test = await startNodes(2);
});

afterAll(async () => {
  await test?.close();
});

/** Runs a memload on `node`; its checksum once it has filled its memory. */
async function startMemload(node: Node, spec: Parameters<typeof runContainer>[1]): Promise<string> {
  await runContainer(node, spec);
  await waitForMemload(node, spec.name);
  return requestChecksum(node, spec.name);
}

/** The memload on `node` has the memory it had: the same checksum, and every page as written. */
async function expectIntact(node: Node, name: string, checksum: string): Promise<void> {
  expect(await requestChecksum(node, name)).toBe(checksum);
  expect(await requestVerify(node, name)).toMatch(/^verify ok /);
}

/** The destination's guard, once the container runs there on lazy pages. */
async function guardOnceRunning(node: Node, name: string): Promise<number> {
  const entry = await node.agent.waitForLog((line) => line.json?.msg === 'post-copy: userfaultfds held; resuming' && line.json?.container === name, 60_000);
  await node.agent.waitForLog((line) => line.json?.msg === 'post-copy: running here; pages follow' && line.json?.container === name, 10_000);
  return Number(entry.json?.guard);
}

/** The lazy-pages daemon: the guard's only child. */
async function daemonOf(guard: number): Promise<number> {
  const children = (await readFile(`/proc/${guard}/task/${guard}/children`, 'utf8')).trim().split(/\s+/).map(Number);
  expect(children).toHaveLength(1);
  expect(await readFile(`/proc/${children[0]}/cmdline`, 'utf8')).toContain('lazy-pages');
  return children[0]!;
}

it('moves a 256 MiB memory workload post-copy, memory intact', async () => {
  const [a, b] = test.nodes as [Node, Node];
  const name = 'pc-move';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const report = await migrate(a, b, name, undefined, { strategy: 'postcopy' });
  expect(report.outcome).toBe('succeeded');
  expect(report.strategy).toBe('postcopy');
  const postcopy = report.postcopy!;
  expect(postcopy).toBeDefined();
  // The memory went as pages over the channel, not as images: at least the 256 MiB the workload wrote.
  expect(postcopy.pageBytes).toBeGreaterThan(256 * 2 ** 20);
  expect(postcopy.faultedPages + postcopy.pushedPages).toBeGreaterThanOrEqual(65_536);
  expect(report.bytes.images).toBeLessThan(32 * 2 ** 20);
  expect(postcopy.completeMs).toBeGreaterThanOrEqual(postcopy.runningMs);
  await expectIntact(b, name, checksum);
  await waitUntilClean(a, name);
  await b.client.request('remove', { name, force: true });
});

it('moves a container whose pages are all in before it was to run (a small one, the seal late)', async () => {
  const a = test.nodes[0]!;
  const b = await test.restartAgent(1, { token: test.nodes[1]!.agent.token, env: { FERRY_FAULTS: 'postcopy-seal-delay:3000' } });
  const name = 'pc-small';
  const checksum = await startMemload(a, memloadSpec(name, 8));
  const report = await migrate(a, b, name, undefined, { strategy: 'postcopy' });
  expect(report.outcome).toBe('succeeded');
  await expectIntact(b, name, checksum);
  await b.client.request('remove', { name, force: true });
  await test.restartAgent(1, { token: test.nodes[1]!.agent.token });
});

it('auto picks post-copy only where allowed and stop-and-copy would outlast the budget, and says why', async () => {
  const [a, b] = test.nodes as [Node, Node];
  const name = 'pc-auto';
  const checksum = await startMemload(a, memloadSpec(name, 128));
  const there = await migrate(a, b, name, undefined, { strategy: 'auto', allowPostcopy: true, maxDowntimeMs: 50 });
  expect(there.strategy).toBe('postcopy');
  expect(there.strategyNote).toMatch(/post-copy \(allowed\).*over the 50 ms budget/);
  // Not allowed: the same move back is stop-and-copy.
  const back = await migrate(b, a, name, undefined, { strategy: 'auto', maxDowntimeMs: 50 });
  expect(back.strategy).toBe('stop-and-copy');
  expect(await requestChecksum(a, name)).toBe(checksum);
  await removeQuietly(a, name);
});

// Tasks forked on the destination while pages still arrive get userfaultfds of their own (CRIU's
// daemon is told of each fork): their missing pages must be served too, and the guard must hold
// those uffds as well, or a broken supply would hand the children zero pages.
it('serves the pages of tasks forked during post-copy, and holds their uffds', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-fork';
  const checksum = await startMemload(a, memloadWith(name, 128, { forkVerifyMs: 100 }));
  const report = await migrate(a, b, name, undefined, { strategy: 'postcopy' });
  expect(report.strategy).toBe('postcopy');
  const forMove = (message: string) => (line: { json?: Record<string, unknown> }) => line.json?.msg === message && line.json?.container === name;
  const sealed = await b.agent.waitForLog(forMove('post-copy: userfaultfds held; resuming'), 5_000);
  const complete = await b.agent.waitForLog(forMove('post-copy: every page is here'), 5_000);
  // More uffds held at the end than at the resume: tasks forked here during post-copy, each held.
  expect(Number(complete.json?.uffds), JSON.stringify(complete.json)).toBeGreaterThan(Number(sealed.json?.uffds));
  console.log(`post-copy with forks: uffds held at the resume ${sealed.json?.uffds}, by the last page ${complete.json?.uffds}, last page ${complete.json?.lastPageMs} ms`);
  const verified = (log: string) => log.split('\n').filter((line) => line.startsWith('fork verify'));
  const atMove = verified(await logsOf(b, name)).length;
  // Children forked since then on B verify their copies too; none saw a page it should not.
  const log = await poll('three more children verified on B', 30_000, async () => {
    const text = await logsOf(b, name);
    return verified(text).length >= atMove + 3 ? text : undefined;
  });
  expect(verified(log).filter((line) => !line.startsWith('fork verify ok '))).toEqual([]);
  await expectIntact(b, name, checksum);
  await removeQuietly(b, name);
});

it('stops the destination copy when its lazy-pages daemon dies, and the source goes on', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-daemon';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const pid = await containerPid(a, name);
  const moving = failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy' }));
  const daemon = await daemonOf(await guardOnceRunning(b, name));
  process.kill(daemon, 'SIGKILL');
  const error = await moving;
  expect(error.phase).toBe('postcopy');
  expect(error.message).toMatch(/lazy-pages daemon was killed by signal 9/);
  expect(error.message).toMatch(/stopped before it could run on missing pages/);
  expect(error.details.join('\n')).toMatch(/runs here again from its state at the freeze/);
  await waitUntilClean(b, name);
  expect(await containerPid(a, name)).toBe(pid);
  expect(await isAlive(pid)).toBe(true);
  await expectIntact(a, name, checksum);
  await removeQuietly(a, name);
});

it('resumes the source when the lazy restore fails on the destination', async () => {
  const a = test.nodes[0]!;
  const b = await test.restartAgent(1, { token: test.nodes[1]!.agent.token, env: { FERRY_FAULTS: 'fail-restore' } });
  const name = 'pc-restore';
  const checksum = await startMemload(a, memloadSpec(name, 64));
  const pid = await containerPid(a, name);
  const error = await failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy' }));
  expect(error.phase).toBe('restore');
  expect(error.code).toBe('CRIU_FAILED');
  expect(error.message).toMatch(/criu restore/);
  await waitUntilClean(b, name);
  // The guard went with the copy: no ferry-lazy-guard or lazy-pages daemon is left on B.
  expect((await execa('pgrep', ['-f', `lazy-pages.*${b.host.stateDir}`], { reject: false })).stdout).toBe('');
  expect(await containerPid(a, name)).toBe(pid);
  await expectIntact(a, name, checksum);
  await removeQuietly(a, name);
  await test.restartAgent(1, { token: test.nodes[1]!.agent.token });
});

// What the guard prevents, shown with its kill delayed 12 s after the daemon died: holding the
// uffds, the copy's next read of a missing page waits (and dies with the copy); without
// them (test fault no-hold) the same read gets a zero page and memload reports the mismatch.
for (const hold of [true, false]) {
  it(`a copy whose page supply broke ${hold ? 'waits on a missing page, never reading a zero' : 'reads zero pages when nobody holds its uffds (the guard disabled)'}`, async () => {
    const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
    const b = await test.restartAgent(1, { token: test.nodes[1]!.agent.token, env: { FERRY_GUARD_FAULTS: `kill-after:12000${hold ? '' : ',no-hold'}` } });
    const name = hold ? 'pc-held' : 'pc-unheld';
    try {
      const checksum = await startMemload(a, memloadSpec(name, 256));
      const moving = failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy' }));
      const daemon = await daemonOf(await guardOnceRunning(b, name));
      process.kill(daemon, 'SIGKILL');
      // The copy on B, still there for 12 s, is asked to check every page against its pattern.
      const before = (await logsOf(b, name)).split('\n').length - 1;
      process.kill(await containerPid(b, name), 'SIGUSR2');
      const after = async () => (await logsOf(b, name)).split('\n').slice(before).join('\n');
      if (hold) {
        await sleep(2_000);
        expect(await after()).not.toMatch(/^verify /m);
      } else {
        // Before the guard's delayed kill (12 s); a loaded machine may take a while to print it (over 7 s once, in a full run).
        const answer = await poll('memload to answer the verify', 11_000, async () => (/^verify /m.test(await after()) ? after() : undefined));
        expect(answer).toMatch(/^verify mismatch page \d+/m);
      }
      const error = await moving;
      expect(error.phase).toBe('postcopy');
      await waitUntilClean(b, name);
      await expectIntact(a, name, checksum);
    } finally {
      // A failure here must not leave the container to the tests after it.
      await removeQuietly(a, name);
      await test.restartAgent(1, { token: test.nodes[1]!.agent.token });
    }
  });
}

it('resumes the source when the destination agent is SIGKILLed mid-post-copy', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const name = 'pc-agent';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const pid = await containerPid(a, name);
  const moving = failureOf(migrate(a, test.nodes[1]!, name, undefined, { strategy: 'postcopy' }));
  const guard = await guardOnceRunning(test.nodes[1]!, name);
  await test.nodes[1]!.agent.kill('SIGKILL');
  // The guard outlives its agent just long enough to stop the copy, uffds held.
  await poll('the guard to stop the copy and exit', 30_000, async () => ((await isAlive(guard)) ? undefined : true));
  const b = await test.restartAgent(1, { token: test.nodes[1]!.agent.token });
  const error = await moving;
  expect(['restore', 'postcopy']).toContain(error.phase);
  await waitUntilClean(b, name);
  await poll('the source to thaw its copy', 60_000, async () => {
    const verdict = await requestVerify(a, name).catch(() => undefined);
    return verdict?.startsWith('verify ok ') ? true : undefined;
  });
  expect(await containerPid(a, name)).toBe(pid);
  expect(await requestChecksum(a, name)).toBe(checksum);
  await removeQuietly(a, name);
});

it('serves the pages again from a source agent SIGKILLed mid-post-copy and restarted within the bound: the move completes', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-source';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const moving = failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy' }));
  await guardOnceRunning(b, name);
  const running = await containerPid(b, name);
  // Pages under way (the slow link: about 8 s for all), so the kill lands mid-answer.
  await sleep(1_500);
  await a.agent.kill('SIGKILL');
  await moving;
  await b.agent.waitForLog((line) => line.json?.msg === 'post-copy: the page supply broke; the copy waits for the source to come back' && line.json?.container === name, 10_000);
  const restarted = await test.restartAgent(0);
  await b.agent.waitForLog((line) => line.json?.msg === 'the source rejoined' && line.json?.container === name, 30_000);
  const again = await b.agent.waitForLog((line) => line.json?.msg === 'post-copy: a new page channel from the source; asking again for what is missing' && line.json?.container === name, 30_000);
  expect(Number(again.json?.pageBytes)).toBeGreaterThan(0);
  console.log(`rejoin: ${again.json?.pageBytes} page bytes in before the kill; ${again.json?.requests} requests asked again, the first from byte ${again.json?.deliveredOfFirst} of its answer`);
  await restarted.agent.waitForLog((line) => line.json?.msg === 'post-copy finished after a restart: committed, the container runs on the destination', 120_000);
  await waitUntilClean(restarted, name);
  // The same copy, never restarted nor stopped: it ran on through the wait, and every page is as written.
  expect(await containerPid(b, name)).toBe(running);
  await expectIntact(b, name, checksum);
  await removeQuietly(b, name);
});

it('serves the pages again on a new connection when the old ones are reset mid-post-copy: the move succeeds, the copy runs on', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-reset';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const moving = migrate(a, b, name, undefined, { strategy: 'postcopy' });
  await guardOnceRunning(b, name);
  const running = await containerPid(b, name);
  await sleep(1_000);
  await resetConnections(a, b, 1_500);
  const report = await moving;
  expect(report.outcome).toBe('succeeded');
  expect((report.warnings ?? []).join('\n')).toMatch(/was lost during post-copy .*the source served the pages again on a new one/);
  const again = await b.agent.waitForLog((line) => line.json?.msg === 'post-copy: a new page channel from the source; asking again for what is missing' && line.json?.container === name, 10_000);
  console.log(`reset: ${again.json?.pageBytes} page bytes in before; ${again.json?.requests} requests asked again, the first from byte ${again.json?.deliveredOfFirst} of its answer`);
  expect(await containerPid(b, name)).toBe(running);
  await expectIntact(b, name, checksum);
  await waitUntilClean(a, name);
  await removeQuietly(b, name);
});

it('commits from a restarted source agent that died once every page was in: the copy that ran on goes on', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'die-at-prepared' } });
  const b = test.nodes[1]!;
  const name = 'pc-prepared';
  const checksum = await startMemload(a, memloadSpec(name, 64));
  const moving = failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy' }));
  await guardOnceRunning(b, name);
  const running = await containerPid(b, name);
  await moving;
  await b.agent.waitForLog((line) => line.json?.msg === 'source disconnected after prepare; keeping the copy until its decision arrives' && line.json?.container === name, 30_000);
  const restarted = await test.restartAgent(0);
  const rejoined = await b.agent.waitForLog((line) => line.json?.msg === 'the source rejoined' && line.json?.container === name, 30_000);
  expect(rejoined.json?.prepared).toBe(true);
  await restarted.agent.waitForLog((line) => line.json?.msg === 'post-copy finished after a restart: committed, the container runs on the destination', 60_000);
  await waitUntilClean(restarted, name);
  expect(await containerPid(b, name)).toBe(running);
  await expectIntact(b, name, checksum);
  await removeQuietly(b, name);
});

it('resumes the source when the source agent is SIGKILLed mid-post-copy and restarts past the bound', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-source-late';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const pid = await containerPid(a, name);
  const moving = failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy', postcopyGraceMs: 3_000 }));
  await guardOnceRunning(b, name);
  await a.agent.kill('SIGKILL');
  await moving;
  // Its page supply gone for longer than the bound, the destination stops its copy; the source's stays frozen until the restarted agent hears that.
  await waitUntilClean(b, name);
  const restarted = await test.restartAgent(0);
  await poll('the restarted source to thaw its copy', 60_000, async () => {
    const verdict = await requestVerify(restarted, name).catch(() => undefined);
    return verdict?.startsWith('verify ok ') ? true : undefined;
  });
  expect(await containerPid(restarted, name)).toBe(pid);
  expect(await requestChecksum(restarted, name)).toBe(checksum);
  await removeQuietly(restarted, name);
});

it('gives up on a cut longer than the bound: the copy on the destination is stopped, the source resumes', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-cut-long';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const pid = await containerPid(a, name);
  const moving = failureOf(migrate(a, b, name, undefined, { strategy: 'postcopy', postcopyGraceMs: 4_000 }));
  await guardOnceRunning(b, name);
  const cut = cutLink(b, 16_000);
  const error = await moving;
  expect(error.phase).toBe('postcopy');
  expect(error.code).toBe('PEER_GONE');
  // A thaws its copy only once B confirmed that its own is gone: at once if B answers within a few tries, else later.
  expect(error.details.join('\n')).toMatch(/runs here again from its state at the freeze|in doubt: .* did not confirm that its copy is gone/);
  expect(await isAlive(pid)).toBe(true);
  await cut;
  await reconnectSoon(b);
  await waitUntilClean(b, name);
  await poll('the source to thaw its copy once B confirmed', 60_000, async () => {
    const verdict = await requestVerify(a, name).catch(() => undefined);
    return verdict?.startsWith('verify ok ') ? true : undefined;
  });
  expect(await containerPid(a, name)).toBe(pid);
  expect(await requestChecksum(a, name)).toBe(checksum);
  await removeQuietly(a, name);
});

// Cut on the switch, both ends' links up: each end's TCP backs off, and without the cap on the
// retransmission timeout (1 s for post-copy's connections) this move rolled back, the link's
// return noticed only past the 24 s bound.
it('waits out a 20 s cut on the switch within a 24 s bound: the pages resume soon after, memory intact', async () => {
  const a = await test.restartAgent(0, { env: { FERRY_FAULTS: 'postcopy-slow:2' } });
  const b = test.nodes[1]!;
  const name = 'pc-cut-switch';
  const checksum = await startMemload(a, memloadSpec(name, 256));
  const moving = migrate(a, b, name, undefined, { strategy: 'postcopy', postcopyGraceMs: 24_000 });
  await guardOnceRunning(b, name);
  const { upAt } = await cutOnSwitch(test.cluster, b, 20_000);
  const report = await moving;
  const settled = Date.now();
  expect(report.outcome).toBe('succeeded');
  expect(report.postcopy?.longestSilenceMs).toBeGreaterThan(19_000);
  expect(report.postcopy?.longestSilenceMs).toBeLessThan(24_000);
  console.log(`switch cut: longest silence ${report.postcopy?.longestSilenceMs} ms; settled ${settled - upAt} ms after the link came back`);
  await reconnectSoon(b);
  await expectIntact(b, name, checksum);
  await waitUntilClean(a, name);
  await removeQuietly(b, name);
});
