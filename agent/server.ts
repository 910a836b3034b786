import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, STATUS_CODES, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { WebSocketServer, type WebSocket } from 'ws';
import { z } from 'zod';
import { FerryError, toFerryError } from '../src/errors.ts';
import { httpStatusOf, type ErrorBody } from '../src/protocol/errors.ts';
import { dataChannels, migrationIdSchema } from '../src/protocol/migration.ts';
import { bearerToken, tokenMatches } from '../src/transport/auth.ts';
import {
  ConnectionLimiter,
  defaultConnectionLimits,
  requestPath,
  serverTimeouts,
  tlsHandshakeTimeoutMs,
} from '../src/transport/limits.ts';

export interface TlsFiles {
  cert: string;
  key: string;
  /** With a CA, clients must present a certificate it signed (mutual TLS). */
  ca?: string;
}

export interface EndpointOptions {
  host: string;
  port: number;
  token: string;
  tls?: TlsFiles;
  logger: Logger;
  onControl: (socket: WebSocket, request: IncomingMessage) => void;
  onData: (socket: WebSocket, migrationId: string, channel: string) => void;
  onHttp?: (request: IncomingMessage, response: ServerResponse) => boolean | Promise<boolean>;
}

/**
 * Control messages are small (the largest, an offer with its base64 cpuinfo
 * or a transfer-complete listing the page images, is a few KiB); data
 * channels carry 16 MiB binary frames and a stream-end with every file's digest.
 */
const controlMaxPayload = 1024 * 1024;
const dataMaxPayload = 16 * 1024 * 1024;
const dataPath = /^\/migrations\/([^/]+)\/([^/]+)$/;
const dataChannelSchema = z.enum(dataChannels);
/** How often refused connections are logged at most: a flood must not flood the log too. */
const refusalLogIntervalMs = 10_000;

type Target = { kind: 'control' } | { kind: 'data'; migrationId: string; channel: string };

/**
 * The agent's one listening socket: WebSocket control and data paths, plus a
 * few HTTP routes. Every upgrade is authenticated before any work, and
 * nothing a peer sends may throw out of a handler: a failure closes that one
 * connection and is logged.
 */
export class AgentEndpoint {
  readonly server: Server;
  private readonly controlSockets = new WebSocketServer({ noServer: true, maxPayload: controlMaxPayload, perMessageDeflate: false });
  private readonly dataSockets = new WebSocketServer({ noServer: true, maxPayload: dataMaxPayload, perMessageDeflate: false });
  private readonly limiter: ConnectionLimiter;
  private readonly options: EndpointOptions;
  private refusals = { count: 0, loggedAt: 0 };

  constructor(options: EndpointOptions) {
    this.options = options;
    this.server = options.tls
      ? createHttpsServer({
          ...serverTimeouts,
          handshakeTimeout: tlsHandshakeTimeoutMs,
          cert: readFileSync(options.tls.cert),
          key: readFileSync(options.tls.key),
          ...(options.tls.ca ? { ca: readFileSync(options.tls.ca), requestCert: true, rejectUnauthorized: true } : {}),
        })
      : createHttpServer(serverTimeouts);
    this.limiter = new ConnectionLimiter(this.server, defaultConnectionLimits, (address) => this.refusedConnection(address));
    this.server.on('upgrade', (request, socket, head) => this.guardUpgrade(socket, () => this.upgrade(request, socket, head)));
    this.server.on('request', (request, response) => {
      this.http(request, response).catch((error: unknown) => this.requestFailed(error, response));
    });
  }

