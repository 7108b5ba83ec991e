/* samepage_workload: builds one named workload and has it merged through the
 * kernel KSM ABI only — mmap, madvise(MADV_MERGEABLE), /sys/kernel/mm/ksm,
 * /proc/self/ksm_stat — with no samepage header. Run natively it measures
 * kernel KSM; under `samepage run` it measures samepage, which serves the same
 * files inside the process. bench/compare.cc runs it both ways, alternating,
 * and reads the one result line it prints on stdout:
 *
 *   samepage-bench workload=ID merger=kernel|samepage status=converged ...
 *
 * (keys are listed at PrintResult). What it measures, from run=1 until the
 * expected pages are saved: wall time; the merger's CPU (the "ksmd" kernel
 * thread natively, the "samepage-ksmd" thread of this process under samepage;
 * schedstat, ns); pages saved; heap and slab metadata per tracked page; VMAs
 * added; then the first write to merged pages (copy-on-write), the time run=2
 * takes to unmerge everything and the VMAs left after it, and every page's
 * contents.
 *
 * Natively it changes global kernel state: every knob it writes is read first
 * and written back on every way out (return, failure, SIGTERM/SIGINT/SIGHUP,
 * its own SIGALRM watchdog) after run=2 has unmerged everything, and run is
 * left as found (0 where nothing else uses KSM). Between the baselines and the
 * measurement it calls no malloc, so the heap delta is the merger's.
 *
 * Exit: 0 measured and contents intact, 1 failure, 2 usage, 77 kernel KSM
 * wanted but /sys/kernel/mm/ksm is not writable here (skip). */

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* The kernel-ABI tests' helpers (read_text, write_text, now_seconds, PAGE,
 * KSM_DIR, SKIP_CODE): plain C, Linux headers only. */
#include "ksm_test_util.h"

#define MAX_BUFFERS 4

/* Page keys: the content of every page follows from its key. */
#define KEY_ZERO 0ULL                  /* all zero bytes */
#define KEY_STAR 0x2a2a2a2a2a2a2a2aULL /* '*' everywhere */
#define KEY_UNIQUE (1ULL << 62)        /* | a serial: a page of its own */
#define KEY_HOT (1ULL << 63)           /* | a serial: rewritten by a thread */

/* --- small helpers: kernel ABI through open/read/write only -------------- */

static void SleepUs(long us) {
  struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
  nanosleep(&ts, NULL);
}

/* Async-signal-safe message on stderr. */
static void Say(const char* a, const char* b) {
  if (write(2, a, strlen(a)) < 0 || (b && write(2, b, strlen(b)) < 0)) return;
}

static void KsmPath(char* path, size_t size, const char* name) {
  snprintf(path, size, KSM_DIR "%s", name);
}

/* A counter or knob of /sys/kernel/mm/ksm; -1 when unreadable. */
static long ReadKsm(const char* name) {
  char path[128], text[64];
  KsmPath(path, sizeof(path), name);
  if (read_text(path, text, sizeof(text)) <= 0) return -1;
  return strtol(text, NULL, 10);
}

static int WriteKsm(const char* name, const char* value) {
  char path[128];
  KsmPath(path, sizeof(path), name);
  if (write_text(path, value) == 0) return 0;
  fprintf(stderr, "workload: write %s%s=%s: %s\n", KSM_DIR, name, value,
          strerror(errno));
  return -1;
}

/* A field "name N" of a text such as /proc/self/ksm_stat; -1 if absent. */
static long FieldOf(const char* text, const char* name) {
  const size_t len = strlen(name);
  for (const char* p = text; (p = strstr(p, name)) != NULL; p += len) {
    if ((p == text || p[-1] == '\n') && p[len] == ' ') {
      return strtol(p + len + 1, NULL, 10);
    }
  }
  return -1;
}

static long KsmStat(const char* field) {
  char text[1024];
  if (read_text("/proc/self/ksm_stat", text, sizeof(text)) <= 0) return -1;
  return FieldOf(text, field);
}

/* Lines of /proc/self/maps (one per VMA), read through a fixed buffer. */
static long CountVmas(void) {
  static char buf[1 << 16];
  const int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  long lines = 0;
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) {
    for (ssize_t i = 0; i < n; ++i) lines += buf[i] == '\n';
  }
  close(fd);
  return lines;
}

/* --- the merger's CPU time ------------------------------------------------ */

/* Directory (under /proc) of the task whose comm is `comm`, searched among
 * the numeric entries of `dir`; getdents64 into a fixed buffer (no malloc,
 * unlike opendir). Reading only: nothing is ever signalled. */
static int FindTask(const char* dir, const char* comm, char* out, size_t size) {
  const int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  static char buf[1 << 15] __attribute__((aligned(8)));
  int found = -1;
  ssize_t n;
  while (found < 0 && (n = getdents64(fd, buf, sizeof(buf))) > 0) {
    for (ssize_t off = 0; off < n && found < 0;) {
      const struct dirent64* e = (const struct dirent64*)(buf + off);
      off += e->d_reclen;
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      char path[512], name[64];
      snprintf(path, sizeof(path), "%s/%s/comm", dir, e->d_name);
      if (read_text(path, name, sizeof(name)) <= 0) continue;
      name[strcspn(name, "\n")] = '\0';
      if (strcmp(name, comm) == 0 &&
          snprintf(out, size, "%s/%s", dir, e->d_name) < (int)size) {
        found = 0;
      }
    }
  }
  close(fd);
  return found;
}

