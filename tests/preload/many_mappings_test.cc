/* merge-any in a program that carries its own libstdc++, with thousands of
 * mappings, whose blocks of glibc's malloc come and go meanwhile.
 *
 * Found 2026-12-06 compiling a file under `samepage run --merge-any`:
 * cc1plus hung in three runs of four. cc1plus links libstdc++ statically
 * and exports its symbols, so libsamepage's calls to std::string's
 * out-of-line members ran cc1plus's copies. The scanner read a large
 * /proc/self/smaps into a string; growing it freed a block glibc had
 * mapped for it, from cc1plus's code, so the preload's free did not know
 * the call for samepage's own, and sent it through the engine, whose lock
 * the scanner itself held: the scanner waited for itself for good, and the
 * program's next free of such a block waited for the scanner. This program
 * is built the same way (-static-libstdc++ -rdynamic) and makes the
 * scanner's first large smaps read grow its buffer through mapped blocks.
 * The scanner must keep scanning (full scans go on), the program's frees
 * and unmaps must return, and the duplicates must merge, with their bytes
 * intact. Same assertions natively and under `samepage run`; a hang fails
 * by the alarm. */

#include <malloc.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>

#include <string>

#include "ksm_test_util.h"

/* Every other page read-only: as many mappings, about a kilobyte of smaps
 * each, a few megabytes in all. */
enum { kMappings = 3000, kSeconds = 60 };

static void on_alarm(int sig) {
  (void)sig;
  static const char msg[] =
      "FAIL many_mappings_test: still running after the alarm (a hang)\n";
  (void)!write(2, msg, sizeof(msg) - 1);
  _exit(1);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("many_mappings_test");
  signal(SIGALRM, on_alarm);
  alarm(kSeconds);
  /* A fixed threshold: glibc raises its own as mapped blocks are freed,
   * after which the scanner's buffers would come from its arena. */
  CHECK(mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1);
  /* No spare room at the top of an arena to grow into instead. */
  CHECK(mallopt(M_TOP_PAD, 0) == 1);
  CHECK(mallopt(M_TRIM_THRESHOLD, 0) == 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  const size_t pages = 2 * kMappings;
  auto* p = static_cast<unsigned char*>(
      mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < pages; i += 2) fill_class(p, i, 7);
  for (size_t i = 1; i < pages; i += 2)
    CHECK(mprotect(p + i * PAGE, PAGE, PROT_READ) == 0);
  write_knob("pages_to_scan", "1000");
  write_knob("sleep_millisecs", "10");
  const unsigned long scans0 = read_ulong(KSM_DIR "full_scans");
  write_knob("run", "1");
  /* glibc maps blocks this large for themselves (past its mmap threshold);
   * freeing one unmaps it. Meanwhile the scanner goes through merge-any's
   * sweeps, each a read of smaps. */
  const double until = now_seconds() + 3;
  unsigned long frees = 0;
  while (now_seconds() < until) {
    for (int k = 0; k < 8; ++k) {
      const size_t len = (size_t)(256 + 64 * k) << 10;
      auto* b = static_cast<unsigned char*>(malloc(len));
      CHECK(b != NULL);
      memset(b, k, len);
      CHECK(b[len - 1] == k);
      free(b);
      ++frees;
    }
    sleep_ms(5);
  }
  const unsigned long want = kMappings;
  const unsigned long merged = wait_merging(want, 30);
  const double scans_until = now_seconds() + 20;
  unsigned long scans = read_ulong(KSM_DIR "full_scans");
  while (scans < scans0 + 3 && now_seconds() < scans_until) {
    sleep_ms(20);
    scans = read_ulong(KSM_DIR "full_scans");
  }
  // Through the program's own std::string, as cc1plus's would be.
  std::string line = "frees " + std::to_string(frees) + "; pages merged " +
                     std::to_string(merged) +
                     " (want >= " + std::to_string(want) + "); full scans " +
                     std::to_string(scans - scans0);
  printf("%s\n", line.c_str());
  CHECK(merged >= want);
  CHECK(scans >= scans0 + 3);
  for (size_t i = 0; i < pages; i += 2) CHECK(holds_class(p, i, 7));
  p[2 * PAGE] = 1;
  CHECK(p[2 * PAGE] == 1 && holds_class(p, 0, 7) && holds_class(p, 4, 7));
  CHECK(munmap(p, pages * PAGE) == 0);
  alarm(0);
  printf("PASS many_mappings_test\n");
  return 0;
}
