/* A child forked without fork() keeps what it inherited. A clone, clone3
 * or fork system call made through syscall(), and glibc's clone(), run no
 * pthread_atfork handler; samepage's are what pins the frames that a
 * forked child maps. Until 2026-12-06 such a child's merged pages read
 * zeros once the parent had written its own copies and the scanner had
 * freed the frames they left. Here the parent merges, forks each way,
 * writes every page (its frames lose all their sharers in the parent) and
 * waits for full scans; each child then checks its pages, writes one and
 * checks again. Same assertions natively. */

#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "ksm_test_util.h"

#ifndef SYS_clone3
#define SYS_clone3 435
#endif

enum { kPages = 64 };

static unsigned char* g_pages;
static int g_go[2]; /* the parent tells the children to look */

static pid_t g_pids[4];

/* At the parent's exit, a failed check's too: any child still there is
 * ended, by its pid. */
static void end_children(void) {
  for (int i = 0; i < 4; ++i) {
    if (g_pids[i] > 0 && waitpid(g_pids[i], NULL, WNOHANG) == 0) {
      kill(g_pids[i], SIGKILL);
      (void)waitpid(g_pids[i], NULL, 0);
    }
  }
}

/* In a child: no malloc, no stdio buffering, only system calls. Should
 * the parent die first, the read sees the pipe's end. */
static int child_checks(void) {
  char c;
  close(g_go[1]);
  if (read(g_go[0], &c, 1) != 1) return 2;
  for (size_t i = 0; i < kPages; ++i) {
    if (!holds_class(g_pages, i, 3)) return 3;
  }
  g_pages[PAGE] = 0x11; /* its own copy now */
  if (g_pages[PAGE] != 0x11 || !holds_class(g_pages, 2, 3)) return 4;
  return 0;
}

static int clone_child(void* arg) {
  (void)arg;
  return child_checks();
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("raw_fork_test");
  g_pages = map_advised_class(kPages, 3);
  unsigned char* other = map_advised_class(kPages, 4); /* merges throughout */
  scan_at_full_speed();
  CHECK(wait_merging(2 * kPages, 30) >= 2 * kPages);
  CHECK(pipe(g_go) == 0);

  const char* names[4] = {"clone system call", "clone3 system call",
                          "fork system call", "glibc clone()"};
  pid_t* pids = g_pids;
  atexit(end_children);
  pids[0] = (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
  if (pids[0] == 0) _exit(child_checks());
  struct {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        stack_size, tls;
  } args = {0, 0, 0, 0, SIGCHLD, 0, 0, 0};
  pids[1] = (pid_t)syscall(SYS_clone3, &args, sizeof(args));
  if (pids[1] == 0) _exit(child_checks());
#ifdef SYS_fork
  pids[2] = (pid_t)syscall(SYS_fork);
  if (pids[2] == 0) _exit(child_checks());
#else
  pids[2] = (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
  if (pids[2] == 0) _exit(child_checks());
#endif
  const size_t stack_len = 256 * 1024;
  unsigned char* stack = mmap(NULL, stack_len, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(stack != MAP_FAILED);
  pids[3] = clone(clone_child, stack + stack_len, SIGCHLD, NULL);
  for (int i = 0; i < 4; ++i) {
    if (pids[i] < 0) {
      printf("%s: failed (errno %d %s)\n", names[i], errno, strerror(errno));
      CHECK(errno == ENOSYS); /* clone3 before Linux 5.3 */
    }
  }

  /* Every page written in the parent, each its own way: its copies leave
   * the frames, for good. */
  for (size_t i = 0; i < kPages; ++i)
    g_pages[i * PAGE] = (unsigned char)(i + 1);
  const double end = now_seconds() + 30;
  while (merging_pages() > kPages && now_seconds() < end) sleep_ms(10);
  CHECK(merging_pages() == kPages);
  wait_full_scans(3);

  CHECK(write(g_go[1], "xxxx", 4) == 4);
  int failed = 0;
  for (int i = 0; i < 4; ++i) {
    if (pids[i] <= 0) continue;
    const int status = wait_child(pids[i], 30);
    pids[i] = 0;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    printf("%s: child exit %d (3: a page lost its contents)\n", names[i], code);
    failed |= code != 0;
  }
  CHECK(!failed);
  check_pages_hold(other, 0, kPages, 4);
  CHECK(g_pages[0] == 1 && g_pages[2 * PAGE] == 3);
  printf("every child kept its pages\n");
  return 0;
}
