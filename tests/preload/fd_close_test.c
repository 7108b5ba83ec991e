/* A program that closes descriptors it never opened (a daemon closing
 * every number, close_range, closefrom) and then opens files: under kernel
 * KSM nothing of the merger lives in the descriptor table; under `samepage
 * run` the files must not be written by samepage (until 2026-12-03 its
 * frames were written into the program's file that took the memfd's
 * number, and merged memory then mapped that file), merged memory keeps
 * its contents and merging goes on. A dup2 onto samepage's memfd is
 * refused (EBUSY). Kernel ABI only: runs natively and under `samepage
 * run`. */

#define _GNU_SOURCE
#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "ksm_test_util.h"

#define N 256

static unsigned char* region(int cls) { return map_advised_class(N, cls); }

static void check_holds(const unsigned char* p, int cls) {
  for (size_t i = 0; i < N; ++i) CHECK(holds_class(p, i, cls));
}

/* A new file holding "hello", unlinked: the program's own data. */
static int victim(void) {
  char path[] = "/tmp/samepage-fd-close-XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  CHECK(unlink(path) == 0);
  CHECK(write(fd, "hello", 5) == 5);
  return fd;
}

static void check_victim(int fd) {
  struct stat st;
  char buf[8] = {0};
  CHECK(fstat(fd, &st) == 0);
  printf("file at fd %d: %lld bytes\n", fd, (long long)st.st_size);
  CHECK(st.st_size == 5);
  CHECK(pread(fd, buf, sizeof(buf), 0) == 5 && memcmp(buf, "hello", 5) == 0);
}

static void keep_fd(int fd, void* arg) { *(int*)arg = fd; }

/* A descriptor naming samepage's memfd, or -1 (natively: none). */
static int samepage_memfd(void) {
  int found = -1;
  (void)for_each_samepage_memfd(keep_fd, &found);
  return found;
}

int main(void) {
  ksm_setup_or_skip("fd_close_test");
  write_knob("pages_to_scan", "10000");
  write_knob("sleep_millisecs", "0");
  unsigned char* a = region(1);
  write_knob("run", "1");
  CHECK(wait_merging(N - 1, 10) >= N - 1);

  /* Every number a daemon would close, one by one. */
  long max = sysconf(_SC_OPEN_MAX);
  if (max < 0 || max > 65536) max = 65536;
  for (int fd = 3; fd < max; ++fd) close(fd);
  const int v1 = victim();
  const int memfd = samepage_memfd();
  if (memfd >= 0) {
    printf("samepage's memfd: fd %d, still open\n", memfd);
    errno = 0;
    CHECK(dup2(v1, memfd) == -1 && errno == EBUSY);
    CHECK(samepage_memfd() == memfd);
  }
  unsigned char* b = region(2);
  CHECK(wait_merging(2 * (N - 1), 10) >= 2 * (N - 1));
  check_victim(v1);

  /* close_range over everything, then closefrom. */
  CHECK(close_range(3, ~0U, 0) == 0);
  const int v2 = victim();
  unsigned char* c = region(3);
  CHECK(wait_merging(3 * (N - 1), 10) >= 3 * (N - 1));
  check_victim(v2);
  closefrom(3);
  const int v3 = victim();
  unsigned char* d = region(4);
  CHECK(wait_merging(4 * (N - 1), 10) >= 4 * (N - 1));
  check_victim(v3);

  check_holds(a, 1);
  check_holds(b, 2);
  check_holds(c, 3);
  check_holds(d, 4);
  a[7 * PAGE] ^= 1; /* copy-on-write as ever */
  CHECK(!holds_class(a, 7, 1) && holds_class(a, 8, 1));
  printf("fd_close_test: ok\n");
  return 0;
}
