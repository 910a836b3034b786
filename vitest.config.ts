import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// Cleans up what interrupted runs left behind; optional (another engineer's file).
const globalSetup = fileURLToPath(new URL('./test/global-setup.ts', import.meta.url));

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Real cgroups, network namespaces and CRIU on a 2-core machine: one file at a time.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    globalSetup: existsSync(globalSetup) ? [globalSetup] : [],
  },
});
