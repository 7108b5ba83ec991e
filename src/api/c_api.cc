// The C API (include/samepage/samepage.h) over one process-wide Engine.
//
// The engine and its DevKsm are created on first use and never destroyed:
// application threads (and the engine's scanner) may still run while static
// destructors do, and merged memory must stay valid until the process ends.
// Arguments the kernel checks before doing anything are checked here first,
// so that a bad call does not create the engine.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "api/default_engine.h"
#include "api/devksm.h"
#include "api/sysfs_text.h"
#include "samepage/engine.h"
#include "samepage/samepage.h"

namespace samepage {
namespace {

struct Default {
  Engine* engine = nullptr;  // null if Engine::Create failed
  DevKsm* devksm = nullptr;
  int error = 0;  // errno of the failed Create
};

// Set once the default engine exists, so that calls that only concern
// existing descriptors can answer without creating it.
std::atomic<Default*> g_default{nullptr};

// SetDefaultEngineOptions; `taken` once the engine is being created.
struct PendingOptions {
  std::mutex mutex;
  EngineOptions options;
  bool taken = false;
};

PendingOptions& Pending() {
  static PendingOptions* const pending = new PendingOptions;  // never freed
  return *pending;
}

EngineOptions TakeOptions() {
  PendingOptions& p = Pending();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.taken = true;
  return p.options;
}

Default* GetDefault() {
  static Default* const instance = [] {
    auto* d = new Default;
    std::unique_ptr<Engine> engine;
    const Status s = Engine::Create(TakeOptions(), &engine);
    if (s.ok() && engine != nullptr) {
      d->engine = engine.release();
      d->devksm = new DevKsm(d->engine);
    } else {
      d->error = s.ok() ? ENOSYS : s.code();
      // Said once: every KSM call of the process fails with this errno,
      // which alone does not say why (ENOENT from madvise, where /proc is
      // not mounted).
      std::fprintf(
          stderr, "samepage: cannot start (%s): KSM calls fail with %s\n",
          s.ok() ? "no engine" : s.message().c_str(), std::strerror(d->error));
    }
    g_default.store(d, std::memory_order_release);
    return d;
  }();
  return instance;
}

int Fail(int code) {
  errno = code;
  return -1;
}

// The default engine, or null with errno set.
Engine* GetEngine() {
  Default* d = GetDefault();
  if (d->engine == nullptr) errno = d->error;
  return d->engine;
}

// read(2) of a whole small file from offset 0.
ssize_t CopyOut(const std::string& text, char* buf, std::size_t size) {
  const std::size_t n = std::min(size, text.size());
  if (n > 0) std::memcpy(buf, text.data(), n);
  if (n < size) buf[n] = '\0';
  return static_cast<ssize_t>(n);
}

}  // namespace

bool SetDefaultEngineOptions(const EngineOptions& options) {
  PendingOptions& p = Pending();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.taken) return false;
  p.options = options;
  return true;
}

bool ParseProtection(std::string_view text,
                     EngineOptions::Protection* protection) {
  using P = EngineOptions::Protection;
  if (text == "auto") {
    *protection = P::kAuto;
  } else if (text == "userfaultfd") {
    *protection = P::kUserfaultfd;
  } else if (text == "mprotect") {
    *protection = P::kMprotect;
  } else {
    return false;
  }
  return true;
}

}  // namespace samepage

using samepage::Engine;
using samepage::Fail;
using samepage::Status;

