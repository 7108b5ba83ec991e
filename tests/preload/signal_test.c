/* A program with its own SIGSEGV and SIGBUS handlers, installed after its
 * first KSM call, keeps them, and merging still never loses a write:
 *  - sigaction(SIGSEGV) / signal(SIGBUS) installed after KSM is in use
 *    are reported back as installed;
 *  - writer threads write to thousands of mergeable duplicate pages for
 *    two seconds (longer until some page was seen merged) while they are
 *    merged; the SIGSEGV handler treats any fault but one on its own guard
 *    page as a failure (under samepage with mprotect protection, writers
 *    fault inside merge windows: those must never reach it); every written
 *    byte is then checked, and pages must have merged meanwhile;
 *  - the program's own faults reach its handlers: a write to its PROT_READ
 *    guard page (SIGSEGV, fixed in the handler), a read past the end of a
 *    truncated file (SIGBUS, siglongjmp), with sa_mask and the signal itself
 *    blocked in the handler as the kernel blocks them;
 *  - SA_RESETHAND resets the handler to SIG_DFL once it ran; sysv_signal()
 *    gives its flags; restoring the saved actions gives them back; bad
 *    arguments fail as they do natively.
 * Same assertions natively (kernel KSM) and under `samepage run`. */

#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>

#include "ksm_test_util.h"

enum { kPages = 4096, kClasses = 8, kWriters = 2, kSlots = 4 };

/* SA_RESTORER: x86-64 glibc adds it to every action it installs. */
#define LIBC_ADDED_FLAGS 0x04000000

static unsigned char* g_region;
static unsigned char* g_guard;
static unsigned long g_count[kPages]; /* writes done to each page */
static atomic_int g_writers_stop;

static volatile sig_atomic_t g_guard_hits;
static volatile sig_atomic_t g_segv_mask_ok = 1;
static volatile sig_atomic_t g_bus_hits;
static volatile sig_atomic_t g_bus_mask_ok = 1;
static sigjmp_buf g_bus_jump;

/* In a handler: the message by write(2), the knobs restored as at exit
 * (natively they are global), then _exit. */
static void fail_in_handler(const char* what, const void* addr) {
  char msg[128];
  size_t n = 0;
  for (const char* s = what; *s != '\0' && n < 80; ++s) msg[n++] = *s;
  msg[n++] = ' ';
  msg[n++] = '0';
  msg[n++] = 'x';
  for (int shift = 60; shift >= 0; shift -= 4) {
    msg[n++] = "0123456789abcdef"[((uintptr_t)addr >> shift) & 0xf];
  }
  msg[n++] = '\n';
  ssize_t r = write(2, msg, n);
  (void)r;
  restore_ksm();
  _exit(1);
}

static void on_segv(int sig, siginfo_t* info, void* context) {
  (void)context;
  unsigned char* addr = info->si_addr;
  if (sig != SIGSEGV || info->si_code != SEGV_ACCERR || addr < g_guard ||
      addr >= g_guard + PAGE) {
    fail_in_handler("FAIL: SIGSEGV not on the guard page, at", addr);
  }
  sigset_t now;
  pthread_sigmask(SIG_SETMASK, NULL, &now);
  if (!sigismember(&now, SIGSEGV) || !sigismember(&now, SIGUSR1)) {
    g_segv_mask_ok = 0;
  }
  ++g_guard_hits;
  /* Returning retries the write, which now succeeds. */
  if (mprotect(g_guard, PAGE, PROT_READ | PROT_WRITE) != 0) {
    fail_in_handler("FAIL: mprotect of the guard page", g_guard);
  }
}

static void on_bus(int sig) {
  sigset_t now;
  pthread_sigmask(SIG_SETMASK, NULL, &now);
  if (sig != SIGBUS || !sigismember(&now, SIGBUS)) g_bus_mask_ok = 0;
  ++g_bus_hits;
  siglongjmp(g_bus_jump, 1);
}

static void on_bus_sysv(int sig) { (void)sig; }

/* Write number k to a page sets one of kSlots slots to one of two values,
 * so a page's content depends only on its class and its number of writes
 * modulo 2 * kSlots: however the writes fall, most pages have duplicates and
 * merge (again) between writes. Each write changes the page, so a lost
 * write shows. */
static size_t slot_offset(unsigned long k) { return 8 + 8 * (k % kSlots); }
static unsigned char slot_value(unsigned long k) {
  return (k / kSlots) % 2 ? 0xaa : 0x55;
}

/* Random pages of its own half, about 20,000 writes a second: each page is
 * written every ~100 ms, while the scanner merges them in between. */
