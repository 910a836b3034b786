// The coordinator's HTTP+JSON API. Every route needs the Bearer token; bodies
// are zod-validated; errors are JSON with a stable code (and the field at fault).
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { z } from 'zod';
import { FerryError, toFerryError } from '../src/errors.ts';
import { httpStatusOf, type ErrorBody } from '../src/protocol/errors.ts';
import {
  apiAnswerSchemas,
  evacuationBodySchema,
  hostNameSchema,
  migrationBodySchema,
  registerHostBodySchema,
  type ApiAnswer,
} from '../src/protocol/coordinator.ts';
import { checkedMessage, describeIssues, parseJsonMessage } from '../src/protocol/messages.ts';
import { bearerToken, tokenMatches } from '../src/transport/auth.ts';
import { ConnectionLimiter, defaultConnectionLimits, requestPath, serverTimeouts } from '../src/transport/limits.ts';
import type { Logger } from 'pino';
import type { Service } from './service.ts';

const MAX_BODY_BYTES = 1024 * 1024;

type Handler = (service: Service, request: IncomingMessage, params: string[]) => Promise<{ status: number; body: unknown }>;

const ok = (body: unknown, status = 200) => ({ status, body });

const hostParamsSchema = z.object({ name: hostNameSchema });

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new FerryError('BAD_REQUEST', 'bad percent-encoding in the path', { field: 'name' });
  }
}

const routes: Array<{ method: string; pattern: RegExp; answer: ApiAnswer; handler: Handler }> = [
  { method: 'GET', pattern: /^\/v1\/hosts$/, answer: 'hosts', handler: async (service) => ok({ hosts: service.pool.views() }) },
  {
    method: 'POST',
    answer: 'host',
    pattern: /^\/v1\/hosts$/,
    handler: async (service, request) => ok({ host: await service.registerHost(parse(registerHostBodySchema, await readJson(request))) }, 201),
  },
  {
    method: 'POST',
    answer: 'host',
    // Any segment, so that a malformed name gets a 400 naming the field rather than a 404.
    pattern: /^\/v1\/hosts\/([^/]+)\/undrain$/,
    handler: async (service, _request, [name]) => ok({ host: service.undrain(parse(hostParamsSchema, { name: decodeSegment(name!) }).name) }),
  },
  { method: 'GET', pattern: /^\/v1\/containers$/, answer: 'containers', handler: async (service) => ok({ containers: service.containers() }) },
  { method: 'GET', pattern: /^\/v1\/migrations$/, answer: 'migrations', handler: async (service) => ok({ migrations: service.store.migrations() }) },
  {
    method: 'POST',
    answer: 'migration',
    pattern: /^\/v1\/migrations$/,
    handler: async (service, request) => ok({ migration: await service.startMigration(parse(migrationBodySchema, await readJson(request))) }, 202),
  },
  {
    method: 'GET',
    answer: 'migration',
    pattern: /^\/v1\/migrations\/([\w-]+)$/,
    handler: async (service, _request, [id]) => {
      const migration = service.store.migration(id!);
      if (!migration) throw new FerryError('NOT_FOUND', `no migration ${id}`);
      return ok({ migration });
    },
  },
  {
    method: 'POST',
    answer: 'cancelled',
    pattern: /^\/v1\/migrations\/([\w-]+)\/cancel$/,
    handler: async (service, _request, [id]) => {
      if (!service.store.migration(id!)) throw new FerryError('NOT_FOUND', `no migration ${id}`);
      return ok({ cancelled: service.migrator.cancel(id!) });
    },
  },
  { method: 'GET', pattern: /^\/v1\/evacuations$/, answer: 'evacuations', handler: async (service) => ok({ evacuations: service.store.evacuations() }) },
  {
    method: 'POST',
    answer: 'evacuation',
    pattern: /^\/v1\/evacuations$/,
    handler: async (service, request) => ok({ evacuation: service.evacuator.start(parse(evacuationBodySchema, await readJson(request))) }, 202),
  },
  { method: 'GET', pattern: /^\/v1\/evacuations\/([\w-]+)$/, answer: 'evacuation', handler: async (service, _request, [id]) => ok({ evacuation: service.evacuator.view(id!) }) },
  {
    method: 'POST',
    answer: 'evacuation',
    pattern: /^\/v1\/evacuations\/([\w-]+)\/undo$/,
    handler: async (service, _request, [id]) => ok({ evacuation: service.evacuator.undo(id!) }, 202),
  },
];

