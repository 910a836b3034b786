/*
 * netload: a network workload for migration tests.
 *
 *   netload http PORT
 *   netload udp PORT
 *   netload tcp-echo PORT
 *   netload unix-pair INTERVAL_MS [--tcp PORT]
 *   netload mix PORT
 *   netload unix-connect NAME
 *
 * After CRIU checkpoints netload on one host and restores it on another, its
 * sockets must keep working and its counters must have carried over: every
 * answer carries a counter that a restart (instead of a restore) resets.
 * All listeners are on 0.0.0.0 with SO_REUSEADDR; PORT 0 picks a free port
 * (the ready line names it). A bind that fails is retried every second.
 *
 * http: HTTP/1.1 with keep-alive, one process, a poll() loop over at most 64
 *   connections (more wait in the listen backlog). Any method and path;
 *   headers up to the blank line; a Content-Length body is read and thrown
 *   away (other bodies are not understood: Transfer-Encoding closes after
 *   the answer). Every request, pipelined ones too, is answered
 *     HTTP/1.1 200 OK
 *     Content-Type: text/plain
 *     Content-Length: <N>
 *     Connection: keep-alive
 *
 *     host=<gethostname()> served=<requests served by this process> conn=<requests on this connection>
 *   "Connection: close" in the request (or HTTP/1.0 without keep-alive) is
 *   answered with "Connection: close", then the connection is closed. HEAD
 *   gets the headers only; "Expect: 100-continue" gets "100 Continue" first.
 *   Headers over 16 KiB: "431 Request Header Fields Too Large", closed.
 * udp: every datagram is answered to its sender with "<served> <payload>"
 *   (served counts datagrams, from 1; the reply is cut at 65507 bytes).
 * tcp-echo: every byte received is sent back, at most 256 connections.
 * unix-pair: forks a child; parent and child share a SOCK_STREAM and a
 *   SOCK_DGRAM socketpair. Every INTERVAL_MS the child writes "ping <n>\n" on
 *   the stream pair, the parent answers "pong <n>" on the datagram pair and
 *   the child checks it. A wrong answer prints
 *     unix mismatch expected <n> got <answer>
 *   and no answer within 5 s prints "netload unix-pair no pong for ping <n>
 *   in 5 s"; either way the child writes "bad <n>\n" on the stream and goes
 *   on with n + 1 (late pongs of timed-out pings are dropped). The parent
 *   counts as confirmed the last ping n that the child followed with
 *   "ping <n+1>" and no "bad <n>"; it counts as mismatches the child's "bad"
 *   lines, pings out of sequence and lines it does not understand. With
 *   --tcp PORT the parent answers every line received on every connection
 *   (keep-alive, at most 64) with
 *     unix-ok <last n confirmed> mismatches <m>
 *   A child that dies is reaped and forked again after 1 s, continuing the
 *   sequence; a child whose parent is gone exits.
 * mix: forks http PORT, udp PORT+1 and unix-pair 20 --tcp PORT+2, reaps
 *   them, and forks again (after 1 s) any that dies.
 *
 *   start:   "netload <mode> ready port <p>" (unix-pair without --tcp: port
 *            0; mix: once each of its three children has been ready)
 *   SIGUSR1: one status line from the process signalled:
 *            "netload http status served <n> conns <k>",
 *            "netload udp status served <n>",
 *            "netload tcp-echo status bytes <n> conns <k>",
 *            "netload unix-pair status confirmed <n> mismatches <m> child <pid> conns <k>",
 *            "netload unix-pair child status n <n> mismatches <m>",
 *            "netload mix status http <pid> udp <pid> unix-pair <pid>"
 *   also:    "netload <mode> accept <ip:port> conns <k>" and
 *            "netload <mode> close <ip:port> requests|bytes|lines <n> conns <k> (<why>)"
 *            per connection, "netload mix child <name> pid <p>" per fork,
 *            "netload <mode> child ... exited ...; restarting" per death.
 *   SIGTERM to a unix-pair or mix parent is passed on to its children.
 *
 * Everything is meant to resume after a CRIU restore on another host: only
 * relative sleeps (poll timeouts, nanosleep), every EINTR retried, transient
 * errors logged (1st, 2nd, 4th, 8th... time) and never fatal, stdout
 * line-buffered (it is the container's console log). Signals only set flags.
 * Build: gcc -O2 -static -std=gnu11 -o netload netload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SLOTS 256
#define HTTP_MAX_CONNS 64
#define ECHO_MAX_CONNS 256
#define UNIXOK_MAX_CONNS 64
#define IN_CAP 16384
#define OUT_CAP 65536
#define UDP_MAX 65507
#define PONG_SLICES 50 /* 100 ms polls without a pong before a timeout */
#define MAX_OWED 1024 /* unix-ok answers owed before a connection stops being read */

static volatile sig_atomic_t want_status, got_chld;
static volatile pid_t kids[3]; /* SIGTERM/SIGINT are passed on to these */
static struct sigaction orig_term, orig_int, orig_chld;
static int ready_fd = -1; /* mix children: where to report being ready */
static char ready_tag;

/* ---- small helpers ---- */

static void on_flag(int sig)
{
	if (sig == SIGUSR1)
		want_status = 1;
	else if (sig == SIGCHLD)
		got_chld = 1;
}

static void on_term(int sig)
{
	for (int i = 0; i < 3; i++)
		if (kids[i] > 0)
			kill(kids[i], SIGTERM);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_DFL;
	sigemptyset(&sa.sa_mask);
	sigaction(sig, &sa, NULL);
	raise(sig); /* delivered with the default action once the handler returns */
}

