// What sockets a container holds, read from /proc and `ss` before anything is
// frozen, and which of them cannot move with it.
import { readdir, readFile, readlink } from 'node:fs/promises';
import { execa } from 'execa';
import { z } from 'zod';
import { FerryError } from '../errors.ts';
import { count } from '../protocol/numbers.ts';

export interface InetSocket {
  protocol: 'tcp' | 'udp';
  family: 4 | 6;
  local: string;
  localPort: number;
  remote: string;
  remotePort: number;
  /** TCP state name (LISTEN, ESTABLISHED, ...); UDP: UNCONN or ESTABLISHED. */
  state: string;
  inode: number;
}

export interface UnixSocket {
  path: string;
  inode: number;
  /** 0 when not connected. */
  peer: number;
}

export interface SocketInventory {
  inet: InetSocket[];
  unix: UnixSocket[];
}

/** What the offer says about the sockets, so the destination can refuse early. */
export const socketSummarySchema = z.object({
  tcpListening: count,
  tcpConnected: count,
  udp: count,
  unix: count,
});
export type SocketSummary = z.infer<typeof socketSummarySchema>;

const tcpStates: Record<string, string> = {
  '01': 'ESTABLISHED',
  '02': 'SYN_SENT',
  '03': 'SYN_RECV',
  '04': 'FIN_WAIT1',
  '05': 'FIN_WAIT2',
  '06': 'TIME_WAIT',
  '07': 'CLOSE',
  '08': 'CLOSE_WAIT',
  '09': 'LAST_ACK',
  '0A': 'LISTEN',
  '0B': 'CLOSING',
};

/** An address of /proc/net/{tcp,udp}[6]: hex, in host (little-endian) order per 32-bit word. */
export function parseProcAddress(hex: string): { address: string; port: number } {
  const [addressHex = '', portHex = '0'] = hex.split(':');
  const port = parseInt(portHex, 16);
  if (addressHex.length === 8) {
    const bytes = Buffer.from(addressHex, 'hex').reverse();
    return { address: [...bytes].join('.'), port };
  }
  const words: Buffer[] = [];
  for (let index = 0; index < 32; index += 8) words.push(Buffer.from(addressHex.slice(index, index + 8), 'hex').reverse());
  const bytes = Buffer.concat(words);
  if (bytes.subarray(0, 10).every((byte) => byte === 0) && bytes[10] === 0xff && bytes[11] === 0xff) {
    return { address: [...bytes.subarray(12)].join('.'), port };
  }
  const groups: string[] = [];
  for (let index = 0; index < 16; index += 2) groups.push(bytes.readUInt16BE(index).toString(16));
  return { address: groups.join(':').replace(/(^|:)0(:0)+(:|$)/, '::'), port };
}

/** Rows of a /proc/net/{tcp,udp}[6] table. */
export function parseInetTable(text: string, protocol: 'tcp' | 'udp', family: 4 | 6): InetSocket[] {
  const sockets: InetSocket[] = [];
  for (const line of text.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 10) continue;
    const local = parseProcAddress(fields[1]!);
    const remote = parseProcAddress(fields[2]!);
    const stateHex = fields[3]!.toUpperCase();
    const state = protocol === 'tcp' ? (tcpStates[stateHex] ?? stateHex) : stateHex === '01' ? 'ESTABLISHED' : 'UNCONN';
    sockets.push({ protocol, family, local: local.address, localPort: local.port, remote: remote.address, remotePort: remote.port, state, inode: Number(fields[9]) });
  }
  return sockets;
}

/** `ss -xanH` lines: netid state recv-q send-q local inode peer peer-inode (paths may hold spaces). */
export function parseUnixTable(text: string): UnixSocket[] {
  const sockets: UnixSocket[] = [];
  for (const line of text.split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 8) continue;
    const peer = Number(fields.at(-1));
    const inode = Number(fields.at(-3));
    if (!Number.isInteger(inode) || !Number.isInteger(peer)) continue;
    sockets.push({ path: fields.slice(4, -3).join(' '), inode, peer });
  }
  return sockets;
}

