/* Memory calls made with syscall(2) by number, as a program does where its
 * C library has no wrapper (mseal before glibc 2.41, process_madvise before
 * 2.36), act on merged memory as the libc functions do, and as on memory
 * kernel KSM merged: MADV_DONTNEED (madvise, process_madvise) reads back
 * zeros with the pages around intact; a merged range moved with mremap
 * keeps its bytes through further full scans, and so does one reprotected
 * read-only and back; mseal (Linux 6.10) of merged memory leaves it
 * readable and writable, a later MADV_DONTNEED reads zeros, and
 * MADV_UNMERGEABLE and an unmerge of everything (run=2) work; munmap by
 * number unmaps. Same assertions natively. */

#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ksm_test_util.h"

#ifndef SYS_mseal
#define SYS_mseal 462
#endif

enum { kPages = 64 };

/* Pages [from, to) of p read zeros, every other page class cls. */
static void zeros_between(const unsigned char* p, size_t from, size_t to,
                          int cls) {
  for (size_t i = 0; i < kPages; ++i) {
    CHECK(i >= from && i < to ? is_zero_page(p + i * PAGE)
                              : holds_class(p, i, cls));
  }
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("raw_syscall_test");
  unsigned char* a = map_advised_class(kPages, 3);
  unsigned char* b = map_advised_class(kPages, 3);
  unsigned char* c = map_advised_class(kPages, 3);
  unsigned char* d = map_advised_class(kPages, 3);
  scan_at_full_speed();
  CHECK(wait_merging(4 * kPages, 30) >= 4 * kPages);

  /* Discards by number. */
  CHECK(syscall(SYS_madvise, a + 8 * PAGE, 4 * PAGE, MADV_DONTNEED) == 0);
  zeros_between(a, 8, 12, 3);
  const int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
  CHECK(pidfd >= 0);
  struct iovec iov = {a + 20 * PAGE, 2 * PAGE};
  CHECK(syscall(SYS_process_madvise, pidfd, &iov, 1, MADV_DONTNEED, 0) ==
        2 * PAGE);
  close(pidfd);
  for (size_t i = 20; i < 22; ++i) CHECK(is_zero_page(a + i * PAGE));

  /* Moved and reprotected by number: the bytes stay, scans go on. */
  void* moved =
      (void*)syscall(SYS_mremap, b, kPages * PAGE, kPages * PAGE,
                     MREMAP_MAYMOVE | MREMAP_FIXED, d); /* over d: d is gone */
  CHECK(moved == d);
  CHECK(syscall(SYS_mprotect, c, kPages * PAGE, PROT_READ) == 0);
  check_pages_hold(c, 0, kPages, 3);
  CHECK(syscall(SYS_mprotect, c, kPages * PAGE, PROT_READ | PROT_WRITE) == 0);
  wait_full_scans(2);
  check_pages_hold(d, 0, kPages, 3);
  check_pages_hold(c, 0, kPages, 3);
  d[5 * PAGE] = 1; /* writable, and its own */
  CHECK(d[5 * PAGE] == 1 && holds_class(d, 6, 3) && holds_class(c, 5, 3));

  /* Sealed by number (Linux 6.10): still readable and writable, and a
   * discard of a writable sealed page still reads zeros. */
  errno = 0;
  if (syscall(SYS_mseal, c, kPages * PAGE, 0) == 0) {
    check_pages_hold(c, 0, kPages, 3);
    CHECK(madvise(c + 30 * PAGE, 2 * PAGE, MADV_DONTNEED) == 0);
    zeros_between(c, 30, 32, 3);
    c[40 * PAGE] = 7;
    CHECK(c[40 * PAGE] == 7 && holds_class(c, 41, 3));
    CHECK(madvise(c, kPages * PAGE, MADV_UNMERGEABLE) == 0);
    CHECK(holds_class(c, 41, 3));
  } else {
    printf("mseal: %s (a kernel before 6.10: sealing not run)\n",
           strerror(errno));
    CHECK(errno == ENOSYS);
  }

  CHECK(syscall(SYS_munmap, a, kPages * PAGE) == 0);
  CHECK(syscall(SYS_munmap, d, kPages * PAGE) == 0);
  /* The exit handler's run=2 must unmerge everything (sealed memory too). */
  printf("PASS raw_syscall_test\n");
  return 0;
}