static void set_handler(int sig, void (*fn)(int))
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = fn;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = sig == SIGCHLD ? SA_NOCLDSTOP : 0; /* no SA_RESTART: poll returns EINTR */
	sigaction(sig, &sa, NULL);
}

/* For parents with children: pass SIGTERM and SIGINT on, unless ignored. */
static void forward_terms(void)
{
	if (orig_term.sa_handler != SIG_IGN)
		set_handler(SIGTERM, on_term);
	if (orig_int.sa_handler != SIG_IGN)
		set_handler(SIGINT, on_term);
	set_handler(SIGCHLD, on_flag);
}

static void after_fork_child(void)
{
	for (int i = 0; i < 3; i++)
		kids[i] = 0;
	sigaction(SIGTERM, &orig_term, NULL);
	sigaction(SIGINT, &orig_int, NULL);
	sigaction(SIGCHLD, &orig_chld, NULL);
	got_chld = 0;
	want_status = 0;
	ready_fd = -1;
}

/* True on the 1st, 2nd, 4th, 8th... call: how often to repeat a warning. */
static int often(uint64_t *count)
{
	uint64_t c = ++*count;
	return (c & (c - 1)) == 0;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static const char *printable(const char *s, size_t n, char *out, size_t cap)
{
	size_t j = 0;
	for (size_t i = 0; i < n && j + 1 < cap; i++) {
		unsigned char ch = (unsigned char)s[i];
		out[j++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
	}
	out[j] = '\0';
	return out;
}

/* Digits only, no sign, no overflow past 2^63. */
static int parse_digits(const char *s, size_t n, uint64_t *v)
{
	uint64_t x = 0;
	if (n == 0)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9' || x > (UINT64_C(1) << 59))
			return -1;
		x = x * 10 + (uint64_t)(s[i] - '0');
	}
	*v = x;
	return 0;
}

static void signal_ready(void)
{
	if (ready_fd < 0)
		return;
	while (write(ready_fd, &ready_tag, 1) < 0 && errno == EINTR)
		;
	close(ready_fd);
	ready_fd = -1;
}

static void describe_exit(char *buf, size_t cap, int st)
{
	if (WIFEXITED(st))
		snprintf(buf, cap, "exited status %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, cap, "killed by signal %d", WTERMSIG(st));
	else
		snprintf(buf, cap, "ended (wait status 0x%x)", (unsigned)st);
}

/* A bound (and for TCP listening, non-blocking) socket on 0.0.0.0:*port;
 * retried every second until it works. *port becomes the bound port. */
static int open_inet(const char *mode, int type, int *port)
{
	uint64_t attempt = 0;
	for (;;) {
		const char *what = "socket";
		int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
		if (fd >= 0) {
			int one = 1;
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
			struct sockaddr_in a;
			memset(&a, 0, sizeof(a));
			a.sin_family = AF_INET;
			a.sin_port = htons((uint16_t)*port);
			a.sin_addr.s_addr = htonl(INADDR_ANY);
			what = "bind";
			if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
				what = "listen";
				if (type != SOCK_STREAM || listen(fd, 128) == 0) {
					socklen_t len = sizeof(a);
					if (getsockname(fd, (struct sockaddr *)&a, &len) == 0)
						*port = ntohs(a.sin_port);
					if (type == SOCK_STREAM)
						fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
					return fd;
				}
			}
		}
		int err = errno;
		if (fd >= 0)
			close(fd);
		if (often(&attempt))
			printf("netload %s %s 0.0.0.0:%d: %s; retrying every second (attempt %" PRIu64 ")\n", mode,
			       what, *port, strerror(err), attempt);
		sleep_ms(1000);
	}
}

/* ---- the poll() server shared by http, tcp-echo and unix-pair --tcp ---- */

enum kind { K_HTTP, K_ECHO, K_UNIXOK };

struct conn {
	int fd;
	char peer[64];
	uint64_t count; /* http: requests; echo: bytes; unix-ok: lines */
	uint64_t body_left; /* http: request body bytes still to discard */
	uint64_t owed; /* unix-ok: answers still to write */
	int pending; /* http: a request whose answer waits for its body */
	int pending_head, pending_close;
	int close_after; /* close once the output is written */
	int peer_closed; /* read EOF: write what is left, then close */
	size_t in_len, out_off, out_len;
	char in[IN_CAP];
	char out[OUT_CAP];
};

struct server {
	const char *mode;
	const char *unit; /* what conn.count counts, for the close line */
	enum kind kind;
	int lfd, max_conns, open, pause;
	int lidx; /* index of the listener in the pollfd array, or -1 */
	int idx[MAX_SLOTS];
	struct conn *slot[MAX_SLOTS];
	uint64_t served; /* http: requests; echo: bytes; unix-ok: answers */
	uint64_t accept_errs, alloc_errs;
};

/* unix-pair parent state, read by the unix-ok answers */
static uint64_t ux_confirmed, ux_mismatches;

static void server_init(struct server *s, const char *mode, enum kind kind, int lfd, int max_conns)
{
	memset(s, 0, sizeof(*s));
	s->mode = mode;
	s->kind = kind;
	s->unit = kind == K_HTTP ? "requests" : kind == K_ECHO ? "bytes" : "lines";
	s->lfd = lfd;
	s->max_conns = max_conns;
	s->lidx = -1;
	for (int i = 0; i < MAX_SLOTS; i++)
		s->idx[i] = -1;
}

static size_t out_space(struct conn *c)
{
	return OUT_CAP - (c->out_len - c->out_off);
}

static void out_compact(struct conn *c)
{
	if (c->out_off == 0)
		return;
	memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
	c->out_len -= c->out_off;
	c->out_off = 0;
}

static void in_consume(struct conn *c, size_t n)
{
	memmove(c->in, c->in + n, c->in_len - n);
	c->in_len -= n;
}

static void conn_close(struct server *s, int i, const char *why)
{
	struct conn *c = s->slot[i];
	close(c->fd);
	s->open--;
	printf("netload %s close %s %s %" PRIu64 " conns %d (%s)\n", s->mode, c->peer, s->unit, c->count, s->open, why);
	free(c);
	s->slot[i] = NULL;
	s->idx[i] = -1;
}

static void server_accept(struct server *s)
{
	while (s->open < s->max_conns) {
		struct sockaddr_in a;
		socklen_t len = sizeof(a);
		int fd = accept4(s->lfd, (struct sockaddr *)&a, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
				return;
			if (errno == ECONNABORTED || errno == EPROTO)
				continue;
			if (often(&s->accept_errs))
				printf("netload %s accept: %s (%" PRIu64 " times)\n", s->mode, strerror(errno),
				       s->accept_errs);
			s->pause = 1; /* EMFILE and the like: skip the listener for 100 ms */
			return;
		}
		struct conn *c = malloc(sizeof(*c));
		if (!c) {
			close(fd);
			if (often(&s->alloc_errs))
				printf("netload %s accept: out of memory (%" PRIu64 " times)\n", s->mode, s->alloc_errs);
			s->pause = 1;
			return;
		}
		memset(c, 0, offsetof(struct conn, in));
		c->fd = fd;
		int one = 1, idle = 60, intvl = 10, cnt = 6;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		/* a peer that vanished (no FIN, no RST) frees its slot in about 2 min */
		setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
		setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
		setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
		setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
		char ip[INET_ADDRSTRLEN] = "?";
		if (a.sin_family == AF_INET)
			inet_ntop(AF_INET, &a.sin_addr, ip, sizeof(ip));
		snprintf(c->peer, sizeof(c->peer), "%s:%u", ip, (unsigned)ntohs(a.sin_port));
		int i = 0;
		while (s->slot[i])
			i++; /* a free slot exists: open < max_conns <= MAX_SLOTS */
		s->slot[i] = c;
		s->idx[i] = -1;
		s->open++;
		printf("netload %s accept %s conns %d\n", s->mode, c->peer, s->open);
	}
}

static int conn_wants_read(struct server *s, struct conn *c)
{
	if (c->peer_closed || c->close_after)
		return 0;
	switch (s->kind) {
	case K_HTTP:
		/* stop reading while 32 KiB of answers wait for the peer */
		return c->in_len < IN_CAP && out_space(c) > OUT_CAP / 2;
	case K_ECHO:
		return c->out_len - c->out_off < OUT_CAP;
	case K_UNIXOK:
		return c->owed < MAX_OWED;
	}
	return 0;
}

static int has_token(const char *v, size_t n, const char *tok)
{
	size_t tl = strlen(tok);
	size_t i = 0;
	while (i < n) {
		while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
			i++;
		size_t start = i;
		while (i < n && v[i] != ',')
			i++;
		size_t end = i;
		while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t'))
			end--;
		if (end - start == tl && strncasecmp(v + start, tok, tl) == 0)
			return 1;
	}
	return 0;
}

static void http_answer(struct server *s, struct conn *c)
{
	char host[256];
	if (gethostname(host, sizeof(host)) != 0)
		strcpy(host, "?");
	host[sizeof(host) - 1] = '\0';
	s->served++;
	c->count++;
	char body[400];
	int bl = snprintf(body, sizeof(body), "host=%s served=%" PRIu64 " conn=%" PRIu64 "\n", host, s->served,
			  c->count);
	out_compact(c);
	int n = snprintf(c->out + c->out_len, OUT_CAP - c->out_len,
			 "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
			 "Connection: %s\r\n\r\n%s",
			 bl, c->pending_close ? "close" : "keep-alive", c->pending_head ? "" : body);
	c->out_len += (size_t)n;
	if (c->pending_close)
		c->close_after = 1;
}

static void out_append(struct conn *c, const char *s)
{
	size_t n = strlen(s);
	out_compact(c);
	if (n <= OUT_CAP - c->out_len) {
		memcpy(c->out + c->out_len, s, n);
		c->out_len += n;
	}
}

/* Parses and answers what the input holds; returns the answers written. */
static int http_produce(struct server *s, struct conn *c)
{
	int done = 0;
	for (;;) {
		if (c->body_left) {
			size_t k = c->in_len < c->body_left ? c->in_len : (size_t)c->body_left;
			in_consume(c, k);
			c->body_left -= k;
			if (c->body_left)
				return done;
		}
		if (c->pending) {
			if (out_space(c) < 1024)
				return done; /* answered once the peer reads */
			http_answer(s, c);
			c->pending = 0;
			done++;
		}
		if (c->close_after) {
			c->in_len = 0;
			return done;
		}
		/* blank lines between requests are allowed */
		size_t skip = 0;
		while (skip < c->in_len && (c->in[skip] == '\r' || c->in[skip] == '\n'))
			skip++;
		in_consume(c, skip);
		if (c->in_len == 0)
			return done;

		size_t pos = 0, hdr_end = 0;
		while (pos < c->in_len) {
			const char *nl = memchr(c->in + pos, '\n', c->in_len - pos);
			if (!nl)
				break;
			size_t ll = (size_t)(nl - (c->in + pos));
			if (ll == 0 || (ll == 1 && c->in[pos] == '\r')) {
				hdr_end = pos + ll + 1;
				break;
			}
			pos += ll + 1;
		}
		if (hdr_end == 0) {
			if (c->in_len == IN_CAP) {
				printf("netload %s %s: request headers over %d bytes; closing\n", s->mode, c->peer, IN_CAP);
				out_append(c, "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
					      "Connection: close\r\n\r\n");
				c->close_after = 1;
				c->in_len = 0;
			}
			return done;
		}
		if (out_space(c) < 1024)
			return done;

		int first = 1, http10 = 0, head = 0, want_close = 0, want_keep = 0, other_te = 0, bad_len = 0;
		int expect = 0;
		uint64_t clen = 0;
		const char *p = c->in, *end = c->in + hdr_end;
		while (p < end) {
			const char *nl = memchr(p, '\n', (size_t)(end - p));
			size_t n = (size_t)(nl - p);
			if (n && p[n - 1] == '\r')
				n--;
			if (n == 0)
				break;
			if (first) {
				first = 0;
				head = n >= 5 && memcmp(p, "HEAD ", 5) == 0;
				http10 = n >= 8 && memcmp(p + n - 8, "HTTP/1.0", 8) == 0;
			} else {
				const char *colon = memchr(p, ':', n);
				if (colon) {
					size_t nl_ = (size_t)(colon - p);
					const char *v = colon + 1;
					size_t vl = n - nl_ - 1;
					while (vl && (*v == ' ' || *v == '\t')) {
						v++;
						vl--;
					}
					while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
						vl--;
					if (nl_ == 14 && strncasecmp(p, "Content-Length", 14) == 0) {
						if (parse_digits(v, vl, &clen) != 0)
							bad_len = 1;
					} else if (nl_ == 10 && strncasecmp(p, "Connection", 10) == 0) {
						want_close |= has_token(v, vl, "close");
						want_keep |= has_token(v, vl, "keep-alive");
					} else if (nl_ == 17 && strncasecmp(p, "Transfer-Encoding", 17) == 0) {
						if (!(vl == 8 && strncasecmp(v, "identity", 8) == 0))
							other_te = 1;
					} else if (nl_ == 6 && strncasecmp(p, "Expect", 6) == 0) {
						expect = has_token(v, vl, "100-continue");
					}
				}
			}
			p = nl + 1;
		}
		in_consume(c, hdr_end);
		if (bad_len)
			clen = 0;
		c->pending = 1;
		c->pending_head = head;
		/* a body we cannot delimit leaves the stream unparseable: close after */
		c->pending_close = want_close || (http10 && !want_keep) || other_te || bad_len;
		c->body_left = clen;
		if (expect && clen > 0 && !other_te)
			out_append(c, "HTTP/1.1 100 Continue\r\n\r\n");
	}
}

static int unixok_produce(struct server *s, struct conn *c)
{
	int done = 0;
	while (c->owed) {
		out_compact(c);
		if (OUT_CAP - c->out_len < 96)
			break;
		c->out_len += (size_t)snprintf(c->out + c->out_len, OUT_CAP - c->out_len,
					       "unix-ok %" PRIu64 " mismatches %" PRIu64 "\n", ux_confirmed,
					       ux_mismatches);
		c->owed--;
		c->count++;
		s->served++;
		done++;
	}
	return done;
}

/* 0, or -1 with errno set on an error that ends the connection. */
static int conn_flush(struct conn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t k = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (k > 0) {
			c->out_off += (size_t)k;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS || errno == ENOMEM))
			return 0;
		if (k == 0)
			errno = EPIPE;
		return -1;
	}
	c->out_off = c->out_len = 0;
	return 0;
}

