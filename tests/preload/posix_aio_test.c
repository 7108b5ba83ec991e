/* POSIX AIO (glibc's aio_read, lio_listio) O_DIRECT reads into memory that
 * KSM keeps merging. glibc runs each request in a helper thread whose
 * pread pins the buffer while the device writes into it; kernel KSM never
 * merges a pinned page, and under samepage the preload holds merges off
 * each request's buffer from aio_read until aio_return. Kernel ABI and
 * libc only: runs natively and under `samepage run`.
 *
 * A file of 256 distinct pages; 256 buffer pages reset to 'z' (64 more
 * pages of 'z' stay merged) just before each read; 4 reads in flight at a
 * time, queued with aio_read and with lio_listio in turn, for 3 s. Every
 * read must leave exactly the file's bytes. Exit 77 where KSM cannot be
 * controlled or the filesystem has no O_DIRECT. */

#define _GNU_SOURCE
#include <aio.h>
#include <stdint.h>

#include "direct_file.h"
#include "ksm_test_util.h"

#define N 256
#define RESERVE 64
#define IN_FLIGHT 4

int main(void) {
  ksm_setup_or_skip("posix_aio_test");
  const int fd = direct_file_open("posix_aio_test", N, 1);
  if (fd < 0) {
    printf("SKIP posix_aio_test: no filesystem here takes O_DIRECT reads\n");
    return SKIP_CODE;
  }
  uint8_t* buf = merging_buffer(N + RESERVE, N / 2);
  unsigned long reads = 0, lost = 0, efault = 0, merged_seen = 0, samples = 0;
  const double end = now_seconds() + 3;
  for (unsigned round = 0; reads_go_on(end, merged_seen); ++round) {
    unsigned keys[IN_FLIGHT];
    uint8_t* pages[IN_FLIGHT];
    reset_pages(buf, N, round, IN_FLIGHT, pages, keys);
    if (round % 8 == 0) {
      ++samples;
      if (merging_pages() > RESERVE) ++merged_seen;
    }
    struct aiocb cbs[IN_FLIGHT];
    struct aiocb* list[IN_FLIGHT];
    memset(cbs, 0, sizeof(cbs));
    for (int k = 0; k < IN_FLIGHT; ++k) {
      cbs[k].aio_fildes = fd;
      cbs[k].aio_buf = pages[k];
      cbs[k].aio_nbytes = PAGE;
      cbs[k].aio_offset = (off_t)keys[k] * PAGE;
      cbs[k].aio_lio_opcode = LIO_READ;
      list[k] = &cbs[k];
    }
    if (round % 2 == 0) {
      for (int k = 0; k < IN_FLIGHT; ++k) CHECK(aio_read(&cbs[k]) == 0);
    } else {
      CHECK(lio_listio(LIO_NOWAIT, list, IN_FLIGHT, NULL) == 0);
    }
    const double give_up = now_seconds() + 10;
    for (int k = 0; k < IN_FLIGHT; ++k) {
      while (aio_error(&cbs[k]) == EINPROGRESS) {
        const struct aiocb* wait[1] = {&cbs[k]};
        struct timespec limit = {1, 0};
        (void)aio_suspend(wait, 1, &limit);
        CHECK(now_seconds() < give_up);
      }
      const int err = aio_error(&cbs[k]);
      const ssize_t got = aio_return(&cbs[k]);
      /* EFAULT: the read met a merge window under mprotect protection
       * (limitations.md item 4); the test counts what a read loses. */
      if (err == EFAULT) {
        ++efault;
        continue;
      }
      CHECK(err == 0 && got == PAGE);
      ++reads;
      if (!file_page_ok(pages[k], keys[k]) && lost++ < 5) {
        fprintf(stderr, "round %u read %d: holds %#x..., want key %u\n", round,
                k, pages[k][0], keys[k]);
      }
    }
  }
  printf(
      "posix aio reads %lu, lost %lu, EFAULT %lu, buffer pages found "
      "merged in %lu of %lu samples\n",
      reads, lost, efault, merged_seen, samples);
  return merging_reads_verdict(reads, lost, merged_seen);
}
