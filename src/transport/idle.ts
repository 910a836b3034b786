import { Transform, type Readable } from 'node:stream';
import { FerryError, type Phase } from '../errors.ts';

/**
 * Passes a stream through, failing it with TIMEOUT when no bytes arrive for
 * `idleMs`: a peer that opens a stream and then goes quiet (a truncated tar
 * whose end never comes) must not hold the receiver for as long as it stays.
 */
export function idleGuard(source: Readable, idleMs: number, what: string, phase: Phase): Readable {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Transform({
    transform(chunk, _encoding, callback) {
      arm();
      callback(null, chunk);
    },
    flush(callback) {
      clearTimeout(timer);
      callback();
    },
    destroy(error, callback) {
      clearTimeout(timer);
      source.destroy();
      callback(error);
    },
  });
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => guard.destroy(new FerryError('TIMEOUT', `${what}: no data for ${idleMs} ms`, { phase })), idleMs);
  };
  arm();
  source.on('error', (error) => guard.destroy(error));
  source.pipe(guard);
  return guard;
}
