/* A program's MADV_DONTNEED of merged memory while samepage merges
 * elsewhere. samepage reads its maps' flags (smaps) at most so often, and
 * a discard of a few merged pages asks the kernel for their mappings alone
 * while that read is fresh; a change of flags (the program's
 * MADV_DONTFORK, say) makes it stale. Until 2026-12-07 samepage's own
 * process_madvise discards (windows where pages join frames, discarding
 * first) counted as such changes, so nearly every discard of the
 * program's read all of smaps: a forked Redis's save, which discards each
 * value it wrote, read 49 MB of smaps per value and took up to 15 s
 * (natively 0.3 s). Here: 4,096 scattered pairs merged (thousands of
 * mappings, so smaps is large), a thread dropping and writing again
 * every 30 ms memory whose pages join their frames, and 400 discards of
 * one merged page each; what the process read meanwhile (rchar in
 * /proc/self/io) must stay below a tenth of a smaps read per discard:
 * 7 to 9 reads, against 240 to 300 before (Release build; 3 in a Debug
 * build, where a first shape of the test, mapping fresh memory ten times
 * a second, read smaps for each new mapping's flags, 143 times in its
 * 21 s). Every discarded page reads zeros, every other keeps its bytes.
 * Same assertions natively. */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>

#include "ksm_test_util.h"

enum {
  kPairs = 4096,     /* region A: 2 * kPairs pages, merged first */
  kBusyPages = 1024, /* region B: written again while the discards run */
  kDiscards = 400,
  kRemapMs = 30,
};

static volatile int g_stop;

/* The pair page i of a region of `pairs` pairs belongs to: a permutation
 * of the pages (an odd multiplier modulo a power of two) puts the two
 * pages of each pair far apart, at random-looking places (scattered). */
static uint64_t pair_of(size_t i, size_t pairs) {
  return (i * UINT64_C(2654435761)) % (2 * pairs) / 2;
}

/* A page of pair `pair`, tagged with `round`. */
static void fill_pair(unsigned char* p, uint64_t pair, unsigned round) {
  memset(p, 0x33, PAGE);
  memcpy(p, &pair, sizeof(pair));
  memcpy(p + 64, &round, sizeof(round));
}

/* Page i: its pair, tagged with `round`. */
static void fill_pair_page(unsigned char* base, size_t i, size_t pairs,
                           unsigned round) {
  fill_pair(base + i * PAGE, pair_of(i, pairs), round);
}

static int holds_pair_page(const unsigned char* base, size_t i, size_t pairs,
                           unsigned round) {
  const unsigned char* p = base + i * PAGE;
  uint64_t pair;
  unsigned r;
  memcpy(&pair, p, sizeof(pair));
  memcpy(&r, p + 64, sizeof(r));
  if (pair != pair_of(i, pairs) || r != round) return 0;
  for (size_t b = 0; b < PAGE; ++b) {
    if (b < sizeof(pair) || (b >= 64 && b < 64 + sizeof(r))) continue;
    if (p[b] != 0x33) return 0;
  }
  return 1;
}

static unsigned char* map_pairs(size_t pairs) {
  unsigned char* p = mmap(NULL, 2 * pairs * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < 2 * pairs; ++i) fill_pair_page(p, i, pairs, 0);
  CHECK(madvise(p, 2 * pairs * PAGE, MADV_MERGEABLE) == 0);
  return p;
}

static unsigned char* g_busy;

/* Region B: copies of region A's pairs at scattered places, every third
 * page unique, dropped (MADV_DONTNEED) and written again every kRemapMs
 * ms: its pages join A's frames over and over, in windows that discard
 * first, each discarding several ranges with one process_madvise. (Fresh
 * mappings instead would have samepage read their flags: smaps reads at
 * a pace of their own, ten a second.) */
static void fill_busy(unsigned char* p) {
  for (size_t i = 0; i < kBusyPages; ++i)
    fill_pair(p + i * PAGE, i % 3 == 2 ? kPairs + i : i * 11 % kPairs, 0);
}

static void* refill_busy_pages(void* arg) {
  (void)arg;
  while (!g_stop) {
    sleep_ms(kRemapMs);
    CHECK(madvise(g_busy, kBusyPages * PAGE, MADV_DONTNEED) == 0);
    fill_busy(g_busy);
  }
  return NULL;
}

static unsigned long rchar(void) {
  char text[1024];
  CHECK(read_text("/proc/self/io", text, sizeof(text)) > 0);
  const char* at = strstr(text, "rchar:");
  CHECK(at != NULL);
  return strtoul(at + 6, NULL, 10);
}

/* Bytes of /proc/self/smaps now. */
static unsigned long smaps_bytes(void) {
  int fd = open("/proc/self/smaps", O_RDONLY);
  CHECK(fd >= 0);
  static char buf[1 << 16];
  unsigned long total = 0;
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) total += (size_t)n;
  close(fd);
  return total;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("discard_reads_test");
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "0");
  write_knob("run", "1");
  unsigned char* a = map_pairs(kPairs);
  const unsigned long merged = wait_merging(kPairs, 30);
  printf("%lu pages merged of %d pairs\n", merged, kPairs);
  CHECK(merged >= kPairs);
  g_busy = mmap(NULL, kBusyPages * PAGE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(g_busy != MAP_FAILED);
  CHECK(madvise(g_busy, kBusyPages * PAGE, MADV_MERGEABLE) == 0);
  fill_busy(g_busy);
  pthread_t writer;
  CHECK(pthread_create(&writer, NULL, refill_busy_pages, NULL) == 0);
  sleep_ms(200);
  const unsigned long smaps = smaps_bytes();
  const unsigned long before = rchar();
  for (size_t k = 0; k < kDiscards; ++k) {
    const size_t page = k * 37 % (2 * kPairs);
    CHECK(madvise(a + page * PAGE, PAGE, MADV_DONTNEED) == 0);
    sleep_ms(2); /* room for the scanner's merges */
  }
  const unsigned long read = rchar() - before;
  g_stop = 1;
  CHECK(pthread_join(writer, NULL) == 0);
  printf("%d discards read %lu bytes; smaps is %lu bytes\n", kDiscards, read,
         smaps);
  for (size_t i = 0; i < 2 * kPairs; ++i) {
    int discarded = 0;
    for (size_t k = 0; k < kDiscards && !discarded; ++k)
      discarded = k * 37 % (2 * kPairs) == i;
    if (discarded) {
      CHECK(first_not(a + i * PAGE, PAGE, 0) < 0);
    } else if (!holds_pair_page(a, i, kPairs, 0)) {
      fprintf(stderr, "page %zu lost its bytes\n", i);
      CHECK(0);
    }
  }
  /* A tenth of a smaps read per discard, at most. */
  CHECK(read < kDiscards * smaps / 10);
  CHECK(munmap(a, 2 * kPairs * PAGE) == 0);
  CHECK(munmap(g_busy, kBusyPages * PAGE) == 0);
  printf("PASS discard_reads_test\n");
  return 0;
}
