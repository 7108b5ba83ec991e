/* Linux native AIO (libaio) O_DIRECT reads into memory that KSM keeps
 * merging: the buffer is pinned from io_submit until the read completes,
 * so a page merged meanwhile would keep its old bytes. Kernel KSM never
 * merges a pinned page; under samepage the preload holds merges off each
 * submitted read's buffer until io_getevents reaps it. Kernel ABI and
 * libaio only (loaded with dlopen: no development package needed; the
 * calls are looked up in the global scope, where the preload's come
 * first): runs natively and under `samepage run`.
 *
 * A file of 256 distinct pages; 256 buffer pages reset to 'z' (64 more
 * pages of 'z' stay merged, so a reset page has a merged content to join)
 * just before each read; 4 reads in flight at a time (IOCB_CMD_PREAD, then
 * IOCB_CMD_PREADV with two half-page vectors), for 3 s. Every read must
 * leave exactly the file's bytes. Exit 77 without libaio.so.1, where KSM
 * cannot be controlled, or where the filesystem has no O_DIRECT. */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <sys/uio.h>

#include "direct_file.h"
#include "ksm_test_util.h"

#define N 256
#define RESERVE 64
#define IN_FLIGHT 4

typedef int (*io_setup_fn)(int, aio_context_t*);
typedef int (*io_destroy_fn)(aio_context_t);
typedef int (*io_submit_fn)(aio_context_t, long, struct iocb**);
typedef int (*io_getevents_fn)(aio_context_t, long, long, struct io_event*,
                               struct timespec*);

int main(void) {
  if (dlopen("libaio.so.1", RTLD_NOW | RTLD_GLOBAL) == NULL) {
    printf("SKIP aio_test: no libaio.so.1 (Debian: libaio1): %s\n", dlerror());
    return SKIP_CODE;
  }
  io_setup_fn io_setup = (io_setup_fn)dlsym(RTLD_DEFAULT, "io_setup");
  io_destroy_fn io_destroy = (io_destroy_fn)dlsym(RTLD_DEFAULT, "io_destroy");
  io_submit_fn io_submit = (io_submit_fn)dlsym(RTLD_DEFAULT, "io_submit");
  io_getevents_fn io_getevents =
      (io_getevents_fn)dlsym(RTLD_DEFAULT, "io_getevents");
  CHECK(io_setup && io_destroy && io_submit && io_getevents);
  ksm_setup_or_skip("aio_test");
  const int fd = direct_file_open("aio_test", N, 1);
  if (fd < 0) {
    printf("SKIP aio_test: no filesystem here takes O_DIRECT reads\n");
    return SKIP_CODE;
  }
  aio_context_t ctx = 0;
  CHECK(io_setup(64, &ctx) == 0);
  uint8_t* buf = merging_buffer(N + RESERVE, N / 2);

  unsigned long reads = 0, lost = 0, merged_seen = 0, samples = 0;
  const double end = now_seconds() + 3;
  for (unsigned round = 0; reads_go_on(end, merged_seen); ++round) {
    struct iocb cbs[IN_FLIGHT];
    struct iocb* list[IN_FLIGHT];
    struct iovec iov[IN_FLIGHT][2];
    unsigned keys[IN_FLIGHT];
    uint8_t* pages[IN_FLIGHT];
    const int vectors = round % 2;
    reset_pages(buf, N, round, IN_FLIGHT, pages, keys);
    if (round % 8 == 0) {
      ++samples;
      if (merging_pages() > RESERVE) ++merged_seen;
    }
    for (int k = 0; k < IN_FLIGHT; ++k) {
      memset(&cbs[k], 0, sizeof(cbs[k]));
      cbs[k].aio_fildes = (uint32_t)fd;
      cbs[k].aio_offset = (int64_t)keys[k] * PAGE;
      if (vectors) {
        iov[k][0] = (struct iovec){pages[k], PAGE / 2};
        iov[k][1] = (struct iovec){pages[k] + PAGE / 2, PAGE / 2};
        cbs[k].aio_lio_opcode = IOCB_CMD_PREADV;
        cbs[k].aio_buf = (uint64_t)(uintptr_t)iov[k];
        cbs[k].aio_nbytes = 2;
      } else {
        cbs[k].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[k].aio_buf = (uint64_t)(uintptr_t)pages[k];
        cbs[k].aio_nbytes = PAGE;
      }
      cbs[k].aio_data = (uint64_t)k;
      list[k] = &cbs[k];
    }
    CHECK(io_submit(ctx, IN_FLIGHT, list) == IN_FLIGHT);
    struct io_event events[IN_FLIGHT];
    int got = 0;
    while (got < IN_FLIGHT) {
      struct timespec limit = {10, 0};
      const int n = io_getevents(ctx, 1, IN_FLIGHT - got, events + got, &limit);
      CHECK(n > 0);
      got += n;
    }
    for (int e = 0; e < IN_FLIGHT; ++e) {
      /* EFAULT: the read met a merge window under mprotect protection
       * (limitations.md item 4); the test counts what a read loses. */
      if (events[e].res == -EFAULT) continue;
      CHECK(events[e].res == PAGE);
      const int k = (int)events[e].data;
      ++reads;
      if (!file_page_ok(pages[k], keys[k]) && lost++ < 5) {
        fprintf(stderr, "round %u read %d (%s): holds %#x..., want key %u\n",
                round, k, vectors ? "preadv" : "pread", pages[k][0], keys[k]);
      }
    }
  }
  CHECK(io_destroy(ctx) == 0);
  printf(
      "aio reads %lu, lost %lu, buffer pages found merged in %lu of %lu "
      "samples\n",
      reads, lost, merged_seen, samples);
  return merging_reads_verdict(reads, lost, merged_seen);
}
