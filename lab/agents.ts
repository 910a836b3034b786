// Runs a real ferry agent inside a host's netns and follows its pino log.
// Killing an agent kills that one process: the containers it started are
// meant to outlive it (a restarted agent adopts them), so no process group
// or cgroup is signalled here. cleanup.ts removes those at destroy().
import { randomBytes } from 'node:crypto';
import { createWriteStream, type WriteStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { agentNodeFlags } from '../src/paths.ts';
import type { Host } from './hosts.ts';
import { LabError, spawnInNetns } from './system.ts';

const REPO_ROOT = fileURLToPath(new URL('../', import.meta.url));
const DEFAULT_PORT = 7070;
// An agent is ready in about a second here; under the VM lane's emulation it can
// take 10-30 s, so test/vm/lane.ts raises this through the environment.
const READY_TIMEOUT_MS = Number(process.env.FERRY_TEST_AGENT_READY_MS) || 20_000;
const STOP_GRACE_MS = 5_000;
/** Lines of output quoted in errors. */
const OUTPUT_TAIL = 40;

export interface AgentOptions {
  /** Default: 32 random hex chars. */
  token?: string;
  port?: number;
  extraArgs?: string[];
  /** Added to the environment after the variables from .build/env. */
  env?: Record<string, string>;
  /** Also append every output line to <stateDir>/agent.log. Default true. */
  logFile?: boolean;
  readyTimeoutMs?: number;
  /** The agent entry point; default <repo>/agent/main.ts. */
  script?: string;
}

export interface AgentLogEntry {
  stream: 'stdout' | 'stderr';
  line: string;
  /** The parsed pino line, when the line is JSON. */
  json: Record<string, unknown> | undefined;
}

export interface AgentProcess {
  url: string;
  token: string;
  /** Of the current agent process (changes on restart). */
  readonly pid: number;
  /** Every output line so far, across restarts. */
  logs(): string[];
  /** First line of the current agent process matching predicate, including lines already logged. */
  waitForLog(predicate: (entry: AgentLogEntry) => boolean, timeoutMs?: number): Promise<AgentLogEntry>;
  /** Signals the agent process only, and waits for it to exit. Default SIGKILL. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** SIGTERM, then SIGKILL after 5 s; resolves once it has exited. */
  stop(): Promise<void>;
  /** Stops it if running, then starts it again with the same arguments and token. */
  restart(): Promise<void>;
}

export async function startAgent(host: Host, options: AgentOptions = {}): Promise<AgentProcess> {
  const port = options.port ?? DEFAULT_PORT;
  const token = options.token ?? randomBytes(16).toString('hex');
  const args = [
    ...agentNodeFlags,
    options.script ?? join(REPO_ROOT, 'agent/main.ts'),
    ...['--name', host.name],
    ...['--listen', `${host.address}:${port}`],
    ...['--state-dir', host.stateDir],
    ...['--cgroup-root', host.cgroupName],
    ...['--token', token],
    '--insecure',
    ...(options.extraArgs ?? []),
  ];
  const env = { ...(await readBuildEnv()), ...options.env };
  const logFile = options.logFile === false ? undefined : join(host.stateDir, 'agent.log');
  const agent = new Agent(host.netns, args, env, logFile, options.readyTimeoutMs ?? READY_TIMEOUT_MS);
  await agent.start();
  return {
    url: `ws://${host.address}:${port}`,
    token,
    get pid() {
      return agent.pid;
    },
    logs: () => agent.entries.map((entry) => entry.line),
    waitForLog: (predicate, timeoutMs) => agent.waitForLog(predicate, timeoutMs),
    kill: (signal = 'SIGKILL') => agent.kill(signal),
    stop: () => agent.stop(),
    restart: async () => {
      await agent.stop();
      await agent.start();
    },
  };
}

/** `<repo>/.build/env` holds shell `KEY=VALUE` lines written by the set-up (e.g. FERRY_CRIU). */
export async function readBuildEnv(): Promise<Record<string, string>> {
  const text = await readFile(join(REPO_ROOT, '.build/env'), 'utf8').catch(() => '');
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const match = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!match?.[1]) continue;
    const value = (match[2] ?? '').trim();
    const quoted = /^(['"])(.*)\1$/.exec(value);
    env[match[1]] = quoted?.[2] ?? value;
  }
  return env;
}

interface Exit {
  code: number | undefined;
  signal: string | undefined;
}

/** One agent across restarts: each start() spawns a new process. */
class Agent {
  readonly entries: AgentLogEntry[] = [];
  #netns: string;
  #args: string[];
  #env: Record<string, string>;
  #logFile: string | undefined;
  #readyTimeoutMs: number;
  #pid = 0;
  /** Index in entries of the current process's first line. */
  #firstEntry = 0;
  #exit: Promise<Exit> | undefined;
  #exited: Exit | undefined;
  #listeners = new Set<() => void>();

  constructor(netns: string, args: string[], env: Record<string, string>, logFile: string | undefined, readyTimeoutMs: number) {
    this.#netns = netns;
    this.#args = args;
    this.#env = env;
    this.#logFile = logFile;
    this.#readyTimeoutMs = readyTimeoutMs;
  }

  get pid(): number {
    return this.#pid;
  }

  /** Spawns the agent and resolves once it logs "agent listening". */
  async start(): Promise<void> {
    const subprocess = spawnInNetns(this.#netns, process.execPath, this.#args, { cwd: REPO_ROOT, env: this.#env });
    if (subprocess.pid === undefined) {
      const result = await subprocess;
      throw new LabError('AGENT_EXITED', `agent could not be started: ${result.originalMessage ?? result.message}`);
    }
    this.#pid = subprocess.pid;
    this.#firstEntry = this.entries.length;
    this.#exited = undefined;
    const file = this.#logFile === undefined ? undefined : createWriteStream(this.#logFile, { flags: 'a' });
    file?.on('error', () => undefined); // the file is a convenience; logs() has every line anyway
    const closed = [
      this.#follow(subprocess.stdout, 'stdout', file),
      this.#follow(subprocess.stderr, 'stderr', file),
    ];
    this.#exit = subprocess.then(async (result) => {
      await Promise.all(closed); // every line is in before the exit is seen
      file?.end();
      this.#exited = { code: result.exitCode, signal: result.signal };
      this.#notify();
      return this.#exited;
    });
    try {
      await this.waitForLog((entry) => entry.json?.msg === 'agent listening', this.#readyTimeoutMs);
    } catch (error) {
      await this.kill('SIGKILL');
      throw error;
    }
  }

  #follow(stream: NodeJS.ReadableStream, name: AgentLogEntry['stream'], file: WriteStream | undefined): Promise<void> {
    const lines = createInterface({ input: stream, crlfDelay: Infinity });
    lines.on('line', (line) => {
      this.entries.push({ stream: name, line, json: parseJsonLine(line) });
      file?.write(`${line}\n`);
      this.#notify();
    });
    return new Promise((resolve) => lines.once('close', resolve));
  }

  #notify(): void {
    for (const listener of this.#listeners) listener();
  }

  waitForLog(predicate: (entry: AgentLogEntry) => boolean, timeoutMs = READY_TIMEOUT_MS): Promise<AgentLogEntry> {
    return new Promise((resolve, reject) => {
      let checked = this.#firstEntry;
      const finish = (outcome: () => void) => {
        clearTimeout(timer);
        this.#listeners.delete(check);
        outcome();
      };
      const check = () => {
        for (; checked < this.entries.length; checked++) {
          const entry = this.entries[checked] as AgentLogEntry;
          if (predicate(entry)) return finish(() => resolve(entry));
        }
        if (this.#exited) {
          const { code, signal } = this.#exited;
          const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
          finish(() => reject(new LabError('AGENT_EXITED', `agent ${how}\n${this.#tail()}`)));
        }
      };
      const timer = setTimeout(
        () => finish(() => reject(new LabError('TIMEOUT', `no matching agent log line in ${timeoutMs} ms\n${this.#tail()}`))),
        timeoutMs,
      );
      this.#listeners.add(check);
      check();
    });
  }

  #tail(): string {
    const lines = this.entries.slice(this.#firstEntry).map((entry) => `${entry.stream}: ${entry.line}`);
    return lines.slice(-OUTPUT_TAIL).join('\n') || '(no output)';
  }

  async kill(signal: NodeJS.Signals): Promise<void> {
    if (!this.#exit || this.#exited) return;
    this.#signal(signal);
    await this.#exit;
  }

  async stop(): Promise<void> {
    if (!this.#exit || this.#exited) return;
    this.#signal('SIGTERM');
    const timer = setTimeout(() => this.#signal('SIGKILL'), STOP_GRACE_MS);
    await this.#exit;
    clearTimeout(timer);
  }

  /** The process may already be gone (e.g. removed by cleanup) with its exit not yet seen. */
  #signal(signal: NodeJS.Signals): void {
    try {
      process.kill(this.#pid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
    }
  }
}

function parseJsonLine(line: string): Record<string, unknown> | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    const value: unknown = JSON.parse(line);
    return typeof value === 'object' && value !== null ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}
