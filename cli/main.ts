import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { examineHost } from '../src/host/doctor.ts';
import { FerryError } from '../src/errors.ts';
import { describeIssues } from '../src/protocol/messages.ts';
import { containerSpecSchema } from '../src/protocol/container.ts';
import { addressProblem, parseCidr } from '../src/net/address.ts';
import { defaultPostcopyGraceMs, migrationOptionsSchema } from '../src/protocol/migration.ts';
import { AgentClient } from '../src/transport/client.ts';
import { loadConfig, readPem, resolveHost, type Endpoint } from './config.ts';
import { containersTable, doctorTable, progressPrinter, reportText } from './output.ts';

interface GlobalOptions {
  host?: string;
  token?: string;
  config?: string;
  json?: boolean;
}

const program = new Command('ferry')
  .description('Live migration of running Linux containers between hosts, built on CRIU')
  .option('-H, --host <name|url>', 'agent to talk to: a name from the config or a ws(s):// URL')
  .option('--token <token>', 'token for --host given as a URL (or FERRY_TOKEN)')
  .option('--config <file>', 'config file (default: FERRY_CONFIG, ~/.config/ferry/config.json, /etc/ferry/config.json)')
  .option('--json', 'machine-readable output');

const globals = () => program.opts<GlobalOptions>();

function endpoint(host?: string): Endpoint {
  const options = globals();
  return resolveHost(loadConfig(options.config), host ?? options.host, options.token);
}

async function withAgent<T>(host: string | undefined, work: (client: AgentClient) => Promise<T>): Promise<T> {
  const target = endpoint(host);
  const ca = readPem(target.ca);
  const cert = readPem(target.cert);
  const key = readPem(target.key);
  const client = await AgentClient.connect({
    url: target.url,
    token: target.token,
    ...(ca ? { ca } : {}),
    ...(cert ? { cert } : {}),
    ...(key ? { key } : {}),
  });
  try {
    return await work(client);
  } finally {
    client.close();
  }
}

function print(human: string, machine: unknown): void {
  process.stdout.write(globals().json ? `${JSON.stringify(machine, null, 2)}\n` : `${human}\n`);
}

const collect = (value: string, previous: string[]) => [...previous, value];
const pairs = (values: string[]) =>
  Object.fromEntries(
    values.map((pair) => {
      const separator = pair.indexOf('=');
      if (separator < 1) throw new FerryError('BAD_REQUEST', `expected KEY=VALUE, got ${pair}`);
      return [pair.slice(0, separator), pair.slice(separator + 1)];
    }),
  );

program
  .command('doctor')
  .description("what this host can do for ferry (CRIU, freezer, namespaces, dirty tracking, space)")
  .option('--state-dir <dir>', 'state directory to check for space', '/var/lib/ferry')
  .option('--criu <path>', 'CRIU binary to check')
  .action(async (options: { stateDir: string; criu?: string }) => {
    const report = await examineHost(options.stateDir, options.criu);
    const verdict = report.blockers.length
      ? `migration impossible here: ${report.blockers.map((blocker) => `${blocker.name} (${blocker.hint ?? blocker.value})`).join('; ')}`
      : 'this host can run and migrate ferry containers';
    print(`${doctorTable(report.capabilities)}\n\n${verdict}`, {
      kernel: report.kernel,
      criu: report.criu ? { path: report.criu.path, version: report.criu.version.text } : null,
      capabilities: report.capabilities,
      ok: !report.blockers.length,
      verdict,
    });
    if (report.blockers.length) process.exitCode = 1;
  });

// `ferry agent ...` is the agent itself, with its own options (see `ferry agent --help`).
program.command('agent').description('run the host agent (see `ferry agent --help`)');

