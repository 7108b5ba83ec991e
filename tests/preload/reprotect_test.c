/* Advice outlives mprotect, as the kernel's VM_MERGEABLE does: merged
 * memory made read-only (or PROT_NONE) keeps its bytes, and once it is
 * read+write again it merges again, without another MADV_MERGEABLE. The
 * advice ends as the kernel's does: MADV_UNMERGEABLE while read-only, or
 * munmap (a new mapping there is not merged); mremap moves it. Memory
 * advised while
 * PROT_NONE merges once it is read+write. Until 2026-12-06 samepage
 * dropped the advice at the first mprotect (and never took it for memory
 * that was not read+write), and the memory never merged (again). A
 * second buffer keeps merging throughout, so that full scans go on. Same
 * assertions natively. */

#define _GNU_SOURCE
#include <sys/mman.h>

#include "ksm_test_util.h"

enum { kPages = 64 };

/* Waits (at most 30 s) until this process has exactly `want` merged pages;
 * returns the last count. */
static unsigned long wait_merging_exactly(unsigned long want) {
  const double end = now_seconds() + 30;
  unsigned long n = 0;
  while ((n = merging_pages()) != want && now_seconds() < end) sleep_ms(20);
  return n;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("reprotect_test");
  unsigned char* p = map_advised_class(kPages, 3);
  unsigned char* other = map_advised_class(kPages, 4);
  unsigned char* m = map_advised_class(kPages, 6);
  scan_at_full_speed();
  CHECK(wait_merging(3 * kPages, 30) >= 3 * kPages);

  /* Read-only, then read+write again: merged again. */
  CHECK(mprotect(p, kPages * PAGE, PROT_READ) == 0);
  check_pages_hold(p, 0, kPages, 3);
  CHECK(mprotect(p, kPages * PAGE, PROT_READ | PROT_WRITE) == 0);
  CHECK(wait_merging_exactly(3 * kPages) == 3 * kPages);
  p[3 * PAGE] = 1; /* writable, and its own */
  CHECK(p[3 * PAGE] == 1 && holds_class(p, 4, 3));
  p[3 * PAGE] = 0x5a;
  printf("read-only and back: merged again\n");

  /* The same through PROT_NONE, half of the range. */
  CHECK(mprotect(p, kPages / 2 * PAGE, PROT_NONE) == 0);
  CHECK(mprotect(p, kPages / 2 * PAGE, PROT_READ | PROT_WRITE) == 0);
  CHECK(wait_merging_exactly(3 * kPages) == 3 * kPages);
  check_pages_hold(p, 0, kPages, 3);
  printf("PROT_NONE and back: merged again\n");

  /* Moved while read-only: the advice moves with it. */
  CHECK(mprotect(m, kPages * PAGE, PROT_READ) == 0);
  unsigned char* moved = (unsigned char*)mremap(
      m, kPages * PAGE, 2 * kPages * PAGE, MREMAP_MAYMOVE);
  CHECK(moved != MAP_FAILED);
  check_pages_hold(moved, 0, kPages, 6);
  CHECK(mprotect(moved, kPages * PAGE, PROT_READ | PROT_WRITE) == 0);
  CHECK(wait_merging_exactly(3 * kPages) == 3 * kPages);
  check_pages_hold(moved, 0, kPages, 6);
  CHECK(munmap(moved, 2 * kPages * PAGE) == 0);
  CHECK(wait_merging_exactly(2 * kPages) == 2 * kPages);
  printf("moved while read-only: merged again\n");

  /* MADV_UNMERGEABLE while read-only ends the advice. */
  CHECK(mprotect(p, kPages * PAGE, PROT_READ) == 0);
  CHECK(madvise(p, kPages * PAGE, MADV_UNMERGEABLE) == 0);
  CHECK(mprotect(p, kPages * PAGE, PROT_READ | PROT_WRITE) == 0);
  CHECK(wait_merging_exactly(kPages) == kPages);
  wait_full_scans(2);
  CHECK(merging_pages() == kPages);
  printf("unadvised while read-only: not merged again\n");

  /* munmap while read-only ends it too: new memory there is not merged. */
  CHECK(madvise(p, kPages * PAGE, MADV_MERGEABLE) == 0);
  CHECK(wait_merging_exactly(2 * kPages) == 2 * kPages);
  CHECK(mprotect(p, kPages * PAGE, PROT_READ) == 0);
  CHECK(munmap(p, kPages * PAGE) == 0);
  unsigned char* q =
      (unsigned char*)mmap(p, kPages * PAGE, PROT_READ,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  CHECK(q == p);
  CHECK(mprotect(q, kPages * PAGE, PROT_READ | PROT_WRITE) == 0);
  for (size_t i = 0; i < kPages; ++i) fill_class(q, i, 3);
  wait_full_scans(2);
  CHECK(merging_pages() == kPages);
  check_pages_hold(other, 0, kPages, 4);
  printf("unmapped while read-only: new memory there not merged\n");

  /* Advised while PROT_NONE (a reserve made usable later, as malloc's
   * arenas grow): merged once read+write and filled. */
  unsigned char* r = (unsigned char*)mmap(NULL, kPages * PAGE, PROT_NONE,
                                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(r != MAP_FAILED);
  CHECK(madvise(r, kPages * PAGE, MADV_MERGEABLE) == 0);
  CHECK(mprotect(r, kPages * PAGE, PROT_READ | PROT_WRITE) == 0);
  for (size_t i = 0; i < kPages; ++i) fill_class(r, i, 5);
  CHECK(wait_merging_exactly(2 * kPages) == 2 * kPages);
  check_pages_hold(r, 0, kPages, 5);
  printf("advised while PROT_NONE: merged once read+write\n");
  printf("PASS reprotect_test\n");
  return 0;
}