static void* writer(void* arg) {
  const size_t first = (size_t)(uintptr_t)arg;
  unsigned seed = (unsigned)first + 1;
  while (!atomic_load(&g_writers_stop)) {
    for (int i = 0; i < 16; ++i) {
      seed = seed * 1103515245u + 12345u;
      size_t p = first + kWriters * ((seed >> 8) % (kPages / kWriters));
      volatile unsigned char* page = g_region + p * PAGE;
      page[slot_offset(g_count[p])] = slot_value(g_count[p]);
      ++g_count[p];
    }
    struct timespec ts = {0, 500 * 1000};
    nanosleep(&ts, NULL);
  }
  return NULL;
}

static void check_page(size_t p) {
  unsigned char want[PAGE];
  fill_class(want, 0, (int)(p % kClasses));
  for (unsigned long s = 0; s < kSlots && s < g_count[p]; ++s) {
    unsigned long last = s + kSlots * ((g_count[p] - 1 - s) / kSlots);
    want[slot_offset(last)] = slot_value(last);
  }
  if (memcmp(g_region + p * PAGE, want, PAGE) != 0) {
    fprintf(stderr, "FAIL: page %zu lost a write (%lu writes)\n", p,
            g_count[p]);
    exit(1);
  }
}

static int same_action(const struct sigaction* a, const struct sigaction* b) {
  /* The kernel keeps 64 signals of the mask: compare those. */
  for (int s = 1; s <= 64; ++s) {
    if (sigismember(&a->sa_mask, s) != sigismember(&b->sa_mask, s)) return 0;
  }
  return a->sa_handler == b->sa_handler &&
         (a->sa_flags & ~LIBC_ADDED_FLAGS) == (b->sa_flags & ~LIBC_ADDED_FLAGS);
}

static void test_errors(void) {
  struct sigaction act;
  memset(&act, 0, sizeof(act));
  act.sa_handler = SIG_IGN;
  CHECK_ERR(sigaction(SIGKILL, &act, NULL), EINVAL);
  CHECK_ERR(sigaction(0, NULL, NULL), EINVAL);
  CHECK_ERR(sigaction(65, NULL, NULL), EINVAL);
  CHECK(sigaction(SIGSEGV, NULL, NULL) == 0);
  errno = 0;
  CHECK(signal(SIGSEGV, SIG_ERR) == SIG_ERR && errno == EINVAL);
  errno = 0;
  CHECK(signal(SIGBUS, SIG_ERR) == SIG_ERR && errno == EINVAL);
}

/* A read past the end of a truncated shared file: SIGBUS. */
static void provoke_sigbus(void) {
  int fd = memfd_create("signal_test", MFD_CLOEXEC);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, PAGE) == 0);
  volatile unsigned char* p =
      mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
  CHECK(p != MAP_FAILED);
  CHECK(ftruncate(fd, 0) == 0);
  if (sigsetjmp(g_bus_jump, 1) == 0) {
    (void)p[0];
    fprintf(stderr, "FAIL: read past end of file did not fault\n");
    exit(1);
  }
  sigset_t now;
  CHECK(pthread_sigmask(SIG_SETMASK, NULL, &now) == 0);
  CHECK(!sigismember(&now, SIGBUS));  /* siglongjmp restored the mask */
  CHECK(munmap((void*)p, PAGE) == 0);
  close(fd);
}