static void conn_event(struct server *s, int i, short revents)
{
	struct conn *c = s->slot[i];
	if (revents & POLLNVAL) {
		conn_close(s, i, "invalid fd");
		return;
	}
	if (revents & POLLERR) {
		int e = 0;
		socklen_t l = sizeof(e);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &l);
		conn_close(s, i, e ? strerror(e) : "socket error");
		return;
	}
	if ((revents & (POLLIN | POLLHUP)) && conn_wants_read(s, c)) {
		ssize_t k;
		char tmp[4096];
		if (s->kind == K_HTTP) {
			k = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
			if (k > 0)
				c->in_len += (size_t)k;
		} else if (s->kind == K_ECHO) {
			out_compact(c);
			k = recv(c->fd, c->out + c->out_len, OUT_CAP - c->out_len, 0);
			if (k > 0) {
				c->out_len += (size_t)k;
				c->count += (uint64_t)k;
				s->served += (uint64_t)k;
			}
		} else {
			k = recv(c->fd, tmp, sizeof(tmp), 0);
			for (ssize_t j = 0; j < k; j++)
				if (tmp[j] == '\n')
					c->owed++;
		}
		if (k == 0) {
			c->peer_closed = 1;
		} else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
			conn_close(s, i, strerror(errno));
			return;
		}
	} else if ((revents & POLLHUP) && !(revents & POLLIN)) {
		conn_close(s, i, "hang-up");
		return;
	}

	for (;;) {
		int made = s->kind == K_HTTP ? http_produce(s, c) : s->kind == K_UNIXOK ? unixok_produce(s, c) : 0;
		if (conn_flush(c) != 0) {
			conn_close(s, i, strerror(errno));
			return;
		}
		if (made == 0 || c->out_len != 0)
			break; /* nothing more to say, or the peer must read first */
	}
	if (c->out_len == 0 && (c->close_after || c->peer_closed))
		conn_close(s, i, c->close_after ? "done" : "peer closed");
}

