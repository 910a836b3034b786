#!/bin/sh
# The VM lane's init (scripts/build-vm.sh puts it in the initramfs as /init;
# test/vm/lane.ts boots it). The guest sees the host's filesystem at the same
# paths, so node, CRIU and the repo work as on the host:
#   stage 1 (initramfs): modules; the host's / (9p, read-only) under a tmpfs
#     overlay, fresh tmpfs on /tmp /run /var/tmp /mnt, the repo (9p under its
#     own overlay: the guest can write, the host's copy is never touched),
#     cgroup2 at /sys/fs/cgroup; then switch_root (pivot_root, which
#     containers need, refuses an initramfs root).
#   stage 2 (new root, "$0 stage2"): run the job, print its exit code between
#     markers, power off.
# The job share (9p tag ferryjob) holds vm.conf (FERRY_VM_REPO, FERRY_VM_OUT,
# FERRY_VM_MARK) and job.sh; the guest writes exit-code there.

say() { echo "ferry-vm: $*"; }
halt() { sync; /run/ferry-vm/busybox poweroff -f 2>/dev/null || poweroff -f; }

if [ "$1" = stage2 ]; then
  export PATH=/usr/sbin:/usr/bin:/sbin:/bin
  . /run/ferry-vm/job/vm.conf
  # keep kernel messages out of the job's output; they are printed afterwards
  /run/ferry-vm/busybox dmesg -n 1
  echo "$FERRY_VM_MARK begin"
  # through a pipe, so the job sees no terminal (no colours or progress bars),
  # as under CI
  { /bin/sh /run/ferry-vm/job/job.sh </dev/null 2>&1; echo $? >/run/ferry-vm/rc; } | cat
  rc=$(cat /run/ferry-vm/rc)
  echo "$rc" >/run/ferry-vm/job/exit-code
  echo "$FERRY_VM_MARK exit $rc"
  /run/ferry-vm/busybox dmesg -r | /run/ferry-vm/busybox grep '^<[0-4]>' | sed 's/^/kernel: /' | tail -n 50
  halt
fi

export PATH=/bin
fail() {
  say "FATAL: $*"
  echo "${FERRY_VM_MARK:-ferry-vm} exit 255"
  halt
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
  modprobe "$module" || fail "modprobe $module"
done </etc/modules

# 9p with a large msize and, for the read-only shares, full caching: the
# guest reads thousands of small files (node_modules) through it.
p9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$p9,cache=none" ferryjob /job || fail "no job share"
. /job/vm.conf
mount -t 9p -o "$p9,cache=loose,ro" ferryroot /lower || fail "no root share"
mount -t tmpfs -o mode=0755 ferry-rw /rw
mkdir -p /rw/root/upper /rw/root/work /rw/repo/upper /rw/repo/work /rw/repo/lower
mount -t overlay -o lowerdir=/lower,upperdir=/rw/root/upper,workdir=/rw/root/work ferry-root /newroot \
  || fail "overlay on the root share"

n=/newroot
mount -t tmpfs -o mode=1777 tmpfs $n/tmp
mount -t tmpfs -o mode=1777 tmpfs $n/var/tmp
mount -t tmpfs -o mode=0755 tmpfs $n/run
mount -t tmpfs -o mode=0755 tmpfs $n/mnt # hides whatever the host mounts there
mount --move /proc $n/proc
mount --move /sys $n/sys
mount --move /dev $n/dev
mkdir -p $n/dev/pts $n/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $n/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $n/dev/shm
ln -sf /proc/self/fd $n/dev/fd
ln -sf /proc/self/fd/0 $n/dev/stdin
ln -sf /proc/self/fd/1 $n/dev/stdout
ln -sf /proc/self/fd/2 $n/dev/stderr
# pure cgroup v2, as on current distributions (ferry finds it in mountinfo)
mount -t cgroup2 cgroup2 $n/sys/fs/cgroup || fail "cgroup2"

if [ -n "$FERRY_VM_REPO" ]; then
  mount -t 9p -o "$p9,cache=loose,ro" ferryrepo /rw/repo/lower || fail "no repo share"
  mkdir -p "$n$FERRY_VM_REPO"
  mount -t overlay -o lowerdir=/rw/repo/lower,upperdir=/rw/repo/upper,workdir=/rw/repo/work ferry-repo "$n$FERRY_VM_REPO" \
    || fail "overlay on the repo share"
fi
if [ -n "$FERRY_VM_OUT" ]; then
  mkdir -p "$n$FERRY_VM_OUT"
  mount -t 9p -o "$p9,cache=none" ferryout "$n$FERRY_VM_OUT" || fail "no out share"
fi

# The modules again where the new root's modprobe looks, so the kernel can
# autoload more of them (netfilter) later.
kver="$(uname -r)"
mkdir -p "$n/lib/modules" && cp -a "/lib/modules/$kver" "$n/lib/modules/" || fail "copying modules"
mkdir -p $n/run/ferry-vm/job
cp /bin/busybox /init $n/run/ferry-vm/
mount --move /job $n/run/ferry-vm/job
hostname ferry-vm
ip link set lo up # CRIU's kerndat probes need it
exec switch_root $n /run/ferry-vm/busybox sh /run/ferry-vm/init stage2
