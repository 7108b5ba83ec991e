#include "backend/own_fds.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

namespace samepage::backend {
namespace {

constexpr int kSlots = kMaxOwnFds;
constexpr int kHighBase = 512;
// fd + 1 in each slot, 0 where free: zero-initialised, so usable before
// any constructor runs (the preload is entered early).
std::atomic<int> g_slots[kSlots];
std::atomic<int> g_used{0};  // slots ever used: the scan's bound

int HighBase() {
  rlimit lim;
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY) {
    return kHighBase;
  }
  const auto half = static_cast<int>(lim.rlim_cur / 2);
  return half < kHighBase ? half : kHighBase;
}

}  // namespace

int AdoptOwnFd(int fd) {
  if (fd < 0) return fd;
  const int saved = errno;
  const int base = HighBase();
  if (fd < base && base > 2) {
    const int high = fcntl(fd, F_DUPFD_CLOEXEC, base);
    if (high >= 0) {
      close(fd);
      fd = high;
    }
  }
  errno = saved;
  for (int i = 0; i < kSlots; ++i) {
    int empty = 0;
    if (g_slots[i].compare_exchange_strong(empty, fd + 1)) {
      int used = g_used.load();
      while (used < i + 1 && !g_used.compare_exchange_weak(used, i + 1)) {
      }
      return fd;
    }
  }
  return fd;  // registry full: kept, unprotected
}

void CloseOwnFd(int fd) {
  if (fd < 0) return;
  const int used = g_used.load(std::memory_order_acquire);
  for (int i = 0; i < used; ++i) {
    int mine = fd + 1;
    if (g_slots[i].compare_exchange_strong(mine, 0)) break;
  }
  close(fd);
}

bool IsOwnFd(int fd) {
  if (fd < 0) return false;
  const int used = g_used.load(std::memory_order_acquire);
  for (int i = 0; i < used; ++i) {
    if (g_slots[i].load(std::memory_order_relaxed) == fd + 1) return true;
  }
  return false;
}

int CopyOwnFds(int* out, int max) {
  const int used = g_used.load(std::memory_order_acquire);
  int n = 0;
  for (int i = 0; i < used && n < max; ++i) {
    const int v = g_slots[i].load(std::memory_order_relaxed);
    if (v == 0) continue;
    int k = n++;
    for (; k > 0 && out[k - 1] > v - 1; --k) out[k] = out[k - 1];
    out[k] = v - 1;
  }
  return n;
}

}  // namespace samepage::backend
