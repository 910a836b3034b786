/*
 * ferry-helper: starts a container process tree that CRIU can dump and restore.
 *
 *   ferry-helper run --rootfs DIR --cgroup-procs FILE [--hostname NAME] [--cwd DIR]
 *                    [--env K=V]... [--log PATH] [--netns | --netns-path PATH]
 *                    -- CMD [ARGS...]
 *   ferry-helper arp-announce --netns PATH --dev IFNAME --ip A.B.C.D [--count N]
 *   ferry-helper arp-probe [--netns PATH] --dev IFNAME --ip A.B.C.D [--timeout-ms T]
 *   ferry-helper socket-probe
 *   ferry-helper criu-exec [--kdat CACHE] [--cgroup-procs FILE] -- CRIU ARGS...
 *   ferry-helper version
 *
 * The parent unshares the mount, PID, UTS and IPC (and optionally network)
 * namespaces, or joins an existing network namespace with --netns-path, and
 * forks; the child is PID 1 of the new PID namespace. The child
 * joins the cgroup, makes its mounts private, bind-mounts the rootfs onto
 * itself, mounts /proc and a tmpfs /dev inside, pivots into the rootfs, reopens
 * stdio inside the new root, closes every other fd, becomes a session leader,
 * enters the boundary OCI runtimes give a container by default (see
 * enter_boundary) and execs the command. Failures travel back to the parent
 * over a CLOEXEC pipe ("CODE message\n"); EOF without data means execve
 * succeeded.
 *
 * Output (stdout, one line of JSON):
 *   {"pid":HOSTPID}                        exit 0
 *   {"error":"CODE","message":"..."}       exit 1
 * Usage errors: message on stderr, exit 2.
 *
 * arp-announce, arp-probe and socket-probe are described where they are
 * implemented; they reply in the same way (one JSON line, exit 0 or 1).
 *
 * Only libc; build with: gcc -O2 -static -o ferry-helper ferry-helper.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/if_ether.h>
#include <netinet/in.h>
#include <netpacket/packet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HELPER_VERSION "1"
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define DEFAULT_LOG ".ferry/console.log"
#define MAX_ENV 1024

struct options {
	const char *rootfs;
	const char *cgroup_procs;
	const char *hostname;
	const char *cwd;
	const char *log;
	int netns;
	const char *netns_path; /* join this network namespace instead of --netns */
	char *env[MAX_ENV + 2];
	int nenv;
	char **argv; /* command and arguments, NULL-terminated */
};

static int sync_fd = -1;

/* ---- output helpers (parent) ---- */

static void json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		switch (*p) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if (*p < 0x20)
				fprintf(f, "\\u%04x", *p);
			else
				fputc(*p, f);
		}
	}
	fputc('"', f);
}

static int reply_error(const char *code, const char *message)
{
	fputs("{\"error\":", stdout);
	json_string(stdout, code);
	fputs(",\"message\":", stdout);
	json_string(stdout, message);
	fputs("}\n", stdout);
	fflush(stdout);
	return 1;
}

static void usage_exit(const char *fmt, ...)
{
	va_list ap;
	fputs("ferry-helper: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\nusage: ferry-helper run --rootfs DIR --cgroup-procs FILE [--hostname NAME] [--cwd DIR]\n"
	      "                        [--env K=V]... [--log PATH] [--netns | --netns-path PATH]\n"
	      "                        -- CMD [ARGS...]\n"
	      "       ferry-helper arp-announce --netns PATH --dev IFNAME --ip A.B.C.D [--count N]\n"
	      "       ferry-helper arp-probe [--netns PATH] --dev IFNAME --ip A.B.C.D [--timeout-ms T]\n"
	      "       ferry-helper socket-probe\n"
	      "       ferry-helper criu-exec [--kdat CACHE] [--cgroup-procs FILE] -- CRIU ARGS...\n"
	      "       ferry-helper version\n",
	      stderr);
	exit(2);
}

/* ---- child failure reporting ---- */

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

/* Reports "CODE step: strerror(err)" to the parent and exits. */
static void child_fail(const char *code, int err, const char *fmt, ...)
{
	char msg[1024];
	int off = snprintf(msg, sizeof(msg), "%s ", code);
	va_list ap;
	va_start(ap, fmt);
	off += vsnprintf(msg + off, sizeof(msg) - (size_t)off, fmt, ap);
	va_end(ap);
	if (off > (int)sizeof(msg) - 1)
		off = (int)sizeof(msg) - 1;
	if (err)
		off += snprintf(msg + off, sizeof(msg) - (size_t)off, ": %s", strerror(err));
	if (off > (int)sizeof(msg) - 2)
		off = (int)sizeof(msg) - 2;
	msg[off++] = '\n';
	write_all(sync_fd, msg, (size_t)off);
	_exit(127);
}

/* ---- child setup steps ---- */

static void join_cgroup(const char *procs)
{
	int fd = open(procs, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		child_fail("CGROUP_JOIN_FAILED", errno, "open %s", procs);
	if (write(fd, "0", 1) != 1) {
		int err = errno;
		close(fd);
		child_fail("CGROUP_JOIN_FAILED", err, "write 0 to %s", procs);
	}
	close(fd);
}

static void ensure_dir(const char *path, mode_t mode)
{
	struct stat st;
	if (mkdir(path, mode) == 0)
		return;
	if (errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))
		return;
	child_fail("SETUP_FAILED", errno ? errno : ENOTDIR, "mkdir %s", path);
}

