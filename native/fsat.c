// fsat: the *at system calls Node lacks, for resolving paths inside a
// container's rootfs without ever leaving it (openat2 with RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS) and for changing entries relative to a directory
// handle, never by a path another process could redirect meanwhile.
// Every function is synchronous and throws an Error whose code is the errno
// name (ELOOP, ENOENT, ...). Built by scripts/build-native.sh.
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <node_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif

#define MAX_ARGS 6

typedef struct {
  napi_env env;
  napi_value values[MAX_ARGS];
  size_t count;
  int failed;
} Args;

static napi_value throw_errno(napi_env env, int error, const char *call) {
  const char *name = strerrorname_np(error);
  char message[256];
  snprintf(message, sizeof message, "%s: %s", call, strerror(error));
  napi_throw_error(env, name ? name : "EIO", message);
  return NULL;
}

static Args args_of(napi_env env, napi_callback_info info, size_t expected) {
  Args args = {.env = env, .count = MAX_ARGS};
  napi_get_cb_info(env, info, &args.count, args.values, NULL, NULL);
  if (args.count < expected) {
    napi_throw_type_error(env, NULL, "fsat: too few arguments");
    args.failed = 1;
  }
  return args;
}

static int int_arg(Args *args, size_t index) {
  int32_t value = 0;
  if (!args->failed && napi_get_value_int32(args->env, args->values[index], &value) != napi_ok) {
    napi_throw_type_error(args->env, NULL, "fsat: expected an integer");
    args->failed = 1;
  }
  return value;
}

static double number_arg(Args *args, size_t index) {
  double value = 0;
  if (!args->failed && napi_get_value_double(args->env, args->values[index], &value) != napi_ok) {
    napi_throw_type_error(args->env, NULL, "fsat: expected a number");
    args->failed = 1;
  }
  return value;
}

/** Copies a string argument into `buffer` (PATH_MAX-sized); refuses longer ones. */
static const char *string_arg(Args *args, size_t index, char *buffer) {
  size_t length = 0;
  if (args->failed) return buffer;
  if (napi_get_value_string_utf8(args->env, args->values[index], buffer, PATH_MAX, &length) != napi_ok) {
    napi_throw_type_error(args->env, NULL, "fsat: expected a string");
    args->failed = 1;
  } else if (length >= PATH_MAX - 1) {
    throw_errno(args->env, ENAMETOOLONG, "fsat");
    args->failed = 1;
  }
  return buffer;
}

static napi_value int_result(napi_env env, int value) {
  napi_value result;
  napi_create_int32(env, value, &result);
  return result;
}

/** openat2(dirfd, path, flags, mode, resolve) -> fd */
static napi_value js_openat2(napi_env env, napi_callback_info info) {
  char path[PATH_MAX];
  Args args = args_of(env, info, 5);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, path);
  // Close-on-exec always: CRIU and ferry-helper are spawned while fds are open.
  struct open_how how = {.flags = (unsigned)int_arg(&args, 2) | O_CLOEXEC, .mode = (unsigned)int_arg(&args, 3)};
  how.resolve = (unsigned)int_arg(&args, 4);
  if (args.failed) return NULL;
  int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
  return fd < 0 ? throw_errno(env, errno, "openat2") : int_result(env, fd);
}

/** mkdirat(dirfd, name, mode) */
static napi_value js_mkdirat(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 3);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  int mode = int_arg(&args, 2);
  if (args.failed) return NULL;
  return mkdirat(dirfd, name, (mode_t)mode) < 0 ? throw_errno(env, errno, "mkdirat") : NULL;
}

/** mknodat(dirfd, name, mode, major, minor): mode includes the type bits. */
static napi_value js_mknodat(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 5);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  int mode = int_arg(&args, 2), major_number = int_arg(&args, 3), minor_number = int_arg(&args, 4);
  if (args.failed) return NULL;
  dev_t device = makedev((unsigned)major_number, (unsigned)minor_number);
  return mknodat(dirfd, name, (mode_t)mode, device) < 0 ? throw_errno(env, errno, "mknodat") : NULL;
}

/** symlinkat(target, dirfd, name) */
static napi_value js_symlinkat(napi_env env, napi_callback_info info) {
  char target[PATH_MAX], name[PATH_MAX];
  Args args = args_of(env, info, 3);
  string_arg(&args, 0, target);
  int dirfd = int_arg(&args, 1);
  string_arg(&args, 2, name);
  if (args.failed) return NULL;
  return symlinkat(target, dirfd, name) < 0 ? throw_errno(env, errno, "symlinkat") : NULL;
}

/** linkat(olddirfd, oldname, newdirfd, newname, flags) */
static napi_value js_linkat(napi_env env, napi_callback_info info) {
  char old_name[PATH_MAX], new_name[PATH_MAX];
  Args args = args_of(env, info, 5);
  int old_dirfd = int_arg(&args, 0);
  string_arg(&args, 1, old_name);
  int new_dirfd = int_arg(&args, 2);
  string_arg(&args, 3, new_name);
  int flags = int_arg(&args, 4);
  if (args.failed) return NULL;
  return linkat(old_dirfd, old_name, new_dirfd, new_name, flags) < 0 ? throw_errno(env, errno, "linkat") : NULL;
}

