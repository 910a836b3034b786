/*
 * ferry-frame-send: one stream of a data channel, sent outside JavaScript.
 *
 *   ferry-frame-send FRAME_BYTES [CORRUPT_FRAME]
 *   ferry-frame-send --rto-max MS USER_TIMEOUT_MS
 *
 * Reads fd 0 (a page pipe CRIU writes, which it enlarges to 4 MiB, or a
 * file) to its end and writes it to fd 3, the TCP socket under the agent's
 * WebSocket (the client side), as masked binary frames of at most
 * FRAME_BYTES with a zero masking key: the frames the agent's own WebSocket
 * would send. The agent has sent the stream-open before and sends the
 * stream-end (with the digest printed here) after, so the receiver is the
 * same one for both paths.
 *
 * Why it exists: sending from JavaScript costs two socket writes, a few
 * objects and a share of the garbage collector per 16 KiB frame, and the
 * sending agent ran out of CPU at about 0.7 of a plain socket. Here a read
 * of 1 MiB becomes one writev of 64 frames.
 *
 * Both fds are non-blocking (shared with the agent, which keeps reading the
 * socket), so every wait is a poll. CORRUPT_FRAME (1-based, test fault):
 * that frame goes out with one byte flipped, after it was hashed.
 *
 * stdout: "+N" after each N bytes sent, then
 *         {"bytes":N,"digest":"<XXH3-64, 16 hex>","frames":F,"cpuMs":C}
 *         (C: this process's own user + system time, which the agent's does not include)
 * Exit: 0 sent; 2 usage; 3 the socket failed (peer gone); 4 reading failed.
 *
 * --rto-max: caps the retransmission timeout of the TCP socket on fd 3
 * (TCP_RTO_MAX_MS, Linux 6.15 and later; the socket is shared with the
 * agent, which cannot set it from Node) and prints the value the kernel
 * then reports. Post-copy waits out a cut link: with the usual exponential
 * backoff a link back after a 20 s cut on the path was noticed only past a
 * 24 s bound (test/postcopy.test.ts), though it came back within it. It also sets
 * TCP_USER_TIMEOUT: without it the kernel gives a connection up after
 * tcp_retries2 retransmissions modelled with this cap, which at 1 s is
 * about 13 s of silence, shorter than the bound.
 * Exit: 0 set; 2 usage; 5 the kernel refused (errno on stderr).
 *
 * Build: gcc -O2 -static -o ferry-frame-send frame-send.c (xxhash.h, header only)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#define READ_BYTES (1 << 20)
#define PIPE_BYTES (4 << 20)
#define MAX_FRAMES 1024 /* per read: READ_BYTES / the smallest FRAME_BYTES */
#define SOCKET_FD 3
#ifndef TCP_RTO_MAX_MS
#define TCP_RTO_MAX_MS 44
#endif

static int cap_rto(const char *rto_value, const char *timeout_value) {
  char *end, *timeout_end;
  long ms = strtol(rto_value, &end, 10);
  long timeout = strtol(timeout_value, &timeout_end, 10);
  if (*end || ms < 1 || ms > 120000 || *timeout_end || timeout < 1 || timeout > 3600000) {
    fprintf(stderr, "ferry-frame-send: --rto-max MS must be 1..120000, USER_TIMEOUT_MS 1..3600000\n");
    return 2;
  }
  int set = (int)ms, got = 0;
  unsigned int user_timeout = (unsigned int)timeout;
  socklen_t length = sizeof(got);
  if (setsockopt(SOCKET_FD, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout)) < 0) {
    fprintf(stderr, "ferry-frame-send: TCP_USER_TIMEOUT: %s\n", strerror(errno));
    return 5;
  }
  if (setsockopt(SOCKET_FD, IPPROTO_TCP, TCP_RTO_MAX_MS, &set, sizeof(set)) < 0 ||
      getsockopt(SOCKET_FD, IPPROTO_TCP, TCP_RTO_MAX_MS, &got, &length) < 0) {
    fprintf(stderr, "ferry-frame-send: TCP_RTO_MAX_MS: %s\n", strerror(errno));
    return 5;
  }
  printf("%d\n", got);
  return 0;
}

static void wait_for(int fd, short events, int failure) {
  struct pollfd pfd = {.fd = fd, .events = events};
  while (poll(&pfd, 1, -1) < 0) {
    if (errno != EINTR) exit(failure);
  }
}

