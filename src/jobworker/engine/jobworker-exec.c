/* jobworker-exec: the last link of the exec chain of a job that runs as another user.
 *
 *   jobworker-exec ENVFD UID GID GROUPS CWD ARGV0 [ARG...]
 *
 * Started as root (by the job supervisor, with a fixed environment), it reads the job's
 * environment from ENVFD (NAME=VALUE entries, each ending in NUL, so that no secret
 * shows in a command line), drops to UID/GID and GROUPS ("-" for none, else a comma list),
 * enters CWD as that user and execs ARGV0, searched in the job's own PATH as execvp(3)
 * does. One small static exec instead of setpriv and env(1); docs/ARCHITECTURE.md,
 * "Running as another user". Failures name what failed on stderr (the job's stderr file)
 * and exit like env(1): 125 before the exec, 126 when the command cannot run, 127 when it
 * is not found.
 *
 * On x86-64 and arm64 it is built without a C library (JW_NOLIBC, exec_helper.py): a static
 * glibc's start-up alone (CPU feature probing, which traps in a VM) cost 0.4 ms of CPU a
 * job, the helper's whole cost now being about 0.06 ms (docs/benchmarks.md). Its system
 * calls are raw: one thread, so setresuid needs none of the C library's all-thread dance.
 */
#ifdef JW_NOLIBC
typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned int uid_t;
typedef unsigned int gid_t;
#define NULL ((void *)0)
#define UINT_MAX 4294967295UL
#define INT_MAX 2147483647UL
#if defined(__x86_64__)
enum { NR_READ = 0, NR_WRITE = 1, NR_CLOSE = 3, NR_MMAP = 9, NR_MUNMAP = 11, NR_EXECVE = 59,
       NR_CHDIR = 80, NR_SETGROUPS = 116, NR_SETRESUID = 117, NR_GETRESUID = 118,
       NR_SETRESGID = 119, NR_EXIT_GROUP = 231 };
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
  register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
  long ret;
  __asm__ volatile("syscall"
                   : "=a"(ret)
                   : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                   : "rcx", "r11", "memory");
  return ret;
}
__asm__(".text\n.global _start\n_start:\n xor %rbp, %rbp\n mov %rsp, %rdi\n"
        " and $-16, %rsp\n call jw_start\n hlt\n");
