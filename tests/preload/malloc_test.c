/* glibc's own memory calls under merge-any: malloc and free map, unmap,
 * trim (madvise MADV_DONTNEED) and grow memory through glibc-internal
 * calls that no interposer sees (docs/preload.md). Threads allocate,
 * fill with identical pages, let them merge, check every byte and free,
 * for a few seconds at full scan speed; calloc must return zeros from
 * memory that was merged and trimmed before. Same assertions natively and
 * under `samepage run`. */

#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/prctl.h>

#include "ksm_test_util.h"

enum { kThreads = 2, kSeconds = 3 };

static volatile unsigned long g_rounds;
static volatile int g_failed;

/* Every byte of a block: `fill`, with `tag` at the start of its middle
 * page. Reports the first wrong byte and sets g_failed. */
static void check_block(const unsigned char* big, size_t pages, uint64_t tag,
                        unsigned char fill, unsigned id, unsigned long round,
                        const char* when) {
  for (size_t i = 0; i < pages * PAGE && !g_failed; ++i) {
    const size_t at = i - (pages / 2) * PAGE;
    const unsigned char want =
        at < sizeof(tag) ? ((const unsigned char*)&tag)[at] : fill;
    if (big[i] != want) {
      fprintf(stderr, "thread %u round %lu %s: byte %zu is %d, want %d\n", id,
              round, when, i, big[i], want);
      g_failed = 1;
    }
  }
}

static void* worker(void* arg) {
  const unsigned id = (unsigned)(uintptr_t)arg;
  const double end = now_seconds() + kSeconds;
  unsigned long round = 0;
  while (now_seconds() < end && !g_failed) {
    /* Above the (fixed) mmap threshold: glibc's internal mmap and munmap. */
    const size_t pages = 64 + (round % 7) * 16;
    unsigned char* big = malloc(pages * PAGE);
    /* Below it: the arena, trimmed with glibc's internal madvise. */
    unsigned char* small = calloc(16, PAGE - 64);
    if (big == NULL || small == NULL) {
      fprintf(stderr, "allocation failed\n");
      g_failed = 1;
      break;
    }
    for (size_t i = 0; i < 16 * (PAGE - 64); ++i) {
      if (small[i] != 0) {
        fprintf(stderr, "calloc byte %zu is %d, not 0\n", i, small[i]);
        g_failed = 1;
        break;
      }
    }
    /* Content changes from round to round: a stale page of an earlier
     * block mapped into this one would show. */
    const unsigned char fill = (unsigned char)(0x40 + (round & 7));
    memset(big, fill, pages * PAGE);
    memset(small, fill, 16 * (PAGE - 64));
    const uint64_t tag = ((uint64_t)id << 48) | round;
    memcpy(big + (pages / 2) * PAGE, &tag, sizeof(tag));
    sleep_ms(round % 3 == 0 ? 20 : 1);  /* long enough to merge, sometimes */
    check_block(big, pages, tag, fill, id, round, "after merging");
    for (size_t i = 0; i < 16 * (PAGE - 64) && !g_failed; ++i) {
      if (small[i] != fill) {
        fprintf(stderr, "thread %u round %lu: small byte %zu is %d, want %d\n",
                id, round, i, small[i], fill);
        g_failed = 1;
      }
    }
    /* Grown: glibc moves or extends the mapping (internal mremap); the
     * contents come along. */
    unsigned char* grown = realloc(big, (pages + 16) * PAGE);
    if (grown == NULL) {
      fprintf(stderr, "realloc failed\n");
      g_failed = 1;
    } else {
      big = grown;
      check_block(big, pages, tag, fill, id, round, "after realloc");
    }
    free(small);
    free(big);
    ++round;
  }
  __atomic_fetch_add(&g_rounds, round, __ATOMIC_RELAXED);
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("malloc_test");
  /* A fixed threshold: big blocks always get their own mapping (glibc
   * otherwise raises it after the first free and serves them from the
   * arena). */
  CHECK(mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
  /* Memory that stays: something merges for sure while the threads churn. */
  unsigned char* keep = map_class(256, 1);
  pthread_t t[kThreads];
  for (unsigned i = 0; i < kThreads; ++i)
    CHECK(pthread_create(&t[i], NULL, worker, (void*)(uintptr_t)i) == 0);
  unsigned long peak = 0;
  const double end = now_seconds() + kSeconds;
  while (now_seconds() < end) {
    const unsigned long now = read_ulong("/proc/self/ksm_merging_pages");
    if (now > peak) peak = now;
    sleep_ms(50);
  }
  for (unsigned i = 0; i < kThreads; ++i) CHECK(pthread_join(t[i], NULL) == 0);
  printf("%lu rounds of malloc/fill/merge/check/free, peak %lu pages merged\n",
         g_rounds, peak);
  CHECK(!g_failed);
  CHECK(peak > 0);
  check_pages_hold(keep, 0, 256, 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(munmap(keep, 256 * PAGE) == 0);
  printf("PASS malloc_test\n");
  return 0;
}
