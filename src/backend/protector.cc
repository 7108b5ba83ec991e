#include "backend/protector.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <thread>

#include "backend/own_fds.h"

namespace samepage::backend {
namespace {

constexpr int kReadWrite = PROT_READ | PROT_WRITE;

// Page by page: the range call stops at the first hole, and after a partial
// failure we do not know which pages it changed.
bool MprotectEachPage(Addr start, std::size_t len, int prot) {
  bool ok = true;
  for (Addr a = start; a < start + len; a += kPageSize) {
    if (mprotect(reinterpret_cast<void*>(a), kPageSize, prot) != 0) ok = false;
  }
  return ok;
}

class MprotectProtector final : public Protector {
 public:
  int Protect(Addr start, std::size_t len, ProtectMethod* how) override {
    *how = ProtectMethod::kNone;
    if (mprotect(reinterpret_cast<void*>(start), len, PROT_READ) == 0) {
      *how = ProtectMethod::kMprotect;
      return 0;
    }
    int err = errno;
    // mprotect may have changed a prefix before failing (a hole, or the map
    // count limit when splitting): undo it.
    MprotectEachPage(start, len, kReadWrite);
    return err;
  }

  bool Unprotect(Addr start, std::size_t len, ProtectMethod how) override {
    if (how != ProtectMethod::kMprotect) return true;
    if (mprotect(reinterpret_cast<void*>(start), len, kReadWrite) == 0)
      return true;
    return MprotectEachPage(start, len, kReadWrite);
  }

  void Replaced(Addr, std::size_t, ProtectMethod) override {}

  bool KernelFaultsWait() const override { return false; }
  std::string Describe() const override { return "mprotect"; }
};

// Newer than Debian 12's headers (6.4+): write-protect never-touched pages
// too, with PTE markers. Without it a write to a page that was absent when
// protected would not be caught, so the probe requires it.
constexpr std::uint64_t kFeatureWpUnpopulated = std::uint64_t{1} << 13;

class UffdProtector final : public Protector {
 public:
  UffdProtector(int fd, bool kernel_faults_wait)
      : fd_(fd), kernel_faults_wait_(kernel_faults_wait) {}
  ~UffdProtector() override { CloseOwnFd(fd_); }

  int Protect(Addr start, std::size_t len, ProtectMethod* how) override {
    if (WriteProtect(start, len, true) == 0) {
      *how = ProtectMethod::kUffd;
      return 0;
    }
    // ENOENT: part of the range is not registered (our own merged mappings,
    // or a VMA born since the last full scan). Undo any prefix; mprotect it.
    // Page by page if the range fails as a whole: the kernel stops at the
    // first VMA that is not registered, and one that a racing remap put in
    // the prefix since would leave the rest of it protected, its writers
    // waiting for good.
    if (after_partial_protect_ != nullptr)
      after_partial_protect_(after_partial_protect_arg_);
    (void)Unprotect(start, len, ProtectMethod::kUffd);
    return fallback_.Protect(start, len, how);
  }

  bool Unprotect(Addr start, std::size_t len, ProtectMethod how) override {
    if (how != ProtectMethod::kUffd)
      return fallback_.Unprotect(start, len, how);
    // Clearing the protection also wakes the writers waiting on it.
    if (WriteProtect(start, len, false) == 0) return true;
    bool ok = true;
    for (Addr a = start; a < start + len; a += kPageSize) {
      if (WriteProtect(a, kPageSize, false) != 0) ok = false;
    }
    // A page that failed (unmapped, or mapped anew, by a call samepage does
    // not see: another allocator's munmap) is not woken by the call, and
    // its writer, asleep on the old PTE, would wait for good.
    if (!ok) Replaced(start, len, ProtectMethod::kUffd);
    return ok;
  }

  void Replaced(Addr start, std::size_t len, ProtectMethod how) override {
    if (how != ProtectMethod::kUffd) return;
    // The old PTEs are gone with the old mapping: wake the writers blocked
    // on them so they retry against the new one.
    uffdio_range range = {start, len};
    ioctl(fd_, UFFDIO_WAKE, &range);
  }

