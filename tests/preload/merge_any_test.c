/* prctl(PR_SET_MEMORY_MERGE): merge-any survives exec, as the kernel keeps
 * it, and merges memory that was never madvised.
 *   merge_any_test        sets merge-any and execs itself as "child";
 *   merge_any_test child  expects merge-any on (inherited, or set by
 *                         `samepage run --merge-any`) and checks merging.
 * Same assertions natively and under `samepage run`. */

#define _GNU_SOURCE
#include <sys/prctl.h>

#include "ksm_test_util.h"

enum { kPages = 48 };

static int child(void) {
  ksm_setup_or_skip("merge_any_test");
  CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 1);
  unsigned char* p = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < kPages; ++i) fill_class(p, i, 5);
  write_knob("pages_to_scan", "1000");
  write_knob("sleep_millisecs", "10");
  write_knob("run", "1");
  unsigned long merged = wait_merging(kPages, 30);
  printf("merge-any: %lu pages merged (want >= %d)\n", merged, kPages);
  CHECK(merged >= kPages);
  for (size_t i = 0; i < kPages; ++i) CHECK(holds_class(p, i, 5));
  p[3 * PAGE] = 1;
  CHECK(holds_class(p, 2, 5) && holds_class(p, 4, 5) && p[3 * PAGE] == 1);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  for (size_t i = 0; i < kPages; ++i) CHECK(i == 3 || holds_class(p, i, 5));
  CHECK(munmap(p, kPages * PAGE) == 0);
  printf("PASS merge_any_test\n");
  return 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (argc > 1 && strcmp(argv[1], "child") == 0) return child();
  /* Skip before changing anything if KSM is not ours to drive. */
  int fd = open(KSM_DIR "run", O_WRONLY);
  if (fd < 0) {
    printf("SKIP merge_any_test: %srun not writable (%s)\n", KSM_DIR,
           strerror(errno));
    return SKIP_CODE;
  }
  close(fd);
  CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 0);
  CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0);
  char* args[] = {argv[0], "child", NULL};
  execv("/proc/self/exe", args);
  fprintf(stderr, "execv: %s\n", strerror(errno));
  return 1;
}
