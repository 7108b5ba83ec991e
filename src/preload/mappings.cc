// The calls that unmap, move, replace or reprotect memory, interposed so
// that they never race a merge and the engine never keeps merging an
// address range the kernel would no longer consider mergeable:
//   munmap, mmap/mmap64 with MAP_FIXED  the engine forgets the advised part
//                                       of the range once the call succeeds
//                                       (VM_MERGEABLE is per VMA: a new
//                                       mapping there is not merged unless
//                                       advised again);
//   mremap                              the source is unmerged and unadvised
//                                       first; the moved mapping is advised
//                                       again at its new address, as the
//                                       kernel moves VM_MERGEABLE with it;
//   mprotect to anything but R+W        the range is unmerged and unadvised
//                                       first, so samepage never makes it
//                                       writable again (it merges only
//                                       writable private anonymous memory);
//                                       mprotect back to R+W takes the
//                                       advice up again, as the kernel
//                                       keeps VM_MERGEABLE throughout;
//   mseal                               the same: sealed, it could never be
//                                       given back;
//   pkey_mprotect with a key (1 and up)  the same, whatever the protection:
//                                       samepage's mappings would lose the
//                                       key (memory with a key is never
//                                       merged);
//   mlock, mlock2, munlock, mlockall,   nothing is unmerged; the engines
//   munlockall                          read the maps again afterwards, so
//                                       every merge re-applies the lock
//                                       state the program just set.
// Each real call runs inside Engine::ChangeMapping: with the engines' locks
// and the window lock held, so no merge window is open over the range while
// the kernel changes it (the scanner never waits on application threads
// while it holds those locks, so this cannot deadlock).
//
// The same calls made from inside another allocator (jemalloc, tcmalloc,
// mimalloc), or from anywhere in an executable that provides malloc itself
// (MayBeInsideAllocator), cannot enter the engines, which allocate: they
// run with no merge window open instead (Engine::AllocatorChange), as the
// allocator's discards do.
//
// Fast path: a range outside the bounding box of everything ever advised
// (MaybeAdvised, two atomic loads) goes straight to libc, so a program that
// never advises memory pays nothing.
//
// The same calls by number through syscall() come here too (MemorySyscall,
// memory_calls.h).
//
// Thread safety: as the libc calls; any thread, any time.

#include <errno.h>
#include <linux/seccomp.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "backend/linux_memory.h"
#include "preload/memory_calls.h"
#include "preload/real.h"
#include "samepage/engine.h"
#include "samepage/samepage.h"

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef SYS_mseal
#define SYS_mseal 462  // Linux 6.10, the same number on every architecture
#endif

