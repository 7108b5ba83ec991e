/* process_madvise on this process acts on merged memory as madvise does,
 * and as it does under kernel KSM, whichever way the process is named: a
 * pidfd of its own, or (Linux 6.14 and later) PIDFD_SELF_THREAD_GROUP or
 * PIDFD_SELF_THREAD, which name it without a descriptor. MADV_DONTNEED of
 * two ranges reads back zeros there while the pages around keep their
 * bytes, and a dropped page is writable and its own; MADV_UNMERGEABLE
 * unmerges every page, its bytes kept, and MADV_MERGEABLE merges them
 * again. A kernel without the names answers EBADF, samepage too. Same
 * assertions natively. */

#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ksm_test_util.h"

enum { kPages = 96, kSelfThread = -10000, kSelfThreadGroup = -10001 };

/* Drops pages [first, first + 2) and [first + 4, first + 6) of p through
 * `pidfd`; 0 if the kernel knows no such name (EBADF), else 1. */
static int drop_two_ranges(unsigned char* p, size_t first, int pidfd,
                           const char* how) {
  struct iovec iov[2] = {{p + first * PAGE, 2 * PAGE},
                         {p + (first + 4) * PAGE, 2 * PAGE}};
  errno = 0;
  const ssize_t r = process_madvise(pidfd, iov, 2, MADV_DONTNEED, 0);
  if (r == -1 && errno == EBADF && pidfd < 0) {
    printf("%s: EBADF (a kernel before 6.14): not run\n", how);
    return 0;
  }
  CHECK(r == 4 * PAGE);
  for (size_t i = first; i < first + 6; ++i) {
    const int dropped = i < first + 2 || i >= first + 4;
    CHECK(dropped ? is_zero_page(p + i * PAGE) : holds_class(p, i, 3));
  }
  /* A dropped page is writable, and only it changes. */
  p[first * PAGE + 9] = 77;
  CHECK(p[first * PAGE + 9] == 77 && p[(first + 1) * PAGE + 9] == 0);
  printf("%s: dropped, zeros read back\n", how);
  return 1;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("process_madvise_test");
  unsigned char* p = map_advised_class(kPages, 3);
  scan_at_full_speed();
  CHECK(wait_merging(kPages, 30) >= kPages);

  const int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
  CHECK(pidfd >= 0);
  CHECK(drop_two_ranges(p, 8, pidfd, "pidfd") == 1);
  const int named =
      drop_two_ranges(p, 24, kSelfThreadGroup, "PIDFD_SELF_THREAD_GROUP");
  if (named) CHECK(drop_two_ranges(p, 40, kSelfThread, "PIDFD_SELF_THREAD"));
  /* The pages outside the dropped ranges kept their bytes. */
  check_pages_hold(p, 0, 8, 3);
  check_pages_hold(p, 56, kPages, 3);

  /* Unmerged and merged again through the same call. */
  const int self = named ? kSelfThreadGroup : pidfd;
  struct iovec all = {p + 56 * PAGE, (kPages - 56) * PAGE};
  CHECK(process_madvise(self, &all, 1, MADV_UNMERGEABLE, 0) ==
        (ssize_t)all.iov_len);
  struct iovec head = {p, 56 * PAGE};
  CHECK(process_madvise(pidfd, &head, 1, MADV_UNMERGEABLE, 0) ==
        (ssize_t)head.iov_len);
  /* The counter settles at ksmd's next pass natively. */
  const double until = now_seconds() + 30;
  while (merging_pages() != 0 && now_seconds() < until) sleep_ms(20);
  CHECK(merging_pages() == 0);
  check_pages_hold(p, 56, kPages, 3);
  CHECK(process_madvise(self, &all, 1, MADV_MERGEABLE, 0) ==
        (ssize_t)all.iov_len);
  CHECK(wait_merging(kPages - 56, 30) >= kPages - 56);
  check_pages_hold(p, 56, kPages, 3);

  /* Flags other than 0: EINVAL, nothing dropped. */
  struct iovec one = {p + 60 * PAGE, PAGE};
  CHECK_ERR(process_madvise(self, &one, 1, MADV_DONTNEED, 1), EINVAL);
  check_pages_hold(p, 56, kPages, 3);
  close(pidfd);
  printf("PASS process_madvise_test\n");
  return 0;
}
