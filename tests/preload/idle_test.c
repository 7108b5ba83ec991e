/* An idle program whose memory is all merged stays quiet: no page faults
 * while it sleeps, as under kernel KSM, whose ksmd lives in the kernel.
 * samepage's scanner lives in the program, and its own memory is the
 * program's: until 2026-12-06, under merge-any, it dropped its own zeroed
 * buffers and tables (the room of its maps reads, descriptor slots, a
 * lock) to the zero page at one scan and wrote them again before the
 * next, each a merge window, a discard and a copy-on-write fault: dozens
 * of faults a second in a program that did nothing. Then the same for a
 * program that keeps reading pages of zeros: until 2026-12-06 samepage
 * took a page that maps the shared zero page (its own drop, then a read)
 * for a page of its own, dropped it again at every scan, and the next read
 * faulted again. Same assertions natively and under `samepage run`. */

#define _GNU_SOURCE
#include <sys/prctl.h>
#include <sys/resource.h>

#include "ksm_test_util.h"

enum { kPages = 1024 };

static long minor_faults(void) {
  struct rusage ru;
  CHECK(getrusage(RUSAGE_SELF, &ru) == 0);
  return ru.ru_minflt;
}

/* The fewest minor faults in one of three seconds, each spent in
 * `second` (which returns after about a second), each printed with
 * `what`. */
static long quietest_second(void (*second)(void), const char* what) {
  long fewest = -1;
  for (int k = 0; k < 3; ++k) {
    const long before = minor_faults();
    second();
    const long in_second = minor_faults() - before;
    printf("minor faults in 1 s %s: %ld\n", what, in_second);
    if (fewest < 0 || in_second < fewest) fewest = in_second;
  }
  return fewest;
}

static void asleep(void) { sleep_ms(1000); }

static volatile unsigned char* g_zeros;
static unsigned g_sum;

static void reading_zeros(void) {
  for (double end = now_seconds() + 1; now_seconds() < end;) {
    for (size_t i = 0; i < kPages; ++i) g_sum += g_zeros[i * PAGE];
    sleep_ms(10);
  }
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  ksm_setup_or_skip("idle_test");
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  unsigned char* p = map_class(kPages, 1);
  write_knob("pages_to_scan", "5000");
  write_knob("sleep_millisecs", "5");
  write_knob("run", "1");
  CHECK(wait_merging(kPages - 8, 30) >= kPages - 8);
  /* Whatever else there is to merge, merged: the count still for 0.5 s
   * (a slow build may merge the rest of the heap for a while). */
  unsigned long last = merging_pages();
  for (double still = now_seconds(), end = still + 30;
       now_seconds() < still + 0.5 && now_seconds() < end;) {
    sleep_ms(50);
    const unsigned long now = merging_pages();
    if (now != last) still = now_seconds();
    last = now;
  }
  /* Nothing from here on but sleeping: no allocation, no system call
   * that writes memory. The quietest of three seconds: the churn this is
   * about comes back at every scan, where a look for new mappings (every
   * 100 ms under merge-any) may now and then find its buffers given back
   * to the system and fault them in again (Debug builds beside other
   * tests: 193-289 faults in one second of three runs in ten, the next
   * seconds quiet). */
  const long faults = quietest_second(asleep, "asleep");
  for (size_t i = 0; i < kPages; ++i) CHECK(holds_class(p, i, 1));
  /* samepage's scanner allocates as it scans, and its heap comes and goes
   * (Debug builds check every invariant at each batch: 13-23 faults in some
   * seconds, 0 in most); the churn this is about made 91-355 in each. */
  CHECK(faults < 60);

  /* Pages of zeros, read again and again once merged. */
  volatile unsigned char* z = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(z != MAP_FAILED);
  memset((void*)z, 0, kPages * PAGE); /* present, each a page of its own */
  g_zeros = z;
  /* Merged before the count starts (a slow build may still be merging
   * them 0.5 s on, and the first read of each dropped page faults once). */
  CHECK(wait_merging(2 * kPages - 16, 30) >= 2 * kPages - 16);
  for (double end = now_seconds() + 0.5; now_seconds() < end;) {
    for (size_t i = 0; i < kPages; ++i) g_sum += z[i * PAGE];
    sleep_ms(10);
  }
  /* The quietest of three seconds, as above: the scanner's own churn
   * came in one second of a CI Debug run (176 faults; 0 and 57 in the
   * seconds asleep before it). */
  const long read_faults =
      quietest_second(reading_zeros, "reading the pages of zeros");
  CHECK(g_sum == 0);
  CHECK(read_faults < 60); /* as above; before: 94,208 a second */
  printf("PASS idle_test\n");
  return 0;
}
