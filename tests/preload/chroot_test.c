/* A process that chroots into a directory without /proc (as sshd's
 * privilege separation, vsftpd or QEMU's -run-with chroot= do) goes on
 * merging, as under kernel KSM: memory advised before the chroot and
 * filled after it, and memory advised after it. A KSM directory opened
 * before the chroot still reads this process's counters. The child does
 * all of it; the parent, outside the chroot, watches the child's Pss.
 * Until 2026-12-06 samepage opened /proc/self/... by path at each read:
 * after the chroot its scanner no longer merged and madvise failed with
 * ENOENT in a forked child. Root only (chroot); skipped elsewhere. Same
 * assertions natively and under `samepage run`. */

#define _GNU_SOURCE
#include <signal.h>
#include <sys/wait.h>

#include "ksm_test_util.h"

enum { kPages = 4096 }; /* 16 MiB a region */
/* Both regions merged: one page in 256 (max_page_sharing) is a shared
 * page, the rest sharing. The child reports once seven eighths are: the
 * Pss check below then has an eighth of the memory to spare (at three
 * quarters, its bound, the unmerged quarter and the process's own pages
 * came to 8,199 kB against 8,192 in a run of kernel KSM). */
enum { kWant = 2 * kPages * 7 / 8 };

/* pages_sharing read through a directory descriptor; -1 on error. */
static long sharing_at(int dirfd) {
  char buf[64];
  const int fd = openat(dirfd, "pages_sharing", O_RDONLY);
  if (fd < 0) return -1;
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return -1;
  buf[n] = '\0';
  return strtol(buf, NULL, 10);
}

static void child(const char* root, int report) {
  const int dirfd = open(KSM_DIR, O_RDONLY | O_DIRECTORY);
  if (dirfd < 0) _exit(10);
  unsigned char* r = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (r == MAP_FAILED || madvise(r, kPages * PAGE, MADV_MERGEABLE) != 0)
    _exit(11);
  if (chroot(root) != 0 || chdir("/") != 0) _exit(12);
  if (access("/proc/self/maps", F_OK) == 0) _exit(13); /* not left behind */
  for (size_t i = 0; i < kPages; ++i) fill_class(r, i, 1);
  unsigned char* s = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s == MAP_FAILED) _exit(14);
  for (size_t i = 0; i < kPages; ++i) fill_class(s, i, 2);
  if (madvise(s, kPages * PAGE, MADV_MERGEABLE) != 0) _exit(15);
  long sharing = sharing_at(dirfd);
  for (double end = now_seconds() + 20;
       sharing < kWant && now_seconds() < end;) {
    sleep_ms(20);
    sharing = sharing_at(dirfd);
  }
  (void)!write(report, &sharing, sizeof(sharing));
  for (;;) {
    for (size_t i = 0; i < kPages; ++i) {
      if (!holds_class(r, i, 1) || !holds_class(s, i, 2)) _exit(16);
    }
    sleep_ms(50);
  }
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("chroot_test");
  char root[] = "/tmp/samepage-chroot-XXXXXX";
  CHECK(mkdtemp(root) != NULL);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "1");
  write_knob("run", "1");
  int report[2];
  CHECK(pipe(report) == 0);
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) child(root, report[1]);
  close(report[1]);
  long sharing = -1;
  const ssize_t got = read(report[0], &sharing, sizeof(sharing));
  int status = 0;
  if (got != (ssize_t)sizeof(sharing)) {
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(rmdir(root) == 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 12) {
      printf("SKIP chroot_test: chroot not permitted here\n");
      exit(SKIP_CODE);
    }
    fprintf(stderr, "child ended early: status %#x\n", status);
    return 1;
  }
  const long pss = pss_kb(pid);
  printf("in the chroot: pages_sharing %ld, child Pss %ld kB of %d kB\n",
         sharing, pss, 2 * kPages * 4);
  sleep_ms(200); /* its contents checked at least once more */
  CHECK(waitpid(pid, &status, WNOHANG) == 0);
  CHECK(kill(pid, SIGKILL) == 0);
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(rmdir(root) == 0);
  CHECK(sharing >= kWant);
  CHECK(pss >= 0 && pss <= 2 * kPages * 4 / 4);
  printf("PASS chroot_test\n");
  return 0;
}
