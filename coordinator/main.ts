// ferry coordinator: the HTTP API that moves containers and evacuates hosts.
import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { createLogger } from '../src/log.ts';
import { registerHostBodySchema, type RegisterHostBody } from '../src/protocol/coordinator.ts';
import { migrationOptionsSchema } from '../src/protocol/migration.ts';
import { Service } from './service.ts';

const collect = (value: string, previous: string[]) => [...previous, value];

/** The coordinator process: `argv` are its own arguments (`ferry coordinator …` without `coordinator`). Runs until SIGTERM or SIGINT. */
export async function main(argv: string[]): Promise<void> {
  const program = new Command('ferry-coordinator')
    .description('ferry coordinator: placement, migrations and host evacuation over an HTTP+JSON API')
    .option('--listen <address:port>', 'where to listen', '127.0.0.1:7080')
    .option('--token <token>', 'token API clients must present (or FERRY_COORDINATOR_TOKEN)')
    .option('--token-file <file>', 'read the token from a file')
    .option('--db <file>', 'SQLite state file', '/var/lib/ferry/coordinator.db')
    .option('--host <name=url,token[,memory=BYTES]>', 'an agent to manage (repeatable; more can be registered via the API)', collect, [])
    .option('--heartbeat-ms <ms>', 'interval of the info polls; 3 missed mark a host down', (value) => Number(value), 2_000)
    .option('--margin-mib <MiB>', 'memory a target must have free beyond the container', (value) => Number(value), 16)
    .option('--allow-postcopy', 'let migrations pick post-copy when stop-and-copy would outlast the downtime budget (the source host must then stay up until the last page)', false)
    .option('--postcopy-grace <ms>', 'post-copy: how long a cut link is waited out before the destination\'s copy is stopped and the source\'s resumes', (value) => Number(value))
    .parse(argv, { from: 'user' });

  const options = program.opts<{
    listen: string;
    token?: string;
    tokenFile?: string;
    db: string;
    host: string[];
    heartbeatMs: number;
    marginMib: number;
    allowPostcopy: boolean;
    postcopyGrace?: number;
  }>();

  const logger = createLogger('coordinator');
  const token = options.token ?? (options.tokenFile ? readFileSync(options.tokenFile, 'utf8').trim() : process.env.FERRY_COORDINATOR_TOKEN);
  if (!token) fail('a token is required: --token, --token-file or FERRY_COORDINATOR_TOKEN');
  if (options.postcopyGrace !== undefined && !migrationOptionsSchema.shape.postcopyGraceMs.safeParse(options.postcopyGrace).success) {
    fail(`--postcopy-grace must be a whole number of ms from 2000 to 600000, not ${options.postcopyGrace}`);
  }
  const separator = options.listen.lastIndexOf(':');

  const service = new Service({
    host: options.listen.slice(0, separator).replace(/^\[|\]$/g, ''),
    port: Number(options.listen.slice(separator + 1)),
    token: token!,
    dbFile: options.db,
    logger,
    hosts: options.host.map(parseHost),
    heartbeatMs: options.heartbeatMs,
    marginBytes: options.marginMib * 1024 * 1024,
    allowPostcopy: options.allowPostcopy,
    ...(options.postcopyGrace !== undefined ? { postcopyGraceMs: options.postcopyGrace } : {}),
  });
  await service.start();
  logger.info({ url: service.url }, 'coordinator listening');

  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.once(signal, () => {
      logger.info({ signal }, 'coordinator stopping');
      service.close().finally(() => process.exit(0));
    });
  }

  /** name=url,token[,memory=BYTES] */
  function parseHost(value: string): RegisterHostBody {
    const match = /^([^=]+)=([^,]+),([^,]+)(?:,memory=(\d+))?$/.exec(value);
    if (!match) fail(`--host ${value}: expected name=url,token[,memory=BYTES]`);
    const parsed = registerHostBodySchema.safeParse({
      name: match[1],
      url: match[2],
      token: match[3],
      ...(match[4] ? { memoryLimitBytes: Number(match[4]) } : {}),
    });
    if (!parsed.success) fail(`--host ${match[1]}: ${parsed.error.issues.map((issue) => `${issue.path.join('.')}: ${issue.message}`).join('; ')}`);
    return parsed.data;
  }

  function fail(message: string): never {
    logger.fatal(message);
    process.exit(2);
  }
}

if (import.meta.main) await main(process.argv.slice(2));
