#!/usr/bin/env bash
# Builds the native pieces into .build/bin/: ferry-helper (the container
# launcher the agent calls), ferry-lazy-guard and ferry-frame-send (post-copy
# guard, native stream sender), fsat.node (the N-API addon through which the
# agent resolves paths inside a rootfs), memload and netload (static test
# workloads, memory and network, that run inside the busybox rootfs).
# Idempotent: a binary newer than its source is left alone.
# Usage: bash scripts/build-native.sh   (from any directory)
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

# build_addon NAME SOURCE: an N-API addon, compiled against the headers
# shipped with the Node binary (node-gyp would download them; N-API is
# ABI-stable, so plain gcc is enough).
build_addon() {
  local name="$1" src="$root/$2"
  local lib="$out/$name" tmp="$out/.$name.tmp.$$"
  if [[ -f "$lib" && "$lib" -nt "$src" ]]; then
    echo "build-native: $name is up to date"
    return 0
  fi
  local node="${FERRY_NODE:-}"
  if [[ -z "$node" && -f "$root/.build/env" ]]; then node="$(. "$root/.build/env" && echo "${FERRY_NODE:-}")"; fi
  local include
  include="$(dirname "${node:-$(command -v node)}")/../include/node"
  if [[ ! -f "$include/node_api.h" ]]; then
    echo "build-native: no Node headers at $include (node_api.h); set FERRY_NODE" >&2
    return 1
  fi
  "$cc" "${cflags[@]}" -shared -fPIC -I"$include" -o "$tmp" "$src"
  mv -f "$tmp" "$lib"
  echo "build-native: built $lib"
}

trap 'rm -f "$out"/.*.tmp.$$' EXIT
build ferry-helper native/ferry-helper.c no
build ferry-lazy-guard native/lazy-guard.c no
build ferry-frame-send native/frame-send.c no
build_addon fsat.node native/fsat.c
build memload test/workloads/memload.c yes
build netload test/workloads/netload.c yes
