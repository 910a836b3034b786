// The pure parts of container networking: addresses, and reading socket tables.
import { describe, expect, it } from 'vitest';
import { addressProblem, hostInterfaceName, networkSpecSchema, parseCidr, randomMac } from '../../src/net/address.ts';
import { parseInetTable, parseProcAddress, parseUnixTable, summarize, unmovable, type SocketInventory } from '../../src/net/sockets.ts';

describe('container addresses', () => {
  it('takes a host address with its prefix and refuses what cannot be one', () => {
    expect(parseCidr('10.0.0.5/24')).toEqual({ address: '10.0.0.5', prefix: 24 });
    expect(() => parseCidr('10.0.0.5')).toThrow(/ADDR\/PREFIX/);
    expect(() => parseCidr('10.0.0.0/24')).toThrow(/network address/);
    expect(() => parseCidr('10.0.0.255/24')).toThrow(/broadcast/);
    expect(() => parseCidr('10.0.0.5/31')).toThrow(/prefix/);
    expect(() => parseCidr('127.0.0.5/8')).toThrow(/unicast/);
    expect(() => parseCidr('256.0.0.5/8')).toThrow(/not an IPv4/);
    expect(addressProblem('10.0.0.5', 24, '10.0.1.1')).toMatch(/outside/);
    expect(addressProblem('10.0.0.5', 24, '10.0.0.5')).toMatch(/own address/);
    expect(addressProblem('10.0.0.5', 24, '10.0.0.1')).toBeUndefined();
  });

  it('gives every container a locally administered MAC, kept in the spec', () => {
    const mac = randomMac();
    expect(mac).toMatch(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/);
    expect(parseInt(mac.slice(0, 2), 16) & 0x03).toBe(0x02);
    const spec = networkSpecSchema.parse({ address: '10.0.0.5', prefix: 24 });
    expect(spec.mac).toMatch(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/);
    expect(networkSpecSchema.safeParse({ address: '10.0.0.5', prefix: 24, gateway: '192.168.0.1' }).success).toBe(false);
  });

  it('names the host end of the veth the same on every host, within IFNAMSIZ', () => {
    expect(hostInterfaceName('web')).toBe(hostInterfaceName('web'));
    expect(hostInterfaceName('web')).not.toBe(hostInterfaceName('web2'));
    expect(hostInterfaceName('a'.repeat(63)).length).toBeLessThanOrEqual(15);
  });
});

describe('socket tables', () => {
  const tcp = [
    '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
    '   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0',
    '   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1',
  ].join('\n');

  it('reads /proc/net/tcp rows: addresses in host order, state and inode', () => {
    expect(parseProcAddress('0100007F:1F90')).toEqual({ address: '127.0.0.1', port: 8080 });
    expect(parseProcAddress('00000000000000000000000000000000:0050')).toEqual({ address: '::', port: 80 });
    expect(parseProcAddress('0000000000000000FFFF00000100007F:0050')).toEqual({ address: '127.0.0.1', port: 80 });
    const rows = parseInetTable(tcp, 'tcp', 4);
    expect(rows.map((row) => [row.local, row.localPort, row.state, row.inode])).toEqual([
      ['0.0.0.0', 8080, 'LISTEN', 1001],
      ['127.0.0.1', 8080, 'ESTABLISHED', 1002],
    ]);
  });

  it('reads ss -xanH rows, paths with spaces included', () => {
    const text = 'u_str ESTAB 0 0 * 35651 * 35652\nu_dgr UNCONN 0 0 /run/my socket 200 * 0\n';
    expect(parseUnixTable(text)).toEqual([
      { path: '*', inode: 35651, peer: 35652 },
      { path: '/run/my socket', inode: 200, peer: 0 },
    ]);
  });

  it('names what cannot move: a unix peer outside, a host connection, a host address', () => {
    const inventory: SocketInventory = {
      unix: [
        { path: '*', inode: 10, peer: 11 },
        { path: '*', inode: 11, peer: 10 },
        { path: '/run/log.sock', inode: 12, peer: 99 },
      ],
      inet: [
        { protocol: 'tcp', family: 4, local: '0.0.0.0', localPort: 80, remote: '0.0.0.0', remotePort: 0, state: 'LISTEN', inode: 1 },
        { protocol: 'tcp', family: 4, local: '10.0.0.1', localPort: 5000, remote: '10.0.0.2', remotePort: 6100, state: 'ESTABLISHED', inode: 2 },
        { protocol: 'udp', family: 4, local: '10.0.0.1', localPort: 53, remote: '0.0.0.0', remotePort: 0, state: 'UNCONN', inode: 3 },
      ],
    };
    const onHost = unmovable(inventory, 'host');
    expect(onHost).toHaveLength(3);
    expect(onHost[0]).toMatch(/unix socket \/run\/log.sock is connected to a socket outside the container \(inode 99\)/);
    expect(onHost[1]).toMatch(/tcp connection 10.0.0.1:5000 -> 10.0.0.2:6100 is in the host's network namespace/);
    expect(onHost[2]).toMatch(/udp socket bound to 10.0.0.1:53/);
    // In its own namespace every address moves with it: only the unix peer outside stays a problem.
    expect(unmovable(inventory, 'private')).toEqual([onHost[0]]);
    expect(summarize(inventory)).toEqual({ tcpListening: 1, tcpConnected: 1, udp: 1, unix: 3 });
  });
});
