/* mremap of memory that merging made into several mappings. Under
 * samepage a merged run of pages is a mapping of its own, and the
 * anonymous copies that give merged pages back (MADV_UNMERGEABLE, an
 * mprotect away from read+write, run=2) are not joined with their
 * neighbours again, so what the program mapped as one range may span many
 * mappings, where the kernel refuses mremap with EFAULT. Natively it is
 * one mapping, and mremap works. Until 2026-12-06 samepage copied an
 * advised range into a new read+write mapping and failed (EFAULT) on any
 * other: memory unadvised after merging, or given back by an mprotect
 * and then made read+write, could not be moved or grown. Every way of
 * moving is tried: grown with MREMAP_MAYMOVE, grown in place, moved to a
 * fixed address (also shrinking), MREMAP_DONTUNMAP, read-only memory
 * (the new pages read-only too), locked memory (the new pages locked).
 * A range over two mappings of different protections, or over a hole,
 * still fails with EFAULT. Same assertions natively. */

#define _GNU_SOURCE
#include <sys/mman.h>

#include "ksm_test_util.h"

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

enum { kPages = 64, kBuffers = 8, kLen = kPages * PAGE };

/* Page i of buffer b: a page shared by every buffer, but every fourth,
 * which is the buffer's own. */
static int class_of(int b, size_t i) {
  return i % 4 == 0 ? 20 + b * 16 + (int)(i / 4) : 3;
}

static unsigned char* map_buffer(int b) {
  unsigned char* p = mmap(NULL, kLen, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < kPages; ++i) fill_class(p, i, class_of(b, i));
  CHECK(madvise(p, kLen, MADV_MERGEABLE) == 0);
  return p;
}

static void check_buffer(const unsigned char* p, int b, size_t pages) {
  for (size_t i = 0; i < pages; ++i) CHECK(holds_class(p, i, class_of(b, i)));
}

static void check_zero(const unsigned char* p, size_t len) {
  for (size_t i = 0; i < len; ++i) CHECK(p[i] == 0);
}

/* The mappings over [p, p + len), and whether all have protection `perms`
 * ("rw-p"). */
static int mappings_over(const void* p, size_t len, const char* perms,
                         int* all_perms) {
  FILE* f = fopen("/proc/self/maps", "r");
  CHECK(f != NULL);
  char line[512];
  int n = 0;
  *all_perms = 1;
  const unsigned long lo = (unsigned long)p, hi = lo + len;
  while (fgets(line, sizeof(line), f)) {
    unsigned long s, e;
    char pr[8];
    if (sscanf(line, "%lx-%lx %7s", &s, &e, pr) != 3) continue;
    if (e <= lo || s >= hi) continue;
    ++n;
    if (strcmp(pr, perms) != 0) *all_perms = 0;
  }
  fclose(f);
  return n;
}

static int is_mapped(const void* p, size_t len) {
  return msync((void*)p, len, MS_ASYNC) == 0;
}

static long vm_locked_kb(void) {
  char buf[8192];
  CHECK(read_text("/proc/self/status", buf, sizeof(buf)) > 0);
  const char* l = strstr(buf, "VmLck:");
  CHECK(l != NULL);
  return strtol(l + 6, NULL, 10);
}

