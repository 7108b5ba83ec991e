/* A program's own userfaultfd over its memory, merged or not. Natively a
 * VMA takes one userfaultfd, and registering memory, merged or not, works.
 * Under samepage the engines register the memory they may merge with
 * theirs (for write-protection): until 2026-12-06 the program's
 * UFFDIO_REGISTER failed with EBUSY over any private anonymous memory of a
 * process that had advised some (QEMU's postcopy and background snapshot,
 * CRIU's lazy pages, garbage collectors...). Here a handler thread
 * serves the program's faults: a page dropped from merged memory
 * registered for missing pages reads what the handler copies in; a page
 * write-protected through the program's descriptor blocks its writer
 * until the handler lets it go; memory never advised registers too; and
 * once unregistered the memory merges again. Same assertions natively. */

#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "ksm_test_util.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

enum { kPages = 32 };

static int g_uffd;
static unsigned char g_fill[PAGE] __attribute__((aligned(PAGE)));
static volatile int g_stop;
static volatile int g_missing, g_wp;

/* Serves the program's faults: missing pages get g_fill, write-protected
 * ones are let go. */
static void* handler(void* arg) {
  (void)arg;
  while (!g_stop) {
    struct pollfd pfd = {g_uffd, POLLIN, 0};
    if (poll(&pfd, 1, 50) <= 0) continue;
    struct uffd_msg msg;
    if (read(g_uffd, &msg, sizeof(msg)) != sizeof(msg)) continue;
    if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
    const unsigned long page = msg.arg.pagefault.address & ~(PAGE - 1UL);
    if (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
      struct uffdio_writeprotect wp = {{page, PAGE}, 0};
      ++g_wp; /* before the faulting thread goes on */
      CHECK(ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp) == 0);
    } else {
      struct uffdio_copy copy = {page, (unsigned long)g_fill, PAGE, 0, 0};
      ++g_missing;
      CHECK(ioctl(g_uffd, UFFDIO_COPY, &copy) == 0);
    }
  }
  return NULL;
}

static void reg(void* p, size_t len, unsigned long long mode) {
  struct uffdio_register r = {{(unsigned long)p, len}, mode, 0};
  CHECK(ioctl(g_uffd, UFFDIO_REGISTER, &r) == 0);
}

static void unreg(void* p, size_t len) {
  struct uffdio_range r = {(unsigned long)p, len};
  CHECK(ioctl(g_uffd, UFFDIO_UNREGISTER, &r) == 0);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("userfaultfd_test");
  g_uffd = (int)syscall(SYS_userfaultfd,
                        O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  if (g_uffd < 0) {
    printf("SKIP userfaultfd_test: no userfaultfd here (%s)\n",
           strerror(errno));
    return SKIP_CODE;
  }
  struct uffdio_api api = {UFFD_API, UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0};
  CHECK(ioctl(g_uffd, UFFDIO_API, &api) == 0);
  memset(g_fill, 0x77, PAGE);

  unsigned char* m = map_advised_class(kPages, 3);
  unsigned char* w = map_advised_class(kPages, 4);
  unsigned char* plain = map_class(kPages, 5); /* never advised */
  scan_at_full_speed();
  CHECK(wait_merging(2 * kPages, 30) >= 2 * kPages);
  pthread_t t;
  CHECK(pthread_create(&t, NULL, handler, NULL) == 0);

  /* Missing pages over merged memory: a page dropped reads the handler's. */
  reg(m, kPages * PAGE, UFFDIO_REGISTER_MODE_MISSING);
  check_pages_hold(m, 0, kPages, 3);
  CHECK(madvise(m + 5 * PAGE, PAGE, MADV_DONTNEED) == 0);
  CHECK(m[5 * PAGE + 100] == 0x77 && g_missing == 1);
  check_pages_hold(m, 0, 5, 3);
  check_pages_hold(m, 6, kPages, 3);
  printf("missing pages over merged memory: served by the program\n");

  /* Write-protection over merged memory, through the program's own. */
  reg(w, kPages * PAGE, UFFDIO_REGISTER_MODE_WP);
  struct uffdio_writeprotect wp = {{(unsigned long)w, kPages * PAGE},
                                   UFFDIO_WRITEPROTECT_MODE_WP};
  CHECK(ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp) == 0);
  w[7 * PAGE] = 0x42; /* blocks until the handler lets it go */
  CHECK(w[7 * PAGE] == 0x42 && g_wp == 1);
  check_pages_hold(w, 8, kPages, 4);
  printf("write-protection over merged memory: served by the program\n");

  /* Memory never advised. */
  reg(plain, kPages * PAGE, UFFDIO_REGISTER_MODE_MISSING);
  check_pages_hold(plain, 0, kPages, 5);
  printf("memory never advised: registered\n");

  /* Unregistered, both buffers merge again (natively they never
   * stopped). */
  unreg(m, kPages * PAGE);
  unreg(w, kPages * PAGE);
  unreg(plain, kPages * PAGE);
  CHECK(wait_merging(2 * (kPages - 1), 30) >= 2 * (kPages - 1));
  check_pages_hold(m, 0, 5, 3);
  printf("unregistered: merged again\n");

  g_stop = 1;
  CHECK(pthread_join(t, NULL) == 0);
  return 0;
}
