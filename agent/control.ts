import type { Logger } from 'pino';
import type { WebSocket } from 'ws';
import { z } from 'zod';
import { FerryError, toFerryError } from '../src/errors.ts';
import {
  checkedMessage,
  describeIssues,
  helloSchema,
  parseJsonMessage,
  protocolVersion,
  replySchema,
  requestSchema,
  resultSchemas,
  type Reply,
  type Request,
  type RequestType,
} from '../src/protocol/messages.ts';
import { peerMessageSchema, type PeerMessage, type ProgressEvent } from '../src/protocol/migration.ts';
import { keepAlive, type Heartbeat } from '../src/transport/heartbeat.ts';

export interface RequestContext {
  progress: (event: ProgressEvent) => void;
  signal: AbortSignal;
  logger: Logger;
}

export type RequestHandlers = {
  [T in RequestType]: (request: Extract<Request, { type: T }>, context: RequestContext) => Promise<unknown>;
};

/** Peer-to-peer migration messages arrive on a control connection from another agent. */
export interface PeerHandler {
  onPeerMessage(message: PeerMessage, connection: ControlConnection): Promise<void>;
  onPeerClosed(connection: ControlConnection): void;
}

const peerTypes = new Set<string>(peerMessageSchema.options.map((option) => option.shape.type.value));
/** A client that has not said hello by then is not one: its connection is closed. */
export const helloTimeoutMs = 10_000;
/** Requests one connection may have running at once (a migration is one; the CLI sends one at a time). */
export const maxInFlight = 64;

/** One client's control connection: hello first, then requests, replies and progress. */
export class ControlConnection {
  readonly socket: WebSocket;
  /** How long the client may stay silent; a post-copy migration on this link raises it to its bound. */
  readonly heartbeat: Heartbeat;
  private readonly logger: Logger;
  private readonly handlers: RequestHandlers;
  private readonly peer: PeerHandler;
  private greeted = false;
  /** The name the client gave in its hello (another agent's host name); its own word, the token is the proof. */
  private helloName: string | undefined;
  private readonly inFlight = new Map<string, AbortController>();

  constructor(socket: WebSocket, logger: Logger, handlers: RequestHandlers, peer: PeerHandler, hostName: string) {
    this.socket = socket;
    this.logger = logger;
    this.handlers = handlers;
    this.peer = peer;
    this.heartbeat = keepAlive(socket);
    const helloDeadline = setTimeout(() => this.closeWith('TIMEOUT', `no hello within ${helloTimeoutMs} ms`), helloTimeoutMs);
    helloDeadline.unref();
    socket.on('message', (data, isBinary) => {
      if (isBinary) return this.refuse(undefined, 'binary frames are not allowed on the control channel');
      try {
        this.onText(data.toString(), hostName);
      } catch (error) {
        this.logger.error({ err: error }, 'control message handler failed');
        this.closeWith('INTERNAL', 'the agent could not handle a message');
      }
      if (this.greeted) clearTimeout(helloDeadline);
    });
    socket.on('close', () => {
      clearTimeout(helloDeadline);
      for (const controller of this.inFlight.values()) controller.abort();
      this.peer.onPeerClosed(this);
    });
  }

  get peerName(): string | undefined {
    return this.helloName;
  }

  /** Cuts the connection without a closing handshake. */
  terminate(): void {
    this.socket.terminate();
  }

  get open(): boolean {
    return this.socket.readyState === this.socket.OPEN;
  }

  /** A migration message to the peer agent on this connection, checked against the protocol first. */
  sendPeer(message: PeerMessage): void {
    this.write(checkedMessage(peerMessageSchema, message, 'peer message'));
  }

  /** A reply to this connection's client, checked against the protocol first. */
  private send(message: Reply): void {
    this.write(checkedMessage(replySchema, message, 'reply'));
  }

  private write(message: unknown): void {
    if (this.open) this.socket.send(JSON.stringify(message));
  }

