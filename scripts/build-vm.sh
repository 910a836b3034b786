#!/usr/bin/env bash
# Builds the VM test lane into .build/vm/ (idempotent; a few ms when built):
# a Debian distribution kernel (the one the archive's linux-image-amd64 points
# to), which has soft-dirty memory tracking (this machine's kernel does not, so
# `criu pre-dump --track-mem` cannot run here), booted by QEMU with software
# emulation (test/vm/lane.ts). See the README's "The VM lane".
#   vmlinux      the uncompressed kernel (QEMU boots it directly: no
#                decompressor to run under emulation)
#   initrd.cpio  busybox, the modules below, test/vm/guest-init.sh as /init
#   stamp        what was built from; a change rebuilds
# Usage: bash scripts/build-vm.sh   (as root, from any directory)
# Environment: FERRY_VM_KERNEL_PKG (a linux-image-* package to use instead of
# the one the linux-image-amd64 metapackage points at).
set -euo pipefail

root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
out="$root/.build/vm"
guest_init="$root/test/vm/guest-init.sh"
busybox="${BUSYBOX:-/usr/bin/busybox}"
export DEBIAN_FRONTEND=noninteractive

# Loaded at boot (guest-init.sh reads etc/modules): virtio and 9p for the
# shared host filesystem, overlay, an entropy source for Node, and what CRIU's
# feature detection and the test hosts need (crc32c_generic before
# libcrc32c, nf_tables, the *_diag socket modules, tun, veth, bridge).
preload=(virtio_pci virtio_rng 9pnet_virtio 9p overlay
  crc32c_generic nf_tables nft_compat tun veth bridge
  unix_diag inet_diag tcp_diag udp_diag raw_diag af_packet_diag netlink_diag)
# Shipped too, for the kernel to autoload on demand (nftables/iptables rules).
autoload_dirs=(kernel/net/netfilter kernel/net/ipv4/netfilter kernel/net/ipv6/netfilter kernel/net/bridge)

log() { printf 'build-vm: %s\n' "$*"; }
die() { printf 'build-vm: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || die "run as root (it installs apt packages and builds device nodes)"
[[ -f "$guest_init" ]] || die "$guest_init is missing"

# --- tools ------------------------------------------------------------------
pkg_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }
missing=()
# xz-utils: busybox's unxz cannot undo the kernel's x86 BCJ filter
for p in qemu-system-x86 cpio kmod xz-utils busybox-static; do pkg_installed "$p" || missing+=("$p"); done
apt_updated=no
apt_update() {
  [[ "$apt_updated" == yes ]] && return
  apt-get update -qq || die "apt-get update failed"
  apt_updated=yes
}
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed; run it by hand to see why"
fi

# --- up to date? --------------------------------------------------------------
# The stamp covers this script and the guest's init; the kernel stays whatever
# was downloaded first (delete .build/vm to take a newer one).
recipe="$(cat "${BASH_SOURCE[0]}" "$guest_init" | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/stamp" && -f "$out/vmlinux" && -f "$out/initrd.cpio" ]] \
  && [[ "$(sed -n 's/^recipe=//p' "$out/stamp")" == "$recipe" ]]; then
  log "up to date ($(sed -n 's/^kernel=//p' "$out/stamp"))"
  exit 0
fi

mkdir -p "$out"
work="$(mktemp -d /tmp/ferry-build-vm.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# --- kernel package ---------------------------------------------------------
deb="$(ls "$out"/linux-image-*.deb 2>/dev/null | head -n1 || true)"
if [[ -z "$deb" ]]; then
  # The metapackage names the current ABI (6.1.0-N); pinned names vanish
  # from the archive when Debian moves on.
  resolve() {
    pkg="${FERRY_VM_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null \
      | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)}"
  }
  download() { [[ -n "$pkg" ]] && (cd "$work/deb" && apt-get download -qq "$pkg"); }
  mkdir -p "$work/deb"
  chown _apt "$work/deb" 2>/dev/null || true # apt downloads as _apt when it can
  chmod 0755 "$work"
  resolve
  # stale package lists: no answer, or a package the archive no longer has
  download || { apt_update; resolve; download; } \
    || die "could not download the kernel package (${pkg:-none found behind linux-image-amd64}); set FERRY_VM_KERNEL_PKG to one that apt-cache search linux-image lists"
  log "downloaded $pkg"
  deb="$(ls "$work"/deb/*.deb | head -n1)"
  mv "$deb" "$out/"
  deb="$out/$(basename "$deb")"