namespace samepage::preload {
namespace {

constexpr uintptr_t kPage = 4096;

using Kind = Engine::MappingChange;

// mlock and friends: the system call and its arguments.
struct LockCall {
  long nr;  // SYS_mlock, SYS_mlock2, SYS_munlock, SYS_mlockall, ...
  long a, b, c;
};

int RealPkeyMprotect(void* addr, size_t len, int prot, int pkey) {
  if (pkey == -1) return RealMprotect(addr, len, prot);
  return static_cast<int>(
      DirectSyscall(SYS_pkey_mprotect, addr, len, prot, pkey));
}

void* MoveMapping(void* old, size_t old_len, size_t new_len, int flags,
                  void* new_addr) {
  void* const result = RealMremap(old, old_len, new_len, flags, new_addr);
  // A range that spans several mappings (EFAULT) may be one anonymous
  // mapping of the program's that merges made into many: moved piece by
  // piece (backend::MremapPieces). EFAULT stays where it is not.
  if (result != MAP_FAILED || errno != EFAULT) return result;
  return backend::MremapPieces(reinterpret_cast<uintptr_t>(old), old_len,
                               new_len, flags,
                               reinterpret_cast<uintptr_t>(new_addr));
}

// The lock calls are plain system calls in glibc too. A lock state change
// over advised memory waits for merge windows there, then the engines see
// it: a merge in flight would otherwise put an unlocked (or locked)
// mapping over memory the program has just locked (or unlocked).
int LockChange(void* addr, size_t len, const LockCall& c, const void* caller) {
  auto run = [&] { return DirectSyscall(c.nr, c.a, c.b, c.c); };
  if (Bypass(caller) || !MaybeAdvised(addr, len)) {
    return static_cast<int>(run());
  }
  return static_cast<int>(
      ChangeThroughEngines(addr, len, Kind::kFlags, -1L, run));
}

long Arg(const void* p) {
  return static_cast<long>(reinterpret_cast<uintptr_t>(p));
}

int RealMseal(void* addr, size_t len, unsigned long flags) {
  return static_cast<int>(DirectSyscall(SYS_mseal, addr, len, flags));
}

}  // namespace

int Munmap(void* addr, size_t len, const void* caller) {
  if (FromAllocatorOver(caller, addr, len))
    return AllocatorCall<int>([&] { return RealMunmap(addr, len); });
  if (Bypass(caller) || !MaybeAdvised(addr, len)) {
    return RealMunmap(addr, len);
  }
  return ChangeThroughEngines(addr, len, Kind::kUnmap, -1,
                              [&] { return RealMunmap(addr, len); });
}

void* Mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off,
           const void* caller) {
  // Only MAP_FIXED replaces what was there; MAP_FIXED_NOREPLACE never does.
  const bool replaces = (flags & MAP_FIXED) && !(flags & MAP_FIXED_NOREPLACE);
  if (replaces && FromAllocatorOver(caller, addr, len)) {
    return AllocatorCall<void*>(
        [&] { return RealMmap(addr, len, prot, flags, fd, off); });
  }
  if (!replaces || Bypass(caller) || !MaybeAdvised(addr, len)) {
    return RealMmap(addr, len, prot, flags, fd, off);
  }
  return ChangeThroughEngines(addr, len, Kind::kUnmap, MAP_FAILED, [&] {
    return RealMmap(addr, len, prot, flags, fd, off);
  });
}

void* Mremap(void* old, size_t old_len, size_t new_len, int flags,
             void* new_addr, const void* caller) {
  const bool fixed = (flags & MREMAP_FIXED) != 0;
  const bool source = MaybeAdvised(old, old_len);
  const bool target = fixed && MaybeAdvised(new_addr, new_len);
  if ((source || target) && MayBeInsideAllocator(caller) && !Retired()) {
    return AllocatorCall<void*>(
        [&] { return RealMremap(old, old_len, new_len, flags, new_addr); });
  }
  if (Bypass(caller) || (!source && !target)) {
    return RealMremap(old, old_len, new_len, flags, new_addr);
  }
  if (target) {
    // The target is about to be unmapped by the kernel: unmerge and unadvise
    // it first (a no-op change), so the engine tracks nothing there.
    (void)ChangeThroughEngines(new_addr, new_len, Kind::kMove, false,
                               [] { return true; });
  }
  if (!source) return RealMremap(old, old_len, new_len, flags, new_addr);
  bool advised = false;
  void* const moved = ChangeThroughEngines(
      old, old_len, Kind::kMove, MAP_FAILED,
      [&] { return MoveMapping(old, old_len, new_len, flags, new_addr); },
      &advised);
  if (moved == MAP_FAILED) return moved;
  const int err = errno;
  Inside inside;
  // Advice mprotect suspended there (read-only memory) moves too; its new
  // place is then advised memory for the fast paths (Reprotected).
  if (samepage::Engine::Moved(old, old_len, moved, new_len,
                              (flags & MREMAP_DONTUNMAP) != 0)) {
    NoteAdvisedRange(moved, new_len);
  }
  // VM_MERGEABLE moves with the mapping (and stays on a DONTUNMAP source).
  if (advised) {
    if (samepage_madvise(moved, new_len, MADV_MERGEABLE) == 0) {
      NoteAdvisedRange(moved, new_len);
    }
    if (flags & MREMAP_DONTUNMAP) {
      (void)samepage_madvise(old, old_len, MADV_MERGEABLE);
    }
  }
  errno = err;
  return moved;
}

int Mprotect(void* addr, size_t len, int prot, const void* caller) {
  return PkeyMprotect(addr, len, prot, -1, caller);
}

