#include "preload/ksm_files.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <string_view>

#include "api/sysfs_text.h"
#include "backend/proc_fs.h"
#include "preload/real.h"
#include "samepage/samepage.h"

namespace samepage::preload {
namespace {

constexpr std::string_view kSysfsDir = "/sys/kernel/mm/ksm/";
constexpr std::string_view kProc = "/proc/";
constexpr std::size_t kChunk = 4096;  // sysfs text is at most a page

// Descriptors beyond this are never ours: OpenKsm refuses them (EMFILE).
constexpr int kMaxFds = 16384;

struct Slot {
  std::atomic<std::uint8_t> kind{0};  // a Target; 0 = not ours
  std::uint8_t name = 0;              // kSysfs: index in KsmFileNames()
  std::uint8_t acc = 0;               // O_RDONLY, O_WRONLY or O_RDWR
  bool stdio_write = false;           // a FILE writes into the memfd
  FILE* file = nullptr;               // the FILE over this descriptor
  dev_t dev = 0;                      // identity of our file
  ino_t ino = 0;
  off_t consumed = 0;  // stdio_write: bytes already handed to samepage
};

Slot g_slots[kMaxFds];

Slot* SlotOf(int fd) {
  if (fd < 0 || fd >= kMaxFds) return nullptr;
  Slot* s = &g_slots[fd];
  return s->kind.load(std::memory_order_acquire) == 0 ? nullptr : s;
}

// The slot of fd if fd still names the file we opened; drops a stale one.
Slot* LiveSlot(int fd) {
  Slot* s = SlotOf(fd);
  if (s == nullptr) return nullptr;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_dev != s->dev || st.st_ino != s->ino) {
    s->kind.store(0, std::memory_order_release);
    return nullptr;
  }
  return s;
}

Target KindOf(const Slot* s) {
  return static_cast<Target>(s->kind.load(std::memory_order_acquire));
}

int Fail(int err) {
  errno = err;
  return -1;
}

int SysfsIndex(std::string_view name) {
  const auto names = KsmFileNames();
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<int>(i);
  }
  return -1;
}

const char* SysfsName(int index) {
  return KsmFileNames()[index].data();  // the table's literals end in '\0'
}

// An absolute path, classified. Paths are taken literally (no "//" or "..").
Target ClassifyAbsolute(std::string_view p, int* name_index) {
  if (p.starts_with(kSysfsDir)) {
    std::string_view name = p.substr(kSysfsDir.size());
    if (name.empty() || name.find('/') != std::string_view::npos) {
      return Target::kNone;  // the directory itself, or deeper
    }
    *name_index = SysfsIndex(name);
    return *name_index < 0 ? Target::kSysfsMissing : Target::kSysfs;
  }
  if (p == "/dev/ksm") return Target::kDevKsm;
  if (!p.starts_with(kProc)) return Target::kNone;
  std::string_view rest = p.substr(kProc.size());
  const std::size_t slash = rest.find('/');
  if (slash == std::string_view::npos) return Target::kNone;
  std::string_view who = rest.substr(0, slash);
  std::string_view file = rest.substr(slash + 1);
  if (file != "ksm_stat" && file != "ksm_merging_pages") return Target::kNone;
  if (who != "self") {
    char pid[24];
    const int n = snprintf(pid, sizeof(pid), "%d", static_cast<int>(getpid()));
    if (who != std::string_view(pid, n)) return Target::kNone;
  }
  return file == "ksm_stat" ? Target::kKsmStat : Target::kMergingPages;
}

// Fills the memfd with the file's current text, offset unchanged.
int Refill(int fd, const Slot* s) {
  char text[kChunk];
  ssize_t n;
  {
    Inside inside;
    EnsureStarted();
    switch (KindOf(s)) {
      case Target::kSysfs:
        n = samepage_sysfs_read(SysfsName(s->name), text, sizeof(text));
        break;
      case Target::kKsmStat:
        n = samepage_ksm_stat(text, sizeof(text));
        break;
      case Target::kMergingPages:
        n = samepage_ksm_merging_pages(text, sizeof(text));
        break;
      default:
        return 0;
    }
  }
  if (n < 0) return errno;
  if (ftruncate(fd, 0) != 0) return errno;
  if (n > 0 && RealPwrite(fd, text, static_cast<size_t>(n), 0) != n) {
    return errno != 0 ? errno : EIO;
  }
  return 0;
}

