/* fork() while another allocator gives memory back. jemalloc (and
 * tcmalloc) purge free memory with madvise from inside malloc and free,
 * some paths holding one of their locks, and their fork handlers take
 * those locks. Under merge-any samepage runs such a discard outside merge
 * windows (Engine::DiscardWithoutAllocating), and fork() keeps windows
 * from opening while it runs: until 2026-12-07 both used one mutex, which
 * fork's handlers took before jemalloc's, so a fork while a thread purged
 * deadlocked (a run of 10 s under jemalloc with background threads hung
 * every time). Threads allocate, fill and free large blocks (calloc'd ones
 * must read zeros) while the main thread forks; each child checks merged
 * memory and a calloc of its own. Bounded: a watchdog ends a hung run.
 * Run natively, under `samepage run`, and under it with jemalloc. */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include "ksm_test_util.h"

/* Read by jemalloc at start (glibc's malloc ignores it): background
 * threads that purge, and freed pages purged within 1 ms. */
const char* malloc_conf = "background_thread:true,dirty_decay_ms:1";

enum { kThreads = 4, kSeconds = 5, kWatchdogSeconds = 60, kKeepPages = 512 };

static volatile int g_stop;
static volatile int g_failed;

static void* worker(void* arg) {
  const unsigned id = (unsigned)(uintptr_t)arg;
  unsigned long round = 0;
  while (!g_stop && !g_failed) {
    const size_t bytes = (1 + round % 7) * 256 * 1024;
    const int zeroed = round & 1;
    unsigned char* p = zeroed ? calloc(1, bytes) : malloc(bytes);
    if (p == NULL) {
      fprintf(stderr, "thread %u: allocation of %zu bytes failed\n", id, bytes);
      g_failed = 1;
      break;
    }
    const long wrong = zeroed ? first_not(p, bytes, 0) : -1;
    if (wrong >= 0) {
      fprintf(stderr, "thread %u round %lu: calloc byte %ld is %d, not 0\n", id,
              round, wrong, p[wrong]);
      g_failed = 1;
    }
    memset(p, 'a' + (int)(id % 3), bytes);
    if (round % 16 == 0) sleep_ms(2); /* let the purges catch up */
    free(p);
    ++round;
  }
  return (void*)(uintptr_t)round;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("fork_allocator_test");
  start_watchdog("fork_allocator_test", kWatchdogSeconds);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
  unsigned char* keep = map_class(kKeepPages, 1);
  pthread_t t[kThreads];
  for (unsigned i = 0; i < kThreads; ++i)
    CHECK(pthread_create(&t[i], NULL, worker, (void*)(uintptr_t)i) == 0);
  unsigned long forks = 0;
  const double end = now_seconds() + kSeconds;
  while (now_seconds() < end && !g_failed) {
    const pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
      for (size_t i = 0; i < kKeepPages; ++i) {
        if (!holds_class(keep, i, 1)) _exit(2);
      }
      unsigned char* z = calloc(1, 1 << 20);
      _exit(z == NULL || first_not(z, 1 << 20, 0) >= 0 ? 3 : 0);
    }
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child); /* bounded by the watchdog */
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "child %lu: status %#x\n", forks, status);
      g_failed = 1;
    }
    ++forks;
  }
  g_stop = 1;
  unsigned long rounds = 0;
  for (unsigned i = 0; i < kThreads; ++i) {
    void* r = NULL;
    CHECK(pthread_join(t[i], &r) == 0);
    rounds += (unsigned long)(uintptr_t)r;
  }
  stop_watchdog();
  printf("%lu forks beside %lu blocks allocated, filled and freed\n", forks,
         rounds);
  CHECK(!g_failed);
  CHECK(forks > 0 && rounds > 0);
  check_pages_hold(keep, 0, kKeepPages, 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(munmap(keep, kKeepPages * PAGE) == 0);
  printf("PASS fork_allocator_test\n");
  return 0;
}
