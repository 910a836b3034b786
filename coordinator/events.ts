// Progress of migrations and evacuations, fanned out to SSE subscribers.
import type { ServerResponse } from 'node:http';
import { coordinatorEventSchema, type CoordinatorEvent } from '../src/protocol/coordinator.ts';

type EventInput = CoordinatorEvent extends infer E ? (E extends CoordinatorEvent ? Omit<E, 'at'> : never) : never;

export class EventBus {
  private readonly listeners = new Set<(event: CoordinatorEvent) => void>();

  emit(input: EventInput): void {
    const event = { ...input, at: new Date().toISOString() } as CoordinatorEvent;
    for (const listener of this.listeners) listener(event);
  }

  subscribe(listener: (event: CoordinatorEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Streams every event as Server-Sent Events until the client goes away. */
  serveSse(response: ServerResponse): void {
    response.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    response.write(': ferry coordinator events\n\n');
    const unsubscribe = this.subscribe((event) => {
      // Checked like every answer; one the protocol would refuse is a bug here, and the stream says so instead.
      if (!coordinatorEventSchema.safeParse(event).success) return void response.write(`: an event the protocol does not allow was dropped\n\n`);
      response.write(`event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`);
    });
    // A comment line now and then keeps proxies from closing an idle stream.
    const keepalive = setInterval(() => response.write(': keepalive\n\n'), 15_000);
    keepalive.unref();
    response.on('close', () => {
      clearInterval(keepalive);
      unsubscribe();
    });
  }
}
