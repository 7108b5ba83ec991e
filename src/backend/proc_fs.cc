#include "backend/proc_fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "backend/own_fds.h"

namespace samepage::backend {
namespace {

constexpr char kProc[] = "/proc/";
constexpr std::size_t kProcLen = sizeof(kProc) - 1;

// -2 until a root is published; the first descriptor to be published wins.
std::atomic<int> g_root{-2};

}  // namespace

int ProcRootFd() {
  int fd = g_root.load(std::memory_order_acquire);
  if (fd != -2) return fd;
  const int saved = errno;
  // O_PATH: nothing is read through it; it only anchors lookups.
  int fresh =
      AdoptOwnFd(open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW));
  errno = saved;
  // Not reachable (yet): left unpublished, so a later call tries again.
  if (fresh < 0) return -1;
  if (g_root.compare_exchange_strong(fd, fresh, std::memory_order_acq_rel)) {
    return fresh;
  }
  CloseOwnFd(fresh);  // a racing caller published first
  errno = saved;
  return fd;
}

int ProcAt(const char* path, const char** rel) {
  *rel = path;
  if (std::strncmp(path, kProc, kProcLen) != 0) return AT_FDCWD;
  const int root = ProcRootFd();
  if (root < 0) return AT_FDCWD;
  *rel = path + kProcLen;
  return root;
}

int OpenProc(const char* path, int flags) {
  const char* rel = nullptr;
  const int dir = ProcAt(path, &rel);
  return openat(dir, rel, flags);
}

ssize_t ReadlinkProc(const char* path, char* buf, size_t size) {
  const char* rel = nullptr;
  const int dir = ProcAt(path, &rel);
  return readlinkat(dir, rel, buf, size);
}

}  // namespace samepage::backend
