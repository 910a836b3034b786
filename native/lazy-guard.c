/*
 * ferry-lazy-guard: the destination's side of a post-copy migration.
 *
 *   ferry-lazy-guard --cgroup DIR -- CRIU lazy-pages ARGS...
 *
 * It runs CRIU's lazy-pages daemon as its child, with one end of a socket
 * pair as the daemon's --ps-socket (fd 3) and a pipe as its --status-fd
 * (fd 4), and relays that socket to fd 3 of its own (the agent's end, which
 * the agent joins to the source over its authenticated channel).
 *
 * Why it exists: when the last holder of a userfaultfd goes away, the kernel
 * hands every missing page out as zeroes. So the guard holds a duplicate of
 * each of the daemon's userfaultfds (pidfd_getfd), taken once the daemon has
 * them all (its first request to the page server comes after) and again as
 * forks add more. If the daemon dies, exits non-zero, or the agent goes away
 * before the last page is in, the guard kills the container's cgroup while
 * still holding them (a fault waits, killably, and never sees a zero page),
 * waits until the cgroup is empty, and only then lets go. When the daemon
 * exits 0 every page is in: the guard drops its duplicates at once (a page
 * the workload discards later must fault normally again), says so and exits.
 *
 * stdin:  lines from the agent: "seal" (report once the uffds are held), "stop"
 * stdout: one JSON line per event: ready, sealed, complete, failed
 * stderr: the daemon's output and the guard's complaints
 * Exit: 0 after complete, 1 after failed, 2 on usage errors.
 *
 * Only libc; build with: gcc -O2 -static -o ferry-lazy-guard lazy-guard.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PS_IOV_ADD_F 6
#define PS_IOV_GET 7
#define PE_PRESENT (1 << 2)
#define IOV_SIZE 32
#define PAGE 4096
#define BUF_SIZE (4 << 20)
#define MAX_UFFDS 4096
#define MAX_PENDING 65536
#ifndef KCMP_FILE
#define KCMP_FILE 0
#endif

struct buffer {
	char *data;
	size_t start, end;
};

/* One direction's parse state: fixed headers, and for replies the page data after them. */
struct parser {
	unsigned char header[IOV_SIZE];
	size_t have;
	uint64_t payload;
};

struct pending {
	long long at_us;
	uint64_t pages;
};

static const char *cgroup_dir;
static pid_t daemon_pid = -1;
static int pidfd = -1;
static int uffds[MAX_UFFDS];
static int nr_uffds;
/* Every uffd held so far (forks included), for the report: released ones too. */
static int held_total;
static int seal_asked, sealed, daemon_spoke;
static struct pending pending[MAX_PENDING];
static size_t pending_head, pending_tail;
static uint64_t faulted_pages, pushed_pages, faults, requests;
static long long max_stall_us, started_us;
/* Test faults (FERRY_GUARD_FAULTS): "no-hold" takes no uffds, "kill-after:MS" waits before it kills. */
static int fault_no_hold;
static long fault_kill_after_ms;