extern "C" {

int samepage_madvise(void* addr, size_t len, int advice) {
  if (advice != SAMEPAGE_MADV_MERGEABLE &&
      advice != SAMEPAGE_MADV_UNMERGEABLE) {
    return Fail(EINVAL);
  }
  Engine* engine = samepage::GetEngine();
  if (engine == nullptr) return -1;
  const Status s = engine->Madvise(addr, len, advice);
  return s.ok() ? 0 : Fail(s.code());
}

int samepage_prctl(int option, unsigned long arg2, unsigned long arg3,
                   unsigned long arg4, unsigned long arg5) {
  // kernel/sys.c: unused arguments must be zero.
  switch (option) {
    case SAMEPAGE_PR_SET_MEMORY_MERGE: {
      if (arg3 != 0 || arg4 != 0 || arg5 != 0) return Fail(EINVAL);
      Engine* engine = samepage::GetEngine();
      if (engine == nullptr) return -1;
      const Status s = engine->SetMergeAny(arg2 != 0);
      return s.ok() ? 0 : Fail(s.code());
    }
    case SAMEPAGE_PR_GET_MEMORY_MERGE: {
      if (arg2 != 0 || arg3 != 0 || arg4 != 0 || arg5 != 0) {
        return Fail(EINVAL);
      }
      Engine* engine = samepage::GetEngine();
      if (engine == nullptr) return -1;
      return engine->MergeAny() ? 1 : 0;
    }
    default:
      return Fail(EINVAL);
  }
}

ssize_t samepage_sysfs_read(const char* name, char* buf, size_t size) {
  if (name == nullptr) return Fail(EFAULT);
  if (!samepage::IsKsmFile(name)) return Fail(ENOENT);
  if (buf == nullptr && size > 0) return Fail(EFAULT);
  Engine* engine = samepage::GetEngine();
  if (engine == nullptr) return -1;
  std::string text;
  const Status s = engine->ReadKnob(name, &text);
  if (!s.ok()) return Fail(s.code());
  return samepage::CopyOut(text, buf, size);
}

ssize_t samepage_sysfs_write(const char* name, const char* buf, size_t len) {
  if (name == nullptr) return Fail(EFAULT);
  if (!samepage::IsKsmFile(name)) return Fail(ENOENT);
  if (!samepage::IsWritableKnob(name)) return Fail(EACCES);
  if (buf == nullptr && len > 0) return Fail(EFAULT);
  Engine* engine = samepage::GetEngine();
  if (engine == nullptr) return -1;
  const Status s =
      engine->WriteKnob(name, std::string_view(buf == nullptr ? "" : buf, len));
  if (!s.ok()) return Fail(s.code());
  return static_cast<ssize_t>(std::min(len, samepage::kSysfsWriteMax));
}

ssize_t samepage_ksm_stat(char* buf, size_t size) {
  if (buf == nullptr && size > 0) return Fail(EFAULT);
  Engine* engine = samepage::GetEngine();
  if (engine == nullptr) return -1;
  return samepage::CopyOut(engine->KsmStatText(), buf, size);
}

ssize_t samepage_ksm_merging_pages(char* buf, size_t size) {
  if (buf == nullptr && size > 0) return Fail(EFAULT);
  Engine* engine = samepage::GetEngine();
  if (engine == nullptr) return -1;
  return samepage::CopyOut(engine->KsmMergingPagesText(), buf, size);
}

size_t samepage_scan(size_t pages) {
  Engine* engine = samepage::GetEngine();
  if (engine == nullptr) return 0;
  return engine->ScanNow(pages);
}

int samepage_devksm_open(void) {
  samepage::Default* d = samepage::GetDefault();
  if (d->devksm == nullptr) return Fail(d->error);
  int fd = -1;
  const Status s = d->devksm->Open(&fd);
  return s.ok() ? fd : Fail(s.code());
}

int samepage_devksm_ioctl(int fd, unsigned long request, void* arg) {
  samepage::Default* d = samepage::g_default.load(std::memory_order_acquire);
  if (d == nullptr || d->devksm == nullptr) return Fail(EBADF);
  int result = 0;
  const Status s = d->devksm->Ioctl(fd, request, arg, &result);
  return s.ok() ? result : Fail(s.code());
}

int samepage_devksm_close(int fd) {
  samepage::Default* d = samepage::g_default.load(std::memory_order_acquire);
  if (d == nullptr || d->devksm == nullptr) return Fail(EBADF);
  const Status s = d->devksm->Close(fd);
  return s.ok() ? 0 : Fail(s.code());
}

int samepage_devksm_owns(int fd) {
  samepage::Default* d = samepage::g_default.load(std::memory_order_acquire);
  if (d == nullptr || d->devksm == nullptr) return 0;
  return d->devksm->Owns(fd) ? 1 : 0;
}

}  // extern "C"
