/* A stand-in for another allocator, for allocator_remap_test: a shared
 * library that provides malloc (glibc's, passed on), so that samepage
 * takes it for the program's allocator (src/preload/real.cc,
 * OtherAllocatorsMalloc) and the memory calls made from its code for the
 * allocator's own, as mimalloc's unmaps of its segments are. */

#define _GNU_SOURCE
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>

extern void* __libc_malloc(size_t size);

__attribute__((visibility("default"))) void* malloc(size_t size) {
  return __libc_malloc(size);
}

/* What an allocator does when it gives memory back and takes it again at
 * the same address: [p, p + len) unmapped then mapped anew (or, with
 * `over`, mapped over with MAP_FIXED at once), then `fill` written into
 * every byte. 0, or -1 with errno. */
__attribute__((visibility("default"))) int fake_allocator_remap(void* p,
                                                                size_t len,
                                                                int over,
                                                                int fill) {
  if (!over && munmap(p, len) != 0) return -1;
  void* q = mmap(p, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  if (q == MAP_FAILED) return -1;
  memset(q, fill, len);
  return 0;
}

/* An allocator's mprotect of memory it holds (a guard, or read-only data):
 * 0, or -1 with errno. */
__attribute__((visibility("default"))) int fake_allocator_protect(void* p,
                                                                  size_t len,
                                                                  int prot) {
  return mprotect(p, len, prot);
}
