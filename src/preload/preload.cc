// libsamepage_preload.so: the kernel KSM ABI, handed to samepage.
//
// Loaded with LD_PRELOAD (by `samepage run`), it puts the engine inside the
// program and interposes the entry points of kernel KSM:
//   madvise, process_madvise (on self)    MADV_MERGEABLE / MADV_UNMERGEABLE
//                                         -> samepage_madvise; MADV_DONTNEED,
//                                         MADV_FREE, MADV_REMOVE unmerge
//                                         first (anonymous-memory zeros)
//   prctl                                 PR_SET/GET_MEMORY_MERGE
//   open, open64, openat, openat64, __open_2, __open64_2, __openat_2,
//   __openat64_2, fopen, fopen64          KSM paths (ksm_files.h)
//   read, __read_chk, pread, pread64, __pread_chk, __pread64_chk, write,
//   pwrite, pwrite64, close, fflush, fclose, fdopen, rewind, fseek,
//   fseeko, fseeko64                          on our descriptors
//   ioctl                                 on /dev/ksm descriptors; KVM
//                                         and vhost memory registrations
//                                         (Engine::KernelWrites)
//   read, pread, readv, preadv, preadv2   on O_DIRECT descriptors: the
//                                         buffer is held back from merges
//                                         during the call (direct_io.h)
//   io_submit, io_getevents,              libaio's reads: held back from
//   io_pgetevents, io_destroy             merges until reaped (libaio.cc)
//   aio_read, lio_listio, aio_return      POSIX AIO direct reads: until
//                                         aio_return (libaio.cc)
//   syscall, io_uring_queue_init*,        an io_uring with O_DIRECT: no
//   io_uring_setup                        more merges; registered buffers
//   io_uring_register_buffers*            kept out (io_uring.cc)
//   dup, dup2, dup3, fcntl, fcntl64       copies of our descriptors
//   close, close_range, closefrom, dup2,  samepage's own descriptors stay
//   dup3                                  open (backend/own_fds.h)
//   free, realloc                         glibc's mmapped blocks wait for
//                                         merge windows (malloc_free.cc)
// Everything else, and every call samepage itself makes (real.h: Bypass),
// goes straight to libc.
//
// Settings from `samepage run` arrive in the environment:
//   SAMEPAGE_SET="knob=value,..."  written to the knobs, in order, before the
//                                  first call into samepage (lazily: a
//                                  process that never uses KSM never starts
//                                  an engine);
//   SAMEPAGE_MERGE_ANY=1           prctl(PR_SET_MEMORY_MERGE, 1) in the
//                                  constructor, before main;
//   SAMEPAGE_PROTECTION=mode       auto, userfaultfd or mprotect: how the
//                                  engine write-protects pages it merges
//                                  (taken by the constructor).
// They stay in the environment, with LD_PRELOAD, so that programs this one
// executes run under samepage too; PR_SET_MEMORY_MERGE through the
// interposer sets or clears SAMEPAGE_MERGE_ANY, as the kernel keeps
// merge-any over exec.

#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "api/default_engine.h"
#include "backend/own_fds.h"
#include "backend/own_memory.h"
#include "backend/proc_fs.h"
#include "backend/write_protect.h"
#include "preload/direct_io.h"
#include "preload/ksm_files.h"
#include "preload/memory_calls.h"
#include "preload/real.h"
#include "samepage/engine.h"
#include "samepage/samepage.h"

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