  get url(): string {
    const address = this.server.address();
    const port = typeof address === 'object' && address ? address.port : this.options.port;
    const host = this.options.host.includes(':') ? `[${this.options.host}]` : this.options.host;
    return `${this.options.tls ? 'wss' : 'ws'}://${host}:${port}`;
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.port, this.options.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  async close(): Promise<void> {
    for (const client of [...this.controlSockets.clients, ...this.dataSockets.clients]) client.terminate();
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeAllConnections();
    await closed;
  }

  private authorized(request: IncomingMessage): boolean {
    return tokenMatches(bearerToken(request), this.options.token);
  }

  private upgrade(request: IncomingMessage, socket: Duplex, head: Buffer): void {
    // Node takes its own error listener off a socket it hands to 'upgrade': without one, a reset would end the process.
    socket.on('error', (error) => this.options.logger.debug({ err: error }, 'upgrade socket error'));
    if (!this.authorized(request)) {
      this.options.logger.warn({ remote: request.socket.remoteAddress, target: request.url?.slice(0, 200) }, 'refused connection: wrong or missing token');
      return refuse(socket, new FerryError('UNAUTHORIZED', 'wrong or missing token'));
    }
    this.limiter.trust(request.socket);
    const path = requestPath(request.url);
    if (path === undefined) return refuse(socket, new FerryError('BAD_REQUEST', 'the request target is not a path'));
    const target = routeOf(path);
    if (!target) return refuse(socket, new FerryError('NOT_FOUND', `no endpoint ${path.slice(0, 200)}`));
    const sockets = target.kind === 'control' ? this.controlSockets : this.dataSockets;
    sockets.handleUpgrade(request, socket, head, (webSocket) => this.accept(webSocket, target, request, path));
  }

  private accept(webSocket: WebSocket, target: Target, request: IncomingMessage, path: string): void {
    const logger = this.options.logger;
    webSocket.on('error', (error) => logger.warn({ err: error, path }, 'websocket error'));
    containListeners(webSocket, (error, event) => logger.error({ err: error, path, event }, 'websocket handler failed; connection closed'));
    try {
      if (target.kind === 'data') this.options.onData(webSocket, target.migrationId, target.channel);
      else this.options.onControl(webSocket, request);
    } catch (error) {
      logger.error({ err: error, path }, 'could not take a new connection');
      closeFailed(webSocket);
    }
  }

  /** A throw while answering an upgrade refuses that request, nothing more. */
  private guardUpgrade(socket: Duplex, work: () => void): void {
    try {
      work();
    } catch (error) {
      this.options.logger.error({ err: error }, 'upgrade handler failed');
      if (!socket.destroyed) refuse(socket, new FerryError('INTERNAL', 'the agent could not handle this request'));
    }
  }

  private async http(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const path = requestPath(request.url);
    if (path === '/healthz') {
      response.end('ok\n');
      return;
    }
    if (!this.authorized(request)) {
      sendError(response, new FerryError('UNAUTHORIZED', 'wrong or missing token'));
      return;
    }
    this.limiter.trust(request.socket);
    if (await this.options.onHttp?.(request, response)) return;
    sendError(response, new FerryError('NOT_FOUND', `no route ${(path ?? request.url ?? '').slice(0, 200)}`));
  }

  private requestFailed(error: unknown, response: ServerResponse): void {
    this.options.logger.error({ err: error }, 'HTTP request failed');
    if (response.headersSent) response.destroy();
    else sendError(response, toFerryError(error));
  }

  private refusedConnection(address: string): void {
    this.refusals.count += 1;
    const now = Date.now();
    if (now - this.refusals.loggedAt < refusalLogIntervalMs) return;
    this.options.logger.warn({ remote: address, refused: this.refusals.count }, 'refused connections: too many waiting to authenticate');
    this.refusals = { count: 0, loggedAt: now };
  }
}

/** The control path, or a data channel whose id and channel pass the protocol's schemas. */
function routeOf(path: string): Target | undefined {
  if (path === '/control') return { kind: 'control' };
  const match = dataPath.exec(path);
  if (!match) return undefined;
  const migrationId = migrationIdSchema.safeParse(match[1]);
  const channel = dataChannelSchema.safeParse(match[2]);
  return migrationId.success && channel.success ? { kind: 'data', migrationId: migrationId.data, channel: channel.data } : undefined;
}

/**
 * Listeners on an accepted socket come from several modules (control,
 * destination sessions, data channels) and ws calls them from its frame
 * parser: a throw in any of them would escape into the event loop and end
 * the agent. Here it closes that one socket instead.
 */
function containListeners(webSocket: WebSocket, onError: (error: unknown, event: string) => void): void {
  const target = webSocket as unknown as { emit: (event: string | symbol, ...args: unknown[]) => boolean };
  const emit = target.emit.bind(webSocket);
  target.emit = (event, ...args) => {
    try {
      return emit(event, ...args);
    } catch (error) {
      onError(error, String(event));
      closeFailed(webSocket);
      return true;
    }
  };
}

/** 1011: the server hit an error; terminated if the peer does not complete the close. */
function closeFailed(webSocket: WebSocket): void {
  webSocket.close(1011, 'internal error');
  setTimeout(() => webSocket.terminate(), 2_000).unref();
}

function sendError(response: ServerResponse, error: FerryError): void {
  const body: ErrorBody = { error: error.toJSON() };
  response.writeHead(httpStatusOf[error.code], { 'content-type': 'application/json' });
  response.end(JSON.stringify(body));
}

function refuse(socket: Duplex, error: FerryError): void {
  const status = httpStatusOf[error.code];
  const body = JSON.stringify({ error: error.toJSON() } satisfies ErrorBody);
  // Destroyed once written: a refused client that never closes must not keep its connection slot.
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Error'}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
    () => socket.destroy(),
  );
}
