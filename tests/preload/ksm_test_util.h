/* Helpers for the kernel-ABI tests: plain C, Linux headers only, no samepage.
 * Each test program runs natively against kernel KSM and under
 * `samepage run`, with the same assertions.
 *
 * Kernel KSM is global: a native run saves every knob it changes, and at
 * exit restores them, unmerges everything (run=2) and stops (run=0). */

#ifndef SAMEPAGE_TESTS_PRELOAD_KSM_TEST_UTIL_H_
#define SAMEPAGE_TESTS_PRELOAD_KSM_TEST_UTIL_H_

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KSM_DIR "/sys/kernel/mm/ksm/"
#define SKIP_CODE 77
#define PAGE 4096
#define UNUSED __attribute__((unused))

#ifndef MADV_MERGEABLE
#define MADV_MERGEABLE 12
#define MADV_UNMERGEABLE 13
#endif
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) {                                                        \
      fprintf(stderr, "%s:%d: CHECK failed: %s (errno %d %s)\n", __FILE__, \
              __LINE__, #cond, errno, strerror(errno));                   \
      exit(1);                                                            \
    }                                                                     \
  } while (0)

/* Expects a call to fail with -1/err. */
#define CHECK_ERR(call, err)                                              \
  do {                                                                    \
    errno = 0;                                                            \
    long r_ = (long)(call);                                               \
    int e_ = errno;                                                       \
    if (r_ != -1 || e_ != (err)) {                                        \
      fprintf(stderr, "%s:%d: %s returned %ld errno %d (%s), want -1 %s\n", \
              __FILE__, __LINE__, #call, r_, e_, strerror(e_), #err);     \
      exit(1);                                                            \
    }                                                                     \
  } while (0)

UNUSED static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

UNUSED static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* read(2) of a whole small file: bytes read, or -1 with errno. */
UNUSED static ssize_t read_text(const char* path, char* buf, size_t size) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, size - 1);
  int e = errno;
  close(fd);
  if (n < 0) {
    errno = e;
    return -1;
  }
  buf[n] = '\0';
  return n;
}

/* Pss of process `pid` in kB (/proc/PID/smaps_rollup); -1 on error. */
UNUSED static long pss_kb(int pid) {
  char path[64], text[4096];
  snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", pid);
  if (read_text(path, text, sizeof(text)) <= 0) return -1;
  const char* at = strstr(text, "\nPss:");
  return at != NULL ? strtol(at + 5, NULL, 10) : -1;
}

/* echo-like write: 0, or -1 with the errno of open or write. */
UNUSED static int write_text(const char* path, const char* text) {
  int fd = open(path, O_WRONLY);
  if (fd < 0) return -1;
  ssize_t n = write(fd, text, strlen(text));
  int e = errno;
  close(fd);
  if (n < 0) {
    errno = e;
    return -1;
  }
  return n == (ssize_t)strlen(text) ? 0 : -1;
}

UNUSED static unsigned long read_ulong(const char* path) {
  char buf[64];
  CHECK(read_text(path, buf, sizeof(buf)) > 0);
  return strtoul(buf, NULL, 10);
}

UNUSED static void write_knob(const char* name, const char* value) {
  char path[128];
  snprintf(path, sizeof(path), KSM_DIR "%s", name);
  if (write_text(path, value) != 0) {
    fprintf(stderr, "write %s=%s: %s\n", name, value, strerror(errno));
    exit(1);
  }
}

/* The knobs a test changes, saved for the exit handler. */
static struct {
  const char* name;
  char value[32];
  int saved;
} g_saved[] = {{"pages_to_scan"}, {"sleep_millisecs"}, {"use_zero_pages"}};

UNUSED static void restore_ksm(void) {
  for (size_t i = 0; i < sizeof(g_saved) / sizeof(g_saved[0]); ++i) {
    if (g_saved[i].saved) write_knob(g_saved[i].name, g_saved[i].value);
  }
  write_knob("run", "2");  /* unmerge everything */
  write_knob("run", "0");
}

static pid_t g_saved_by; /* the process that saved them */

