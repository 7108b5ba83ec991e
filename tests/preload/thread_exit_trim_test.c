/* A thread that exits frees what its malloc cache (tcache) still holds,
 * inside glibc (tcache_thread_shutdown calls __libc_free, which no
 * interposer sees): a small block freed last, between a big freed block
 * and the top of the heap, then joins both with the top, and glibc trims
 * the heap (brk) right there. Under merge-any the big block's pages merge
 * while it lives; a trim inside a merge window over them would let the
 * window's frame replace what the next malloc put at the same addresses
 * (calloc returning old bytes, a write lost), or stay mapped above the
 * lowered break. Since 2026-12-07 no window opens from such a thread's
 * thread-specific data destructors until it is gone
 * (`LinuxMemoryTest.NoWindowOpensWhileAThreadExits` shows the mechanism;
 * this test never failed without it, in 5 runs: the race is narrow).
 * Short-lived threads, 4 at a time, fill a 15-page block alike, let it
 * merge, write it again (copied from its frames, to be merged again), free
 * it and then a small block after it, and exit; the main thread meanwhile
 * callocs, checks for zeros, fills and checks. One heap (M_ARENA_MAX 1),
 * full scan speed, 4 s. Same assertions natively and under `samepage
 * run`; the heap must have been trimmed while threads exited. */

#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/prctl.h>

#include "ksm_test_util.h"

enum { kSeconds = 4, kBlockPages = 15, kThreads = 4 };

static volatile int g_failed;
static volatile int g_stop;
static unsigned long g_exit_trims; /* joins across which the break fell */

/* Fills a block alike in every thread (it merges), writes it again, then
 * frees it and, last, a small block after it, which stays in the thread's
 * cache until exit. The big block's free leaves less than 64 KiB free in
 * one piece: it does not trim, the exit does. */
static void* short_lived(void* arg) {
  const unsigned round = (unsigned)(uintptr_t)arg;
  const size_t bytes = kBlockPages * PAGE;
  unsigned char* big = malloc(bytes);
  unsigned char* small = malloc(200);
  if (big == NULL || small == NULL) {
    fprintf(stderr, "malloc failed\n");
    g_failed = 1;
    return NULL;
  }
  memset(big, 0x5a, bytes);
  memset(small, 0x5a, 200);
  sleep_ms(1); /* long enough to merge, sometimes */
  memset(big, 0x5a, bytes);
  const long at = first_not(big, bytes, 0x5a);
  if (at >= 0) {
    fprintf(stderr, "round %u: byte %ld of a block is %d, want %d\n", round, at,
            big[at], 0x5a);
    g_failed = 1;
  }
  free(big);
  free(small);
  return NULL;
}

static void* spawner(void* arg) {
  unsigned long* rounds = arg;
  unsigned round = 0;
  while (!g_stop && !g_failed) {
    pthread_t t[kThreads];
    for (int i = 0; i < kThreads; ++i) {
      CHECK(pthread_create(&t[i], NULL, short_lived,
                           (void*)(uintptr_t)(round + i)) == 0);
    }
    for (int i = 0; i < kThreads; ++i) {
      void* top = sbrk(0);
      CHECK(pthread_join(t[i], NULL) == 0);
      if (sbrk(0) < top) ++g_exit_trims;
    }
    round += kThreads;
  }
  *rounds = round;
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("thread_exit_trim_test");
  start_watchdog("thread_exit_trim_test", 60);
  /* One heap for every thread. */
  CHECK(mallopt(M_ARENA_MAX, 1) == 1);
  merge_any_trimming_heap();
  unsigned long threads = 0, checks = 0;
  pthread_t spawn;
  CHECK(pthread_create(&spawn, NULL, spawner, &threads) == 0);
  const double end = now_seconds() + kSeconds;
  while (now_seconds() < end && !g_failed) {
    const size_t pages = 8 + checks % 24;
    unsigned char* p = calloc(pages, PAGE);
    CHECK(p != NULL);
    long at = first_not(p, pages * PAGE, 0);
    if (at >= 0) {
      fprintf(stderr, "check %lu: calloc byte %ld is %d, want 0\n", checks, at,
              p[at]);
      g_failed = 1;
    }
    const unsigned char fill = (unsigned char)(0x10 + checks % 32);
    memset(p, fill, pages * PAGE);
    at = first_not(p, pages * PAGE, fill);
    if (at >= 0) {
      fprintf(stderr, "check %lu: byte %ld is %d, want %d\n", checks, at, p[at],
              fill);
      g_failed = 1;
    }
    free(p);
    if (++checks % 256 == 0 && mapped_above_break(1) != 0) g_failed = 1;
  }
  g_stop = 1;
  CHECK(pthread_join(spawn, NULL) == 0);
  printf("%lu threads, %lu checks, %lu heap trims across thread exits\n",
         threads, checks, g_exit_trims);
  CHECK(!g_failed);
  CHECK(mapped_above_break(0) == 0);
  CHECK(g_exit_trims > 0); /* the test tested something */
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  stop_watchdog();
  printf("PASS thread_exit_trim_test\n");
  return 0;
}
