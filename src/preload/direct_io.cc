#include "preload/direct_io.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "backend/write_protect.h"
#include "preload/real.h"

namespace samepage::preload {
namespace {

// One bit per descriptor below kTracked; above, fcntl(F_GETFL) answers.
constexpr unsigned kTracked = 1u << 16;
std::atomic<std::uint64_t> g_direct[kTracked / 64];

void SetMark(int fd, bool direct) {
  if (fd < 0 || static_cast<unsigned>(fd) >= kTracked) return;
  const std::uint64_t bit = std::uint64_t{1} << (fd % 64);
  std::atomic<std::uint64_t>& word = g_direct[fd / 64];
  if (direct) {
    // seq_cst: pairs with io_uring.cc's setup, which sets its flag and then
    // looks here, while NoteFileFlags marks here and then looks at the flag.
    word.fetch_or(bit);
  } else if (word.load(std::memory_order_relaxed) & bit) {
    word.fetch_and(~bit, std::memory_order_relaxed);
  }
}

}  // namespace

void NoteFileFlags(int fd, int flags) {
  const bool direct = fd >= 0 && (flags & O_DIRECT) != 0;
  SetMark(fd, direct);
  if (direct && RingSeen()) SuspendForPinningIo();  // before its first read
}

bool AnyDirect() {
  for (const auto& word : g_direct) {
    if (word.load() != 0) return true;  // seq_cst: see SetMark
  }
  return false;
}

void NoteDirectDup(int oldfd, int newfd) {
  if (oldfd != newfd) SetMark(newfd, IsDirect(oldfd));
}

void NoteDirectClosed(int fd) { SetMark(fd, false); }

bool IsDirect(int fd) {
  if (fd < 0) return false;
  if (static_cast<unsigned>(fd) < kTracked) {
    return (g_direct[fd / 64].load(std::memory_order_relaxed) >> (fd % 64)) & 1;
  }
  const long flags = syscall(SYS_fcntl, fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT) != 0;
}

bool CopyFromUser(void* to, const void* from, size_t n) {
  return backend::CopyFromUser(to, from, n);
}

int DirectRead::RegisterRange(const void* buf, size_t n) {
  if (n == 0) return backend::kNoPinnedIo;
  const auto start = reinterpret_cast<std::uintptr_t>(buf) & ~(kPageSize - 1);
  const auto end = reinterpret_cast<std::uintptr_t>(buf) + n;
  return backend::BeginPinnedIo(start, end < start ? UINTPTR_MAX : end);
}

int DirectRead::RegisterVectors(const struct iovec* iov, int iovcnt) {
  if (iovcnt <= 0 || iovcnt > IOV_MAX) return backend::kNoPinnedIo;
  // One range over all the vectors: merges between them are held back too.
  // The vectors are copied without faulting on a bad pointer (the read
  // then fails with EFAULT, as it would without samepage).
  std::uintptr_t lo = UINTPTR_MAX, hi = 0;
  const bool read = ForEachVector(
      iov, static_cast<size_t>(iovcnt), [&](const void* base, size_t len) {
        const auto b = reinterpret_cast<std::uintptr_t>(base);
        if (b + len < b) return;
        lo = b < lo ? b : lo;
        hi = b + len > hi ? b + len : hi;
      });
  if (!read) return backend::kNoPinnedIo;
  if (lo >= hi) return backend::kNoPinnedIo;
  return RegisterRange(reinterpret_cast<const void*>(lo), hi - lo);
}

DirectRead::DirectRead(int fd, const void* buf, size_t n)
    : token_(IsDirect(fd) ? RegisterRange(buf, n) : backend::kNoPinnedIo) {}

DirectRead::DirectRead(int fd, const struct iovec* iov, int iovcnt)
    : token_(IsDirect(fd) ? RegisterVectors(iov, iovcnt)
                          : backend::kNoPinnedIo) {}

DirectRead::~DirectRead() { backend::EndPinnedIo(token_); }

}  // namespace samepage::preload

// --- the vector reads ---

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

using samepage::preload::DirectRead;
using samepage::preload::g_real;

SAMEPAGE_EXPORT ssize_t readv(int fd, const struct iovec* iov, int n) {
  DirectRead guard(fd, iov, n);
  if (auto f = __atomic_load_n(&g_real.readv, __ATOMIC_ACQUIRE))
    return f(fd, iov, n);
  return syscall(SYS_readv, fd, iov, n);
}

namespace {

// The offset in two words, as preadv(2) and preadv2(2) take it.
unsigned long OffsetLow(off_t off) {
  return static_cast<unsigned long>(static_cast<unsigned long long>(off));
}
unsigned long OffsetHigh(off_t off) {
  return static_cast<unsigned long>(static_cast<unsigned long long>(off) >>
                                    32 >> 32);
}

}  // namespace

SAMEPAGE_EXPORT ssize_t preadv(int fd, const struct iovec* iov, int n,
                               off_t off) {
  DirectRead guard(fd, iov, n);
  if (auto f = __atomic_load_n(&g_real.preadv, __ATOMIC_ACQUIRE))
    return f(fd, iov, n, off);
  return syscall(SYS_preadv, fd, iov, n, OffsetLow(off), OffsetHigh(off));
}

SAMEPAGE_EXPORT ssize_t preadv2(int fd, const struct iovec* iov, int n,
                                off_t off, int flags) {
  DirectRead guard(fd, iov, n);
  if (auto f = __atomic_load_n(&g_real.preadv2, __ATOMIC_ACQUIRE))
    return f(fd, iov, n, off, flags);
  return syscall(SYS_preadv2, fd, iov, n, OffsetLow(off), OffsetHigh(off),
                 flags);
}

// off_t is 64 bits here: the *64 names are the same functions, as in libc.
static_assert(sizeof(off_t) == 8);
SAMEPAGE_EXPORT ssize_t preadv64(int fd, const struct iovec* iov, int n,
                                 off_t off) __attribute__((alias("preadv")));
SAMEPAGE_EXPORT ssize_t preadv64v2(int fd, const struct iovec* iov, int n,
                                   off_t off, int flags)
    __attribute__((alias("preadv2")));
