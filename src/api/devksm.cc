// The 2008 /dev/ksm driver over an Engine; see devksm.h.

#include "api/devksm.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/write_protect.h"
#include "samepage/ksm2008.h"

namespace samepage {
namespace {

constexpr std::size_t kPage = 4096;
constexpr int kMadvMergeable = 12;    // MADV_MERGEABLE
constexpr int kMadvUnmergeable = 13;  // MADV_UNMERGEABLE

static_assert(sizeof(ksm_memory_region) == 16);
static_assert(sizeof(ksm_user_scan) == 8);
static_assert(sizeof(ksm_kthread_info) == 16);
static_assert(KSM_GET_API_VERSION == 0xAB00);
static_assert(KSM_CREATE_SHARED_MEMORY_AREA == 0xAB01);
static_assert(KSM_CREATE_SCAN == 0xAB02);
static_assert(KSM_START_STOP_KTHREAD == 0x4010AB03);
static_assert(KSM_GET_INFO_KTHREAD == 0x4010AB04);
static_assert(KSM_REGISTER_MEMORY_REGION == 0x4010AB20);
static_assert(KSM_REMOVE_MEMORY_REGION == 0xAB21);
static_assert(KSM_SCAN == 0x4008AB40);

Status Fault(const char* what) {
  return Status::Error(
      EFAULT, std::string("/dev/ksm ") + what + ": bad argument address");
}

// copy_from_user(): a bad pointer gives EFAULT, not a crash.
bool CopyFromUser(void* dst, const void* src, std::size_t n) {
  return backend::CopyFromUser(dst, src, n);
}

// copy_to_user(): checks the destination is mapped, then stores with a plain
// copy so that a write to a page the engine is merging waits on its fault
// handler instead of failing.
bool CopyToUser(void* dst, const void* src, std::size_t n) {
  unsigned char probe[64];
  if (n > sizeof(probe) || !CopyFromUser(probe, dst, n)) return false;
  std::memcpy(dst, src, n);
  return true;
}

std::uint64_t ReadNumber(Engine* engine, const char* name) {
  std::string text;
  if (!engine->ReadKnob(name, &text).ok()) return 0;
  return std::strtoull(text.c_str(), nullptr, 10);
}

std::size_t ScanBounded(Engine* engine, std::uint32_t pages,
                        std::uint32_t max_merge) {
  if (pages == 0 || max_merge == 0) return 0;  // the driver's loop condition
  std::size_t scanned = 0;
  if (max_merge >= pages) {
    // Each scanned page adds at most one to pages_sharing: no bound needed.
    while (scanned < pages) {
      const std::size_t got = engine->ScanNow(pages - scanned);
      if (got == 0) break;
      scanned += got;
    }
    return scanned;
  }
  const std::uint64_t base = ReadNumber(engine, "pages_sharing");
  std::uint64_t merged = 0;
  while (scanned < pages && merged < max_merge) {
    const std::size_t chunk =
        std::min<std::uint64_t>(pages - scanned, max_merge - merged);
    const std::size_t got = engine->ScanNow(chunk);
    if (got == 0) break;
    scanned += got;
    const std::uint64_t now = ReadNumber(engine, "pages_sharing");
    merged = now > base ? now - base : 0;
  }
  return scanned;
}

}  // namespace

DevKsm::DevKsm(Engine* engine) : engine_(engine) {}

DevKsm::~DevKsm() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [fd, d] : descriptors_) {
    RemoveRegions(&d);
    close(fd);
  }
  descriptors_.clear();
}

Status DevKsm::NewDescriptor(Kind kind, int* fd) {
  const char* name = kind == Kind::kDevice ? "samepage-ksm"
                     : kind == Kind::kArea ? "samepage-ksm-sma"
                                           : "samepage-ksm-scan";
  // A memfd: a unique inode per descriptor, nothing allocated, and a name
  // that shows in /proc/self/fd.
  const int new_fd = memfd_create(name, MFD_CLOEXEC);
  if (new_fd < 0) {
    const int err = errno;
    return Status::Error(err, std::string("memfd_create(") + name + ")");
  }
  struct stat st;
  if (fstat(new_fd, &st) != 0) {
    const int err = errno;
    close(new_fd);
    return Status::Error(err, "fstat(memfd)");
  }
  descriptors_[new_fd] = Descriptor{kind, st.st_dev, st.st_ino, {}};
  *fd = new_fd;
  return Status::Ok();
}