void Record(int fd, Target target, int name_index, int acc) {
  Slot* s = &g_slots[fd];
  struct stat st;
  if (fstat(fd, &st) == 0) {
    s->dev = st.st_dev;
    s->ino = st.st_ino;
  }
  s->name = static_cast<std::uint8_t>(name_index < 0 ? 0 : name_index);
  s->acc = static_cast<std::uint8_t>(acc);
  s->stdio_write = false;
  s->file = nullptr;
  s->consumed = 0;
  s->kind.store(static_cast<std::uint8_t>(target), std::memory_order_release);
}

// A relative path can name a KSM file only if it mentions ksm or ends in the
// name of a sysfs file ("run" opened in /sys/kernel/mm/ksm).
bool MayBeKsm(const char* path) {
  if (strstr(path, "ksm") != nullptr) return true;
  const char* base = strrchr(path, '/');
  return SysfsIndex(base == nullptr ? path : base + 1) >= 0;
}

}  // namespace

Target Classify(int dirfd, const char* path, int* name_index) {
  if (path == nullptr) return Target::kNone;
  if (path[0] == '/') {
    // Fast rejection of almost every path.
    if (path[1] != 's' && path[1] != 'p' && path[1] != 'd') {
      return Target::kNone;
    }
    return ClassifyAbsolute(path, name_index);
  }
  if (!MayBeKsm(path)) return Target::kNone;
  char dir[PATH_MAX];
  if (dirfd == AT_FDCWD) {
    if (getcwd(dir, sizeof(dir)) == nullptr) return Target::kNone;
  } else {
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
    const ssize_t n =
        samepage::backend::ReadlinkProc(link, dir, sizeof(dir) - 1);
    if (n <= 0) return Target::kNone;
    dir[n] = '\0';
  }
  char full[PATH_MAX];
  const int n = snprintf(full, sizeof(full), "%s/%s",
                         strcmp(dir, "/") == 0 ? "" : dir, path);
  if (n <= 0 || n >= static_cast<int>(sizeof(full))) return Target::kNone;
  // "./run" and "ksm/run" are the common relative spellings.
  std::string_view p(full, n);
  std::string_view dot = "/./";
  if (const auto at = p.find(dot); at != std::string_view::npos) {
    memmove(full + at, full + at + 2, n - at - 1);
    p = std::string_view(full, n - 2);
  }
  return ClassifyAbsolute(p, name_index);
}

