// Asynchronous reads in flight, held back from merges: libaio (io_submit
// and friends) here, POSIX AIO (aio_read, lio_listio) at the end.
//
// Linux native AIO pins a read's buffer at io_submit and the device writes
// into it until the I/O completes, long after the call returned. The
// preload defines libaio's entry points (a program linked with libaio.so.1
// calls these first), registers the buffer of every submitted read
// (IOCB_CMD_PREAD, IOCB_CMD_PREADV) with backend::BeginPinnedIo before the
// kernel sees it, and ends the registration when io_getevents or
// io_pgetevents hands back its completion, or io_destroy has waited for
// it. The calls themselves are the system calls, with libaio's convention
// (a negative errno returned, errno untouched), as libaio.so.1 makes them.
//
// Not covered: programs that make the system calls themselves or reap
// completions from the ring in user space (their registrations then end
// only at io_destroy: merges stay held back, never wrong), and libaio's
// LIBAIO_0.1 io_getevents, a different signature from 2002.
//
// Thread safety: any thread; the table of submitted reads has a mutex
// (these calls are not async-signal-safe in libaio either).

#include <aio.h>
#include <dlfcn.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>

#include "backend/write_protect.h"
#include "preload/direct_io.h"
#include "preload/real.h"

namespace samepage::preload {
namespace {

// A read submitted and not yet reaped.
struct Pending {
  std::uintptr_t iocb = 0;  // 0: free
  aio_context_t ctx = 0;
  int token = backend::kNoPinnedIo;
};
constexpr std::size_t kTable = 4096;
Pending g_pending[kTable];
std::size_t g_pending_count = 0;
pthread_mutex_t g_pending_mu = PTHREAD_MUTEX_INITIALIZER;

std::size_t Hash(std::uintptr_t iocb) { return (iocb >> 6) % kTable; }

// Remembers one submitted read. With the table full it is not remembered:
// its registration is then never ended, which holds merges over it back
// for good (never wrong, only less merging).
void Add(aio_context_t ctx, std::uintptr_t iocb, int token) {
  pthread_mutex_lock(&g_pending_mu);
  if (g_pending_count < kTable - 1) {
    std::size_t i = Hash(iocb);
    while (g_pending[i].iocb != 0) i = (i + 1) % kTable;
    g_pending[i] = Pending{iocb, ctx, token};
    ++g_pending_count;
  }
  pthread_mutex_unlock(&g_pending_mu);
}

// Removes entry i (open addressing, linear probing): the entries of the
// cluster after it are placed again. REQUIRES: g_pending_mu held.
void RemoveAt(std::size_t i) {
  backend::EndPinnedIo(g_pending[i].token);
  g_pending[i] = Pending{};
  --g_pending_count;
  for (std::size_t j = (i + 1) % kTable; g_pending[j].iocb != 0;
       j = (j + 1) % kTable) {
    const Pending moved = g_pending[j];
    g_pending[j] = Pending{};
    std::size_t k = Hash(moved.iocb);
    while (g_pending[k].iocb != 0) k = (k + 1) % kTable;
    g_pending[k] = moved;
  }
}

// A completion reaped: ends the registration of that read.
void EndOne(aio_context_t ctx, std::uintptr_t iocb) {
  pthread_mutex_lock(&g_pending_mu);
  for (std::size_t i = Hash(iocb); g_pending[i].iocb != 0;
       i = (i + 1) % kTable) {
    if (g_pending[i].iocb == iocb && g_pending[i].ctx == ctx) {
      RemoveAt(i);
      break;
    }
  }
  pthread_mutex_unlock(&g_pending_mu);
}

// io_destroy: every read of the context is over.
void EndContext(aio_context_t ctx) {
  pthread_mutex_lock(&g_pending_mu);
  // A removal moves later entries of its cluster, perhaps (where the
  // cluster wraps around the table's end) to slots already passed: pass
  // again until a pass finds none.
  for (bool found = true; found;) {
    found = false;
    for (std::size_t i = 0; i < kTable; ++i) {
      if (g_pending[i].iocb != 0 && g_pending[i].ctx == ctx) {
        RemoveAt(i);
        found = true;
      }
    }
  }
  pthread_mutex_unlock(&g_pending_mu);
}

// The registration for one iocb: kNoPinnedIo if it is not a read.
int Register(const struct iocb* user) {
  struct iocb cb;
  if (!CopyFromUser(&cb, user, sizeof(cb))) return backend::kNoPinnedIo;
  if (cb.aio_lio_opcode == IOCB_CMD_PREAD) {
    return DirectRead::RegisterRange(reinterpret_cast<void*>(cb.aio_buf),
                                     cb.aio_nbytes);
  }
  if (cb.aio_lio_opcode == IOCB_CMD_PREADV && cb.aio_nbytes <= IOV_MAX) {
    return DirectRead::RegisterVectors(
        reinterpret_cast<const struct iovec*>(cb.aio_buf),
        static_cast<int>(cb.aio_nbytes));
  }
  return backend::kNoPinnedIo;
}

long Ret(long r) { return r < 0 ? -errno : r; }

void Reaped(aio_context_t ctx, long n, const struct io_event* events) {
  for (long i = 0; i < n; ++i) {
    struct io_event e;
    if (CopyFromUser(&e, events + i, sizeof(e))) {
      EndOne(ctx, static_cast<std::uintptr_t>(e.obj));
    }
  }
}

}  // namespace
}  // namespace samepage::preload

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