namespace samepage::preload {
namespace {

#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102  // Linux 6.13
#endif

// The bounding box [lo, hi) of every range ever advised (never shrinks).
std::atomic<bool> g_advised{false};
std::atomic<std::uintptr_t> g_advised_lo{UINTPTR_MAX};
std::atomic<std::uintptr_t> g_advised_hi{0};
pthread_once_t g_started = PTHREAD_ONCE_INIT;

void Warn(const char* what, const char* detail, int err) {
  char line[512];
  const int n = snprintf(line, sizeof(line), "samepage: %s%s: %s\n", what,
                         detail, strerror(err));
  if (n > 0) RealWrite(2, line, static_cast<size_t>(n));
}

void ApplySettings() {
  const char* env = getenv("SAMEPAGE_SET");
  if (env == nullptr) return;
  char buf[4096];
  snprintf(buf, sizeof(buf), "%s", env);
  char* save = nullptr;
  for (char* item = strtok_r(buf, ",", &save); item != nullptr;
       item = strtok_r(nullptr, ",", &save)) {
    char* eq = strchr(item, '=');
    if (eq == nullptr) continue;
    *eq = '\0';
    const char* value = eq + 1;
    if (samepage_sysfs_write(item, value, strlen(value)) < 0) {
      Warn("SAMEPAGE_SET ", item, errno);
    }
  }
}

// Before anything can create the engine.
void ApplyProtection() {
  const char* env = getenv("SAMEPAGE_PROTECTION");
  if (env == nullptr || env[0] == '\0') return;
  EngineOptions options;
  if (!ParseProtection(env, &options.protection)) {
    Warn("SAMEPAGE_PROTECTION=", env, EINVAL);
    return;
  }
  if (!SetDefaultEngineOptions(options)) {
    Warn("SAMEPAGE_PROTECTION", " (engine already created)", EBUSY);
  }
}

// Advice that drops the pages of the range. MADV_GUARD_INSTALL drops them
// for guard markers, and once the markers are removed the pages read back
// zeros: merged, they would read their frames' bytes. (Its pages are
// copied back first, as MADV_REMOVE's: a kernel before 6.13 refuses it
// with EINVAL, and the pages must then still hold their bytes.)
bool IsDiscard(int advice) {
  return advice == MADV_DONTNEED || advice == MADV_FREE ||
         advice == MADV_REMOVE || advice == MADV_DONTNEED_LOCKED ||
         advice == MADV_GUARD_INSTALL;
}

// A discarding madvise or process_madvise: run by Discard through the
// engines, or by AllocatorDiscard (RunDiscard) under the window lock.
struct DiscardCall {
  ssize_t (*call)(DiscardCall*);
  void* addr;
  size_t len;
  int advice;
  int pidfd;
  const struct iovec* iov;
  size_t n;
  unsigned int flags;
  ssize_t result;
  int err;
};

bool RunDiscard(void* arg) {
  auto* c = static_cast<DiscardCall*>(arg);
  c->result = c->call(c);
  c->err = c->result < 0 ? errno : 0;
  return c->result >= 0;
}

// Drops [addr, addr + len) with the call in `c`. Where samepage may have
// merged pages, the call runs under the engines' locks after they were
// given back as anonymous memory, so the scanner cannot merge them again
// before they are dropped: they read back zeros, as anonymous memory does.
ssize_t Discard(void* addr, size_t len, DiscardCall* c) {
  if (!MaybeAdvised(addr, len)) return c->call(c);
  // madvise over one range the kernel takes as it is (an aligned address:
  // else EINVAL, and nothing may change), whose pages read back zeros: its
  // merged pages need no copy first.
  const bool to_zero =
      c->iov == nullptr &&
      reinterpret_cast<uintptr_t>(addr) % samepage::kPageSize == 0 &&
      (c->advice == MADV_DONTNEED || c->advice == MADV_DONTNEED_LOCKED ||
       c->advice == MADV_FREE);
  return ChangeThroughEngines(addr, len,
                              to_zero ? Engine::MappingChange::kDiscardToZero
                                      : Engine::MappingChange::kDiscard,
                              ssize_t{-1}, [c] { return c->call(c); });
}

// The real madvise, as a DiscardCall.
DiscardCall MadviseCall(void* addr, size_t len, int advice) {
  DiscardCall c{};
  c.call = [](DiscardCall* d) -> ssize_t {
    return RealMadvise(d->addr, d->len, d->advice);
  };
  c.addr = addr;
  c.len = len;
  c.advice = advice;
  return c;
}

// A discard from inside the program's own allocator (jemalloc and tcmalloc
// purge free memory with madvise from inside malloc and free): the engine
// cannot be entered there (it allocates), but the pages must still read
// back zeros, as jemalloc counts on for calloc. Where the kernel cannot say
// which mappings are frames, ChangeMapping after all.
int AllocatorDiscard(DiscardCall* c) {
  if (!MaybeAdvised(c->addr, c->len)) return static_cast<int>(c->call(c));
  bool ok = false;
  const bool zeroes =
      c->advice == MADV_DONTNEED || c->advice == MADV_DONTNEED_LOCKED;
  if (!Engine::DiscardWithoutAllocating(c->addr, c->len, zeroes, RunDiscard,
                                        c, &ok)) {
    return static_cast<int>(Discard(c->addr, c->len, c));
  }
  errno = c->err;
  return static_cast<int>(c->result);
}

}  // namespace

int Madvise(void* addr, size_t len, int advice, const void* caller) {
  if (IsDiscard(advice) && MayBeInsideAllocator(caller) && !Retired()) {
    DiscardCall c = MadviseCall(addr, len, advice);
    return AllocatorDiscard(&c);
  }
  if (Bypass(caller)) return RealMadvise(addr, len, advice);
  if (advice == MADV_MERGEABLE || advice == MADV_UNMERGEABLE) {
    Inside inside;
    EnsureStarted();
    // Before the engine knows: an munmap racing this madvise must not take
    // the fast path once the range can be merged.
    if (advice == MADV_MERGEABLE) NoteAdvisedRange(addr, len);
    return samepage_madvise(addr, len, advice);
  }
  if (IsDiscard(advice)) {
    DiscardCall c = MadviseCall(addr, len, advice);
    return static_cast<int>(Discard(addr, len, &c));
  }
  if (advice == MADV_WIPEONFORK && MaybeAdvised(addr, len)) {
    // Merged pages map frames, which the kernel refuses the flag (EINVAL):
    // given back first, and the range not merged again once flagged.
    return ChangeThroughEngines(addr, len,
                                Engine::MappingChange::kAnonymousFlags, -1,
                                [&] { return RealMadvise(addr, len, advice); });
  }
  const int r = RealMadvise(addr, len, advice);
  // DONTFORK, DONTDUMP, WIPEONFORK ... change VmFlags, perhaps of a whole
  // mapping: the engines must read them before replacing a page there.
  samepage::Engine::VmaFlagsChanged();
  return r;
}

namespace {

ssize_t RealProcessMadvise(int pidfd, const struct iovec* iov, size_t n,
                           int advice, unsigned int flags);

// True if pidfd refers to this process: Linux 6.14's names for the calling
// thread and its process (PIDFD_SELF_THREAD, PIDFD_SELF_THREAD_GROUP,
// where the kernel takes them), or a pidfd whose fdinfo says
// "Pid:\t<us>".
bool IsSelfPidfd(int pidfd) {
  if (pidfd == samepage::backend::kPidfdSelfThread ||
      pidfd == samepage::backend::kPidfdSelfThreadGroup) {
    // Asked once: a call with no ranges fails (EBADF) only where the
    // kernel knows no such names.
    static const bool named =
        RealProcessMadvise(samepage::backend::kPidfdSelfThreadGroup, nullptr, 0,
                           MADV_COLD, 0) == 0;
    return named;
  }
  char path[64];
  snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
  const char* rel = nullptr;
  const int dir = samepage::backend::ProcAt(path, &rel);
  const int fd = RealOpenat(dir, rel, O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return false;
  char buf[1024];
  const ssize_t n = RealRead(fd, buf, sizeof(buf) - 1);
  RealClose(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* p = strstr(buf, "\nPid:");
  if (p == nullptr) return false;
  return atoi(p + 5) == getpid();
}

ssize_t RealProcessMadvise(int pidfd, const struct iovec* iov, size_t n,
                           int advice, unsigned int flags) {
  if (g_real.process_madvise != nullptr) {
    return g_real.process_madvise(pidfd, iov, n, advice, flags);
  }
  return DirectSyscall(SYS_process_madvise, pidfd, iov, n, advice, flags);
}

int OpenAt(int dirfd, const char* path, int flags, mode_t mode,
           const void* caller) {
  if (!Bypass(caller)) {
    int name = -1;
    const Target t = Classify(dirfd, path, &name);
    if (t != Target::kNone) return OpenKsm(t, name, flags);
  }
  const int fd = RealOpenat(dirfd, path, flags, mode);
  NoteFileFlags(fd, flags);
  return fd;
}

mode_t ModeArg(int flags, va_list ap) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE
             ? static_cast<mode_t>(va_arg(ap, int))
             : 0;
}

FILE* Fopen(const char* path, const char* mode, bool large,
            const void* caller) {
  if (!Bypass(caller) && mode != nullptr) {
    int name = -1;
    const Target t = Classify(AT_FDCWD, path, &name);
    if (t != Target::kNone) return FopenKsm(t, name, mode);
  }
  if (g_real.fopen == nullptr) ResolveReal();
  auto f = large ? g_real.fopen64 : g_real.fopen;
  if (f == nullptr) {
    errno = ENOSYS;
    return nullptr;
  }
  return f(path, mode);
}

ssize_t Read(int fd, void* buf, size_t n, const void* caller) {
  if (IsOurs(fd) && !Bypass(caller)) return ReadKsm(fd, buf, n);
  DirectRead guard(fd, buf, n);
  return RealRead(fd, buf, n);
}

ssize_t Pread(int fd, void* buf, size_t n, off_t off, const void* caller) {
  if (IsOurs(fd) && !Bypass(caller)) return PreadKsm(fd, buf, n, off);
  DirectRead guard(fd, buf, n);
  return RealPread(fd, buf, n, off);
}

// SAMEPAGE_STAT_FILE=path: every half second, and at exit, this process's
// /proc/self/ksm_stat text followed by the sysfs counters (pages_sharing,
// pages_shared, full_scans), the main knobs (run, pages_to_scan,
// sleep_millisecs) and the highest ksm_merging_pages and pages_sharing
// seen, written
// to `path` (a temporary file renamed over it). For tools and tests that
// need samepage's figures from outside a program that never reads them
// (kernel KSM's /proc/<pid>/ksm_stat is the kernel's). Taken out of the
// environment, so only this process writes the file.
char g_stat_path[4096];
// Written by the stat thread and at exit, under g_stat_lock. Once the
// exit's write is done (g_stat_final), the thread writes no more: a write
// it began before the exit's flush of stdio streams would otherwise
// rename older figures over the final ones.
pthread_mutex_t g_stat_lock = PTHREAD_MUTEX_INITIALIZER;
bool g_stat_final = false;
unsigned long g_stat_peak = 0;
unsigned long g_stat_peak_sharing = 0;

unsigned long FieldOf(const char* text, const char* field) {
  const char* p = strstr(text, field);
  return p != nullptr ? strtoul(p + strlen(field), nullptr, 10) : 0;
}

// Returns false once the final write was made.
bool WriteStatFile(bool final) {
  Inside inside;
  pthread_mutex_lock(&g_stat_lock);
  struct Unlock {
    ~Unlock() { pthread_mutex_unlock(&g_stat_lock); }
  } unlock;
  if (g_stat_final) return false;
  g_stat_final = final;
  char text[2048];
  ssize_t n = samepage_ksm_stat(text, sizeof(text) - 1);
  if (n < 0) return true;
  text[n] = '\0';
  const unsigned long merging = FieldOf(text, "ksm_merging_pages ");
  if (merging > g_stat_peak) g_stat_peak = merging;
  size_t len = static_cast<size_t>(n);
  for (const char* knob : {"pages_sharing", "pages_shared", "full_scans", "run",
                           "pages_to_scan", "sleep_millisecs"}) {
    char value[64];
    const ssize_t v = samepage_sysfs_read(knob, value, sizeof(value) - 1);
    if (v <= 0) continue;
    value[v] = '\0';
    if (strcmp(knob, "pages_sharing") == 0) {
      g_stat_peak_sharing =
          std::max(g_stat_peak_sharing, strtoul(value, nullptr, 10));
    }
    len += snprintf(text + len, sizeof(text) - len, "%s %s", knob, value);
  }
  len += snprintf(text + len, sizeof(text) - len,
                  "peak_merging_pages %lu\npeak_pages_sharing %lu\n",
                  g_stat_peak, g_stat_peak_sharing);
  char tmp[sizeof(g_stat_path) + 16];
  snprintf(tmp, sizeof(tmp), "%s.tmp", g_stat_path);
  const int fd = RealOpenat(AT_FDCWD, tmp, O_WRONLY | O_CREAT | O_TRUNC |
                                               O_CLOEXEC, 0644);
  if (fd < 0) return true;
  const bool ok = RealWrite(fd, text, len) == static_cast<ssize_t>(len);
  RealClose(fd);
  if (ok) rename(tmp, g_stat_path);
  return true;
}

void StartStatWriter() {
  const char* path = getenv("SAMEPAGE_STAT_FILE");
  if (path == nullptr || path[0] == '\0') return;
  snprintf(g_stat_path, sizeof(g_stat_path), "%s", path);
  unsetenv("SAMEPAGE_STAT_FILE");
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  const pid_t owner = getpid();
  // Born with every signal blocked, as the scanner: the program's signals
  // are for the program's threads.
  int err = 0;
  {
    const backend::AllSignalsBlocked blocked;
    err = pthread_create(
        &t, &attr,
        [](void*) -> void* {
          ++t_inside;  // everything this thread does bypasses
          pthread_setname_np(pthread_self(), "samepage-stat");
          while (WriteStatFile(/*final=*/false)) usleep(500 * 1000);
          return nullptr;
        },
        nullptr);
  }
  // pthread_create returns its error; errno is not it.
  if (err != 0) Warn("SAMEPAGE_STAT_FILE: ", "cannot start its thread", err);
  pthread_attr_destroy(&attr);
  static pid_t s_owner = owner;
  atexit([] {
    // Not in a forked child (whose lock may be held by a thread that was
    // not copied).
    if (getpid() == s_owner) (void)WriteStatFile(/*final=*/true);
  });
}

}  // namespace

void NoteAdvised() { NoteAdvisedRange(nullptr, SIZE_MAX); }

void NoteAdvisedRange(const void* addr, size_t len) {
  const auto lo = reinterpret_cast<std::uintptr_t>(addr);
  const std::uintptr_t hi = len > UINTPTR_MAX - lo ? UINTPTR_MAX : lo + len;
  std::uintptr_t cur = g_advised_lo.load(std::memory_order_relaxed);
  while (lo < cur && !g_advised_lo.compare_exchange_weak(cur, lo)) {
  }
  cur = g_advised_hi.load(std::memory_order_relaxed);
  while (hi > cur && !g_advised_hi.compare_exchange_weak(cur, hi)) {
  }
  g_advised.store(true, std::memory_order_seq_cst);
}

bool MaybeAdvised(const void* addr, size_t len) {
  if (!g_advised.load(std::memory_order_acquire)) return false;
  const auto lo = reinterpret_cast<std::uintptr_t>(addr);
  const std::uintptr_t hi = len > UINTPTR_MAX - lo ? UINTPTR_MAX : lo + len;
  return lo < g_advised_hi.load(std::memory_order_acquire) &&
         hi > g_advised_lo.load(std::memory_order_acquire);
}

void EnsureStarted() {
  pthread_once(&g_started, [] {
    Inside inside;
    ApplySettings();
  });
}

ssize_t ProcessMadvise(int pidfd, const struct iovec* iov, size_t n, int advice,
                       unsigned int flags, const void* caller) {
  // MADV_WIPEONFORK goes range by range through madvise, as the KSM
  // advice does (merged pages are given back first there).
  const bool ksm = advice == MADV_MERGEABLE || advice == MADV_UNMERGEABLE ||
                   advice == MADV_WIPEONFORK;
  const bool ours = !Bypass(caller) && IsSelfPidfd(pidfd);
  if (!ours || !(ksm || IsDiscard(advice))) {
    const ssize_t r = RealProcessMadvise(pidfd, iov, n, advice, flags);
    // DONTFORK, DONTDUMP ... of our own memory change VmFlags, as in
    // madvise(); discards and samepage's own calls change none. Counted
    // for those too until 2026-12-07, the scanner's discards of scattered
    // pages made every smaps read look stale: each MADV_DONTNEED of a
    // forked Redis's save (unmerging 4 pages) read 49 MB of smaps.
    if (ours && !IsDiscard(advice)) samepage::Engine::VmaFlagsChanged();
    return r;
  }
  if (!ksm) {
    // One call over the span of all vectors (merged pages between them are
    // unmerged too, and merge again later).
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    for (size_t i = 0; i < n && iov != nullptr; ++i) {
      const auto b = reinterpret_cast<uintptr_t>(iov[i].iov_base);
      if (iov[i].iov_len == 0 || b + iov[i].iov_len < b) continue;
      lo = b < lo ? b : lo;
      hi = b + iov[i].iov_len > hi ? b + iov[i].iov_len : hi;
    }
    DiscardCall c{};
    c.call = [](DiscardCall* d) {
      return RealProcessMadvise(d->pidfd, d->iov, d->n, d->advice, d->flags);
    };
    c.pidfd = pidfd;
    c.iov = iov;
    c.n = n;
    c.advice = advice;
    c.flags = flags;
    if (lo >= hi) return c.call(&c);
    return Discard(reinterpret_cast<void*>(lo), hi - lo, &c);
  }
  // mm/madvise.c: flags must be 0, at most UIO_MAXIOV vectors; the ranges
  // are advised in order and the bytes advised before an error returned.
  if (flags != 0 || n > IOV_MAX) {
    errno = EINVAL;
    return -1;
  }
  ssize_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (Madvise(iov[i].iov_base, iov[i].iov_len, advice, nullptr) != 0) {
      return total > 0 ? total : -1;
    }
    total += static_cast<ssize_t>(iov[i].iov_len);
  }
  return total;
}

namespace {

int RealPrctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
              unsigned long a5) {
  if (g_real.prctl != nullptr) return g_real.prctl(option, a2, a3, a4, a5);
  return static_cast<int>(DirectSyscall(SYS_prctl, option, a2, a3, a4, a5));
}

}  // namespace

int Prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
          unsigned long a5, const void* caller) {
  if (option == PR_SET_SECCOMP &&
      (a2 == SECCOMP_MODE_STRICT || a2 == SECCOMP_MODE_FILTER) &&
      !Bypass(caller)) {
    BeforeSeccomp(a2 == SECCOMP_MODE_STRICT, reinterpret_cast<void*>(a3));
  }
  if ((option == SAMEPAGE_PR_SET_MEMORY_MERGE ||
       option == SAMEPAGE_PR_GET_MEMORY_MERGE) &&
      !Bypass(caller)) {
    int r;
    {
      Inside inside;
      EnsureStarted();
      r = samepage_prctl(option, a2, a3, a4, a5);
    }
    if (r == 0 && option == SAMEPAGE_PR_SET_MEMORY_MERGE) {
      // Kept over exec, as the kernel keeps MMF_VM_MERGE_ANY.
      const int saved = errno;
      if (a2 != 0) {
        NoteAdvised();
        setenv("SAMEPAGE_MERGE_ANY", "1", 1);
      } else {
        unsetenv("SAMEPAGE_MERGE_ANY");
      }
      errno = saved;
    }
    return r;
  }
  if (option == PR_SET_VMA && a2 == PR_SET_VMA_ANON_NAME &&
      FromAllocatorOver(caller, reinterpret_cast<void*>(a3), a4)) {
    // An allocator naming its memory (the kernel refuses a name to merged
    // pages, EINVAL, as in library mode).
    return AllocatorCall<int>(
        [&] { return RealPrctl(option, a2, a3, a4, a5); });
  }
  if (option == PR_SET_VMA && a2 == PR_SET_VMA_ANON_NAME && !Bypass(caller) &&
      MaybeAdvised(reinterpret_cast<void*>(a3), a4)) {
    // A name for anonymous memory: merged pages map frames, which the
    // kernel refuses one (EINVAL), so they are given back first (until
    // 2026-12-06 the call failed). They merge again later, as a mapping of
    // a frame, nameless while merged (limitations.md, item 2).
    return ChangeThroughEngines(
        reinterpret_cast<void*>(a3), a4, Engine::MappingChange::kAnonymousFlags,
        -1, [&] { return RealPrctl(option, a2, a3, a4, a5); });
  }
  return RealPrctl(option, a2, a3, a4, a5);
}

}  // namespace samepage::preload