program
  .command('run <name> <command...>')
  .description('start a container from a rootfs directory or tarball (put -- before a command that has options)')
  .requiredOption('--rootfs <path>', 'rootfs directory or .tar/.tar.gz on the agent host')
  .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', collect, [])
  .option('--cwd <dir>', 'working directory inside the container', '/')
  .option('--hostname <name>', 'hostname inside the container')
  .option('--private-network', 'own network namespace with loopback only')
  .option('--ip <addr/prefix>', "its own IPv4 address on the agent's bridge (ferry agent --bridge); moves with it")
  .option('--gateway <addr>', 'default route of a container with --ip')
  .option('-l, --label <KEY=VALUE>', 'label (repeatable)', collect, [])
  .action(async (name: string, command: string[], options: { rootfs: string; env: string[]; cwd: string; hostname?: string; privateNetwork?: boolean; ip?: string; gateway?: string; label: string[] }) => {
    if (options.gateway && !options.ip) throw new FerryError('BAD_REQUEST', '--gateway needs --ip');
    let network: { address: string; prefix: number; gateway?: string } | undefined;
    if (options.ip) {
      try {
        network = { ...parseCidr(options.ip), ...(options.gateway ? { gateway: options.gateway } : {}) };
      } catch (error) {
        throw new FerryError('BAD_REQUEST', `--ip: ${(error as Error).message}`);
      }
      const problem = addressProblem(network.address, network.prefix, network.gateway);
      if (problem) throw new FerryError('BAD_REQUEST', `--gateway: ${problem}`);
    }
    const spec = containerSpecSchema.parse({
      name,
      command,
      rootfs: resolve(options.rootfs),
      env: pairs(options.env),
      cwd: options.cwd,
      privateNetwork: !!options.privateNetwork || !!network,
      ...(network ? { network } : {}),
      labels: pairs(options.label),
      ...(options.hostname ? { hostname: options.hostname } : {}),
    });
    const info = await withAgent(undefined, (client) => client.request('run', { spec }));
    print(`${info.name} running, pid ${info.pid}`, info);
  });

program
  .command('ps')
  .alias('list')
  .description('containers on the agent')
  .action(async () => {
    const result = await withAgent(undefined, (client) => client.request('list', {}));
    print(containersTable(globals().host ?? 'local', result.containers), result);
  });

program
  .command('logs <name>')
  .description("a container's stdout and stderr (kept across checkpoints and migrations)")
  .option('--tail <bytes>', 'last N bytes', (value) => Number(value), 65_536)
  .action(async (name: string, options: { tail: number }) => {
    const result = await withAgent(undefined, (client) => client.request('logs', { name, tailBytes: options.tail }));
    if (globals().json) print('', result);
    else process.stdout.write(result.text);
  });

program
  .command('stop <name>')
  .description('SIGTERM, then kill through the cgroup after the grace period')
  .option('--grace <ms>', 'grace period', (value) => Number(value), 5_000)
  .action(async (name: string, options: { grace: number }) => {
    const info = await withAgent(undefined, (client) => client.request('stop', { name, graceMs: options.grace }));
    print(`${name} ${info.status}`, info);
  });

program
  .command('rm <name>')
  .description('remove a stopped container')
  .option('-f, --force', 'kill it first if it runs')
  .action(async (name: string, options: { force?: boolean }) => {
    const result = await withAgent(undefined, (client) => client.request('remove', { name, force: !!options.force }));
    print(`${name} removed`, result);
  });

program
  .command('checkpoint <name> <directory>')
  .description('freeze, snapshot the rootfs and dump with CRIU into a directory on the agent host')
  .option('--keep-running', 'thaw the container afterwards instead of killing it')
  .action(async (name: string, directory: string, options: { keepRunning?: boolean }) => {
    const result = await withAgent(undefined, (client) =>
      client.request('checkpoint', { name, directory: resolve(directory), keepRunning: !!options.keepRunning }),
    );
    const warnings = (result.warnings ?? []).map((warning) => `\nwarning: ${warning}`).join('');
    print(`${name} checkpointed to ${result.directory} (frozen ${result.frozenMs.toFixed(1)} ms)${warnings}`, result);
  });

