// Network services migrate: containers with their own address on the hosts'
// bridges, a client on a third host of the same segment, the real CRIU
// (4.2, which dumps sockets on this kernel) dumping and restoring their
// sockets and open connections. Each socket kind carries traffic before and
// after the move; what cannot move is refused before anything is frozen.
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { hostInterfaceName, namespacePrefix } from '../src/net/address.ts';
import { findLeftovers } from '../lab/leftovers.ts';
import { containerAddress, type Host } from '../lab/hosts.ts';
import { startPoller, type Poller, type PollerSummary } from '../lab/poller.ts';
import { execInNetns } from '../lab/system.ts';
import type { ContainerSpecInput } from '../src/protocol/container.ts';
import {
  containerPid,
  failureOf,
  migrate,
  removeQuietly,
  runContainer,
  startNodes,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';
import { busyboxRootfs } from './helpers/workloads.ts';

let test: TestCluster;
let a: Node;
let b: Node;
let client: Host;
let addresses = 0;
/** A test's running client, stopped after each test whatever happened. */
let poller: Poller | undefined;

beforeAll(async () => {
  test = await startNodes(2, () => ({}), { bridged: true, clients: 1 });
  [a, b] = test.nodes as [Node, Node];
  client = test.clients[0]!;
});

afterEach(async () => {
  await poller?.stop().catch(() => undefined);
  poller = undefined;
});

afterAll(async () => {
  await test?.close();
});

/** A fresh address of the test segment. */
function nextAddress(): { address: string; prefix: number } {
  return containerAddress(test.cluster, addresses++);
}

function netloadSpec(name: string, args: string[], network?: { address: string; prefix: number }): ContainerSpecInput {
  return { name, rootfs: busyboxRootfs, command: ['/bin/netload', ...args], ...(network ? { network } : {}), hostname: name };
}

/** One line to ADDR:PORT over TCP or UDP from the client host; its answer. */
async function ask(protocol: 'TCP4' | 'UDP4', address: string, port: number, line: string): Promise<string> {
  const result = await client.exec('sh', ['-c', `printf '%s\\n' "$1" | socat -t 0.5 -T 3 - ${protocol}:${address}:${port}`, 'ask', line]);
  return result.stdout.trim();
}

/** The client's one connection saw every answer, in order, and never broke. */
function expectUnbroken(summary: PollerSummary): void {
  expect(summary.errors).toEqual([]);
  expect(summary.connections).toBe(1);
  expect(summary.outOfOrder).toBe(0);
}

async function expectOnlyOn(node: Node, other: Node, name: string): Promise<void> {
  const here = (await node.client.request('list', {})).containers;
  expect(here.map((container) => [container.name, container.status])).toContainEqual([name, 'running']);
  const there = (await other.client.request('list', {})).containers;
  expect(there.map((container) => container.name)).not.toContain(name);
}

/** The MAC of the container's eth0, read inside its namespace. */
async function containerMac(node: Node, name: string): Promise<string> {
  const pid = await containerPid(node, name);
  const result = await node.host.exec('nsenter', [`--net=/proc/${pid}/ns/net`, 'ip', '-j', 'link', 'show', 'eth0']);
  return (JSON.parse(result.stdout) as Array<{ address: string }>)[0]!.address;
}

/** The switch port the switch's bridge forwards `mac` to, if it has learnt one. */
async function switchPortOf(mac: string): Promise<string | undefined> {
  const result = await execInNetns(test.cluster.switchNetns, 'bridge', ['-j', 'fdb', 'show', 'br', test.cluster.switchBridge]);
  const entries = JSON.parse(result.stdout || '[]') as Array<{ mac: string; ifname: string }>;
  return entries.find((entry) => entry.mac === mac)?.ifname;
}

/** Whether `host` has the container's veth end on its bridge. */
async function hasVeth(host: Host, name: string): Promise<boolean> {
  const result = await host.exec('ip', ['-j', 'link', 'show', 'master', host.bridge!]);
  return (JSON.parse(result.stdout || '[]') as Array<{ ifname: string }>).some((link) => link.ifname === hostInterfaceName(name));
}

// The same move stop-and-copy (auto, without soft-dirty here) and post-copy (running on B at once, its pages following).
for (const strategy of ['auto', 'postcopy'] as const) {
  describe(`a web server with its own address${strategy === 'postcopy' ? ', moved post-copy' : ''}`, () => {
    it('moves with its address; one keep-alive client on a third host sees no reset, no lost or repeated answer', async () => {
      const name = strategy === 'postcopy' ? 'web-pc' : 'web';
      const network = nextAddress();
      await runContainer(a, netloadSpec(name, ['http', '8080'], network));
      try {
        poller = startPoller(client, 'http', network.address, 8080, 10);
        const before = await poller.waitForAnswers(50);
        expect(before.errors).toEqual([]);
        const report = await migrate(a, b, name, undefined, { strategy });
        expect(report.outcome).toBe('succeeded');
        if (strategy === 'postcopy') expect(report.strategy).toBe('postcopy');
        const afterMove = (await poller.waitForMore(100)).answers;
        const summary = await poller.stop();
        poller = undefined;
        expectUnbroken(summary);
        expect(summary.answers).toBeGreaterThanOrEqual(afterMove);
        // The state moved too: the server's count of requests went on, it did not restart.
        expect(Number(/served=(\d+)/.exec(summary.last)?.[1])).toBe(summary.answers);
        console.log(`${name}: client-visible stall ${summary.maxGapMs} ms, ferry downtime ${report.downtimeMs} ms`);
        await expectOnlyOn(b, a, name);
        expect(await hasVeth(b.host, name)).toBe(true);
        expect(await hasVeth(a.host, name)).toBe(false);
        const info = (await b.client.request('list', {})).containers.find((container) => container.name === name);
        expect(info?.address).toBe(`${network.address}/${network.prefix}`);
      } finally {
        await removeQuietly(b, name);
        await removeQuietly(a, name);
      }
    });
  });
}

describe('the segment learns the new place at once', () => {
  it("the destination's announcement moves the container's MAC to host b's switch port, with no traffic of its own", async () => {
    const name = 'quiet';
    const network = nextAddress();
    // A UDP server that nobody talks to: after the move it sends nothing by itself.
    await runContainer(a, netloadSpec(name, ['udp', '5355'], network));
    try {
      const mac = await containerMac(a, name);
      // Quiet for real: without IPv6 on eth0 the kernel sends no router solicitations or MLD reports of its own.
      const pid = await containerPid(a, name);
      await a.host.exec('nsenter', [`--net=/proc/${pid}/ns/net`, 'sysctl', '-qw', 'net.ipv6.conf.eth0.disable_ipv6=1']);
      await expect.poll(() => switchPortOf(mac), { timeout: 5_000 }).toBe(a.host.switchPort);
      expect((await migrate(a, b, name)).outcome).toBe('succeeded');
      // Without the gratuitous ARP the switch would keep forwarding to host a until its entry aged out (300 s).
      await expect.poll(() => switchPortOf(mac), { timeout: 3_000 }).toBe(b.host.switchPort);
      expect(await ask('UDP4', network.address, 5355, 'found')).toBe('1 found');
    } finally {
      await removeQuietly(b, name);
      await removeQuietly(a, name);
    }
  });

  it('a migration to a segment where another MAC answers for the address is refused in preflight', async () => {
    const name = 'contested';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['udp', '5356'], network));
    // The client host takes the same address as well: a conflict the destination must see.
    await client.exec('ip', ['addr', 'add', `${network.address}/24`, 'dev', 'eth0', 'nodad']);
    try {
      const pid = await containerPid(a, name);
      const error = await failureOf(migrate(a, b, name));
      expect(error.code).toBe('ADDRESS_IN_USE');
      expect(error.phase).toBe('preflight');
      expect(await containerPid(a, name)).toBe(pid);
      const info = (await a.client.request('list', {})).containers.find((container) => container.name === name);
      expect(info?.status).toBe('running');
    } finally {
      await client.exec('ip', ['addr', 'del', `${network.address}/24`, 'dev', 'eth0']);
      await removeQuietly(a, name);
    }
  });
});