static int server_fill(struct server *s, struct pollfd *p, int n)
{
	s->lidx = -1;
	if (s->lfd >= 0 && s->open < s->max_conns && !s->pause) {
		p[n].fd = s->lfd;
		p[n].events = POLLIN;
		p[n].revents = 0;
		s->lidx = n++;
	}
	for (int i = 0; i < s->max_conns; i++) {
		struct conn *c = s->slot[i];
		s->idx[i] = -1;
		if (!c)
			continue;
		p[n].fd = c->fd;
		p[n].events = (short)((conn_wants_read(s, c) ? POLLIN : 0) | (c->out_len > c->out_off ? POLLOUT : 0));
		p[n].revents = 0;
		s->idx[i] = n++;
	}
	return n;
}

static void server_process(struct server *s, const struct pollfd *p)
{
	for (int i = 0; i < s->max_conns; i++)
		if (s->slot[i] && s->idx[i] >= 0 && p[s->idx[i]].revents)
			conn_event(s, i, p[s->idx[i]].revents);
	if (s->lidx >= 0 && (p[s->lidx].revents & POLLIN))
		server_accept(s);
}

static void run_tcp_server(const char *mode, enum kind kind, int port, int max_conns)
{
	static struct server s;
	static struct pollfd p[MAX_SLOTS + 1];
	int lfd = open_inet(mode, SOCK_STREAM, &port);
	server_init(&s, mode, kind, lfd, max_conns);
	printf("netload %s ready port %d\n", mode, port);
	signal_ready();
	uint64_t poll_errs = 0;
	for (;;) {
		if (want_status) {
			want_status = 0;
			if (kind == K_HTTP)
				printf("netload %s status served %" PRIu64 " conns %d\n", mode, s.served, s.open);
			else
				printf("netload %s status bytes %" PRIu64 " conns %d\n", mode, s.served, s.open);
		}
		int n = server_fill(&s, p, 0);
		int r = poll(p, (nfds_t)n, s.pause ? 100 : 1000);
		s.pause = 0;
		if (r < 0) {
			if (errno != EINTR) {
				if (often(&poll_errs))
					printf("netload %s poll: %s\n", mode, strerror(errno));
				sleep_ms(10);
			}
			continue;
		}
		if (r > 0)
			server_process(&s, p);
	}
}

