#!/usr/bin/env bash
# The README's commands; each runs the idempotent set-up first:
#   bash scripts/run.sh demo  [args]   set-up, then bin/ferry demo
#   bash scripts/run.sh test  [args]   set-up, the layering check (npm run
#                                      lint:layers), then the vitest suite
#                                      (results also in .build/test-results.json)
#   bash scripts/run.sh bench [args]   set-up, then npm run bench
set -euo pipefail
root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$root"

cmd="${1:-}"
case "$cmd" in
  demo|test|bench) shift ;;
  *) echo "usage: bash scripts/run.sh demo|test|bench [args...]" >&2; exit 2 ;;
esac

# The demo does not need the VM test lane (QEMU, a Debian kernel); the tests do.
[[ "$cmd" == demo ]] && export FERRY_VM="${FERRY_VM:-0}"
bash scripts/setup.sh || { echo "run.sh: set-up failed (see above)" >&2; exit 1; }
[[ -f .build/env ]] || { echo "run.sh: set-up wrote no .build/env" >&2; exit 1; }
set -a
. .build/env
set +a
export PATH="$(dirname "$FERRY_NODE"):$PATH"

case "$cmd" in
  demo)
    exec bin/ferry demo "$@" ;;
  test)
    rm -f .build/test-results.json
    # The layering rule first (src/ a leaf, agent/ and coordinator/ apart; see
    # .dependency-cruiser.cjs): a broken rule fails the run before any test.
    npm run --silent lint:layers \
      || { echo "run.sh: an import breaks the layering rule (npm run lint:layers)" >&2; exit 1; }
    status=0
    node_modules/.bin/vitest run --reporter=default --reporter=json \
      --outputFile=.build/test-results.json "$@" || status=$?
    exit "$status" ;;
  bench)
    exec npm run bench -- "$@" ;;
esac