/* A signal that ends the test (its output piped into `head`, ^C, a
 * timeout's SIGTERM) restores the knobs too, in the process that saved
 * them, then ends it as the signal would have: atexit handlers do not run
 * then, and a native run left the kernel scanning at full speed. */
UNUSED static void restore_ksm_and_die(int sig) {
  if (getpid() == g_saved_by) restore_ksm();
  signal(sig, SIG_DFL);
  raise(sig);
}

/* The watchdog (start_watchdog): a hung run ends with a message and where
 * each thread stopped, rather than silently at ctest's timeout. Only
 * system calls and stack buffers: the hang may hold malloc's lock. */
static const char* g_watchdog_test = "test";
static unsigned g_watchdog_seconds;

UNUSED static void watchdog_puts(const char* s) {
  (void)!write(2, s, strlen(s));
}

/* v in decimal, written at the end of digits[24]; returns its start. */
UNUSED static char* watchdog_decimal(unsigned long v, char digits[24]) {
  int n = 24;
  digits[--n] = '\0';
  do {
    digits[--n] = (char)('0' + v % 10);
    v /= 10;
  } while (v != 0 && n > 0);
  return &digits[n];
}

UNUSED static void watchdog_put_ulong(unsigned long v) {
  char digits[24];
  watchdog_puts(watchdog_decimal(v, digits));
}

/* Copies /proc/self/task/<tid>/<what> to stderr under a heading. */
UNUSED static void watchdog_dump_file(const char* tid, const char* what) {
  char path[96] = "/proc/self/task/";
  strcat(path, tid);
  strcat(path, "/");
  strcat(path, what);
  const int fd = open(path, O_RDONLY);
  if (fd < 0) return;
  watchdog_puts("  ");
  watchdog_puts(what);
  watchdog_puts(": ");
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) (void)!write(2, buf, (size_t)n);
  if (strcmp(what, "wchan") == 0) watchdog_puts("\n");
  close(fd);
}

/* Every thread's name, wait channel, system call (number and arguments:
 * a futex address tells which lock) and kernel stack (root only). */
UNUSED static void watchdog_dump_threads(void) {
  const int dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY);
  if (dir < 0) return;
  char buf[4096];
  long n;
  while ((n = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
    for (long at = 0; at < n;) {
      /* struct linux_dirent64: ino 8, off 8, reclen 2, type 1, name */
      unsigned short reclen;
      memcpy(&reclen, buf + at + 16, sizeof(reclen));
      const char* name = buf + at + 19;
      at += reclen;
      if (name[0] == '.') continue;
      watchdog_puts("thread ");
      watchdog_puts(name);
      watchdog_puts("\n");
      watchdog_dump_file(name, "comm");
      watchdog_dump_file(name, "wchan");
      watchdog_dump_file(name, "syscall");
      watchdog_dump_file(name, "stack");
    }
  }
  close(dir);
}

/* Each mapping of /proc/self/smaps with its VmFlags (um and uw: registered
 * with a userfaultfd for missing pages or write-protection). */
UNUSED static void watchdog_dump_mappings(void) {
  const int fd = open("/proc/self/smaps", O_RDONLY);
  if (fd < 0) return;
  watchdog_puts("mappings and their VmFlags:\n");
  char buf[4096], line[512];
  size_t len = 0;
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) {
    for (ssize_t i = 0; i < n; ++i) {
      if (len < sizeof(line) - 1) line[len++] = buf[i];
      if (buf[i] != '\n') continue;
      /* A header starts with a hex digit; a field with a capital. */
      const char c = line[0];
      const int header = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
      if (header || (len > 8 && memcmp(line, "VmFlags:", 8) == 0))
        (void)!write(2, line, len);
      len = 0;
    }
  }
  close(fd);
}

/* Where gdb is installed, every thread's user-space stack, from a gdb
 * started by vfork (fork would run the atfork handlers, which may be what
 * hangs). */
