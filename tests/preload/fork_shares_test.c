/* A forked child shares the merged memory it inherited, as a kernel KSM
 * process's child shares its KSM pages: its scanner does not merge those
 * pages again into memory of its own. The parent merges 2,048 pairs and
 * forks; the child lets its scanner run three full scans, then checks
 * that the memory behind samepage's frames (its memfds, none natively)
 * has not grown past the parent's, and that every page holds its bytes.
 * Until 2026-12-06 the child copied every merged page into a new frame:
 * 20,000 merged pairs took 80 MB of frames in the parent and 80 MB more in
 * a child that only slept. Same assertions natively and under `samepage
 * run`. */

#define _GNU_SOURCE
#include "ksm_test_util.h"

enum { kPairs = 2048 };

static void add_kib(int fd, void* arg) {
  struct stat st;
  if (fstat(fd, &st) == 0) *(long*)arg += (long)st.st_blocks / 2;
}

/* KiB allocated in samepage's frame memfds open in this process. */
static long frame_memfd_kib(void) {
  long kib = 0;
  (void)for_each_samepage_memfd(add_kib, &kib);
  return kib;
}

static int holds_pair_content(const unsigned char* p, size_t i) {
  size_t v;
  memcpy(&v, p + i * PAGE, sizeof(v));
  return v == i % kPairs && p[i * PAGE + 100] == 0x5a;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("fork_shares_test");
  unsigned char* p = map_class(2 * kPairs, 1);
  for (size_t i = 0; i < 2 * kPairs; ++i) {
    const size_t v = i % kPairs; /* page i and page i + kPairs alike */
    memcpy(p + i * PAGE, &v, sizeof(v));
  }
  CHECK(madvise(p, 2 * kPairs * PAGE, MADV_MERGEABLE) == 0);
  scan_at_full_speed();
  CHECK(wait_merging(2 * kPairs, 30) >= 2 * kPairs);
  const long parent_kib = frame_memfd_kib();
  printf("parent: %lu pages merged, %ld KiB of frames\n", merging_pages(),
         parent_kib);

  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    const unsigned long scans = read_ulong(KSM_DIR "full_scans");
    for (double end = now_seconds() + 20;
         read_ulong(KSM_DIR "full_scans") < scans + 3 && now_seconds() < end;
         sleep_ms(10)) {
    }
    if (read_ulong(KSM_DIR "full_scans") < scans + 3) _exit(2);
    const long child_kib = frame_memfd_kib();
    printf("child: %ld KiB of frames after 3 full scans\n", child_kib);
    if (child_kib > parent_kib + 1024) _exit(3);
    for (size_t i = 0; i < 2 * kPairs; ++i) {
      if (!holds_pair_content(p, i)) _exit(4);
    }
    _exit(0);
  }
  const int status = wait_child(pid, 60);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    printf("child status %d\n", status);
  }
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  for (size_t i = 0; i < 2 * kPairs; ++i) CHECK(holds_pair_content(p, i));
  CHECK(munmap(p, 2 * kPairs * PAGE) == 0);
  printf("PASS fork_shares_test\n");
  return 0;
}
