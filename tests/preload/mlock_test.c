/* mlock and merging, as kernel KSM does it: locked memory merges and the
 * merged memory stays locked (VmFlags "lo", locked_vm unchanged, every page
 * resident),
 * writes copy as usual, munlock unlocks it and merging goes on; mlock of
 * merged memory populates it with write faults (the pages are copied) and
 * they merge again, locked; mlock2(MLOCK_ONFAULT) leaves merged memory
 * merged. Kernel ABI only: runs natively and under `samepage run`. */

#define _GNU_SOURCE
#include <sys/mman.h>

#include "ksm_test_util.h"

#define N 64
#define N_KIB (N * PAGE / 1024)

/* Sums a "Field:" (kB) of every smaps VMA overlapping [p, p + len); with
 * `flag`, also checks that each VMA's VmFlags holds it (want=1) or not. */
static long smaps_over(const void* p, size_t len, const char* field,
                       const char* flag, int want, int* flags_ok) {
  const unsigned long lo = (unsigned long)p, hi = lo + len;
  FILE* f = fopen("/proc/self/smaps", "r");
  CHECK(f != NULL);
  char line[512], vma[512] = "";
  int inside = 0, vmas = 0;
  long sum = 0;
  if (flags_ok) *flags_ok = 1;
  while (fgets(line, sizeof(line), f)) {
    unsigned long a, b;
    if (sscanf(line, "%lx-%lx ", &a, &b) == 2 &&
        strchr(line, ':') > strchr(line, ' ')) {
      inside = a < hi && b > lo;
      vmas += inside;
      snprintf(vma, sizeof(vma), "%s", line);
    } else if (inside && strncmp(line, field, strlen(field)) == 0) {
      sum += strtol(line + strlen(field), NULL, 10);
    } else if (inside && flags_ok && strncmp(line, "VmFlags:", 8) == 0) {
      char needle[8];
      snprintf(needle, sizeof(needle), " %s", flag);
      if ((strstr(line, needle) != NULL) != want) {
        *flags_ok = 0;
        fprintf(stderr, "want%s %s: %s%s", want ? "" : " no", flag, vma, line);
      }
    }
  }
  fclose(f);
  if (flags_ok && vmas == 0) *flags_ok = 0;
  return sum;
}

static int all_locked(const void* p, int want) {
  int ok;
  smaps_over(p, N * PAGE, "Rss:", "lo", want, &ok);
  return ok;
}

/* Resident pages mapped in the range, in kB. */
static long rss_kib(const void* p) {
  return smaps_over(p, N * PAGE, "Rss:", "", 1, NULL);
}

/* The range's proportional share (shared pages divided by their sharers):
 * small once merged. */
static long pss_kib(const void* p) {
  return smaps_over(p, N * PAGE, "Pss:", "", 1, NULL);
}

/* A field of /proc/self/status, in kB ("VmLck": locked_vm). */
static long status_kib(const char* field) {
  char buf[4096], key[64];
  CHECK(read_text("/proc/self/status", buf, sizeof(buf)) > 0);
  snprintf(key, sizeof(key), "\n%s:", field);
  const char* v = strstr(buf, key);
  CHECK(v != NULL);
  return strtol(v + strlen(key), NULL, 10);
}

static long vmlck_kib(void) { return status_kib("VmLck"); }

static unsigned char* region(int cls) {
  unsigned char* p = mmap(NULL, N * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < N; ++i) fill_class(p, i, cls);
  return p;
}

static void check_holds(const unsigned char* p, int cls) {
  for (size_t i = 0; i < N; ++i) CHECK(holds_class(p, i, cls));
}

/* Waits (bounded) until all of p's memory is resident. Merges still going
 * on (the last pages of a region) may have a page briefly not resident:
 * without room under RLIMIT_MEMLOCK for the new mapping and the old one
 * at once, the replacement is locked and populated just after it is
 * mapped. A page that stays non-resident fails. */
static long wait_resident(const void* p, double seconds) {
  const double end = now_seconds() + seconds;
  long kib;
  while ((kib = rss_kib(p)) != N_KIB && now_seconds() < end) sleep_ms(20);
  return kib;
}

/* Waits (bounded) until p's memory is shared: PSS well below its size. */
static long wait_shared(const void* p, double seconds) {
  const double end = now_seconds() + seconds;
  long kib;
  while ((kib = pss_kib(p)) > N_KIB / 4 && now_seconds() < end) sleep_ms(20);
  return kib;
}

/* After a populate copied p's merged pages (class cls): they merge again,
 * and stay resident and locked. */