/* mkdir -p of every parent of path (path itself is a file). */
static void ensure_parents(const char *path)
{
	char buf[PATH_MAX];
	if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
		child_fail("SETUP_FAILED", ENAMETOOLONG, "log path %s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (buf[0] != '\0')
			ensure_dir(buf, 0755);
		*p = '/';
		while (p[1] == '/')
			p++;
	}
}

static void setup_dev(const char *rootfs)
{
	static const struct {
		const char *name;
		unsigned maj, min;
	} nodes[] = {
		{ "null", 1, 3 }, { "zero", 1, 5 }, { "full", 1, 7 },
		{ "random", 1, 8 }, { "urandom", 1, 9 }, { "tty", 5, 0 },
	};
	static const struct {
		const char *name, *target;
	} links[] = {
		{ "fd", "/proc/self/fd" },
		{ "stdin", "/proc/self/fd/0" },
		{ "stdout", "/proc/self/fd/1" },
		{ "stderr", "/proc/self/fd/2" },
	};
	char dev[PATH_MAX], path[PATH_MAX + 16];

	snprintf(dev, sizeof(dev), "%s/dev", rootfs);
	ensure_dir(dev, 0755);
	if (mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m,nr_inodes=64k") < 0)
		child_fail("SETUP_FAILED", errno, "mount tmpfs on %s", dev);
	for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", dev, nodes[i].name);
		if (mknod(path, S_IFCHR | 0666, makedev(nodes[i].maj, nodes[i].min)) < 0)
			child_fail("SETUP_FAILED", errno, "mknod %s", path);
		if (chmod(path, 0666) < 0) /* undo the umask */
			child_fail("SETUP_FAILED", errno, "chmod %s", path);
	}
	for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", dev, links[i].name);
		if (symlink(links[i].target, path) < 0)
			child_fail("SETUP_FAILED", errno, "symlink %s", path);
	}
	/* CAP_MKNOD stays (OCI default): a read-only /dev and a nodev rootfs keep
	 * any node the container makes from opening a device. */
	if (mount(NULL, dev, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m,nr_inodes=64k") < 0)
		child_fail("SETUP_FAILED", errno, "remount %s read-only", dev);
}

/* Adds MS_NODEV to the bind mount at path, keeping the flags it has. */
static int remount_nodev(const char *path)
{
	struct statvfs sv;
	unsigned long flags = MS_BIND | MS_REMOUNT | MS_NODEV;
	if (statvfs(path, &sv) < 0)
		return -1;
	if (sv.f_flag & ST_RDONLY)
		flags |= MS_RDONLY;
	if (sv.f_flag & ST_NOSUID)
		flags |= MS_NOSUID;
	if (sv.f_flag & ST_NOEXEC)
		flags |= MS_NOEXEC;
	return mount(NULL, path, NULL, flags, NULL);
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		child_fail("SETUP_FAILED", errno, "socket for lo");
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		child_fail("SETUP_FAILED", errno, "SIOCGIFFLAGS lo");
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		child_fail("SETUP_FAILED", errno, "SIOCSIFFLAGS lo");
	close(s);
}

static void enter_root(const char *rootfs)
{
	char proc[PATH_MAX];

	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		child_fail("SETUP_FAILED", errno, "make / rprivate");
	if (mount(rootfs, rootfs, NULL, MS_BIND | MS_REC, NULL) < 0)
		child_fail("SETUP_FAILED", errno, "bind-mount %s", rootfs);
	if (remount_nodev(rootfs) < 0)
		child_fail("SETUP_FAILED", errno, "remount %s nodev", rootfs);

	snprintf(proc, sizeof(proc), "%s/proc", rootfs);
	ensure_dir(proc, 0555);
	if (mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		child_fail("SETUP_FAILED", errno, "mount proc on %s", proc);

	setup_dev(rootfs);

	if (chdir(rootfs) < 0)
		child_fail("SETUP_FAILED", errno, "chdir %s", rootfs);
	if (syscall(SYS_pivot_root, ".", ".") < 0)
		child_fail("SETUP_FAILED", errno, "pivot_root %s", rootfs);
	/* The old root is now stacked on top of the new one: detach it. */
	if (umount2(".", MNT_DETACH) < 0)
		child_fail("SETUP_FAILED", errno, "detach old root");
	if (chdir("/") < 0)
		child_fail("SETUP_FAILED", errno, "chdir /");
}

/* ---- the container boundary (what runc and containerd do by default) ---- */

/* The OCI default capability set: everything else leaves the bounding set. */
static const int oci_caps[] = {
	CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FSETID, CAP_FOWNER, CAP_MKNOD,
	CAP_NET_RAW, CAP_SETGID, CAP_SETUID, CAP_SETFCAP, CAP_SETPCAP,
	CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT, CAP_KILL, CAP_AUDIT_WRITE,
};

static int is_oci_cap(int cap)
{
	for (size_t i = 0; i < sizeof(oci_caps) / sizeof(oci_caps[0]); i++)
		if (oci_caps[i] == cap)
			return 1;
	return 0;
}

/* Needs CAP_SETPCAP, so it runs before capset drops anything. */
static void drop_bounding_set(void)
{
	for (int cap = 0; cap <= 63; cap++) {
		if (is_oci_cap(cap))
			continue;
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
			continue;
		if (errno == EINVAL) /* past the kernel's last capability */
			break;
		child_fail("SETUP_FAILED", errno, "drop capability %d from the bounding set", cap);
	}
}

/* Effective and permitted become the OCI set; inheritable stays empty
 * (as in containerd and moby since CVE-2022-24769), ambient is cleared. */
static void set_capabilities(void)
{
	struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof(data));
	for (size_t i = 0; i < sizeof(oci_caps) / sizeof(oci_caps[0]); i++) {
		int cap = oci_caps[i];
		data[cap / 32].effective |= 1U << (cap % 32);
		data[cap / 32].permitted |= 1U << (cap % 32);
	}
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		child_fail("SETUP_FAILED", errno, "clear ambient capabilities");
	if (syscall(SYS_capset, &header, data) < 0)
		child_fail("SETUP_FAILED", errno, "capset");
}

/* runc's default masked paths: files get /dev/null, directories an empty read-only tmpfs. */
static void mask_paths(void)
{
	static const char *paths[] = {
		"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
		"/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
		"/proc/sched_debug", "/proc/scsi", "/sys/firmware",
		"/sys/devices/virtual/powercap",
	};
	struct stat st;
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		const char *path = paths[i];
		if (lstat(path, &st) < 0)
			continue; /* not on this kernel, or no /sys */
		int r = S_ISDIR(st.st_mode)
			? mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0555")
			: mount("/dev/null", path, NULL, MS_BIND, NULL);
		if (r < 0)
			child_fail("SETUP_FAILED", errno, "mask %s", path);
	}
}