describe('every common kind of socket migrates with traffic before and after', () => {
  it('UDP: the echo server answers before and after, and its count went on', async () => {
    const name = 'udp';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['udp', '5353'], network));
    try {
      expect(await ask('UDP4', network.address, 5353, 'one')).toBe('1 one');
      expect(await ask('UDP4', network.address, 5353, 'two')).toBe('2 two');
      expect((await migrate(a, b, name)).outcome).toBe('succeeded');
      expect(await ask('UDP4', network.address, 5353, 'three')).toBe('3 three');
      await expectOnlyOn(b, a, name);
    } finally {
      await removeQuietly(b, name);
      await removeQuietly(a, name);
    }
  });

  it('unix stream and datagram pairs between two processes keep talking across the move', async () => {
    const name = 'unix';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['unix-pair', '20', '--tcp', '9000'], network));
    try {
      const progress = async () => {
        const answer = await ask('TCP4', network.address, 9000, 'status');
        const match = /^unix-ok (\d+) mismatches (\d+)$/.exec(answer);
        expect(match, `answer: ${answer}`).not.toBeNull();
        return { confirmed: Number(match![1]), mismatches: Number(match![2]) };
      };
      expect((await progress()).mismatches).toBe(0);
      expect((await migrate(a, b, name)).outcome).toBe('succeeded');
      // Counted from after the move: the pairs went on counting through pre-copy too.
      const moved = await progress();
      await expect.poll(async () => (await progress()).confirmed, { timeout: 10_000 }).toBeGreaterThan(moved.confirmed + 5);
      expect((await progress()).mismatches).toBe(0);
    } finally {
      await removeQuietly(b, name);
      await removeQuietly(a, name);
    }
  });

  it('a process tree mixing a TCP listener, UDP and unix pairs moves whole, and back again', async () => {
    const name = 'mix';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['mix', '7000'], network));
    try {
      poller = startPoller(client, 'http', network.address, 7000, 10);
      await poller.waitForAnswers(30);
      expect(await ask('UDP4', network.address, 7001, 'x')).toMatch(/^\d+ x$/);
      expect((await migrate(a, b, name)).outcome).toBe('succeeded');
      expect(await ask('UDP4', network.address, 7001, 'y')).toMatch(/^\d+ y$/);
      expect(await ask('TCP4', network.address, 7002, 'status')).toMatch(/^unix-ok \d+ mismatches 0$/);
      // And back: the address returns to host a.
      expect((await migrate(b, a, name)).outcome).toBe('succeeded');
      await poller.waitForMore(30);
      expectUnbroken(await poller.stop());
      poller = undefined;
      await expectOnlyOn(a, b, name);
    } finally {
      await removeQuietly(a, name);
      await removeQuietly(b, name);
    }
  });

  it('a TCP listener in a loopback-only namespace, with a connection between its own processes', async () => {
    const name = 'loop';
    // A shell script: the echo server and a client of it over 127.0.0.1, both inside.
    const script = '/bin/netload tcp-echo 7070 & sleep 0.3; (while :; do echo ping; sleep 0.05; done) | nc 127.0.0.1 7070 | while read line; do echo "got $line"; done';
    await runContainer(a, { name, rootfs: busyboxRootfs, command: ['/bin/sh', '-c', script], privateNetwork: true });
    try {
      const countGot = async (node: Node) =>
        (await node.client.request('logs', { name })).text.split('\n').filter((line) => line === 'got ping').length;
      await expect.poll(() => countGot(a), { timeout: 10_000 }).toBeGreaterThan(5);
      expect((await migrate(a, b, name)).outcome).toBe('succeeded');
      const moved = await countGot(b);
      await expect.poll(() => countGot(b), { timeout: 10_000 }).toBeGreaterThan(moved + 5);
    } finally {
      await removeQuietly(b, name);
      await removeQuietly(a, name);
    }
  });
});