  bool RegisterRange(Addr start, std::size_t len) override {
    // Whole VMAs: registering changes VMA flags, so a part would split it.
    // EBUSY (another userfaultfd owns it) or EINVAL: it stays on mprotect.
    return Register(start, len, UFFDIO_REGISTER_MODE_WP);
  }

  bool RegisterMissing(Addr start, std::size_t len) override {
    return Register(start, len,
                    UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MISSING);
  }

  bool RegisterForFill(Addr start, std::size_t len) override {
    return Register(start, len, UFFDIO_REGISTER_MODE_MISSING);
  }

  int FillMissing(Addr dst, const void* src) override {
    int err = 0;
    (void)Copy(dst, src, kPageSize, /*mode=*/0, &err);
    return err;
  }

  std::size_t FillMissingRange(Addr dst, const void* src,
                               std::size_t len) override {
    int err = 0;
    return Copy(dst, src, len, UFFDIO_COPY_MODE_DONTWAKE, &err);
  }

  int MapCachePages(Addr start, std::size_t len) override {
    uffdio_continue c = {};
    c.range = {start, len};
    c.mode = UFFDIO_CONTINUE_MODE_DONTWAKE;  // nobody waits on a new mapping
    return ioctl(fd_, UFFDIO_CONTINUE, &c) == 0 ? 0 : errno;
  }

  bool Unregister(Addr start, std::size_t len) override {
    uffdio_range range = {start, len};
    return ioctl(fd_, UFFDIO_UNREGISTER, &range) == 0;
  }

  bool KernelFaultsWait() const override { return kernel_faults_wait_; }
  std::string Describe() const override {
    return kernel_faults_wait_ ? "userfaultfd" : "userfaultfd (user-mode only)";
  }

  // UFFDIO_COPY of [src, src + len) to dst: the bytes copied from dst on;
  // *err 0, or the errno that stopped it.
  std::size_t Copy(Addr dst, const void* src, std::size_t len,
                   std::uint64_t mode, int* err) {
    std::size_t done = 0;
    for (int attempt = 0; done < len; ++attempt) {
      uffdio_copy copy = {};
      copy.dst = dst + done;
      copy.src = reinterpret_cast<Addr>(src) + done;
      copy.len = len - done;
      copy.mode = mode;
      const int r = ioctl(fd_, UFFDIO_COPY, &copy);
      // copy.copy: the bytes copied, or a negative errno if none were.
      if (copy.copy > 0) done += static_cast<std::size_t>(copy.copy);
      if (r == 0) break;
      // EAGAIN: the layout changed under the call (mremap, fork), or it
      // stopped part way: again from where it stopped.
      if (errno != EAGAIN || attempt == 8) {
        *err = errno;
        return done;
      }
    }
    *err = 0;
    return done;
  }

  bool Register(Addr start, std::size_t len, std::uint64_t mode) {
    uffdio_register reg = {};
    reg.range = {start, len};
    reg.mode = mode;
    return ioctl(fd_, UFFDIO_REGISTER, &reg) == 0;
  }

