import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { FerryError } from '../src/errors.ts';

const endpointSchema = z.object({
  url: z.string().url(),
  token: z.string().min(1),
  /** Path of a PEM CA bundle for wss. */
  ca: z.string().optional(),
  cert: z.string().optional(),
  key: z.string().optional(),
});
export type Endpoint = z.infer<typeof endpointSchema>;

export const configSchema = z.object({
  hosts: z.record(z.string(), endpointSchema).default({}),
  defaultHost: z.string().optional(),
  coordinator: endpointSchema.optional(),
});
export type FerryConfig = z.infer<typeof configSchema>;

export function configPaths(): string[] {
  return [process.env.FERRY_CONFIG, join(homedir(), '.config', 'ferry', 'config.json'), '/etc/ferry/config.json'].filter(
    (path): path is string => !!path,
  );
}

export function loadConfig(explicitPath?: string): FerryConfig {
  const path = explicitPath ?? configPaths().find((candidate) => existsSync(candidate));
  if (!path) return configSchema.parse({});
  try {
    return configSchema.parse(JSON.parse(readFileSync(path, 'utf8')));
  } catch (cause) {
    throw new FerryError('BAD_REQUEST', `config ${path} is invalid: ${(cause as Error).message}`, { cause });
  }
}

/** A host given as a name from the config, or as a URL (token from --token or FERRY_TOKEN). */
export function resolveHost(config: FerryConfig, host: string | undefined, token: string | undefined): Endpoint {
  const name = host ?? config.defaultHost ?? process.env.FERRY_HOST;
  const fromConfig = name ? config.hosts[name] : undefined;
  if (fromConfig) return { ...fromConfig, ...(token ? { token } : {}) };
  const url = name ?? 'ws://127.0.0.1:7070';
  if (!/^wss?:\/\//.test(url)) throw new FerryError('BAD_REQUEST', `unknown host ${url}: not in the config and not a ws:// or wss:// URL`);
  const secret = token ?? process.env.FERRY_TOKEN;
  if (!secret) throw new FerryError('BAD_REQUEST', `no token for ${url}: pass --token or set FERRY_TOKEN`);
  return { url, token: secret };
}

export function readPem(path: string | undefined): Buffer | undefined {
  return path ? readFileSync(path) : undefined;
}
