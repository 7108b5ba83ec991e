/* Listing /sys/kernel/mm/ksm: opendir/readdir/rewinddir/closedir and
 * scandir show the KSM files, each of which opens and reads. Natively the
 * kernel's directory (skipped where it does not exist); under
 * `samepage run` samepage's files, with the same assertions. Reads only. */

#define _GNU_SOURCE
#include <dirent.h>

#include "ksm_test_util.h"

/* Files every Linux 6.x KSM has (CONFIG_NUMA adds merge_across_nodes). */
static const char* kRequired[] = {
    "run",           "pages_to_scan", "sleep_millisecs", "pages_shared",
    "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
    "max_page_sharing", "use_zero_pages", "stable_node_chains",
    "stable_node_dups", "stable_node_chains_prune_millisecs",
};

static int list_once(DIR* d, char names[][64], int max, int* dots) {
  int n = 0;
  *dots = 0;
  struct dirent* e;
  errno = 0;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
      ++*dots;
      CHECK(e->d_type == DT_DIR || e->d_type == DT_UNKNOWN);
      continue;
    }
    CHECK(n < max);
    CHECK(e->d_type == DT_REG || e->d_type == DT_UNKNOWN);
    CHECK(strlen(e->d_name) < 64);
    strcpy(names[n++], e->d_name);
  }
  CHECK(errno == 0);
  return n;
}

static int has(char names[][64], int n, const char* want) {
  for (int i = 0; i < n; ++i) {
    if (strcmp(names[i], want) == 0) return 1;
  }
  return 0;
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  DIR* d = opendir(KSM_DIR);
  if (d == NULL && errno == ENOENT) {
    printf("SKIP ksm_dir_test: no %s here\n", KSM_DIR);
    return SKIP_CODE;
  }
  CHECK(d != NULL);
  static char names[128][64], again[128][64];
  int dots = 0, dots2 = 0;
  int n = list_once(d, names, 128, &dots);
  CHECK(dots == 2);
  for (size_t i = 0; i < sizeof(kRequired) / sizeof(kRequired[0]); ++i) {
    if (!has(names, n, kRequired[i])) {
      fprintf(stderr, "listing lacks %s\n", kRequired[i]);
      return 1;
    }
  }
  /* Every listed file opens and reads a line. */
  for (int i = 0; i < n; ++i) {
    char path[64 + sizeof(KSM_DIR)], buf[256];
    memcpy(path, KSM_DIR, sizeof(KSM_DIR) - 1);
    strcpy(path + sizeof(KSM_DIR) - 1, names[i]);
    ssize_t r = read_text(path, buf, sizeof(buf));
    if (r <= 0 || buf[r - 1] != '\n') {
      fprintf(stderr, "%s: read %zd (%s)\n", path, r, strerror(errno));
      return 1;
    }
  }
  rewinddir(d);
  CHECK(list_once(d, again, 128, &dots2) == n && dots2 == 2);
  CHECK(closedir(d) == 0);
  /* Without the trailing slash, and through scandir with a sort. */
  d = opendir("/sys/kernel/mm/ksm");
  CHECK(d != NULL);
  CHECK(list_once(d, again, 128, &dots2) == n);
  CHECK(closedir(d) == 0);
  struct dirent** list = NULL;
  int m = scandir(KSM_DIR, &list, NULL, alphasort);
  CHECK(m == n + 2);
  for (int i = 1; i < m; ++i) {
    CHECK(strcmp(list[i - 1]->d_name, list[i]->d_name) < 0);
  }
  for (int i = 0; i < m; ++i) {
    CHECK(strcmp(list[i]->d_name, ".") == 0 ||
          strcmp(list[i]->d_name, "..") == 0 ||
          has(names, n, list[i]->d_name));
    free(list[i]);
  }
  free(list);
  /* A directory that is not KSM's lists as usual. */
  d = opendir("/proc/self");
  CHECK(d != NULL);
  int entries = 0;
  while (readdir(d) != NULL) ++entries;
  CHECK(entries > 10);
  CHECK(closedir(d) == 0);
  printf("PASS ksm_dir_test: %d files listed\n", n);
  return 0;
}
