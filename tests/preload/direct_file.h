/* A file of distinct pages read with O_DIRECT, for the pinned-I/O tests
 * (direct_io_test, aio_test). Plain C, kernel ABI only. */

#ifndef SAMEPAGE_TESTS_PRELOAD_DIRECT_FILE_H_
#define SAMEPAGE_TESTS_PRELOAD_DIRECT_FILE_H_

#include <stdint.h>

#include "ksm_test_util.h"

static char g_direct_path[256];

static void direct_file_remove(void) {
  if (g_direct_path[0] != '\0') unlink(g_direct_path);
}

/* Page `key` of the file: the key in its first 4 bytes, then one letter. */
UNUSED static int file_page_ok(const void* page, unsigned key) {
  const uint8_t* p = page;
  unsigned got;
  memcpy(&got, p, sizeof(got));
  if (got != key) return 0;
  for (int b = sizeof(got); b < PAGE; ++b) {
    if (p[b] != (uint8_t)('A' + key % 26)) return 0;
  }
  return 1;
}

/* Writes `pages` such pages to a file named after `name` in the current
 * directory or /var/tmp, whichever filesystem takes O_DIRECT reads (when
 * `direct`), and returns it opened O_RDONLY, with O_DIRECT if `direct`
 * (removed at exit); -1 if none. */
UNUSED static int direct_file_open(const char* name, unsigned pages,
                                   int direct) {
  const char* dirs[] = {".", "/var/tmp"};
  char* page = aligned_alloc(PAGE, PAGE);
  CHECK(page != NULL);
  for (size_t d = 0; d < sizeof(dirs) / sizeof(dirs[0]); ++d) {
    snprintf(g_direct_path, sizeof(g_direct_path), "%s/%s.%d", dirs[d], name,
             (int)getpid());
    int fd = open(g_direct_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) continue;
    atexit(direct_file_remove);
    for (unsigned k = 0; k < pages; ++k) {
      memset(page, 'A' + k % 26, PAGE);
      memcpy(page, &k, sizeof(k));
      CHECK(pwrite(fd, page, PAGE, (off_t)k * PAGE) == PAGE);
    }
    CHECK(fsync(fd) == 0);
    close(fd);
    fd = open(g_direct_path, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    /* A filesystem may take the flag and still refuse the read. */
    if (fd >= 0 && pread(fd, page, PAGE, 0) == PAGE && file_page_ok(page, 0)) {
      free(page);
      return fd;
    }
    if (fd >= 0) close(fd);
    unlink(g_direct_path);
    g_direct_path[0] = '\0';
  }
  free(page);
  return -1;
}

/* Starts KSM at full speed and returns `pages` pages of 'z', advised, once
 * at least `merged` of them are merged (bounded: 30 s). */
UNUSED static uint8_t* merging_buffer(size_t pages, unsigned long merged) {
  write_knob("pages_to_scan", "10000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
  uint8_t* buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(buf != MAP_FAILED);
  memset(buf, 'z', pages * PAGE);
  CHECK(madvise(buf, pages * PAGE, MADV_MERGEABLE) == 0);
  const double until = now_seconds() + 30;
  while (merging_pages() < merged && now_seconds() < until) sleep_ms(10);
  CHECK(merging_pages() >= merged);
  return buf;
}

/* Round `round` of reads in flight: `count` consecutive pages of the `n`
 * buffer pages (cycling) go back to 'z', each to be read from a file page
 * (keys[k]) other than its own; then a pause, so a scan may merge them. */
UNUSED static void reset_pages(uint8_t* buf, unsigned n, unsigned round,
                               int count, uint8_t** pages, unsigned* keys) {
  for (int k = 0; k < count; ++k) {
    const unsigned i = (round * (unsigned)count + (unsigned)k) % n;
    pages[k] = buf + (size_t)i * PAGE;
    keys[k] = (i * 7 + round) % n;
    memset(pages[k], 'z', PAGE);
  }
  struct timespec ts = {0, 300 * 1000};
  nanosleep(&ts, NULL);
}

/* Whether reads into memory that keeps merging go on: until `end`, and
 * past it (at most 20 s more) while no buffer page was seen merged. On a
 * loaded machine ksmd (nice 5) or samepage's scanner may not come by in
 * the first seconds, and a run without a merge proves nothing. */
UNUSED static int reads_go_on(double end, unsigned long merged_seen) {
  const double now = now_seconds();
  return now < end || (merged_seen == 0 && now < end + 20);
}

/* The exit status of a test whose buffer pages kept merging between the
 * reads: 0 if no read lost its bytes and some buffer page was seen merged
 * (else the run proved nothing). */
UNUSED static int merging_reads_verdict(unsigned long reads, unsigned long lost,
                                        unsigned long merged_seen) {
  CHECK(reads > 100);
  if (merged_seen == 0) {
    fprintf(stderr, "nothing was merged meanwhile: the test proves nothing\n");
    return 1;
  }
  if (lost != 0) return 1;
  printf("OK\n");
  return 0;
}

#endif /* SAMEPAGE_TESTS_PRELOAD_DIRECT_FILE_H_ */
