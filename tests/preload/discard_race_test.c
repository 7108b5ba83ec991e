/* MADV_DONTNEED on memory the scanner keeps merging at full speed: every
 * dropped page must read back zeros, as anonymous memory does, never the
 * content of a page it was merged with. Under samepage the page is unmerged
 * and dropped as one step; if the scanner could merge it again in between,
 * the page would read its old content. Same assertions natively. */

#define _GNU_SOURCE
#include "ksm_test_util.h"

enum { kPages = 64 };

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("discard_race_test");
  unsigned char* p = map_advised_class(kPages, 7);
  scan_at_full_speed();
  CHECK(wait_merging(kPages / 2, 30) >= kPages / 2);
  /* ~1.5 s: rewrite a page (it merges again while identical to the rest),
   * drop it, check zeros. */
  unsigned long rounds = 0;
  const double end = now_seconds() + 1.5;
  while (now_seconds() < end) {
    const size_t i = rounds % kPages;
    fill_class(p, i, 7);
    if (rounds % 8 == 0) sleep_ms(1);  /* let the scanner merge it */
    CHECK(madvise(p + i * PAGE, PAGE, MADV_DONTNEED) == 0);
    CHECK(is_zero_page(p + i * PAGE));
    ++rounds;
  }
  printf("%lu drops of merged or merging pages, all read zeros\n", rounds);
  for (size_t i = 0; i < kPages; ++i) {
    CHECK(is_zero_page(p + i * PAGE) || holds_class(p, i, 7));
  }
  CHECK(munmap(p, kPages * PAGE) == 0);
  printf("PASS discard_race_test\n");
  return 0;
}
