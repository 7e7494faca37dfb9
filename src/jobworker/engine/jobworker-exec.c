/* jobworker-exec: the last link of the exec chain of a job that runs as another user.
 *
 *   jobworker-exec ENVFD UID GID GROUPS CWD ARGV0 [ARG...]
 *
 * Started as root (by the job supervisor, with a fixed environment), it reads the job's
 * environment from ENVFD (NAME=VALUE entries, each ending in NUL, so that no secret
 * shows in a command line), drops to UID/GID and GROUPS ("-" for none, else a comma list),
 * enters CWD as that user and execs ARGV0, searched in the job's own PATH. One small
 * static exec instead of setpriv and env(1); docs/ARCHITECTURE.md, "Running as another
 * user". Failures name what failed on stderr (the job's stderr file) and exit like env(1):
 * 125 before the exec, 126 when the command cannot run, 127 when it is not found.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_GROUPS 65536
#define MAX_ENV_BYTES (64L << 20)

extern char **environ;

static void fail(int code, const char *what, const char *arg, int err) {
  fprintf(stderr, "jobworker-exec: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "",
          strerror(err));
  exit(code);
}

static unsigned long number(const char *text, unsigned long max, const char *what) {
  char *end;
  errno = 0;
  unsigned long value = strtoul(text, &end, 10);
  if (errno || end == text || *end || text[0] == '-' || value > max)
    fail(125, "bad argument:", what, EINVAL);
  return value;
}

/* The environment as a NULL-ended array, read whole from fd. */
static char **read_env(int fd) {
  size_t size = 0, cap = 4096;
  char *buf = malloc(cap + 1);
  if (!buf) fail(125, "cannot read the environment", NULL, ENOMEM);
  for (;;) {
    if (size == cap) {
      if (cap >= MAX_ENV_BYTES) fail(125, "cannot read the environment", NULL, E2BIG);
      cap *= 2;
      if (!(buf = realloc(buf, cap + 1))) fail(125, "cannot read the environment", NULL, ENOMEM);
    }
    ssize_t got = read(fd, buf + size, cap - size);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail(125, "cannot read the environment", NULL, errno);
    if (got == 0) break;
    size += (size_t)got;
  }
  close(fd);
  size_t count = 0;
  for (size_t i = 0; i < size; i++) count += buf[i] == '\0';
  char **env = calloc(count + 1, sizeof(char *));
  if (!env) fail(125, "cannot read the environment", NULL, ENOMEM);
  for (size_t i = 0, start = 0, n = 0; i < size; i++) {
    if (buf[i] == '\0') {
      env[n++] = buf + start;
      start = i + 1;
    }
  }
  return env;
}

static void drop(const char *uid_text, const char *gid_text, const char *groups_text) {
  uid_t uid = (uid_t)number(uid_text, UINT_MAX - 1, "UID");
  gid_t gid = (gid_t)number(gid_text, UINT_MAX - 1, "GID");
  static gid_t groups[MAX_GROUPS];
  size_t count = 0;
  if (strcmp(groups_text, "-") != 0) {
    char *copy = strdup(groups_text), *save = NULL;
    if (!copy) fail(125, "cannot drop privileges", NULL, ENOMEM);
    for (char *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
      if (count == MAX_GROUPS) fail(125, "bad argument:", "GROUPS", E2BIG);
      groups[count++] = (gid_t)number(g, UINT_MAX - 1, "GROUPS");
    }
  }
  if (setgroups(count, groups) != 0) fail(125, "cannot set the groups of uid", uid_text, errno);
  if (setresgid(gid, gid, gid) != 0) fail(125, "cannot drop to gid", gid_text, errno);
  if (setresuid(uid, uid, uid) != 0) fail(125, "cannot drop to uid", uid_text, errno);
  uid_t r, e, s;
  if (getresuid(&r, &e, &s) != 0 || r != uid || e != uid || s != uid)
    fail(125, "cannot drop to uid", uid_text, EPERM);
}

int main(int argc, char **argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: jobworker-exec ENVFD UID GID GROUPS CWD ARGV0 [ARG...]\n");
    return 125;
  }
  char **env = read_env((int)number(argv[1], INT_MAX, "ENVFD"));
  drop(argv[2], argv[3], argv[4]);
  if (chdir(argv[5]) != 0) fail(125, "cannot enter the working directory", argv[5], errno);
  environ = env; /* execvp searches the job's PATH and hands the job its environment */
  execvp(argv[6], argv + 6);
  fail(errno == ENOENT ? 127 : 126, "cannot execute", argv[6], errno);
  return 127;
}
