/* Full scans go on over advice samepage cannot act on. The kernel keeps
 * VM_MERGEABLE on memory it will not merge at the moment (PROT_NONE or
 * read-only), and on memory samepage leaves out but the kernel merges
 * (MADV_WIPEONFORK), and ksmd goes on visiting the process: full_scans
 * counts on, and a program that waits for full scans (as KSM's own tests
 * do) sees them; /proc/self/ksm_stat says ksm_mergeable: yes (until
 * 2026-12-07 samepage said no there). Until 2026-12-06 samepage's scanner went
 * to sleep when such memory was all that was advised, and such a wait never
 * ended. When the advice ends (munmap, MADV_UNMERGEABLE) the scans stop, as
 * ksmd's do. Same assertions natively. */

#define _GNU_SOURCE
#include <sys/mman.h>

#include "ksm_test_util.h"

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

enum { kPages = 16 };

/* Full scans counted in the next `ms` milliseconds. */
static unsigned long scans_in(int ms) {
  const unsigned long before = read_ulong(KSM_DIR "full_scans");
  sleep_ms(ms);
  return read_ulong(KSM_DIR "full_scans") - before;
}

/* After the advice ended: a scan under way may still end, then none. */
static void check_scans_stop(const char* what) {
  (void)scans_in(100);
  const unsigned long n = scans_in(500);
  printf("%s: %lu full scans in 0.5 s\n", what, n);
  CHECK(n <= 1);
  /* No VM_MERGEABLE mapping left. */
  CHECK(ksm_stat_value("ksm_mergeable") == 0);
}

/* Three more full scans come (wait_full_scans fails after 30 s), and the
 * pages of p (if readable) still hold class cls. */
static void check_scans_go_on(const char* what, const unsigned char* p,
                              int cls) {
  wait_full_scans(3);
  if (p != NULL) check_pages_hold(p, 0, kPages, cls);
  /* The process still has a VM_MERGEABLE mapping. */
  CHECK(ksm_stat_value("ksm_mergeable") == 1);
  printf("%s: full scans go on\n", what);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("left_out_scans_test");
  write_knob("pages_to_scan", "100");
  write_knob("sleep_millisecs", "10");
  write_knob("run", "1");

  /* Wipe-on-fork memory, the only advice. */
  unsigned char* w = map_class(kPages, 3);
  CHECK(madvise(w, kPages * PAGE, MADV_WIPEONFORK) == 0);
  CHECK(madvise(w, kPages * PAGE, MADV_MERGEABLE) == 0);
  check_scans_go_on("wipe-on-fork memory", w, 3);
  CHECK(munmap(w, kPages * PAGE) == 0);
  check_scans_stop("unmapped");

  /* Memory advised while PROT_NONE (a reserve). */
  unsigned char* r = map_class(kPages, 4);
  CHECK(mprotect(r, kPages * PAGE, PROT_NONE) == 0);
  CHECK(madvise(r, kPages * PAGE, MADV_MERGEABLE) == 0);
  check_scans_go_on("PROT_NONE memory", NULL, 4);
  CHECK(madvise(r, kPages * PAGE, MADV_UNMERGEABLE) == 0);
  check_scans_stop("unadvised");
  CHECK(munmap(r, kPages * PAGE) == 0);

  /* Merged memory made read-only. */
  unsigned char* m = map_advised_class(kPages, 5);
  CHECK(wait_merging(kPages, 30) >= kPages);
  CHECK(mprotect(m, kPages * PAGE, PROT_READ) == 0);
  check_scans_go_on("merged memory made read-only", m, 5);
  CHECK(munmap(m, kPages * PAGE) == 0);
  check_scans_stop("unmapped");
  return 0;
}
