/* The kernel KSM ABI end to end, using only what a program built against
 * Linux headers uses: madvise, prctl, /sys/kernel/mm/ksm, /proc/self/ksm_*.
 * Runs natively (kernel KSM) and under `samepage run`, same assertions. */

#define _GNU_SOURCE
#include <sys/prctl.h>

#include "ksm_test_util.h"

enum { kPages = 64, kHalf = kPages / 2 };

static void check_bad_input(void) {
  char before[32], after[32];
  CHECK(read_text(KSM_DIR "run", before, sizeof(before)) > 0);
  /* Knob values the kernel refuses, through write(2): nothing changes. */
  CHECK_ERR(write_text(KSM_DIR "run", "3"), EINVAL);
  CHECK_ERR(write_text(KSM_DIR "run", "-1"), EINVAL);
  CHECK_ERR(write_text(KSM_DIR "pages_to_scan", "abc"), EINVAL);
  CHECK_ERR(write_text(KSM_DIR "sleep_millisecs", "0x10"), EINVAL);
  CHECK_ERR(write_text(KSM_DIR "max_page_sharing", "1"), EINVAL);
  CHECK(read_text(KSM_DIR "run", after, sizeof(after)) > 0);
  CHECK(strcmp(before, after) == 0);
  /* ... and through stdio: the error surfaces at fclose. */
  FILE* f = fopen(KSM_DIR "run", "w");
  CHECK(f != NULL);
  fprintf(f, "3\n");
  CHECK_ERR(fclose(f), EINVAL);
  CHECK(read_text(KSM_DIR "run", after, sizeof(after)) > 0);
  CHECK(strcmp(before, after) == 0);
  /* Counters are read-only, even for root; unknown files do not exist. */
  CHECK_ERR(open(KSM_DIR "pages_sharing", O_WRONLY), EACCES);
  CHECK_ERR(open(KSM_DIR "pages_sharing", O_RDWR), EACCES);
  CHECK(fopen(KSM_DIR "full_scans", "w") == NULL && errno == EACCES);
  CHECK_ERR(open(KSM_DIR "no_such_knob", O_RDONLY), ENOENT);
  CHECK_ERR(open(KSM_DIR "run", O_RDONLY | O_DIRECTORY), ENOTDIR);
  /* Descriptor modes are enforced. */
  int fd = open(KSM_DIR "run", O_RDONLY);
  CHECK(fd >= 0);
  CHECK_ERR(write(fd, "1", 1), EBADF);
  close(fd);
  fd = open(KSM_DIR "run", O_WRONLY);
  CHECK(fd >= 0);
  char c;
  CHECK_ERR(read(fd, &c, 1), EBADF);
  close(fd);
  /* madvise: unaligned EINVAL, unmapped ENOMEM, unknown advice EINVAL. */
  unsigned char* p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  CHECK_ERR(madvise(p + 1, PAGE, MADV_MERGEABLE), EINVAL);
  CHECK(munmap(p + PAGE, PAGE) == 0);
  CHECK_ERR(madvise(p + PAGE, PAGE, MADV_MERGEABLE), ENOMEM);
  CHECK_ERR(madvise(p, PAGE, 12345), EINVAL);
  CHECK(madvise(p, 0, MADV_MERGEABLE) == 0);
  CHECK(munmap(p, PAGE) == 0);
  /* prctl: unused arguments must be zero. */
  CHECK_ERR(prctl(PR_SET_MEMORY_MERGE, 1, 1, 0, 0), EINVAL);
  CHECK_ERR(prctl(PR_GET_MEMORY_MERGE, 1, 0, 0, 0), EINVAL);
  CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("ksm_abi_test");
  check_bad_input();

  unsigned char* p = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < kPages; ++i) fill_class(p, i, i < kHalf ? 1 : 2);
  CHECK(madvise(p, kPages * PAGE, MADV_MERGEABLE) == 0);

  /* Tune through write(2), stdio and pwrite; read back through read, pread
   * and stdio. */
  write_knob("pages_to_scan", "1000\n");
  FILE* f = fopen(KSM_DIR "sleep_millisecs", "w");
  CHECK(f != NULL);
  CHECK(fprintf(f, "10\n") > 0);
  CHECK(fclose(f) == 0);
  CHECK(read_ulong(KSM_DIR "pages_to_scan") == 1000);
  int fd = open(KSM_DIR "sleep_millisecs", O_RDONLY);
  char buf[64];
  CHECK(fd >= 0);
  ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
  CHECK(n == 3 && memcmp(buf, "10\n", 3) == 0);
  close(fd);
  unsigned long v = 0;
  f = fopen(KSM_DIR "pages_to_scan", "r");
  CHECK(f != NULL && fscanf(f, "%lu", &v) == 1 && v == 1000);
  fclose(f);
  write_knob("run", "1");
  CHECK(read_ulong(KSM_DIR "run") == 1);

  /* Merged: this process's pages all map KSM pages. */
  unsigned long merged = wait_merging(kPages, 30);
  printf("merged %lu of %d pages; pages_sharing %lu\n", merged, kPages,
         read_ulong(KSM_DIR "pages_sharing"));
  CHECK(merged == kPages);
  CHECK(read_ulong(KSM_DIR "pages_sharing") >= kPages - 2);
  CHECK(read_ulong(KSM_DIR "pages_shared") >= 2);
  CHECK(ksm_stat_value("ksm_merging_pages") == kPages);
  CHECK(ksm_stat_value("ksm_rmap_items") >= kPages);
  CHECK(ksm_stat_value("ksm_mergeable") == 1);
  CHECK(ksm_stat_value("ksm_merge_any") == 0);
  for (size_t i = 0; i < kPages; ++i) CHECK(holds_class(p, i, i < kHalf ? 1 : 2));

  /* Fresh values at each read from offset 0 of one descriptor. */
  fd = open(KSM_DIR "full_scans", O_RDONLY);
  CHECK(fd >= 0);
  n = read(fd, buf, sizeof(buf) - 1);
  CHECK(n > 0);
  buf[n] = '\0';
  unsigned long scans0 = strtoul(buf, NULL, 10), scans1 = scans0;
  for (double end = now_seconds() + 10; scans1 == scans0 && now_seconds() < end;
       sleep_ms(20)) {
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    n = read(fd, buf, sizeof(buf) - 1);
    CHECK(n > 0);
    buf[n] = '\0';
    scans1 = strtoul(buf, NULL, 10);
  }
  close(fd);
  CHECK(scans1 > scans0);

  /* Copy-on-write: a write changes only the writer's page. */
  p[100] ^= 0xff;
  CHECK(!holds_class(p, 0, 1));
  p[100] ^= 0xff;
  for (size_t i = 0; i < kPages; ++i) CHECK(holds_class(p, i, i < kHalf ? 1 : 2));
  p[PAGE + 7] = 0;
  CHECK(p[PAGE + 7] == 0 && holds_class(p, 2, 1) && holds_class(p, 0, 1));

  /* MADV_DONTNEED on merged pages reads back zeros, as anonymous memory. */
  CHECK(madvise(p + 3 * PAGE, PAGE, MADV_DONTNEED) == 0);
  CHECK(is_zero_page(p + 3 * PAGE));
  CHECK(madvise(p + kHalf * PAGE, 8 * PAGE, MADV_DONTNEED) == 0);
  for (size_t i = kHalf; i < kHalf + 8; ++i) CHECK(is_zero_page(p + i * PAGE));
  CHECK(holds_class(p, 2, 1) && holds_class(p, kHalf + 8, 2));

  /* merge-any on and off (off unmerges and unmarks everything). */
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 1);
  CHECK(ksm_stat_value("ksm_merge_any") == 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(holds_class(p, 4, 1) && holds_class(p, kPages - 1, 2));

  CHECK(madvise(p, kPages * PAGE, MADV_UNMERGEABLE) == 0);
  CHECK(holds_class(p, 4, 1) && is_zero_page(p + 3 * PAGE));
  CHECK(munmap(p, kPages * PAGE) == 0);
  printf("PASS ksm_abi_test\n");
  return 0;
}
