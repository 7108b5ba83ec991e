/* MADV_HUGEPAGE and MADV_NOHUGEPAGE outlive merging. They are flags of the
 * mapping (VmFlags hg, nh), and natively KSM never changes the mapping.
 * Under samepage merged pages are mappings of their own, and the copies
 * that give them back too: until 2026-12-06 those came without the
 * program's transparent-huge-page advice, so memory advised MADV_HUGEPAGE
 * (a JVM's heap, a database's buffers) was no longer backed by huge pages
 * once merged and given back, and MADV_NOHUGEPAGE memory could be. Here
 * both kinds are merged and given back (run=2); every mapping over them
 * must still carry its flag, while merged too. Same assertions
 * natively. */

#define _GNU_SOURCE
#include <sys/mman.h>

#include "ksm_test_util.h"

enum { kPages = 64 };

/* Mappings over [p, p + len) in smaps, and how many carry `flag`. */
static int mappings_with_flag(const void* p, size_t len, const char* flag,
                              int* with) {
  FILE* f = fopen("/proc/self/smaps", "r");
  CHECK(f != NULL);
  char line[512];
  int n = 0, in = 0;
  *with = 0;
  const unsigned long lo = (unsigned long)p, hi = lo + len;
  while (fgets(line, sizeof(line), f)) {
    unsigned long s, e;
    if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') &&
        line[0] != 'V') {
      in = s < hi && e > lo;
      n += in;
    } else if (in && strncmp(line, "VmFlags:", 8) == 0) {
      char want[8];
      snprintf(want, sizeof(want), " %s", flag);
      if (strstr(line, want)) ++*with;
    }
  }
  fclose(f);
  return n;
}

static void check_flag(const char* what, const void* p, const char* flag) {
  int with;
  const int n = mappings_with_flag(p, kPages * PAGE, flag, &with);
  printf("%s: %d of %d mappings carry %s\n", what, with, n, flag);
  CHECK(n > 0 && with == n);
}

static unsigned char* map_advised(int thp_advice) {
  unsigned char* p = map_class(kPages, 3);
  for (size_t i = 0; i < kPages; i += 3) fill_class(p, i, 50 + (int)i);
  CHECK(madvise(p, kPages * PAGE, thp_advice) == 0);
  CHECK(madvise(p, kPages * PAGE, MADV_MERGEABLE) == 0);
  return p;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (access("/sys/kernel/mm/transparent_hugepage/enabled", F_OK) != 0) {
    printf("SKIP thp_advice_test: no transparent huge pages here\n");
    return SKIP_CODE;
  }
  ksm_setup_or_skip("thp_advice_test");
  unsigned char* huge = map_advised(MADV_HUGEPAGE);
  unsigned char* small = map_advised(MADV_NOHUGEPAGE);
  scan_at_full_speed();
  /* Two of every three pages are duplicates, in both. */
  const unsigned long dups = 2 * (kPages - (kPages + 2) / 3);
  CHECK(wait_merging(dups, 30) >= dups);
  check_flag("merged, MADV_HUGEPAGE", huge, "hg");
  check_flag("merged, MADV_NOHUGEPAGE", small, "nh");
  write_knob("run", "2");
  check_flag("given back, MADV_HUGEPAGE", huge, "hg");
  check_flag("given back, MADV_NOHUGEPAGE", small, "nh");
  check_pages_hold(huge, 1, 3, 3);
  check_pages_hold(small, 1, 3, 3);
  return 0;
}