static long long now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void event(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void event(const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	for (int off = 0; off < n;) {
		ssize_t w = write(1, line + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		off += w;
	}
}

static void stats_json(char *out, size_t size)
{
	snprintf(out, size,
		 "\"requests\":%llu,\"faults\":%llu,\"faultedPages\":%llu,\"pushedPages\":%llu,\"maxStallUs\":%lld,"
		 "\"lastPageMs\":%lld,\"uffds\":%d",
		 (unsigned long long)requests, (unsigned long long)faults, (unsigned long long)faulted_pages,
		 (unsigned long long)pushed_pages, max_stall_us, (now_us() - started_us) / 1000, held_total);
}

/* Holds a duplicate of every userfaultfd the daemon has that is not held yet (kcmp tells files apart). */
static void capture_uffds(void)
{
	char path[64], link[64];
	if (fault_no_hold)
		return;
	snprintf(path, sizeof(path), "/proc/%d/fd", daemon_pid);
	DIR *dir = opendir(path);
	if (!dir)
		return;
	struct dirent *entry;
	while ((entry = readdir(dir))) {
		if (entry->d_name[0] == '.')
			continue;
		char fdpath[384];
		snprintf(fdpath, sizeof(fdpath), "%s/%s", path, entry->d_name);
		ssize_t n = readlink(fdpath, link, sizeof(link) - 1);
		if (n <= 0)
			continue;
		link[n] = '\0';
		if (strcmp(link, "anon_inode:[userfaultfd]") != 0)
			continue;
		int target = atoi(entry->d_name), known = 0;
		for (int i = 0; i < nr_uffds && !known; i++)
			known = syscall(SYS_kcmp, daemon_pid, getpid(), KCMP_FILE, target, uffds[i]) == 0;
		if (known || nr_uffds >= MAX_UFFDS)
			continue;
		int fd = syscall(SYS_pidfd_getfd, pidfd, target, 0);
		if (fd >= 0) {
			uffds[nr_uffds++] = fd;
			held_total++;
		} else
			fprintf(stderr, "ferry-lazy-guard: pidfd_getfd %d: %s\n", target, strerror(errno));
	}
	closedir(dir);
}

static void release_uffds(void)
{
	for (int i = 0; i < nr_uffds; i++)
		close(uffds[i]);
	nr_uffds = 0;
}

static int cgroup_empty(void)
{
	char path[4096], buf[4096];
	snprintf(path, sizeof(path), "%s/cgroup.procs", cgroup_dir);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT;
	ssize_t n = read(fd, buf, sizeof(buf));
	close(fd);
	return n == 0;
}

/* The copy goes while the uffds are still held: a waiting fault ends with its task, never with a zero page. */
static void fail(const char *why)
{
	char path[4096], stats[512];
	capture_uffds();
	if (daemon_pid > 0)
		kill(daemon_pid, SIGKILL);
	if (fault_kill_after_ms > 0)
		usleep(fault_kill_after_ms * 1000);
	snprintf(path, sizeof(path), "%s/cgroup.kill", cgroup_dir);
	for (int tries = 0; tries < 3000 && !cgroup_empty(); tries++) {
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd >= 0) {
			if (write(fd, "1", 1) < 0)
				fprintf(stderr, "ferry-lazy-guard: cgroup.kill: %s\n", strerror(errno));
			close(fd);
		}
		usleep(10000);
	}
	int empty = cgroup_empty();
	release_uffds();
	if (daemon_pid > 0)
		waitpid(daemon_pid, NULL, 0);
	stats_json(stats, sizeof(stats));
	event("{\"event\":\"failed\",\"reason\":\"%s\",\"stopped\":%s,%s}", why, empty ? "true" : "false", stats);
	exit(1);
}

static void complete(void)
{
	char stats[512];
	release_uffds();
	stats_json(stats, sizeof(stats));
	event("{\"event\":\"complete\",%s}", stats);
	exit(0);
}

static void on_request(const unsigned char *iov)
{
	uint32_t cmd;
	uint64_t nr;
	memcpy(&cmd, iov, 4);
	memcpy(&nr, iov + 8, 8);
	if (!daemon_spoke) {
		/* The daemon asks the page server only after it received every task's uffd. */
		daemon_spoke = 1;
		capture_uffds();
	}
	if ((cmd & 0xffff) != PS_IOV_GET)
		return;
	requests++;
	if (pending_tail - pending_head < MAX_PENDING) {
		pending[pending_tail % MAX_PENDING] = (struct pending){ now_us(), nr };
		pending_tail++;
	}
}

static void on_reply(const unsigned char *iov, struct parser *p)
{
	uint32_t cmd;
	uint64_t nr;
	memcpy(&cmd, iov, 4);
	memcpy(&nr, iov + 8, 8);
	if ((cmd & 0xffff) == PS_IOV_ADD_F && ((cmd >> 16) & PE_PRESENT))
		p->payload = nr * PAGE;
	if (pending_head == pending_tail)
		return;
	struct pending req = pending[pending_head % MAX_PENDING];
	pending_head++;
	/* The daemon asks for one page when a task faults, and for ranges when it pushes. */
	if (req.pages == 1) {
		long long stall = now_us() - req.at_us;
		faults++;
		faulted_pages += nr;
		if (stall > max_stall_us)
			max_stall_us = stall;
	} else {
		pushed_pages += nr;
	}
}

static void parse(struct parser *p, const unsigned char *data, size_t len, int replies)
{
	while (len) {
		if (p->payload) {
			size_t take = len < p->payload ? len : p->payload;
			p->payload -= take;
			data += take;
			len -= take;
			continue;
		}
		size_t take = IOV_SIZE - p->have;
		if (take > len)
			take = len;
		memcpy(p->header + p->have, data, take);
		p->have += take;
		data += take;
		len -= take;
		if (p->have == IOV_SIZE) {
			p->have = 0;
			if (replies)
				on_reply(p->header, p);
			else
				on_request(p->header);
		}
	}
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Reads from `from` into `buf` when there is room; 0 on EOF, -1 on error, 1 otherwise. */
static int fill(int from, struct buffer *buf, struct parser *p, int replies)
{
	if (buf->start == buf->end)
		buf->start = buf->end = 0;
	if (buf->end == BUF_SIZE)
		return 1;
	ssize_t n = read(from, buf->data + buf->end, BUF_SIZE - buf->end);
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 1 : -1;
	if (n == 0)
		return 0;
	parse(p, (unsigned char *)buf->data + buf->end, n, replies);
	buf->end += n;
	return 1;
}

static int drain(int to, struct buffer *buf)
{
	while (buf->start < buf->end) {
		ssize_t n = write(to, buf->data + buf->start, buf->end - buf->start);
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 1 : -1;
		buf->start += n;
	}
	return 1;
}

static void control(int fd)
{
	char line[256];
	ssize_t n = read(fd, line, sizeof(line) - 1);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0)
		fail("the agent went away");
	line[n] = '\0';
	if (strstr(line, "stop"))
		fail("the agent stopped the copy");
	if (strstr(line, "seal"))
		seal_asked = 1;
}

static void usage(const char *message)
{
	fprintf(stderr, "ferry-lazy-guard: %s\nusage: ferry-lazy-guard --cgroup DIR -- CRIU ARGS...\n", message);
	exit(2);
}

int main(int argc, char **argv)
{
	int i;
	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0) {
			i++;
			break;
		} else if (strcmp(argv[i], "--cgroup") == 0 && i + 1 < argc) {
			cgroup_dir = argv[++i];
		} else {
			usage("unknown option");
		}
	}
	if (!cgroup_dir || i >= argc)
		usage("--cgroup and a command are required");
	signal(SIGPIPE, SIG_IGN);
	started_us = now_us();
	const char *faults = getenv("FERRY_GUARD_FAULTS");
	if (faults) {
		fault_no_hold = strstr(faults, "no-hold") != NULL;
		const char *after = strstr(faults, "kill-after:");
		if (after)
			fault_kill_after_ms = atol(after + strlen("kill-after:"));
	}

	int agent = fcntl(3, F_DUPFD_CLOEXEC, 10);
	if (agent < 0)
		usage("fd 3 (the page stream) is not open");
	close(3);
	int sp[2], status[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0 || pipe2(status, O_CLOEXEC) < 0) {
		perror("ferry-lazy-guard: socketpair");
		return 1;
	}
	daemon_pid = fork();
	if (daemon_pid < 0) {
		perror("ferry-lazy-guard: fork");
		return 1;
	}
	if (daemon_pid == 0) {
		dup2(sp[1], 3);
		dup2(status[1], 4);
		int null = open("/dev/null", O_RDONLY);
		dup2(null, 0);
		dup2(2, 1);
		execv(argv[i], argv + i);
		fprintf(stderr, "ferry-lazy-guard: exec %s: %s\n", argv[i], strerror(errno));
		_exit(127);
	}
	close(sp[1]);
	close(status[1]);
	pidfd = syscall(SYS_pidfd_open, daemon_pid, 0);
	if (pidfd < 0) {
		perror("ferry-lazy-guard: pidfd_open");
		fail("cannot watch the lazy-pages daemon");
	}
	int ps = sp[0];
	set_nonblock(ps);
	set_nonblock(agent);
	set_nonblock(0);
	struct buffer to_agent = { malloc(BUF_SIZE), 0, 0 }, to_daemon = { malloc(BUF_SIZE), 0, 0 };
	struct parser requests_parser = { 0 }, replies_parser = { 0 };
	int status_open = 1, ready = 0, daemon_open = 1, agent_open = 1;
	long long last_capture_us = 0;

	for (;;) {
		if (seal_asked && !sealed && daemon_spoke) {
			capture_uffds();
			sealed = 1;
			event("{\"event\":\"sealed\",\"uffds\":%d}", nr_uffds);
		}
		struct pollfd fds[6];
		int n = 0, i_ctl = -1, i_status = -1, i_pid, i_ps = -1, i_agent = -1;
		fds[n] = (struct pollfd){ .fd = 0, .events = POLLIN };
		i_ctl = n++;
		if (status_open) {
			fds[n] = (struct pollfd){ .fd = status[0], .events = POLLIN };
			i_status = n++;
		}
		fds[n] = (struct pollfd){ .fd = pidfd, .events = POLLIN };
		i_pid = n++;
		if (daemon_open) {
			short ev = (to_agent.end < BUF_SIZE ? POLLIN : 0) | (to_daemon.start < to_daemon.end ? POLLOUT : 0);
			fds[n] = (struct pollfd){ .fd = ps, .events = ev };
			i_ps = n++;
		}
		if (agent_open) {
			short ev = (to_daemon.end < BUF_SIZE ? POLLIN : 0) | (to_agent.start < to_agent.end ? POLLOUT : 0);
			fds[n] = (struct pollfd){ .fd = agent, .events = ev };
			i_agent = n++;
		}
		/* New tasks (forks) bring new uffds: looked for between events too. */
		int ready_count = poll(fds, n, daemon_spoke ? 20 : 1000);
		if (ready_count < 0 && errno != EINTR)
			fail("poll failed");
		/* At most every 20 ms: a busy page stream wakes the loop thousands of times a second. */
		if (daemon_spoke && now_us() - last_capture_us >= 20000) {
			capture_uffds();
			last_capture_us = now_us();
		}
		if (fds[i_ctl].revents)
			control(0);
		if (i_status >= 0 && fds[i_status].revents) {
			char c;
			ssize_t r = read(status[0], &c, 1);
			if (r <= 0) {
				status_open = 0;
				close(status[0]);
			}
			if (r > 0 && !ready) {
				ready = 1;
				event("{\"event\":\"ready\"}");
			}
		}
		if (i_ps >= 0 && fds[i_ps].revents) {
			if (fds[i_ps].revents & POLLOUT && drain(ps, &to_daemon) < 0)
				daemon_open = 0;
			if (daemon_open && fds[i_ps].revents & (POLLIN | POLLHUP | POLLERR)) {
				int r = fill(ps, &to_agent, &requests_parser, 0);
				if (r <= 0)
					daemon_open = 0;
			}
		}
		if (i_agent >= 0 && fds[i_agent].revents) {
			if (fds[i_agent].revents & POLLOUT && drain(agent, &to_agent) < 0)
				agent_open = 0;
			if (agent_open && fds[i_agent].revents & (POLLIN | POLLHUP | POLLERR)) {
				int r = fill(agent, &to_daemon, &replies_parser, 1);
				if (r <= 0)
					agent_open = 0;
			}
			/* The source went away with pages still missing: its copy is the one that goes on. */
			if (!agent_open)
				fail("the page stream from the source ended");
		}
		if (daemon_open)
			drain(ps, &to_daemon);
		if (agent_open)
			drain(agent, &to_agent);
		if (fds[i_pid].revents) {
			int wstatus = 0;
			waitpid(daemon_pid, &wstatus, 0);
			daemon_pid = -1;
			if (WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0 && daemon_spoke) {
				drain(agent, &to_agent);
				complete();
			}
			char why[128];
			if (WIFSIGNALED(wstatus))
				snprintf(why, sizeof(why), "the lazy-pages daemon was killed by signal %d", WTERMSIG(wstatus));
			else
				snprintf(why, sizeof(why), "the lazy-pages daemon exited with code %d", WEXITSTATUS(wstatus));
			fail(why);
		}
	}
}
