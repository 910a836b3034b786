/*
 * memload: a memory workload for migration tests.
 *
 *   memload --mib N [--seed S] [--dirty-mibps D] [--fork-verify-ms F]
 *
 * Allocates N MiB (MAP_POPULATE: first-touch faults are slow in VMs), fills
 * every page with a pattern derived from (seed, page, generation) and keeps a
 * per-page generation array. With D > 0 it rewrites
 * about D MiB per second (every 10 ms, pages round-robin, generation + 1).
 * With F > 0, every F ms (one at a time) it forks a child that verifies 64
 * pages spread over its copy of the memory (another set each time) and prints
 * "fork verify ok pages <n>" or "fork verify mismatch page <i>": tasks forked
 * while pages still arrive.
 *
 *   start:   "memload ready mib <N> seed <S> checksum <hex64>"
 *   SIGUSR1: "checksum <hex64> pages <n> generation-sum <g>"
 *   SIGUSR2: "verify ok pages <n>" or "verify mismatch page <i>"
 *
 * checksum: FNV-1a 64 over the memory taken as little-endian 64-bit words
 * (h ^= word; h *= 0x100000001b3), offset basis 0xcbf29ce484222325.
 * Pattern word j of page p at generation g: splitmix64 stream seeded with
 * mix(seed ^ mix(p + 1) ^ mix((g + 1) << 32)), one output per word.
 *
 * Signals only set flags; the work happens in the main loop, which sleeps
 * with nanosleep (relative, so it resumes sanely after a CRIU restore).
 * Build: gcc -O2 -static -o memload memload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define STEP_NS 10000000L /* 10 ms between dirtying steps */
#define IDLE_NS 100000000L /* 100 ms sleeps when not dirtying */

static volatile sig_atomic_t want_checksum, want_verify;

static uint8_t *mem;
static uint32_t *gen;
static size_t page_size, npages, words_per_page;
static uint64_t seed;

static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static inline uint64_t page_state(size_t page, uint32_t g)
{
	return mix64(seed ^ mix64((uint64_t)page + 1) ^ mix64(((uint64_t)g + 1) << 32));
}

static void fill_page(size_t page)
{
	uint64_t *w = (uint64_t *)(mem + page * page_size);
	uint64_t s = page_state(page, gen[page]);
	for (size_t j = 0; j < words_per_page; j++) {
		s += 0x9e3779b97f4a7c15ULL;
		w[j] = mix64(s);
	}
	/* The memory is only read on a signal: keep the stores. */
	__asm__ __volatile__("" : : "r"(w) : "memory");
}

static int page_ok(size_t page)
{
	const uint64_t *w = (const uint64_t *)(mem + page * page_size);
	uint64_t s = page_state(page, gen[page]);
	for (size_t j = 0; j < words_per_page; j++) {
		s += 0x9e3779b97f4a7c15ULL;
		if (w[j] != mix64(s))
			return 0;
	}
	return 1;
}