/* ---- udp ---- */

static void run_udp(int port)
{
	static char in[65536], out[65536 + 32];
	int fd = open_inet("udp", SOCK_DGRAM, &port);
	printf("netload udp ready port %d\n", port);
	signal_ready();
	uint64_t served = 0, recv_errs = 0, send_errs = 0;
	for (;;) {
		if (want_status) {
			want_status = 0;
			printf("netload udp status served %" PRIu64 "\n", served);
		}
		struct sockaddr_storage from;
		socklen_t fl = sizeof(from);
		ssize_t n = recvfrom(fd, in, sizeof(in), 0, (struct sockaddr *)&from, &fl);
		if (n < 0) {
			if (errno != EINTR && errno != EAGAIN) {
				if (often(&recv_errs))
					printf("netload udp recvfrom: %s (%" PRIu64 " times)\n", strerror(errno), recv_errs);
				sleep_ms(10);
			}
			continue;
		}
		served++;
		int h = snprintf(out, 32, "%" PRIu64 " ", served);
		size_t k = (size_t)n;
		if (k > UDP_MAX - (size_t)h)
			k = UDP_MAX - (size_t)h;
		memcpy(out + h, in, k);
		while (sendto(fd, out, (size_t)h + k, 0, (struct sockaddr *)&from, fl) < 0) {
			if (errno == EINTR)
				continue;
			if (often(&send_errs))
				printf("netload udp sendto: %s (%" PRIu64 " times)\n", strerror(errno), send_errs);
			break;
		}
	}
}

/* ---- unix-pair ---- */

static void child_parent_gone(const char *why)
{
	printf("netload unix-pair child pid %d: parent gone (%s); exiting\n", (int)getpid(), why);
	fflush(stdout);
	_exit(0);
}

/* Blocking write of all of buf; on EPIPE and the like the parent is gone. */
static void child_write(int fd, const char *buf, size_t len)
{
	uint64_t errs = 0;
	while (len) {
		ssize_t k = send(fd, buf, len, MSG_NOSIGNAL);
		if (k > 0) {
			buf += k;
			len -= (size_t)k;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == ENOBUFS || errno == ENOMEM)) {
			if (often(&errs))
				printf("netload unix-pair child write: %s; retrying\n", strerror(errno));
			sleep_ms(10);
			continue;
		}
		child_parent_gone(k < 0 ? strerror(errno) : "write returned 0");
	}
}