/* CPU seconds of the task at `dir`: schedstat's run time (ns), else stat's
 * utime + stime (clock ticks, 10 ms). -1 if neither is readable. */
static double TaskCpu(const char* dir) {
  char path[256], text[1024];
  snprintf(path, sizeof(path), "%s/schedstat", dir);
  if (read_text(path, text, sizeof(text)) > 0) {
    return (double)strtoull(text, NULL, 10) / 1e9;
  }
  snprintf(path, sizeof(path), "%s/stat", dir);
  if (read_text(path, text, sizeof(text)) <= 0) return -1;
  const char* p = strrchr(text, ')');
  if (p == NULL) return -1;
  unsigned long long utime = 0, stime = 0;
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
             &utime, &stime) != 2) {
    return -1;
  }
  return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* --- knobs saved and restored (native runs change global state) ----------- */

static struct {
  const char* name;
  char value[64];
  int saved;
} g_knobs[] = {{.name = "advisor_mode"},
               {.name = "pages_to_scan"},
               {.name = "sleep_millisecs"},
               {.name = "use_zero_pages"},
               {.name = "smart_scan"},
               {.name = "max_page_sharing"},
               {.name = "run"}};
enum { kNumKnobs = sizeof(g_knobs) / sizeof(g_knobs[0]) };
static volatile sig_atomic_t g_restore_armed = 0;

static const char* SavedKnob(const char* name) {
  for (int i = 0; i < kNumKnobs; ++i) {
    if (strcmp(g_knobs[i].name, name) == 0 && g_knobs[i].saved) {
      return g_knobs[i].value;
    }
  }
  return NULL;
}

/* Reads every knob the run may change. advisor_mode reads "[none] scan-time":
 * the bracketed word is what is written back. */
static int SaveKnobs(void) {
  for (int i = 0; i < kNumKnobs; ++i) {
    char path[128], text[64];
    KsmPath(path, sizeof(path), g_knobs[i].name);
    if (read_text(path, text, sizeof(text)) <= 0) {
      if (strcmp(g_knobs[i].name, "advisor_mode") == 0) continue;  // < 6.9
      fprintf(stderr, "workload: read %s: %s\n", path, strerror(errno));
      return -1;
    }
    const char* v = text;
    const char* open_br = strchr(text, '[');
    if (open_br != NULL) {
      v = open_br + 1;
      text[strcspn(text, "]")] = '\0';
    }
    snprintf(g_knobs[i].value, sizeof(g_knobs[i].value), "%s", v);
    g_knobs[i].value[strcspn(g_knobs[i].value, "\n")] = '\0';
    g_knobs[i].saved = 1;
  }
  g_restore_armed = 1;
  return 0;
}

/* Unmerges everything and writes every saved knob back; run last, as found
 * (a saved 2 is left as 0). Async-signal-safe: open/write/close/nanosleep. */
static void RestoreKnobs(void) {
  if (!g_restore_armed) return;
  g_restore_armed = 0;
  char path[128];
  KsmPath(path, sizeof(path), "run");
  if (write_text(path, "2") != 0) Say("workload: restore: run=2 failed\n", 0);
  const char* advisor = SavedKnob("advisor_mode");
  const int advisor_none = advisor == NULL || strcmp(advisor, "none") == 0;
  for (int i = 0; i < kNumKnobs; ++i) {
    const char* name = g_knobs[i].name;
    if (!g_knobs[i].saved || strcmp(name, "run") == 0) continue;
    // Under the scan-time advisor pages_to_scan is the advisor's (EINVAL).
    if (!advisor_none && strcmp(name, "pages_to_scan") == 0) continue;
    KsmPath(path, sizeof(path), name);
    int ok = 0;
    // max_page_sharing is EBUSY while pages are still shared: brief retries.
    for (int attempt = 0; attempt < 50 && !ok; ++attempt) {
      ok = write_text(path, g_knobs[i].value) == 0;
      if (!ok) SleepUs(20000);
    }
    if (!ok) Say("workload: restore failed for ", name), Say("\n", 0);
  }
  const char* run = SavedKnob("run");
  KsmPath(path, sizeof(path), "run");
  if (write_text(path, run != NULL && strcmp(run, "1") == 0 ? "1" : "0") != 0) {
    Say("workload: restore: run failed\n", 0);
  }
}

static void OnSignal(int sig) {
  Say("workload: signal ", sig == SIGALRM ? "SIGALRM (watchdog)" : "");
  Say(": restoring /sys/kernel/mm/ksm and exiting\n", 0);
  RestoreKnobs();
  _exit(1);
}

/* --- workloads ------------------------------------------------------------ */

struct Buffer {
  unsigned char* mem;
  size_t pages;
  uint64_t* keys;  // one per page
};

struct Workload;