DevKsm::Descriptor* DevKsm::Find(int fd) {
  auto it = descriptors_.find(fd);
  if (it == descriptors_.end()) return nullptr;
  struct stat st;
  if (fstat(fd, &st) == 0 && st.st_dev == it->second.dev &&
      st.st_ino == it->second.ino) {
    return &it->second;
  }
  // The application closed our descriptor with close(2) and the number may
  // now be another file: the driver's release ran, so undo the regions, but
  // never close a number that is no longer ours.
  RemoveRegions(&it->second);
  descriptors_.erase(it);
  return nullptr;
}

void DevKsm::RemoveRegions(Descriptor* d) {
  for (const Region& r : d->regions) {
    // Errors are ignored, as the driver's remove did: the range may have
    // been unmapped since it was registered.
    (void)engine_->Madvise(reinterpret_cast<void*>(r.addr), r.npages * kPage,
                           kMadvUnmergeable);
  }
  d->regions.clear();
}

Status DevKsm::Open(int* fd) {
  std::lock_guard<std::mutex> lock(mu_);
  return NewDescriptor(Kind::kDevice, fd);
}

bool DevKsm::Owns(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  return Find(fd) != nullptr;
}

Status DevKsm::Close(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  Descriptor* d = Find(fd);
  if (d == nullptr) {
    return Status::Error(
        EBADF, "close(" + std::to_string(fd) + "): not a /dev/ksm descriptor");
  }
  RemoveRegions(d);
  descriptors_.erase(fd);
  close(fd);
  return Status::Ok();
}

Status DevKsm::Ioctl(int fd, unsigned long request, void* arg, int* result) {
  Kind kind;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Descriptor* d = Find(fd);
    if (d == nullptr) {
      return Status::Error(EBADF, "ioctl(" + std::to_string(fd) +
                                      "): not a /dev/ksm descriptor");
    }
    kind = d->kind;
  }
  *result = 0;
  switch (kind) {
    case Kind::kDevice:
      return DeviceIoctl(request, arg, result);
    case Kind::kArea:
      return AreaIoctl(fd, request, arg);
    case Kind::kScan:
      if (request != KSM_SCAN) break;
      return Scan(arg);
  }
  return Status::Error(EINVAL, "ioctl(" + std::to_string(fd) +
                                   "): unknown request for a scan descriptor");
}