static void unix_child(int sfd, int dfd, uint64_t n, long interval_ms)
{
	uint64_t mismatches = 0, late_upto = 0, recv_errs = 0;
	char line[64], buf[512], shown[80];
	for (;; n++) {
		int len = snprintf(line, sizeof(line), "ping %" PRIu64 "\n", n);
		child_write(sfd, line, (size_t)len);

		char expect[40];
		int el = snprintf(expect, sizeof(expect), "pong %" PRIu64, n);
		int idle = 0, bad = 0;
		for (;;) {
			if (want_status) {
				want_status = 0;
				printf("netload unix-pair child status n %" PRIu64 " mismatches %" PRIu64 "\n", n,
				       mismatches);
			}
			struct pollfd p[2] = { { dfd, POLLIN, 0 }, { sfd, 0, 0 } };
			int r = poll(p, 2, 100);
			if (r < 0)
				continue; /* EINTR */
			if (r == 0) {
				if (++idle < PONG_SLICES)
					continue;
				printf("netload unix-pair no pong for ping %" PRIu64 " in %d s\n", n, PONG_SLICES / 10);
				late_upto = n;
				bad = 1;
				break;
			}
			if (p[1].revents & (POLLHUP | POLLERR | POLLNVAL))
				child_parent_gone("stream socket hung up");
			if (!p[0].revents)
				continue;
			ssize_t k = recv(dfd, buf, sizeof(buf), MSG_DONTWAIT);
			if (k < 0) {
				if (errno == EAGAIN || errno == EINTR)
					continue;
				if (errno == ECONNRESET || errno == ECONNREFUSED || errno == ENOTCONN)
					child_parent_gone(strerror(errno));
				if (often(&recv_errs))
					printf("netload unix-pair child recv: %s\n", strerror(errno));
				sleep_ms(10);
				continue;
			}
			if (k == el && memcmp(buf, expect, (size_t)el) == 0)
				break; /* confirmed */
			uint64_t got;
			if (k > 5 && memcmp(buf, "pong ", 5) == 0 && parse_digits(buf + 5, (size_t)k - 5, &got) == 0 &&
			    got < n && got <= late_upto) {
				printf("netload unix-pair late pong %" PRIu64 " dropped (waiting for %" PRIu64 ")\n", got,
				       n);
				continue;
			}
			printf("unix mismatch expected %" PRIu64 " got %s\n", n,
			       printable(buf, (size_t)k, shown, sizeof(shown)));
			bad = 1;
			break;
		}
		if (bad) {
			mismatches++;
			len = snprintf(line, sizeof(line), "bad %" PRIu64 "\n", n);
			child_write(sfd, line, (size_t)len);
		}
		if (interval_ms > 0)
			sleep_ms(interval_ms);
	}
}

struct uxparent {
	pid_t pid; /* -1 while there is no child */
	int sfd, dfd;
	uint64_t last_ping; /* last ping received, 0 before the first */
	uint64_t pending; /* ping answered, not yet confirmed (0: none) */
	int pending_bad;
	uint64_t send_errs, fork_errs;
	size_t len;
	char buf[4096];
};

static void close_fds_except(int a, int b)
{
	long max = sysconf(_SC_OPEN_MAX);
	if (max < 0 || max > 4096)
		max = 4096;
	for (int fd = 3; fd < max; fd++)
		if (fd != a && fd != b)
			close(fd);
}

static void ux_spawn(struct uxparent *u, long interval_ms)
{
	for (;;) {
		int sp[2], dp[2];
		const char *what = "socketpair";
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0) {
			if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, dp) == 0) {
				uint64_t start = u->last_ping + 1;
				fflush(stdout);
				what = "fork";
				pid_t pid = fork();
				if (pid == 0) {
					after_fork_child();
					close_fds_except(sp[1], dp[1]);
					unix_child(sp[1], dp[1], start, interval_ms);
					_exit(1);
				}
				if (pid > 0) {
					close(sp[1]);
					close(dp[1]);
					fcntl(sp[0], F_SETFL, fcntl(sp[0], F_GETFL) | O_NONBLOCK);
					u->pid = pid;
					kids[0] = pid;
					u->sfd = sp[0];
					u->dfd = dp[0];
					u->len = 0;
					u->pending = 0;
					u->pending_bad = 0;
					printf("netload unix-pair child pid %d start n %" PRIu64 "\n", (int)pid, start);
					return;
				}
				int err = errno;
				close(dp[0]);
				close(dp[1]);
				errno = err;
			}
			int err = errno;
			close(sp[0]);
			close(sp[1]);
			errno = err;
		}
		if (often(&u->fork_errs))
			printf("netload unix-pair %s: %s; retrying every second\n", what, strerror(errno));
		sleep_ms(1000);
	}
}

static void ux_child_died(struct uxparent *u, int st, long interval_ms)
{
	char how[64];
	describe_exit(how, sizeof(how), st);
	printf("netload unix-pair child pid %d %s; restarting in 1 s\n", (int)u->pid, how);
	close(u->sfd);
	close(u->dfd);
	u->sfd = u->dfd = -1;
	u->pid = -1;
	kids[0] = 0;
	sleep_ms(1000);
	ux_spawn(u, interval_ms);
}

