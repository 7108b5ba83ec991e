/* An allocator's unmap and new mapping at the same address, made while a
 * merge may be in flight there (mimalloc unmaps its segments and maps
 * them again; such calls come from the allocator's own code, which
 * samepage cannot enter). Rounds for a few seconds: a fresh advised region
 * of pages equal to memory merged before (so they merge at their first
 * visit), then, 0-3 ms later, one of its pages unmapped and mapped anew by
 * "the allocator" (fake_allocator.c) and written. The new page must keep
 * what was written, and the region's other pages their contents.
 * Under samepage run, before allocator calls waited for merge windows
 * (Engine::AllocatorChange), a window that had checked its pages before
 * the unmap mapped its frame over the new page afterwards: the write was
 * lost. A preempted scanner makes that gap; the Debug build's
 * SAMEPAGE_DEBUG_MAP_DELAY_US (set by CMake) stands in for it, and the
 * test then failed in every run. Same assertions natively (kernel KSM). */

#define _GNU_SOURCE
#include <stdint.h>

#include "ksm_test_util.h"

int fake_allocator_remap(void* p, size_t len, int over, int fill);

enum { kPages = 32 };
static const double kSeconds = 3.0;

int main(void) {
  ksm_setup_or_skip("allocator_remap_test");
  scan_at_full_speed();
  /* Memory the regions' pages equal, merged first. */
  unsigned char* seed = map_advised_class(kPages, 1);
  CHECK(wait_merging(kPages, 20) >= kPages);
  const size_t len = kPages * PAGE;
  unsigned long rounds = 0, slow = 0;
  const double end = now_seconds() + kSeconds;
  for (unsigned round = 0; now_seconds() < end; ++round, ++rounds) {
    unsigned char* r = map_advised_class(kPages, 1);
    /* 0-3 ms: the remap lands before, in and after the merge's windows. */
    const double until = now_seconds() + (round % 7) * 0.0005;
    while (now_seconds() < until) {
    }
    const size_t i = (round * 7 + 3) % kPages;
    const int fill = 0x10 + (int)(round % 64);
    const double t0 = now_seconds();
    CHECK(fake_allocator_remap(r + i * PAGE, PAGE, (int)(round & 1), fill) ==
          0);
    if (now_seconds() - t0 > 0.001) ++slow; /* it waited for a window */
    sleep_ms(4);                            /* past the windows under way */
    const long bad = first_not(r + i * PAGE, PAGE, (unsigned char)fill);
    if (bad >= 0) {
      fprintf(stderr,
              "round %u: page %zu, written with %#x by the allocator after "
              "it mapped it anew, has %#x at byte %ld: the write was lost\n",
              round, i, fill, r[i * PAGE + (size_t)bad], bad);
      return 1;
    }
    for (size_t k = 0; k < kPages; ++k) {
      if (k != i && !holds_class(r, k, 1)) {
        fprintf(stderr, "round %u: page %zu lost its contents\n", round, k);
        return 1;
      }
    }
    CHECK(munmap(r, len) == 0);
  }
  for (size_t k = 0; k < kPages; ++k) CHECK(holds_class(seed, k, 1));
  printf("allocator_remap_test: %lu rounds, %lu remaps took over 1 ms\n",
         rounds, slow);
  return 0;
}
