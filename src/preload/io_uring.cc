// io_uring together with O_DIRECT: a process that has both merges no more.
//
// An io_uring reads into buffers named in shared-memory rings, with no
// system call per request (none at all with SQPOLL). A read of an O_DIRECT
// file pins the buffer while the device writes into it: a page merged
// meanwhile would keep its old bytes (buffered reads copy through page
// faults, which merge windows make wait or fail, never lose). samepage
// cannot see which pages a ring reads into, so once the process has set
// up a ring and opened a file O_DIRECT, in either order, every page counts
// as pinned (backend::NotePinningIoInUse): nothing more is merged, with
// one line on stderr saying so. A ring alone (QEMU's event loop polls
// through one) changes nothing. The setup is seen where it goes through
// syscall(SYS_io_uring_setup) (the io-uring crates, most hand-written
// code) or liburing's setup functions (liburing makes its system calls
// inline); O_DIRECT where direct_io.h sees it.
//
// Registered (fixed) buffers stay pinned from registration, whatever the
// files: before a registration seen here (syscall(SYS_io_uring_register),
// liburing's io_uring_register_buffers*) reaches the kernel, the buffers
// are kept out of merging in every engine (Engine::KernelPins).
//
// Not covered (docs/limitations.md item 18): rings set up, and buffers
// registered, with a raw system call or a static liburing.
//
// syscall() itself: the memory calls by number (madvise, process_madvise,
// mmap, munmap, mremap, mprotect, pkey_mprotect, mseal, the lock calls,
// prctl's PR_SET/GET_MEMORY_MERGE) go where their libc functions go
// (memory_calls.h); everything else is passed on as glibc's is: the raw
// system call, -1 and errno on an error (x86-64).
//
// Thread safety: any thread; async-signal-safe except the first call of a
// liburing function (dlsym).

#include <dlfcn.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <stdarg.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <atomic>
#include <cstddef>

#include "backend/write_protect.h"
#include "preload/direct_io.h"
#include "preload/memory_calls.h"
#include "preload/real.h"
#include "samepage/engine.h"

namespace samepage::preload {
namespace {

std::atomic<bool> g_ring_seen{false};

void SetupSeen() {
  g_ring_seen.store(true);
  if (AnyDirect()) SuspendForPinningIo();
}

}  // namespace

void SuspendForPinningIo() {
  backend::NotePinningIoInUse();
  static std::atomic<bool> told{false};
  if (told.exchange(true)) return;
  static const char kLine[] =
      "samepage: this process reads with O_DIRECT and has an io_uring; "
      "samepage cannot see which pages the ring's reads pin, so it merges "
      "no more pages (docs/limitations.md item 18)\n";
  (void)RealWrite(2, kLine, sizeof(kLine) - 1);
}

bool RingSeen() { return g_ring_seen.load(); }

namespace {

// Buffers about to be registered with a ring (pinned from then on, and
// written into directly): kept out of merging first, in every engine.
void KeepOutVectors(const struct iovec* iov, unsigned n) {
  constexpr unsigned kMaxBuffers = 1u << 14;  // IORING_MAX_REG_BUFFERS
  if (n > kMaxBuffers) return;                // the kernel refuses it (EINVAL)
  (void)ForEachVector(iov, n, [](void* base, size_t len) {
    if (base == nullptr) return;
    Inside inside;
    (void)Engine::KernelPins(base, len);
  });
}

void BeforeRegister(unsigned op, const void* arg, unsigned nr_args) {
  op &= ~(1u << 31);  // IORING_REGISTER_USE_REGISTERED_RING
  if (op == IORING_REGISTER_BUFFERS) {
    KeepOutVectors(static_cast<const struct iovec*>(arg), nr_args);
  } else if (op == IORING_REGISTER_BUFFERS2) {
    struct io_uring_rsrc_register r;
    if (CopyFromUser(&r, arg, sizeof(r))) {
      KeepOutVectors(reinterpret_cast<const struct iovec*>(r.data), r.nr);
    }
  } else if (op == IORING_REGISTER_BUFFERS_UPDATE) {
    struct io_uring_rsrc_update2 u;
    if (CopyFromUser(&u, arg, sizeof(u))) {
      KeepOutVectors(reinterpret_cast<const struct iovec*>(u.data), u.nr);
    }
  }
}

}  // namespace
}  // namespace samepage::preload

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