static void ux_line(struct uxparent *u, const char *s, size_t n)
{
	uint64_t v;
	char shown[80];
	if (n > 5 && memcmp(s, "ping ", 5) == 0 && parse_digits(s + 5, n - 5, &v) == 0) {
		if (u->pending && !u->pending_bad)
			ux_confirmed = u->pending;
		if (u->last_ping && v != u->last_ping + 1) {
			ux_mismatches++;
			printf("netload unix-pair ping out of sequence: expected %" PRIu64 " got %" PRIu64 "\n",
			       u->last_ping + 1, v);
		}
		u->last_ping = v;
		u->pending = v;
		u->pending_bad = 0;
		char pong[40];
		int pl = snprintf(pong, sizeof(pong), "pong %" PRIu64, v);
		while (send(u->dfd, pong, (size_t)pl, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
			if (errno == EINTR)
				continue;
			if (often(&u->send_errs))
				printf("netload unix-pair pong %" PRIu64 ": %s (%" PRIu64 " times)\n", v, strerror(errno),
				       u->send_errs);
			break;
		}
	} else if (n > 4 && memcmp(s, "bad ", 4) == 0 && parse_digits(s + 4, n - 4, &v) == 0) {
		ux_mismatches++;
		if (v == u->pending)
			u->pending_bad = 1;
	} else {
		ux_mismatches++;
		printf("netload unix-pair unexpected line from child: %s\n", printable(s, n, shown, sizeof(shown)));
	}
}

/* Returns -1 when the child's end is gone. */
static int ux_read(struct uxparent *u)
{
	ssize_t k = recv(u->sfd, u->buf + u->len, sizeof(u->buf) - u->len, MSG_DONTWAIT);
	if (k < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
	if (k == 0)
		return -1;
	u->len += (size_t)k;
	char *start = u->buf, *nl;
	while ((nl = memchr(start, '\n', u->len - (size_t)(start - u->buf)))) {
		ux_line(u, start, (size_t)(nl - start));
		start = nl + 1;
	}
	size_t rest = u->len - (size_t)(start - u->buf);
	memmove(u->buf, start, rest);
	u->len = rest;
	if (u->len == sizeof(u->buf)) {
		ux_mismatches++;
		printf("netload unix-pair line from child over %zu bytes; dropped\n", sizeof(u->buf));
		u->len = 0;
	}
	return 0;
}

static void run_unix_pair(long interval_ms, int tcp_port)
{
	static struct server s;
	static struct uxparent u;
	static struct pollfd p[MAX_SLOTS + 2];
	int port = 0, lfd = -1;
	if (tcp_port >= 0) {
		port = tcp_port;
		lfd = open_inet("unix-pair", SOCK_STREAM, &port);
	}
	server_init(&s, "unix-pair", K_UNIXOK, lfd, UNIXOK_MAX_CONNS);
	forward_terms();
	u.pid = -1;
	u.sfd = u.dfd = -1;
	ux_spawn(&u, interval_ms);
	printf("netload unix-pair ready port %d\n", port);
	signal_ready();
	uint64_t poll_errs = 0;
	for (;;) {
		if (want_status) {
			want_status = 0;
			printf("netload unix-pair status confirmed %" PRIu64 " mismatches %" PRIu64 " child %d conns %d\n",
			       ux_confirmed, ux_mismatches, (int)u.pid, s.open);
		}
		if (got_chld) {
			got_chld = 0;
			int st;
			pid_t w;
			while ((w = waitpid(-1, &st, WNOHANG)) > 0)
				if (w == u.pid)
					ux_child_died(&u, st, interval_ms);
		}
		int n = 0;
		p[n].fd = u.sfd;
		p[n].events = POLLIN;
		p[n].revents = 0;
		n++;
		n = server_fill(&s, p, n);
		int r = poll(p, (nfds_t)n, s.pause ? 100 : 1000);
		s.pause = 0;
		if (r < 0) {
			if (errno != EINTR) {
				if (often(&poll_errs))
					printf("netload unix-pair poll: %s\n", strerror(errno));
				sleep_ms(10);
			}
			continue;
		}
		if (r == 0)
			continue;
		if (p[0].revents && ux_read(&u) < 0) {
			/* the child closed its end: make sure it is gone, reap it, fork another */
			pid_t pid = u.pid;
			int st = 0;
			kill(pid, SIGKILL);
			while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
				;
			ux_child_died(&u, st, interval_ms);
			continue; /* the pollfd array no longer matches */
		}
		server_process(&s, p);
	}
}

/* ---- mix ---- */

static const char *mix_names[3] = { "http", "udp", "unix-pair" };

static void mix_reap(pid_t *pids, int *need)
{
	int st;
	pid_t w;
	got_chld = 0;
	while ((w = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < 3; i++) {
			if (pids[i] != w)
				continue;
			char how[64];
			describe_exit(how, sizeof(how), st);
			printf("netload mix child %s pid %d %s; restarting in 1 s\n", mix_names[i], (int)w, how);
			pids[i] = 0;
			kids[i] = 0;
			need[i] = 1;
		}
	}
}

static void run_mix(int port)
{
	const char **names = mix_names;
	pid_t pids[3] = { 0, 0, 0 };
	int was_ready[3] = { 0, 0, 0 }, started[3] = { 0, 0, 0 }, announced = 0;
	int pfd[2];
	uint64_t errs = 0;
	while (pipe2(pfd, O_CLOEXEC) != 0) {
		if (often(&errs))
			printf("netload mix pipe: %s; retrying every second\n", strerror(errno));
		sleep_ms(1000);
	}
	fcntl(pfd[0], F_SETFL, fcntl(pfd[0], F_GETFL) | O_NONBLOCK);
	forward_terms();
	int need[3] = { 1, 1, 1 };
	for (;;) {
		if (want_status) {
			want_status = 0;
			printf("netload mix status http %d udp %d unix-pair %d\n", (int)pids[0], (int)pids[1],
			       (int)pids[2]);
		}
		mix_reap(pids, need);
		int restarting = 0;
		for (int i = 0; i < 3; i++)
			restarting |= need[i] && started[i];
		if (restarting) {
			sleep_ms(1000); /* not at the first start: a child that keeps dying does not spin */
			mix_reap(pids, need); /* children that died meanwhile are forked again now too */
		}
		for (int i = 0; i < 3; i++) {
			if (!need[i])
				continue;
			fflush(stdout);
			pid_t pid = fork();
			if (pid < 0) {
				if (often(&errs))
					printf("netload mix fork %s: %s; retrying\n", names[i], strerror(errno));
				continue; /* tried again after the next poll */
			}
			if (pid == 0) {
				after_fork_child();
				close(pfd[0]);
				ready_fd = pfd[1];
				ready_tag = (char)('0' + i);
				if (i == 0)
					run_tcp_server("http", K_HTTP, port, HTTP_MAX_CONNS);
				else if (i == 1)
					run_udp(port + 1);
				else
					run_unix_pair(20, port + 2);
				_exit(1);
			}
			pids[i] = pid;
			kids[i] = pid;
			need[i] = 0;
			started[i] = 1;
			printf("netload mix child %s pid %d\n", names[i], (int)pid);
		}
		struct pollfd p = { pfd[0], POLLIN, 0 };
		int r = poll(&p, 1, got_chld ? 0 : 1000);
		if (r > 0) {
			char b[16];
			ssize_t k = read(pfd[0], b, sizeof(b));
			for (ssize_t j = 0; j < k; j++)
				if (b[j] >= '0' && b[j] <= '2')
					was_ready[b[j] - '0'] = 1;
		}
		if (!announced && was_ready[0] && was_ready[1] && was_ready[2]) {
			announced = 1;
			printf("netload mix ready port %d\n", port);
		}
	}
}

/* ---- unix-connect ---- */

static void usage(void);

/*
 * Connects to the abstract unix socket "@NAME" (abstract names belong to the
 * network namespace, so a container in the host's namespace reaches a socket
 * of the host this way) and writes "hello <n>\n" every second: a socket
 * whose peer is outside the container, which a migration must refuse.
 */
static void run_unix_connect(const char *name)
{
	struct sockaddr_un addr;
	size_t len = strlen(name);
	if (len == 0 || len >= sizeof(addr.sun_path) - 1)
		usage();
	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path + 1, name, len);
	socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
	for (;;) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&addr, addrlen) == 0) {
			printf("netload unix-connect ready name @%s\n", name);
			for (unsigned long n = 1;; n++) {
				char line[64];
				int k = snprintf(line, sizeof(line), "hello %lu\n", n);
				if (write(fd, line, (size_t)k) < 0 && errno != EINTR)
					break;
				struct timespec t = { 1, 0 };
				nanosleep(&t, NULL);
			}
		}
		printf("netload unix-connect @%s: %s; retrying in 1 s\n", name, strerror(errno));
		if (fd >= 0)
			close(fd);
		struct timespec t = { 1, 0 };
		nanosleep(&t, NULL);
	}
}

