#!/usr/bin/env bash
# The README's commands: `bash scripts/run.sh demo`, `bash scripts/run.sh test`,
# `bash scripts/run.sh bench`. Each runs the (idempotent) set-up first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
set -a
. .build/env
set +a
export PATH="$(dirname "$FERRY_NODE"):$PATH"
case "${1:-}" in
  demo) exec bin/ferry demo "${@:2}" ;;
  test) exec node_modules/.bin/vitest run --reporter=default --reporter=json --outputFile=.build/test-results.json "${@:2}" ;;
  bench) exec "$FERRY_NODE" bench/run.ts "${@:2}" ;;
  *) echo "usage: bash scripts/run.sh demo|test|bench" >&2; exit 2 ;;
esac