UNUSED static void watchdog_run_gdb(void) {
  static const char gdb[] = "/usr/bin/gdb";
  if (access(gdb, X_OK) != 0) return;
  char digits[24];
  char* pid = watchdog_decimal((unsigned long)getpid(), digits);
  char* const argv[] = {(char*)"gdb",
                        (char*)"-nx",
                        (char*)"-batch",
                        (char*)"-p",
                        pid,
                        (char*)"-ex",
                        (char*)"thread apply all bt",
                        (char*)"-ex",
                        (char*)"thread apply all x/i $pc",
                        (char*)"-ex",
                        (char*)"thread apply all info registers",
                        NULL};
  char* const envp[] = {NULL};
  const pid_t child = vfork();
  if (child == 0) {
    dup2(2, 1);
    execve(gdb, argv, envp);
    _exit(127);
  }
  if (child > 0) (void)waitpid(child, NULL, 0);
}

UNUSED static void watchdog_fired(int sig) {
  signal(SIGALRM, SIG_DFL);
  alarm(25); /* the dump and the knobs' restore are bounded too */
  watchdog_puts(g_watchdog_test);
  watchdog_puts(": no progress in ");
  watchdog_put_ulong(g_watchdog_seconds);
  watchdog_puts(" s (deadlock?); where each thread is:\n");
  watchdog_dump_threads();
  watchdog_dump_mappings();
  watchdog_run_gdb();
  restore_ksm_and_die(sig);
}

/* Ends the run (SIGALRM, knobs restored as for any ending signal) unless
 * it is over within `seconds`; stop_watchdog() when it is. */
UNUSED static void start_watchdog(const char* test, unsigned seconds) {
  g_watchdog_test = test;
  g_watchdog_seconds = seconds;
  signal(SIGALRM, watchdog_fired);
  alarm(seconds);
}

UNUSED static void stop_watchdog(void) { alarm(0); }

/* Skips (exit 77) unless the KSM files are writable here; saves the knobs
 * and arranges for their restoration at exit, or at a signal that ends the
 * test; starts a watchdog of 90 s (these tests take seconds; ctest ends
 * them at 120 s, and the watchdog's dump then has 25 s). */
UNUSED static void ksm_setup_or_skip(const char* test) {
  int fd = open(KSM_DIR "run", O_WRONLY);
  if (fd < 0) {
    printf("SKIP %s: %srun not writable (%s): no KSM control here\n", test,
           KSM_DIR, strerror(errno));
    exit(SKIP_CODE);
  }
  close(fd);
  /* Under the scan-time advisor the kernel refuses pages_to_scan writes
   * (EINVAL), and leaving it resets pages_to_scan: not ours to change. */
  char advisor[64];
  if (read_text(KSM_DIR "advisor_mode", advisor, sizeof(advisor)) > 0 &&
      strncmp(advisor, "[none]", 6) != 0) {
    advisor[strcspn(advisor, "\n")] = '\0';
    printf(
        "SKIP %s: advisor_mode is not none here (%s): pages_to_scan is "
        "the advisor's\n",
        test, advisor);
    exit(SKIP_CODE);
  }
  for (size_t i = 0; i < sizeof(g_saved) / sizeof(g_saved[0]); ++i) {
    char path[128];
    snprintf(path, sizeof(path), KSM_DIR "%s", g_saved[i].name);
    CHECK(read_text(path, g_saved[i].value, sizeof(g_saved[i].value)) > 0);
    g_saved[i].saved = 1;
  }
  atexit(restore_ksm);
  g_saved_by = getpid();
  const int ending[] = {SIGHUP, SIGINT, SIGPIPE, SIGTERM};
  for (size_t i = 0; i < sizeof(ending) / sizeof(ending[0]); ++i) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = restore_ksm_and_die;
    CHECK(sigaction(ending[i], &sa, NULL) == 0);
  }
  write_knob("use_zero_pages", "0");
  start_watchdog(test, 90);
}

