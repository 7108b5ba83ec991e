// Directory listing of /sys/kernel/mm/ksm under `samepage run`: opendir,
// readdir, readdir64, readdir_r, readdir64_r, rewinddir, telldir, seekdir,
// closedir, scandir and scandir64 list samepage's files (KsmFileNames(),
// plus "." and ".."), whether or not the kernel has KSM.
//
// opendir of that directory (absolute path, trailing slashes allowed)
// returns a real DIR* of "/" that carries no entries of its own: a slot in a
// small table marks it as ours and holds the read position; the readdir
// family serves our entries from the slot. dirfd() of it names "/".
// glibc's scandir reads through internal calls, so scandir of the directory
// is answered here in full (filter, sort, malloc'd entries as glibc does).
// Not covered: relative paths, fdopendir/openat of the directory, fts (find).
//
// Thread safety: the table is guarded by a mutex; the fast path (no listing
// open) is one atomic load. One DIR* is not read by two threads at once by a
// correct program (POSIX leaves readdir on one stream unsynchronised).

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <string_view>

#include "api/sysfs_text.h"
#include "preload/real.h"

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

namespace samepage::preload {
namespace {

constexpr int kSlots = 32;

struct Slot {
  DIR* dir = nullptr;
  long pos = 0;       // next entry: 0 ".", 1 "..", 2 + i name i
  struct dirent64 ent;
};

pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
Slot g_slots[kSlots];             // guarded by g_mu
std::atomic<int> g_open{0};       // slots in use: the fast path

struct Real {
  DIR* (*opendir)(const char*);
  int (*closedir)(DIR*);
  struct dirent* (*readdir)(DIR*);
  struct dirent64* (*readdir64)(DIR*);
  int (*readdir_r)(DIR*, struct dirent*, struct dirent**);
  int (*readdir64_r)(DIR*, struct dirent64*, struct dirent64**);
  void (*rewinddir)(DIR*);
  long (*telldir)(DIR*);
  void (*seekdir)(DIR*, long);
  int (*scandir)(const char*, struct dirent***, int (*)(const struct dirent*),
                 int (*)(const struct dirent**, const struct dirent**));
  int (*scandir64)(const char*, struct dirent64***,
                   int (*)(const struct dirent64*),
                   int (*)(const struct dirent64**, const struct dirent64**));
};

template <typename F>
F Next(const char* name) {
  Inside inside;  // dlsym may allocate or open
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}

const Real& R() {
  static const Real r = {
      Next<decltype(Real::opendir)>("opendir"),
      Next<decltype(Real::closedir)>("closedir"),
      Next<decltype(Real::readdir)>("readdir"),
      Next<decltype(Real::readdir64)>("readdir64"),
      Next<decltype(Real::readdir_r)>("readdir_r"),
      Next<decltype(Real::readdir64_r)>("readdir64_r"),
      Next<decltype(Real::rewinddir)>("rewinddir"),
      Next<decltype(Real::telldir)>("telldir"),
      Next<decltype(Real::seekdir)>("seekdir"),
      Next<decltype(Real::scandir)>("scandir"),
      Next<decltype(Real::scandir64)>("scandir64"),
  };
  return r;
}

bool IsKsmDir(const char* path) {
  if (path == nullptr) return false;
  std::string_view p(path);
  while (p.size() > 1 && p.back() == '/') p.remove_suffix(1);
  return p == "/sys/kernel/mm/ksm";
}

long EntryCount() { return 2 + static_cast<long>(KsmFileNames().size()); }

// Fills *e with entry `pos` (0 ".", 1 "..", then the files).
void FillEntry(long pos, struct dirent64* e) {
  memset(e, 0, sizeof(*e));
  const char* name;
  if (pos < 2) {
    name = pos == 0 ? "." : "..";
    e->d_type = DT_DIR;
  } else {
    name = KsmFileNames()[pos - 2].data();  // literals end in '\0'
    e->d_type = DT_REG;
  }
  e->d_ino = 1000 + pos;
  e->d_off = pos + 1;
  e->d_reclen = sizeof(*e);
  snprintf(e->d_name, sizeof(e->d_name), "%s", name);
}

// The slot of `dir`, or null. REQUIRES: g_mu held.
Slot* FindLocked(DIR* dir) {
  for (Slot& s : g_slots) {
    if (s.dir == dir && dir != nullptr) return &s;
  }
  return nullptr;
}

bool Mine(DIR* dir) {
  return g_open.load(std::memory_order_acquire) > 0 &&
         !Bypass(nullptr) && [&] {
           pthread_mutex_lock(&g_mu);
           const bool mine = FindLocked(dir) != nullptr;
           pthread_mutex_unlock(&g_mu);
           return mine;
         }();
}

// Next entry of our stream, or null at the end.
struct dirent64* ReadMine(DIR* dir) {
  pthread_mutex_lock(&g_mu);
  Slot* s = FindLocked(dir);
  struct dirent64* e = nullptr;
  if (s != nullptr && s->pos < EntryCount()) {
    FillEntry(s->pos++, &s->ent);
    e = &s->ent;
  }
  pthread_mutex_unlock(&g_mu);
  return e;
}

template <typename Dirent>
int Scan(Dirent*** list, int (*filter)(const Dirent*),
         int (*compar)(const Dirent**, const Dirent**)) {
  const long n = EntryCount();
  auto** out = static_cast<Dirent**>(malloc(sizeof(Dirent*) * n));
  if (out == nullptr) return -1;  // errno ENOMEM from malloc
  int kept = 0;
  for (long pos = 0; pos < n; ++pos) {
    struct dirent64 e;
    FillEntry(pos, &e);
    auto* d = reinterpret_cast<Dirent*>(&e);
    if (filter != nullptr && !filter(d)) continue;
    auto* copy = static_cast<Dirent*>(malloc(sizeof(Dirent)));
    if (copy == nullptr) {
      while (kept > 0) free(out[--kept]);
      free(out);
      errno = ENOMEM;
      return -1;
    }
    memcpy(copy, d, sizeof(Dirent));
    out[kept++] = copy;
  }
  if (compar != nullptr) {
    qsort(out, kept, sizeof(Dirent*),
          reinterpret_cast<int (*)(const void*, const void*)>(compar));
  }
  *list = out;
  return kept;
}

}  // namespace
}  // namespace samepage::preload