describe('the network lock travels in the images', () => {
  it('a checkpoint of a container with its own address holds the lock; its restore goes on unlocked, at the same address', async () => {
    const name = 'web-checkpoint';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['udp', '5354'], network));
    const directory = join(a.host.stateDir, 'checkpoint-web');
    try {
      expect(await ask('UDP4', network.address, 5354, 'before')).toBe('1 before');
      await a.client.request('checkpoint', { name, directory, keepRunning: false });
      // CRIU dumps the namespace's nftables ruleset: the copy is born locked wherever it is restored.
      const images = await readdir(join(directory, 'images'));
      const rulesets = images.filter((file) => file.startsWith('nftables-'));
      expect(rulesets.length).toBeGreaterThan(0);
      const text = (await Promise.all(rulesets.map((file) => readFile(join(directory, 'images', file), 'latin1')))).join('');
      expect(text).toContain('ferry_lock');
      await a.client.request('restore', { directory });
      expect(await ask('UDP4', network.address, 5354, 'after')).toBe('2 after');
    } finally {
      await removeQuietly(a, name);
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('rollback after the dump', () => {
  it('the source unlocks its network and the connection goes on there', async () => {
    const name = 'web-rollback';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['http', '8080'], network));
    const failing = await test.restartAgent(1, { env: { FERRY_FAULTS: 'fail-restore' } });
    try {
      poller = startPoller(client, 'http', network.address, 8080, 10);
      await poller.waitForAnswers(30);
      const error = await failureOf(migrate(a, failing, name));
      expect(error.code).toBe('CRIU_FAILED');
      expect(error.phase).toBe('restore');
      await poller.waitForMore(50);
      expectUnbroken(await poller.stop());
      poller = undefined;
      await expectOnlyOn(a, failing, name);
      // The failed restore left nothing on the destination's bridge.
      expect(await hasVeth(failing.host, name)).toBe(false);
    } finally {
      await removeQuietly(a, name);
      await removeQuietly(failing, name);
      b = await test.restartAgent(1);
    }
  });
});

describe('a source agent that dies with the container frozen and locked', () => {
  it('unlocks and thaws it when it restarts; the connection goes on there', async () => {
    const name = 'web-recovery';
    const network = nextAddress();
    const dying = await test.restartAgent(0, { env: { FERRY_FAULTS: 'die-after-freeze' } });
    await runContainer(dying, netloadSpec(name, ['http', '8080'], network));
    try {
      poller = startPoller(client, 'http', network.address, 8080, 10);
      await poller.waitForAnswers(30);
      const error = await failureOf(migrate(dying, b, name));
      expect(error.code).toBe('PEER_GONE');
      a = await test.restartAgent(0);
      // The recovery took the lock off (ferry_lock tables in the container's namespace), then thawed.
      const pid = await containerPid(a, name);
      const tables = async () => (await a.host.exec('nsenter', [`--net=/proc/${pid}/ns/net`, 'nft', 'list', 'tables'])).stdout.trim();
      await expect.poll(tables, { timeout: 5_000 }).toBe('');
      await poller.waitForMore(50, 30_000);
      expectUnbroken(await poller.stop());
      poller = undefined;
      await expect.poll(async () => (await a.client.request('list', {})).containers.find((container) => container.name === name)?.status, { timeout: 10_000 }).toBe('running');
      expect((await b.client.request('list', {})).containers.map((container) => container.name)).not.toContain(name);
    } finally {
      await removeQuietly(a, name);
      await removeQuietly(b, name);
    }
  });
});

describe('what cannot move is refused before anything is frozen, naming it', () => {
  it('an address already in use on the segment is refused at run', async () => {
    const name = 'taken';
    // The client host's own address answers ARP on the segment.
    const clientAddress = { address: client.address, prefix: 24 };
    const error = await failureOf(runContainer(a, netloadSpec(name, ['http', '8080'], clientAddress)));
    expect(error.code).toBe('ADDRESS_IN_USE');
    expect(error.message).toContain(client.address);
    expect((await a.client.request('list', {})).containers.map((container) => container.name)).not.toContain(name);
    expect(await hasVeth(a.host, name)).toBe(false);
  });

  it('a bad address or gateway is refused as a malformed request, saying why', async () => {
    const base = netloadSpec('bad', ['http', '8080']);
    for (const [network, why] of [
      [{ address: '10.1.2.0', prefix: 24 }, /network address/],
      [{ address: '10.1.2.255', prefix: 24 }, /broadcast/],
      [{ address: '10.1.2.3', prefix: 24, gateway: '10.9.9.1' }, /outside/],
      [{ address: '300.1.2.3', prefix: 24 }, /IPv4/],
    ] as const) {
      const error = await failureOf(a.client.request('run', { spec: { ...base, network } as never }));
      expect(error.code, JSON.stringify(network)).toBe('BAD_MESSAGE');
      expect(`${error.message} ${error.details.join(' ')}`).toMatch(why);
    }
    expect((await a.client.request('list', {})).containers.map((container) => container.name)).not.toContain('bad');
  });

  it('a destination without the bridge is refused in preflight; the container runs on as it was', async () => {
    const name = 'no-bridge';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['http', '8080'], network));
    const bridgeless = await test.restartAgent(1, { extraArgs: ['--bridge', 'nosuchbridge'] });
    try {
      const pid = await containerPid(a, name);
      const error = await failureOf(migrate(a, bridgeless, name));
      expect(error.code).toBe('NO_BRIDGE');
      expect(error.phase).toBe('preflight');
      expect(await containerPid(a, name)).toBe(pid);
      expect(await ask('TCP4', network.address, 8080, 'GET / HTTP/1.0\r\n\r')).toMatch(/served=/);
    } finally {
      await removeQuietly(a, name);
      b = await test.restartAgent(1);
    }
  });

  it("a destination whose CRIU cannot checkpoint sockets is refused in preflight", async () => {
    const name = 'no-sockets';
    const network = nextAddress();
    await runContainer(a, netloadSpec(name, ['udp', '5353'], network));
    const old = await test.restartAgent(1, { env: { FERRY_FAULTS: 'no-socket-checkpoint' } });
    try {
      const pid = await containerPid(a, name);
      const error = await failureOf(migrate(a, old, name));
      expect(error.code).toBe('INCOMPATIBLE');
      expect(error.phase).toBe('preflight');
      expect(error.message).toMatch(/cannot checkpoint them on this kernel/);
      expect(await containerPid(a, name)).toBe(pid);
      expect(await ask('UDP4', network.address, 5353, 'still')).toBe('1 still');
    } finally {
      await removeQuietly(a, name);
      b = await test.restartAgent(1);
    }
  });

  it('a unix socket connected to something outside the container is refused, naming it', async () => {
    const name = 'unix-out';
    const socketName = `ferry-test-${test.cluster.runId}-${test.cluster.id}`;
    // Host a's own abstract unix socket (abstract names belong to the network namespace).
    // (The container's netload retries its connect every second until this listens.)
    const listener = a.host.exec('socat', ['-T', '30', `ABSTRACT-LISTEN:${socketName}`, 'EXEC:cat']);
    await runContainer(a, { name, rootfs: busyboxRootfs, command: ['/bin/netload', 'unix-connect', socketName] });
    try {
      await expect.poll(async () => (await a.client.request('logs', { name })).text, { timeout: 10_000 }).toMatch(/unix-connect ready/);
      const pid = await containerPid(a, name);
      const error = await failureOf(migrate(a, b, name));
      expect(error.code).toBe('UNMOVABLE');
      expect(error.phase).toBe('preflight');
      expect(error.message).toMatch(/unix socket .* is connected to a socket outside the container/);
      expect(await containerPid(a, name)).toBe(pid);
      const info = (await a.client.request('list', {})).containers.find((container) => container.name === name);
      expect(info?.status).toBe('running');
    } finally {
      await removeQuietly(a, name);
      await listener.catch(() => undefined);
    }
  });

  it('a host-network container with an open TCP connection is refused, naming the connection', async () => {
    const name = 'hostnet';
    // A listener of host a itself, and a container in the host's network namespace connected to it.
    const listener = a.host.exec('socat', ['-T', '30', `TCP4-LISTEN:6100,bind=${a.host.address},reuseaddr`, 'EXEC:cat']);
    await runContainer(a, {
      name,
      rootfs: busyboxRootfs,
      // nc gives up at once when nothing listens yet: the loop tries again.
      command: ['/bin/sh', '-c', `while :; do (while :; do echo hi; sleep 1; done) | nc ${a.host.address} 6100; sleep 0.2; done`],
    });
    try {
      const established = async () =>
        (await a.host.exec('ss', ['-Htn', 'state', 'established', 'dst', `${a.host.address}:6100`])).stdout.trim();
      await expect.poll(established, { timeout: 10_000 }).not.toBe('');
      const pid = await containerPid(a, name);
      const error = await failureOf(migrate(a, b, name));
      expect(error.code).toBe('UNMOVABLE');
      expect(error.phase).toBe('preflight');
      expect(error.message).toContain(`-> ${a.host.address}:6100`);
      expect(await containerPid(a, name)).toBe(pid);
      const info = (await a.client.request('list', {})).containers.find((container) => container.name === name);
      expect(info?.status).toBe('running');
    } finally {
      await removeQuietly(a, name);
      await removeQuietly(b, name);
      await listener.catch(() => undefined);
    }
  });
});

describe('the end of the run', () => {
  it('leaves nothing behind: no veth on a bridge, no nft table in a host, no namespace of the run or of an agent, no process', async () => {
    for (const node of test.nodes) {
      expect((await node.client.request('list', {})).containers).toEqual([]);
      const ports = JSON.parse((await node.host.exec('ip', ['-j', 'link', 'show', 'master', node.host.bridge!])).stdout || '[]') as Array<{ ifname: string }>;
      expect(ports.map((port) => port.ifname)).toEqual(['eth0']);
      expect((await node.host.exec('nft', ['list', 'tables'])).stdout.trim()).toBe('');
    }
    const agentPrefixes = test.nodes.map((node) => namespacePrefix(node.host.stateDir));
    await test.close();
    expect(await findLeftovers()).toEqual([]);
    const named = await readdir('/run/netns').catch(() => [] as string[]);
    expect(named.filter((name) => agentPrefixes.some((prefix) => name.startsWith(prefix)))).toEqual([]);
    const rootLinks = JSON.parse((await execa('ip', ['-j', 'link', 'show'])).stdout) as Array<{ ifname: string }>;
    expect(rootLinks.map((link) => link.ifname).filter((name) => name.startsWith('fy'))).toEqual([]);
  });
});
