/* A program that sandboxes itself with seccomp after merging. samepage
 * makes system calls inside the program (its scanner; the interposers on
 * the program's behalf), which the program's filter now judges: until
 * 2026-12-06 a filter that kills on mremap or userfaultfd (which the
 * program itself no longer needs) killed the program at samepage's next
 * merge. Here, first, a filter that refuses only what samepage never calls
 * (kexec_load): merging goes on. Then one that kills on mremap and
 * userfaultfd, for every thread (TSYNC): the program lives on, its pages
 * intact and writable, more duplicates made, one merged buffer unmapped.
 * Natively ksmd is not filtered and nothing changes. Same assertions
 * natively.
 *
 * Under samepage the second filter makes samepage step aside, and the KSM
 * files are then the kernel's: the knobs are restored before it, and the
 * exit handler's run=2, run=0 reach the kernel's (this test holds the
 * kernel_ksm lock in both runs). */

#define _GNU_SOURCE
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include "ksm_test_util.h"

enum { kPages = 64 };

/* Kills the process on system call nr1 or nr2; allows everything else. */
static void install_filter(long nr1, long nr2, int all_threads) {
  struct sock_filter f[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr1, 2, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr2, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
  };
  struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
  CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
  if (all_threads) {
    CHECK(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                  SECCOMP_FILTER_FLAG_TSYNC, &prog) == 0);
  } else {
    CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0);
  }
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("seccomp_test");
  unsigned char* a = map_advised_class(kPages, 3);
  unsigned char* b = map_advised_class(kPages, 4);
  unsigned char* c = map_class(kPages, 5);
  for (size_t i = 0; i < kPages; ++i) fill_class(c, i, 20 + (int)i);
  CHECK(madvise(c, kPages * PAGE, MADV_MERGEABLE) == 0);
  scan_at_full_speed();
  CHECK(wait_merging(2 * kPages, 30) >= 2 * kPages);

  /* A filter about calls samepage never makes: merging goes on (c's
   * pages, all different so far, become duplicates). */
  /* libseccomp's probe for the call (strict mode, flags the kernel
   * refuses) installs nothing, and changes nothing. */
  CHECK_ERR(syscall(SYS_seccomp, SECCOMP_SET_MODE_STRICT, 1, NULL), EINVAL);
  install_filter(SYS_kexec_load, SYS_kexec_load, 0);
  for (size_t i = 0; i < kPages; ++i) fill_class(c, i, 6);
  CHECK(wait_merging(3 * kPages, 30) >= 3 * kPages);
  printf("a filter samepage passes: merging goes on\n");

  /* The knobs back as they were, while they are still ours to write. */
  for (size_t i = 0; i < sizeof(g_saved) / sizeof(g_saved[0]); ++i) {
    write_knob(g_saved[i].name, g_saved[i].value);
    g_saved[i].saved = 0;
  }

  /* A filter that kills on calls samepage makes, in every thread. */
  install_filter(SYS_mremap, SYS_userfaultfd, 1);
  for (size_t i = 0; i < kPages; i += 2) fill_class(b, i, 3);
  sleep_ms(500);
  check_pages_hold(a, 0, kPages, 3);
  check_pages_hold(c, 0, kPages, 6);
  for (size_t i = 0; i < kPages; ++i) {
    CHECK(holds_class(b, i, i % 2 == 0 ? 3 : 4));
    a[i * PAGE] = 1;
    c[i * PAGE + 1] = 2;
  }
  for (size_t i = 0; i < kPages; ++i) {
    CHECK(a[i * PAGE] == 1 && c[i * PAGE + 1] == 2);
  }
  CHECK(munmap(b, kPages * PAGE) == 0);
  CHECK(c[1] == 2 && c[PAGE - 1] == 0x5a);
  printf("a filter that kills on samepage's calls: the program lives on\n");
  return 0;
}