/* ---- main ---- */

static void usage(void)
{
	fprintf(stderr, "usage: netload http PORT\n"
			"       netload udp PORT\n"
			"       netload tcp-echo PORT\n"
			"       netload unix-pair INTERVAL_MS [--tcp PORT]\n"
			"       netload mix PORT          (http PORT, udp PORT+1, unix-pair 20 --tcp PORT+2)\n"
			"       netload unix-connect NAME (holds a connection to the abstract unix socket @NAME)\n");
	exit(2);
}

static long parse_num(const char *s, long lo, long hi)
{
	uint64_t v;
	if (parse_digits(s, strlen(s), &v) != 0 || v < (uint64_t)lo || v > (uint64_t)hi)
		usage();
	return (long)v;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	sigaction(SIGTERM, NULL, &orig_term);
	sigaction(SIGINT, NULL, &orig_int);
	sigaction(SIGCHLD, NULL, &orig_chld);
	set_handler(SIGPIPE, SIG_IGN);
	set_handler(SIGUSR1, on_flag);

	if (argc < 3)
		usage();
	const char *mode = argv[1];
	if (strcmp(mode, "http") == 0 && argc == 3) {
		run_tcp_server("http", K_HTTP, (int)parse_num(argv[2], 0, 65535), HTTP_MAX_CONNS);
	} else if (strcmp(mode, "tcp-echo") == 0 && argc == 3) {
		run_tcp_server("tcp-echo", K_ECHO, (int)parse_num(argv[2], 0, 65535), ECHO_MAX_CONNS);
	} else if (strcmp(mode, "udp") == 0 && argc == 3) {
		run_udp((int)parse_num(argv[2], 0, 65535));
	} else if (strcmp(mode, "unix-pair") == 0 && (argc == 3 || argc == 5)) {
		long interval = parse_num(argv[2], 0, 3600000);
		int tcp = -1;
		if (argc == 5) {
			if (strcmp(argv[3], "--tcp") != 0)
				usage();
			tcp = (int)parse_num(argv[4], 0, 65535);
		}
		run_unix_pair(interval, tcp);
	} else if (strcmp(mode, "mix") == 0 && argc == 3) {
		run_mix((int)parse_num(argv[2], 1, 65533));
	} else if (strcmp(mode, "unix-connect") == 0 && argc == 3) {
		run_unix_connect(argv[2]);
	}
	usage();
}