using namespace samepage::preload;

static_assert(sizeof(struct dirent) == sizeof(struct dirent64),
              "x86-64: readdir and readdir64 share one layout");

SAMEPAGE_EXPORT DIR* opendir(const char* path) {
  if (!IsKsmDir(path) || Bypass(__builtin_return_address(0))) {
    return R().opendir(path);
  }
  DIR* dir = R().opendir("/");
  if (dir == nullptr) return nullptr;
  pthread_mutex_lock(&g_mu);
  Slot* s = nullptr;
  for (Slot& slot : g_slots) {
    if (slot.dir == nullptr) {
      s = &slot;
      break;
    }
  }
  if (s != nullptr) {
    s->dir = dir;
    s->pos = 0;
    g_open.fetch_add(1, std::memory_order_acq_rel);
  }
  pthread_mutex_unlock(&g_mu);
  if (s == nullptr) {
    R().closedir(dir);
    errno = EMFILE;
    return nullptr;
  }
  return dir;
}

SAMEPAGE_EXPORT int closedir(DIR* dir) {
  if (g_open.load(std::memory_order_acquire) > 0) {
    pthread_mutex_lock(&g_mu);
    if (Slot* s = FindLocked(dir)) {
      s->dir = nullptr;
      g_open.fetch_sub(1, std::memory_order_acq_rel);
    }
    pthread_mutex_unlock(&g_mu);
  }
  return R().closedir(dir);
}

SAMEPAGE_EXPORT struct dirent64* readdir64(DIR* dir) {
  if (Mine(dir)) return ReadMine(dir);
  return R().readdir64(dir);
}

SAMEPAGE_EXPORT struct dirent* readdir(DIR* dir) {
  if (Mine(dir)) return reinterpret_cast<struct dirent*>(ReadMine(dir));
  return R().readdir(dir);
}

SAMEPAGE_EXPORT int readdir64_r(DIR* dir, struct dirent64* entry,
                                struct dirent64** result) {
  if (!Mine(dir)) return R().readdir64_r(dir, entry, result);
  struct dirent64* e = ReadMine(dir);
  if (e != nullptr) memcpy(entry, e, sizeof(*entry));
  *result = e != nullptr ? entry : nullptr;
  return 0;
}

SAMEPAGE_EXPORT int readdir_r(DIR* dir, struct dirent* entry,
                              struct dirent** result) {
  if (!Mine(dir)) return R().readdir_r(dir, entry, result);
  struct dirent64* e = ReadMine(dir);
  if (e != nullptr) memcpy(entry, e, sizeof(*entry));
  *result = e != nullptr ? entry : nullptr;
  return 0;
}

SAMEPAGE_EXPORT void rewinddir(DIR* dir) {
  if (!Mine(dir)) return R().rewinddir(dir);
  seekdir(dir, 0);
}

SAMEPAGE_EXPORT long telldir(DIR* dir) {
  if (!Mine(dir)) return R().telldir(dir);
  pthread_mutex_lock(&g_mu);
  Slot* s = FindLocked(dir);
  const long pos = s != nullptr ? s->pos : -1;
  pthread_mutex_unlock(&g_mu);
  return pos;
}

SAMEPAGE_EXPORT void seekdir(DIR* dir, long pos) {
  if (!Mine(dir)) return R().seekdir(dir, pos);
  pthread_mutex_lock(&g_mu);
  if (Slot* s = FindLocked(dir)) s->pos = pos < 0 ? 0 : pos;
  pthread_mutex_unlock(&g_mu);
}

SAMEPAGE_EXPORT int scandir(
    const char* path, struct dirent*** list,
    int (*filter)(const struct dirent*),
    int (*compar)(const struct dirent**, const struct dirent**)) {
  if (IsKsmDir(path) && !Bypass(__builtin_return_address(0))) {
    return Scan(list, filter, compar);
  }
  return R().scandir(path, list, filter, compar);
}

SAMEPAGE_EXPORT int scandir64(
    const char* path, struct dirent64*** list,
    int (*filter)(const struct dirent64*),
    int (*compar)(const struct dirent64**, const struct dirent64**)) {
  if (IsKsmDir(path) && !Bypass(__builtin_return_address(0))) {
    return Scan(list, filter, compar);
  }
  return R().scandir64(path, list, filter, compar);
}