using namespace samepage::preload;

namespace {

// exit() flushes stdio streams in _IO_cleanup, after every destructor and
// through calls no interposer sees: a knob written through a FILE that is
// never closed would be lost. Flush those still open now, through
// samepage, as the kernel would receive them.
__attribute__((destructor)) void SamepagePreloadFini() {
  (void)FlushOpenStdioKsm(/*flush_buffers=*/true);
}

__attribute__((constructor)) void SamepagePreloadInit() {
  ResolveReal();
  ResolveNextAllocator();
  FindSamepageText();
  UnblockFaultsAtStart();
  // Kept for a chroot or an unmount of /proc to come (backend/proc_fs.h).
  (void)samepage::backend::ProcRootFd();
  // Our tables are never merged (backend/own_memory.h).
  samepage::backend::KeepObjectOut(
      reinterpret_cast<const void*>(&SamepagePreloadInit));
  NoteAllocator(!OtherAllocator());
  ApplyProtection();
  StartStatWriter();
  const char* any = getenv("SAMEPAGE_MERGE_ANY");
  if (any != nullptr && strcmp(any, "1") == 0) {
    Inside inside;
    EnsureStarted();
    if (samepage_prctl(SAMEPAGE_PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0) {
      Warn("SAMEPAGE_MERGE_ANY", "", errno);
    } else {
      NoteAdvised();
    }
  }
}

}  // namespace

// --- madvise family ---

SAMEPAGE_EXPORT int madvise(void* addr, size_t len, int advice) noexcept {
  return Madvise(addr, len, advice, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t process_madvise(int pidfd, const struct iovec* iov,
                                        size_t n, int advice,
                                        unsigned int flags) noexcept {
  return ProcessMadvise(pidfd, iov, n, advice, flags,
                        __builtin_return_address(0));
}

// --- prctl ---

SAMEPAGE_EXPORT int prctl(int option, ...) noexcept {
  va_list ap;
  va_start(ap, option);
  // As glibc's own prctl: always four more arguments, whatever was passed.
  const unsigned long a2 = va_arg(ap, unsigned long);
  const unsigned long a3 = va_arg(ap, unsigned long);
  const unsigned long a4 = va_arg(ap, unsigned long);
  const unsigned long a5 = va_arg(ap, unsigned long);
  va_end(ap);
  return Prctl(option, a2, a3, a4, a5, __builtin_return_address(0));
}

// --- open family ---

SAMEPAGE_EXPORT int open(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return OpenAt(AT_FDCWD, path, flags, mode, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int open64(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return OpenAt(AT_FDCWD, path, flags, mode, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int openat(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return OpenAt(dirfd, path, flags, mode, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int openat64(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return OpenAt(dirfd, path, flags, mode, __builtin_return_address(0));
}

// _FORTIFY_SOURCE versions, called when flags hold no O_CREAT.
SAMEPAGE_EXPORT int __open_2(const char* path, int flags) {
  return OpenAt(AT_FDCWD, path, flags, 0, __builtin_return_address(0));
}
SAMEPAGE_EXPORT int __open64_2(const char* path, int flags) {
  return OpenAt(AT_FDCWD, path, flags, 0, __builtin_return_address(0));
}
SAMEPAGE_EXPORT int __openat_2(int dirfd, const char* path, int flags) {
  return OpenAt(dirfd, path, flags, 0, __builtin_return_address(0));
}
SAMEPAGE_EXPORT int __openat64_2(int dirfd, const char* path, int flags) {
  return OpenAt(dirfd, path, flags, 0, __builtin_return_address(0));
}

SAMEPAGE_EXPORT FILE* fopen(const char* path, const char* mode) {
  return Fopen(path, mode, false, __builtin_return_address(0));
}

SAMEPAGE_EXPORT FILE* fopen64(const char* path, const char* mode) {
  return Fopen(path, mode, true, __builtin_return_address(0));
}

// --- read, write, close on our descriptors ---

SAMEPAGE_EXPORT ssize_t read(int fd, void* buf, size_t n) {
  return Read(fd, buf, n, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t __read_chk(int fd, void* buf, size_t n,
                                   size_t buflen) {
  if (n > buflen) {
    if (g_real.read_chk != nullptr) return g_real.read_chk(fd, buf, n, buflen);
    abort();
  }
  return Read(fd, buf, n, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t pread(int fd, void* buf, size_t n, off_t off) {
  return Pread(fd, buf, n, off, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t pread64(int fd, void* buf, size_t n, off_t off) {
  return Pread(fd, buf, n, off, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t __pread_chk(int fd, void* buf, size_t n, off_t off,
                                    size_t buflen) {
  if (n > buflen) {
    if (g_real.pread_chk != nullptr) {
      return g_real.pread_chk(fd, buf, n, off, buflen);
    }
    abort();
  }
  return Pread(fd, buf, n, off, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t __pread64_chk(int fd, void* buf, size_t n, off_t off,
                                      size_t buflen) {
  if (n > buflen) {
    if (g_real.pread_chk != nullptr) {
      return g_real.pread_chk(fd, buf, n, off, buflen);
    }
    abort();
  }
  return Pread(fd, buf, n, off, __builtin_return_address(0));
}

SAMEPAGE_EXPORT ssize_t write(int fd, const void* buf, size_t n) {
  if (IsOurs(fd) && !Bypass(__builtin_return_address(0))) {
    return WriteKsm(fd, buf, n);
  }
  return RealWrite(fd, buf, n);
}

SAMEPAGE_EXPORT ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  if (IsOurs(fd) && !Bypass(__builtin_return_address(0))) {
    return WriteKsm(fd, buf, n);  // sysfs ignores the offset
  }
  return RealPwrite(fd, buf, n, off);
}

SAMEPAGE_EXPORT ssize_t pwrite64(int fd, const void* buf, size_t n,
                                 off_t off) {
  if (IsOurs(fd) && !Bypass(__builtin_return_address(0))) {
    return WriteKsm(fd, buf, n);
  }
  return RealPwrite(fd, buf, n, off);
}

SAMEPAGE_EXPORT int close(int fd) {
  if (!Bypass(__builtin_return_address(0))) {
    // A descriptor the program never opened: closing it would let the
    // program's next open() take the number samepage writes frames to.
    if (samepage::backend::IsOwnFd(fd)) return 0;
    if (IsOurs(fd)) return CloseKsm(fd);
  }
  // A stale mark would only cost the next descriptor with this number a
  // registration per read; a missing one would lose direct reads.
  NoteDirectClosed(fd);
  return RealClose(fd);
}

namespace {

// close_range(2) on [first, last], around samepage's own descriptors.
int CloseRangeAround(unsigned first, unsigned last, unsigned flags) {
  int own[samepage::backend::kMaxOwnFds];
  const int n =
      samepage::backend::CopyOwnFds(own, samepage::backend::kMaxOwnFds);
  unsigned from = first;
  for (int i = 0; i < n && from <= last; ++i) {
    const auto fd = static_cast<unsigned>(own[i]);
    if (fd < from || fd > last) continue;
    if (fd > from && syscall(SYS_close_range, from, fd - 1, flags) != 0) {
      return -1;
    }
    if (fd == UINT_MAX) return 0;
    from = fd + 1;
  }
  if (from > last) return 0;
  return static_cast<int>(syscall(SYS_close_range, from, last, flags));
}

}  // namespace

SAMEPAGE_EXPORT int close_range(unsigned first, unsigned last,
                                int flags) noexcept {
  if (Bypass(__builtin_return_address(0)) ||
      (flags & CLOSE_RANGE_CLOEXEC) != 0) {  // marks, closes nothing
    return static_cast<int>(syscall(SYS_close_range, first, last, flags));
  }
  if (first > last) {
    errno = EINVAL;
    return -1;
  }
  return CloseRangeAround(first, last, static_cast<unsigned>(flags));
}

SAMEPAGE_EXPORT void closefrom(int lowfd) noexcept {
  if (lowfd < 0) lowfd = 0;
  if (Bypass(__builtin_return_address(0))) {
    syscall(SYS_close_range, lowfd, ~0U, 0);
    return;
  }
  (void)CloseRangeAround(static_cast<unsigned>(lowfd), ~0U, 0);
}

SAMEPAGE_EXPORT int fflush(FILE* fp) {
  if (g_real.fflush == nullptr) ResolveReal();
  const int r = g_real.fflush(fp);
  if (Bypass(__builtin_return_address(0))) return r;
  int err = 0;
  if (fp == nullptr) {
    err = FlushOpenStdioKsm(/*flush_buffers=*/false);  // flushed just now
  } else if (IsOurs(fileno(fp))) {
    err = FlushStdioKsm(fp, /*closing=*/false);
  }
  if (err != 0) {
    errno = err;
    return EOF;
  }
  return r;
}

SAMEPAGE_EXPORT FILE* fdopen(int fd, const char* mode) noexcept {
  if (g_real.fdopen == nullptr) ResolveReal();
  if (g_real.fdopen == nullptr) {
    errno = ENOSYS;
    return nullptr;
  }
  FILE* fp = g_real.fdopen(fd, mode);
  if (fp != nullptr && mode != nullptr && IsOurs(fd) &&
      !Bypass(__builtin_return_address(0))) {
    NoteFdopen(fd, fp, mode);
  }
  return fp;
}

// A stream read again from the start gets fresh text, as sysfs gives it.
SAMEPAGE_EXPORT void rewind(FILE* fp) {
  if (g_real.rewind == nullptr) ResolveReal();
  if (g_real.rewind == nullptr) return;
  g_real.rewind(fp);
  if (IsOurs(fileno(fp)) && !Bypass(__builtin_return_address(0))) {
    RefillIfRewound(fp);
  }
}

namespace {

template <typename Off>
int Fseek(int (*real)(FILE*, Off, int), FILE* fp, Off off, int whence,
          const void* caller) {
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  const int r = real(fp, off, whence);
  if (r == 0 && IsOurs(fileno(fp)) && !Bypass(caller)) RefillIfRewound(fp);
  return r;
}

}  // namespace

SAMEPAGE_EXPORT int fseek(FILE* fp, long off, int whence) {
  if (g_real.fseek == nullptr) ResolveReal();
  return Fseek(g_real.fseek, fp, off, whence, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int fseeko(FILE* fp, off_t off, int whence) {
  if (g_real.fseeko == nullptr) ResolveReal();
  return Fseek(g_real.fseeko, fp, off, whence, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int fseeko64(FILE* fp, off_t off, int whence) {
  if (g_real.fseeko64 == nullptr) ResolveReal();
  return Fseek(g_real.fseeko64, fp, off, whence, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int fclose(FILE* fp) {
  if (g_real.fclose == nullptr) ResolveReal();
  if (fp == nullptr || !IsOurs(fileno(fp)) ||
      Bypass(__builtin_return_address(0))) {
    return g_real.fclose(fp);
  }
  int err = 0;
  if (g_real.fflush(fp) != 0) err = errno;
  if (const int e = FlushStdioKsm(fp, /*closing=*/true); e != 0 && err == 0) {
    err = e;
  }
  const int r = g_real.fclose(fp);
  if (err != 0) {
    errno = err;
    return EOF;
  }
  return r;
}

// --- descriptor copies (shell redirections) ---

namespace {

// newfd is a copy of oldfd now: of our KSM files' state, and of its
// O_DIRECT mark.
void NoteCopy(int oldfd, int newfd) {
  NoteDup(oldfd, newfd);
  NoteDirectDup(oldfd, newfd);
}

}  // namespace

SAMEPAGE_EXPORT int dup(int fd) noexcept {
  const int r = g_real.dup != nullptr ? g_real.dup(fd)
                                      : static_cast<int>(syscall(SYS_dup, fd));
  if (r >= 0) NoteCopy(fd, r);
  return r;
}

namespace {

// dup2/dup3 onto one of samepage's own descriptors would close it under
// the engine (its next write would go to the program's file): refused, with
// the errno the kernel gives a dup2 racing an open.
bool OntoOwnFd(int fd, int fd2, const void* caller) {
  if (fd == fd2 || !samepage::backend::IsOwnFd(fd2) || Bypass(caller))
    return false;
  errno = EBUSY;
  return true;
}

}  // namespace

SAMEPAGE_EXPORT int dup2(int fd, int fd2) noexcept {
  if (OntoOwnFd(fd, fd2, __builtin_return_address(0))) return -1;
  const int r = g_real.dup2 != nullptr
                    ? g_real.dup2(fd, fd2)
                    : static_cast<int>(syscall(SYS_dup2, fd, fd2));
  if (r >= 0) NoteCopy(fd, r);
  return r;
}

SAMEPAGE_EXPORT int dup3(int fd, int fd2, int flags) noexcept {
  if (OntoOwnFd(fd, fd2, __builtin_return_address(0))) return -1;
  const int r = g_real.dup3 != nullptr
                    ? g_real.dup3(fd, fd2, flags)
                    : static_cast<int>(syscall(SYS_dup3, fd, fd2, flags));
  if (r >= 0) NoteCopy(fd, r);
  return r;
}

namespace {

int Fcntl(int (*real)(int, int, ...), int fd, int cmd, va_list ap) {
  // Every fcntl command takes at most one argument, an int or a pointer.
  void* arg = va_arg(ap, void*);
  const int r = real != nullptr
                    ? real(fd, cmd, arg)
                    : static_cast<int>(syscall(SYS_fcntl, fd, cmd, arg));
  if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) NoteCopy(fd, r);
  if (r >= 0 && cmd == F_SETFL) {
    NoteFileFlags(fd, static_cast<int>(reinterpret_cast<std::intptr_t>(arg)));
  }
  return r;
}

}  // namespace

SAMEPAGE_EXPORT int fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  const int r = Fcntl(g_real.fcntl, fd, cmd, ap);
  va_end(ap);
  return r;
}

SAMEPAGE_EXPORT int fcntl64(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  const int r = Fcntl(g_real.fcntl64, fd, cmd, ap);
  va_end(ap);
  return r;
}

// --- memory the kernel writes: KVM guest RAM, vhost memory tables ---

namespace {

// The head of struct kvm_userspace_memory_region, which
// kvm_userspace_memory_region2 (Linux 6.8; not in older headers) shares.
struct KvmMemslot {
  std::uint32_t slot;
  std::uint32_t flags;
  std::uint64_t guest_phys_addr;
  std::uint64_t memory_size;
  std::uint64_t userspace_addr;
};
struct KvmMemslot2 {
  KvmMemslot head;
  std::uint64_t guest_memfd_offset;
  std::uint32_t guest_memfd;
  std::uint32_t pad1;
  std::uint64_t pad2[14];
};
static_assert(sizeof(KvmMemslot2) == 160);
constexpr unsigned long kKvmSetUserMemoryRegion = _IOW(0xAE, 0x46, KvmMemslot);
constexpr unsigned long kKvmSetUserMemoryRegion2 =
    _IOW(0xAE, 0x49, KvmMemslot2);
// struct vhost_memory: a count, then that many vhost_memory_region.
struct VhostMemory {
  std::uint32_t nregions;
  std::uint32_t padding;
};
struct VhostMemoryRegion {
  std::uint64_t guest_phys_addr;
  std::uint64_t memory_size;
  std::uint64_t userspace_addr;
  std::uint64_t flags_padding;
};
constexpr unsigned long kVhostSetMemTable = _IOW(0xAF, 0x03, VhostMemory);
// The kernel's VHOST_MEMORY_MAX_NREGIONS default (max_mem_regions).
constexpr std::uint32_t kVhostMaxRegions = 509;

// The target of /proc/self/fd/<fd>, starting with `prefix`.
bool FdIs(int fd, const char* prefix) {
  char link[64], target[128];
  snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  const ssize_t n =
      samepage::backend::ReadlinkProc(link, target, sizeof(target) - 1);
  if (n <= 0) return false;
  target[n] = '\0';
  return strncmp(target, prefix, strlen(prefix)) == 0;
}

void KernelWrites(std::uint64_t addr, std::uint64_t len, const char* who) {
  if (len == 0 || addr + len < addr) return;  // a slot deleted; or EINVAL
  const std::size_t kept =
      samepage::Engine::KernelWrites(reinterpret_cast<void*>(addr), len);
  static std::atomic<bool> told{false};
  if (kept > 0 && !told.exchange(true)) {
    char line[512];
    const int n = snprintf(
        line, sizeof(line),
        "samepage: %s memory at %#lx (%lu KiB) is not merged: the kernel "
        "writes it, and under this write-protection (mprotect, or "
        "userfaultfd for user faults only) such writes cannot wait for a "
        "merge; userfaultfd for all faults (root, access to "
        "/dev/userfaultfd, or vm.unprivileged_userfaultfd=1) merges it\n",
        who, static_cast<unsigned long>(addr),
        static_cast<unsigned long>(len >> 10));
    if (n > 0) RealWrite(2, line, static_cast<size_t>(n));
  }
}

// Before the real ioctl: a vCPU may run (other threads, a memslot added to
// a running guest) as soon as it returns, so no merge window may be open
// in the range by then.
void NoteKernelWriter(int fd, unsigned long request, const void* arg) {
  if (request == kKvmSetUserMemoryRegion ||
      request == kKvmSetUserMemoryRegion2) {
    KvmMemslot m;
    if (!CopyFromUser(&m, arg, sizeof(m)) || !FdIs(fd, "anon_inode:kvm-vm")) {
      return;
    }
    KernelWrites(m.userspace_addr, m.memory_size, "KVM guest");
  } else if (request == kVhostSetMemTable) {
    VhostMemory head;
    if (!CopyFromUser(&head, arg, sizeof(head)) ||
        head.nregions > kVhostMaxRegions || !FdIs(fd, "/dev/vhost-")) {
      return;
    }
    const auto* regions = reinterpret_cast<const VhostMemoryRegion*>(
        static_cast<const char*>(arg) + sizeof(VhostMemory));
    for (std::uint32_t i = 0; i < head.nregions; ++i) {
      VhostMemoryRegion r;
      if (!CopyFromUser(&r, regions + i, sizeof(r))) return;
      KernelWrites(r.userspace_addr, r.memory_size, "vhost");
    }
  }
}

int RealIoctl(int fd, unsigned long request, void* arg) {
  if (g_real.ioctl != nullptr) return g_real.ioctl(fd, request, arg);
  return static_cast<int>(DirectSyscall(SYS_ioctl, fd, request, arg));
}

constexpr unsigned long kUffdioRegister = UFFDIO_REGISTER;
constexpr unsigned long kUffdioUnregister = UFFDIO_UNREGISTER;

// The application registers memory with a userfaultfd of its own. The
// engines register all the memory they may merge with theirs (for
// write-protection), and a VMA takes one userfaultfd: the kernel would
// refuse the application's with EBUSY (until 2026-12-06 it did, over any
// private anonymous memory of a process with an engine). Their
// registration leaves the range first, its merged pages are given back
// (the application's faults and copies are then on anonymous memory, as
// natively), and the maps read afterwards keep the engines away
// (limitations.md, item 8).
int UffdRegister(int fd, void* arg) {
  struct uffdio_range range;
  if (!CopyFromUser(&range, arg, sizeof(range)) || range.len == 0 ||
      range.start + range.len < range.start ||
      !FdIs(fd, "anon_inode:[userfaultfd]")) {
    return RealIoctl(fd, kUffdioRegister, arg);
  }
  return ChangeThroughEngines(
      reinterpret_cast<void*>(range.start), range.len,
      samepage::Engine::MappingChange::kUserfaultfd, -1,
      [&] { return RealIoctl(fd, kUffdioRegister, arg); });
}

}  // namespace

bool samepage::preload::UserfaultfdIoctl(int fd, unsigned long request,
                                         void* arg, const void* caller,
                                         long* result) {
  // Every ioctl comes here, the engines' own userfaultfd calls among them:
  // the request first.
  if (request != kUffdioRegister && request != kUffdioUnregister) return false;
  if (Bypass(caller)) return false;
  if (request == kUffdioRegister) {
    *result = UffdRegister(fd, arg);
    return true;
  }
  // UFFDIO_UNREGISTER: the range's VmFlags change (merged again, by the
  // engines' next view).
  *result = RealIoctl(fd, request, arg);
  const int err = errno;
  samepage::Engine::VmaFlagsChanged();
  errno = err;
  return true;
}

// --- the 2008 /dev/ksm ---

SAMEPAGE_EXPORT int ioctl(int fd, unsigned long request, ...) noexcept {
  va_list ap;
  va_start(ap, request);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  if ((request == kKvmSetUserMemoryRegion ||
       request == kKvmSetUserMemoryRegion2 || request == kVhostSetMemTable) &&
      !Bypass(__builtin_return_address(0))) {
    const int saved = errno;
    {
      Inside inside;
      NoteKernelWriter(fd, request, arg);
    }
    errno = saved;
  }
  if (IsDevKsm(fd) && !Bypass(__builtin_return_address(0))) {
    const int r = IoctlDevKsm(fd, request, arg);
    if (r != -2) {
      if (r >= 0 && request == KSM_REGISTER_MEMORY_REGION) NoteAdvised();
      return r;
    }
  }
  long r = 0;
  if (UserfaultfdIoctl(fd, request, arg, __builtin_return_address(0), &r)) {
    return static_cast<int>(r);
  }
  return RealIoctl(fd, request, arg);
}