static uint64_t checksum(void)
{
	const uint64_t *w = (const uint64_t *)mem;
	size_t n = npages * words_per_page;
	uint64_t h = 0xcbf29ce484222325ULL;
	__asm__ __volatile__("" : : : "memory");
	for (size_t i = 0; i < n; i++) {
		h ^= w[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static uint64_t generation_sum(void)
{
	uint64_t sum = 0;
	for (size_t i = 0; i < npages; i++)
		sum += gen[i];
	return sum;
}

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		want_checksum = 1;
	else if (sig == SIGUSR2)
		want_verify = 1;
}

static void usage(void)
{
	fprintf(stderr, "usage: memload --mib N [--seed S] [--dirty-mibps D] [--fork-verify-ms F]\n");
	exit(2);
}

static uint64_t parse_u64(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0' || *s == '-')
		usage();
	return v;
}

static double parse_rate(const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || *s == '\0' || *end != '\0' || !(v >= 0))
		usage();
	return v;
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Checks pages from, from + stride, ...; prints "<what> ok pages <n>" or "<what> mismatch page <i>". */
static void report_verify(const char *what, size_t from, size_t stride)
{
	size_t checked = 0;
	for (size_t p = from; p < npages; p += stride, checked++)
		if (!page_ok(p)) {
			printf("%s mismatch page %zu\n", what, p);
			fflush(stdout);
			return;
		}
	printf("%s ok pages %zu\n", what, checked);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	uint64_t mib = 0;
	double dirty_mibps = 0;
	uint64_t fork_ms = 0;
	int have_mib = 0;

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (strcmp(argv[i], "--mib") == 0) {
			mib = parse_u64(argv[++i]);
			have_mib = 1;
		} else if (strcmp(argv[i], "--seed") == 0) {
			seed = parse_u64(argv[++i]);
		} else if (strcmp(argv[i], "--dirty-mibps") == 0) {
			dirty_mibps = parse_rate(argv[++i]);
		} else if (strcmp(argv[i], "--fork-verify-ms") == 0) {
			fork_ms = parse_u64(argv[++i]);
		} else {
			usage();
		}
	}
	if (!have_mib || mib == 0 || mib > (1ULL << 22))
		usage();

	long ps = sysconf(_SC_PAGESIZE);
	page_size = ps > 0 ? (size_t)ps : 4096;
	words_per_page = page_size / sizeof(uint64_t);
	npages = (size_t)(mib * MIB / page_size);

	mem = mmap(NULL, npages * page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("memload: mmap");
		return 1;
	}
	gen = calloc(npages, sizeof(*gen));
	if (!gen) {
		perror("memload: calloc");
		return 1;
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: let nanosleep return EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);

	for (size_t p = 0; p < npages; p++)
		fill_page(p);
	printf("memload ready mib %" PRIu64 " seed %" PRIu64 " checksum %016" PRIx64 "\n", mib, seed, checksum());
	fflush(stdout);

	/* Pages to rewrite per nanosecond of elapsed time. */
	double pages_per_ns = dirty_mibps * (double)MIB / (double)page_size / 1e9;
	double owed = 0;
	size_t cursor = 0;
	int64_t last = now_ns();
	int64_t last_fork = last;
	pid_t child = 0;
	size_t forks = 0;

	for (;;) {
		if (child > 0 && waitpid(child, NULL, WNOHANG) == child)
			child = 0;
		if (fork_ms > 0 && child == 0 && now_ns() - last_fork >= (int64_t)fork_ms * 1000000LL) {
			last_fork = now_ns();
			child = fork();
			forks++;
			if (child == 0) {
				/* 64 pages spread over the memory, a different set each time: quick, so forks keep coming. */
				size_t stride = npages > 64 ? npages / 64 : 1;
				report_verify("fork verify", forks % stride, stride);
				_exit(0);
			}
			if (child < 0)
				child = 0;
		}
		if (want_checksum) {
			want_checksum = 0;
			printf("checksum %016" PRIx64 " pages %zu generation-sum %" PRIu64 "\n", checksum(), npages,
			       generation_sum());
			fflush(stdout);
		}
		if (want_verify) {
			want_verify = 0;
			report_verify("verify", 0, 1);
		}

		if (pages_per_ns > 0) {
			int64_t t = now_ns();
			int64_t elapsed = t - last;
			last = t;
			/* Clamp: across a freeze or a restore (new clock) do not burst. */
			if (elapsed < 0 || elapsed > 10 * STEP_NS)
				elapsed = STEP_NS;
			owed += pages_per_ns * (double)elapsed;
			while (owed >= 1) {
				gen[cursor]++;
				fill_page(cursor);
				cursor = (cursor + 1) % npages;
				owed -= 1;
			}
		}

		struct timespec ts = { 0, pages_per_ns > 0 || fork_ms > 0 ? STEP_NS : IDLE_NS };
		nanosleep(&ts, NULL); /* EINTR on a signal: handled at the top */
	}
}
