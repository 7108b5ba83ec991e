// Forks that bypass fork(): a clone, clone3 or fork system call made
// directly through syscall(), and glibc's clone(), without CLONE_VM. None
// runs the pthread_atfork handlers that fork() runs, and samepage's are
// what pins every frame a child may map: unpinned, the parent would free
// (punch) a frame once its own pages left it, and the child's pages that
// still mapped it would read zeros (until 2026-12-06; tests/preload/
// raw_fork_test.c). Here samepage's handlers run around such a call, as
// fork() would run them (Engine::BeforeRawFork, AfterRawFork); the
// program's own handlers are not run, as the call would not run them.
//
// Only forks whose child goes on in the caller's stack (a copy of it: no
// new stack given) go through syscall() this way, since the child
// returns through the interposer; with a new stack glibc's syscall()
// itself could not return in the child, and the call passes through as it
// was. glibc's clone() starts the child in its function on its own stack:
// the child's handler runs there, before the program's function.
//
// Thread safety: as the libc calls.

#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/types.h>

#include "backend/write_protect.h"
#include "preload/memory_calls.h"
#include "preload/real.h"
#include "samepage/engine.h"

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

#ifndef SYS_clone3
#define SYS_clone3 435
#endif

namespace samepage::preload {

bool ForkSyscall(long nr, const long* a, long* result) {
  switch (nr) {
#ifdef SYS_fork
    case SYS_fork:
      break;
#endif
    case SYS_clone:
      // x86-64's order: flags, stack, parent_tid, child_tid, tls.
      if ((a[0] & CLONE_VM) || a[1] != 0) return false;
      break;
    case SYS_clone3: {
      // struct clone_args: flags at 0, stack at 40 (bytes); 64 bytes in its
      // first version. Anything the kernel would refuse goes to it as it is.
      std::uint64_t head[6];
      if (a[0] == 0 || static_cast<std::size_t>(a[1]) < sizeof(head) ||
          !backend::CopyFromUser(head, reinterpret_cast<const void*>(a[0]),
                                 sizeof(head))) {
        return false;
      }
      if ((head[0] & CLONE_VM) || head[5] != 0) return false;
      break;
    }
    default:
      return false;
  }
  samepage::Engine::BeforeRawFork();
  *result = DirectSyscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
  samepage::Engine::AfterRawFork(/*in_child=*/*result == 0);
  return true;
}

namespace {

using CloneFn = int (*)(int (*)(void*), void*, int, void*, ...);
CloneFn g_clone = nullptr;

// A clone() call, on the parent's stack (the child reads its copy).
struct CloneCall {
  int (*fn)(void*);
  void* arg;
};

int ChildStart(void* p) {
  const auto* c = static_cast<const CloneCall*>(p);
  samepage::Engine::AfterRawFork(/*in_child=*/true);
  return c->fn(c->arg);
}

}  // namespace
}  // namespace samepage::preload

using namespace samepage::preload;

SAMEPAGE_EXPORT int clone(int (*fn)(void*), void* stack, int flags, void* arg,
                          ...) noexcept {
  // As glibc's: the three optional arguments are read whether passed or
  // not; the kernel looks only at those the flags name.
  va_list ap;
  va_start(ap, arg);
  pid_t* parent_tid = va_arg(ap, pid_t*);
  void* tls = va_arg(ap, void*);
  pid_t* child_tid = va_arg(ap, pid_t*);
  va_end(ap);
  const CloneFn real = NextSymbol(&g_clone, "clone");
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  if (flags & CLONE_VM) {
    return real(fn, stack, flags, arg, parent_tid, tls, child_tid);
  }
  CloneCall call{fn, arg};
  samepage::Engine::BeforeRawFork();
  const int r =
      real(ChildStart, stack, flags, &call, parent_tid, tls, child_tid);
  samepage::Engine::AfterRawFork(/*in_child=*/false);
  return r;
}