program
  .command('restore <directory>')
  .description('restore a checkpoint directory on the agent host')
  .option('--name <name>', 'restore under another name')
  .action(async (directory: string, options: { name?: string }) => {
    const info = await withAgent(undefined, (client) =>
      client.request('restore', { directory: resolve(directory), ...(options.name ? { name: options.name } : {}) }),
    );
    print(`${info.name} restored, pid ${info.pid}`, info);
  });

program
  .command('migrate <name>')
  .description('live-migrate a running container from one agent to another')
  .requiredOption('--from <host>', 'source agent (name from the config, or URL)')
  .requiredOption('--to <host>', 'destination agent (name from the config, or URL)')
  .option('--to-token <token>', 'token of the destination when --to is a URL (default: --token)')
  .addOption(new Option('--strategy <strategy>', 'memory transfer').choices(['auto', 'precopy', 'stop-and-copy', 'postcopy']).default('auto'))
  .option('--allow-postcopy', 'let auto pick post-copy when stop-and-copy would outlast --max-downtime (the source host must then stay up until the last page)', false)
  .option('--max-downtime <ms>', 'downtime budget for pre-copy', (value) => Number(value), 300)
  .option('--max-rounds <n>', 'pre-copy rounds at most', (value) => Number(value), 8)
  .option('--postcopy-grace <ms>', 'post-copy: how long a cut link is waited out before the destination\'s copy is stopped and the source\'s resumes', (value) => Number(value), defaultPostcopyGraceMs)
  .option('--timeout <ms>', 'give up and roll back after this long', (value) => Number(value), 600_000)
  .action(
    async (
      name: string,
      options: {
        from: string;
        to: string;
        toToken?: string;
        strategy: string;
        allowPostcopy: boolean;
        maxDowntime: number;
        maxRounds: number;
        postcopyGrace: number;
        timeout: number;
      },
    ) => {
      const destinationEndpoint = resolveHost(loadConfig(globals().config), options.to, options.toToken ?? globals().token);
      const ca = readPem(destinationEndpoint.ca)?.toString();
      const parsed = migrationOptionsSchema.safeParse({
        strategy: options.strategy,
        ...(options.allowPostcopy ? { allowPostcopy: true } : {}),
        maxDowntimeMs: options.maxDowntime,
        maxRounds: options.maxRounds,
        postcopyGraceMs: options.postcopyGrace,
        timeoutMs: options.timeout,
      });
      if (!parsed.success) throw new FerryError('BAD_REQUEST', `migrate options: ${describeIssues(parsed.error)}`);
      const migrationOptions = parsed.data;
      const progress = progressPrinter(!!globals().json);
      try {
        const report = await withAgent(options.from, (client) =>
          client.request(
            'migrate',
            {
              name,
              destination: { url: destinationEndpoint.url, token: destinationEndpoint.token, ...(ca ? { ca } : {}) },
              options: migrationOptions,
            },
            progress.update,
          ),
        );
        progress.stop();
        print(reportText(report), { report });
      } catch (error) {
        progress.stop();
        throw error;
      }
    },
  );

program
  .command('demo')
  .description('start two hosts on this machine and live-migrate a running container between them')
  .option('--keep', 'leave the hosts running until Ctrl-C')
  .action(async (options: { keep?: boolean }) => {
    const { runDemo } = await import('./demo.ts');
    await runDemo({ keep: !!options.keep });
  });

// ---- coordinator (issue 5): the service itself, and commands that talk to it

// Dispatched before commander parses anything (like `agent`), so its own options pass through.
program.command('coordinator').description('run the coordinator (see `ferry coordinator --help`)');

interface CoordinatorOptions {
  coordinator?: string;
}

