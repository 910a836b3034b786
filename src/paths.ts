import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository (or installed package) root, for helpers the set-up built. */
export const projectRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

export function helperPath(): string {
  return process.env.FERRY_HELPER ?? join(projectRoot, '.build', 'bin', 'ferry-helper');
}

export function helperExists(): boolean {
  return existsSync(helperPath());
}
