/* A forked child that never calls into samepage still merges its advised
 * memory, as a child of a kernel KSM process does (VM_MERGEABLE is
 * inherited). A prefork server's workers are such children. The parent
 * advises a region and forks; the child fills it with one content and
 * only reads it from then on; the parent watches the child's Pss
 * (/proc/PID/smaps_rollup) fall below half of the region. Until
 * 2026-12-06 samepage restarted merging in a child only at its first call
 * into samepage, so this child's Pss never fell. Then again while another
 * thread of the parent keeps calling madvise (a control call queued for
 * the engine's lock at the fork): until 2026-12-06 the child counted that
 * caller, which it does not have, as waiting for ever, and its scanner
 * handed the lock over every few pages: the child's Pss stayed at 33 MB
 * for 20 s. Same assertions natively and under `samepage run`. */

#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>

#include "ksm_test_util.h"

enum { kPages = 8192 }; /* 32 MiB */

static unsigned char* g_small;
static volatile int g_stop;

/* Control calls, one after another, until told to stop. */
static void* advise_in_a_loop(void* arg) {
  (void)arg;
  while (!g_stop) CHECK(madvise(g_small, 16 * PAGE, MADV_MERGEABLE) == 0);
  return NULL;
}

/* Forks a child that fills the region and only reads it; returns the
 * child's Pss in kB once below half the region, or after 20 s. */
static long child_pss_after_merging(unsigned char* p, const char* what) {
  int ready[2];
  CHECK(pipe(ready) == 0);
  const pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    /* No call into samepage from here on: plain memory accesses, a pipe
     * write and sleeps. */
    for (size_t i = 0; i < kPages; ++i) memset(p + i * PAGE, 0x3c, PAGE);
    (void)!write(ready[1], "r", 1);
    for (;;) {
      volatile unsigned sum = 0;
      for (size_t i = 0; i < kPages; ++i) sum += p[i * PAGE + 7];
      if (sum != 0x3cu * kPages) _exit(3);
      sleep_ms(50);
    }
  }
  char c;
  CHECK(read(ready[0], &c, 1) == 1);
  const long full = pss_kb(child);
  long pss = full;
  for (double end = now_seconds() + 20;
       pss > (long)kPages * 4 / 2 && now_seconds() < end;) {
    sleep_ms(50);
    pss = pss_kb(child);
  }
  printf("%s: child Pss %ld kB when filled, %ld kB after merging\n", what, full,
         pss);
  int status = 0;
  CHECK(waitpid(child, &status, WNOHANG) == 0); /* its reads held */
  CHECK(kill(child, SIGKILL) == 0);
  CHECK(waitpid(child, &status, 0) == child);
  return pss;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("fork_child_test");
  unsigned char* p = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  CHECK(madvise(p, kPages * PAGE, MADV_MERGEABLE) == 0);
  g_small = map_advised_class(16, 1);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "1");
  write_knob("run", "1");
  long pss = child_pss_after_merging(p, "parent idle");
  CHECK(pss >= 0 && pss <= (long)kPages * 4 / 2);
  pthread_t advisor;
  CHECK(pthread_create(&advisor, NULL, advise_in_a_loop, NULL) == 0);
  sleep_ms(20);
  /* The region again, unmerged, as new. */
  CHECK(munmap(p, kPages * PAGE) == 0);
  p = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  CHECK(madvise(p, kPages * PAGE, MADV_MERGEABLE) == 0);
  pss = child_pss_after_merging(p, "a parent thread calling madvise");
  g_stop = 1;
  CHECK(pthread_join(advisor, NULL) == 0);
  CHECK(pss >= 0 && pss <= (long)kPages * 4 / 2);
  printf("PASS fork_child_test\n");
  return 0;
}