SAMEPAGE_EXPORT long syscall(long number, ...) noexcept {
  long a[6];
  va_list ap;
  va_start(ap, number);
  samepage::preload::SyscallArgs(ap, a);
  va_end(ap);
  // The memory calls by number go where their libc functions go
  // (memory_calls.h). They make their own system calls with DirectSyscall
  // (real.h), never through here; should one arrive here all the same
  // (from a signal handler, say), it goes straight to the kernel.
  static __thread int t_nested __attribute__((tls_model("initial-exec")));
  if (t_nested == 0) {
    long r = 0;
    ++t_nested;
    const bool ours = samepage::preload::MemorySyscall(
        number, a, __builtin_return_address(0), &r);
    --t_nested;
    if (ours) return r;
  }
  // Before the ring exists, so before any read it makes.
  if (number == SYS_io_uring_setup) samepage::preload::SetupSeen();
  if (number == SYS_io_uring_register) {
    samepage::preload::BeforeRegister(static_cast<unsigned>(a[1]),
                                      reinterpret_cast<const void*>(a[2]),
                                      static_cast<unsigned>(a[3]));
  }
  return samepage::preload::DirectSyscall6(number, a[0], a[1], a[2], a[3], a[4],
                                           a[5]);
}

// liburing (int-returning, -errno on failure). The structures are opaque
// here: only passed on.
namespace {
using InitFn = int (*)(unsigned, void*, unsigned);
using InitParamsFn = int (*)(unsigned, void*, void*);
using InitMemFn = int (*)(unsigned, void*, void*, void*, std::size_t);
using SetupFn = int (*)(unsigned, void*);
InitFn g_init = nullptr;
InitParamsFn g_init_params = nullptr;
InitMemFn g_init_mem = nullptr;
SetupFn g_setup = nullptr;
}  // namespace

SAMEPAGE_EXPORT int io_uring_queue_init(unsigned entries, void* ring,
                                        unsigned flags) {
  samepage::preload::SetupSeen();
  auto f = samepage::preload::NextSymbol(&g_init, "io_uring_queue_init");
  return f != nullptr ? f(entries, ring, flags) : -ENOSYS;
}

SAMEPAGE_EXPORT int io_uring_queue_init_params(unsigned entries, void* ring,
                                               void* params) {
  samepage::preload::SetupSeen();
  auto f = samepage::preload::NextSymbol(&g_init_params,
                                         "io_uring_queue_init_params");
  return f != nullptr ? f(entries, ring, params) : -ENOSYS;
}

SAMEPAGE_EXPORT int io_uring_queue_init_mem(unsigned entries, void* ring,
                                            void* params, void* buf,
                                            std::size_t size) {
  samepage::preload::SetupSeen();
  auto f =
      samepage::preload::NextSymbol(&g_init_mem, "io_uring_queue_init_mem");
  return f != nullptr ? f(entries, ring, params, buf, size) : -ENOSYS;
}

using RegisterFn = int (*)(void*, const struct iovec*, unsigned);
using RegisterTagsFn = int (*)(void*, const struct iovec*, const void*,
                               unsigned);
using UpdateTagFn = int (*)(void*, unsigned, const struct iovec*, const void*,
                            unsigned);
RegisterFn g_register = nullptr;
RegisterTagsFn g_register_tags = nullptr;
UpdateTagFn g_update_tag = nullptr;

SAMEPAGE_EXPORT int io_uring_register_buffers(void* ring,
                                              const struct iovec* iovecs,
                                              unsigned nr) {
  samepage::preload::KeepOutVectors(iovecs, nr);
  auto f =
      samepage::preload::NextSymbol(&g_register, "io_uring_register_buffers");
  return f != nullptr ? f(ring, iovecs, nr) : -ENOSYS;
}

SAMEPAGE_EXPORT int io_uring_register_buffers_tags(void* ring,
                                                   const struct iovec* iovecs,
                                                   const void* tags,
                                                   unsigned nr) {
  samepage::preload::KeepOutVectors(iovecs, nr);
  auto f = samepage::preload::NextSymbol(&g_register_tags,
                                         "io_uring_register_buffers_tags");
  return f != nullptr ? f(ring, iovecs, tags, nr) : -ENOSYS;
}

SAMEPAGE_EXPORT int io_uring_register_buffers_update_tag(
    void* ring, unsigned off, const struct iovec* iovecs, const void* tags,
    unsigned nr) {
  samepage::preload::KeepOutVectors(iovecs, nr);
  auto f = samepage::preload::NextSymbol(
      &g_update_tag, "io_uring_register_buffers_update_tag");
  return f != nullptr ? f(ring, off, iovecs, tags, nr) : -ENOSYS;
}

SAMEPAGE_EXPORT int io_uring_setup(unsigned entries, void* params) {
  samepage::preload::SetupSeen();
  auto f = samepage::preload::NextSymbol(&g_setup, "io_uring_setup");
  return f != nullptr ? f(entries, params) : -ENOSYS;
}