#elif defined(__aarch64__)
enum { NR_READ = 63, NR_WRITE = 64, NR_CLOSE = 57, NR_MMAP = 222, NR_MUNMAP = 215,
       NR_EXECVE = 221, NR_CHDIR = 49, NR_SETGROUPS = 159, NR_SETRESUID = 147,
       NR_GETRESUID = 148, NR_SETRESGID = 149, NR_EXIT_GROUP = 94 };
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
  register long x8 __asm__("x8") = n, x0 __asm__("x0") = a, x1 __asm__("x1") = b;
  register long x2 __asm__("x2") = c, x3 __asm__("x3") = d, x4 __asm__("x4") = e;
  register long x5 __asm__("x5") = f;
  __asm__ volatile("svc #0"
                   : "+r"(x0)
                   : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                   : "memory");
  return x0;
}
__asm__(".text\n.global _start\n_start:\n mov x29, #0\n mov x0, sp\n bl jw_start\n");
#else
#error "JW_NOLIBC: x86-64 and arm64 only (exec_helper.py then builds with the C library)"
#endif
/* Each returns the result, or -errno, as the kernel does. */
#define SYS(n, a, b, c) sys6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
static ssize_t jw_read(int fd, void *buf, size_t n) { return SYS(NR_READ, fd, buf, n); }
static ssize_t jw_write(int fd, const void *buf, size_t n) { return SYS(NR_WRITE, fd, buf, n); }
static void jw_close(int fd) { SYS(NR_CLOSE, fd, 0, 0); }
static int jw_chdir(const char *path) { return (int)SYS(NR_CHDIR, path, 0, 0); }
static int jw_execve(const char *path, char *const *argv, char *const *envp) {
  return (int)SYS(NR_EXECVE, path, argv, envp);
}
static int jw_setgroups(size_t n, const gid_t *groups) {
  return (int)SYS(NR_SETGROUPS, n, groups, 0);
}
static int jw_setresgid(gid_t g) { return (int)SYS(NR_SETRESGID, g, g, g); }
static int jw_setresuid(uid_t u) { return (int)SYS(NR_SETRESUID, u, u, u); }
static int jw_getresuid(uid_t *r, uid_t *e, uid_t *s) { return (int)SYS(NR_GETRESUID, r, e, s); }
static __attribute__((noreturn)) void jw_exit(int code) {
  for (;;) SYS(NR_EXIT_GROUP, code, 0, 0);
}
static void *jw_alloc(size_t n) { /* anonymous, private, read-write; NULL on failure */
  long p = sys6(NR_MMAP, 0, (long)n, 3 /* PROT_READ|WRITE */, 0x22 /* PRIVATE|ANON */, -1, 0);
  return p < 0 && p > -4096 ? NULL : (void *)p;
}
static void jw_free(void *p, size_t n) { SYS(NR_MUNMAP, p, n, 0); }
/* What the compiler may call on its own for copies and zeroing. */
void *memcpy(void *to, const void *from, size_t n) {
  char *t = to;
  const char *f = from;
  while (n--) *t++ = *f++;
  return to;
}
void *memset(void *to, int c, size_t n) {
  char *t = to;
  while (n--) *t++ = (char)c;
  return to;
}
#else /* the C library's calls behind the same names (other architectures) */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
static long RET(long result) { return result < 0 ? -errno : result; }
static ssize_t jw_read(int fd, void *buf, size_t n) { return RET(read(fd, buf, n)); }
static ssize_t jw_write(int fd, const void *buf, size_t n) { return RET(write(fd, buf, n)); }
static void jw_close(int fd) { close(fd); }
static int jw_chdir(const char *path) { return RET(chdir(path)); }
static int jw_execve(const char *path, char *const *argv, char *const *envp) {
  return RET(execve(path, argv, envp));
}
static int jw_setgroups(size_t n, const gid_t *groups) { return RET(setgroups(n, groups)); }
static int jw_setresgid(gid_t g) { return RET(setresgid(g, g, g)); }
static int jw_setresuid(uid_t u) { return RET(setresuid(u, u, u)); }
static int jw_getresuid(uid_t *r, uid_t *e, uid_t *s) { return RET(getresuid(r, e, s)); }
static __attribute__((noreturn)) void jw_exit(int code) { _exit(code); }
static void *jw_alloc(size_t n) {
  void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}
static void jw_free(void *p, size_t n) { munmap(p, n); }
#endif

enum { EPERM_ = 1, ENOENT_ = 2, EINTR_ = 4, ENOEXEC_ = 8, ENOMEM_ = 12, EACCES_ = 13,
       ENOTDIR_ = 20, EINVAL_ = 22, E2BIG_ = 7, ESTALE_ = 116, ENODEV_ = 19,
       ETIMEDOUT_ = 110 };
#define MAX_GROUPS 65536
#define MAX_ENV_BYTES (64L << 20)
#define SH "/bin/sh"

static size_t length(const char *s) {
  size_t n = 0;
  while (s[n]) n++;
  return n;
}

static int same(const char *a, const char *b) {
  while (*a && *a == *b) a++, b++;
  return *a == *b;
}

/* strerror(3)'s words for what these calls can fail with; others by number. */
static const char *reason(int err, char *buf) {
  static const struct { int err; const char *text; } known[] = {
      {1, "Operation not permitted"}, {2, "No such file or directory"},
      {5, "Input/output error"}, {7, "Argument list too long"}, {8, "Exec format error"},
      {9, "Bad file descriptor"}, {11, "Resource temporarily unavailable"},
      {12, "Cannot allocate memory"}, {13, "Permission denied"}, {14, "Bad address"},
      {20, "Not a directory"}, {21, "Is a directory"}, {22, "Invalid argument"},
      {23, "Too many open files in system"}, {24, "Too many open files"},
      {26, "Text file busy"}, {36, "File name too long"},
      {40, "Too many levels of symbolic links"}, {116, "Stale file handle"},
  };
  for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
    if (known[i].err == err) return known[i].text;
  char digits[12];
  int n = 0;
  unsigned v = (unsigned)err;
  do digits[n++] = (char)('0' + v % 10); while ((v /= 10) && n < 11);
  char *out = buf;
  for (const char *w = "Unknown error "; *w;) *out++ = *w++;
  while (n) *out++ = digits[--n];
  *out = 0;
  return buf;
}