static void report(const char* what, const void* p, size_t len) {
  int same;
  printf("%s: %d mapping(s) before\n", what, mappings_over(p, len, "", &same));
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("mremap_pieces_test");
  unsigned char* b[kBuffers];
  for (int i = 0; i < kBuffers; ++i) b[i] = map_buffer(i);
  CHECK(mlock(b[6], kLen) == 0);
  scan_at_full_speed();
  /* The shared pages of all buffers: one of them stays a frame. */
  const unsigned long shared = kBuffers * (kPages - kPages / 4);
  CHECK(wait_merging(shared, 30) >= shared);
  /* No scan meanwhile: the free space that in-place growth needs is then
   * not taken by anything else. */
  write_knob("run", "0");
  for (int i = 1; i < kBuffers; ++i) {
    if (i == 5) continue; /* given back by mprotect below */
    CHECK(madvise(b[i], kLen, MADV_UNMERGEABLE) == 0);
  }

  /* Advised, merged: grown and moved; merges again at its new place. */
  report("advised", b[0], kLen);
  unsigned char* q = mremap(b[0], kLen, 2 * kLen, MREMAP_MAYMOVE);
  CHECK(q != MAP_FAILED);
  check_buffer(q, 0, kPages);
  check_zero(q + kLen, kLen);
  q[kLen] = 1;
  q[kLen] = 0;
  b[0] = q;
  printf("advised: grown and moved\n");

  /* Unadvised: grown and moved. */
  report("unadvised", b[1], kLen);
  q = mremap(b[1], kLen, 3 * kLen, MREMAP_MAYMOVE);
  CHECK(q != MAP_FAILED);
  check_buffer(q, 1, kPages);
  check_zero(q + kLen, 2 * kLen);
  q[3 * kLen - 1] = 7;
  CHECK(munmap(q, 3 * kLen) == 0);
  printf("unadvised: grown and moved\n");

  /* Moved to a fixed address, replacing what was there. */
  unsigned char* target = map_class(kPages, 9);
  report("fixed", b[2], kLen);
  q = mremap(b[2], kLen, kLen, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  CHECK(q == target);
  check_buffer(q, 2, kPages);
  CHECK(!is_mapped(b[2], kLen));
  CHECK(munmap(q, kLen) == 0);
  printf("fixed: moved\n");

  /* Moved to a fixed address, shrinking: the tail is gone. */
  target = map_class(kPages, 9);
  report("fixed, shrinking", b[3], kLen);
  q = mremap(b[3], kLen, kLen / 2, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  CHECK(q == target);
  check_buffer(q, 3, kPages / 2);
  CHECK(holds_class(target, kPages / 2, 9)); /* beyond it: as it was */
  CHECK(!is_mapped(b[3], kLen));
  CHECK(munmap(target, kLen) == 0);
  printf("fixed, shrinking: moved\n");

  /* MREMAP_DONTUNMAP: the source stays, reading zeros. */
  report("dontunmap", b[4], kLen);
  /* The new address too (none): glibc 2.36 hands the kernel whatever is
   * in its register otherwise, and the kernel checks it for this flag
   * (EINVAL when it is not page-aligned). */
  q = mremap(b[4], kLen, kLen, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, NULL);
  CHECK(q != MAP_FAILED && q != b[4]);
  check_buffer(q, 4, kPages);
  CHECK(is_mapped(b[4], kLen));
  check_zero(b[4], kLen);
  CHECK(munmap(q, kLen) == 0);
  CHECK(munmap(b[4], kLen) == 0);
  printf("dontunmap: moved, the source reads zeros\n");

  /* Read-only (given back by the mprotect): grown read-only. */
  CHECK(mprotect(b[5], kLen, PROT_READ) == 0);
  report("read-only", b[5], kLen);
  q = mremap(b[5], kLen, 2 * kLen, MREMAP_MAYMOVE);
  CHECK(q != MAP_FAILED);
  check_buffer(q, 5, kPages);
  check_zero(q + kLen, kLen);
  int all_read_only;
  (void)mappings_over(q, 2 * kLen, "r--p", &all_read_only);
  CHECK(all_read_only);
  CHECK(munmap(q, 2 * kLen) == 0);
  printf("read-only: grown and moved, read-only\n");

  /* Locked: grown and moved, the new pages locked too. */
  const long locked = vm_locked_kb();
  report("locked", b[6], kLen);
  q = mremap(b[6], kLen, 2 * kLen, MREMAP_MAYMOVE);
  CHECK(q != MAP_FAILED);
  check_buffer(q, 6, kPages);
  check_zero(q + kLen, kLen);
  CHECK(vm_locked_kb() == locked + kLen / 1024);
  CHECK(munmap(q, 2 * kLen) == 0);
  printf("locked: grown and moved, locked\n");

  /* Shrunk in place (the kernel does it before it looks at the mappings),
   * then grown in place again, into the space just freed. */
  report("in place", b[7], kLen);
  CHECK(mremap(b[7], kLen, kLen / 2, 0) == b[7]);
  CHECK(!is_mapped(b[7] + kLen / 2, kLen / 2));
  CHECK(mremap(b[7], kLen / 2, kLen, 0) == b[7]);
  check_buffer(b[7], 7, kPages / 2);
  check_zero(b[7] + kLen / 2, kLen / 2);
  CHECK(munmap(b[7], kLen) == 0);
  printf("in place: shrunk and grown\n");

  /* What the kernel refuses stays refused: two mappings of different
   * protections, and a hole. Nothing is changed. */
  unsigned char* two = map_class(kPages, 11);
  CHECK(madvise(two, kLen, MADV_MERGEABLE) == 0);
  CHECK(mprotect(two + kLen / 2, kLen / 2, PROT_READ) == 0);
  CHECK_ERR(mremap(two, kLen, 2 * kLen, MREMAP_MAYMOVE), EFAULT);
  CHECK(munmap(two + kLen / 4, PAGE) == 0);
  CHECK(mprotect(two + kLen / 2, kLen / 2, PROT_READ | PROT_WRITE) == 0);
  CHECK_ERR(mremap(two, kLen, 2 * kLen, MREMAP_MAYMOVE), EFAULT);
  check_pages_hold(two, 0, kPages / 4, 11);
  check_pages_hold(two, kPages / 4 + 1, kPages, 11);
  CHECK(munmap(two, kLen) == 0);
  printf("different protections, a hole: EFAULT, nothing changed\n");

  /* The moved advice: the first buffer merges again where it went. */
  write_knob("run", "1");
  CHECK(wait_merging(kPages - kPages / 4, 30) >= kPages - kPages / 4);
  check_buffer(b[0], 0, kPages);
  printf("advised: merged again after the move\n");
  return 0;
}
