// A source agent written by hand from the protocol, for the tests that send
// what a real source never would: messages out of order, duplicate ids,
// data after an abort, streams that stop half way.
import { randomUUID } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type WebSocket from 'ws';
import { digestOf } from '../../src/digest.ts';
import { Criu } from '../../src/criu/criu.ts';
import { containerSpecSchema } from '../../src/protocol/container.ts';
import { protocolVersion } from '../../src/protocol/messages.ts';
import { openSocket } from '../../src/transport/client.ts';
import type { Node } from './migration.ts';

export type Json = Record<string, unknown> & { type?: string; id?: string; migrationId?: string; decision?: string; error?: { code: string; message: string } };

export interface RawSocket {
  socket: WebSocket;
  /** The first message received (or arriving within `timeoutMs`) that matches; it is taken out. */
  next: (match: (message: Json) => boolean, timeoutMs?: number) => Promise<Json>;
  /** Every message received and not taken yet. */
  received: Json[];
}

/** A raw authenticated socket to an agent, with the JSON messages it receives. */
export async function rawSocket(node: Node, path = '/control'): Promise<RawSocket> {
  const socket = await openSocket({ url: node.agent.url, token: node.agent.token }, path);
  const received: Json[] = [];
  socket.on('message', (data, isBinary) => {
    if (!isBinary) received.push(JSON.parse(data.toString()) as Json);
  });
  const next = async (match: (message: Json) => boolean, timeoutMs = 15_000): Promise<Json> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = received.findIndex(match);
      if (index >= 0) return received.splice(index, 1)[0]!;
      if (Date.now() > deadline) throw new Error(`no matching message; got ${JSON.stringify(received).slice(0, 500)}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  return { socket, next, received };
}

/** A control connection that has said hello as an agent. */
export async function greet(node: Node, name: string): Promise<RawSocket> {
  const raw = await rawSocket(node);
  raw.socket.send(JSON.stringify({ type: 'hello', version: protocolVersion, peer: 'agent', name }));
  await raw.next((message) => message.type === 'hello');
  return raw;
}

/** What an offer needs from this host's CRIU: its version and `criu cpuinfo dump`. */
export async function sourceFacts(scratch: string): Promise<{ cpuinfo: string; criuVersion: string }> {
  const criu = await Criu.locate();
  const directory = join(scratch, 'cpuinfo');
  await mkdir(directory, { recursive: true });
  await criu.cpuinfoDump(directory);
  return { cpuinfo: (await readFile(join(directory, 'cpuinfo.img'))).toString('base64'), criuVersion: criu.version.text };
}

export function offerMessage(facts: { cpuinfo: string; criuVersion: string }, name: string, migrationId: string = randomUUID()): Json {
  return {
    type: 'offer',
    migrationId,
    spec: containerSpecSchema.parse({ name, rootfs: '/nowhere', command: ['/bin/sh'] }),
    history: ['intruder'],
    source: { host: 'intruder', criuVersion: facts.criuVersion, kernel: 'any' },
    cpuinfo: facts.cpuinfo,
    needs: { rootfsBytes: 4096, memoryBytes: 0 },
  };
}

/** Sends one whole stream on a data channel, as the protocol frames it. */
export function sendStream(channel: WebSocket, name: string, body: Buffer, files: Record<string, string> = {}): void {
  channel.send(JSON.stringify({ type: 'stream-open', name }));
  channel.send(body, { binary: true });
  channel.send(JSON.stringify({ type: 'stream-end', bytes: body.length, digest: digestOf(body), files }));
}

/** Resolves with the close code once the socket is closed (or rejects after `timeoutMs`). */
export function closeCode(socket: WebSocket, timeoutMs = 10_000): Promise<number> {
  if (socket.readyState === socket.CLOSED) return Promise.resolve(-1);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('socket still open')), timeoutMs);
    socket.once('close', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}