/* Writes every byte of iov; a peer that stops reading holds us here until the agent kills us. */
static void write_all(struct iovec *iov, int count) {
  while (count > 0) {
    ssize_t written = writev(SOCKET_FD, iov, count > IOV_MAX ? IOV_MAX : count);
    if (written < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        wait_for(SOCKET_FD, POLLOUT, 3);
        continue;
      }
      exit(3);
    }
    while (count > 0 && (size_t)written >= iov->iov_len) {
      written -= (ssize_t)iov->iov_len;
      iov++;
      count--;
    }
    if (count > 0) {
      iov->iov_base = (char *)iov->iov_base + written;
      iov->iov_len -= (size_t)written;
    }
  }
}

/* A client frame header: FIN + binary, MASK + length, a zero masking key. */
static size_t frame_header(unsigned char *out, size_t length) {
  size_t at = 0;
  out[at++] = 0x82;
  if (length < 126) {
    out[at++] = (unsigned char)(0x80 | length);
  } else {
    out[at++] = 0x80 | 126;
    out[at++] = (unsigned char)(length >> 8);
    out[at++] = (unsigned char)length;
  }
  memset(out + at, 0, 4);
  return at + 4;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "--rto-max") == 0) return cap_rto(argv[2], argv[3]);
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: ferry-frame-send FRAME_BYTES [CORRUPT_FRAME]\n");
    return 2;
  }
  long frame_bytes = strtol(argv[1], NULL, 10);
  long long corrupt = argc == 3 ? strtoll(argv[2], NULL, 10) : 0;
  if (frame_bytes < READ_BYTES / MAX_FRAMES || frame_bytes > 65535) {
    fprintf(stderr, "ferry-frame-send: FRAME_BYTES must be %d..65535\n", READ_BYTES / MAX_FRAMES);
    return 2;
  }
  /* The agent's death must not leave us holding its socket (and the connection) open. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) return 3;
  signal(SIGPIPE, SIG_IGN);

  static unsigned char buffer[READ_BYTES];
  static unsigned char headers[MAX_FRAMES][8];
  static struct iovec iov[2 * MAX_FRAMES];
  static unsigned char spoiled[65535];
  /*
   * A page pipe of the kernel's default 64 KiB made CRIU and this reader take
   * turns at a few KiB each: a 1 GiB dump ran 11-12 s with 9 s of CPU here in
   * some runs, against 2-3 s with 4 MiB (the agent raises pipe-max-size to it).
   */
  struct stat input;
  if (fstat(0, &input) == 0 && S_ISFIFO(input.st_mode) && fcntl(0, F_SETPIPE_SZ, PIPE_BYTES) < 0) fcntl(0, F_SETPIPE_SZ, READ_BYTES);
  XXH3_state_t *hash = XXH3_createState();
  if (!hash) return 4;
  XXH3_64bits_reset(hash);
  unsigned long long bytes = 0, frames = 0;

  for (;;) {
    /* A FIFO reads 0 until a writer came, so wait for data or a writer's close first. */
    wait_for(0, POLLIN, 4);
    ssize_t got = read(0, buffer, sizeof buffer);
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return 4;
    }
    if (got == 0) break;
    XXH3_64bits_update(hash, buffer, (size_t)got);
    int count = 0;
    for (ssize_t offset = 0; offset < got; offset += frame_bytes) {
      size_t length = (size_t)(got - offset < frame_bytes ? got - offset : frame_bytes);
      unsigned char *payload = buffer + offset;
      frames++;
      if ((long long)frames == corrupt) {
        memcpy(spoiled, payload, length);
        spoiled[length >> 1] ^= 0xff;
        payload = spoiled;
      }
      int index = count / 2;
      iov[count].iov_base = headers[index];
      iov[count++].iov_len = frame_header(headers[index], length);
      iov[count].iov_base = payload;
      iov[count++].iov_len = length;
    }
    write_all(iov, count);
    bytes += (unsigned long long)got;
    printf("+%zd\n", got);
    fflush(stdout);
  }
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  long long cpu_us = (long long)usage.ru_utime.tv_sec * 1000000 + usage.ru_utime.tv_usec + (long long)usage.ru_stime.tv_sec * 1000000 + usage.ru_stime.tv_usec;
  printf("{\"bytes\":%llu,\"digest\":\"%016llx\",\"frames\":%llu,\"cpuMs\":%lld}\n", bytes, (unsigned long long)XXH3_64bits_digest(hash), frames, cpu_us / 1000);
  fflush(stdout);
  return 0;
}