/* What a workload is: the table below. */
struct Spec {
  const char* id;
  const char* title;
  size_t full_pages;   // at --scale 1
  int use_zero_pages;  // the knob
  int unique;          // nothing to merge: measure full scans
  int cow_pages;       // pages written once after merging (0: none; -1: all)
  void (*build)(struct Workload*, size_t pages);
};

/* One workload as built in this process. */
struct Workload {
  const struct Spec* spec;
  struct Buffer buf[MAX_BUFFERS];
  int nbuf;
  size_t hot_first, hot_count;  // in buf[nbuf - 1], rewritten while merging
};

static void* MapOrDie(size_t bytes) {
  void* p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "workload: mmap %zu bytes: %s\n", bytes, strerror(errno));
    exit(1);  // atexit restores the knobs
  }
  return p;
}

/* A buffer of its own VMA: an inaccessible page on each side keeps the kernel
 * from merging it with a neighbouring anonymous mapping, which madvise would
 * then split (a VMA that neither merger made). */
static struct Buffer* AddBuffer(struct Workload* w, size_t pages) {
  struct Buffer* b = &w->buf[w->nbuf++];
  unsigned char* fence =
      mmap(NULL, (pages + 2) * PAGE, PROT_NONE,
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (fence == MAP_FAILED ||
      mprotect(fence + PAGE, pages * PAGE, PROT_READ | PROT_WRITE) != 0) {
    fprintf(stderr, "workload: mmap %zu pages: %s\n", pages, strerror(errno));
    exit(1);
  }
  b->pages = pages;
  b->mem = fence + PAGE;
  b->keys = MapOrDie(pages * sizeof(uint64_t));
  return b;
}

/* The bytes of a page with key `key`; hot pages carry their writer's counter
 * in bytes 8..15. */
static void MakePage(unsigned char* p, uint64_t key, uint64_t counter) {
  if (key == KEY_ZERO || key == KEY_STAR) {
    memset(p, (int)(key & 0xff), PAGE);
    return;
  }
  memset(p, 0x5a, PAGE);
  memcpy(p, &key, sizeof(key));
  if (key & KEY_HOT) memcpy(p + 8, &counter, sizeof(counter));
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;
static uint64_t Random(void) {  // splitmix64: the same layout every run
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static void BuildIdentical(struct Workload* w, size_t n) {
  struct Buffer* b = AddBuffer(w, n);
  for (size_t i = 0; i < n; ++i) b->keys[i] = KEY_STAR;
}

/* Page i equals page i + n/2: two identical halves. */
static void BuildRuns(struct Workload* w, size_t n) {
  struct Buffer* b = AddBuffer(w, n);
  for (size_t i = 0; i < n; ++i) b->keys[i] = 1 + i % (n / 2);
}

/* n/2 pairs, partners at random places. */
static void BuildScattered(struct Workload* w, size_t n) {
  struct Buffer* b = AddBuffer(w, n);
  for (size_t i = 0; i < n; ++i) b->keys[i] = 1 + i / 2;
  for (size_t i = n - 1; i > 0; --i) {  // Fisher-Yates
    const size_t j = Random() % (i + 1);
    const uint64_t t = b->keys[i];
    b->keys[i] = b->keys[j];
    b->keys[j] = t;
  }
}

static void BuildUnique(struct Workload* w, size_t n) {
  struct Buffer* b = AddBuffer(w, n);
  for (size_t i = 0; i < n; ++i) b->keys[i] = KEY_UNIQUE | i;
}

static void BuildZero(struct Workload* w, size_t n) {
  struct Buffer* b = AddBuffer(w, n);
  for (size_t i = 0; i < n; ++i) b->keys[i] = KEY_ZERO;
}

/* Zero pages at random places among unique ones, half of each: freed
 * memory in a guest, merged at the default use_zero_pages = 0. */
static void BuildZeroScattered(struct Workload* w, size_t n) {
  struct Buffer* b = AddBuffer(w, n);
  for (size_t i = 0; i < n; ++i) b->keys[i] = KEY_UNIQUE | i;
  for (size_t placed = 0; placed < n / 2;) {
    const size_t i = Random() % n;
    if (b->keys[i] != KEY_ZERO) {
      b->keys[i] = KEY_ZERO;
      ++placed;
    }
  }
}

/* Four buffers of m pages (separate mappings), every 16th page zero:
 *   0: base pages 1..m
 *   1: first half = buffer 0's first half, same offsets; second half unique
 *   2: first half = buffer 1's second half (shifted by m/2); second half =
 *      base pages m/4..3m/4 (three copies of some, two of others)
 *   3: first half = base pages chosen at random (scattered partners);
 *      then unique pages; last eighth rewritten by a thread while merging. */
static void BuildMixed(struct Workload* w, size_t n) {
  const size_t m = n / 4;
  for (int k = 0; k < 4; ++k) AddBuffer(w, m);
  for (size_t i = 0; i < m; ++i) {
    const uint64_t base = 1 + i;
    const uint64_t unique1 = KEY_UNIQUE | (1ULL << 40) | i;
    w->buf[0].keys[i] = base;
    w->buf[1].keys[i] = i < m / 2 ? base : unique1;
    w->buf[2].keys[i] =
        i < m / 2 ? (KEY_UNIQUE | (1ULL << 40) | (m / 2 + i)) : 1 + (i - m / 4);
    w->buf[3].keys[i] =
        i < m / 2 ? 1 + Random() % m : KEY_UNIQUE | (3ULL << 40) | i;
    for (int k = 0; k < 4; ++k) {
      if (i % 16 == 7) w->buf[k].keys[i] = KEY_ZERO;
    }
  }
  w->hot_first = m - m / 8;
  w->hot_count = m / 8;
  for (size_t i = w->hot_first; i < m; ++i) w->buf[3].keys[i] = KEY_HOT | i;
}

/* Three copies of n/3 pages: two buffers alike, page for page, and the
 * buffer at the highest address (scanned last) holding the same pages
 * shuffled. The first two merge as pairs in runs; then every page of the
 * last joins the frame of its content, at a random place among them:
 * memory that finds its content among merged pages elsewhere (a third
 * guest booting the same image). */
static void BuildJoinsScattered(struct Workload* w, size_t n) {
  const size_t m = n / 3;
  int last = 0;
  for (int k = 0; k < 3; ++k) {
    AddBuffer(w, m);
    if (w->buf[k].mem > w->buf[last].mem) last = k;
  }
  for (size_t i = 0; i < m; ++i) {
    w->buf[0].keys[i] = w->buf[1].keys[i] = w->buf[2].keys[i] = 1 + i;
  }
  uint64_t* shuffled = w->buf[last].keys;
  for (size_t i = m - 1; i > 0; --i) {  // Fisher-Yates
    const size_t j = Random() % (i + 1);
    const uint64_t t = shuffled[i];
    shuffled[i] = shuffled[j];
    shuffled[j] = t;
  }
}

static const struct Spec g_specs[] = {
    {"identical", "identical ('*' everywhere)", 25600, 0, 0, 2000,
     BuildIdentical},
    {"pairs-runs", "pairs in runs (i = i+N/2)", 100000, 0, 0, 2000, BuildRuns},
    {"pairs-scattered", "pairs scattered", 40000, 0, 0, 2000, BuildScattered},
    {"pairs-scattered-100k", "pairs scattered, past the VMA budget", 100000, 0,
     0, 2000, BuildScattered},
    {"unique", "unique pages, per full scan", 100000, 0, 1, 0, BuildUnique},
    {"zero", "zero pages, use_zero_pages=1", 100000, 1, 0, 0, BuildZero},
    {"zero-scattered", "zero pages scattered, use_zero_pages=0", 100000, 0, 0,
     0, BuildZeroScattered},
    {"cow", "copy-on-write, first write (pairs in runs)", 8192, 0, 0, -1,
     BuildRuns},
    {"joins-scattered", "a third copy, shuffled, joins merged pages", 60000, 0,
     0, 2000, BuildJoinsScattered},
    {"mixed", "mixed: 4 buffers, overlap, zero, a writer", 65536, 0, 0, 0,
     BuildMixed},
    {"1gib", "1 GiB: two identical 512 MiB halves", 262144, 0, 0, 2000,
     BuildRuns},
};
enum { kNumSpecs = sizeof(g_specs) / sizeof(g_specs[0]) };

static int CompareDoubles(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static int CompareKeys(const void* a, const void* b) {
  const uint64_t x = *(const uint64_t*)a, y = *(const uint64_t*)b;
  return x < y ? -1 : x > y;
}

/* Pages the merger should save: per content with c copies, c minus the
 * ceil(c / max_page_sharing) pages kept; zero pages all, with
 * use_zero_pages. Hot pages change all the time and are left out. */
static void Expected(const struct Workload* w, size_t* sharing, size_t* zero) {
  size_t total = 0;
  for (int k = 0; k < w->nbuf; ++k) total += w->buf[k].pages;
  uint64_t* all = MapOrDie(total * sizeof(uint64_t));
  size_t n = 0;
  for (int k = 0; k < w->nbuf; ++k) {
    for (size_t i = 0; i < w->buf[k].pages; ++i) {
      const uint64_t key = w->buf[k].keys[i];
      if (key & KEY_HOT) continue;
      if (key == KEY_ZERO && w->spec->use_zero_pages) {
        ++*zero;
        continue;
      }
      all[n++] = key;
    }
  }
  qsort(all, n, sizeof(uint64_t), CompareKeys);
  const size_t max_sharing = 256;
  for (size_t i = 0; i < n;) {
    size_t j = i;
    while (j < n && all[j] == all[i]) ++j;
    const size_t copies = j - i;
    *sharing += copies - (copies + max_sharing - 1) / max_sharing;
    i = j;
  }
  munmap(all, total * sizeof(uint64_t));
}

/* --- the writer of the mixed workload ------------------------------------- */

static atomic_int g_writer_stop, g_writer_done;
static atomic_ulong g_writer_sweeps;  // complete sweeps; the pages' counter
static double g_writer_deadline;      // the watchdog's time: set before start

/* Rewrites every hot page (its counter) once per sweep, about every
 * millisecond, until told to stop; stops only between sweeps, so every hot
 * page ends holding the same counter. Bounded by the watchdog's time. */
static void* Writer(void* arg) {
  struct Workload* w = arg;
  const struct Buffer* b = &w->buf[w->nbuf - 1];
  uint64_t sweep = 0;
  while (!atomic_load(&g_writer_stop) && now_seconds() < g_writer_deadline) {
    ++sweep;
    for (size_t i = w->hot_first; i < w->hot_first + w->hot_count; ++i) {
      volatile uint64_t* counter = (volatile uint64_t*)(b->mem + i * PAGE + 8);
      *counter = sweep;
    }
    atomic_store(&g_writer_sweeps, sweep);
    SleepUs(1000);
  }
  atomic_store(&g_writer_done, 1);
  return NULL;
}

/* --- content ------------------------------------------------------------- */

static void Fill(struct Workload* w) {
  for (int k = 0; k < w->nbuf; ++k) {
    for (size_t i = 0; i < w->buf[k].pages; ++i) {
      MakePage(w->buf[k].mem + i * PAGE, w->buf[k].keys[i], 0);
    }
  }
}

/* Pages of buffer 0 that the copy-on-write measurement writes. */
static size_t CowPages(const struct Workload* w) {
  if (w->spec->cow_pages < 0) return w->buf[0].pages;
  return (size_t)w->spec->cow_pages < w->buf[0].pages
             ? (size_t)w->spec->cow_pages
             : w->buf[0].pages;
}

/* Every page against its key; the first `flipped` pages of buffer 0 have byte
 * 100 inverted by the copy-on-write measurement. 0 if all match. */
static int Verify(const struct Workload* w, size_t flipped,
                  uint64_t hot_counter) {
  static unsigned char want[PAGE];
  for (int k = 0; k < w->nbuf; ++k) {
    for (size_t i = 0; i < w->buf[k].pages; ++i) {
      MakePage(want, w->buf[k].keys[i], hot_counter);
      if (k == 0 && i < flipped) want[100] ^= 1;
      const unsigned char* got = w->buf[k].mem + i * PAGE;
      if (memcmp(got, want, PAGE) != 0) {
        size_t at = 0;
        while (got[at] == want[at]) ++at;
        fprintf(stderr,
                "workload %s: WRONG CONTENT in buffer %d page %zu byte %zu: "
                "0x%02x, want 0x%02x\n",
                w->spec->id, k, i, at, got[at], want[at]);
        return -1;
      }
    }
  }
  return 0;
}

/* --- one measurement ------------------------------------------------------ */

struct Result {
  const char* status;  // converged | stalled | timeout
  double converge_s, cpu_s;
  long saved, zero, shared, scans, rmap_items, merging, vmas;
  size_t expect_sharing, expect_zero;
  double meta_bytes, cow_us, cow_p50_us;
  double unmerge_s;   /* run=2 until the counters are back at the baseline */
  long vmas_unmerged; /* VMAs added, counted after that unmerge */
  size_t cow_pages;
  int cpu_found, contents_ok;
};

/* What the counters read before run=1: kernel KSM's are global, so a run
 * counts from there. */
struct Baseline {
  long sharing, zero, scans, vmas;
  struct mallinfo2 heap;
  double t, cpu;
};

static long SavedNow(const struct Workload* w, const struct Baseline* b,
                     long* sharing, long* zero) {
  *sharing = ReadKsm("pages_sharing") - b->sharing;
  *zero = w->spec->use_zero_pages ? ReadKsm("ksm_zero_pages") - b->zero : 0;
  return *sharing + *zero;
}

/* The merger's thread into `task` (a /proc directory): kernel ksmd, or this
 * process's samepage-ksmd. 0, or -1 (task left empty) if there is none. */
static int FindMerger(int kernel, char* task, size_t size) {
  const int found =
      kernel ? FindTask("/proc", "ksmd", task, size)
             : FindTask("/proc/self/task", "samepage-ksmd", task, size);
  if (found != 0) task[0] = '\0';
  return found;
}

static double MergerCpu(const char* task) {
  return task[0] ? TaskCpu(task) : 0;
}

/* --pages-to-scan and --sleep-ms; 0 and -1: the defaults below. */
static long g_pages_to_scan = 0;
static long g_sleep_ms = -1;

/* The same knobs for both mergers (issue 4): pages_to_scan = min(N, 30000),
 * sleep_millisecs = 0 (or the two given), max_page_sharing = 256,
 * smart_scan = 1, the workload's use_zero_pages, no advisor. Leaves run=0. */
static int SetKnobs(const struct Workload* w, size_t n) {
  char pages_to_scan[32], sleep_ms[32];
  if (g_pages_to_scan > 0) {
    snprintf(pages_to_scan, sizeof(pages_to_scan), "%ld", g_pages_to_scan);
  } else {
    snprintf(pages_to_scan, sizeof(pages_to_scan), "%zu", n < 30000 ? n : 30000);
  }
  snprintf(sleep_ms, sizeof(sleep_ms), "%ld", g_sleep_ms >= 0 ? g_sleep_ms : 0);
  const char* adv = SavedKnob("advisor_mode");
  if (WriteKsm("run", "0") != 0 ||
      (adv != NULL && strcmp(adv, "none") != 0 &&
       WriteKsm("advisor_mode", "none") != 0) ||
      WriteKsm("pages_to_scan", pages_to_scan) != 0 ||
      WriteKsm("sleep_millisecs", sleep_ms) != 0 ||
      WriteKsm("max_page_sharing", "256") != 0 ||
      WriteKsm("use_zero_pages", w->spec->use_zero_pages ? "1" : "0") != 0 ||
      WriteKsm("smart_scan", "1") != 0) {
    return -1;
  }
  return 0;
}

/* Polls from run=1 until the expected pages are saved (unique: until three
 * full scans are done), the savings stop growing, or `timeout` passes. Only
 * what decides is read each time; full_scans every 20 ms (unique: every
 * time). Under samepage a read shows the counters as of the scanner's last
 * merges or full scan's end (published as they change, as the kernel's). */
static void WaitConverged(const struct Workload* w, const char* task,
                          const struct Baseline* b, double timeout,
                          struct Result* r) {
  long last_saved = -1, scans = b->scans, scans_at_change = b->scans;
  double t_change = b->t, cpu_change = b->cpu, next_scans_read = b->t;
  double t_scan1 = -1, cpu_scan1 = 0;
  for (;;) {
    const double t = now_seconds();
    if (w->spec->unique || t >= next_scans_read) {
      scans = ReadKsm("full_scans");
      next_scans_read = t + 0.02;
    }
    if (w->spec->unique) {
      // Per full scan: scans 2 and 3 (the first one allocates metadata).
      if (t_scan1 < 0 && scans >= b->scans + 1) {
        t_scan1 = now_seconds();
        cpu_scan1 = MergerCpu(task);
      }
      if (scans >= b->scans + 3) {
        // (Scan 1's end unseen between two polls: all three scans, then.)
        const int n = t_scan1 < 0 ? 3 : 2;
        r->status = "converged";
        r->converge_s = (now_seconds() - (n == 3 ? b->t : t_scan1)) / n;
        r->cpu_s = (MergerCpu(task) - (n == 3 ? b->cpu : cpu_scan1)) / n;
        return;
      }
    } else {
      long sharing, zero;
      const long saved = SavedNow(w, b, &sharing, &zero);
      if (saved != last_saved) {
        last_saved = saved;
        t_change = now_seconds();
        cpu_change = MergerCpu(task);
        scans_at_change = scans;
      }
      if (sharing >= (long)r->expect_sharing && zero >= (long)r->expect_zero) {
        r->status = "converged";
        r->converge_s = t_change - b->t;
        r->cpu_s = cpu_change - b->cpu;
        return;
      }
      // Stalled: no change for three full scans (e.g. samepage out of VMA
      // budget); the time and CPU are those of the last change.
      if (scans >= b->scans + 4 && scans >= scans_at_change + 3) {
        r->status = "stalled";
        r->converge_s = t_change - b->t;
        r->cpu_s = cpu_change - b->cpu;
        return;
      }
    }
    if (t - b->t > timeout) {
      r->status = "timeout";
      r->converge_s = t - b->t;
      r->cpu_s = MergerCpu(task) - b->cpu;
      return;
    }
    SleepUs(500);
  }
}

/* Counters, VMAs and metadata, with the scanner stopped. Kernel: slab objects
 * (the ksm caches share a 64-byte slab with others here, so a slabinfo delta
 * would count strangers): this process's rmap items, and stable nodes (one
 * per KSM page kept, one per chain head). samepage: the heap's growth. */
static void MeasureFootprint(const struct Workload* w, int kernel,
                             const struct Baseline* b, struct Result* r) {
  const struct mallinfo2 heap = mallinfo2();
  r->vmas = CountVmas() - b->vmas;
  long sharing;
  r->saved = SavedNow(w, b, &sharing, &r->zero);
  r->shared = ReadKsm("pages_shared");
  r->scans = ReadKsm("full_scans") - b->scans;
  r->rmap_items = KsmStat("ksm_rmap_items");
  r->merging = KsmStat("ksm_merging_pages");
  if (kernel) {
    char text[64];
    long rmap_size = 64, node_size = 64;
    if (read_text("/sys/kernel/slab/ksm_rmap_item/slab_size", text,
                  sizeof(text)) > 0) {
      rmap_size = strtol(text, NULL, 10);
    }
    if (read_text("/sys/kernel/slab/ksm_stable_node/slab_size", text,
                  sizeof(text)) > 0) {
      node_size = strtol(text, NULL, 10);
    }
    const long nodes = r->shared + ReadKsm("stable_node_chains");
    r->meta_bytes = (double)(r->rmap_items * rmap_size + nodes * node_size);
  } else {
    r->meta_bytes = (double)(heap.uordblks + heap.hblkhd) -
                    (double)(b->heap.uordblks + b->heap.hblkhd);
  }
}

/* Stops the writer (between sweeps, bounded) and returns the counter every
 * hot page holds; -1 if it did not stop. */
static long StopWriter(const struct Workload* w) {
  if (w->hot_count == 0) return 0;
  atomic_store(&g_writer_stop, 1);
  for (double end = now_seconds() + 10;
       !atomic_load(&g_writer_done) && now_seconds() < end;) {
    SleepUs(1000);
  }
  if (!atomic_load(&g_writer_done)) {
    fprintf(stderr, "workload: the writer thread did not stop in 10 s\n");
    return -1;
  }
  return (long)atomic_load(&g_writer_sweeps);
}

/* The result line compare.cc parses: key=value, space-separated. */
static void PrintResult(const struct Workload* w, const char* merger,
                        const struct Result* r) {
  size_t tracked = 0;
  for (int k = 0; k < w->nbuf; ++k) tracked += w->buf[k].pages;
  const long expect = (long)(r->expect_sharing + r->expect_zero);
  char max_map_count[32] = "0";
  read_text("/proc/sys/vm/max_map_count", max_map_count, sizeof(max_map_count));
  printf(
      "samepage-bench workload=%s merger=%s pages=%zu status=%s "
      "converge_s=%.6f cpu_s=%.6f cpu_found=%d saved=%ld expect=%ld "
      "skipped=%ld zero=%ld shared=%ld merging=%ld full_scans=%ld "
      "rmap_items=%ld meta_bytes=%.0f meta_per_page=%.2f vmas=%ld "
      "max_map_count=%ld cow_pages=%zu cow_us=%.3f cow_p50_us=%.3f "
      "unmerge_s=%.6f "
      "vmas_unmerged=%ld contents=%s\n",
      w->spec->id, merger, tracked, r->status, r->converge_s, r->cpu_s,
      r->cpu_found, r->saved, expect, expect > r->saved ? expect - r->saved : 0,
      r->zero, r->shared, r->merging, r->scans, r->rmap_items, r->meta_bytes,
      r->meta_bytes / (double)tracked, r->vmas, strtol(max_map_count, NULL, 10),
      r->cow_pages, r->cow_us, r->cow_p50_us, r->unmerge_s, r->vmas_unmerged,
      r->contents_ok ? "ok" : "WRONG");
  fflush(stdout);
}

static int Usage(void) {
  fprintf(stderr,
          "usage: samepage_workload --workload ID [--scale S] [--timeout SEC]"
          " [--merger kernel|samepage|auto]\n"
          "                         [--pages-to-scan N] [--sleep-ms MS]\n"
          "       samepage_workload --list\n");
  return 2;
}

/* Restores the knobs on signals (native runs) and arms the watchdog. Under
 * samepage the knobs are this process's own and die with it, and a signal
 * handler must not call into its engine: the signals keep their defaults. */
static void InstallExits(int kernel, double watchdog_s) {
  atexit(RestoreKnobs);
  if (kernel) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = OnSignal;
    const int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGALRM};
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); ++i) {
      sigaction(sigs[i], &sa, NULL);
    }
  }
  alarm((unsigned)watchdog_s);
}

