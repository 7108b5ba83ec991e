/* Knobs written and read through stdio, as programs do. Kernel ABI only:
 * runs natively and under `samepage run`, with the same assertions.
 *
 *  - fflush(NULL) writes every stream's pending bytes: the knob changes;
 *  - fdopen over an open(2) descriptor, fprintf, fclose: the knob changes;
 *  - rewind of a stream that read a knob reads its current value (sysfs
 *    regenerates the text when read from offset 0);
 *  - a program that fprintf's a knob and returns from main without fclose:
 *    exit() flushes the stream (glibc's _IO_cleanup, after every
 *    destructor), and the kernel applies the value.
 *
 * The last one is seen from outside the writing process: a child (this
 * program again, argument "exit-writer") writes and exits, and the parent
 * then asks for the value. Natively that is /sys/kernel/mm/ksm, global.
 * Under samepage each process has its own engine and knobs (docs/
 * preload.md), so the parent's /sys/kernel/mm/ksm never shows the child's
 * value; the child's own engine is read from outside through
 * SAMEPAGE_STAT_FILE, which the preload writes at exit after the streams
 * were flushed. If that file exists the test reads the value there, else
 * from sysfs: the same assertion, each world's channel. */

#define _GNU_SOURCE
#include <signal.h>
#include <sys/wait.h>

#include "ksm_test_util.h"

#define KNOB KSM_DIR "pages_to_scan"

/* The child: writes through a FILE it never closes nor flushes. */
static int exit_writer(void) {
  FILE* f = fopen(KNOB, "w");
  if (f == NULL) return 2;
  fprintf(f, "2468");
  return 0;
}

/* Runs this program as the exit writer, SAMEPAGE_STAT_FILE=stat_path;
 * waits for it (bounded; killed by its pid if it hangs). */
static void run_exit_writer(const char* stat_path) {
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    setenv("SAMEPAGE_STAT_FILE", stat_path, 1);
    execl("/proc/self/exe", "stdio_knob_test", "exit-writer", (char*)NULL);
    _exit(127);
  }
  int status = 0;
  pid_t r = 0;
  const double end = now_seconds() + 20;
  while ((r = waitpid(pid, &status, WNOHANG)) == 0 && now_seconds() < end) {
    sleep_ms(10);
  }
  if (r == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  CHECK(r == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* "pages_to_scan N" from a SAMEPAGE_STAT_FILE; -1 if there is none. */
static long stat_file_knob(const char* path) {
  char buf[4096];
  if (read_text(path, buf, sizeof(buf)) <= 0) return -1;
  const char* line = strstr(buf, "\npages_to_scan ");
  CHECK(line != NULL);
  return strtol(line + strlen("\npages_to_scan "), NULL, 10);
}

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "exit-writer") == 0) return exit_writer();
  ksm_setup_or_skip("stdio_knob_test");
  write_knob("pages_to_scan", "111");

  /* fflush(NULL). */
  FILE* w = fopen(KNOB, "w");
  CHECK(w != NULL);
  CHECK(fprintf(w, "1234") == 4);
  CHECK(read_ulong(KNOB) == 111);  /* still in the stream's buffer */
  CHECK(fflush(NULL) == 0);
  CHECK(read_ulong(KNOB) == 1234);
  CHECK(fclose(w) == 0);

  /* fdopen over open(2). */
  const int fd = open(KNOB, O_WRONLY);
  CHECK(fd >= 0);
  w = fdopen(fd, "w");
  CHECK(w != NULL);
  CHECK(fprintf(w, "1357\n") == 5);
  CHECK(fclose(w) == 0);
  CHECK(read_ulong(KNOB) == 1357);

  /* rewind reads the current value. */
  FILE* r = fopen(KNOB, "r");
  CHECK(r != NULL);
  unsigned long v = 0;
  CHECK(fscanf(r, "%lu", &v) == 1 && v == 1357);
  write_knob("pages_to_scan", "4321");
  rewind(r);
  CHECK(fscanf(r, "%lu", &v) == 1);
  printf("after rewind: %lu\n", v);
  CHECK(v == 4321);
  CHECK(fclose(r) == 0);

  /* Flushed at exit only. */
  char stat_path[] = "/tmp/samepage-stdio-knob-XXXXXX";
  const int sfd = mkstemp(stat_path);
  CHECK(sfd >= 0);
  close(sfd);
  unlink(stat_path);  /* the preload creates it, or nobody does */
  run_exit_writer(stat_path);
  long seen = stat_file_knob(stat_path);
  const char* where = "the writer's engine (SAMEPAGE_STAT_FILE)";
  if (seen < 0) {
    seen = (long)read_ulong(KNOB);
    where = KNOB;
  }
  unlink(stat_path);
  printf("value written at the writer's exit, read from %s: %ld\n", where,
         seen);
  CHECK(seen == 2468);
  printf("stdio_knob_test: ok\n");
  return 0;
}
