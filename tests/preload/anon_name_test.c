/* prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME) over merged memory. The kernel
 * names anonymous memory only; merged pages under samepage map frames (a
 * file), which it refuses a name with EINVAL, where natively KSM pages are
 * anonymous and the call works. The preload gives the pages back first.
 * Skipped where the kernel names no memory at all (built without
 * CONFIG_ANON_VMA_NAME, as Debian's: EINVAL on plain memory too). Same
 * assertions natively. */

#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/prctl.h>

#include "ksm_test_util.h"

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

enum { kPages = 32 };

static int name(void* p, size_t len, const char* n) {
  return prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)p, len,
               (unsigned long)n);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  unsigned char* probe = map_class(1, 1);
  if (name(probe, PAGE, "probe") != 0) {
    printf("SKIP anon_name_test: this kernel names no memory (%s)\n",
           strerror(errno));
    return SKIP_CODE;
  }
  CHECK(munmap(probe, PAGE) == 0);
  ksm_setup_or_skip("anon_name_test");
  unsigned char* p = map_advised_class(kPages, 3);
  scan_at_full_speed();
  CHECK(wait_merging(kPages, 30) >= kPages);
  CHECK(name(p, kPages * PAGE, "merged") == 0);
  check_pages_hold(p, 0, kPages, 3);
  p[PAGE] = 1;
  CHECK(p[PAGE] == 1 && holds_class(p, 2, 3));
  printf("merged memory named\n");
  return 0;
}
