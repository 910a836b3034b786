import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { Command } from 'commander';
import { createLogger } from '../src/log.ts';
import { startAgent } from './agent.ts';

/** The agent process: `argv` are its own arguments (`ferry agent …` without `agent`). Runs until SIGTERM or SIGINT. */
export async function main(argv: string[]): Promise<void> {
  const program = new Command('ferry-agent')
    .description('ferry host agent: runs containers and plays source or destination in migrations')
    .option('--listen <address:port>', 'where to listen', '127.0.0.1:7070')
    .option('--name <name>', 'this host\'s name', hostname())
    .option('--state-dir <dir>', 'container and migration state', '/var/lib/ferry')
    .option('--cgroup-root <name>', 'cgroup under which container cgroups are made', 'ferry')
    .option('--token <token>', 'shared secret clients must present (or FERRY_TOKEN)')
    .option('--token-file <file>', 'read the token from a file')
    .option('--tls-cert <file>', 'TLS certificate (PEM)')
    .option('--tls-key <file>', 'TLS private key (PEM)')
    .option('--tls-ca <file>', 'require client certificates signed by this CA (mutual TLS)')
    .option('--insecure', 'allow plain ws:// without TLS (memory images travel unencrypted)')
    .option('--criu <path>', 'CRIU binary (or FERRY_CRIU)')
    .option('--bridge <bridge>', 'existing Linux bridge that containers with their own address (run --ip) attach to')
    .parse(argv, { from: 'user' });

  const options = program.opts<{
    listen: string;
    name: string;
    stateDir: string;
    cgroupRoot: string;
    token?: string;
    tokenFile?: string;
    tlsCert?: string;
    tlsKey?: string;
    tlsCa?: string;
    insecure?: boolean;
    criu?: string;
    bridge?: string;
  }>();

  const logger = createLogger(options.name);
  const token = options.token ?? (options.tokenFile ? readFileSync(options.tokenFile, 'utf8').trim() : process.env.FERRY_TOKEN);
  if (!token) fail('a token is required: --token, --token-file or FERRY_TOKEN');
  if (!options.insecure && !(options.tlsCert && options.tlsKey)) {
    fail('TLS is required (--tls-cert and --tls-key); pass --insecure to accept plain ws:// explicitly');
  }
  const separator = options.listen.lastIndexOf(':');
  const host = options.listen.slice(0, separator).replace(/^\[|\]$/g, '');
  const port = Number(options.listen.slice(separator + 1));

  const agent = await startAgent({
    name: options.name,
    host,
    port,
    token: token!,
    stateDir: options.stateDir,
    cgroupRoot: options.cgroupRoot,
    logger,
    ...(options.tlsCert && options.tlsKey
      ? { tls: { cert: options.tlsCert, key: options.tlsKey, ...(options.tlsCa ? { ca: options.tlsCa } : {}) } }
      : {}),
    ...(options.criu ? { criuPath: options.criu } : {}),
    ...(options.bridge ? { bridge: options.bridge } : {}),
  });
  logger.info({ url: agent.url }, 'agent listening');

  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.once(signal, () => {
      logger.info({ signal }, 'agent stopping; containers keep running');
      agent.close().finally(() => process.exit(0));
    });
  }

  function fail(message: string): never {
    logger.fatal(message);
    process.exit(2);
  }
}

if (import.meta.main) await main(process.argv.slice(2));