/* run=1 with every page scanned at once: pages_to_scan 10000, no sleep. */
UNUSED static void scan_at_full_speed(void) {
  write_knob("pages_to_scan", "10000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
}

/* This process's merged pages, from /proc/self/ksm_merging_pages. */
UNUSED static unsigned long merging_pages(void) {
  return read_ulong("/proc/self/ksm_merging_pages");
}

/* Waits (at most `seconds`) until this process has at least `want` merged
 * pages; returns the last count. */
UNUSED static unsigned long wait_merging(unsigned long want, double seconds) {
  double end = now_seconds() + seconds;
  unsigned long n = 0;
  while ((n = merging_pages()) < want && now_seconds() < end) sleep_ms(20);
  return n;
}

/* Waits (at most 30 s) for `n` more full scans; fails if they do not come. */
UNUSED static void wait_full_scans(unsigned long n) {
  const unsigned long scans = read_ulong(KSM_DIR "full_scans");
  const double end = now_seconds() + 30;
  while (read_ulong(KSM_DIR "full_scans") < scans + n && now_seconds() < end)
    sleep_ms(10);
  CHECK(read_ulong(KSM_DIR "full_scans") >= scans + n);
}

/* Bit 61 of /proc/self/pagemap (with 63, present): a file page or shared
 * anonymous page. A private anonymous page the program wrote never has it;
 * a page samepage merged (a private mapping of its memfd frame) does.
 * Kernel KSM pages are anonymous: the bit stays clear there. */
UNUSED static int maps_shared_frame(int pagemap, const void* p) {
  uint64_t e = 0;
  off_t off = (off_t)((uintptr_t)p / PAGE) * 8;
  CHECK(pread(pagemap, &e, sizeof(e), off) == (ssize_t)sizeof(e));
  return (e >> 63) & 1 && (e >> 61) & 1;
}

/* Fills page i of `base` with the content of class `cls` (a 1-in-4096
 * marker at a class-dependent offset, so classes differ in one byte). */
UNUSED static void fill_class(unsigned char* base, size_t i, int cls) {
  unsigned char* p = base + i * PAGE;
  memset(p, 0x5a, PAGE);
  p[(cls * 97) % PAGE] = (unsigned char)(cls + 1);
}

/* `pages` pages of fresh private anonymous memory, each holding class
 * `cls`. */
UNUSED static unsigned char* map_class(size_t pages, int cls) {
  unsigned char* p =
      (unsigned char*)mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < pages; ++i) fill_class(p, i, cls);
  return p;
}

/* The same, advised MADV_MERGEABLE. */
UNUSED static unsigned char* map_advised_class(size_t pages, int cls) {
  unsigned char* p = map_class(pages, cls);
  CHECK(madvise(p, pages * PAGE, MADV_MERGEABLE) == 0);
  return p;
}

UNUSED static int holds_class(const unsigned char* base, size_t i, int cls) {
  const unsigned char* p = base + i * PAGE;
  for (size_t b = 0; b < PAGE; ++b) {
    unsigned char want = b == (size_t)((cls * 97) % PAGE) ? cls + 1 : 0x5a;
    if (p[b] != want) return 0;
  }
  return 1;
}

/* -1 if every byte of [p, p + n) is `want`, else the first that is not. */
UNUSED static long first_not(const unsigned char* p, size_t n,
                             unsigned char want) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != want) return (long)i;
  }
  return -1;
}

/* The start of a mapping within 16 MiB above the program break, or 0:
 * natively nothing is there, and the heap can grow back. With
 * `heap_grows` (other threads malloc meanwhile) the break is read before
 * and after the maps, again until both agree: a heap that grew while they
 * were read holds pages (merged ones among them: a frame's mapping) above
 * the break read first, and reported them until 2026-12-07 (7 runs of
 * about 250 of thread_exit_trim_test beside a QEMU guest). Read without stdio,
 * so that the check takes no block from the heap it looks at. */