  int WriteProtect(Addr start, std::size_t len, bool on) {
    uffdio_writeprotect wp = {};
    wp.range = {start, len};
    wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    return ioctl(fd_, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
  }
  int fd() const { return fd_; }
  void SetAfterPartialProtect(void (*hook)(void*), void* arg) {
    after_partial_protect_ = hook;
    after_partial_protect_arg_ = arg;
  }

 private:
  int fd_;
  bool kernel_faults_wait_;
  MprotectProtector fallback_;
  void (*after_partial_protect_)(void*) = nullptr;
  void* after_partial_protect_arg_ = nullptr;
};

// Opens a userfaultfd: the syscall (all faults), or user-mode-only when
// unprivileged (vm.unprivileged_userfaultfd = 0), or /dev/userfaultfd.
int OpenUffd(bool* kernel_faults_wait, int* err) {
  int flags = O_CLOEXEC | O_NONBLOCK;
  int fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
  *kernel_faults_wait = true;
  if (fd >= 0) return fd;
  *err = errno;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    close(dev);
    if (fd >= 0) return fd;
  }
  fd = static_cast<int>(syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY));
  *kernel_faults_wait = false;
  if (fd < 0) *err = errno;
  return fd;
}

// Waits up to 1 s for one write-protect fault message at `addr`.
bool ReadWpFault(int fd, Addr addr) {
  pollfd p = {fd, POLLIN, 0};
  if (poll(&p, 1, 1000) != 1) return false;
  uffd_msg msg;
  if (read(fd, &msg, sizeof(msg)) != static_cast<ssize_t>(sizeof(msg)))
    return false;
  return msg.event == UFFD_EVENT_PAGEFAULT &&
         (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) &&
         (msg.arg.pagefault.address & ~(kPageSize - 1)) == addr;
}

// The probe's round trip on two scratch pages, one present, one never
// touched: protect both, a thread writes to both, each write must arrive as a
// write-protect fault and complete only once unprotected.
Status RoundTrip(UffdProtector& uffd) {
  void* mem = mmap(nullptr, 2 * kPageSize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return Status::Error(errno, "mmap(uffd probe)");
  auto* page = static_cast<volatile unsigned char*>(mem);
  Addr a0 = reinterpret_cast<Addr>(mem), a1 = a0 + kPageSize;
  page[0] = 1;
  uffdio_register reg = {};
  reg.range = {a0, 2 * kPageSize};
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  Status status;
  if (ioctl(uffd.fd(), UFFDIO_REGISTER, &reg) != 0) {
    status = Status::Error(errno, "UFFDIO_REGISTER(WP)");
  } else if (!(reg.ioctls & (std::uint64_t{1} << _UFFDIO_WRITEPROTECT))) {
    status = Status::Error(EOPNOTSUPP, "UFFDIO_WRITEPROTECT not offered");
  } else if (int err = uffd.WriteProtect(a0, 2 * kPageSize, true)) {
    status = Status::Error(err, "UFFDIO_WRITEPROTECT");
  } else {
    std::atomic<int> done{0};
    std::thread writer([&] {
      page[0] = 2;
      done = 1;
      page[kPageSize] = 3;
      done = 2;
    });
    bool first = ReadWpFault(uffd.fd(), a0) && done.load() == 0;
    uffd.WriteProtect(a0, kPageSize, false);  // wakes the writer
    bool second = first && ReadWpFault(uffd.fd(), a1) && done.load() == 1;
    uffd.WriteProtect(a0, 2 * kPageSize, false);
    writer.join();
    if (!first || !second || page[0] != 2 || page[kPageSize] != 3) {
      status = Status::Error(
          EOPNOTSUPP, std::string("userfaultfd write-protect round trip "
                                  "failed on the ") +
                          (first ? "never-touched" : "present") + " page");
    }
  }
  uffdio_range range = {a0, 2 * kPageSize};
  ioctl(uffd.fd(), UFFDIO_UNREGISTER, &range);
  munmap(mem, 2 * kPageSize);
  return status;
}

}  // namespace

std::unique_ptr<Protector> NewMprotectProtector() {
  return std::make_unique<MprotectProtector>();
}

Status NewUffdProtector(std::unique_ptr<Protector>* out,
                        void (*after_partial_protect)(void* arg), void* arg) {
  out->reset();
  bool kernel_faults_wait = false;
  int err = 0;
  int fd = AdoptOwnFd(OpenUffd(&kernel_faults_wait, &err));
  if (fd < 0) return Status::Error(err, "userfaultfd()");
  auto uffd = std::make_unique<UffdProtector>(fd, kernel_faults_wait);
  uffdio_api api = {};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | kFeatureWpUnpopulated;
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    // EINVAL: a requested feature is unknown (WP_UNPOPULATED needs 6.4).
    return Status::Error(errno, "UFFDIO_API(PAGEFAULT_FLAG_WP|WP_UNPOPULATED)");
  }
  Status s = RoundTrip(*uffd);
  if (!s.ok()) return s;
  uffd->SetAfterPartialProtect(after_partial_protect, arg);
  *out = std::move(uffd);
  return Status::Ok();
}

}  // namespace samepage::backend
