#!/usr/bin/env bash
# Builds the native pieces into .build/bin/: ferry-helper (the container
# launcher the agent calls) and memload (a static test workload that runs
# inside the busybox rootfs). Idempotent: a binary newer than its source is
# left alone. Usage: bash scripts/build-native.sh   (from any directory)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.build/bin"
cc="${CC:-gcc}"
cflags=(-O2 -Wall -Wextra -std=gnu11)
mkdir -p "$out"

# build NAME SOURCE STATIC_REQUIRED
build() {
  local name="$1" src="$root/$2" static_required="$3"
  local bin="$out/$name" tmp="$out/.$name.tmp.$$"
  if [[ -x "$bin" && "$bin" -nt "$src" ]]; then
    echo "build-native: $name is up to date"
    return 0
  fi
  if "$cc" "${cflags[@]}" -static -o "$tmp" "$src"; then
    :
  elif [[ "$static_required" == no ]]; then
    echo "build-native: static link of $name failed; linking dynamically" >&2
    "$cc" "${cflags[@]}" -o "$tmp" "$src"
  else
    rm -f "$tmp"
    echo "build-native: $name must be linked statically (it runs inside a rootfs without libc)" >&2
    return 1
  fi
  mv -f "$tmp" "$bin"
  echo "build-native: built $bin"
}

trap 'rm -f "$out"/.*.tmp.$$' EXIT
build ferry-helper native/ferry-helper.c no
build memload test/workloads/memload.c yes
