import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository (or installed package) root, for helpers the set-up built. */
export const projectRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

export function helperPath(): string {
  return process.env.FERRY_HELPER ?? join(projectRoot, '.build', 'bin', 'ferry-helper');
}

/** The destination's post-copy guard (native/lazy-guard.c). */
export function lazyGuardPath(): string {
  return join(dirname(helperPath()), 'ferry-lazy-guard');
}

export function helperExists(): boolean {
  return existsSync(helperPath());
}

/**
 * V8 flags for agent processes (bin/ferry passes the same). A 1 MiB young
 * generation frees the buffers of shipped images in scavenges instead of
 * promoting them to the old generation, where they pile up until a full GC:
 * the agents' peak RSS during a 1 GiB migration fell from ~210 to ~135 MiB.
 */
export const agentNodeFlags = ['--max-semi-space-size=1'];

/** The native stream sender (native/frame-send.c). */
export function frameSendPath(): string {
  return join(dirname(helperPath()), 'ferry-frame-send');
}