async function coordinatorClient(options: CoordinatorOptions) {
  const { CoordinatorClient } = await import('../coordinator/client.ts');
  const configured = loadConfig(globals().config).coordinator;
  const url = options.coordinator ?? process.env.FERRY_COORDINATOR ?? configured?.url;
  // `--token` is the global option: with --coordinator it is the coordinator's token.
  const token = (options.coordinator ? globals().token : undefined) ?? process.env.FERRY_COORDINATOR_TOKEN ?? configured?.token;
  if (!url || !token) throw new FerryError('BAD_REQUEST', 'no coordinator: pass --coordinator URL --token T, or add "coordinator" to the config');
  return new CoordinatorClient(url, token);
}

program
  .command('evacuate <host>')
  .description('move every container off a host through the coordinator (or --undo the last evacuation)')
  .option('--coordinator <url>', 'coordinator URL, with --token (default: the config\'s "coordinator")')
  .option('--to <hosts>', 'only these targets, comma-separated')
  .option('--parallel <k>', 'migrations at once', (value) => Number(value), 2)
  .option('--undo', 'move the containers of the last evacuation of <host> back')
  .action(async (host: string, options: CoordinatorOptions & { to?: string; parallel: number; undo?: boolean }) => {
    const { evacuationTable } = await import('../coordinator/client.ts');
    const client = await coordinatorClient(options);
    const started = options.undo
      ? await client.undo(await client.lastEvacuation(host))
      : await client.evacuate({ host, parallel: options.parallel, ...(options.to ? { to: options.to.split(',') } : {}) });
    if (!globals().json) process.stderr.write(`evacuation ${started.id} of ${host}${options.undo ? ' (undo)' : ''} started\n`);
    const done = await client.wait(started.id, (view) => {
      if (globals().json) return;
      const finished = view.migrations.filter((migration) => migration.finishedAt).length;
      process.stderr.write(`  ${finished} migrations finished, ${view.migrations.length - finished} running\n`);
    });
    print(`${evacuationTable(done)}\n\nevacuation ${done.state}${done.unplaced.length ? `; ${done.unplaced.length} container(s) stayed` : ''}`, done);
    if (done.state !== 'finished' || done.unplaced.length) process.exitCode = 1;
  });

program
  .command('hosts')
  .description('hosts the coordinator manages: heartbeat, draining, containers, free memory')
  .option('--coordinator <url>', 'coordinator URL, with --token (default: the config\'s "coordinator")')
  .action(async (options: CoordinatorOptions) => {
    const { hostsTable } = await import('../coordinator/client.ts');
    const hosts = await (await coordinatorClient(options)).hosts();
    print(hostsTable(hosts), { hosts });
  });

program
  .command('undrain <host>')
  .description('let placement use a host again after an evacuation, without moving anything back')
  .option('--coordinator <url>', 'coordinator URL, with --token (default: the config\'s "coordinator")')
  .action(async (host: string, options: CoordinatorOptions) => {
    const view = await (await coordinatorClient(options)).undrain(host);
    print(`${view.name} is schedulable again`, { host: view });
  });

try {
  if (process.argv[2] === 'agent') {
    const { main } = await import('../agent/main.ts');
    await main(process.argv.slice(3));
  } else if (process.argv[2] === 'coordinator') {
    const { main } = await import('../coordinator/main.ts');
    await main(process.argv.slice(3));
  } else {
    await program.parseAsync();
  }
} catch (error) {
  const ferryError = error instanceof FerryError ? error : undefined;
  if (globals().json) {
    process.stdout.write(`${JSON.stringify({ error: ferryError?.toJSON() ?? { code: 'INTERNAL', message: String(error) } })}\n`);
  } else if (ferryError) {
    process.stderr.write(`ferry: ${ferryError.code}${ferryError.phase ? ` in ${ferryError.phase}` : ''}: ${ferryError.message}\n`);
    for (const line of ferryError.details) process.stderr.write(`  ${line}\n`);
  } else {
    process.stderr.write(`ferry: ${error instanceof Error ? error.message : String(error)}\n`);
  }
  process.exitCode = ferryError?.code === 'BAD_REQUEST' ? 2 : 1;
}
