/* O_DIRECT reads into memory that KSM keeps merging: the device writes into
 * the pinned buffer pages, so a page merged (or dropped to the zero page)
 * while the read is in flight would keep its old bytes and the data read
 * would be lost. Kernel KSM never merges a pinned page; under samepage the
 * preload holds merges off the buffer of a direct read while it runs.
 * Kernel ABI only: runs natively and under `samepage run`.
 *
 * A file of 256 distinct pages is read with O_DIRECT, one page at a time,
 * into 256 buffer pages that are reset to the same content just before (so
 * each is a merge candidate when the read starts), for 2 s with pread into
 * pages of 'z' (64 more pages of 'z' stay merged, so a reset page has a
 * merged content to join), 2 s with pread into zero pages (use_zero_pages=1:
 * the drop path) and 1 s with preadv into two half-page vectors of 'z'. Every
 * read must leave exactly the file's bytes. A read that fails with EFAULT (a
 * direct read meeting a merge window under mprotect protection, or
 * userfaultfd for user faults only, docs/limitations.md item 4) is retried.
 * With `sandboxed`, process_vm_readv is forbidden first (seccomp), as in
 * containers: samepage must still see the vectors of a preadv.
 * Exit 77 where KSM cannot be controlled or the filesystem has no O_DIRECT. */

#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include "direct_file.h"
#include "ksm_test_util.h"

#define N 256
/* Pages of 'z' never read into, after the buffer: a merged content each
 * reset page can join at once. */
#define RESERVE 64

static int g_fd = -1;

/* This process's pages dropped to the zero page (use_zero_pages=1). */
static unsigned long zero_pages(void) {
  char text[1024];
  CHECK(read_text("/proc/self/ksm_stat", text, sizeof(text)) > 0);
  const char* p = strstr(text, "ksm_zero_pages ");
  return p != NULL ? strtoul(p + strlen("ksm_zero_pages "), NULL, 10) : 0;
}

struct phase_result {
  unsigned long reads, lost, efault, merged_seen;
};

/* mode 0: pread into 'z'; 1: pread into zeros; 2: preadv, two vectors. */
static struct phase_result run_phase(uint8_t* buf, int mode, double seconds) {
  struct phase_result r = {0, 0, 0, 0};
  const uint8_t fill = mode == 1 ? 0 : 'z';
  const double end = now_seconds() + seconds;
  for (unsigned i = 0; reads_go_on(end, r.merged_seen); ++i) {
    uint8_t* p = buf + (size_t)(i % N) * PAGE;
    const unsigned key = (i * 7 + (unsigned)mode) % N;
    memset(p, fill, PAGE);
    /* A scan may reach it. Zero pages get longer: kernel KSM drops one only
     * at its second visit (the checksum must hold still), which under load
     * did not come within 200 us in a whole phase. */
    struct timespec ts = {0, (mode == 1 ? 1000 : 200) * 1000};
    nanosleep(&ts, NULL);
    if (i % 16 == 0 &&
        (mode == 1 ? zero_pages() > 0 : merging_pages() > RESERVE)) {
      ++r.merged_seen; /* some buffer page is merged now */
    }
    ssize_t got = -1;
    /* A window lasts microseconds, unless the scanner is preempted in it
     * (2 cores, tests in parallel): retried for up to 10 s. */
    const double give_up = now_seconds() + 10;
    for (;;) {
      if (mode == 2) {
        struct iovec iov[2] = {{p, PAGE / 2}, {p + PAGE / 2, PAGE / 2}};
        got = preadv(g_fd, iov, 2, (off_t)key * PAGE);
      } else {
        got = pread(g_fd, p, PAGE, (off_t)key * PAGE);
      }
      if (got >= 0 || errno != EFAULT || now_seconds() > give_up) break;
      ++r.efault;
      struct timespec pause = {0, 50 * 1000};
      nanosleep(&pause, NULL);
    }
    CHECK(got == PAGE);
    ++r.reads;
    if (!file_page_ok(p, key)) {
      if (r.lost++ < 5) {
        fprintf(stderr, "mode %d read %lu: page %u holds %#x..., want key %u\n",
                mode, r.reads, i % N, p[0], key);
      }
    }
  }
  return r;
}

/* A sandbox that forbids process_vm_readv (seccomp, as container runtimes'
 * default profiles do without CAP_SYS_PTRACE): EPERM. */
static void forbid_process_vm_readv(void) {
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_process_vm_readv, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof(filter) / sizeof(filter[0]), filter};
  CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
  CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0);
  struct iovec local = {&prog, 1}, remote = {&prog, 1};
  CHECK(process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == -1 &&
        errno == EPERM);
}

int main(int argc, char** argv) {
  if (argc > 2 || (argc == 2 && strcmp(argv[1], "sandboxed") != 0)) {
    fprintf(stderr, "usage: %s [sandboxed]\n", argv[0]);
    return 2;
  }
  if (argc == 2) forbid_process_vm_readv();
  ksm_setup_or_skip("direct_io_test");
  g_fd = direct_file_open("direct_io_test", N, 1);
  if (g_fd < 0) {
    printf("SKIP direct_io_test: no filesystem here takes O_DIRECT reads\n");
    return SKIP_CODE;
  }
  uint8_t* buf = merging_buffer(N + RESERVE, N / 2);

  const char* names[] = {"pread into merged content", "pread into zero pages",
                         "preadv, two vectors"};
  const double seconds[] = {2.0, 2.0, 1.0};
  int failed = 0;
  for (int mode = 0; mode < 3; ++mode) {
    if (mode == 1) {
      write_knob("use_zero_pages", "1");
      memset(buf, 0, N * PAGE);
    }
    if (mode == 2) {
      write_knob("use_zero_pages", "0");
      memset(buf, 'z', N * PAGE);
    }
    const struct phase_result r = run_phase(buf, mode, seconds[mode]);
    printf(
        "%s: %lu reads, %lu lost, %lu EFAULT retried, buffer pages "
        "found merged in %lu of %lu samples\n",
        names[mode], r.reads, r.lost, r.efault, r.merged_seen,
        (r.reads + 15) / 16);
    CHECK(r.reads > 100);
    if (r.lost != 0) failed = 1;
    if (r.merged_seen == 0) {
      fprintf(stderr,
              "%s: nothing was merged meanwhile: the test proves "
              "nothing\n",
              names[mode]);
      failed = 1;
    }
  }
  if (!failed) printf("OK\n");
  return failed;
}
