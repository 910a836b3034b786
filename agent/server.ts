import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { WebSocketServer, type WebSocket } from 'ws';
import { bearerToken, tokenMatches } from '../src/transport/auth.ts';

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

const dataPath = /^\/migrations\/([a-zA-Z0-9-]{8,64})\/([a-z]+)$/;

/**
 * The agent's one listening socket: WebSocket control and data paths, plus a
 * few HTTP routes. Every upgrade is authenticated before any work.
 */
export class AgentEndpoint {
  readonly server: Server;
  private readonly sockets = new WebSocketServer({ noServer: true, maxPayload: 16 * 1024 * 1024, perMessageDeflate: false });
  private readonly options: EndpointOptions;

  constructor(options: EndpointOptions) {
    this.options = options;
    this.server = options.tls
      ? createHttpsServer({
          cert: readFileSync(options.tls.cert),
          key: readFileSync(options.tls.key),
          ...(options.tls.ca ? { ca: readFileSync(options.tls.ca), requestCert: true, rejectUnauthorized: true } : {}),
        })
      : createHttpServer();
    this.server.on('upgrade', (request, socket, head) => this.upgrade(request, socket, head));
    this.server.on('request', (request, response) => void this.http(request, response));
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
    for (const client of this.sockets.clients) client.terminate();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private authorized(request: IncomingMessage): boolean {
    return tokenMatches(bearerToken(request), this.options.token);
  }

  private upgrade(request: IncomingMessage, socket: Duplex, head: Buffer): void {
    const path = new URL(request.url ?? '/', 'http://agent').pathname;
    if (!this.authorized(request)) {
      this.options.logger.warn({ remote: request.socket.remoteAddress, path }, 'refused connection: wrong or missing token');
      return refuse(socket, 401, 'UNAUTHORIZED', 'wrong or missing token');
    }
    const data = dataPath.exec(path);
    if (path !== '/control' && !data) return refuse(socket, 404, 'NOT_FOUND', `no endpoint ${path}`);
    this.sockets.handleUpgrade(request, socket, head, (webSocket) => {
      webSocket.on('error', (error) => this.options.logger.warn({ err: error, path }, 'websocket error'));
      if (data) this.options.onData(webSocket, data[1]!, data[2]!);
      else this.options.onControl(webSocket, request);
    });
  }

  private async http(request: IncomingMessage, response: ServerResponse): Promise<void> {
    if (request.url === '/healthz') {
      response.end('ok\n');
      return;
    }
    if (!this.authorized(request)) {
      response.writeHead(401, { 'content-type': 'application/json' });
      response.end(JSON.stringify({ code: 'UNAUTHORIZED', message: 'wrong or missing token' }));
      return;
    }
    if (await this.options.onHttp?.(request, response)) return;
    response.writeHead(404, { 'content-type': 'application/json' });
    response.end(JSON.stringify({ code: 'NOT_FOUND', message: `no route ${request.url}` }));
  }
}

function refuse(socket: Duplex, status: number, code: string, message: string): void {
  const body = JSON.stringify({ code, message });
  const reason = status === 401 ? 'Unauthorized' : 'Not Found';
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
  );
}
