#!/usr/bin/env bash
# Builds the busybox test rootfs at .build/rootfs/busybox/ (idempotent: files
# that are already right are not touched). Contents: /bin/busybox (a copy of
# the host's static busybox) with applet symlinks, /bin/sh, /bin/memload,
# /bin/netload, /bin/counter, minimal /etc/passwd and /etc/group, /tmp,
# /proc, /dev (empty mount points), /www/index.html.
# Usage: bash scripts/build-rootfs.sh   (from any directory)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rootfs="$root/.build/rootfs/busybox"
busybox="${BUSYBOX:-/usr/bin/busybox}"

if [[ ! -x "$busybox" ]]; then
  echo "build-rootfs: $busybox not found (apt-get install busybox-static)" >&2
  exit 1
fi
if ldd "$busybox" >/dev/null 2>&1; then
  echo "build-rootfs: $busybox is dynamically linked; install busybox-static" >&2
  exit 1
fi

bash "$root/scripts/build-native.sh"

# install_file SRC DEST MODE: copy only when the content differs.
install_file() {
  if ! cmp -s "$1" "$2"; then
    cp -f "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
  else
    chmod "$3" "$2"
  fi
}

# write_file DEST MODE < content
write_file() {
  local tmp="$1.new.$$"
  cat >"$tmp"
  install_file "$tmp" "$1" "$2"
  rm -f "$tmp"
}

# link TARGET NAME: a symlink, replaced only when it points elsewhere.
link() {
  if [[ "$(readlink "$2" 2>/dev/null)" != "$1" ]]; then
    rm -f "$2"
    ln -s "$1" "$2"
  fi
}

mkdir -p "$rootfs"
for dir in bin sbin usr/bin usr/sbin etc root www proc dev tmp; do
  mkdir -p "$rootfs/$dir"
done
chmod 0755 "$rootfs"
chmod 0700 "$rootfs/root"
chmod 0555 "$rootfs/proc"
chmod 1777 "$rootfs/tmp"

install_file "$busybox" "$rootfs/bin/busybox" 0755
install_file "$root/.build/bin/memload" "$rootfs/bin/memload" 0755
install_file "$root/.build/bin/netload" "$rootfs/bin/netload" 0755

# Applet links, as `busybox --install -s` would make them, but on the host
# side: every applet at its usual place, pointing at /bin/busybox.
while read -r applet; do
  [[ -z "$applet" || "$applet" == bin/busybox || "$applet" == linuxrc ]] && continue
  target="$rootfs/$applet"
  # never replace a real file (memload, netload, counter, ...) with an applet link
  if [[ -e "$target" && ! -L "$target" ]]; then continue; fi
  link /bin/busybox "$target"
done < <("$busybox" --list-full)
link /bin/busybox "$rootfs/bin/sh"

write_file "$rootfs/etc/passwd" 0644 <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
write_file "$rootfs/etc/group" 0644 <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
write_file "$rootfs/www/index.html" 0644 <<'HTML'
<!doctype html>
<title>ferry</title>
<p>hello from the ferry busybox rootfs</p>
HTML

# /bin/counter: counts from 1 (i starts at 0), one line a tenth of a second,
# to stdout and to /tmp/counter. A restart instead of a restore shows 1 again.
write_file "$rootfs/bin/counter" 0755 <<'COUNTER'
#!/bin/sh
i=0
while true; do
  i=$((i + 1))
  echo "count $i"
  echo "$i" > /tmp/counter
  sleep 0.1
done
COUNTER

echo "build-rootfs: $rootfs is ready"