fi
log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$work/pkg"
vmlinuz="$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)"
[[ -f "$vmlinuz" ]] || die "$deb has no boot/vmlinuz-*"
kver="${vmlinuz##*/vmlinuz-}"
config="$work/pkg/boot/config-$kver"
grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$config" || die "kernel $kver lacks CONFIG_MEM_SOFT_DIRTY: the lane would be pointless"

# --- uncompressed kernel ----------------------------------------------------
# As the kernel's scripts/extract-vmlinux does: try every xz header in the
# bzImage until one decompresses to an ELF file (xz complains about the
# trailing bytes; the output is complete).
found=no
while IFS=: read -r offset _; do
  tail -c +"$((offset + 1))" "$vmlinuz" | xz -dc >"$work/vmlinux" 2>/dev/null || true
  if [[ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" == '177ELF' ]]; then found=yes; break; fi
done < <(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz")
[[ "$found" == yes ]] || die "could not extract vmlinux from $vmlinuz (not xz-compressed?)"

# --- modules ----------------------------------------------------------------
kmods="$work/pkg/lib/modules/$kver"
depmod -b "$work/pkg" "$kver"
rd="$work/initrd"
mkdir -p "$rd/lib/modules/$kver" "$rd"/{bin,dev,proc,sys,etc,newroot,lower,job,rw}
copy_module() { # copy_module ABSOLUTE_PATH_IN_PKG
  local rel="${1#"$work/pkg/"}"
  mkdir -p "$rd/$(dirname "$rel")"
  cp -f "$1" "$rd/$rel"
}
for m in "${preload[@]}"; do
  deps="$(modprobe -d "$work/pkg" -S "$kver" --show-depends "$m")" || die "kernel $kver has no module $m"
  while read -r kind path _; do
    [[ "$kind" == insmod ]] && copy_module "$path"
  done <<<"$deps"
done
for d in "${autoload_dirs[@]}"; do
  [[ -d "$kmods/$d" ]] || continue
  while read -r f; do copy_module "$f"; done < <(find "$kmods/$d" -name '*.ko*')
done
cp "$kmods"/modules.{builtin,builtin.modinfo,order} "$rd/lib/modules/$kver/"
depmod -b "$rd" "$kver"
printf '%s\n' "${preload[@]}" >"$rd/etc/modules"

# --- initramfs --------------------------------------------------------------
cp "$busybox" "$rd/bin/busybox"
ldd "$rd/bin/busybox" >/dev/null 2>&1 && die "$busybox is dynamically linked; install busybox-static"
for applet in $("$rd/bin/busybox" --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$rd/bin/$applet"
done
cp "$guest_init" "$rd/init"
chmod 0755 "$rd/init"
# the kernel opens /dev/console for init before anything is mounted
mknod -m 600 "$rd/dev/console" c 5 1
# uncompressed: gunzip under emulation would cost more than reading 15 MB
(cd "$rd" && find . -print0 | cpio --null -o -H newc --quiet) >"$work/initrd.cpio"

mv -f "$work/vmlinux" "$out/vmlinux"
mv -f "$work/initrd.cpio" "$out/initrd.cpio"
printf 'kernel=%s\npackage=%s\nrecipe=%s\n' "$kver" "$(basename "$deb")" "$recipe" >"$out/stamp"
log "built $out (kernel $kver; initrd $(du -h "$out/initrd.cpio" | cut -f1))"