SAMEPAGE_EXPORT int io_submit(aio_context_t ctx, long nr, struct iocb** iocbs) {
  namespace p = samepage::preload;
  // Registered before the kernel sees them: the pins come after.
  constexpr long kChunk = 256;
  long done = 0;
  while (done < nr || nr == 0) {
    const long n = nr - done < kChunk ? nr - done : kChunk;
    struct iocb* cbs[kChunk];
    int tokens[kChunk];
    if (nr <= 0 || !p::CopyFromUser(cbs, iocbs + done, n * sizeof(cbs[0]))) {
      // The kernel's answer (EINVAL, EFAULT) for what it sees.
      const long r =
          p::Ret(syscall(SYS_io_submit, ctx, nr - done, iocbs + done));
      return static_cast<int>(done > 0 ? (r > 0 ? done + r : done) : r);
    }
    for (long i = 0; i < n; ++i) tokens[i] = p::Register(cbs[i]);
    const long r = p::Ret(syscall(SYS_io_submit, ctx, n, cbs));
    const long accepted = r > 0 ? r : 0;
    for (long i = 0; i < n; ++i) {
      if (tokens[i] == samepage::backend::kNoPinnedIo) continue;
      if (i < accepted) {
        p::Add(ctx, reinterpret_cast<std::uintptr_t>(cbs[i]), tokens[i]);
      } else {
        samepage::backend::EndPinnedIo(tokens[i]);  // never submitted
      }
    }
    if (r < 0) return static_cast<int>(done > 0 ? done : r);
    done += accepted;
    if (accepted < n) break;
  }
  return static_cast<int>(done);
}

SAMEPAGE_EXPORT int io_getevents(aio_context_t ctx, long min_nr, long nr,
                                 struct io_event* events,
                                 struct timespec* timeout) {
  namespace p = samepage::preload;
  const long r =
      p::Ret(syscall(SYS_io_getevents, ctx, min_nr, nr, events, timeout));
  if (r > 0) p::Reaped(ctx, r, events);
  return static_cast<int>(r);
}

SAMEPAGE_EXPORT int io_pgetevents(aio_context_t ctx, long min_nr, long nr,
                                  struct io_event* events,
                                  struct timespec* timeout,
                                  const sigset_t* sigmask) {
  namespace p = samepage::preload;
  struct {
    const sigset_t* mask;
    unsigned long size;
  } sig = {sigmask, _NSIG / 8};
  const long r = p::Ret(syscall(SYS_io_pgetevents, ctx, min_nr, nr, events,
                                timeout, sigmask != nullptr ? &sig : nullptr));
  if (r > 0) p::Reaped(ctx, r, events);
  return static_cast<int>(r);
}

SAMEPAGE_EXPORT int io_destroy(aio_context_t ctx) {
  namespace p = samepage::preload;
  // The kernel waits for every I/O of the context before it returns.
  const long r = p::Ret(syscall(SYS_io_destroy, ctx));
  if (r == 0) p::EndContext(ctx);
  return static_cast<int>(r);
}

// --- POSIX AIO (glibc's aio_read, lio_listio) ---
//
// glibc runs each request in a helper thread with its own pread, which no
// interposer sees; on an O_DIRECT descriptor that read pins the buffer. So
// a read is registered from aio_read (or lio_listio) until aio_return
// hands back its result, once aio_error no longer says EINPROGRESS: the
// program must call aio_return once per request, as POSIX requires; one
// that never does keeps merges held back over the buffer (never wrong).
// Buffered requests copy through page faults and are not registered.

