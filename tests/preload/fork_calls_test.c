/* Children forked while the parent's scanner sleeps call KSM at once:
 * madvise, a knob write, a counter read. The scanner sleeps (between
 * batches, or with nothing to scan) on the engine's condition variable,
 * and fork copies that variable with its waiter, a thread the child does
 * not have. Until 2026-12-06 the child's first wake-up of its own scanner
 * could wait for that phantom waiter forever (about one child in five
 * hung, found by preload.chroot_test). Each child must finish within 10
 * s; a child still running then is killed by its pid and the test fails.
 * Same assertions natively and under `samepage run`. */

#define _GNU_SOURCE
#include <signal.h>
#include <sys/wait.h>

#include "ksm_test_util.h"

enum { kChildren = 60, kPages = 64 };

static int child(void) {
  unsigned char* p = map_advised_class(kPages, 3);
  if (write_text(KSM_DIR "sleep_millisecs", "1") != 0) return 2;
  char buf[64];
  if (read_text(KSM_DIR "pages_sharing", buf, sizeof(buf)) <= 0) return 3;
  if (madvise(p, kPages * PAGE, MADV_UNMERGEABLE) != 0) return 4;
  for (size_t i = 0; i < kPages; ++i) {
    if (!holds_class(p, i, 3)) return 5;
  }
  return 0;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("fork_calls_test");
  /* The parent's scanner has something to scan, and sleeps 1 ms at a
   * time between batches: a fork nearly always finds it waiting. */
  unsigned char* mine = map_advised_class(256, 1);
  write_knob("pages_to_scan", "100");
  write_knob("sleep_millisecs", "1");
  write_knob("run", "1");
  int failed = 0;
  for (int i = 0; i < kChildren; ++i) {
    sleep_ms(i % 3); /* forks at different points of the scanner's cycle */
    const pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) _exit(child());
    int status = 0;
    pid_t got = 0;
    for (double end = now_seconds() + 10;
         (got = waitpid(pid, &status, WNOHANG)) == 0 && now_seconds() < end;) {
      sleep_ms(5);
    }
    if (got == 0) {
      fprintf(stderr, "child %d (pid %d) still running after 10 s\n", i,
              (int)pid);
      CHECK(kill(pid, SIGKILL) == 0);
      CHECK(waitpid(pid, &status, 0) == pid);
      ++failed;
      continue;
    }
    CHECK(got == pid);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "child %d: status %#x\n", i, status);
      ++failed;
    }
  }
  for (size_t i = 0; i < 256; ++i) CHECK(holds_class(mine, i, 1));
  CHECK(failed == 0);
  printf("PASS fork_calls_test: %d children\n", kChildren);
  return 0;
}
