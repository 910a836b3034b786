import { pino, type Logger } from 'pino';

/** JSON lines on stdout; child loggers add the migrationId to every line of a migration. */
export function createLogger(name: string, level = process.env.FERRY_LOG_LEVEL ?? 'info'): Logger {
  return pino({ name, level, base: { host: name } });
}
