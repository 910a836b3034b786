import type WebSocket from 'ws';
import { FerryError, type Phase } from '../../src/errors.ts';
import { checkedMessage, parseJsonMessage, type Destination } from '../../src/protocol/messages.ts';
import { wireErrorSchema } from '../../src/protocol/errors.ts';
import { destinationSendsInStep, peerMessageSchema, type DataChannel, type PeerMessage, type SourceStep } from '../../src/protocol/migration.ts';
import { openSocket, type ConnectOptions } from '../../src/transport/client.ts';
import { keepAlive, type Heartbeat } from '../../src/transport/heartbeat.ts';
import { exchangeHello } from '../../src/transport/hello.ts';

/** Who this agent is when it connects to a peer. */
export interface PeerIdentity {
  hostName: string;
  cert?: Buffer;
  key?: Buffer;
}

type MessageOf<T extends PeerMessage['type']> = Extract<PeerMessage, { type: T }>;

/**
 * What the source has heard from its destination, checked against the step
 * it is in (destinationSendsInStep): wait for the next message of a type, or
 * for the reason the migration ended. An abort from the peer, a message out
 * of order or a lost link rejects every wait from then on. No I/O: the link
 * feeds it, and unit tests feed it directly.
 */
export class PeerInbox {
  readonly peerName: string;
  private step: SourceStep = 'preflight';
  private readonly messages: PeerMessage[] = [];
  private waiter: (() => void) | undefined;
  private failure: FerryError | undefined;
  /** A message out of order: it outranks anything queued after it. */
  private broken: FerryError | undefined;
  private abortHeard = false;

  constructor(peerName: string) {
    this.peerName = peerName;
  }

  /** The source moved to `step`: from now on the destination may send what answers it. */
  enter(step: SourceStep): void {
    this.step = step;
  }

  /** One text frame from the destination. Unreadable frames are dropped; a refusal on the connection ends the migration. */
  receive(text: string): void {
    let raw: unknown;
    try {
      raw = parseJsonMessage(text);
    } catch {
      return;
    }
    const parsed = peerMessageSchema.safeParse(raw);
    if (parsed.success) this.accept(parsed.data);
    else if ((raw as { type?: unknown })?.type === 'error') {
      const error = wireErrorSchema.safeParse((raw as { error?: unknown }).error);
      this.messages.push({ type: 'abort', migrationId: '', error: error.success ? error.data : { code: 'BAD_MESSAGE', message: 'an unreadable error' } });
    }
    this.wake();
  }

  /** The destination sent an abort (whether or not a wait has taken it since). */
  get heardAbort(): boolean {
    return this.abortHeard;
  }

  private accept(message: PeerMessage): void {
    const allowed: ReadonlyArray<PeerMessage['type']> = destinationSendsInStep[this.step];
    if (message.type === 'abort') this.abortHeard = true;
    if (message.type === 'abort' || allowed.includes(message.type)) this.messages.push(message);
    else this.broken ??= new FerryError('BAD_MESSAGE', `${this.peerName} sent ${message.type} during ${this.step}, out of order`);
  }

  /** The link is gone (or broke the protocol): every wait rejects with this. */
  fail(error: FerryError): void {
    this.failure ??= error;
    this.wake();
  }

  /** Throws what ended the migration (an abort from the peer, or a failure); returns while it is healthy. */
  ensureAlive(phase: Phase): void {
    if (this.broken) throw this.broken.inPhase(phase);
    const abort = this.messages.find((message) => message.type === 'abort');
    if (abort) throw this.abortError(abort as MessageOf<'abort'>, phase);
    if (this.failure) throw new FerryError(this.failure.code, this.failure.message, { phase });
  }

  async expect<T extends PeerMessage['type']>(type: T, timeoutMs: number, phase: Phase): Promise<MessageOf<T>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.broken) throw this.broken.inPhase(phase);
      const index = this.messages.findIndex((message) => message.type === type || message.type === 'abort');
      if (index >= 0) {
        const [message] = this.messages.splice(index, 1);
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
      if (this.broken) return this.broken.inPhase(phase);
      const abort = this.messages.find((message) => message.type === 'abort');
      if (abort) return this.abortError(abort as MessageOf<'abort'>, phase);
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

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.();
  }
}

/** What the source needs of its link to the destination; a PeerLink in an agent. */
export interface SourcePeer {
  readonly peerName: string;
  readonly inbox: PeerInbox;
  send(message: PeerMessage): void;
  openChannel(migrationId: string, channel: DataChannel): Promise<WebSocket>;
  /** Called once when the control link closes (or is cut). */
  onClose(listener: () => void): void;
  /** The link's heartbeat: how long the destination may stay silent. */
  readonly heartbeat: Heartbeat;
  readonly socket: WebSocket;
  /** Cuts the link now, without a closing handshake. */
  terminate(): void;
  close(): void;
}

/**
 * The source's control link to the destination agent of one migration: send
 * peer messages; what comes back goes to its inbox. A dead connection fails
 * the inbox.
 */
export class PeerLink implements SourcePeer {
  readonly socket: WebSocket;
  readonly inbox: PeerInbox;
  readonly heartbeat: Heartbeat;
  private readonly connectOptions: ConnectOptions;

  private constructor(socket: WebSocket, peerName: string, connectOptions: ConnectOptions) {
    this.socket = socket;
    this.inbox = new PeerInbox(peerName);
    this.connectOptions = connectOptions;
    this.heartbeat = keepAlive(socket);
    socket.on('message', (data, isBinary) => {
      if (!isBinary) this.inbox.receive(data.toString());
    });
    socket.on('close', () => this.inbox.fail(new FerryError('PEER_GONE', `lost the connection to ${peerName}`)));
  }

  get peerName(): string {
    return this.inbox.peerName;
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

  onClose(listener: () => void): void {
    this.socket.once('close', listener);
  }

  terminate(): void {
    this.socket.terminate();
  }

  close(): void {
    this.socket.close();
  }
}
