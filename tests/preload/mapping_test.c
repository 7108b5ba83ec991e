/* munmap, mmap MAP_FIXED, mremap and mprotect on memory that is being
 * merged: what a program sees must be what anonymous memory gives it.
 *  - replace: a mergeable region is unmapped and a new, never-advised
 *    mapping made at the same address, in a loop for about a second, while
 *    the scanner merges at full speed: the new mapping's contents are never
 *    altered and it never maps a shared frame (pagemap bit 61);
 *  - mremap of merged memory (grow and move, shrink) keeps its contents;
 *  - mprotect(PROT_READ) of a merged range stays read-only while the
 *    scanner keeps running: a write faults (SIGSEGV, caught here).
 * Same assertions natively (kernel KSM) and under `samepage run`. */

#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>

#include "ksm_test_util.h"

enum { kPages = 64 };

static void fill_all(unsigned char* p, size_t pages, int cls) {
  for (size_t i = 0; i < pages; ++i) fill_class(p, i, cls);
}

static void check_all(const unsigned char* p, size_t pages, int cls) {
  for (size_t i = 0; i < pages; ++i) CHECK(holds_class(p, i, cls));
}

static void test_replace(int pagemap) {
  size_t len = kPages * PAGE;
  unsigned char* base = mmap(NULL, len, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(base != MAP_FAILED);
  double end = now_seconds() + 1.0;
  unsigned long rounds = 0, fixed_rounds = 0;
  for (unsigned seed = 1; now_seconds() < end; ++seed, ++rounds) {
    /* A mergeable region of identical pages: the scanner merges it. */
    fill_all(base, kPages, 1);
    CHECK(madvise(base, len, MADV_MERGEABLE) == 0);
    sleep_ms((int)(seed % 4));  /* 0-3 ms: catch merges in every phase */
    unsigned char* q;
    if (seed % 2) {
      /* munmap, then a new mapping at the same address. */
      CHECK(munmap(base, len) == 0);
      q = mmap(base, len, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
      if (q == MAP_FAILED && errno == EEXIST) {
        q = mmap(base, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      }
    } else {
      /* MAP_FIXED straight over the mergeable region. */
      q = mmap(base, len, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      ++fixed_rounds;
    }
    CHECK(q == base);
    /* Never advised: identical content, yet it must stay private memory. */
    for (size_t i = 0; i < kPages; ++i) CHECK(is_zero_page(q + i * PAGE));
    fill_all(q, kPages, 2);
    q[7 * PAGE] = (unsigned char)seed;
    sleep_ms(1);
    for (size_t i = 0; i < kPages; ++i) {
      if (maps_shared_frame(pagemap, q + i * PAGE)) {
        fprintf(stderr, "round %lu: page %zu of a never-advised mapping "
                "maps a shared frame\n", rounds, i);
        exit(1);
      }
      if (i != 7) CHECK(holds_class(q, i, 2));
    }
    CHECK(q[7 * PAGE] == (unsigned char)seed);
    CHECK(madvise(q, len, MADV_UNMERGEABLE) == 0);
  }
  printf("replace: %lu rounds (%lu MAP_FIXED over), contents intact, no "
         "frame mapped\n", rounds, fixed_rounds);
  CHECK(munmap(base, len) == 0);
}

static void test_mremap(void) {
  size_t len = kPages * PAGE;
  unsigned char* p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  /* Two classes, interleaved in runs: several merged runs, several VMAs. */
  for (size_t i = 0; i < kPages; ++i) fill_class(p, i, (i / 8) % 2 ? 3 : 4);
  p[5 * PAGE + 1] = 0x77;  /* one unique page among them */
  CHECK(madvise(p, len, MADV_MERGEABLE) == 0);
  unsigned long merged = wait_merging(kPages - 1, 30);
  printf("mremap: %lu pages merged before\n", merged);
  CHECK(merged >= kPages - 1);
  unsigned char* q = mremap(p, len, 2 * len, MREMAP_MAYMOVE);
  CHECK(q != MAP_FAILED);
  for (size_t i = 0; i < kPages; ++i) {
    if (i == 5) {
      CHECK(q[5 * PAGE + 1] == 0x77);
    } else {
      CHECK(holds_class(q, i, (i / 8) % 2 ? 3 : 4));
    }
  }
  for (size_t i = kPages; i < 2 * kPages; ++i) CHECK(is_zero_page(q + i * PAGE));
  q[9 * PAGE] = 0x11;  /* copy-on-write still private to the page */
  CHECK(holds_class(q, 10, 3) && q[9 * PAGE] == 0x11);
  /* Shrink in place. */
  unsigned char* r = mremap(q, 2 * len, len / 2, 0);
  CHECK(r == q);
  CHECK(holds_class(r, 0, 4) && holds_class(r, 8, 3) && r[9 * PAGE] == 0x11);
  /* A range that is not mapped at all still fails as the kernel says. */
  CHECK_ERR(mremap(r + len, PAGE, 2 * PAGE, MREMAP_MAYMOVE), EFAULT);
  CHECK(munmap(r, len / 2) == 0);
  printf("mremap: contents kept (grow+move, shrink)\n");
}

static sigjmp_buf g_jump;
static volatile sig_atomic_t g_faults;

static void on_segv(int sig) {
  (void)sig;
  ++g_faults;
  siglongjmp(g_jump, 1);
}

static void test_mprotect(void) {
  size_t len = kPages * PAGE;
  unsigned char* p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  fill_all(p, kPages, 6);
  CHECK(madvise(p, len, MADV_MERGEABLE) == 0);
  unsigned long merged = wait_merging(kPages, 30);
  printf("mprotect: %lu pages merged before\n", merged);
  CHECK(merged >= kPages);
  CHECK(mprotect(p, len, PROT_READ) == 0);
  struct sigaction sa, old;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_segv;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(SIGSEGV, &sa, &old) == 0);
  /* The scanner keeps running at full speed meanwhile. */
  double end = now_seconds() + 0.5;
  unsigned long tries = 0;
  while (now_seconds() < end) {
    for (size_t i = 0; i < kPages; i += 7) {
      ++tries;
      if (sigsetjmp(g_jump, 1) == 0) {
        ((volatile unsigned char*)p)[i * PAGE] = 0x99;
        fprintf(stderr, "write to read-only page %zu succeeded\n", i);
        exit(1);
      }
    }
    sleep_ms(5);
  }
  CHECK(sigaction(SIGSEGV, &old, NULL) == 0);
  CHECK(g_faults == (sig_atomic_t)tries);
  check_all(p, kPages, 6);
  CHECK(mprotect(p, len, PROT_READ | PROT_WRITE) == 0);
  p[PAGE] = 0x42;
  CHECK(p[PAGE] == 0x42 && holds_class(p, 2, 6));
  CHECK(munmap(p, len) == 0);
  printf("mprotect: %lu writes to the read-only range all faulted\n", tries);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("mapping_test");
  int pagemap = open("/proc/self/pagemap", O_RDONLY);
  CHECK(pagemap >= 0);
  scan_at_full_speed();
  /* Background work for the scanner: distinct pages it keeps visiting, so
   * that its batches also cover the regions below at realistic speed. */
  enum { kBackground = 4096 };
  unsigned char* bg = mmap(NULL, kBackground * PAGE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(bg != MAP_FAILED);
  for (size_t i = 0; i < kBackground; ++i) {
    memset(bg + i * PAGE, 0x3c, PAGE);
    memcpy(bg + i * PAGE, &i, sizeof(i));
  }
  CHECK(madvise(bg, kBackground * PAGE, MADV_MERGEABLE) == 0);
  test_replace(pagemap);
  test_mremap();
  test_mprotect();
  CHECK(munmap(bg, kBackground * PAGE) == 0);
  close(pagemap);
  printf("PASS mapping_test\n");
  return 0;
}
