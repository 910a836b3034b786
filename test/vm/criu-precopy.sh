#!/bin/sh
# CRIU's native incremental pre-copy by hand, without ferry, on memload in
# the busybox rootfs: pre-dump --track-mem twice (the second parented on the
# first), a final dump parented on the second, restore, then memload checks
# its own memory. Needs a kernel with soft-dirty: run it in the VM lane
# (test/vm.test.ts). Prints "criu-precopy: ok" at the end, or fails.
#   sh test/vm/criu-precopy.sh [MIB]
# CRIU_FAULT is left as the caller sets it (ferry uses 130 on Firecracker).
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
mib="${1:-64}"
. "$root/.build/env"
criu="$FERRY_CRIU"
work="$(mktemp -d /tmp/criu-precopy.XXXXXX)"
cg="/sys/fs/cgroup/criu-precopy-$$"
log="$work/rootfs/.ferry/console.log"

say() { echo "criu-precopy: $*"; }
cleanup() {
  [ -f "$cg/cgroup.kill" ] && echo 1 >"$cg/cgroup.kill" 2>/dev/null || true
  [ -n "${restored:-}" ] && kill -9 "$restored" 2>/dev/null || true
  sleep 0.2; rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
# wait_for PATTERN: until memload prints it (emulation makes this slow)
wait_for() {
  i=0
  until grep -q "$1" "$log" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 1200 ] || { say "timed out waiting for '$1'"; cat "$log"; exit 1; }
    sleep 0.1
  done
}
# step NAME ARGS...: one CRIU call, timed, with its log shown on failure
step() {
  name="$1"; shift
  start="$(date +%s%N)"
  if ! timeout 300 "$criu" "$@" -o "$work/$name.log" -v4; then
    say "$name failed"; tail -n 30 "$work/$name.log"; exit 1
  fi
  say "$name: $(( ($(date +%s%N) - start) / 1000000 )) ms"
}
pages() { du -k "$work/$1"/pages-*.img | awk '{ s += $1 } END { printf "%.1f MiB", s / 1024 }'; }

cp -a "$root/.build/rootfs/busybox" "$work/rootfs"
mkdir "$cg"
out="$("$root/.build/bin/ferry-helper" run --rootfs "$work/rootfs" --cgroup-procs "$cg/cgroup.procs" \
  -- /bin/memload --mib "$mib" --dirty-mibps 2)"
pid="$(echo "$out" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')"
[ -n "$pid" ] || { say "ferry-helper: $out"; exit 1; }
wait_for "memload ready"
say "memload $mib MiB, pid $pid; CRIU_FAULT=${CRIU_FAULT:-unset}"

common="-t $pid --freeze-cgroup $cg --manage-cgroups=ignore --track-mem"
mkdir "$work/p1" "$work/p2" "$work/d"
# shellcheck disable=SC2086
step pre-dump-1 pre-dump -D "$work/p1" $common
# shellcheck disable=SC2086
step pre-dump-2 pre-dump -D "$work/p2" --prev-images-dir ../p1 $common
# shellcheck disable=SC2086
step dump dump -D "$work/d" --prev-images-dir ../p2 $common
say "pages written: pre-dump-1 $(pages p1), pre-dump-2 $(pages p2), dump $(pages d)"
while [ -d "/proc/$pid" ]; do sleep 0.1; done # dump kills the original

step restore restore -D "$work/d" --root "$work/rootfs" --restore-detached --pidfile "$work/restored.pid" --manage-cgroups=ignore
restored="$(cat "$work/restored.pid")"
kill -USR2 "$restored"
wait_for "verify "
result="$(grep "verify " "$log" | tail -n 1)"
say "restored pid $restored: $result"
case "$result" in "verify ok"*) ;; *) exit 1 ;; esac
rm -rf "$work"
say ok