static void check_merged_again_locked(const unsigned char* p, int cls,
                                      const char* after) {
  const long kib = wait_shared(p, 10);
  printf("%s: Pss %ld kB after merging again\n", after, kib);
  CHECK(kib <= N_KIB / 4);
  CHECK(wait_resident(p, 5) == N_KIB);
  CHECK(all_locked(p, 1));
  check_holds(p, cls);
}

int main(void) {
  ksm_setup_or_skip("mlock_test");
  write_knob("pages_to_scan", "10000");
  write_knob("sleep_millisecs", "0");
  const long base = vmlck_kib();

  /* Locked first, then advised: merged, and still locked. */
  unsigned char* a = region(1);
  CHECK(mlock(a, N * PAGE) == 0);
  CHECK(vmlck_kib() == base + N_KIB);
  CHECK(madvise(a, N * PAGE, MADV_MERGEABLE) == 0);
  write_knob("run", "1");
  unsigned long merged = wait_merging(N, 10);
  printf("locked region: %lu merging pages\n", merged);
  CHECK(merged >= N);
  long kib = wait_shared(a, 5);
  printf("merged: Pss %ld kB, Rss %ld kB, VmLck %ld kB\n", kib, rss_kib(a),
         vmlck_kib());
  CHECK(kib <= N_KIB / 4);
  CHECK(wait_resident(a, 5) == N_KIB);  /* locked memory is resident */
  CHECK(all_locked(a, 1));
  CHECK(vmlck_kib() == base + N_KIB);
  check_holds(a, 1);

  /* A write copies one page, and only that one. */
  a[5 * PAGE + 1] = 0x77;
  CHECK(a[5 * PAGE + 1] == 0x77);
  CHECK(holds_class(a, 4, 1) && holds_class(a, 6, 1));
  CHECK(all_locked(a, 1));

  /* munlock unlocks all of it. */
  CHECK(munlock(a, N * PAGE) == 0);
  CHECK(all_locked(a, 0));
  CHECK(vmlck_kib() == base);
  fill_class(a, 5, 1);

  /* Merging goes on; mlock of merged memory: the write-fault populate
   * copies the pages, then they merge again, locked. */
  unsigned char* c = region(2);
  CHECK(madvise(c, N * PAGE, MADV_MERGEABLE) == 0);
  merged = wait_merging(2 * N, 10);
  printf("after munlock, a second region: %lu merging pages\n", merged);
  CHECK(merged >= 2 * N);
  CHECK(mlock(c, N * PAGE) == 0);
  CHECK(all_locked(c, 1));
  check_merged_again_locked(c, 2, "mlock of merged memory");
  CHECK(vmlck_kib() == base + N_KIB);
  CHECK(munlock(c, N * PAGE) == 0);

  /* MLOCK_ONFAULT populates nothing: merged memory stays merged. */
  CHECK(mlock2(c, N * PAGE, MLOCK_ONFAULT) == 0);
  CHECK(all_locked(c, 1));
  kib = pss_kib(c);
  printf("mlock2(MLOCK_ONFAULT) of merged memory: Pss %ld kB\n", kib);
  CHECK(kib <= N_KIB / 4);
  check_holds(c, 2);
  CHECK(munlock(c, N * PAGE) == 0);
  CHECK(vmlck_kib() == base);
  check_holds(a, 1);

  /* mlockall(MCL_CURRENT) locks every mapping and populates it: merged
   * memory is copied by the write-fault populate and merges again, locked.
   * What the merger maps for itself is not filled with memory by it (under
   * samepage run until 2026-12-03: the frame view's file pages, RssShmem
   * +65,536 kB). Refused (ENOMEM) without CAP_IPC_LOCK where the process's
   * mappings exceed RLIMIT_MEMLOCK, natively too. */
  const long shmem = status_kib("RssShmem");
  if (mlockall(MCL_CURRENT) != 0) {
    CHECK(errno == ENOMEM && geteuid() != 0);
    printf(
        "mlockall(MCL_CURRENT): refused, VmSize %ld kB over "
        "RLIMIT_MEMLOCK without CAP_IPC_LOCK\n",
        status_kib("VmSize"));
  } else {
    const long shmem_locked = status_kib("RssShmem");
    printf("mlockall(MCL_CURRENT): RssShmem %ld -> %ld kB, VmLck %ld kB\n",
           shmem, shmem_locked, vmlck_kib());
    CHECK(shmem_locked - shmem < 8192);
    CHECK(all_locked(a, 1));
    check_merged_again_locked(a, 1, "mlockall");
    CHECK(munlockall() == 0);
    CHECK(all_locked(a, 0));
    CHECK(vmlck_kib() == base);
    check_holds(a, 1);
  }
  printf("mlock_test: ok\n");
  return 0;
}