int main(int argc, char** argv) {
  const char* id = NULL;
  const char* merger = "auto";
  double scale = 1.0, timeout = 60;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--list") == 0) {
      for (int k = 0; k < kNumSpecs; ++k) {
        printf("%s\t%zu\t%s\n", g_specs[k].id, g_specs[k].full_pages,
               g_specs[k].title);
      }
      return 0;
    }
    if (v == NULL) return Usage();
    if (strcmp(a, "--workload") == 0) {
      id = v;
    } else if (strcmp(a, "--scale") == 0) {
      scale = strtod(v, NULL);
    } else if (strcmp(a, "--timeout") == 0) {
      timeout = strtod(v, NULL);
    } else if (strcmp(a, "--merger") == 0) {
      merger = v;
    } else if (strcmp(a, "--pages-to-scan") == 0) {
      g_pages_to_scan = strtol(v, NULL, 10);
      if (g_pages_to_scan <= 0) return Usage();
    } else if (strcmp(a, "--sleep-ms") == 0) {
      g_sleep_ms = strtol(v, NULL, 10);
      if (g_sleep_ms < 0) return Usage();
    } else {
      return Usage();
    }
    ++i;
  }
  static struct Workload workload;
  struct Workload* w = &workload;
  for (int k = 0; k < kNumSpecs && id != NULL; ++k) {
    if (strcmp(g_specs[k].id, id) == 0) w->spec = &g_specs[k];
  }
  if (w->spec == NULL || !(scale > 0) || !(timeout > 0)) return Usage();
  const char* pre = getenv("LD_PRELOAD");
  const int under_samepage = pre != NULL && strstr(pre, "samepage") != NULL;
  if (strcmp(merger, "auto") == 0)
    merger = under_samepage ? "samepage" : "kernel";
  const int kernel = strcmp(merger, "kernel") == 0;
  if (!kernel && strcmp(merger, "samepage") != 0) return Usage();
  if (kernel == under_samepage) {
    // Under `samepage run` the KSM files are samepage's, so a kernel
    // measurement would time an idle ksmd while samepage merges; outside
    // it, there is no samepage to measure.
    fprintf(stderr, "workload: --merger %s needs to run %s `samepage run`\n",
            merger, kernel ? "outside" : "under");
    return 2;
  }

  const int probe = open(KSM_DIR "run", O_WRONLY | O_CLOEXEC);
  if (probe < 0) {
    printf("SKIP %s: " KSM_DIR "run not writable (%s)\n", w->spec->id,
           strerror(errno));
    return kernel ? SKIP_CODE : 1;
  }
  close(probe);

  // Every way out from here restores the knobs.
  if (SaveKnobs() != 0) return 1;
  const double watchdog_s = 2 * timeout + 120;
  InstallExits(kernel, watchdog_s);
  g_writer_deadline = now_seconds() + watchdog_s;

  // Size, build and fill; what should be saved; the knobs.
  size_t n = (size_t)((double)w->spec->full_pages * scale);
  n = (n < 64 ? 64 : n) & ~(size_t)15;
  w->spec->build(w, n);
  Fill(w);
  struct Result r = {.status = "timeout"};
  Expected(w, &r.expect_sharing, &r.expect_zero);
  if (SetKnobs(w, n) != 0) return 1;

  // The merger's thread; under `samepage run` it exists from start-up (its
  // run=1 starts it), otherwise it is looked for again after run=1.
  char task[256] = "";
  FindMerger(kernel, task, sizeof(task));
  if (w->hot_count > 0) {
    pthread_t t;
    if (pthread_create(&t, NULL, Writer, w) != 0 || pthread_detach(t) != 0) {
      fprintf(stderr, "workload: pthread_create failed\n");
      return 1;
    }
  }

  // Baselines; from here to MeasureFootprint, no malloc of our own.
  struct Baseline b;
  b.sharing = ReadKsm("pages_sharing");
  b.zero = ReadKsm("ksm_zero_pages");
  if (kernel && (b.sharing != 0 || b.zero != 0)) {
    fprintf(stderr,
            "workload: note: kernel KSM already shares %ld pages (%ld zero); "
            "counting from there\n",
            b.sharing, b.zero);
  }
  b.heap = mallinfo2();
  b.vmas = CountVmas();
  for (int k = 0; k < w->nbuf; ++k) {
    if (madvise(w->buf[k].mem, w->buf[k].pages * PAGE, MADV_MERGEABLE) != 0) {
      fprintf(stderr, "workload: madvise(MADV_MERGEABLE): %s\n",
              strerror(errno));
      return 1;
    }
  }
  b.scans = ReadKsm("full_scans");
  b.cpu = MergerCpu(task);
  b.t = now_seconds();
  if (WriteKsm("run", "1") != 0) return 1;
  if (!task[0]) {  // a thread started by run=1 has used nothing before it
    for (double end = now_seconds() + 1; !task[0] && now_seconds() < end;) {
      if (FindMerger(kernel, task, sizeof(task)) != 0) SleepUs(1000);
    }
  }
  r.cpu_found = task[0] != 0;

  WaitConverged(w, task, &b, timeout, &r);
  if (WriteKsm("run", "0") != 0) return 1;
  MeasureFootprint(w, kernel, &b, &r);

  // Contents with the writer stopped; then copy-on-write, one write to each
  // of the first pages (merged ones where the workload sets cow_pages);
  // then unmerge (run=2 is synchronous; the counters are awaited, bounded).
  // Every page is checked after each step.
  const long hot_counter = StopWriter(w);
  if (hot_counter < 0) return 1;
  r.contents_ok = Verify(w, 0, (uint64_t)hot_counter) == 0;
  r.cow_pages = r.saved > 0 ? CowPages(w) : 0;
  if (r.cow_pages > 0) {
    // Each write timed too: the median write is the latency, steady where a
    // host's interruptions move the mean (cow_us, the loop's time per write).
    double* us = malloc(r.cow_pages * sizeof(double));
    if (us == NULL) return 1;
    const double c0 = now_seconds();
    for (size_t i = 0; i < r.cow_pages; ++i) {
      const double t0 = now_seconds();
      w->buf[0].mem[i * PAGE + 100] ^= 1;
      us[i] = (now_seconds() - t0) * 1e6;
    }
    r.cow_us = (now_seconds() - c0) * 1e6 / (double)r.cow_pages;
    qsort(us, r.cow_pages, sizeof(double), CompareDoubles);
    r.cow_p50_us = us[r.cow_pages / 2];
    free(us);
    r.contents_ok &= Verify(w, r.cow_pages, (uint64_t)hot_counter) == 0;
  }
  const double unmerge_start = now_seconds();
  WriteKsm("run", "2");
  for (double end = now_seconds() + 30; now_seconds() < end; SleepUs(1000)) {
    if (ReadKsm("pages_sharing") <= b.sharing &&
        ReadKsm("ksm_zero_pages") <= b.zero) {
      break;
    }
  }
  r.unmerge_s = now_seconds() - unmerge_start;
  r.vmas_unmerged = CountVmas() - b.vmas;
  r.contents_ok &= Verify(w, r.cow_pages, (uint64_t)hot_counter) == 0;

  PrintResult(w, merger, &r);
  for (int k = 0; k < w->nbuf; ++k) {
    munmap(w->buf[k].mem - PAGE, (w->buf[k].pages + 2) * PAGE);
  }
  RestoreKnobs();
  return r.contents_ok ? 0 : 1;
}
