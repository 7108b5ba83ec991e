// How a window's pages are write-protected: mprotect or userfaultfd.
//
// Owns the mechanism only; the window registry and the fault handler are in
// write_protect.h, policy (which pages, budgets) in linux_memory.cc.
//
//  - MprotectProtector: mprotect(PROT_READ) / mprotect(PROT_READ|PROT_WRITE).
//    Splits the VMA while the window is open (up to 2 extra VMAs). Writers
//    fault with SEGV_ACCERR and wait in the handler. A syscall writing into a
//    protected page fails with EFAULT.
//  - UffdProtector: userfaultfd write-protect mode (UFFDIO_WRITEPROTECT) on
//    ranges registered with UFFDIO_REGISTER_MODE_WP (whole VMAs, registered
//    at each full scan, so no split). Writers block in the kernel until
//    UFFDIO_WRITEPROTECT clears the protection or UFFDIO_WAKE after a remap.
//    Kernel-mode faults (syscalls) also wait unless the descriptor is
//    user-mode-only (unprivileged), where they fail with EFAULT. A range that
//    is not registered falls back to mprotect for that window.
//
// Thread safety: called by the merging thread only (under the engine's lock).

#ifndef SAMEPAGE_BACKEND_PROTECTOR_H_
#define SAMEPAGE_BACKEND_PROTECTOR_H_

#include <cstddef>
#include <memory>
#include <string>

#include "core/memory.h"
#include "samepage/status.h"

namespace samepage::backend {

// How one window was protected, so that it is undone the same way.
enum class ProtectMethod : unsigned char { kNone, kMprotect, kUffd };

class Protector {
 public:
  virtual ~Protector() = default;

  // Write-protects [start, start + len). Returns 0 or an errno; on error no
  // page of the range is left protected.
  virtual int Protect(Addr start, std::size_t len, ProtectMethod* how) = 0;
  // Makes [start, start + len) writable again and wakes waiting writers,
  // those of pages it could not restore too. False if some page could not
  // be restored (it was unmapped, or mapped anew).
  virtual bool Unprotect(Addr start, std::size_t len, ProtectMethod how) = 0;
  // [start, start + len) of a protected range was replaced by a new mapping:
  // wake the writers blocked on the old one so they retry.
  virtual void Replaced(Addr start, std::size_t len, ProtectMethod how) = 0;

  // Registers whole VMAs for write-protection (userfaultfd only). Called at
  // each full scan with the VMAs that may be merged, and for each mapping our
  // merges and unmerges create (a part of a VMA would split it).
  // True if the range is now registered with our descriptor.
  virtual bool RegisterRange(Addr start, std::size_t len) {
    (void)start;
    (void)len;
    return false;
  }

  // Registers [start, start + len) for missing-page faults as well as
  // write-protect faults (userfaultfd only), for a discard-first window
  // (LinuxMemory::MergeSpanDiscardFirst): a page discarded there blocks its
  // readers and writers, kernel-mode ones included, until mapped again and
  // woken. Registering only adds modes: Unregister, then RegisterRange,
  // goes back to write-protect only.
  virtual bool RegisterMissing(Addr start, std::size_t len) {
    (void)start;
    (void)len;
    return false;
  }
  // Fills the missing page at dst with a copy of the page at src and wakes
  // its waiters (UFFDIO_COPY). 0, or an errno (EEXIST: a page is there).
  virtual int FillMissing(Addr dst, const void* src) {
    (void)dst;
    (void)src;
    return EOPNOTSUPP;
  }
  // Registers [start, start + len), memory of ours that nobody has
  // registered, for missing-page faults only, so that FillMissingRange can
  // fill it; Unregister ends it. Without write-protection, Unregister need
  // not walk the range's page tables (userfaultfd only).
  virtual bool RegisterForFill(Addr start, std::size_t len) {
    (void)start;
    (void)len;
    return false;
  }
  // Fills the missing pages of [dst, dst + len) with copies of those at
  // src, in as few calls as it can (UFFDIO_COPY), without waking anyone:
  // the bytes filled from dst on.
  virtual std::size_t FillMissingRange(Addr dst, const void* src,
                                       std::size_t len) {
    (void)dst;
    (void)src;
    (void)len;
    return 0;
  }
  // Maps the page cache pages of [start, start + len), a private mapping of
  // our memfd registered with our descriptor, where no page is mapped yet
  // (UFFDIO_CONTINUE: read-only, as a read fault would; EEXIST where one
  // is). The kernel first gives the mapping its anon_vma, which its first
  // write would otherwise allocate. 0, or an errno.
  virtual int MapCachePages(Addr start, std::size_t len) {
    (void)start;
    (void)len;
    return EOPNOTSUPP;
  }
  // Drops our registration of [start, start + len): its pages lose our
  // write-protect bits and any waiter is woken.
  virtual bool Unregister(Addr start, std::size_t len) {
    (void)start;
    (void)len;
    return false;
  }
  // True if syscalls writing into a protected page wait rather than fail.
  virtual bool KernelFaultsWait() const = 0;
  virtual std::string Describe() const = 0;
};

std::unique_ptr<Protector> NewMprotectProtector();

// Probes userfaultfd write-protection with a real round trip (protect a
// scratch page, a thread writes to it and blocks, unprotect wakes it, the
// write lands). Fails with the errno of the step that failed.
// Tests: `after_partial_protect(arg)` runs when a Protect has failed part
// way, before it undoes what it protected (a racing remap, on cue).
[[nodiscard]] Status NewUffdProtector(
    std::unique_ptr<Protector>* out,
    void (*after_partial_protect)(void* arg) = nullptr, void* arg = nullptr);

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_PROTECTOR_H_
