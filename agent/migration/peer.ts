import type WebSocket from 'ws';
import { FerryError, type Phase } from '../../src/errors.ts';
import { checkedMessage, parseJsonMessage, type Destination } from '../../src/protocol/messages.ts';
import { wireErrorSchema } from '../../src/protocol/errors.ts';
import { peerMessageSchema, type DataChannel, type PeerMessage } from '../../src/protocol/migration.ts';
import { openSocket, type ConnectOptions } from '../../src/transport/client.ts';
import { keepAlive } from '../../src/transport/heartbeat.ts';
import { exchangeHello } from '../../src/transport/hello.ts';

/** Who this agent is when it connects to a peer. */
export interface PeerIdentity {
  hostName: string;
  cert?: Buffer;
  key?: Buffer;
}

type MessageOf<T extends PeerMessage['type']> = Extract<PeerMessage, { type: T }>;

/**
 * The source's control link to the destination agent of one migration: send
 * peer messages, wait for the next one of a type. An `abort` from the peer or
 * a dead connection rejects every wait.
 */
export class PeerLink {
  readonly socket: WebSocket;
  readonly peerName: string;
  private readonly connectOptions: ConnectOptions;
  private readonly inbox: PeerMessage[] = [];
  private waiter: (() => void) | undefined;
  private failure: FerryError | undefined;

  private constructor(socket: WebSocket, peerName: string, connectOptions: ConnectOptions) {
    this.socket = socket;
    this.peerName = peerName;
    this.connectOptions = connectOptions;
    keepAlive(socket);
    socket.on('message', (data, isBinary) => {
      if (!isBinary) this.receive(data.toString());
    });
    socket.on('close', () => this.fail(new FerryError('PEER_GONE', `lost the connection to ${peerName}`)));
  }

  static async connect(destination: Destination, identity: PeerIdentity): Promise<PeerLink> {
    const hostName = identity.hostName;
    const options: ConnectOptions = {
      url: destination.url,
      token: destination.token,
      peer: 'agent',
      name: hostName,
      ...(destination.ca ? { ca: destination.ca } : {}),
      // The agent's own certificate doubles as its client certificate for mutual TLS.
      ...(identity.cert && identity.key ? { cert: identity.cert, key: identity.key } : {}),
    };
    const socket = await openSocket(options);
    const hello = await exchangeHello(socket, { peer: 'agent', name: hostName }, 'the destination');
    const peerName = hello.name ?? destination.url;
    return new PeerLink(socket, peerName, options);
  }

  /** Opens one of the migration's data channels on the destination. */
  openChannel(migrationId: string, channel: DataChannel): Promise<WebSocket> {
    return openSocket(this.connectOptions, `/migrations/${migrationId}/${channel}`, 'stream');
  }

  send(message: PeerMessage): void {
    checkedMessage(peerMessageSchema, message, 'peer message');
    if (this.socket.readyState === this.socket.OPEN) this.socket.send(JSON.stringify(message));
  }

  /** Throws what ended the link (an abort from the peer, or its loss); returns while it is healthy. */
  ensureAlive(phase: Phase): void {
    const abort = this.inbox.find((message) => message.type === 'abort');
    if (abort) throw this.abortError(abort as MessageOf<'abort'>, phase);
    if (this.failure) throw new FerryError(this.failure.code, this.failure.message, { phase });
    if (this.socket.readyState !== this.socket.OPEN) throw new FerryError('PEER_GONE', `the link to ${this.peerName} is closed`, { phase });
  }

  async expect<T extends PeerMessage['type']>(type: T, timeoutMs: number, phase: Phase): Promise<MessageOf<T>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.inbox.findIndex((message) => message.type === type || message.type === 'abort');
      if (index >= 0) {
        const [message] = this.inbox.splice(index, 1);
        if (message!.type === 'abort') throw this.abortError(message as MessageOf<'abort'>, phase);
        return message as MessageOf<T>;
      }
      if (this.failure) throw new FerryError(this.failure.code, this.failure.message, { phase });
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new FerryError('TIMEOUT', `no ${type} from ${this.peerName} in ${timeoutMs} ms`, { phase });
      await this.nextMessage(remaining);
    }
  }

  /**
   * The destination's own reason for giving up, if it sent one (or does within
   * `waitMs`). A data channel it closed is explained by the abort it sent first
   * on this link, which may arrive a moment after the close is seen.
   */
  async abortReason(waitMs: number, phase: Phase): Promise<FerryError | undefined> {
    const deadline = Date.now() + waitMs;
    for (;;) {
      const abort = this.inbox.find((message) => message.type === 'abort');
      if (abort) return this.abortError(abort, phase);
      const remaining = deadline - Date.now();
      if (this.failure || remaining <= 0) return undefined;
      await this.nextMessage(remaining);
    }
  }

  private abortError(message: MessageOf<'abort'>, phase: Phase): FerryError {
    const { code, message: text, phase: remotePhase, details } = message.error;
    return new FerryError(code, `destination ${this.peerName}: ${text}`, { phase: remotePhase ?? phase, ...(details ? { details } : {}) });
  }

  /** Resolves when a message arrives, the link fails, or `timeoutMs` passes. */
  private nextMessage(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, timeoutMs);
      this.waiter = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  close(): void {
    this.socket.close();
  }

  private receive(text: string): void {
    let raw: unknown;
    try {
      raw = parseJsonMessage(text);
    } catch {
      return;
    }
    const message = peerMessageSchema.safeParse(raw);
    if (message.success) this.inbox.push(message.data);
    else if ((raw as { type?: unknown })?.type === 'error') {
      // The destination refused something on the control connection: that ends the migration too.
      const error = wireErrorSchema.safeParse((raw as { error?: unknown }).error);
      this.inbox.push({ type: 'abort', migrationId: '', error: error.success ? error.data : { code: 'BAD_MESSAGE', message: 'an unreadable error' } });
    }
    this.wake();
  }

  private fail(error: FerryError): void {
    this.failure ??= error;
    this.wake();
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.();
  }
}