/* runc's default read-only paths: bind-mounted onto themselves, then remounted read-only. */
static void readonly_paths(void)
{
	static const char *paths[] = {
		"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
	};
	const unsigned long flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC;
	struct stat st;
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		const char *path = paths[i];
		if (lstat(path, &st) < 0)
			continue;
		if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0 || mount(NULL, path, NULL, flags, NULL) < 0)
			child_fail("SETUP_FAILED", errno, "make %s read-only", path);
	}
}

/* Last step before exec: after it the container cannot mount, load modules,
 * raise its capabilities or gain any through setuid files. */
static void enter_boundary(void)
{
	mask_paths();
	readonly_paths();
	drop_bounding_set();
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		child_fail("SETUP_FAILED", errno, "no_new_privs");
	set_capabilities();
}

static void setup_stdio(const char *log)
{
	char path[PATH_MAX];
	int fd;

	while (*log == '/')
		log++;
	if (*log == '\0')
		child_fail("SETUP_FAILED", EINVAL, "log path");
	if (snprintf(path, sizeof(path), "/%s", log) >= (int)sizeof(path))
		child_fail("SETUP_FAILED", ENAMETOOLONG, "log path");

	fd = open("/dev/null", O_RDONLY);
	if (fd < 0)
		child_fail("SETUP_FAILED", errno, "open /dev/null");
	if (fd != 0) {
		if (dup2(fd, 0) < 0)
			child_fail("SETUP_FAILED", errno, "dup2 stdin");
		close(fd);
	}

	ensure_parents(path);
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0640);
	if (fd < 0)
		child_fail("SETUP_FAILED", errno, "open log %s", path);
	if (dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
		child_fail("SETUP_FAILED", errno, "dup2 log");
	if (fd > 2)
		close(fd);
}

/* Closes every fd above 2 except the sync pipe (which is CLOEXEC). */
static void close_other_fds(void)
{
	if (sync_fd != 3) {
		if (dup3(sync_fd, 3, O_CLOEXEC) < 0)
			child_fail("SETUP_FAILED", errno, "dup3 sync pipe");
		sync_fd = 3;
	}
	if (syscall(SYS_close_range, 4U, ~0U, 0U) == 0)
		return;
	long max = sysconf(_SC_OPEN_MAX);
	if (max < 0 || max > 1 << 20)
		max = 1 << 20;
	for (long fd = 4; fd < max; fd++)
		close((int)fd);
}

