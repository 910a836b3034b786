import type { Server, Socket } from 'node:net';

// Bounds for a listening HTTP server that anyone on the network can reach:
// how long a request may take to arrive, and how many connections may sit
// there without having presented the token.

/**
 * Options for http(s).createServer. Node's defaults hold a connection 60 s
 * for its headers (and check only every 30 s); a request to an agent or the
 * coordinator is a few hundred bytes.
 */
export const serverTimeouts = {
  headersTimeout: 10_000,
  requestTimeout: 10_000,
  connectionsCheckingInterval: 1_000,
  keepAliveTimeout: 5_000,
} as const;

/** For https: a TLS handshake not done by then is dropped (Node's default is 120 s). */
export const tlsHandshakeTimeoutMs = 10_000;

export interface ConnectionLimits {
  /** Unauthenticated connections from one address. */
  perAddress: number;
  /** Unauthenticated connections in all. */
  total: number;
  /** Every connection, authenticated or not: a bound on file descriptors. */
  max: number;
}

export const defaultConnectionLimits: ConnectionLimits = { perAddress: 16, total: 128, max: 1024 };

/**
 * Counts connections until they present the token (`trust`), refusing new
 * ones from an address, or at all, once too many are waiting. Authenticated
 * connections no longer count, so a flood cannot push out a migration's
 * channels once they are open.
 */
export class ConnectionLimiter {
  private readonly limits: ConnectionLimits;
  private readonly byAddress = new Map<string, number>();
  private total = 0;
  private readonly releases = new WeakMap<Socket, () => void>();
  private readonly onRefused: (address: string) => void;

  constructor(server: Server, limits: ConnectionLimits, onRefused: (address: string) => void) {
    this.limits = limits;
    this.onRefused = onRefused;
    server.maxConnections = limits.max;
    server.on('connection', (socket: Socket) => this.admit(socket));
  }

  /** The connection presented the token. Takes the TLS socket or the TCP one under it. */
  trust(socket: Socket): void {
    const raw = (socket as Socket & { _parent?: Socket })._parent ?? socket;
    this.releases.get(raw)?.();
  }

  private admit(socket: Socket): void {
    const address = socket.remoteAddress ?? 'unknown';
    const fromAddress = this.byAddress.get(address) ?? 0;
    if (fromAddress >= this.limits.perAddress || this.total >= this.limits.total) {
      socket.destroy();
      this.onRefused(address);
      return;
    }
    this.byAddress.set(address, fromAddress + 1);
    this.total += 1;
    const release = () => {
      this.releases.delete(socket);
      this.total -= 1;
      const left = (this.byAddress.get(address) ?? 1) - 1;
      if (left > 0) this.byAddress.set(address, left);
      else this.byAddress.delete(address);
    };
    this.releases.set(socket, release);
    socket.once('close', () => this.releases.get(socket)?.());
  }
}

/**
 * The path of a request target, without the query, or undefined unless it
 * is an origin-form path ("/..."). `new URL` throws on targets such as
 * "//a:99999", and a throw in a server's upgrade handler ends the process.
 */
export function requestPath(target: string | undefined): string | undefined {
  if (!target || !target.startsWith('/') || target.startsWith('//')) return undefined;
  const end = target.search(/[?#]/);
  return end < 0 ? target : target.slice(0, end);
}