Status DevKsm::DeviceIoctl(unsigned long request, void* arg, int* result) {
  switch (request) {
    case KSM_GET_API_VERSION:
      *result = KSM_API_VERSION;
      return Status::Ok();
    case KSM_CREATE_SHARED_MEMORY_AREA:
    case KSM_CREATE_SCAN: {
      std::lock_guard<std::mutex> lock(mu_);
      return NewDescriptor(
          request == KSM_CREATE_SCAN ? Kind::kScan : Kind::kArea, result);
    }
    case KSM_START_STOP_KTHREAD: {
      ksm_kthread_info info;
      if (!CopyFromUser(&info, arg, sizeof(info))) {
        return Fault("KSM_START_STOP_KTHREAD");
      }
      const std::uint64_t msecs = (std::uint64_t{info.sleep} + 999) / 1000;
      std::lock_guard<std::mutex> lock(mu_);
      // pages_to_scan first: it is the write that can fail (EINVAL while the
      // advisor owns it), and then nothing has changed.
      Status s = engine_->WriteKnob("pages_to_scan",
                                    std::to_string(info.pages_to_scan));
      if (!s.ok()) return s;
      s = engine_->WriteKnob("sleep_millisecs", std::to_string(msecs));
      if (!s.ok()) return s;
      s = engine_->WriteKnob("run", info.running != 0 ? "1" : "0");
      if (!s.ok()) return s;
      sleep_usecs_ = info.sleep;
      max_pages_to_merge_ = info.max_pages_to_merge;
      return Status::Ok();
    }
    case KSM_GET_INFO_KTHREAD: {
      ksm_kthread_info info{};
      {
        std::lock_guard<std::mutex> lock(mu_);
        const std::uint64_t msecs = ReadNumber(engine_, "sleep_millisecs");
        const std::uint64_t set_msecs =
            (std::uint64_t{sleep_usecs_} + 999) / 1000;
        info.sleep = set_msecs == msecs
                         ? sleep_usecs_
                         : static_cast<std::uint32_t>(std::min<std::uint64_t>(
                               msecs * 1000, UINT32_MAX));
        info.pages_to_scan =
            static_cast<std::uint32_t>(ReadNumber(engine_, "pages_to_scan"));
        info.max_pages_to_merge = max_pages_to_merge_;
        info.running = ReadNumber(engine_, "run") == 1 ? 1 : 0;
      }
      if (!CopyToUser(arg, &info, sizeof(info))) {
        return Fault("KSM_GET_INFO_KTHREAD");
      }
      return Status::Ok();
    }
    default:
      return Status::Error(EINVAL, "/dev/ksm: unknown request for the device");
  }
}

Status DevKsm::AreaIoctl(int fd, unsigned long request, void* arg) {
  if (request == KSM_REMOVE_MEMORY_REGION) {
    std::lock_guard<std::mutex> lock(mu_);
    if (Descriptor* d = Find(fd)) RemoveRegions(d);
    return Status::Ok();
  }
  if (request != KSM_REGISTER_MEMORY_REGION) {
    return Status::Error(EINVAL, "ioctl(" + std::to_string(fd) +
                                     "): unknown request for a shared "
                                     "memory area");
  }
  ksm_memory_region mem;
  if (!CopyFromUser(&mem, arg, sizeof(mem))) {
    return Fault("KSM_REGISTER_MEMORY_REGION");
  }
  const std::uintptr_t begin = mem.addr;
  const std::uint64_t len = std::uint64_t{mem.npages} * kPage;
  if (mem.npages == 0) {
    return Status::Error(EPERM, "KSM_REGISTER_MEMORY_REGION: npages is 0");
  }
  std::lock_guard<std::mutex> lock(mu_);
  Descriptor* area = Find(fd);
  if (area == nullptr) {
    return Status::Error(EBADF, "KSM_REGISTER_MEMORY_REGION: area closed");
  }
  if (begin + len > begin) {  // no wrap: otherwise madvise reports EINVAL
    for (const auto& [other_fd, d] : descriptors_) {
      for (const Region& r : d.regions) {
        const std::uintptr_t r_end = r.addr + r.npages * kPage;
        if (begin < r_end && r.addr < begin + len) {
          return Status::Error(EPERM,
                               "KSM_REGISTER_MEMORY_REGION: overlaps a region "
                               "registered on descriptor " +
                                   std::to_string(other_fd));
        }
      }
    }
  }
  Status s =
      engine_->Madvise(reinterpret_cast<void*>(begin), len, kMadvMergeable);
  if (!s.ok()) {
    // madvise marks the mapped parts even when it reports ENOMEM for a hole;
    // a failed registration must leave nothing registered.
    if (s.code() == ENOMEM) {
      (void)engine_->Madvise(reinterpret_cast<void*>(begin), len,
                             kMadvUnmergeable);
    }
    return s;
  }
  area->regions.push_back(Region{begin, mem.npages});
  return Status::Ok();
}

Status DevKsm::Scan(void* arg) {
  ksm_user_scan scan;
  if (!CopyFromUser(&scan, arg, sizeof(scan))) return Fault("KSM_SCAN");
  (void)ScanBounded(engine_, scan.pages_to_scan, scan.max_pages_to_merge);
  return Status::Ok();
}

}  // namespace samepage
