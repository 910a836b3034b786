// The container's own IPv4 address on a host bridge: parsing, the MAC it keeps
// wherever it runs, and the name of its host-side veth.
import { createHash, randomBytes } from 'node:crypto';
import { z } from 'zod';

const octet = '(25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)';
const ipv4Pattern = new RegExp(`^${octet}(\\.${octet}){3}$`);

export const ipv4Schema = z.string().regex(ipv4Pattern, 'an IPv4 address (a.b.c.d)');
export const macSchema = z
  .string()
  .regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/, 'a MAC address (aa:bb:cc:dd:ee:ff, lowercase)');

/** The container's address on the segment; it moves with the container. */
export const networkSpecSchema = z
  .object({
    address: ipv4Schema,
    prefix: z.number().int().min(8).max(30),
    gateway: ipv4Schema.optional(),
    /** Chosen once at `run`; CRIU restores it with the interface, and the announcement names it. */
    mac: macSchema.default(() => randomMac()),
  })
  .superRefine((network, context) => {
    const problem = addressProblem(network.address, network.prefix, network.gateway);
    if (problem) context.addIssue({ code: 'custom', message: problem });
  });
export type NetworkSpec = z.infer<typeof networkSpecSchema>;

export function ipv4ToNumber(address: string): number {
  return address.split('.').reduce((value, part) => value * 256 + Number(part), 0);
}

/** Why ADDR/PREFIX (with GATEWAY) cannot be a container's address, or undefined. */
export function addressProblem(address: string, prefix: number, gateway?: string): string | undefined {
  if (!ipv4Pattern.test(address)) return `${address} is not an IPv4 address`;
  const value = ipv4ToNumber(address);
  const first = Number(address.split('.')[0]);
  if (first === 0 || first === 127 || first >= 224) return `${address} is not a unicast host address`;
  const size = 2 ** (32 - prefix);
  const host = value % size;
  if (host === 0) return `${address}/${prefix} is the network address of its subnet`;
  if (host === size - 1) return `${address}/${prefix} is the broadcast address of its subnet`;
  if (gateway !== undefined) {
    if (!ipv4Pattern.test(gateway)) return `gateway ${gateway} is not an IPv4 address`;
    if (gateway === address) return `gateway ${gateway} is the container's own address`;
    if (Math.floor(ipv4ToNumber(gateway) / size) !== Math.floor(value / size)) {
      return `gateway ${gateway} is outside ${address}/${prefix}`;
    }
  }
  return undefined;
}

/** Parses the CLI's ADDR/PREFIX. */
export function parseCidr(text: string): { address: string; prefix: number } {
  const match = /^([0-9.]+)\/(\d{1,2})$/.exec(text.trim());
  if (!match) throw new Error(`${text} is not ADDR/PREFIX (for example 10.0.0.5/24)`);
  const prefix = Number(match[2]);
  if (prefix < 8 || prefix > 30) throw new Error(`prefix /${prefix} is outside /8../30`);
  const problem = addressProblem(match[1]!, prefix);
  if (problem) throw new Error(problem);
  return { address: match[1]!, prefix };
}

/** A random locally administered unicast MAC (02:xx:...), as the kernel's own random ones are. */
export function randomMac(): string {
  const bytes = randomBytes(6);
  bytes[0] = (bytes[0]! & 0xfc) | 0x02;
  return [...bytes].map((byte) => byte.toString(16).padStart(2, '0')).join(':');
}

/** The host end of a container's veth: the same on every host, at most 15 characters (IFNAMSIZ). */
export function hostInterfaceName(container: string): string {
  return `fy${createHash('sha256').update(container).digest('hex').slice(0, 13)}`;
}

/**
 * The names of the namespaces an agent prepares under /run/netns (each for a
 * moment, until its container holds it): tied to the agent's state dir, so a
 * restarted agent, or the lab's cleanup, finds what a crash left.
 */
export function namespacePrefix(stateDir: string): string {
  return `ferry-${createHash('sha256').update(stateDir).digest('hex').slice(0, 8)}-`;
}

/** The interface inside the container. */
export const containerInterface = 'eth0';
