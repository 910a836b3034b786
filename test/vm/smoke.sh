#!/bin/sh
# The VM lane's smoke job (test/vm.test.ts runs it inside the guest):
#   sh test/vm/smoke.sh OUTDIR
# Each check writes NAME.out (its output) and NAME.rc (its exit code) into
# OUTDIR and echoes its output to the console; the test reads the files.
out="$1"
cd "$(dirname "$0")/../.." || exit 1
check() { # check NAME COMMAND...
  name="$1"; shift
  echo "== $name: $*"
  start="$(date +%s)"
  "$@" >"$out/$name.out" 2>&1
  echo $? >"$out/$name.rc"
  cat "$out/$name.out"
  echo "== $name: exit $(cat "$out/$name.rc") in $(( $(date +%s) - start )) s"
}
check doctor bin/ferry doctor --json
check criu-precopy sh test/vm/criu-precopy.sh 32
check demo bin/ferry demo
# what the demo might have left behind
check leftovers sh -c 'ls /run/netns 2>/dev/null; ls -d /sys/fs/cgroup/ferryt-* /tmp/ferryt-* 2>/dev/null; true'
