// Progress of migrations and evacuations, fanned out to SSE subscribers.
import type { ServerResponse } from 'node:http';
import type { CoordinatorEvent } from '../src/protocol/coordinator.ts';

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
    const unsubscribe = this.subscribe((event) => response.write(`event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`));
    // A comment line now and then keeps proxies from closing an idle stream.
    const keepalive = setInterval(() => response.write(': keepalive\n\n'), 15_000);
    keepalive.unref();
    response.on('close', () => {
      clearInterval(keepalive);
      unsubscribe();
    });
  }
}