/**
 * The API's HTTP server, with the bounds any listener reachable from the
 * network needs: a request must arrive within 10 s, and connections that have
 * not presented the token are capped per address and in all.
 */
export function createApiServer(service: Service, logger: Logger): Server {
  const server = createServer(serverTimeouts);
  const limiter = new ConnectionLimiter(server, defaultConnectionLimits, (address) => {
    logger.warn({ remote: address }, 'refused a connection: too many waiting to authenticate');
  });
  server.on('request', (request, response) => {
    if (tokenMatches(bearerToken(request), service.token)) limiter.trust(request.socket);
    void handle(service, request, response, logger);
  });
  return server;
}

/** Serves one request: authenticate, route, answer JSON (or SSE, or Prometheus text). Never rejects. */
export async function handle(service: Service, request: IncomingMessage, response: ServerResponse, logger?: Logger): Promise<void> {
  try {
    if (!tokenMatches(bearerToken(request), service.token)) throw new FerryError('UNAUTHORIZED', 'wrong or missing token');
    // Not `new URL`: it throws on targets such as "//a:99999".
    const path = requestPath(request.url);
    if (path === undefined) throw new FerryError('BAD_REQUEST', 'the request target is not a path');
    if (request.method === 'GET' && path === '/v1/events') return service.events.serveSse(response);
    if (request.method === 'GET' && path === '/metrics') {
      response.writeHead(200, { 'content-type': service.metrics.registry.contentType });
      response.end(await service.metrics.registry.metrics());
      return;
    }
    const matching = routes.filter((candidate) => candidate.pattern.test(path));
    if (!matching.length) throw new FerryError('NOT_FOUND', `no route ${path.slice(0, 200)}`);
    const route = matching.find((candidate) => candidate.method === request.method);
    if (!route) throw new FerryError('METHOD_NOT_ALLOWED', `${request.method} not allowed on ${path.slice(0, 200)}`);
    const params = route.pattern.exec(path)!.slice(1);
    const { status, body } = await route.handler(service, request, params);
    sendJson(response, status, checkedMessage(apiAnswerSchemas[route.answer], body, `${route.answer} answer`));
  } catch (error) {
    // A client's mistake is its own to read; trouble on this side goes to the log.
    if (httpStatusOf[toFerryError(error).code] >= 500) logger?.warn({ err: error, path: request.url?.slice(0, 200) }, 'API request failed');
    sendError(response, error);
  }
}

function sendJson(response: ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { 'content-type': 'application/json' });
  response.end(`${JSON.stringify(body)}\n`);
}

function sendError(response: ServerResponse, error: unknown): void {
  const ferryError = toFerryError(error);
  // An internal error says what failed, not the paths on this host (the log has them).
  const body: ErrorBody = { error: ferryError.toJSON() };
  if (response.headersSent) response.end();
  else sendJson(response, httpStatusOf[ferryError.code], body);
}

async function readJson(request: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of request as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new FerryError('TOO_LARGE', `body larger than ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk);
  }
  try {
    return parseJsonMessage(Buffer.concat(chunks).toString('utf8'));
  } catch (error) {
    throw new FerryError('BAD_REQUEST', error instanceof FerryError ? error.message.replace('message', 'body') : 'body is not JSON', { field: '(body)' });
  }
}

function parse<T extends z.ZodType>(schema: T, value: unknown): z.infer<T> {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const first = result.error.issues[0];
  const field = first?.path.length ? first.path.join('.') : '(body)';
  throw new FerryError('BAD_REQUEST', describeIssues(result.error), { field });
}