namespace samepage::preload {
namespace {

// Key 0 in the table: no kernel AIO context is 0.
constexpr aio_context_t kPosixAio = 0;

int (*g_aio_read)(struct aiocb*) = nullptr;
int (*g_lio_listio)(int, struct aiocb* const[], int,
                    struct sigevent*) = nullptr;
ssize_t (*g_aio_return)(struct aiocb*) = nullptr;
int (*g_aio_error)(const struct aiocb*) = nullptr;

// The registration for a request about to be queued (kNoPinnedIo if it is
// not a direct read).
int RegisterPosix(const struct aiocb* user, bool from_list) {
  struct aiocb cb;
  if (user == nullptr || !CopyFromUser(&cb, user, sizeof(cb))) {
    return backend::kNoPinnedIo;
  }
  if ((from_list && cb.aio_lio_opcode != LIO_READ) ||
      !IsDirect(cb.aio_fildes)) {
    return backend::kNoPinnedIo;
  }
  return DirectRead::RegisterRange(const_cast<const void*>(cb.aio_buf),
                                   cb.aio_nbytes);
}

}  // namespace
}  // namespace samepage::preload

SAMEPAGE_EXPORT int aio_read(struct aiocb* cb) noexcept {
  namespace p = samepage::preload;
  auto real = p::NextSymbol(&p::g_aio_read, "aio_read");
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  const int token = p::RegisterPosix(cb, /*from_list=*/false);
  const int r = real(cb);
  if (token != samepage::backend::kNoPinnedIo) {
    if (r == 0) {
      p::Add(p::kPosixAio, reinterpret_cast<std::uintptr_t>(cb), token);
    } else {
      const int saved = errno;
      samepage::backend::EndPinnedIo(token);
      errno = saved;
    }
  }
  return r;
}

SAMEPAGE_EXPORT int lio_listio(int mode, struct aiocb* const list[], int n,
                               struct sigevent* sig) noexcept {
  namespace p = samepage::preload;
  auto real = p::NextSymbol(&p::g_lio_listio, "lio_listio");
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  constexpr int kMax = 1024;  // AIO_LISTIO_MAX is 2^31 on glibc; past this,
                              // requests are not registered
  struct aiocb* cbs[kMax];
  int tokens[kMax];
  const int count =
      n > 0 && n <= kMax && p::CopyFromUser(cbs, list, n * sizeof(cbs[0])) ? n
                                                                           : 0;
  for (int i = 0; i < count; ++i) {
    tokens[i] = p::RegisterPosix(cbs[i], /*from_list=*/true);
  }
  const int r = real(mode, list, n, sig);
  const int saved = errno;
  // EAGAIN and EINVAL: nothing was queued. Otherwise (EIO: some request
  // failed) every request has a result for aio_return.
  const bool queued = r == 0 || (saved != EAGAIN && saved != EINVAL);
  for (int i = 0; i < count; ++i) {
    if (tokens[i] == samepage::backend::kNoPinnedIo) continue;
    if (queued) {
      p::Add(p::kPosixAio, reinterpret_cast<std::uintptr_t>(cbs[i]), tokens[i]);
    } else {
      samepage::backend::EndPinnedIo(tokens[i]);
    }
  }
  errno = saved;
  return r;
}

SAMEPAGE_EXPORT ssize_t aio_return(struct aiocb* cb) noexcept {
  namespace p = samepage::preload;
  auto real = p::NextSymbol(&p::g_aio_return, "aio_return");
  auto error = p::NextSymbol(&p::g_aio_error, "aio_error");
  if (real == nullptr || error == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  // Called too early (the request still running), it says so and the
  // registration stays.
  const bool done = error(cb) != EINPROGRESS;
  const ssize_t r = real(cb);
  if (done) {
    const int saved = errno;
    p::EndOne(p::kPosixAio, reinterpret_cast<std::uintptr_t>(cb));
    errno = saved;
  }
  return r;
}

// off_t is 64 bits here: the *64 structures and functions are the same, as
// in glibc.
static_assert(sizeof(struct aiocb64) == sizeof(struct aiocb));
SAMEPAGE_EXPORT int aio_read64(struct aiocb64* cb) noexcept {
  return aio_read(reinterpret_cast<struct aiocb*>(cb));
}
SAMEPAGE_EXPORT int lio_listio64(int mode, struct aiocb64* const list[], int n,
                                 struct sigevent* sig) noexcept {
  return lio_listio(mode, reinterpret_cast<struct aiocb* const*>(list), n, sig);
}
SAMEPAGE_EXPORT ssize_t aio_return64(struct aiocb64* cb) noexcept {
  return aio_return(reinterpret_cast<struct aiocb*>(cb));
}