/** The socket inodes the processes hold open. */
async function socketInodes(pids: number[]): Promise<Set<number>> {
  const inodes = new Set<number>();
  for (const pid of pids) {
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      const match = /^socket:\[(\d+)\]$/.exec(target);
      if (match) inodes.add(Number(match[1]));
    }
  }
  return inodes;
}

/** The sockets `pids` hold, as seen in the network namespace of `netnsPid`. */
export async function inventorySockets(pids: number[], netnsPid: number): Promise<SocketInventory> {
  const inodes = await socketInodes(pids);
  if (!inodes.size) return { inet: [], unix: [] };
  const inet: InetSocket[] = [];
  for (const [file, protocol, family] of [
    ['tcp', 'tcp', 4],
    ['tcp6', 'tcp', 6],
    ['udp', 'udp', 4],
    ['udp6', 'udp', 6],
  ] as const) {
    const text = await readFile(`/proc/${netnsPid}/net/${file}`, 'utf8').catch(() => '');
    inet.push(...parseInetTable(text, protocol, family).filter((socket) => inodes.has(socket.inode)));
  }
  const ss = await execa('nsenter', [`--net=/proc/${netnsPid}/ns/net`, 'ss', '-xanH'], { reject: false, timeout: 10_000 });
  if (ss.exitCode !== 0) {
    throw new FerryError('INTERNAL', `cannot list unix sockets (ss -xanH): ${ss.stderr || ss.exitCode}`, { phase: 'preflight' });
  }
  const unix = parseUnixTable(ss.stdout).filter((socket) => inodes.has(socket.inode));
  // Sockets held but in no table of this netns (a unix socket from another netns) are seen by their peers only.
  return { inet, unix };
}

export function summarize(inventory: SocketInventory): SocketSummary {
  const tcp = inventory.inet.filter((socket) => socket.protocol === 'tcp');
  return {
    tcpListening: tcp.filter((socket) => socket.state === 'LISTEN').length,
    tcpConnected: tcp.filter((socket) => socket.state !== 'LISTEN').length,
    udp: inventory.inet.filter((socket) => socket.protocol === 'udp').length,
    unix: inventory.unix.length,
  };
}

/**
 * Where the container's network lives. A private namespace (loopback only, or
 * with its own address) is dumped whole, so every address in it moves; in the
 * host's namespace, the host's addresses stay behind.
 */
export type NetworkPlacement = 'host' | 'private';

function isLoopback(address: string): boolean {
  return address.startsWith('127.') || address === '::1';
}

function isWildcard(address: string): boolean {
  return address === '0.0.0.0' || address === '::';
}

function endpoint(address: string, port: number): string {
  return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`;
}

/**
 * What cannot move, one line each naming the socket: unix sockets connected
 * outside the container, and connections or bindings to addresses that stay
 * on this host.
 */
export function unmovable(inventory: SocketInventory, placement: NetworkPlacement): string[] {
  const problems: string[] = [];
  const held = new Set(inventory.unix.map((socket) => socket.inode));
  for (const socket of inventory.unix) {
    if (socket.peer !== 0 && !held.has(socket.peer)) {
      const name = socket.path === '*' || socket.path === '' ? `unix socket (inode ${socket.inode})` : `unix socket ${socket.path}`;
      problems.push(`${name} is connected to a socket outside the container (inode ${socket.peer})`);
    }
  }
  for (const socket of inventory.inet) {
    const local = endpoint(socket.local, socket.localPort);
    const label = `${socket.protocol}${socket.family === 6 ? '6' : ''}`;
    const connected = socket.protocol === 'tcp' ? socket.state !== 'LISTEN' : socket.state === 'ESTABLISHED';
    if (placement === 'host') {
      if (socket.protocol === 'tcp' && connected) {
        problems.push(`${label} connection ${local} -> ${endpoint(socket.remote, socket.remotePort)} is in the host's network namespace, whose addresses stay here (run the container with --ip or --private-network)`);
      } else if (!isWildcard(socket.local) && !isLoopback(socket.local)) {
        problems.push(`${label} socket bound to ${local}, an address of this host that will not exist on the destination`);
      }
    }
  }
  return problems;
}
