// The container boundary, seen from inside: a container runs as OCI runtimes
// run one by default (OCI capability set, no_new_privs, runc's masked and
// read-only /proc paths, no usable device nodes beyond /dev's few), and it
// stays so in the same process after CRIU moves it to another host and back.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  containerPid,
  logsOf,
  migrate,
  poll,
  removeQuietly,
  runContainer,
  startNodes,
  type Node,
  type TestCluster,
} from './helpers/migration.ts';
import { busyboxRootfs } from './helpers/workloads.ts';

// CAP_CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP,
// NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
const ociCapabilities = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];
const ociMask = ociCapabilities.reduce((mask, bit) => mask | (1n << BigInt(bit)), 0n).toString(16).padStart(16, '0');

const maskedPaths = ['/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
  '/proc/timer_stats', '/proc/sched_debug', '/proc/scsi', '/sys/firmware', '/sys/devices/virtual/powercap'];

// Every half second the container's init (this shell) tries what a hostile
// container would try and prints one line: `boundary round=N;key=value;...`.
const probeScript = `
printf junk > /tmp/fake.ko
n=0
while :; do
  n=$((n + 1))
  mkdir -p /tmp/m
  if mount -t tmpfs none /tmp/m 2>/dev/null; then mnt=allowed; umount /tmp/m; else mnt=refused; fi
  h=$(cat /proc/sys/kernel/hostname)
  if (echo "$h" > /proc/sys/kernel/hostname) 2>/dev/null; then sysctl=allowed; else sysctl=refused; fi
  if insmod /tmp/fake.ko 2>/tmp/insmod.err; then mod=allowed; else mod="refused: $(sed 's/.*: //' /tmp/insmod.err)"; fi
  rm -f /tmp/nul
  if mknod /tmp/nul c 1 3 2>/dev/null && (echo x > /tmp/nul) 2>/dev/null; then dev=allowed; else dev=refused; fi
  if mknod /dev/nul2 c 1 3 2>/dev/null; then devnode=allowed; rm -f /dev/nul2; else devnode=refused; fi
  exposed=; masked=0
  for p in ${maskedPaths.join(' ')}; do
    if [ -d "$p" ]; then masked=$((masked + 1)); [ -n "$(ls -A "$p")" ] && exposed="$exposed $p"
    elif [ -e "$p" ]; then masked=$((masked + 1)); [ "$(head -c 1 "$p" | wc -c)" -gt 0 ] && exposed="$exposed $p"
    fi
  done
  caps=$(awk '/^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):/ { printf ";%s%s", $1, $2 }' /proc/$$/status | sed 's/:/=/g')
  echo "boundary round=$n;mount=$mnt;sysctl=$sysctl;insmod=$mod;mknod=$dev;devnode=$devnode;exposed=$exposed;masked=$masked$caps"
  sleep 0.5
done
`;

type Probe = Record<string, string>;

function probesIn(log: string): Probe[] {
  return [...log.matchAll(/^boundary (.*)$/gm)].map((match) =>
    Object.fromEntries(match[1]!.split(';').map((pair) => [pair.slice(0, pair.indexOf('=')), pair.slice(pair.indexOf('=') + 1)])),
  );
}

function lastRound(log: string): number {
  return Number(probesIn(log).at(-1)?.round ?? 0);
}

/** Waits for a probe line from a round after `afterRound` and returns it. */
function nextProbe(node: Node, name: string, afterRound: number): Promise<Probe> {
  return poll(`a boundary probe after round ${afterRound} from ${name} on ${node.host.name}`, 30_000, async () =>
    probesIn(await logsOf(node, name)).find((probe) => Number(probe.round) > afterRound),
  );
}

// Where modules exist the kernel refuses for want of CAP_SYS_MODULE; a kernel
// built without them (this machine's) has no init_module at all.
const moduleRefusal = existsSync('/proc/modules') ? 'refused: Operation not permitted' : expect.stringMatching(/^refused: /);

function expectBounded(probe: Probe): void {
  expect(probe).toMatchObject({
    mount: 'refused',
    sysctl: 'refused',
    insmod: moduleRefusal,
    mknod: 'refused',
    devnode: 'refused',
    exposed: '',
    CapInh: '0000000000000000',
    CapPrm: ociMask,
    CapEff: ociMask,
    CapBnd: ociMask,
    CapAmb: '0000000000000000',
    NoNewPrivs: '1',
  });
  // Not vacuous: some of runc's masked paths exist on this kernel.
  expect(Number(probe.masked)).toBeGreaterThan(0);
}

/** The container's init as the host sees it, whatever the shell reports. */
async function expectInitBounded(node: Node, name: string): Promise<void> {
  const status = await readFile(`/proc/${await containerPid(node, name)}/status`, 'utf8');
  const field = (key: string) => new RegExp(`^${key}:\\s+(\\S+)$`, 'm').exec(status)?.[1];
  expect({ eff: field('CapEff'), bnd: field('CapBnd'), nnp: field('NoNewPrivs') }).toEqual({ eff: ociMask, bnd: ociMask, nnp: '1' });
}

let test: TestCluster;
let a: Node;
let b: Node;

beforeAll(async () => {
  test = await startNodes(2);
  [a, b] = test.nodes as [Node, Node];
});

afterAll(async () => {
  await test?.close();
});

describe('a container', () => {
  const name = 'boundary';
  afterAll(async () => {
    await removeQuietly(a, name);
    await removeQuietly(b, name);
  });

  it('cannot mount, load a module, write /proc/sys, use new device nodes or read masked /proc files', async () => {
    await runContainer(a, { name, rootfs: busyboxRootfs, command: ['/bin/sh', '-c', probeScript] });
    expectBounded(await nextProbe(a, name, 0));
    await expectInitBounded(a, name);
  });

  it('still cannot after a migration A → B and back, in the same process', async () => {
    for (const [from, to] of [[a, b], [b, a]] as const) {
      const report = await migrate(from, to, name);
      expect(report.outcome).toBe('succeeded');
      // Rounds up to here may predate the freeze; a later one ran after the restore.
      const seen = lastRound(await logsOf(to, name));
      expectBounded(await nextProbe(to, name, seen));
      await expectInitBounded(to, name);
    }
    // One run of the shell: 1, 2, 3, ... never started again.
    const rounds = probesIn(await logsOf(a, name)).map((probe) => Number(probe.round));
    expect(rounds).toEqual(rounds.map((_, index) => index + 1));
  });
});