/* "jobworker-exec: WHAT[ ARG][: REASON]" on stderr (no reason when err is 0), then exit
 * with `code`. */
static __attribute__((noreturn)) void fail(int code, const char *what, const char *arg, int err) {
  char buf[32];
  const char *parts[] = {"jobworker-exec: ", what, arg ? " " : "", arg ? arg : "",
                         err ? ": " : "", err ? reason(err, buf) : "", "\n"};
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    const char *p = parts[i];
    size_t n = length(p);
    while (n) {
      ssize_t done = jw_write(2, p, n);
      if (done == -EINTR_) continue;
      if (done <= 0) break;
      p += done, n -= (size_t)done;
    }
  }
  jw_exit(code);
}

/* The decimal at `text` (no sign, nothing after it, at most `max`). */
static unsigned long number(const char *text, unsigned long max, const char *what) {
  unsigned long value = 0;
  if (!*text) fail(125, "bad argument:", what, EINVAL_);
  for (const char *c = text; *c; c++) {
    if (*c < '0' || *c > '9' || value > (max - (unsigned long)(*c - '0')) / 10)
      fail(125, "bad argument:", what, EINVAL_);
    value = value * 10 + (unsigned long)(*c - '0');
  }
  return value;
}

/* The environment as a NULL-ended array, read whole from fd. */
static char **read_env(int fd) {
  size_t size = 0, cap = 64 << 10;
  char *buf = jw_alloc(cap);
  if (!buf) fail(125, "cannot read the environment", NULL, ENOMEM_);
  for (;;) {
    if (size == cap) {
      if (cap >= MAX_ENV_BYTES) fail(125, "cannot read the environment", NULL, E2BIG_);
      char *bigger = jw_alloc(cap * 2);
      if (!bigger) fail(125, "cannot read the environment", NULL, ENOMEM_);
      for (size_t i = 0; i < size; i++) bigger[i] = buf[i];
      jw_free(buf, cap);
      buf = bigger, cap *= 2;
    }
    ssize_t got = jw_read(fd, buf + size, cap - size);
    if (got == -EINTR_) continue;
    if (got < 0) fail(125, "cannot read the environment", NULL, (int)-got);
    if (got == 0) break;
    size += (size_t)got;
  }
  jw_close(fd);
  size_t count = 0;
  for (size_t i = 0; i < size; i++) count += buf[i] == '\0';
  char **env = jw_alloc((count + 1) * sizeof(char *));
  if (!env) fail(125, "cannot read the environment", NULL, ENOMEM_);
  for (size_t i = 0, start = 0, n = 0; i < size; i++) {
    if (buf[i] == '\0') {
      env[n++] = buf + start;
      start = i + 1;
    }
  }
  env[count] = NULL;
  return env;
}

static void drop(const char *uid_text, const char *gid_text, const char *groups_text) {
  uid_t uid = (uid_t)number(uid_text, UINT_MAX - 1, "UID");
  gid_t gid = (gid_t)number(gid_text, UINT_MAX - 1, "GID");
  static gid_t groups[MAX_GROUPS];
  size_t count = 0;
  if (!same(groups_text, "-")) {
    char item[16];
    const char *g = groups_text;
    for (;;) {
      size_t n = 0;
      while (g[n] && g[n] != ',') n++;
      if (n == 0 || n >= sizeof item) fail(125, "bad argument:", "GROUPS", EINVAL_);
      if (count == MAX_GROUPS) fail(125, "bad argument:", "GROUPS", E2BIG_);
      for (size_t i = 0; i < n; i++) item[i] = g[i];
      item[n] = 0;
      groups[count++] = (gid_t)number(item, UINT_MAX - 1, "GROUPS");
      if (!g[n]) break;
      g += n + 1;
    }
  }
  int err;
  if ((err = jw_setgroups(count, groups)) < 0) fail(125, "cannot set the groups of uid", uid_text, -err);
  if ((err = jw_setresgid(gid)) < 0) fail(125, "cannot drop to gid", gid_text, -err);
  if ((err = jw_setresuid(uid)) < 0) fail(125, "cannot drop to uid", uid_text, -err);
  uid_t r, e, s;
  if (jw_getresuid(&r, &e, &s) < 0 || r != uid || e != uid || s != uid)
    fail(125, "cannot drop to uid", uid_text, EPERM_);
}