/* A write to the guard page, made read-only first: SIGSEGV. */
static void provoke_sigsegv(void) {
  CHECK(mprotect(g_guard, PAGE, PROT_READ) == 0);
  ((volatile unsigned char*)g_guard)[123] = 0x42;
  CHECK(g_guard[123] == 0x42);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("signal_test");
  write_knob("pages_to_scan", "10000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");

  g_region = mmap(NULL, (size_t)kPages * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(g_region != MAP_FAILED);
  for (size_t p = 0; p < kPages; ++p) {
    fill_class(g_region, p, (int)(p % kClasses));
  }
  CHECK(madvise(g_region, (size_t)kPages * PAGE, MADV_MERGEABLE) == 0);
  g_guard = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(g_guard != MAP_FAILED);

  /* KSM is in use: now the program's own handlers. */
  struct sigaction orig_segv, orig_bus, cur;
  CHECK(sigaction(SIGSEGV, NULL, &orig_segv) == 0);
  CHECK(sigaction(SIGBUS, NULL, &orig_bus) == 0);
  CHECK(orig_segv.sa_handler == SIG_DFL && orig_bus.sa_handler == SIG_DFL);
  struct sigaction act;
  memset(&act, 0, sizeof(act));
  act.sa_sigaction = on_segv;
  act.sa_flags = SA_SIGINFO;
  sigemptyset(&act.sa_mask);
  sigaddset(&act.sa_mask, SIGUSR1);
  CHECK(sigaction(SIGSEGV, &act, NULL) == 0);
  CHECK(signal(SIGBUS, on_bus) == SIG_DFL);
  CHECK(sigaction(SIGSEGV, NULL, &cur) == 0);
  CHECK(cur.sa_sigaction == on_segv && (cur.sa_flags & SA_SIGINFO));
  CHECK(!(cur.sa_flags & (SA_RESETHAND | SA_NODEFER)));
  CHECK(sigismember(&cur.sa_mask, SIGUSR1));
  CHECK(sigaction(SIGBUS, NULL, &cur) == 0);
  /* signal() has BSD semantics: restart, the signal blocked in its handler. */
  CHECK(cur.sa_handler == on_bus && (cur.sa_flags & SA_RESTART));
  CHECK(!(cur.sa_flags & (SA_RESETHAND | SA_SIGINFO)));
  CHECK(sigismember(&cur.sa_mask, SIGBUS));
  test_errors();

  /* Writers against the scanner, for two seconds, and up to 20 s more until
   * some page was seen merged: natively, ksmd (nice 5) may not get the CPU
   * for seconds on a loaded host. */
  double start = now_seconds();
  pthread_t threads[kWriters];
  for (size_t t = 0; t < kWriters; ++t) {
    CHECK(pthread_create(&threads[t], NULL, writer, (void*)(uintptr_t)t) ==
          0);
  }
  unsigned long peak = 0, samples = 0;
  for (double now = start;
       now < start + 2.0 || (peak == 0 && now < start + 22.0);
       now = now_seconds()) {
    unsigned long n = merging_pages();
    if (n > peak) peak = n;
    ++samples;
    sleep_ms(10);
  }
  atomic_store(&g_writers_stop, 1);
  for (size_t t = 0; t < kWriters; ++t) {
    CHECK(pthread_join(threads[t], NULL) == 0);
  }
  unsigned long writes = 0;
  for (size_t p = 0; p < kPages; ++p) {
    check_page(p);
    writes += g_count[p];
  }
  printf("race: %lu writes in %.1f s, all intact; merging pages peaked at "
         "%lu (%lu samples)\n", writes, now_seconds() - start, peak, samples);
  CHECK(peak > 0);

  /* The program's own faults reach its own handlers. */
  provoke_sigsegv();
  CHECK(g_guard_hits == 1 && g_segv_mask_ok);
  provoke_sigbus();
  CHECK(g_bus_hits == 1 && g_bus_mask_ok);
  printf("own faults: SIGSEGV and SIGBUS reached their handlers, masks as "
         "the kernel sets them\n");

  /* SA_RESETHAND: one delivery, then SIG_DFL (flags and mask kept). */
  struct sigaction once = act, prev;
  once.sa_flags = SA_SIGINFO | SA_RESETHAND;
  CHECK(sigaction(SIGSEGV, &once, &prev) == 0);
  CHECK(prev.sa_sigaction == on_segv && !(prev.sa_flags & SA_RESETHAND));
  provoke_sigsegv();
  CHECK(g_guard_hits == 2);
  CHECK(sigaction(SIGSEGV, NULL, &cur) == 0);
  CHECK(cur.sa_handler == SIG_DFL);
  CHECK((cur.sa_flags & (SA_SIGINFO | SA_RESETHAND)) ==
        (SA_SIGINFO | SA_RESETHAND));
  CHECK(sigismember(&cur.sa_mask, SIGUSR1));

  /* sysv_signal: one-shot, not deferred, no restart. */
  CHECK(sysv_signal(SIGBUS, on_bus_sysv) == on_bus);
  CHECK(sigaction(SIGBUS, NULL, &cur) == 0);
  CHECK(cur.sa_handler == on_bus_sysv);
  CHECK((cur.sa_flags & (SA_RESETHAND | SA_NODEFER | SA_RESTART)) ==
        (SA_RESETHAND | SA_NODEFER));

  /* Saved actions come back as they were. */
  CHECK(sigaction(SIGSEGV, &orig_segv, &prev) == 0);
  CHECK(prev.sa_handler == SIG_DFL && (prev.sa_flags & SA_RESETHAND));
  CHECK(sigaction(SIGBUS, &orig_bus, NULL) == 0);
  CHECK(sigaction(SIGSEGV, NULL, &cur) == 0 && same_action(&cur, &orig_segv));
  CHECK(sigaction(SIGBUS, NULL, &cur) == 0 && same_action(&cur, &orig_bus));
  printf("SA_RESETHAND, sysv_signal and restoring the saved actions: as "
         "natively\n");

  CHECK(munmap(g_guard, PAGE) == 0);
  CHECK(munmap(g_region, (size_t)kPages * PAGE) == 0);
  printf("PASS signal_test\n");
  return 0;
}
