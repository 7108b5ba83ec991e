/* Run where /proc is not mounted (preload.without_proc): samepage cannot
 * start there. Its KSM calls must fail (madvise -1, with the errno of what
 * failed) and the program's memory stay intact and writable. Prints
 * "memory intact" when so. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

int main(void) {
  enum { kPages = 64 };
  unsigned char* p = mmap(NULL, kPages * 4096, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 1;
  memset(p, 7, kPages * 4096);
  const int r = madvise(p, kPages * 4096, 12 /* MADV_MERGEABLE */);
  printf("madvise: %d (%s)\n", r, r != 0 ? strerror(errno) : "ok");
  for (size_t i = 0; i < kPages * 4096; ++i) {
    if (p[i] != 7) return 1;
  }
  p[0] = 1;
  if (r != -1 || p[0] != 1) return 1;
  puts("memory intact");
  return 0;
}
