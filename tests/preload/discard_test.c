/* Discards of merged memory behave as on anonymous memory, as kernel KSM's
 * do: MADV_DONTNEED reads back zeros while the pages around keep their
 * bytes, and a dropped page is writable and its own; an unaligned address
 * fails with EINVAL and changes nothing; MADV_DONTNEED on locked memory
 * fails with EINVAL and keeps every byte, MADV_DONTNEED_LOCKED drops it;
 * MADV_FREE leaves each page as it was or zero; pages under guard markers
 * read back zeros once the markers are removed. Then a forked child drops
 * the merged memory it inherited a page at a time, as a Redis save
 * dismisses each value it has written, and reads zeros there while the
 * parent keeps its bytes. Same assertions natively. */

#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "ksm_test_util.h"

#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#define MADV_GUARD_REMOVE 103
#endif

enum { kPages = 64, kChildPages = 2048 };

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("discard_test");
  unsigned char* p = map_advised_class(kPages, 3);
  scan_at_full_speed();
  CHECK(wait_merging(kPages, 30) >= kPages);

  /* An unaligned address: EINVAL, nothing dropped. */
  errno = 0;
  CHECK(madvise(p + 5 * PAGE + 1, PAGE, MADV_DONTNEED) == -1 &&
        errno == EINVAL);
  check_pages_hold(p, 0, kPages, 3);

  /* Zeros where dropped, the rest as it was; a dropped page is its own. */
  CHECK(madvise(p + 8 * PAGE, 4 * PAGE, MADV_DONTNEED) == 0);
  for (size_t i = 8; i < 12; ++i) CHECK(is_zero_page(p + i * PAGE));
  check_pages_hold(p, 0, 8, 3);
  check_pages_hold(p, 12, kPages, 3);
  p[9 * PAGE + 7] = 42;
  CHECK(p[9 * PAGE + 7] == 42 && p[10 * PAGE + 7] == 0);
  check_pages_hold(p, 12, kPages, 3);

  /* Locked: MADV_DONTNEED refuses it, MADV_DONTNEED_LOCKED drops it. */
  if (mlock(p + 16 * PAGE, 4 * PAGE) == 0) {
    errno = 0;
    CHECK(madvise(p + 16 * PAGE, 4 * PAGE, MADV_DONTNEED) == -1 &&
          errno == EINVAL);
    check_pages_hold(p, 16, 20, 3);
    const int r = madvise(p + 16 * PAGE, 4 * PAGE, MADV_DONTNEED_LOCKED);
    if (r == 0) {
      for (size_t i = 16; i < 20; ++i) CHECK(is_zero_page(p + i * PAGE));
    } else {
      CHECK(errno == EINVAL); /* before Linux 5.18 */
      check_pages_hold(p, 16, 20, 3);
    }
    CHECK(munlock(p + 16 * PAGE, 4 * PAGE) == 0);
  } else {
    printf("mlock: %s (locked cases not run)\n", strerror(errno));
  }

  /* MADV_FREE: each page as it was, or zero. */
  CHECK(madvise(p + 24 * PAGE, 8 * PAGE, MADV_FREE) == 0);
  for (size_t i = 24; i < 32; ++i) {
    CHECK(holds_class(p, i, 3) || is_zero_page(p + i * PAGE));
  }
  check_pages_hold(p, 32, kPages, 3);

  /* Guard markers (Linux 6.13) drop the pages under them: once removed,
   * the pages read back zeros, the pages around theirs kept. */
  if (madvise(p + 40 * PAGE, 4 * PAGE, MADV_GUARD_INSTALL) == 0) {
    CHECK(madvise(p + 40 * PAGE, 4 * PAGE, MADV_GUARD_REMOVE) == 0);
    for (size_t i = 40; i < 44; ++i) CHECK(is_zero_page(p + i * PAGE));
    p[41 * PAGE + 3] = 9;
    CHECK(p[41 * PAGE + 3] == 9 && p[42 * PAGE + 3] == 0);
  } else {
    /* A kernel before 6.13: refused, every byte kept. */
    printf("MADV_GUARD_INSTALL: %s (guard case not run)\n", strerror(errno));
    CHECK(errno == EINVAL);
    check_pages_hold(p, 40, 44, 3);
  }
  check_pages_hold(p, 32, 40, 3);
  check_pages_hold(p, 44, kPages, 3);

  /* A forked child drops what it inherited merged, a page at a time. */
  unsigned char* q = map_advised_class(kChildPages, 5);
  CHECK(wait_merging(kPages + kChildPages - 40, 30) >=
        kPages + kChildPages - 40);
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    const double start = now_seconds();
    for (size_t i = 0; i < kChildPages; ++i) {
      if (!holds_class(q, i, 5)) _exit(2);
      if (madvise(q + i * PAGE, PAGE, MADV_DONTNEED) != 0) _exit(3);
      if (!is_zero_page(q + i * PAGE)) _exit(4);
    }
    printf("child: %d drops in %.3f s\n", kChildPages, now_seconds() - start);
    _exit(0);
  }
  const int status = wait_child(pid, 60);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  check_pages_hold(q, 0, kChildPages, 5);

  CHECK(munmap(q, kChildPages * PAGE) == 0);
  CHECK(munmap(p, kPages * PAGE) == 0);
  printf("PASS discard_test\n");
  return 0;
}
