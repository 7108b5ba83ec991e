// The memory calls the preload interposes, with the caller's return address
// (for Bypass, real.h) passed in: the exported functions pass their own
// caller, and syscall(2) the program's when it is asked for one of these
// calls by number (MemorySyscall). A program calls mseal that way where
// its C library has no wrapper (glibc before 2.41, Debian 12's 2.36), and
// process_madvise before glibc 2.36; without this a merged page would
// meet the kernel's call as a mapping of a frame (a discard reading the
// frame's bytes back instead of zeros, a sealed range samepage could no
// longer give back).
//
// Each returns what the C library's function returns (-1 and errno on
// failure; mmap and mremap MAP_FAILED).
//
// Thread safety: as the libc calls; any thread, any time.

#ifndef SAMEPAGE_PRELOAD_MEMORY_CALLS_H_
#define SAMEPAGE_PRELOAD_MEMORY_CALLS_H_

#include <errno.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "preload/real.h"
#include "samepage/engine.h"

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41  // Linux 5.17 (Prctl, MemorySyscall)
#define PR_SET_VMA_ANON_NAME 0
#endif

namespace samepage::preload {

// preload.cc
int Madvise(void* addr, size_t len, int advice, const void* caller);
ssize_t ProcessMadvise(int pidfd, const struct iovec* iov, size_t n, int advice,
                       unsigned int flags, const void* caller);
int Prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
          unsigned long a5, const void* caller);

// ioctl(UFFDIO_REGISTER) of the application's own userfaultfd: true and
// *result set if `request` is that (the engines' registration leaves the
// range first); false for any other request (nothing done).
bool UserfaultfdIoctl(int fd, unsigned long request, void* arg,
                      const void* caller, long* result);

// mappings.cc
int Munmap(void* addr, size_t len, const void* caller);
void* Mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off,
           const void* caller);
void* Mremap(void* old, size_t old_len, size_t new_len, int flags,
             void* new_addr, const void* caller);
int Mprotect(void* addr, size_t len, int prot, const void* caller);
// pkey_mprotect; pkey -1 is mprotect's way.
int PkeyMprotect(void* addr, size_t len, int prot, int pkey,
                 const void* caller);
// mseal (Linux 6.10): a sealed range cannot be unmapped, moved, reprotected
// or replaced, so samepage could never give its merged pages back (and
// never merges sealed memory): it is unmerged and unadvised first.
int Mseal(void* addr, size_t len, unsigned long flags, const void* caller);

// System call `nr` with arguments a[0..5], where it is one of the calls
// above or the lock calls (mlock, mlock2, munlock, mlockall, munlockall):
// run through them, *result set as syscall(2) returns it; true. False for
// any other call (nothing done).
bool MemorySyscall(long nr, const long* a, const void* caller, long* result);

// seccomp.cc: before the program installs a seccomp filter (prog: its
// struct sock_fprog) or strict mode, samepage steps aside for good if the
// filter would refuse a system call samepage makes (Retire, real.h).
void BeforeSeccomp(bool strict, const void* prog);

// For the interposers: runs `call` (the real call, which returns `failed`
// and sets errno when it fails) as the change of [addr, addr + len)
// through Engine::ChangeMapping (see there for `kind` and `advised`), and
// returns what it returned, with errno as it left it. Where the engines
// refuse the change (a range they cannot unmerge), `call` never runs: the
// caller sees `failed` and ENOMEM.
template <typename T, typename Call>
T ChangeThroughEngines(void* addr, size_t len, Engine::MappingChange kind,
                       T failed, Call call, bool* advised = nullptr) {
  struct State {
    Call& call;
    T failed, result;
    int err;
  };
  State s{call, failed, failed, ENOMEM};
  {
    Inside inside;
    (void)Engine::ChangeMapping(
        addr, len, kind,
        [](void* p) {
          auto* s = static_cast<State*>(p);
          s->result = s->call();
          s->err = errno;
          return s->result != s->failed;
        },
        &s, advised);
  }
  errno = s.err;
  return s.result;
}

// True for a call from inside the program's own allocator (mimalloc unmaps
// its segments), or perhaps so (MayBeInsideAllocator, real.h), over memory
// that may be merged: it cannot go through the engines, which allocate,
// but it must not run while a merge window is open: AllocatorCall.
inline bool FromAllocatorOver(const void* caller, const void* addr,
                              size_t len) {
  return MayBeInsideAllocator(caller) && !Retired() && MaybeAdvised(addr, len);
}

// Runs `call` (the real call) with no merge window open in the process
// (Engine::AllocatorChange) and returns what it returned, with errno as it
// left it.
template <typename R, typename Call>
R AllocatorCall(const Call& call) {
  struct Ctx {
    const Call* call;
    R result;
    int err;
  } ctx{&call, R{}, 0};
  (void)Engine::AllocatorChange(
      [](void* arg) {
        auto* c = static_cast<Ctx*>(arg);
        c->result = (*c->call)();
        c->err = errno;
        return true;
      },
      &ctx);
  errno = ctx.err;
  return ctx.result;
}

// raw_fork.cc: system call `nr` with arguments a[0..5], where it is a fork
// (clone or clone3 without CLONE_VM and without a new stack, fork): run
// with samepage's fork handlers around it, *result set as syscall(2)
// returns it (in the parent and in the child); true. False for any other
// call (nothing done).
bool ForkSyscall(long nr, const long* a, long* result);

}  // namespace samepage::preload

#endif  // SAMEPAGE_PRELOAD_MEMORY_CALLS_H_