static void reset_signals(void)
{
	sigset_t none;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_DFL;
	for (int sig = 1; sig < NSIG; sig++)
		sigaction(sig, &sa, NULL); /* fails harmlessly for KILL/STOP and glibc-reserved ones */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static const char *env_path(char **env)
{
	for (int i = 0; env[i]; i++)
		if (strncmp(env[i], "PATH=", 5) == 0)
			return env[i] + 5;
	return "";
}

static void exec_command(char **argv, char **env)
{
	const char *cmd = argv[0];

	if (strchr(cmd, '/')) {
		execve(cmd, argv, env);
		int err = errno;
		child_fail(err == ENOENT ? "COMMAND_NOT_FOUND" : "EXEC_FAILED", err, "execve %s", cmd);
	}

	const char *path = env_path(env);
	int seen_eacces = 0, last_err = ENOENT;
	char full[PATH_MAX];
	const char *p = path;
	for (;;) {
		const char *end = strchrnul(p, ':');
		size_t len = (size_t)(end - p);
		/* An empty PATH entry means the current directory. */
		if (len == 0)
			snprintf(full, sizeof(full), "%s", cmd);
		else
			snprintf(full, sizeof(full), "%.*s/%s", (int)len, p, cmd);
		execve(full, argv, env);
		switch (errno) {
		case ENOENT:
		case ENOTDIR:
		case ENAMETOOLONG:
		case ELOOP:
			break;
		case EACCES:
			seen_eacces = 1;
			last_err = EACCES;
			break;
		default:
			child_fail("EXEC_FAILED", errno, "execve %s", full);
		}
		if (*end == '\0')
			break;
		p = end + 1;
	}
	if (seen_eacces)
		child_fail("EXEC_FAILED", last_err, "execve %s", cmd);
	child_fail("COMMAND_NOT_FOUND", ENOENT, "%s not found on PATH %s", cmd, path);
}

static void child_main(const struct options *o)
{
	/* First of all, so that everything the container does is accounted there. */
	join_cgroup(o->cgroup_procs);
	reset_signals();
	if (o->netns || o->netns_path)
		loopback_up(); /* a no-op when the joined namespace has lo up already */
	enter_root(o->rootfs);
	if (o->hostname && sethostname(o->hostname, strlen(o->hostname)) < 0)
		child_fail("SETUP_FAILED", errno, "sethostname %s", o->hostname);
	setup_stdio(o->log);
	close_other_fds();
	if (setsid() < 0)
		child_fail("SETUP_FAILED", errno, "setsid");
	if (chdir(o->cwd) < 0)
		child_fail("SETUP_FAILED", errno, "chdir %s", o->cwd);
	enter_boundary();
	exec_command(o->argv, (char **)o->env);
}

/* ---- parent ---- */

static const char *error_codes[] = {
	"COMMAND_NOT_FOUND", "CGROUP_JOIN_FAILED", "SETUP_FAILED", "EXEC_FAILED", NULL,
};

/* Reads the first bytes of DIR/NAME, where DIR is the directory of procs. */
static int read_sibling(const char *procs, const char *name, char *buf, size_t size)
{
	char path[PATH_MAX];
	const char *slash = strrchr(procs, '/');
	int dirlen = slash ? (int)(slash - procs) : 1;
	const char *dir = slash ? procs : ".";
	if (snprintf(path, sizeof(path), "%.*s/%s", dirlen, dir, name) >= (int)sizeof(path))
		return -1;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	return 0;
}

/* cgroup v2: cgroup.freeze is 1; v1 freezer: freezer.state is not THAWED. */
static int cgroup_frozen(const char *procs)
{
	char buf[64];
	if (read_sibling(procs, "cgroup.freeze", buf, sizeof(buf)) == 0)
		return buf[0] == '1';
	if (read_sibling(procs, "freezer.state", buf, sizeof(buf)) == 0)
		return strncmp(buf, "THAWED", 6) != 0;
	return 0;
}

/* Joins the network namespace at path; the fd is CLOEXEC so nothing we exec keeps it. */
static int join_netns(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int r = setns(fd, CLONE_NEWNET);
	int err = errno;
	close(fd);
	errno = err;
	return r;
}

/* Reads what the child wrote on the sync pipe until EOF; returns its length
 * without trailing newlines (0: the child reached its goal). */
static size_t read_report(int fd, char *msg, size_t size)
{
	size_t len = 0;
	for (;;) {
		ssize_t n = read(fd, msg + len, size - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
		if (len == size - 1)
			break;
	}
	msg[len] = '\0';
	while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == '\r'))
		msg[--len] = '\0';
	return len;
}