  /** Says why, then closes; a peer that does not answer the close is cut off. */
  private closeWith(code: 'TIMEOUT' | 'INTERNAL' | 'PROTOCOL_VERSION' | 'BAD_MESSAGE', message: string): void {
    this.logger.warn({ code, message }, 'control connection closed');
    this.send({ type: 'error', error: { code, message } });
    this.socket.close(code === 'INTERNAL' ? 1011 : 1008, code);
    setTimeout(() => this.socket.terminate(), 2_000).unref();
  }

  private onText(text: string, hostName: string): void {
    let raw: unknown;
    try {
      raw = parseJsonMessage(text);
    } catch (error) {
      return this.refuse(undefined, error instanceof FerryError ? error.message : 'message is not JSON');
    }
    const id = typeof (raw as { id?: unknown })?.id === 'string' ? (raw as { id: string }).id : undefined;
    if (!this.greeted) return this.onHello(raw, hostName);
    const type = (raw as { type?: unknown })?.type;
    if (typeof type === 'string' && peerTypes.has(type)) {
      const message = peerMessageSchema.safeParse(raw);
      if (!message.success) return this.refuse(id, describeIssues(message.error));
      this.peer.onPeerMessage(message.data, this).catch((error: unknown) => {
        this.logger.error({ err: error }, 'peer message failed');
      });
      return;
    }
    const request = requestSchema.safeParse(raw);
    if (!request.success) return this.refuse(id, describeIssues(request.error));
    this.dispatch(request.data).catch((error: unknown) => this.logger.error({ err: error }, 'request not answered'));
  }

  private onHello(raw: unknown, hostName: string): void {
    const hello = helloSchema.safeParse(raw);
    if (!hello.success) return this.closeWith('BAD_MESSAGE', `expected hello first: ${describeIssues(hello.error)}`);
    if (hello.data.version !== protocolVersion) {
      return this.closeWith('PROTOCOL_VERSION', `agent speaks protocol ${protocolVersion}, client ${hello.data.version}`);
    }
    this.greeted = true;
    this.helloName = hello.data.name;
    this.send({ type: 'hello', version: protocolVersion, peer: 'agent', name: hostName });
  }

  private async dispatch(request: Request): Promise<void> {
    if (this.inFlight.has(request.id)) return this.refuse(request.id, `request ${request.id} is already running`);
    if (this.inFlight.size >= maxInFlight) {
      this.send({ type: 'error', id: request.id, error: { code: 'BUSY', message: `at most ${maxInFlight} requests at once on one connection` } });
      return;
    }
    if (request.type === 'cancel') {
      const target = this.inFlight.get(request.target);
      target?.abort(new FerryError('CANCELLED', 'cancelled by the client'));
      this.send({ type: 'result', id: request.id, result: { cancelled: !!target } });
      return;
    }
    const controller = new AbortController();
    this.inFlight.set(request.id, controller);
    const context: RequestContext = {
      // Progress is advice: one the protocol would refuse is logged and dropped, the work goes on.
      progress: (event) => {
        try {
          this.send({ type: 'progress', id: request.id, event });
        } catch (error) {
          this.logger.error({ err: error }, 'progress event not sent');
        }
      },
      signal: controller.signal,
      logger: this.logger,
    };
    try {
      const handler = this.handlers[request.type] as (request: Request, context: RequestContext) => Promise<unknown>;
      const result = checkedMessage(resultSchemas[request.type], await handler(request, context), `${request.type} result`);
      this.send({ type: 'result', id: request.id, result });
    } catch (error) {
      const ferryError = error instanceof z.ZodError
        ? new FerryError('BAD_REQUEST', describeIssues(error))
        : toFerryError(error, undefined);
      this.logger.warn({ request: request.type, code: ferryError.code, phase: ferryError.phase, err: ferryError }, 'request failed');
      this.send({ type: 'error', id: request.id, error: ferryError.toJSON() });
    } finally {
      this.inFlight.delete(request.id);
    }
  }

  private refuse(id: string | undefined, message: string): void {
    this.logger.warn({ message }, 'malformed message refused');
    this.send({ type: 'error', ...(id ? { id } : {}), error: { code: 'BAD_MESSAGE', message } });
  }
}
