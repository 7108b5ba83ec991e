/* A program whose executable provides malloc itself (an allocator linked
 * in, as Chromium's or Envoy's), which unmaps and maps memory from inside
 * malloc and free while it holds its own lock, under merge-any. Until
 * 2026-12-07 samepage took those calls for the program's own and ran them
 * through the engines, which allocate: from inside that malloc the thread
 * waited for the lock it held, for good (the first munmap). Its pages
 * must merge, and every block keep what was written into it. Same
 * assertions natively (kernel KSM) and under `samepage run`. */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <sys/prctl.h>

#include "ksm_test_util.h"

extern void* __libc_malloc(size_t size);
extern void __libc_free(void* p);
extern void* __libc_calloc(size_t n, size_t size);
extern void* __libc_realloc(void* p, size_t size);
extern void* __libc_memalign(size_t align, size_t size);

enum { kCachePages = 64, kBlocks = 16, kBlockPages = 8 };

/* The allocator: glibc's underneath, one lock, and a cache of 64 pages
 * it maps in free and unmaps (or maps over) in malloc, lock held. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char* g_cache;
static unsigned long g_turns;

static void cache_turn(int in_free) {
  const size_t len = kCachePages * PAGE;
  if (in_free && g_cache == NULL) {
    g_cache = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_cache == MAP_FAILED) abort();
    memset(g_cache, 0x33, len); /* alike: merged while cached */
  } else if (!in_free && g_cache != NULL) {
    if (g_turns++ % 2) {
      if (munmap(g_cache, len) != 0) abort();
    } else {
      /* Mapped over, written, and checked, then given back. */
      if (mmap(g_cache, len, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != g_cache)
        abort();
      memset(g_cache, 0x44, len);
      for (size_t i = 0; i < len; ++i)
        if (g_cache[i] != 0x44) abort();
      if (madvise(g_cache, len, MADV_DONTNEED) != 0) abort();
      if (munmap(g_cache, len) != 0) abort();
    }
    g_cache = NULL;
  }
}

void* malloc(size_t size) {
  pthread_mutex_lock(&g_lock);
  cache_turn(0);
  void* p = __libc_malloc(size);
  pthread_mutex_unlock(&g_lock);
  return p;
}
void free(void* p) {
  pthread_mutex_lock(&g_lock);
  cache_turn(1);
  __libc_free(p);
  pthread_mutex_unlock(&g_lock);
}
void* calloc(size_t n, size_t size) {
  pthread_mutex_lock(&g_lock);
  void* p = __libc_calloc(n, size);
  pthread_mutex_unlock(&g_lock);
  return p;
}
void* realloc(void* q, size_t size) {
  pthread_mutex_lock(&g_lock);
  void* p = __libc_realloc(q, size);
  pthread_mutex_unlock(&g_lock);
  return p;
}
void* memalign(size_t align, size_t size) {
  pthread_mutex_lock(&g_lock);
  void* p = __libc_memalign(align, size);
  pthread_mutex_unlock(&g_lock);
  return p;
}
int posix_memalign(void** out, size_t align, size_t size) {
  void* p = memalign(align, size);
  if (p == NULL) return ENOMEM;
  *out = p;
  return 0;
}
void* aligned_alloc(size_t align, size_t size) {
  return memalign(align, size);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("program_allocator_test");
  scan_at_full_speed();
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  unsigned char* blocks[kBlocks];
  unsigned long rounds = 0;
  unsigned long merged = 0;
  const double end = now_seconds() + 3;
  for (unsigned round = 0; now_seconds() < end; ++round, ++rounds) {
    for (int b = 0; b < kBlocks; ++b) {
      blocks[b] = malloc(kBlockPages * PAGE);
      CHECK(blocks[b] != NULL);
      memset(blocks[b], 0x20 + (round + b) % 4, kBlockPages * PAGE);
    }
    sleep_ms(round % 3 == 0 ? 20 : 1); /* long enough to merge, sometimes */
    const unsigned long now = merging_pages();
    if (now > merged) merged = now;
    for (int b = 0; b < kBlocks; ++b) {
      const long bad = first_not(blocks[b], kBlockPages * PAGE,
                                 (unsigned char)(0x20 + (round + b) % 4));
      if (bad >= 0) {
        fprintf(stderr, "round %u block %d: byte %ld changed\n", round, b,
                bad);
        return 1;
      }
      free(blocks[b]);
    }
  }
  printf("program_allocator_test: %lu rounds, %lu cache turns, at most %lu "
         "pages merged\n",
         rounds, g_turns, merged);
  CHECK(merged > 0);
  return 0;
}