/** unlinkat(dirfd, name, flags) */
static napi_value js_unlinkat(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 3);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  int flags = int_arg(&args, 2);
  if (args.failed) return NULL;
  return unlinkat(dirfd, name, flags) < 0 ? throw_errno(env, errno, "unlinkat") : NULL;
}

/** Removes the entries of the open directory `fd`, never following a link. */
static int empty_directory(int fd) {
  DIR *directory = fdopendir(fd);
  if (!directory) {
    close(fd);
    return -1;
  }
  int result = 0;
  struct dirent *entry;
  while (result == 0 && (errno = 0, entry = readdir(directory))) {
    if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..")) continue;
    if (unlinkat(fd, entry->d_name, 0) == 0 || errno == ENOENT) continue;
    if (errno != EISDIR) {
      result = -1;
      break;
    }
    int child = openat(fd, entry->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (child < 0 || empty_directory(child) < 0 || unlinkat(fd, entry->d_name, AT_REMOVEDIR) < 0) result = -1;
  }
  if (result == 0 && errno != 0) result = -1;
  int saved = errno;
  closedir(directory);
  errno = saved;
  return result;
}

/** removeTreeAt(dirfd, name): rm -r of one entry, by handle; a missing entry is fine. */
static napi_value js_remove_tree_at(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 2);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  if (args.failed) return NULL;
  if (unlinkat(dirfd, name, 0) == 0 || errno == ENOENT) return NULL;
  if (errno != EISDIR) return throw_errno(env, errno, "unlinkat");
  int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 || empty_directory(fd) < 0 || unlinkat(dirfd, name, AT_REMOVEDIR) < 0) {
    return throw_errno(env, errno, "removeTreeAt");
  }
  return NULL;
}

/** modeAt(dirfd, name) -> st_mode of the entry itself (links not followed), 0 if absent. */
static napi_value js_mode_at(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 2);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  if (args.failed) return NULL;
  struct stat stats;
  if (fstatat(dirfd, name, &stats, AT_SYMLINK_NOFOLLOW) == 0) return int_result(env, (int)stats.st_mode);
  return errno == ENOENT ? int_result(env, 0) : throw_errno(env, errno, "fstatat");
}

/** fchownat(dirfd, name, uid, gid, flags); uid and gid may exceed int32. */
static napi_value js_fchownat(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 5);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  uid_t uid = (uid_t)number_arg(&args, 2);
  gid_t gid = (gid_t)number_arg(&args, 3);
  int flags = int_arg(&args, 4);
  if (args.failed) return NULL;
  return fchownat(dirfd, name, uid, gid, flags) < 0 ? throw_errno(env, errno, "fchownat") : NULL;
}

/** fchmodat(dirfd, name, mode, flags) through fchmodat2, the call that honours AT_SYMLINK_NOFOLLOW. */
static napi_value js_fchmodat(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 4);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  int mode = int_arg(&args, 2), flags = int_arg(&args, 3);
  if (args.failed) return NULL;
  return syscall(SYS_fchmodat2, dirfd, name, mode, flags) < 0 ? throw_errno(env, errno, "fchmodat2") : NULL;
}

/** utimensat(dirfd, name, seconds, nanoseconds, flags): sets atime and mtime alike. */
static napi_value js_utimensat(napi_env env, napi_callback_info info) {
  char name[PATH_MAX];
  Args args = args_of(env, info, 5);
  int dirfd = int_arg(&args, 0);
  string_arg(&args, 1, name);
  double seconds = number_arg(&args, 2);
  int nanoseconds = int_arg(&args, 3), flags = int_arg(&args, 4);
  if (args.failed) return NULL;
  struct timespec times[2] = {{.tv_sec = (time_t)seconds, .tv_nsec = nanoseconds}};
  times[1] = times[0];
  return utimensat(dirfd, name, times, flags) < 0 ? throw_errno(env, errno, "utimensat") : NULL;
}

NAPI_MODULE_INIT() {
  static const struct {
    const char *name;
    napi_callback function;
  } functions[] = {
      {"openat2", js_openat2},     {"mkdirat", js_mkdirat},     {"mknodat", js_mknodat},
      {"symlinkat", js_symlinkat}, {"linkat", js_linkat},       {"unlinkat", js_unlinkat},
      {"removeTreeAt", js_remove_tree_at}, {"modeAt", js_mode_at}, {"fchownat", js_fchownat},
      {"fchmodat", js_fchmodat},   {"utimensat", js_utimensat},
  };
  for (size_t index = 0; index < sizeof functions / sizeof functions[0]; index++) {
    napi_value function;
    napi_create_function(env, functions[index].name, NAPI_AUTO_LENGTH, functions[index].function, NULL, &function);
    napi_set_named_property(env, exports, functions[index].name, function);
  }
  return exports;
}
