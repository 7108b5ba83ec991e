/* Memory protection keys on merged memory work as on anonymous memory, as
 * they do under kernel KSM: pkey_mprotect gives a merged range a key, a key
 * whose rights disable writes makes a write fault (SIGSEGV, SEGV_PKUERR)
 * while reads see every byte, and so it stays after MADV_UNMERGEABLE and
 * after two more full scans; with the rights back, a write lands in its
 * own page. Until 2026-12-06 samepage gave merged pages back as new
 * mappings without the key, and the write landed. Skipped where the CPU or
 * the kernel has no protection keys. Same assertions natively. */

#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#include "ksm_test_util.h"

#ifndef SEGV_PKUERR
#define SEGV_PKUERR 4
#endif

enum { kPages = 64 };

static sigjmp_buf g_jump;
static volatile sig_atomic_t g_code;

static void on_segv(int sig, siginfo_t* info, void* ctx) {
  (void)sig;
  (void)ctx;
  g_code = info->si_code;
  siglongjmp(g_jump, 1);
}

/* Writes v at *p: 0 if it landed, else the SIGSEGV's si_code. */
static int write_faults(volatile unsigned char* p, unsigned char v) {
  g_code = 0;
  if (sigsetjmp(g_jump, 1) == 0) {
    *p = v;
    return 0;
  }
  return g_code;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  const int key = pkey_alloc(0, 0);
  if (key < 0) {
    printf("SKIP pkey_test: pkey_alloc: %s: no protection keys here\n",
           strerror(errno));
    return SKIP_CODE;
  }
  ksm_setup_or_skip("pkey_test");
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  CHECK(sigaction(SIGSEGV, &sa, NULL) == 0);

  unsigned char* p = map_advised_class(kPages, 3);
  /* Merged on throughout: samepage scans on while some advised memory is
   * not excluded from merging (memory with a key of its own is). */
  unsigned char* q = map_advised_class(kPages, 4);
  scan_at_full_speed();
  CHECK(wait_merging(2 * kPages, 30) >= 2 * kPages);

  CHECK(pkey_mprotect(p, kPages * PAGE, PROT_READ | PROT_WRITE, key) == 0);
  CHECK(pkey_set(key, PKEY_DISABLE_WRITE) == 0);
  CHECK(write_faults(p + 10 * PAGE, 1) == SEGV_PKUERR);
  check_pages_hold(p, 0, kPages, 3);

  CHECK(madvise(p, kPages * PAGE, MADV_UNMERGEABLE) == 0);
  CHECK(write_faults(p + 11 * PAGE, 1) == SEGV_PKUERR);
  CHECK(madvise(p, kPages * PAGE, MADV_MERGEABLE) == 0);
  wait_full_scans(2);
  CHECK(write_faults(p + 12 * PAGE, 1) == SEGV_PKUERR);
  check_pages_hold(p, 0, kPages, 3);

  CHECK(pkey_set(key, 0) == 0);
  CHECK(write_faults(p + 12 * PAGE, 9) == 0);
  CHECK(p[12 * PAGE] == 9 && holds_class(p, 13, 3));
  CHECK(pkey_mprotect(p, kPages * PAGE, PROT_READ | PROT_WRITE, 0) == 0);
  check_pages_hold(q, 0, kPages, 4);
  CHECK(pkey_free(key) == 0);
  printf("PASS pkey_test\n");
  return 0;
}