UNUSED static unsigned long mapped_above_break(int heap_grows) {
  static char text[1 << 20];
  unsigned long brk = 0;
  for (int attempt = 0; attempt < 100; ++attempt) {
    brk = (unsigned long)sbrk(0);
    const int fd = open("/proc/self/maps", O_RDONLY);
    CHECK(fd >= 0);
    size_t len = 0;
    ssize_t n;
    while (len < sizeof text - 1 &&
           (n = read(fd, text + len, sizeof text - 1 - len)) > 0) {
      len += (size_t)n;
    }
    close(fd);
    text[len] = '\0';
    if (!heap_grows || (unsigned long)sbrk(0) == brk) break;
  }
  for (char* line = text; line != NULL && *line != '\0';) {
    char* next = strchr(line, '\n');
    if (next != NULL) *next++ = '\0';
    unsigned long lo = 0, hi = 0;
    if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo >= brk &&
        lo < brk + (16ul << 20) &&
        !(heap_grows && strstr(line, "[heap]") != NULL)) {
      fprintf(stderr, "mapped above the break (%#lx): %s\n", brk, line);
      return lo;
    }
    line = next;
  }
  return 0;
}

/* Merge-any at full scan speed, with malloc blocks never mapped on their
 * own and a free that leaves 16 pages at the top of the heap (or an arena)
 * trimming them: the tests of glibc's heap trims. */
UNUSED static void merge_any_trimming_heap(void) {
  CHECK(mallopt(M_MMAP_THRESHOLD, 8 << 20) == 1);
  CHECK(mallopt(M_TRIM_THRESHOLD, 16 * PAGE) == 1);
  CHECK(mallopt(M_TOP_PAD, 0) == 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
}

/* Checks that pages [from, to) of `base` hold class `cls`. */
UNUSED static void check_pages_hold(const unsigned char* base, size_t from,
                                    size_t to, int cls) {
  for (size_t i = from; i < to; ++i) CHECK(holds_class(base, i, cls));
}

UNUSED static int is_zero_page(const unsigned char* p) {
  for (size_t b = 0; b < PAGE; ++b) {
    if (p[b] != 0) return 0;
  }
  return 1;
}

/* Parses /proc/self/ksm_stat; returns the value of `key` (yes=1, no=0). */
UNUSED static long ksm_stat_value(const char* key) {
  char buf[1024];
  CHECK(read_text("/proc/self/ksm_stat", buf, sizeof(buf)) > 0);
  size_t klen = strlen(key);
  for (char* line = buf; line != NULL && *line != '\0';) {
    char* nl = strchr(line, '\n');
    if (nl != NULL) *nl = '\0';
    if (strncmp(line, key, klen) == 0 &&
        (line[klen] == ' ' || line[klen] == ':')) {
      const char* v = line + klen + (line[klen] == ':' ? 2 : 1);
      if (strcmp(v, "yes") == 0) return 1;
      if (strcmp(v, "no") == 0) return 0;
      return strtol(v, NULL, 10);
    }
    line = nl == NULL ? NULL : nl + 1;
  }
  fprintf(stderr, "ksm_stat has no %s:\n%s", key, buf);
  exit(1);
}

/* Calls fn(fd, arg) for each descriptor of this process naming one of
 * samepage's memfds (natively: none); returns how many there were. */
UNUSED static int for_each_samepage_memfd(void (*fn)(int fd, void* arg),
                                          void* arg) {
  DIR* d = opendir("/proc/self/fd");
  CHECK(d != NULL);
  int found = 0;
  struct dirent* e;
  while ((e = readdir(d)) != NULL) {
    char link[300], target[256];
    snprintf(link, sizeof(link), "/proc/self/fd/%s", e->d_name);
    const ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n <= 0) continue;
    target[n] = '\0';
    if (strstr(target, "memfd:samepage") == NULL) continue;
    ++found;
    fn(atoi(e->d_name), arg);
  }
  closedir(d);
  return found;
}

/* Waits for child `pid` at most `seconds` (then kills it, by its pid, and
 * fails); returns its wait status. */
UNUSED static int wait_child(pid_t pid, double seconds) {
  int status = 0;
  for (double end = now_seconds() + seconds;
       waitpid(pid, &status, WNOHANG) == 0; sleep_ms(5)) {
    if (now_seconds() > end) {
      kill(pid, SIGKILL);
      CHECK(waitpid(pid, &status, 0) == pid);
      CHECK(!"the child did not finish in time");
    }
  }
  return status;
}

#endif /* SAMEPAGE_TESTS_PRELOAD_KSM_TEST_UTIL_H_ */