int PkeyMprotect(void* addr, size_t len, int prot, int pkey,
                 const void* caller) {
  // Read+write under the default key keeps a range mergeable; anything
  // else unmerges it first. (A key of its own, 1 and up, would be lost
  // where samepage maps a frame or gives a page back: such memory is not
  // merged, "pk" in proc_maps.h.) The kernel keeps VM_MERGEABLE through
  // it all: the advice waits, and is taken up again once the range is
  // read+write again (Engine::Reprotected).
  const bool mergeable = prot == (PROT_READ | PROT_WRITE) && pkey <= 0;
  if (FromAllocatorOver(caller, addr, len)) {
    return AllocatorCall<int>([&] {
      const int r = RealPkeyMprotect(addr, len, prot, pkey);
      // Readable but not writable, or a key: a merge planned before would
      // map frames read+write there (PROT_NONE fails the read every merge
      // makes under protection). Told before any window can open.
      if (r == 0 && (pkey > 0 || ((prot & (PROT_READ | PROT_EXEC)) != 0 &&
                                  (prot & PROT_WRITE) == 0))) {
        backend::NoteUnseenReprotect();
      }
      return r;
    });
  }
  const bool ours = !Bypass(caller) && MaybeAdvised(addr, len);
  if (mergeable || !ours) {
    const int r = RealPkeyMprotect(addr, len, prot, pkey);
    if (r == 0 && mergeable && ours) {
      const int saved = errno;
      Inside inside;
      samepage::Engine::Reprotected(addr, len);
      errno = saved;
    }
    return r;
  }
  return ChangeThroughEngines(addr, len, Kind::kReprotect, -1, [&] {
    return RealPkeyMprotect(addr, len, prot, pkey);
  });
}

int Mseal(void* addr, size_t len, unsigned long flags, const void* caller) {
  if (FromAllocatorOver(caller, addr, len))
    return AllocatorCall<int>([&] { return RealMseal(addr, len, flags); });
  if (Bypass(caller) || !MaybeAdvised(addr, len)) {
    return RealMseal(addr, len, flags);
  }
  // Unmerged and unadvised first, as for mprotect; where that cannot be
  // done the call fails with ENOMEM and nothing is sealed.
  return ChangeThroughEngines(addr, len, Kind::kMove, -1,
                              [&] { return RealMseal(addr, len, flags); });
}

bool MemorySyscall(long nr, const long* a, const void* caller, long* result) {
  auto ptr = [&](int i) { return reinterpret_cast<void*>(a[i]); };
  auto size = [&](int i) { return static_cast<size_t>(a[i]); };
  auto lock = [&](void* addr, size_t len) {
    LockCall c{nr, a[0], a[1], a[2]};
    return LockChange(addr, len, c, caller);
  };
  if ((nr == SYS_prctl && a[0] == PR_SET_SECCOMP &&
       (a[1] == SECCOMP_MODE_STRICT || a[1] == SECCOMP_MODE_FILTER)) ||
      (nr == SYS_seccomp &&
       (a[0] == SECCOMP_SET_MODE_STRICT || a[0] == SECCOMP_SET_MODE_FILTER))) {
    // Then the call itself, as it was.
    const bool strict = nr == SYS_prctl ? a[1] == SECCOMP_MODE_STRICT
                                        : a[0] == SECCOMP_SET_MODE_STRICT;
    // libseccomp probes for the call with strict mode and flags the kernel
    // refuses (EINVAL): only a call that can take effect counts.
    const bool probe = nr == SYS_seccomp && strict && (a[1] != 0 || a[2] != 0);
    if (!probe && !Bypass(caller)) BeforeSeccomp(strict, ptr(2));
    return false;
  }
  switch (nr) {
    case SYS_madvise:
      *result = Madvise(ptr(0), size(1), static_cast<int>(a[2]), caller);
      return true;
    case SYS_process_madvise:
      *result = ProcessMadvise(
          static_cast<int>(a[0]), static_cast<const struct iovec*>(ptr(1)),
          size(2), static_cast<int>(a[3]), static_cast<unsigned>(a[4]), caller);
      return true;
    case SYS_prctl:
      if (a[0] != SAMEPAGE_PR_SET_MEMORY_MERGE &&
          a[0] != SAMEPAGE_PR_GET_MEMORY_MERGE &&
          !(a[0] == PR_SET_VMA && a[1] == PR_SET_VMA_ANON_NAME)) {
        return false;
      }
      *result = Prctl(static_cast<int>(a[0]), a[1], a[2], a[3], a[4], caller);
      return true;
    case SYS_munmap:
      *result = Munmap(ptr(0), size(1), caller);
      return true;
    case SYS_mmap:
      *result = Arg(Mmap(ptr(0), size(1), static_cast<int>(a[2]),
                         static_cast<int>(a[3]), static_cast<int>(a[4]),
                         static_cast<off_t>(a[5]), caller));
      return true;
    case SYS_mremap:
      *result = Arg(Mremap(ptr(0), size(1), size(2), static_cast<int>(a[3]),
                           ptr(4), caller));
      return true;
    case SYS_mprotect:
      *result = Mprotect(ptr(0), size(1), static_cast<int>(a[2]), caller);
      return true;
    case SYS_pkey_mprotect:
      *result = PkeyMprotect(ptr(0), size(1), static_cast<int>(a[2]),
                             static_cast<int>(a[3]), caller);
      return true;
    case SYS_mseal:
      *result =
          Mseal(ptr(0), size(1), static_cast<unsigned long>(a[2]), caller);
      return true;
    case SYS_mlock:
    case SYS_mlock2:
    case SYS_munlock:
      *result = lock(ptr(0), size(1));
      return true;
    case SYS_mlockall:
    case SYS_munlockall:
      *result = lock(nullptr, SIZE_MAX);
      return true;
    case SYS_ioctl:
      return UserfaultfdIoctl(static_cast<int>(a[0]),
                              static_cast<unsigned long>(a[1]), ptr(2), caller,
                              result);
    default:
      return ForkSyscall(nr, a, result);
  }
}

}  // namespace samepage::preload