int OpenKsm(Target target, int name_index, int flags) {
  const int acc = flags & O_ACCMODE;
  if (target == Target::kDevKsm) {
    int fd;
    {
      Inside inside;
      EnsureStarted();
      fd = samepage_devksm_open();
    }
    if (fd < 0) return -1;
    if (fd >= kMaxFds) {
      Inside inside;
      samepage_devksm_close(fd);
      return Fail(EMFILE);
    }
    Record(fd, target, -1, O_RDWR);
    NoteAdvised();
    return fd;
  }
  // The kernel's answers, checked on Linux 6.18 (see tests/preload).
  if (target == Target::kSysfsMissing) {
    return Fail((flags & O_CREAT) ? EACCES : ENOENT);
  }
  if ((flags & O_CREAT) && (flags & O_EXCL)) return Fail(EEXIST);
  if (flags & O_DIRECTORY) return Fail(ENOTDIR);
  if (acc != O_RDONLY) {
    if (target == Target::kSysfs && !IsWritableKnob(SysfsName(name_index))) {
      return Fail(EACCES);  // 0444 counters: even root cannot open them
    }
    // /proc/<pid>/ksm_* are 0444: only root's DAC override opens them for
    // writing (and every write then fails with EINVAL).
    if (target != Target::kSysfs && geteuid() != 0) return Fail(EACCES);
  }
  const int fd = memfd_create(target == Target::kSysfs ? "samepage-ksm-sysfs"
                                                       : "samepage-ksm-proc",
                              (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
  if (fd < 0) return -1;
  if (fd >= kMaxFds) {
    RealClose(fd);
    return Fail(EMFILE);
  }
  Record(fd, target, name_index, acc);
  if (acc != O_WRONLY) {
    if (const int err = Refill(fd, &g_slots[fd]); err != 0) {
      g_slots[fd].kind.store(0, std::memory_order_release);
      RealClose(fd);
      return Fail(err);
    }
  }
  return fd;
}

bool IsOurs(int fd) { return SlotOf(fd) != nullptr; }

bool IsDevKsm(int fd) {
  Slot* s = SlotOf(fd);
  return s != nullptr && KindOf(s) == Target::kDevKsm;
}

ssize_t ReadKsm(int fd, void* buf, size_t n) {
  Slot* s = LiveSlot(fd);
  if (s == nullptr || KindOf(s) == Target::kDevKsm) {
    return RealRead(fd, buf, n);
  }
  if (s->acc == O_WRONLY) return Fail(EBADF);
  if (lseek(fd, 0, SEEK_CUR) == 0) {
    if (const int err = Refill(fd, s); err != 0) return Fail(err);
  }
  return RealRead(fd, buf, n);
}

ssize_t PreadKsm(int fd, void* buf, size_t n, off_t off) {
  Slot* s = LiveSlot(fd);
  if (s == nullptr || KindOf(s) == Target::kDevKsm) {
    return RealPread(fd, buf, n, off);
  }
  if (s->acc == O_WRONLY) return Fail(EBADF);
  if (off < 0) return Fail(EINVAL);
  if (off == 0) {
    if (const int err = Refill(fd, s); err != 0) return Fail(err);
  }
  return RealPread(fd, buf, n, off);
}

ssize_t WriteKsm(int fd, const void* buf, size_t n) {
  Slot* s = LiveSlot(fd);
  if (s == nullptr || KindOf(s) == Target::kDevKsm) {
    return RealWrite(fd, buf, n);
  }
  if (s->acc == O_RDONLY) return Fail(EBADF);
  if (KindOf(s) != Target::kSysfs) return Fail(EINVAL);  // root-opened proc
  Inside inside;
  EnsureStarted();
  return samepage_sysfs_write(SysfsName(s->name),
                              static_cast<const char*>(buf), n);
}

int CloseKsm(int fd) {
  Slot* s = LiveSlot(fd);
  if (s == nullptr) return RealClose(fd);
  const Target kind = KindOf(s);
  s->kind.store(0, std::memory_order_release);
  if (kind == Target::kDevKsm) {
    Inside inside;
    if (samepage_devksm_close(fd) == 0) return 0;
  }
  return RealClose(fd);
}

int IoctlDevKsm(int fd, unsigned long request, void* arg) {
  int r;
  {
    Inside inside;
    if (!samepage_devksm_owns(fd)) {
      g_slots[fd].kind.store(0, std::memory_order_release);
      errno = ENOTTY;
      return -2;  // not ours after all: the caller passes it on
    }
    r = samepage_devksm_ioctl(fd, request, arg);
  }
  if (r > 0 && r < kMaxFds &&
      (request == KSM_CREATE_SHARED_MEMORY_AREA ||
       request == KSM_CREATE_SCAN)) {
    Record(r, Target::kDevKsm, -1, O_RDWR);
  }
  return r;
}

void NoteDup(int oldfd, int newfd) {
  if (newfd < 0 || newfd >= kMaxFds || oldfd == newfd) return;
  Slot* to = &g_slots[newfd];
  Slot* from = LiveSlot(oldfd);
  if (from == nullptr || KindOf(from) == Target::kDevKsm) {
    if (to->kind.load(std::memory_order_relaxed) != 0) {
      to->kind.store(0, std::memory_order_release);
    }
    return;
  }
  to->kind.store(0, std::memory_order_release);
  to->name = from->name;
  to->acc = from->acc;
  to->stdio_write = false;
  to->file = nullptr;
  to->dev = from->dev;
  to->ino = from->ino;
  to->consumed = 0;
  to->kind.store(from->kind.load(std::memory_order_relaxed),
                 std::memory_order_release);
}

FILE* FopenKsm(Target target, int name_index, const char* mode) {
  if (target == Target::kDevKsm) {
    errno = ENOENT;  // no stdio on the 2008 device: open(2) it
    return nullptr;
  }
  int flags = 0;
  bool write = false;
  switch (mode[0]) {
    case 'r': flags = O_RDONLY; break;
    case 'w': flags = O_WRONLY | O_CREAT | O_TRUNC; write = true; break;
    case 'a': flags = O_WRONLY | O_CREAT | O_APPEND; write = true; break;
    default: errno = EINVAL; return nullptr;
  }
  for (const char* m = mode + 1; *m != '\0' && *m != ','; ++m) {
    if (*m == '+') {
      flags = (flags & ~O_ACCMODE) | O_RDWR;
      write = true;
    } else if (*m == 'e') {
      flags |= O_CLOEXEC;
    } else if (*m == 'x') {
      flags |= O_EXCL;
    }
  }
  const int fd = OpenKsm(target, name_index, flags);
  if (fd < 0) return nullptr;
  Slot* s = &g_slots[fd];
  if (write) {
    // The memfd collects what stdio writes; start it empty ("r+" reads
    // nothing: a documented difference).
    if (ftruncate(fd, 0) != 0) {
      const int err = errno;
      CloseKsm(fd);
      errno = err;
      return nullptr;
    }
    s->stdio_write = true;
    s->consumed = 0;
  }
  if (g_real.fdopen == nullptr) ResolveReal();
  errno = ENOSYS;
  FILE* fp = g_real.fdopen != nullptr ? g_real.fdopen(fd, mode) : nullptr;
  if (fp == nullptr) {
    const int err = errno;
    CloseKsm(fd);
    errno = err;
    return nullptr;
  }
  s->file = fp;
  return fp;
}

void NoteFdopen(int fd, FILE* fp, const char* mode) {
  Slot* s = LiveSlot(fd);
  if (s == nullptr || fp == nullptr || KindOf(s) == Target::kDevKsm) return;
  s->file = fp;
  // Only stdio writes land in a write-only descriptor's memfd (write() and
  // pwrite() hand their bytes to samepage directly): collect them.
  if (s->acc == O_WRONLY && mode[0] != 'r') s->stdio_write = true;
}

int FlushOpenStdioKsm(bool flush_buffers) {
  int err = 0;
  for (int fd = 0; fd < kMaxFds; ++fd) {
    Slot* s = SlotOf(fd);
    if (s == nullptr || s->file == nullptr || !s->stdio_write) continue;
    // The FILE is used only while its descriptor is still the one it was
    // opened on (fclose, through our interposer, forgets it).
    FILE* fp = s->file;
    if (LiveSlot(fd) == nullptr || fileno(fp) != fd) continue;
    if (flush_buffers && g_real.fflush != nullptr) g_real.fflush(fp);
    const int e = FlushStdioKsm(fp, /*closing=*/false);
    if (e != 0 && err == 0) err = e;
  }
  return err;
}

void RefillIfRewound(FILE* fp) {
  const int fd = fileno(fp);
  Slot* s = LiveSlot(fd);
  if (s == nullptr || KindOf(s) == Target::kDevKsm || s->acc == O_WRONLY ||
      s->stdio_write) {
    return;
  }
  // glibc seeks within its buffer without lseek when it can; then the
  // kernel would not read again either.
  if (lseek(fd, 0, SEEK_CUR) == 0) (void)Refill(fd, s);
}

int FlushStdioKsm(FILE* fp, bool closing) {
  const int fd = fileno(fp);
  Slot* s = LiveSlot(fd);
  if (s == nullptr) return 0;
  int err = 0;
  if (s->stdio_write) {
    struct stat st;
    if (fstat(fd, &st) == 0) {
      char buf[kChunk];
      while (err == 0 && s->consumed < st.st_size) {
        const size_t want = static_cast<size_t>(
            std::min<off_t>(st.st_size - s->consumed, sizeof(buf)));
        const ssize_t got = RealPread(fd, buf, want, s->consumed);
        if (got <= 0) break;
        s->consumed += got;
        if (KindOf(s) != Target::kSysfs) {
          err = EINVAL;  // root-opened /proc/<pid>/ksm_*: as write() says
          break;
        }
        Inside inside;
        EnsureStarted();
        if (samepage_sysfs_write(SysfsName(s->name), buf,
                                 static_cast<size_t>(got)) < 0) {
          err = errno;
        }
      }
      s->consumed = st.st_size;  // a failed write is not retried
    }
  }
  if (closing) {
    s->file = nullptr;
    s->kind.store(0, std::memory_order_release);
  }
  return err;
}

}  // namespace samepage::preload