static int run(struct options *o)
{
	struct stat st;
	char rootfs[PATH_MAX];
	char msg[2048];
	int fds[2];

	if (stat(o->rootfs, &st) < 0) {
		snprintf(msg, sizeof(msg), "rootfs %s: %s", o->rootfs, strerror(errno));
		return reply_error("ROOTFS_MISSING", msg);
	}
	if (!S_ISDIR(st.st_mode)) {
		snprintf(msg, sizeof(msg), "rootfs %s: %s", o->rootfs, strerror(ENOTDIR));
		return reply_error("ROOTFS_MISSING", msg);
	}
	/* pivot_root needs the real mount point, not a path through symlinks. */
	if (!realpath(o->rootfs, rootfs)) {
		snprintf(msg, sizeof(msg), "rootfs %s: %s", o->rootfs, strerror(errno));
		return reply_error("ROOTFS_MISSING", msg);
	}
	o->rootfs = rootfs;

	/* A task that joins a frozen cgroup freezes at once and the parent
	 * would wait for it forever: refuse early. */
	if (cgroup_frozen(o->cgroup_procs)) {
		snprintf(msg, sizeof(msg), "cgroup of %s is frozen", o->cgroup_procs);
		return reply_error("CGROUP_JOIN_FAILED", msg);
	}

	if (pipe2(fds, O_CLOEXEC) < 0) {
		snprintf(msg, sizeof(msg), "pipe: %s", strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}

	/* Before the unshare, so the forked init is born in the joined namespace. */
	if (o->netns_path && join_netns(o->netns_path) < 0) {
		snprintf(msg, sizeof(msg), "netns %s: %s", o->netns_path, strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}

	int flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC;
	if (o->netns)
		flags |= CLONE_NEWNET;
	if (unshare(flags) < 0) {
		snprintf(msg, sizeof(msg), "unshare: %s", strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}

	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0) {
		snprintf(msg, sizeof(msg), "fork: %s", strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}
	if (pid == 0) {
		close(fds[0]);
		sync_fd = fds[1];
		child_main(o);
		_exit(127); /* not reached */
	}

	close(fds[1]);
	size_t len = read_report(fds[0], msg, sizeof(msg));
	close(fds[0]);

	if (len == 0) {
		printf("{\"pid\":%d}\n", (int)pid);
		fflush(stdout);
		return 0;
	}

	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;

	const char *code = "SETUP_FAILED";
	const char *text = msg;
	char *space = strchr(msg, ' ');
	if (space) {
		*space = '\0';
		for (int i = 0; error_codes[i]; i++)
			if (strcmp(msg, error_codes[i]) == 0) {
				code = error_codes[i];
				text = space + 1;
				break;
			}
		if (text == msg)
			*space = ' ';
	}
	return reply_error(code, text);
}

static const char *need_value(int argc, char **argv, int *i)
{
	if (*i + 1 >= argc)
		usage_exit("%s needs a value", argv[*i]);
	return argv[++*i];
}

/*
 * criu-exec [--kdat CACHE] [--cgroup-procs FILE] -- CRIU ARGS...
 * Runs CRIU with two preparations in one exec instead of a shell pipeline:
 * with --kdat, a private mount namespace whose /run is a small tmpfs holding
 * a copy of CRIU's kernel-probe cache (CRIU keeps that cache only on tmpfs);
 * with --cgroup-procs, the process joins that cgroup first, so tasks CRIU
 * restores are born in it. When CRIU's arguments name a --root (a restore),
 * that directory becomes a nodev mount in CRIU's mount namespace: CRIU
 * before 4.2 (criu#2632) does not restore the root mount's flags, but its
 * bind mount of --root copies them from there. Exits 126 with a message when
 * a step fails.
 */
static void copy_file(const char *from, const char *to)
{
	char buf[65536];
	int in = open(from, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		return; /* no cache yet: CRIU probes as usual */
	int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (out < 0) {
		close(in);
		return;
	}
	ssize_t n;
	while ((n = read(in, buf, sizeof(buf))) > 0)
		write_all(out, buf, (size_t)n);
	close(in);
	close(out);
}

/* The value of CRIU's --root among its arguments, or NULL. */
static const char *criu_root(char **args)
{
	for (int i = 0; args[i]; i++) {
		if (strcmp(args[i], "--root") == 0)
			return args[i + 1];
		if (strncmp(args[i], "--root=", 7) == 0)
			return args[i] + 7;
	}
	return NULL;
}

static int private_mounts(void)
{
	return unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ? -1 : 0;
}

/* Binds root onto itself with nodev, as ferry-helper run mounts a rootfs. */
static int nodev_root(const char *root)
{
	return mount(root, root, NULL, MS_BIND | MS_REC, NULL) < 0 ? -1 : remount_nodev(root);
}

static int criu_exec(int argc, char **argv)
{
	const char *kdat = NULL, *procs = NULL;
	int i;
	for (i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0) {
			i++;
			break;
		} else if (strcmp(argv[i], "--kdat") == 0) {
			kdat = need_value(argc, argv, &i);
		} else if (strcmp(argv[i], "--cgroup-procs") == 0) {
			procs = need_value(argc, argv, &i);
		} else {
			usage_exit("criu-exec: unknown option %s", argv[i]);
		}
	}
	if (i >= argc)
		usage_exit("criu-exec: missing command");
	const char *root = criu_root(argv + i);
	if ((kdat || root) && private_mounts() < 0) {
		fprintf(stderr, "ferry-helper criu-exec: private mount namespace: %s\n", strerror(errno));
		return 126;
	}
	if (root && nodev_root(root) < 0) {
		fprintf(stderr, "ferry-helper criu-exec: nodev %s: %s\n", root, strerror(errno));
		return 126;
	}
	if (kdat) {
		if (mount("criu-kdat", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755") < 0) {
			fprintf(stderr, "ferry-helper criu-exec: private /run: %s\n", strerror(errno));
			return 126;
		}
		copy_file(kdat, "/run/criu.kdat");
	}
	if (procs) {
		int fd = open(procs, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "0", 1) != 1) {
			fprintf(stderr, "ferry-helper criu-exec: join %s: %s\n", procs, strerror(errno));
			return 126;
		}
		close(fd);
	}
	execv(argv[i], argv + i);
	fprintf(stderr, "ferry-helper criu-exec: exec %s: %s\n", argv[i], strerror(errno));
	return 126;
}

/* ---- ARP: RFC 5227 announcements and probes ---- */

#define MAX_MACS 8

struct arp_dev {
	int fd; /* AF_PACKET/SOCK_DGRAM bound to the device: the kernel adds the Ethernet header */
	int ifindex;
	unsigned char mac[ETH_ALEN];
};

struct arp_args {
	const char *netns, *dev;
	struct in_addr ip;
	long count, timeout_ms;
};

static void format_mac(const unsigned char *mac, char *out)
{
	snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
}

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Opens an ARP socket on dev; on failure fills msg and returns -1. */
static int open_arp_dev(const char *dev, struct arp_dev *a, char *msg, size_t size)
{
	struct ifreq ifr;
	struct sockaddr_ll sll;

	/* Protocol 0 receives nothing until bind, so no frame from another
	 * device can be queued in between. */
	a->fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (a->fd < 0) {
		snprintf(msg, size, "packet socket: %s", strerror(errno));
		return -1;
	}
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
	if (ioctl(a->fd, SIOCGIFINDEX, &ifr) < 0) {
		snprintf(msg, size, "dev %s: %s", dev, strerror(errno));
		goto fail;
	}
	a->ifindex = ifr.ifr_ifindex;
	if (ioctl(a->fd, SIOCGIFHWADDR, &ifr) < 0) {
		snprintf(msg, size, "dev %s: SIOCGIFHWADDR: %s", dev, strerror(errno));
		goto fail;
	}
	if (ifr.ifr_hwaddr.sa_family != ARPHRD_ETHER) {
		snprintf(msg, size, "dev %s is not an Ethernet device (hardware type %d)", dev, ifr.ifr_hwaddr.sa_family);
		goto fail;
	}
	memcpy(a->mac, ifr.ifr_hwaddr.sa_data, ETH_ALEN);
	if (ioctl(a->fd, SIOCGIFFLAGS, &ifr) < 0) {
		snprintf(msg, size, "dev %s: SIOCGIFFLAGS: %s", dev, strerror(errno));
		goto fail;
	}
	if (!(ifr.ifr_flags & IFF_UP)) {
		snprintf(msg, size, "dev %s is down", dev);
		goto fail;
	}
	memset(&sll, 0, sizeof(sll));
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(ETH_P_ARP);
	sll.sll_ifindex = a->ifindex;
	if (bind(a->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
		snprintf(msg, size, "bind packet socket to %s: %s", dev, strerror(errno));
		goto fail;
	}
	return 0;
fail:
	close(a->fd);
	a->fd = -1;
	return -1;
}

/* Broadcasts an ARP request "who has tip? tell sip", with an all-zero target MAC. */
static int send_arp_request(const struct arp_dev *a, struct in_addr sip, struct in_addr tip)
{
	struct ether_arp p;
	struct sockaddr_ll to;

	memset(&p, 0, sizeof(p));
	p.arp_hrd = htons(ARPHRD_ETHER);
	p.arp_pro = htons(ETHERTYPE_IP);
	p.arp_hln = ETH_ALEN;
	p.arp_pln = 4;
	p.arp_op = htons(ARPOP_REQUEST);
	memcpy(p.arp_sha, a->mac, ETH_ALEN);
	memcpy(p.arp_spa, &sip, 4);
	memcpy(p.arp_tpa, &tip, 4);

	memset(&to, 0, sizeof(to));
	to.sll_family = AF_PACKET;
	to.sll_protocol = htons(ETH_P_ARP);
	to.sll_ifindex = a->ifindex;
	to.sll_halen = ETH_ALEN;
	memset(to.sll_addr, 0xff, ETH_ALEN);
	return sendto(a->fd, &p, sizeof(p), 0, (struct sockaddr *)&to, sizeof(to)) == (ssize_t)sizeof(p) ? 0 : -1;
}

static long parse_long(const char *opt, const char *s, long min, long max)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		usage_exit("%s needs a number from %ld to %ld, got %s", opt, min, max, s);
	return v;
}

static void parse_arp_args(int argc, char **argv, struct arp_args *a, int probe)
{
	const char *ip = NULL;
	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--netns") == 0) {
			a->netns = need_value(argc, argv, &i);
		} else if (strcmp(argv[i], "--dev") == 0) {
			a->dev = need_value(argc, argv, &i);
		} else if (strcmp(argv[i], "--ip") == 0) {
			ip = need_value(argc, argv, &i);
		} else if (!probe && strcmp(argv[i], "--count") == 0) {
			a->count = parse_long("--count", need_value(argc, argv, &i), 1, 100);
		} else if (probe && strcmp(argv[i], "--timeout-ms") == 0) {
			a->timeout_ms = parse_long("--timeout-ms", need_value(argc, argv, &i), 1, 60000);
		} else {
			usage_exit("%s: unknown option %s", argv[1], argv[i]);
		}
	}
	if (!probe && !a->netns)
		usage_exit("%s: --netns is required", argv[1]);
	if (!a->dev)
		usage_exit("%s: --dev is required", argv[1]);
	if (strlen(a->dev) >= IFNAMSIZ)
		usage_exit("%s: --dev %s is longer than %d characters", argv[1], a->dev, IFNAMSIZ - 1);
	if (!ip)
		usage_exit("%s: --ip is required", argv[1]);
	if (inet_pton(AF_INET, ip, &a->ip) != 1)
		usage_exit("%s: --ip needs an IPv4 address, got %s", argv[1], ip);
}

/*
 * arp-announce --netns PATH --dev IFNAME --ip A.B.C.D [--count N]
 * After a restore on another host: N (default 3) gratuitous ARP requests,
 * 100 ms apart, with sender IP = target IP = A.B.C.D and IFNAME's MAC
 * (RFC 5227 announcements), so switches and peers move the address to the
 * new port at once instead of when their caches expire.
 *   {"sent":N,"mac":"aa:bb:cc:dd:ee:ff"}   exit 0
 */
static int arp_announce(int argc, char **argv)
{
	struct arp_args a = { .count = 3 };
	struct arp_dev d;
	char msg[512], mac[18];

	parse_arp_args(argc, argv, &a, 0);
	if (join_netns(a.netns) < 0) {
		snprintf(msg, sizeof(msg), "netns %s: %s", a.netns, strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}
	if (open_arp_dev(a.dev, &d, msg, sizeof(msg)) < 0)
		return reply_error("SETUP_FAILED", msg);
	for (long n = 0; n < a.count; n++) {
		if (n > 0)
			sleep_ms(100);
		if (send_arp_request(&d, a.ip, a.ip) < 0) {
			snprintf(msg, sizeof(msg), "send ARP announcement %ld on %s: %s", n + 1, a.dev, strerror(errno));
			close(d.fd);
			return reply_error("SETUP_FAILED", msg);
		}
	}
	close(d.fd);
	format_mac(d.mac, mac);
	printf("{\"sent\":%ld,\"mac\":\"%s\"}\n", a.count, mac);
	fflush(stdout);
	return 0;
}

/* Whether a received ARP frame says that someone other than us holds ip. */
static int arp_claims(const struct arp_dev *d, const unsigned char *buf, ssize_t len, struct in_addr ip)
{
	const struct ether_arp *p = (const struct ether_arp *)buf;
	if (len < (ssize_t)sizeof(*p))
		return 0;
	if (p->arp_hrd != htons(ARPHRD_ETHER) || p->arp_pro != htons(ETHERTYPE_IP) ||
	    p->arp_hln != ETH_ALEN || p->arp_pln != 4)
		return 0;
	if (p->arp_op != htons(ARPOP_REQUEST) && p->arp_op != htons(ARPOP_REPLY))
		return 0;
	if (memcmp(p->arp_spa, &ip, 4) != 0)
		return 0;
	return memcmp(p->arp_sha, d->mac, ETH_ALEN) != 0;
}

/*
 * arp-probe [--netns PATH] --dev IFNAME --ip A.B.C.D [--timeout-ms T]
 * Before an address is taken on a segment: two RFC 5227 probes ("who has
 * A.B.C.D? tell 0.0.0.0", IFNAME's MAC), 200 ms apart (only one when T is
 * shorter), then listens until T ms (default 1000) after the first for ARP
 * requests or replies whose sender IP is A.B.C.D. The sender IP 0.0.0.0
 * needs no address on IFNAME, so it works on a bare bridge; owners answer
 * with a unicast reply to IFNAME's MAC, which a bridge delivers locally.
 *   {"inUse":false}                       exit 0
 *   {"inUse":true,"macs":["aa:..",...]}   exit 0 (distinct senders, at most 8)
 */
static int arp_probe(int argc, char **argv)
{
	struct arp_args a = { .timeout_ms = 1000 };
	struct arp_dev d;
	unsigned char macs[MAX_MACS][ETH_ALEN];
	unsigned char buf[1500];
	struct in_addr any = { 0 };
	char msg[512], mac[18];
	int nmacs = 0, sent = 0;

	parse_arp_args(argc, argv, &a, 1);
	if (a.netns && join_netns(a.netns) < 0) {
		snprintf(msg, sizeof(msg), "netns %s: %s", a.netns, strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}
	if (open_arp_dev(a.dev, &d, msg, sizeof(msg)) < 0)
		return reply_error("SETUP_FAILED", msg);

	long start = now_ms(), deadline = start + a.timeout_ms;
	for (;;) {
		long now = now_ms();
		if (sent < 2 && now >= start + 200L * sent && now < deadline) {
			if (send_arp_request(&d, any, a.ip) < 0) {
				snprintf(msg, sizeof(msg), "send ARP probe on %s: %s", a.dev, strerror(errno));
				close(d.fd);
				return reply_error("SETUP_FAILED", msg);
			}
			sent++;
			continue;
		}
		if (now >= deadline)
			break;
		long wait = deadline - now;
		if (sent < 2 && start + 200L * sent - now < wait)
			wait = start + 200L * sent - now;
		struct pollfd pfd = { d.fd, POLLIN, 0 };
		if (poll(&pfd, 1, (int)wait) < 0) {
			if (errno == EINTR)
				continue;
			snprintf(msg, sizeof(msg), "poll: %s", strerror(errno));
			close(d.fd);
			return reply_error("SETUP_FAILED", msg);
		}
		for (;;) {
			struct sockaddr_ll from;
			socklen_t fromlen = sizeof(from);
			ssize_t n = recvfrom(d.fd, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fromlen);
			if (n < 0)
				break; /* EAGAIN: drained */
			if (from.sll_pkttype == PACKET_OUTGOING || !arp_claims(&d, buf, n, a.ip))
				continue;
			const unsigned char *sha = ((const struct ether_arp *)buf)->arp_sha;
			int seen = 0;
			for (int i = 0; i < nmacs && !seen; i++)
				seen = memcmp(macs[i], sha, ETH_ALEN) == 0;
			if (!seen && nmacs < MAX_MACS)
				memcpy(macs[nmacs++], sha, ETH_ALEN);
		}
	}
	close(d.fd);

	if (nmacs == 0) {
		puts("{\"inUse\":false}");
	} else {
		fputs("{\"inUse\":true,\"macs\":[", stdout);
		for (int i = 0; i < nmacs; i++) {
			format_mac(macs[i], mac);
			printf("%s\"%s\"", i ? "," : "", mac);
		}
		puts("]}");
	}
	fflush(stdout);
	return 0;
}

/* ---- socket-probe ---- */

/* The probe child: a session leader on /dev/null whose only other fds are
 * the three kinds of socket a container typically has. */
static void socket_probe_child(void)
{
	struct sockaddr_in lo = { .sin_family = AF_INET, .sin_port = 0, .sin_addr = { htonl(INADDR_LOOPBACK) } };
	int pair[2];

	/* Its own session, so CRIU dumps it without --shell-job. */
	if (setsid() < 0)
		child_fail("SETUP_FAILED", errno, "setsid");
	int null = open("/dev/null", O_RDWR);
	if (null < 0)
		child_fail("SETUP_FAILED", errno, "open /dev/null");
	for (int fd = 0; fd <= 2; fd++)
		if (null != fd && dup2(null, fd) < 0)
			child_fail("SETUP_FAILED", errno, "dup2 /dev/null to %d", fd);
	if (null > 2)
		close(null);
	close_other_fds();
	/* Keeps no mount of the caller's cwd busy while it lives on. */
	if (chdir("/") < 0)
		child_fail("SETUP_FAILED", errno, "chdir /");

	int tcp = socket(AF_INET, SOCK_STREAM, 0);
	if (tcp < 0 || bind(tcp, (struct sockaddr *)&lo, sizeof(lo)) < 0 || listen(tcp, 8) < 0)
		child_fail("SETUP_FAILED", errno, "TCP listener on 127.0.0.1");
	int udp = socket(AF_INET, SOCK_DGRAM, 0);
	if (udp < 0 || bind(udp, (struct sockaddr *)&lo, sizeof(lo)) < 0)
		child_fail("SETUP_FAILED", errno, "UDP socket on 127.0.0.1");
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0)
		child_fail("SETUP_FAILED", errno, "unix socketpair");

	close(sync_fd); /* EOF: all three exist */
	sync_fd = -1;
	for (;;)
		pause();
}

/*
 * socket-probe: starts a process holding a TCP listener and a UDP socket on
 * 127.0.0.1 and a unix stream socketpair, and exits once they exist; the
 * process lives on (reparented) until the caller kills it. The caller dumps
 * it with criu dump -t PID --leave-running to learn whether this kernel and
 * CRIU can checkpoint sockets.
 *   {"pid":PID}   exit 0
 */
static int socket_probe(void)
{
	char msg[1024];
	int fds[2];

	if (pipe2(fds, O_CLOEXEC) < 0) {
		snprintf(msg, sizeof(msg), "pipe: %s", strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0) {
		snprintf(msg, sizeof(msg), "fork: %s", strerror(errno));
		return reply_error("SETUP_FAILED", msg);
	}
	if (pid == 0) {
		close(fds[0]);
		sync_fd = fds[1];
		socket_probe_child();
		_exit(127); /* not reached */
	}
	close(fds[1]);
	size_t len = read_report(fds[0], msg, sizeof(msg));
	close(fds[0]);
	if (len > 0) {
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		/* Drop the "SETUP_FAILED " prefix child_fail puts on. */
		const char *space = strchr(msg, ' ');
		return reply_error("SETUP_FAILED", space ? space + 1 : msg);
	}
	printf("{\"pid\":%d}\n", (int)pid);
	fflush(stdout);
	return 0;
}

/* If we were started with 0-2 closed, a pipe could land there and be
 * clobbered by the stdio setup: fill the gaps with /dev/null. */
static void fill_stdio(void)
{
	for (int fd = 0; fd <= 2; fd++)
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
			break;
}

int main(int argc, char **argv)
{
	struct options o;
	int have_path = 0;

	memset(&o, 0, sizeof(o));
	o.cwd = "/";
	o.log = DEFAULT_LOG;

	if (argc < 2)
		usage_exit("missing command");
	if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
		puts("ferry-helper " HELPER_VERSION);
		return 0;
	}
	if (strcmp(argv[1], "criu-exec") == 0)
		return criu_exec(argc, argv);
	if (strcmp(argv[1], "arp-announce") == 0)
		return arp_announce(argc, argv);
	if (strcmp(argv[1], "arp-probe") == 0)
		return arp_probe(argc, argv);
	if (strcmp(argv[1], "socket-probe") == 0) {
		if (argc > 2)
			usage_exit("socket-probe takes no arguments");
		fill_stdio();
		return socket_probe();
	}
	if (strcmp(argv[1], "run") != 0)
		usage_exit("unknown command %s", argv[1]);

	int i;
	for (i = 2; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "--") == 0) {
			i++;
			break;
		} else if (strcmp(a, "--rootfs") == 0) {
			o.rootfs = need_value(argc, argv, &i);
		} else if (strcmp(a, "--cgroup-procs") == 0) {
			o.cgroup_procs = need_value(argc, argv, &i);
		} else if (strcmp(a, "--hostname") == 0) {
			o.hostname = need_value(argc, argv, &i);
		} else if (strcmp(a, "--cwd") == 0) {
			o.cwd = need_value(argc, argv, &i);
		} else if (strcmp(a, "--log") == 0) {
			o.log = need_value(argc, argv, &i);
		} else if (strcmp(a, "--env") == 0) {
			const char *kv = need_value(argc, argv, &i);
			if (!strchr(kv, '=') || kv[0] == '=')
				usage_exit("--env needs K=V, got %s", kv);
			if (o.nenv >= MAX_ENV)
				usage_exit("too many --env");
			if (strncmp(kv, "PATH=", 5) == 0)
				have_path = 1;
			o.env[o.nenv++] = (char *)kv;
		} else if (strcmp(a, "--netns") == 0) {
			o.netns = 1;
		} else if (strcmp(a, "--netns-path") == 0) {
			o.netns_path = need_value(argc, argv, &i);
		} else {
			usage_exit("unknown option %s", a);
		}
	}
	if (!o.rootfs)
		usage_exit("--rootfs is required");
	if (o.rootfs[0] != '/')
		usage_exit("--rootfs must be an absolute path");
	if (!o.cgroup_procs)
		usage_exit("--cgroup-procs is required");
	if (o.netns && o.netns_path)
		usage_exit("--netns and --netns-path are mutually exclusive");
	if (o.hostname && strlen(o.hostname) > 64)
		usage_exit("--hostname is longer than 64 characters");
	if (o.log[0] == '\0')
		usage_exit("--log must not be empty");
	if (i >= argc || argv[i][0] == '\0')
		usage_exit("missing command after --");
	if (!have_path)
		o.env[o.nenv++] = DEFAULT_PATH;
	o.env[o.nenv] = NULL;
	o.argv = argv + i;

	fill_stdio();

	signal(SIGPIPE, SIG_IGN);
	return run(&o);
}
