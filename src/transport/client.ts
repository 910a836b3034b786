import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';
import { FerryError, fromWire, type Phase } from '../errors.ts';
import {
  parseJsonMessage,
  replySchema,
  resultSchemas,
  type Request,
  type RequestType,
  type ResultOf,
} from '../protocol/messages.ts';
import type { ProgressEvent } from '../protocol/migration.ts';
import { errorBodySchema } from '../protocol/errors.ts';
import { keepAlive } from './heartbeat.ts';
import { exchangeHello } from './hello.ts';

export interface ConnectOptions {
  url: string;
  token: string;
  /** PEM CA bundle that signed the agent's certificate (wss). */
  ca?: string | Buffer;
  /** Client certificate and key, for agents that require mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  timeoutMs?: number;
  peer?: 'cli' | 'agent' | 'coordinator';
  name?: string;
}

/** Opens an authenticated WebSocket to an agent endpoint (control or data path). */
export function openSocket(options: ConnectOptions, path = '/control', phase: Phase = 'connect'): Promise<WebSocket> {
  const url = new URL(path, options.url.endsWith('/') ? options.url : `${options.url}/`);
  const socket = new WebSocket(url, {
    headers: { authorization: `Bearer ${options.token}` },
    handshakeTimeout: options.timeoutMs ?? 10_000,
    maxPayload: 16 * 1024 * 1024,
    perMessageDeflate: false,
    // Masking protects browsers behind proxies; between agents it only costs a copy.
    generateMask: (mask) => mask.fill(0),
    // A data channel's frames may come from ferry-frame-send: nothing ws writes on its own (a pong) may land among them.
    ...(path === '/control' ? {} : { autoPong: false }),
    ...(options.ca ? { ca: options.ca } : {}),
    ...(options.cert ? { cert: options.cert } : {}),
    ...(options.key ? { key: options.key } : {}),
  });
  return new Promise((resolve, reject) => {
    socket.once('open', () => {
      socket.removeAllListeners('error');
      socket.on('error', () => undefined);
      resolve(socket);
    });
    socket.once('unexpected-response', (_request, response) => {
      let body = '';
      // A refusal is a line or two; a peer that sends more is not read on.
      response.on('data', (chunk: Buffer) => {
        if (body.length < 4096) body += chunk.toString();
      });
      response.on('end', () => {
        socket.terminate();
        const code = response.statusCode === 401 ? 'UNAUTHORIZED' : 'TRANSFER_FAILED';
        const message = safeMessage(body) ?? `HTTP ${response.statusCode}`;
        reject(new FerryError(code, `${url.host} refused the connection: ${message}`, { phase: code === 'UNAUTHORIZED' ? 'auth' : phase }));
      });
    });
    socket.once('error', (cause) =>
      reject(new FerryError('PEER_GONE', `cannot connect to ${url.host}: ${cause.message}`, { phase, cause })),
    );
  });
}

function safeMessage(body: string): string | undefined {
  try {
    const parsed = errorBodySchema.safeParse(JSON.parse(body));
    return parsed.success ? parsed.data.error.message : undefined;
  } catch {
    return body.trim().slice(0, 200) || undefined;
  }
}

type RequestParams<T extends RequestType> = Omit<Extract<Request, { type: T }>, 'type' | 'id'>;

interface Pending {
  type: RequestType;
  resolve: (value: unknown) => void;
  reject: (error: FerryError) => void;
  onProgress: ((event: ProgressEvent) => void) | undefined;
}

/** A client of one agent: typed requests and their results, progress events, errors. */
export class AgentClient {
  readonly socket: WebSocket;
  readonly peerName: string;
  private readonly pending = new Map<string, Pending>();

  private constructor(socket: WebSocket, peerName: string) {
    this.socket = socket;
    this.peerName = peerName;
    socket.on('message', (data, isBinary) => {
      if (!isBinary) this.onReply(data.toString());
    });
    socket.on('close', () => {
      const error = new FerryError('PEER_GONE', `connection to ${peerName} closed`);
      for (const pending of this.pending.values()) pending.reject(error);
      this.pending.clear();
    });
    keepAlive(socket);
  }

  static async connect(options: ConnectOptions): Promise<AgentClient> {
    const socket = await openSocket(options);
    const hello = await exchangeHello(socket, { peer: options.peer ?? 'cli', ...(options.name ? { name: options.name } : {}) }, 'the agent');
    return new AgentClient(socket, hello.name ?? options.url);
  }

  request<T extends RequestType>(
    type: T,
    params: RequestParams<T>,
    onProgress?: (event: ProgressEvent) => void,
  ): Promise<ResultOf<T>> {
    const id = randomUUID();
    return new Promise<ResultOf<T>>((resolve, reject) => {
      if (this.socket.readyState !== this.socket.OPEN) {
        reject(new FerryError('PEER_GONE', `connection to ${this.peerName} is closed`));
        return;
      }
      this.pending.set(id, { type, resolve: resolve as (value: unknown) => void, reject, onProgress });
      this.socket.send(JSON.stringify({ ...params, type, id }));
    });
  }

  close(): void {
    this.socket.close();
  }

  private onReply(text: string): void {
    let reply;
    try {
      reply = replySchema.parse(parseJsonMessage(text));
    } catch {
      return;
    }
    if (reply.type === 'hello') return;
    const pending = reply.id ? this.pending.get(reply.id) : undefined;
    if (!pending) return;
    if (reply.type === 'progress') {
      pending.onProgress?.(reply.event);
      return;
    }
    this.pending.delete(reply.id!);
    if (reply.type === 'error') {
      pending.reject(fromWire(reply.error));
      return;
    }
    const parsed = resultSchemas[pending.type].safeParse(reply.result);
    if (parsed.success) pending.resolve(parsed.data);
    else pending.reject(new FerryError('BAD_MESSAGE', `malformed ${pending.type} result from ${this.peerName}`));
  }
}
