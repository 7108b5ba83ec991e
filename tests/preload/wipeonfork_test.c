/* MADV_WIPEONFORK on merged memory works as on anonymous memory, as it
 * does under kernel KSM: the call succeeds (through madvise, and through
 * process_madvise naming this process), a forked child reads zeros in the
 * range and the bytes of the pages around it, the parent keeps every
 * byte, and so it stays after further full scans; MADV_KEEPONFORK gives
 * the child the bytes again. Under samepage before 2026-12-06 the call
 * failed with EINVAL on merged pages and the child read the bytes.
 * Same assertions natively. */

#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ksm_test_util.h"

enum { kPages = 64, kFrom = 16, kTo = 48 };

/* Forks; the child checks that pages [kFrom, kTo) of p read zeros (or, if
 * !wiped, class cls) and the others class cls. */
static void child_sees(const unsigned char* p, int cls, int wiped) {
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    for (size_t i = 0; i < kPages; ++i) {
      const int zero = wiped && i >= kFrom && i < kTo;
      if (zero ? !is_zero_page(p + i * PAGE) : !holds_class(p, i, cls)) {
        printf("child: page %zu: %s\n", i, zero ? "not zero" : "not its bytes");
        _exit(2);
      }
    }
    _exit(0);
  }
  const int status = wait_child(pid, 30);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  check_pages_hold(p, 0, kPages, cls);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("wipeonfork_test");
  unsigned char* p = map_advised_class(kPages, 3);
  unsigned char* q = map_advised_class(kPages, 3);
  scan_at_full_speed();
  CHECK(wait_merging(2 * kPages, 30) >= 2 * kPages);

  CHECK(madvise(p + kFrom * PAGE, (kTo - kFrom) * PAGE, MADV_WIPEONFORK) == 0);
  child_sees(p, 3, 1);
  const int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
  CHECK(pidfd >= 0);
  struct iovec iov = {q + kFrom * PAGE, (kTo - kFrom) * PAGE};
  CHECK(process_madvise(pidfd, &iov, 1, MADV_WIPEONFORK, 0) ==
        (ssize_t)iov.iov_len);
  close(pidfd);
  child_sees(q, 3, 1);

  /* Scanned on: still wiped in a child. */
  wait_full_scans(2);
  child_sees(p, 3, 1);
  child_sees(q, 3, 1);

  CHECK(madvise(p + kFrom * PAGE, (kTo - kFrom) * PAGE, MADV_KEEPONFORK) == 0);
  child_sees(p, 3, 0);
  printf("PASS wipeonfork_test\n");
  return 0;
}