using namespace samepage::preload;

SAMEPAGE_EXPORT int munmap(void* addr, size_t len) noexcept {
  return Munmap(addr, len, __builtin_return_address(0));
}

SAMEPAGE_EXPORT void* mmap(void* addr, size_t len, int prot, int flags, int fd,
                           off_t off) noexcept {
  return Mmap(addr, len, prot, flags, fd, off, __builtin_return_address(0));
}

SAMEPAGE_EXPORT void* mmap64(void* addr, size_t len, int prot, int flags,
                             int fd, off_t off) noexcept {
  return Mmap(addr, len, prot, flags, fd, off, __builtin_return_address(0));
}

SAMEPAGE_EXPORT void* mremap(void* old, size_t old_len, size_t new_len,
                             int flags, ...) noexcept {
  void* new_addr = nullptr;
  if (flags & MREMAP_FIXED) {
    va_list ap;
    va_start(ap, flags);
    new_addr = va_arg(ap, void*);
    va_end(ap);
  }
  return Mremap(old, old_len, new_len, flags, new_addr,
                __builtin_return_address(0));
}

SAMEPAGE_EXPORT int mlock(const void* addr, size_t len) noexcept {
  LockCall c{SYS_mlock, Arg(addr), static_cast<long>(len), 0};
  return LockChange(const_cast<void*>(addr), len, c,
                    __builtin_return_address(0));
}

SAMEPAGE_EXPORT int mlock2(const void* addr, size_t len,
                           unsigned int flags) noexcept {
  LockCall c{SYS_mlock2, Arg(addr), static_cast<long>(len),
             static_cast<long>(flags)};
  return LockChange(const_cast<void*>(addr), len, c,
                    __builtin_return_address(0));
}

SAMEPAGE_EXPORT int munlock(const void* addr, size_t len) noexcept {
  LockCall c{SYS_munlock, Arg(addr), static_cast<long>(len), 0};
  return LockChange(const_cast<void*>(addr), len, c,
                    __builtin_return_address(0));
}

SAMEPAGE_EXPORT int mlockall(int flags) noexcept {
  LockCall c{SYS_mlockall, flags, 0, 0};
  return LockChange(nullptr, SIZE_MAX, c, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int munlockall(void) noexcept {
  LockCall c{SYS_munlockall, 0, 0, 0};
  return LockChange(nullptr, SIZE_MAX, c, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int mprotect(void* addr, size_t len, int prot) noexcept {
  return Mprotect(addr, len, prot, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int mseal(void* addr, size_t len,
                          unsigned long flags) noexcept {
  return Mseal(addr, len, flags, __builtin_return_address(0));
}

SAMEPAGE_EXPORT int pkey_mprotect(void* addr, size_t len, int prot,
                                  int pkey) noexcept {
  return PkeyMprotect(addr, len, prot, pkey, __builtin_return_address(0));
}
