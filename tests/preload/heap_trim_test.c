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

/* -1 if every byte of [p, p + n) is `want`, else the first that is not. */
static long first_not(const unsigned char* p, size_t n, unsigned char want) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != want) return (long)i;
  }
  return -1;
}

static void report(unsigned id, unsigned long round, const char* what,
                   const unsigned char* p, long at, int want) {
  fprintf(stderr, "thread %u round %lu: %s byte %ld is %d, want %d\n", id,
          round, what, at, p[at], want);
  g_failed = 1;
}

/* The start of a mapping within 16 MiB above the program break, or 0:
 * natively nothing is there, and the heap can grow back. Read without
 * stdio, so that the check takes no block from the heap it looks at. */
static unsigned long mapped_above_break(void) {
  static char text[1 << 20];
  const unsigned long brk = (unsigned long)sbrk(0);
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
  for (char* line = text; line != NULL && *line != '\0';) {
    char* next = strchr(line, '\n');
    if (next != NULL) *next++ = '\0';
    unsigned long lo = 0, hi = 0;
    if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo >= brk &&
        lo < brk + (16ul << 20)) {
      fprintf(stderr, "mapped above the break (%#lx): %s\n", brk, line);
      return lo;
    }
    line = next;
  }
  return 0;
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
    if (id == 0 && round % 64 == 0 && mapped_above_break() != 0) {
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
  /* Blocks from the heap and the arena, never mapped on their own; a free
   * that leaves 16 pages at the top trims them. */
  CHECK(mallopt(M_MMAP_THRESHOLD, 8 << 20) == 1);
  CHECK(mallopt(M_TRIM_THRESHOLD, 16 * PAGE) == 1);
  CHECK(mallopt(M_TOP_PAD, 0) == 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
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
  CHECK(mapped_above_break() == 0);
  CHECK(g_trims[0] > 0); /* the heap was trimmed: the test tested something */
  CHECK(merged > 0);
  check_pages_hold(keep, 0, 256, 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(munmap(keep, 256 * PAGE) == 0);
  printf("PASS heap_trim_test\n");
  return 0;
}
