import type WebSocket from 'ws';
import { FerryError, fromWire } from '../errors.ts';
import { parseJsonMessage, protocolVersion, replySchema, type Hello } from '../protocol/messages.ts';

const helloWaitMs = 10_000;

/**
 * The opening of every control connection, from the connecting side: say
 * hello, then read the agent's hello (or its error) with the same protocol
 * version. `who` names the other end in errors. The socket is terminated on
 * any failure.
 */
export async function exchangeHello(socket: WebSocket, ours: Omit<Hello, 'type' | 'version'>, who: string): Promise<Hello> {
  const hello: Hello = { type: 'hello', version: protocolVersion, ...ours };
  socket.send(JSON.stringify(hello));
  try {
    let timer: NodeJS.Timeout | undefined;
    let onClose: (() => void) | undefined;
    const theirs = await new Promise<Hello>((resolve, reject) => {
      timer = setTimeout(() => reject(new FerryError('TIMEOUT', `no hello from ${who} in ${helloWaitMs} ms`, { phase: 'connect' })), helloWaitMs);
      onClose = () => reject(new FerryError('PEER_GONE', `${who} closed the connection during hello`, { phase: 'connect' }));
      socket.once('close', onClose);
      socket.once('message', (data) => {
        let reply;
        try {
          reply = replySchema.safeParse(parseJsonMessage(data.toString()));
        } catch (error) {
          return reject(error);
        }
        if (reply.success && reply.data.type === 'hello') resolve(reply.data);
        else if (reply.success && reply.data.type === 'error') reject(fromWire(reply.data.error));
        else reject(new FerryError('BAD_MESSAGE', `${who} did not answer hello`, { phase: 'connect' }));
      });
    }).finally(() => {
      clearTimeout(timer);
      if (onClose) socket.off('close', onClose);
    });
    if (theirs.version !== protocolVersion) {
      throw new FerryError('PROTOCOL_VERSION', `${who} speaks protocol ${theirs.version}, this ${ours.peer} ${protocolVersion}`, { phase: 'connect' });
    }
    return theirs;
  } catch (error) {
    socket.terminate();
    throw error;
  }
}