static const char *getenv_in(char **env, const char *name) {
  size_t n = length(name);
  for (; *env; env++) {
    size_t i = 0;
    while (i < n && (*env)[i] == name[i]) i++;
    if (i == n && (*env)[n] == '=') return *env + n + 1;
  }
  return NULL;
}

/* execve, and what execvp does for a file the kernel cannot run (ENOEXEC): a script
 * without "#!" runs through /bin/sh. Returns the error (positive) when neither ran. */
static int run(const char *path, char **argv, char **env) {
  int err = -jw_execve(path, argv, env);
  if (err != ENOEXEC_) return err;
  size_t argc = 0;
  while (argv[argc]) argc++;
  char **sh = jw_alloc((argc + 2) * sizeof(char *));
  if (!sh) return ENOMEM_;
  sh[0] = SH, sh[1] = (char *)path;
  for (size_t i = 1; i <= argc; i++) sh[i + 1] = argv[i];
  jw_execve(SH, sh, env);
  return ENOEXEC_;
}

/* execvp(3): `file` as it is when it names a path, else tried in each folder of the
 * job's PATH ("" or no PATH as glibc does); the last telling error otherwise. */
static int execvp_env(const char *file, char **argv, char **env) {
  if (!*file) return ENOENT_;
  for (const char *c = file; *c; c++)
    if (*c == '/') return run(file, argv, env);
  const char *path = getenv_in(env, "PATH");
  if (!path) path = "/bin:/usr/bin";
  size_t flen = length(file);
  char *full = jw_alloc(4096 + flen + 2);
  if (!full) return ENOMEM_;
  int denied = 0, err = ENOENT_;
  for (const char *dir = path;; dir++) {
    size_t n = 0;
    while (dir[n] && dir[n] != ':') n++;
    if (n <= 4096) {
      size_t k = 0;
      for (; k < n; k++) full[k] = dir[k];
      if (n) full[k++] = '/';
      for (size_t i = 0; i <= flen; i++) full[k + i] = file[i];
      err = run(full, argv, env);
      if (err == EACCES_) denied = 1;
      else if (err != ENOENT_ && err != ENOTDIR_ && err != ESTALE_ && err != ENODEV_ &&
               err != ETIMEDOUT_)
        return err; /* found, and it cannot run: execvp stops here too */
    }
    dir += n;
    if (!*dir) break;
  }
  return denied ? EACCES_ : err;
}

static int jw_main(int argc, char **argv) {
  if (argc < 7) {
    fail(125, "usage: jobworker-exec ENVFD UID GID GROUPS CWD ARGV0 [ARG...]", NULL, 0);
  }
  char **env = read_env((int)number(argv[1], INT_MAX, "ENVFD"));
  drop(argv[2], argv[3], argv[4]);
  int err = -jw_chdir(argv[5]);
  if (err > 0) fail(125, "cannot enter the working directory", argv[5], err);
  err = execvp_env(argv[6], argv + 6, env);
  fail(err == ENOENT_ ? 127 : 126, "cannot execute", argv[6], err);
}

#ifdef JW_NOLIBC
__attribute__((used, noreturn)) void jw_start(long *sp) {
  jw_exit(jw_main((int)sp[0], (char **)(sp + 1)));
}
#else
int main(int argc, char **argv) { return jw_main(argc, argv); }
#endif
