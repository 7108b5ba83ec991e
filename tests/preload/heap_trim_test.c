/* glibc trims its heap inside free: the main heap with an internal brk
 * (lowered, then raised again by the next malloc at the same addresses),
 * an arena with an internal madvise(MADV_DONTNEED). Under merge-any the
 * blocks merge while they live; a trim while samepage was inside a merge
 * window over them let the window's frame replace the new block that the
 * next malloc put there: calloc returned the freed block's bytes (most
 * runs of 4 s until free, realloc and malloc_trim waited for windows;
 * in the others a frame was left mapped where the heap had been, which
 * kept it from growing back).
 * Two threads (the main heap and an arena) calloc, check for zeros, fill,
 * let merge, check, grow, take an aligned block and free, in a loop, for a
 * few seconds at full scan speed. Same assertions natively and under `samepage
 * run`. */

#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/prctl.h>

#include "ksm_test_util.h"

enum { kSeconds = 4 };

static volatile int g_failed;
static unsigned long g_rounds[2], g_trims[2];

static void report(unsigned id, unsigned long round, const char* what,
                   const unsigned char* p, long at, int want) {
  fprintf(stderr, "thread %u round %lu: %s byte %ld is %d, want %d\n", id,
          round, what, at, p[at], want);
  g_failed = 1;
}

/* id 0 runs on the main thread (the brk heap), id 1 on its own (an arena). */
static void* churn(void* arg) {
  const unsigned id = (unsigned)(uintptr_t)arg;
  const double end = now_seconds() + kSeconds;
  unsigned long round = 0;
  while (now_seconds() < end && !g_failed) {
    const size_t pages = 32 + (round % 5) * 24;
    const size_t bytes = pages * PAGE;
    unsigned char* p = calloc(pages, PAGE);
    if (p == NULL) {
      fprintf(stderr, "calloc failed\n");
      g_failed = 1;
      break;
    }
    long at = first_not(p, bytes, 0);
    if (at >= 0) {
      report(id, round, "calloc", p, at, 0);
      break;
    }
    /* Content changes from round to round: the last block's bytes show. */
    const unsigned char fill = (unsigned char)(0x40 + (round & 15));
    memset(p, fill, bytes);
    if (round % 4 == 0) sleep_ms(3); /* long enough to merge, sometimes */
    at = first_not(p, bytes, fill);
    if (at >= 0) {
      report(id, round, "after merging", p, at, fill);
      break;
    }
    /* Grown where it is or moved: the old block is freed either way. */
    unsigned char* q = realloc(p, bytes + 8 * PAGE);
    if (q == NULL) {
      fprintf(stderr, "realloc failed\n");
      g_failed = 1;
      free(p);
      break;
    }
    at = first_not(q, bytes, fill);
    if (at >= 0) {
      report(id, round, "after realloc", q, at, fill);
      break;
    }
    /* An aligned block: glibc takes 72 pages from the top and frees what
     * is around the block, trimming the heap inside posix_memalign. */
    void* aligned = NULL;
    if (posix_memalign(&aligned, 64 * PAGE, 8 * PAGE) != 0) {
      fprintf(stderr, "posix_memalign failed\n");
      g_failed = 1;
      free(q);
      break;
    }
    memset(aligned, fill, 8 * PAGE);
    at = first_not(aligned, 8 * PAGE, fill);
    if (at >= 0) report(id, round, "aligned", aligned, at, fill);
    free(aligned);
    void* top = sbrk(0);
    free(q);
    if (id == 0 && sbrk(0) < top) ++g_trims[id];
    if (at >= 0) break;
    if (id == 0 && round % 7 == 0) malloc_trim(0);
    if (id == 0 && round % 64 == 0 && mapped_above_break(0) != 0) {
      g_failed = 1;
      break;
    }
    ++round;
  }
  g_rounds[id] = round;
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("heap_trim_test");
  /* Blocks from the heap and the arena. */
  merge_any_trimming_heap();
  /* Memory that stays: something merges for sure while the threads churn. */
  unsigned char* keep = map_class(256, 1);
  pthread_t arena;
  CHECK(pthread_create(&arena, NULL, churn, (void*)(uintptr_t)1) == 0);
  churn((void*)(uintptr_t)0);
  CHECK(pthread_join(arena, NULL) == 0);
  const unsigned long merged = wait_merging(1, 10);
  printf(
      "%lu rounds on the heap (%lu trimmed it), %lu in an arena; "
      "%lu pages merged after\n",
      g_rounds[0], g_trims[0], g_rounds[1], merged);
  CHECK(!g_failed);
  /* A frame left where the heap was trimmed keeps it from growing back. */
  CHECK(mapped_above_break(0) == 0);
  CHECK(g_trims[0] > 0); /* the heap was trimmed: the test tested something */
  CHECK(merged > 0);
  check_pages_hold(keep, 0, 256, 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(munmap(keep, 256 * PAGE) == 0);
  printf("PASS heap_trim_test\n");
  return 0;
}
