// EngineImpl: the process's samepage engine — the core algorithm (Ksm) over
// the Linux backend (LinuxMemory), one mutex, and a scanner thread that
// plays ksmd: while run is 1 it scans pages_to_scan pages, then sleeps
// sleep_millisecs.
//
// Locking: mu_ guards the core, the backend, the knobs and the thread state.
// The scanner holds it for one batch at a time, so control calls wait at most
// one batch. Reading a knob or counter does not wait: it formats the values
// published at the end of the last batch or control call, and within a
// batch as merges are done and full scans end (pub_mu_, taken after mu_
// where both are), as kernel KSM's sysfs reads never wait for ksmd.
// Write faults of application threads never take mu_ (the backend's fault
// handler is lock-free), so a merge in progress cannot deadlock with the
// application.
//
// fork(): prepare takes mu_ (no merge is in flight while the address space is
// copied). The backend pins every frame a child may map. In the child the
// scanner thread does not exist: it restarts if run is 1, and the first
// caller to take mu_ gives the child a backend of its own and a core rebuilt
// from the advised ranges (kernel KSM scans a child afresh too).

#include "samepage/engine.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

#include "api/sysfs_text.h"
#include "backend/linux_memory.h"
#include "backend/write_protect.h"
#include "core/ksm.h"

namespace samepage {
namespace {

using backend::LinuxMemory;
using backend::LinuxMemoryOptions;

// Batch size for RunFullScans: large, so a full scan needs few lock rounds.
constexpr std::size_t kSyncScanBatch = 1 << 16;
// merge-any's look for new mappings, from the background scanner.
constexpr std::int64_t kMergeAnySweepNanos = 100'000'000;
// How often advice held over memory samepage leaves out is checked against
// the mappings (RecheckSuspendedLocked), while nothing else is advised.
constexpr std::int64_t kPruneHeldNanos = 100'000'000;
// How often, with nothing to scan, frames held for merged pages the
// program moved unseen are checked against the mappings.
constexpr std::chrono::seconds kHeldFramesRecheck{1};

// Changes the engines must read the maps again after (VmFlags).
bool ChangesFlags(Engine::MappingChange kind) {
  return kind == Engine::MappingChange::kFlags ||
         kind == Engine::MappingChange::kAnonymousFlags ||
         kind == Engine::MappingChange::kUserfaultfd;
}

// The last page of the address space: where a range that runs to the end
// (mlockall's) ends, rounded.
constexpr Addr kLastPage = ~Addr{0} & ~(kPageSize - 1);

LinuxMemoryOptions ToBackendOptions(const EngineOptions& o) {
  LinuxMemoryOptions b;
  switch (o.protection) {
    case EngineOptions::Protection::kAuto:
      b.protection = LinuxMemoryOptions::Protection::kAuto;
      break;
    case EngineOptions::Protection::kUserfaultfd:
      b.protection = LinuxMemoryOptions::Protection::kUserfaultfd;
      break;
    case EngineOptions::Protection::kMprotect:
      b.protection = LinuxMemoryOptions::Protection::kMprotect;
      break;
  }
  b.vma_budget = o.vma_budget;
#ifndef NDEBUG
  // Tests of races with a preempted scanner (preload.allocator_remap_test).
  if (const char* us = std::getenv("SAMEPAGE_DEBUG_MAP_DELAY_US"))
    b.map_delay_us = std::strtoll(us, nullptr, 10);
#endif
  return b;
}

class EngineImpl;
std::mutex g_engines_mu;
std::vector<EngineImpl*>* g_engines = nullptr;  // for the fork handlers
using Interval = LinuxMemory::Interval;
// Engine::KernelWrites's and Engine::KernelPins's ranges, for engines
// created later. Guarded by g_engines_mu.
std::vector<Interval>* g_kernel_written = nullptr;
std::vector<Interval>* g_kernel_pinned = nullptr;
// Nonzero on a thread inside an engine (Engine::ThreadInsideEngine): its
// scanner, for good, or one holding an engine's lock (ControlLock).
thread_local int tls_inside_engine __attribute__((tls_model("initial-exec"))) =
    0;

// The bounding box of every range whose advice was ever suspended
// (kReprotect; never shrinks): Engine::Reprotected and Engine::Moved pass
// by any other range without a lock, so an mprotect to read+write (a JIT
// flipping its code pages, malloc growing an arena) costs nothing more.
std::atomic<Addr> g_suspended_lo{~Addr{0}};
std::atomic<Addr> g_suspended_hi{0};

// Adds [start, end) to an engine's suspended set, and to the box.
void Suspend(std::vector<Interval>* set, Addr start, Addr end) {
  LinuxMemory::AddInterval(set, start, end);
  Addr cur = g_suspended_lo.load(std::memory_order_relaxed);
  while (start < cur && !g_suspended_lo.compare_exchange_weak(cur, start)) {
  }
  cur = g_suspended_hi.load(std::memory_order_relaxed);
  while (end > cur && !g_suspended_hi.compare_exchange_weak(cur, end)) {
  }
}

bool MaybeSuspended(Addr start, Addr end) {
  return start < g_suspended_hi.load(std::memory_order_acquire) &&
         end > g_suspended_lo.load(std::memory_order_acquire);
}

std::size_t PagesIn(const std::vector<Interval>& set) {
  std::size_t bytes = 0;
  for (const Interval& i : set) bytes += i.end - i.start;
  return bytes / kPageSize;
}

// The least a scanner in a forked child waits before it rebuilds the
// child's engine (a new backend, the maps read) and scans: a child that
// execs meanwhile never pays for it. It waits longer where a full scan of
// the parent takes longer (EngineImpl::FullScanPeriodLocked).
constexpr std::chrono::milliseconds kForkChildPause{20};

class EngineImpl final : public Engine {
 public:
  EngineImpl(const LinuxMemoryOptions& options,
             std::unique_ptr<LinuxMemory> memory)
      : options_(options), memory_(std::move(memory)), ksm_(NewCore()) {
    RegisterForFork(this);
  }

  ~EngineImpl() override {
    UnregisterForFork(this);
    StopScanner();
  }

  Status Madvise(void* addr, std::size_t len, int advice) override {
    if (advice != MADV_MERGEABLE && advice != MADV_UNMERGEABLE) {
      return Status::Error(EINVAL, "madvise: advice must be MADV_MERGEABLE "
                                   "or MADV_UNMERGEABLE");
    }
    const Addr start = reinterpret_cast<Addr>(addr);
    if (start % kPageSize != 0) {
      return Status::Error(EINVAL, "madvise: address not page-aligned");
    }
    const std::size_t rounded = (len + kPageSize - 1) & ~(kPageSize - 1);
    if (len != 0 && rounded == 0) {
      return Status::Error(EINVAL, "madvise: length overflows");
    }
    if (start + rounded < start) {
      return Status::Error(EINVAL, "madvise: range wraps around");
    }
    if (rounded == 0) return Status::Ok();
    ControlLock lock(this);
    std::vector<std::pair<Addr, std::size_t>> parts;
    // The kernel applies advice to the mapped parts of a range with holes and
    // still returns ENOMEM; so do we.
    std::vector<std::pair<Addr, std::size_t>> not_writable;
    Status st = memory_->MergeableParts(
        start, rounded, &parts, advice == MADV_MERGEABLE, &not_writable);
    if (!st.ok() && st.code() != ENOMEM) return st;
    // Advice given or taken away again ends a suspension (kReprotect).
    LinuxMemory::RemoveInterval(&suspended_, start, start + rounded);
    if (advice == MADV_MERGEABLE) {
      bool all = true;
      for (auto [a, bytes] : parts) all &= ksm_->Advise(a, bytes / kPageSize);
      if (!all) {
        // As the kernel's when it cannot allocate: the rest is advised.
        st = Status::Error(ENOMEM,
                           "madvise(MADV_MERGEABLE): no memory for "
                           "the range's metadata");
      }
      // Merged once mprotect makes them read+write (Reprotected).
      for (auto [a, bytes] : not_writable) Suspend(&suspended_, a, a + bytes);
    } else if (!ksm_->Unadvise(start, rounded / kPageSize)) {
      return Status::Error(ENOMEM, "madvise(MADV_UNMERGEABLE): could not "
                                   "restore every merged page");
    }
    cv_.notify_all();
    return st;
  }

  Status SetMergeAny(bool on) override {
    ControlLock lock(this);
    if (on == merge_any_) return Status::Ok();
    if (on) {
      merge_any_ = true;
      AdviseAllAnonymousLocked();
      cv_.notify_all();
      return Status::Ok();
    }
    // Like ksm_disable_merge_any(): everything is unmerged and unmarked.
    merge_any_ = false;
    suspended_.clear();
    bool ok = true;
    for (auto [a, n] : AdvisedRangesLocked()) ok &= ksm_->Unadvise(a, n);
    if (!ok) {
      return Status::Error(ENOMEM, "prctl(PR_SET_MEMORY_MERGE, 0): could not "
                                   "restore every merged page");
    }
    return Status::Ok();
  }

  bool MergeAny() const override {
    ControlLock lock(this);
    return merge_any_;
  }

  Status ReadKnob(std::string_view name, std::string* text) override {
    if (!IsKsmFile(name)) {
      return Status::Error(ENOENT, "no such file in /sys/kernel/mm/ksm: " +
                                       std::string(name));
    }
    if (pub_valid_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> pub(pub_mu_);
      *text = FormatKnob(pub_knobs_, pub_counters_, name);
      return Status::Ok();
    }
    ControlLock lock(this);  // publishes on release
    *text = FormatKnob(ksm_->knobs(), ksm_->GetCounters(), name);
    return Status::Ok();
  }

  Status WriteKnob(std::string_view name, std::string_view text) override {
    ControlLock lock(this);
    // Merges waiting for a run are done under the knobs they were planned
    // with (and counted before max_page_sharing asks for pages_shared).
    ksm_->FinishPlans();
    Knobs& knobs = ksm_->knobs();
    const Knobs before = knobs;
    KnobContext ctx;
    ctx.pages_shared = ksm_->GetCounters().pages_shared;
    Status st = samepage::WriteKnob(&knobs, name, text, ctx);
    if (!st.ok()) return st;
    if (knobs.advisor_mode != before.advisor_mode) ksm_->ResetAdvisor();
    // Like run_store(): only a change of value acts.
    if (knobs.run != before.run) {
      if (knobs.run == 2 && !ksm_->UnmergeAll()) {
        knobs.run = 0;
        return Status::Error(ENOMEM, "run=2: could not restore every merged "
                                     "page");
      }
      if (knobs.run == 1) StartScannerLocked();
    }
    cv_.notify_all();
    return Status::Ok();
  }

  std::vector<std::string> KnobNames() const override {
    std::vector<std::string> names;
    for (std::string_view n : KsmFileNames()) names.emplace_back(n);
    return names;
  }

  std::string KsmStatText() override {
    ControlLock lock(this);
    return FormatKsmStat(SpaceStatLocked());
  }

  std::string KsmMergingPagesText() override {
    ControlLock lock(this);
    return FormatMergingPages(SpaceStatLocked());
  }

  std::size_t ScanNow(std::size_t pages) override {
    ControlLock lock(this);
    return ScanLocked(pages, /*stop_at_scan_end=*/false);
  }

  void RunFullScans(int count) override {
    ControlLock lock(this);
    const std::uint64_t target = ksm_->GetCounters().full_scans + count;
    while (ksm_->GetCounters().full_scans < target) {
      if (ksm_->AdvisedPages() == 0) return;
      ScanLocked(kSyncScanBatch, /*stop_at_scan_end=*/true);
      lock.Yield();  // let waiting callers in between batches
    }
  }

  EngineStats Stats() override {
    ControlLock lock(this);
    const MemoryStats m = memory_->Stats();
    EngineStats s;
    s.protection = memory_->protection() == LinuxMemory::Protection::kUserfaultfd
                       ? "userfaultfd"
                       : "mprotect";
    s.kernel_faults_wait = memory_->SyscallWritesWait();
    s.frames_in_use = m.frames_in_use;
    s.frames_pinned = m.frames_pinned;
    s.vma_budget = m.vma_budget;
    s.vmas_used = m.vmas_used;
    s.budget_skips = m.budget_skips;
    s.lock_skips = m.lock_skips;
    s.locks_lost = m.locks_lost;
    s.protect_faults = m.protect_faults;
    s.pinned_io_skips = m.pinned_io_skips;
    s.merge_failures = ksm_->merge_failures();
    s.advised_pages = ksm_->AdvisedPages();
    s.kept_out_pages = PagesIn(kept_out_);
    return s;
  }

  // Engine::KernelWrites (pinned false) and Engine::KernelPins (true) for
  // this engine: [start, end) is unmerged and never merged again, where
  // kernel faults cannot wait for a window or, if pinned, always. Returns
  // the pages newly kept out.
  std::size_t KeepOut(Addr start, Addr end, bool pinned) {
    ControlLock lock(this);
    return KeepOutLocked(start, end, pinned);
  }

  // One step of Engine::ChangeMapping: with this engine's lock held, runs
  // `inner` (the next engine's step, or the change itself), which sets *ok.
  template <typename F>
  void ChangeMappingStep(Addr start, Addr end, MappingChange kind,
                         const F& inner, bool* ok, bool* advised_any) {
    ControlLock lock(this);
    const auto advised = AdvisedWithinLocked(start, end);
    if (!advised.empty()) *advised_any = true;
    // Nothing merged here, nor inherited from a parent: a discard has
    // nothing to restore.
    const bool discard = kind == MappingChange::kDiscard ||
                         kind == MappingChange::kDiscardToZero ||
                         kind == MappingChange::kAnonymousFlags ||
                         kind == MappingChange::kUserfaultfd;
    const bool flags = ChangesFlags(kind);
    // Given back and unadvised first; advised again if change() fails.
    const bool moves =
        kind == MappingChange::kMove || kind == MappingChange::kReprotect;
    const bool discard_restores =
        discard && (memory_->Stats().frames_in_use != 0 ||
                    !options_.adopted_memfds.empty());
    if (discard_restores) {
      // Given back where they are: they stay advised (Ksm::Unmerge); what a
      // discard to zero drops is not copied back first. A part that cannot
      // be given back stays merged, and the discard still goes ahead (those
      // pages read their frames again instead of zeros).
      for (auto [a, n] : advised) {
        if (kind == MappingChange::kDiscardToZero)
          memory_->DropFrameMappings(a, a + n * kPageSize);
        (void)ksm_->Unmerge(a, n);
      }
    } else if (moves) {
      // A part that cannot be given back stays advised and merged
      // (Ksm::Unadvise). A move must not go ahead then: the moved pages
      // would still map frames whose pages the engine would find gone
      // from the old address and release. It fails with ENOMEM, as mremap
      // and mprotect may.
      bool restored = true;
      for (auto [a, n] : advised) restored &= ksm_->Unadvise(a, n);
      if (!restored) {
        for (auto [a, n] : advised) ksm_->Advise(a, n);
        *ok = false;
        return;
      }
    }
    // The application's userfaultfd takes the range: ours leaves it (the
    // maps read afterwards show its flags, and keep ours away).
    if (kind == MappingChange::kUserfaultfd)
      memory_->YieldToUserfaultfd(start, end);
    // mlockall and munlockall (the whole address space): samepage's own
    // mappings are locked as the program's are, but MCL_CURRENT would also
    // populate them (the frame view: a page for every offset of a 64 MiB
    // chunk), so they are inaccessible meanwhile.
    const bool whole =
        kind == MappingChange::kFlags && start == 0 && end == kLastPage;
    if (whole) memory_->ShieldOwnMappings(true);
    inner();
    if (whole) memory_->ShieldOwnMappings(false);
    if (flags && *ok && !advised.empty()) {
      // From smaps (NoteVmaFlagsChanged): the plain maps show no locks and
      // no wipe-on-fork.
      (void)memory_->RefreshMaps();  // on failure the next window finds out
    } else if (kind == MappingChange::kUnmap && *ok) {
      for (auto [a, n] : advised) ksm_->Forget(a, n);
      LinuxMemory::RemoveInterval(&suspended_, start, end);
    } else if (moves && !*ok) {
      for (auto [a, n] : advised) ksm_->Advise(a, n);
    } else if (kind == MappingChange::kReprotect && *ok) {
      for (auto [a, n] : advised) Suspend(&suspended_, a, a + n * kPageSize);
      cv_.notify_all();  // the scanner counts its full scans on
    }
  }

  // Advice suspended over [start, end) by kReprotect, taken up again.
  void ResumeAdvice(Addr start, Addr end) {
    ControlLock lock(this);
    const std::vector<Interval> parts = SuspendedWithinLocked(start, end);
    if (parts.empty()) return;
    LinuxMemory::RemoveInterval(&suspended_, start, end);
    for (const Interval& p : parts) {
      std::vector<std::pair<Addr, std::size_t>> mergeable;
      (void)memory_->MergeableParts(p.start, p.end - p.start, &mergeable);
      for (auto [a, bytes] : mergeable) ksm_->Advise(a, bytes / kPageSize);
    }
    cv_.notify_all();
  }

  // Suspended advice over [from, from_end) moved by `delta` bytes, cut at
  // to_end (Engine::Moved).
  bool MoveSuspended(Addr from, Addr from_end, std::int64_t delta, Addr to_end,
                     bool source_kept) {
    ControlLock lock(this);
    const std::vector<Interval> parts = SuspendedWithinLocked(from, from_end);
    if (!source_kept) LinuxMemory::RemoveInterval(&suspended_, from, from_end);
    bool any = false;
    for (const Interval& p : parts) {
      const Addr lo = p.start + delta;
      const Addr hi = std::min<Addr>(p.end + delta, to_end);
      if (lo < hi) Suspend(&suspended_, lo, hi);
      any |= lo < hi;
    }
    return any;
  }

  // The parts of the suspended set within [start, end).
  std::vector<Interval> SuspendedWithinLocked(Addr start, Addr end) const {
    std::vector<Interval> parts;
    for (const Interval& i : suspended_) {
      const Addr lo = std::max(i.start, start), hi = std::min(i.end, end);
      if (lo < hi) parts.push_back({lo, hi});
    }
    return parts;
  }

  // --- fork ---
  void BeforeFork() {
    // A waiter like any control call, or a scanner at full speed would keep
    // the lock from fork() indefinitely.
    waiters_.fetch_add(1, std::memory_order_acq_rel);
    mu_.lock();
    waiters_.fetch_sub(1, std::memory_order_acq_rel);
    pub_mu_.lock();  // no reader holds it in the child
  }
  void AfterForkParent() {
    pub_mu_.unlock();
    mu_.unlock();
  }
  void AfterForkChild(bool start_scanner) {
    // The parent's values: the child reads its own once its engine is
    // rebuilt (the first control call publishes them).
    pub_valid_.store(false, std::memory_order_release);
    pub_mu_.unlock();
    // The scanner thread does not exist here; its handle must not be joined.
    if (scanner_) (void)scanner_.release();
    // Nor does it wait here, but the copied condition variable says it
    // does: the child's first notify_all would wait for that waiter to
    // leave, forever (one forked child in twenty hung so). Made afresh,
    // not destroyed: glibc's destroy waits for the waiters too. No other
    // thread exists to use it meanwhile, and mu_ is held.
    new (&cv_) std::condition_variable();
    // Callers that were queued for mu_ in the parent are not here either:
    // counted on, they would have the child's scanner hand the lock over
    // every few pages, to nobody.
    waiters_.store(0, std::memory_order_relaxed);
    stop_ = false;
    // The rebuild happens at the child's first call into samepage, or in
    // the scanner started here, which first waits kForkChildPause (most
    // children exec at once: the preload then starts afresh) so that a
    // child that never calls into samepage still merges, as the kernel's
    // children do. Where no thread can be made here (EAGAIN was seen under
    // bash), or where the fork was a system call made directly (the C
    // library's state is the parent's, and may hold a lock thread creation
    // needs), the first call starts it.
    rebuild_after_fork_ = true;
    // Kernel KSM puts a forked child's mm just behind ksmd's cursor (its
    // __ksm_enter: "to let the area settle down a little; when fork is
    // followed by immediate exec, we don't want ksmd to waste time"), so
    // the child is first scanned once ksmd has gone round everything else:
    // here, once the parent's scanner would have gone round its memory. A
    // child that lives less (a Redis BGSAVE, a fork before exec) pays for
    // no rebuild and no scan: with 63,000 mappings a rebuild reads 49 MB
    // of smaps.
    child_scan_from_ = std::chrono::steady_clock::now() +
                       std::max<std::chrono::nanoseconds>(
                           kForkChildPause, FullScanPeriodLocked());
    scan_period_start_ = {};
    last_scan_period_ = std::chrono::nanoseconds{0};
    if (start_scanner && ksm_->knobs().run == 1 &&
        (merge_any_ || ksm_->AdvisedPages() != 0)) {
      StartScannerLocked();
    }
    mu_.unlock();
  }

 private:
  // How long a full scan takes: the last one measured by the scanner, else
  // what the knobs make of the advised pages (a sleep per batch), a day at
  // most (knobs such as one page every 2^32 ms would overflow the clock).
  std::chrono::nanoseconds FullScanPeriodLocked() const {
    if (last_scan_period_.count() > 0) return last_scan_period_;
    constexpr std::uint64_t kMaxMs = 24ull * 3600 * 1000;
    const Knobs& k = ksm_->knobs();
    const std::uint64_t batch = std::max<std::uint64_t>(k.pages_to_scan, 1);
    const std::uint64_t batches = (ksm_->AdvisedPages() + batch - 1) / batch;
    const std::uint64_t sleep = k.sleep_millisecs;
    return std::chrono::milliseconds(
        sleep != 0 && batches > kMaxMs / sleep ? kMaxMs : batches * sleep);
  }

  // In a forked child the backend's frame store is shared with the parent and
  // frozen (its frames pinned), so the child gets a backend of its own and a
  // core rebuilt from the advised ranges: kernel KSM scans a child afresh too.
  // If a fresh backend cannot be made, the frozen one stays: its merges fail
  // and leave memory as it is.
  void RebuildAfterForkLocked() {
    if (!rebuild_after_fork_) return;
    rebuild_after_fork_ = false;
    if (ksm_->knobs().run == 1) StartScannerLocked();
    LinuxMemoryOptions options = options_;
    options.adopted_memfds = memory_->MemfdLineage();
    std::unique_ptr<LinuxMemory> fresh;
    if (!LinuxMemory::CreateInChild(options, *memory_, &fresh).ok()) return;
    options_ = options;
    const auto ranges = ksm_->AdvisedRanges();
    const Knobs knobs = ksm_->knobs();
    // The parent's frames stay mapped here: the old backend is never torn
    // down in the child, and the old core never releases them.
    (void)memory_.release();
    memory_ = std::move(fresh);
    ksm_ = NewCore();
    ksm_->knobs() = knobs;
    for (auto [a, n] : ranges) ksm_->Advise(a, n);
    // The fresh backend excludes what the old one did (its protection may
    // differ: a child can lose the privilege of kernel faults that wait).
    const auto kept_out = std::move(kept_out_);
    kept_out_.clear();
    for (const Interval& i : kept_out) {
      (void)KeepOutLocked(i.start, i.end, /*pinned=*/true);
    }
  }

  // pinned: the kernel pins the pages (Engine::KernelPins), so no merge is
  // safe under any protection.
  std::size_t KeepOutLocked(Addr start, Addr end, bool pinned) {
    if (!pinned && memory_->SyscallWritesWait()) return 0;
    const auto advised = AdvisedWithinLocked(start, end);
    // Unmerged first (merges waiting for a run are dropped with them), so
    // that no page there maps a frame once it is excluded: an excluded page
    // reads as absent, and a merged one would keep its frame for ever.
    // A page that cannot be restored stays merged and readable; outside a
    // window a kernel write to it is an ordinary copy-on-write.
    for (auto [a, n] : advised) (void)ksm_->Unadvise(a, n);
    memory_->Exclude(start, end - start);
    // Still advised, as the kernel keeps VM_MERGEABLE: its pages are
    // visited and found absent, so never protected nor merged.
    for (auto [a, n] : advised) ksm_->Advise(a, n);
    const std::size_t before = PagesIn(kept_out_);
    LinuxMemory::AddInterval(&kept_out_, start, end);
    return PagesIn(kept_out_) - before;
  }

  // The advised parts of [start, end): (start, pages) each. Every mapping
  // call the preload sees asks this: a walk of all the ranges took 60 us
  // a munmap with 20,000 one-page buffers advised.
  std::vector<std::pair<Addr, std::size_t>> AdvisedWithinLocked(
      Addr start, Addr end) const {
    return ksm_->AdvisedRanges(start, end);
  }

  SpaceStat SpaceStatLocked() const {
    SpaceStat s = ksm_->GetSpaceStat();
    s.merge_any = merge_any_;
    // Advice held over memory samepage cannot merge now (read-only,
    // flags) is VM_MERGEABLE memory to the kernel, whose ksm_stat says yes.
    s.mergeable =
        merge_any_ || ksm_->AdvisedPages() != 0 || !suspended_.empty();
    return s;
  }

  std::vector<std::pair<Addr, std::size_t>> AdvisedRangesLocked() const {
    return ksm_->AdvisedRanges();
  }

  // Memory whose metadata cannot be allocated is left unadvised, and tried
  // again at the next sweep (as ksmd goes on where it cannot allocate an
  // rmap item).
  void AdviseAllAnonymousLocked() {
    for (auto [a, bytes] : memory_->AnonymousRanges()) {
      (void)ksm_->Advise(a, bytes / kPageSize);
    }
  }

  // Only the background scanner lets a run's merges wait for its next
  // batch: a scan the caller asked for has done its merges on return.
  std::size_t ScanLocked(std::size_t pages, bool stop_at_scan_end,
                         bool carry_runs = false,
                         const std::function<bool()>& pause = {}) {
    const std::uint64_t scans = ksm_->GetCounters().full_scans;
    // Only the background scanner carries runs, and keeps recent views
    // (its full scans and its merge-any sweep below).
    memory_->ReuseRecentViews(carry_runs);
    const std::size_t n =
        ksm_->ScanBatch(pages, stop_at_scan_end, carry_runs, pause);
#ifndef NDEBUG
    ksm_->CheckInvariants();  // debug builds: every batch, on real memory
#endif
    // merge-any covers mappings made later too: look for them once per scan,
    // and from the background scanner at most every kMergeAnySweepNanos
    // (a smaps read of the whole process, milliseconds under the lock: a
    // small process scanned at sleep_millisecs=0 ends hundreds of scans a
    // second), and no more often than smaps's share of the time allows (a
    // read walks every page table: 22 ms at 1 GiB present, which took a
    // fifth of a scanner at full speed every 100 ms).
    if (merge_any_ && ksm_->GetCounters().full_scans != scans) {
      const std::int64_t now = backend::MonotonicNanos();
      const bool background = carry_runs;  // only the scanner thread carries
      const std::int64_t spacing =
          std::max(kMergeAnySweepNanos, memory_->SmapsReadSpacing());
      if (!background || now - last_sweep_ >= spacing) {
        AdviseAllAnonymousLocked();
        last_sweep_ = now;
      }
    }
    memory_->ReuseRecentViews(false);
    PublishLocked();
    return n;
  }

  // A core over memory_ that publishes as its batches go on.
  std::unique_ptr<Ksm> NewCore() {
    auto core = std::make_unique<Ksm>(memory_.get(), RealClock());
    core->SetProgressHook([this] { PublishLocked(); });
    core->SetGoneHook(
        [this](Addr a, std::size_t n) { HoldLeftOutLocked(a, n); });
    core->SetScanStartHook([this] { ResumeEligibleLocked(); });
    return core;
  }

  // As a full scan begins (its view just read): suspended advice over
  // memory samepage merges again (the program's userfaultfd unregistered
  // it, MADV_KEEPONFORK, an mprotect to read+write not seen in library
  // mode) is taken up again, as the kernel's VM_MERGEABLE never stopped.
  void ResumeEligibleLocked() {
    // merge-any advises all such memory again at its sweeps.
    if (suspended_.empty() || merge_any_) return;
    PruneSuspendedLocked();
    const std::vector<Interval> parts = suspended_;
    for (const Interval& p : parts) {
      // Eligible by the view (which knows the VmFlags, but may be as old
      // as a full scan), and by the maps as they are now (protection and
      // layout: an mprotect since; their flags are read again before a
      // page of them is touched).
      // Memory whose flags the view has not read (an unseen mprotect made
      // it read+write again) too: advised, it is read before it is
      // touched, and left out again (held) if its flags say so.
      std::vector<std::pair<Addr, std::size_t>> eligible;
      memory_->EligibleParts(p.start, p.end, &eligible, /*unread_too=*/true);
      for (auto [a, bytes] : eligible) {
        std::vector<std::pair<Addr, std::size_t>> mergeable;
        (void)memory_->MergeableParts(a, bytes, &mergeable);
        for (auto [m, len] : mergeable) {
          LinuxMemory::RemoveInterval(&suspended_, m, m + len);
          ksm_->Advise(m, len / kPageSize);
        }
      }
    }
  }

  // Pages a scan found gone: what of them is still mapped memory samepage
  // leaves out (made read-only, given MADV_WIPEONFORK, a protection key,
  // sealed...) keeps its advice in the suspended set, as the kernel keeps
  // VM_MERGEABLE there and ksmd goes on visiting the process (its
  // full_scans count on). Not under merge-any, which advises everything.
  void HoldLeftOutLocked(Addr start, std::size_t npages) {
    const Addr end = start + npages * kPageSize;
    if (merge_any_) {
      memory_->ForgetGoneLeftOut(start, end);  // Probe's note, not kept
      return;
    }
    std::vector<std::pair<Addr, std::size_t>> held;
    (void)memory_->AdvisableParts(start, end, /*left_out=*/true, &held);
    for (auto [a, bytes] : held) Suspend(&suspended_, a, a + bytes);
  }

  // While suspended advice is all there is (no full scan reads the maps):
  // at most every kPruneHeldNanos, the view read again, and the advice
  // over memory unmapped since (library mode: munmap is not seen) dropped,
  // as the kernel's VM_MERGEABLE goes with the mapping, and over memory
  // samepage merges again taken up (ResumeEligibleLocked).
  void RecheckSuspendedLocked() {
    const std::int64_t now = backend::MonotonicNanos();
    if (now - last_prune_ < kPruneHeldNanos) return;
    (void)memory_->RefreshMaps();  // on failure, the view before
    // Here, not only through ResumeEligibleLocked (which returns early
    // under merge-any): the prune's time spaces these maps reads.
    PruneSuspendedLocked();
    ResumeEligibleLocked();
  }

  // At most every kPruneHeldNanos (from ResumeEligibleLocked, at each full
  // scan's start too, whatever else is advised): suspended advice over
  // memory no longer mapped as private anonymous memory is dropped, as
  // the kernel's VM_MERGEABLE goes with the mapping (library mode sees no
  // munmap: memory mapped there later, never advised, was merged).
  void PruneSuspendedLocked() {
    const std::int64_t now = backend::MonotonicNanos();
    if (now - last_prune_ < kPruneHeldNanos) return;
    last_prune_ = now;
    std::vector<Interval> kept;
    for (const Interval& i : suspended_) {
      std::vector<std::pair<Addr, std::size_t>> mapped;
      if (!memory_->AdvisableParts(i.start, i.end, /*left_out=*/false,
                                   &mapped)) {
        LinuxMemory::AddInterval(&kept, i.start, i.end);  // unknown: kept
        continue;
      }
      for (auto [a, bytes] : mapped)
        LinuxMemory::AddInterval(&kept, a, a + bytes);
    }
    suspended_ = std::move(kept);
  }

  // With mu_ held: what ReadKnob shows until the next publish (after each
  // batch and control call, and within a batch as merges are done and full
  // scans end: Ksm::SetProgressHook).
  void PublishLocked() {
    const Knobs knobs = ksm_->knobs();
    const Counters counters = ksm_->GetCounters();
    std::lock_guard<std::mutex> pub(pub_mu_);
    pub_knobs_ = knobs;
    pub_counters_ = counters;
    pub_valid_.store(true, std::memory_order_release);
  }

  void StartScannerLocked() {
    if (scanner_) return;
    stop_ = false;
    // Born with every signal blocked (it takes the creating thread's mask):
    // the program's signals are for the program's threads. A signal sent
    // to the process may go to any thread that does not block it, and a
    // program that blocks SIGUSR1 everywhere to take it with sigwaitinfo
    // was killed when it reached the scanner instead. ScannerLoop unblocks
    // the faults its guarded reads need.
    const backend::AllSignalsBlocked blocked;
    try {
      scanner_ = std::make_unique<std::thread>([this] { ScannerLoop(); });
    } catch (const std::system_error&) {
      // No thread, no background merging; the application carries on and
      // synchronous scans still work.
      scanner_.reset();
    }
  }

  void StopScanner() {
    std::unique_ptr<std::thread> t;
    {
      ControlLock lock(this);
      stop_ = true;
      cv_.notify_all();
      t = std::move(scanner_);
    }
    if (t) t->join();
  }

  // ksmd: scan pages_to_scan pages, sleep sleep_millisecs, while run is 1.
  void ScannerLoop() {
    // Named like ksmd's role, so tools can find its CPU time in /proc.
    pthread_setname_np(pthread_self(), "samepage-ksmd");
    tls_inside_engine = 1;  // for the thread's life
    // A guarded read that faults (the program unmapped the page) leaves
    // through samepage's SIGSEGV/SIGBUS handler; blocked, the kernel would
    // kill the process instead (as it does for any fault it cannot deliver).
    sigset_t faults;
    sigemptyset(&faults);
    sigaddset(&faults, SIGSEGV);
    sigaddset(&faults, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &faults, nullptr);
    std::unique_lock<std::mutex> lock(mu_);
    // In a forked child: a full scan of the parent's first (AfterForkChild),
    // whether or not a call into samepage rebuilt the engine meanwhile.
    cv_.wait_until(lock, child_scan_from_, [this] { return stop_; });
    while (!stop_) {
      RebuildAfterForkLocked();
      const Knobs& k = ksm_->knobs();
      if (k.run == 1 && ksm_->AdvisedPages() == 0 && !suspended_.empty()) {
        // Advice only where samepage merges nothing (read-only memory,
        // flags its mappings would lose): ksmd still visits such a
        // process, and counts its full scans. One a sleep, at least a
        // millisecond apart (ksmd at sleep_millisecs 0 would take a core).
        RecheckSuspendedLocked();
        if (ksm_->AdvisedPages() != 0) continue;  // merging again
        if (!suspended_.empty()) ksm_->CountEmptyFullScan();
        cv_.wait_for(lock, std::chrono::milliseconds(
                               std::max<std::uint32_t>(k.sleep_millisecs, 1)));
        continue;
      }
      if (k.run != 1 || ksm_->AdvisedPages() == 0) {
        scan_period_start_ = {};  // idle time is no part of a scan
        if (!memory_->HoldsFrames()) {
          cv_.wait(lock);
          continue;
        }
        // Frames held for merged pages the program moved unseen are freed
        // once their mapping goes, which a full scan would check: with
        // none to run, the maps are read once a second for them (a kernel
        // KSM page is freed with its last mapping, whatever `run` says).
        cv_.wait_for(lock, kHeldFramesRecheck);
        if (!stop_) memory_->RecheckHeldFrames();
        continue;
      }
      // A batch of pages_to_scan pages, paused for each control call that
      // waits (an munmap of advised memory, a knob write, fork): kernel KSM
      // holds a process's mmap lock for a page or so at a time, not a batch.
      const std::function<bool()> waiting = [this] {
        return waiters_.load(std::memory_order_acquire) > 0;
      };
      // As ksm_do_scan, a batch also ends where a full scan does: a small
      // process is scanned once per sleep, not pages_to_scan pages' worth
      // of times (thousands of full scans a second, at pages_to_scan 5,000
      // and sleep_millisecs 5, of an idle interpreter).
      const std::uint64_t scans = ksm_->GetCounters().full_scans;
      for (std::size_t left = k.pages_to_scan; left > 0;) {
        const std::size_t n = ScanLocked(left, /*stop_at_scan_end=*/true,
                                         /*carry_runs=*/true, waiting);
        left = n >= left ? 0 : left - n;
        // Done, a full scan ended, nothing to scan, or cut short: only the
        // last goes on.
        if (left == 0 || n == 0 || !waiting() ||
            ksm_->GetCounters().full_scans != scans) {
          break;
        }
        lock.unlock();
        HandOff();
        lock.lock();
        if (stop_ || ksm_->knobs().run != 1 || ksm_->AdvisedPages() == 0) break;
      }
      if (ksm_->GetCounters().full_scans != scans) {
        const auto now = std::chrono::steady_clock::now();
        if (scan_period_start_ != std::chrono::steady_clock::time_point{})
          last_scan_period_ = now - scan_period_start_;
        scan_period_start_ = now;
      }
      if (stop_ || ksm_->knobs().run != 1) continue;
      const std::uint32_t sleep_ms = ksm_->knobs().sleep_millisecs;
      if (sleep_ms == 0) {
        // std::mutex is not fair: without a handoff, a scanner at full speed
        // takes it back before a waiting control call ever gets it.
        lock.unlock();
        HandOff();
        lock.lock();
      } else {
        cv_.wait_for(lock, std::chrono::milliseconds(sleep_ms));
      }
    }
  }

 public:
  // Every engine's fork handlers (g_engines_mu held from the first to the
  // second): pthread_atfork's, and Engine::BeforeRawFork's and
  // AfterRawFork's.
  static void AllBeforeFork() {
    g_engines_mu.lock();
    if (g_engines == nullptr) return;
    for (EngineImpl* e : *g_engines) e->BeforeFork();
  }
  static void AllAfterForkParent() {
    if (g_engines != nullptr) {
      for (EngineImpl* e : *g_engines) e->AfterForkParent();
    }
    g_engines_mu.unlock();
  }
  static void AllAfterForkChild(bool start_scanner) {
    if (g_engines != nullptr) {
      for (EngineImpl* e : *g_engines) e->AfterForkChild(start_scanner);
    }
    g_engines_mu.unlock();
  }

 private:
  static void RegisterForFork(EngineImpl* e) {
    static std::once_flag once;
    std::call_once(once, [] {
      pthread_atfork(AllBeforeFork, AllAfterForkParent,
                     [] { AllAfterForkChild(/*start_scanner=*/true); });
    });
    std::lock_guard<std::mutex> lock(g_engines_mu);
    if (g_engines == nullptr) g_engines = new std::vector<EngineImpl*>();
    g_engines->push_back(e);
    // Memory the kernel writes, registered before this engine existed
    // (engine locks are taken after g_engines_mu, as in ChangeMapping).
    for (bool pinned : {false, true}) {
      const auto* registry = pinned ? g_kernel_pinned : g_kernel_written;
      if (registry == nullptr) continue;
      for (const Interval& i : *registry)
        (void)e->KeepOut(i.start, i.end, pinned);
    }
  }

  static void UnregisterForFork(EngineImpl* e) {
    std::lock_guard<std::mutex> lock(g_engines_mu);
    g_engines->erase(std::remove(g_engines->begin(), g_engines->end(), e),
                     g_engines->end());
  }

  // mu_ for a control call: the scanner hands it over within a few page
  // visits of seeing a waiter, sooner than a thread asleep on the mutex
  // wakes (munmap under merge-any with the scanner at full speed: 26-39 us
  // a call, against 6 us with the scanner idle), so the caller spins for
  // it a while first, then sleeps.
  static void LockSpinningFirst(std::mutex& mu) {
    if (mu.try_lock()) return;
    const auto until =
        std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    for (unsigned i = 1;; ++i) {
      __builtin_ia32_pause();
      if (mu.try_lock()) return;
      if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) break;
    }
    mu.lock();
  }

  // Holds mu_ for a control call; counts as a waiter until it has it, so the
  // scanner hands the lock over between batches.
  class ControlLock {
   public:
    explicit ControlLock(const EngineImpl* e) : e_(e) {
      ++tls_inside_engine;
      e_->waiters_.fetch_add(1, std::memory_order_acq_rel);
      LockSpinningFirst(e_->mu_);
      e_->waiters_.fetch_sub(1, std::memory_order_acq_rel);
      const_cast<EngineImpl*>(e_)->RebuildAfterForkLocked();
    }
    ~ControlLock() {
      // A control call may have changed knobs or counters (merges, unmerges,
      // a rebuilt core after fork): its caller's next read must see them.
      const_cast<EngineImpl*>(e_)->PublishLocked();
      e_->mu_.unlock();
      --tls_inside_engine;
    }
    void Yield() {
      e_->mu_.unlock();
      e_->HandOff();
      e_->mu_.lock();
    }
    ControlLock(const ControlLock&) = delete;
    ControlLock& operator=(const ControlLock&) = delete;

   private:
    const EngineImpl* e_;
  };

  // Called without mu_: waits (briefly) until callers queued for mu_ got it.
  void HandOff() const {
    for (int spin = 0; waiters_.load(std::memory_order_acquire) > 0; ++spin) {
      if (spin > 100000) break;  // bounded: never wait on a stuck caller
      std::this_thread::yield();
    }
  }

  mutable std::atomic<int> waiters_{0};
  mutable std::mutex mu_;
  // What ReadKnob formats without mu_ (see PublishLocked).
  std::mutex pub_mu_;
  Knobs pub_knobs_;                     // guarded by pub_mu_
  Counters pub_counters_;               // guarded by pub_mu_
  std::atomic<bool> pub_valid_{false};  // set once published (per process)
  std::condition_variable cv_;
  LinuxMemoryOptions options_;  // guarded by mu_
  bool rebuild_after_fork_ = false;      // guarded by mu_
  // The scanner's first batch waits for this (a forked child's; the epoch
  // elsewhere). Guarded by mu_.
  std::chrono::steady_clock::time_point child_scan_from_{};
  // When the scanner's last full scan ended, and how long the one before
  // it took (FullScanPeriodLocked). Guarded by mu_.
  std::chrono::steady_clock::time_point scan_period_start_{};
  std::chrono::nanoseconds last_scan_period_{0};
  std::unique_ptr<LinuxMemory> memory_;  // guarded by mu_
  std::unique_ptr<Ksm> ksm_;             // guarded by mu_
  bool merge_any_ = false;               // guarded by mu_
  // Advised parts reprotected away from R+W (kReprotect): advised again at
  // Reprotected. Guarded by mu_.
  std::vector<Interval> suspended_;
  std::int64_t last_prune_ = 0;  // PruneSuspendedLocked
  // Ranges kept out for Engine::KernelWrites and KernelPins, sorted,
  // disjoint.
  std::vector<Interval> kept_out_;       // guarded by mu_
  std::int64_t last_sweep_ = 0;          // guarded by mu_ (steady ns)
  bool stop_ = false;                    // guarded by mu_
  std::unique_ptr<std::thread> scanner_;  // guarded by mu_
};

}  // namespace

void Engine::VmaFlagsChanged() { backend::NoteVmaFlagsChanged(); }

bool Engine::ThreadInsideEngine() { return tls_inside_engine > 0; }

namespace {

// The pages [start, end) that [addr, addr + len) touches (end clamped at
// the top of the address space).
std::pair<Addr, Addr> PagesOf(void* addr, std::size_t len) {
  const Addr start = reinterpret_cast<Addr>(addr) & ~(kPageSize - 1);
  const Addr end = reinterpret_cast<Addr>(addr) + len;
  // [addr, addr + len) runs to the end of the address space if it
  // overflows, or if rounding its end up to a page would (mlockall's).
  return {start, end < start || end > kLastPage
                     ? kLastPage
                     : (end + kPageSize - 1) & ~(kPageSize - 1)};
}
}  // namespace

bool Engine::ChangeMapping(void* addr, std::size_t len, MappingChange kind,
                           bool (*change)(void* arg), void* arg,
                           bool* advised) {
  if (ThreadInsideEngine()) {
    // The engine's own memory, freed or moved by the engine (its lock
    // held here, or the scanner's): no window is open over it, and taking
    // the locks would wait for this very thread.
    const bool ok = change(arg);
    if (ok && ChangesFlags(kind)) backend::NoteVmaFlagsChanged();
    if (advised != nullptr) *advised = false;
    return ok;
  }
  const auto [start, end] = PagesOf(addr, len);
  std::lock_guard<std::mutex> lock(g_engines_mu);
  bool ok = false;
  bool advised_any = false;
  const std::vector<EngineImpl*> engines =
      g_engines != nullptr ? *g_engines : std::vector<EngineImpl*>();
  // Engines are locked in registration order, as the fork handler does, and
  // the window lock last, as the scanner takes it: no lock-order inversion.
  auto step = [&](auto& self, std::size_t i) -> void {
    if (i == engines.size()) {
      if (advised != nullptr) *advised = advised_any;
      if (engines.empty()) {
        ok = change(arg);  // no engine, no window: nothing to exclude
      } else {
        backend::WindowLock window;
        ok = change(arg);
      }
      // Before the engines refresh their views (on the way out): flags
      // are only in smaps.
      if (ok && ChangesFlags(kind)) backend::NoteVmaFlagsChanged();
      return;
    }
    engines[i]->ChangeMappingStep(start, end, kind,
                                  [&] { self(self, i + 1); }, &ok,
                                  &advised_any);
  };
  step(step, 0);
  return ok;
}

void Engine::StopAll() {
  if (ThreadInsideEngine()) return;
  std::lock_guard<std::mutex> lock(g_engines_mu);
  if (g_engines == nullptr) return;
  for (EngineImpl* e : *g_engines) (void)e->WriteKnob("run", "2");
}

void Engine::BeforeRawFork() {
  // As fork() runs them: the engines' prepare handler was registered after
  // the backend's, so it runs first (the engines' locks, then the window
  // lock, as everywhere); parent and child handlers in the other order.
  EngineImpl::AllBeforeFork();
  backend::RawForkPrepare();
}

void Engine::AfterRawFork(bool in_child) {
  const int err = errno;
  if (in_child) {
    backend::RawForkChild();
    EngineImpl::AllAfterForkChild(/*start_scanner=*/false);
  } else {
    backend::RawForkParent();
    EngineImpl::AllAfterForkParent();
  }
  errno = err;
}

bool Engine::Moved(void* from, std::size_t from_len, void* to,
                   std::size_t to_len, bool source_kept) {
  if (ThreadInsideEngine() || from_len == 0) return false;
  const auto [start, end] = PagesOf(from, from_len);
  if (!MaybeSuspended(start, end)) return false;
  const auto [to_start, to_end] = PagesOf(to, to_len);
  const auto delta = static_cast<std::int64_t>(to_start - start);
  std::lock_guard<std::mutex> lock(g_engines_mu);
  if (g_engines == nullptr) return false;
  bool any = false;
  for (EngineImpl* e : *g_engines)
    any |= e->MoveSuspended(start, end, delta, to_end, source_kept);
  return any;
}

void Engine::Reprotected(void* addr, std::size_t len) {
  if (ThreadInsideEngine() || len == 0) return;
  const auto [start, end] = PagesOf(addr, len);
  if (!MaybeSuspended(start, end)) return;
  std::lock_guard<std::mutex> lock(g_engines_mu);
  if (g_engines == nullptr) return;
  for (EngineImpl* e : *g_engines) e->ResumeAdvice(start, end);
}

namespace {
std::size_t KeepOutEverywhere(void* addr, std::size_t len, bool pinned) {
  if (len == 0) return 0;
  const auto [start, end] = PagesOf(addr, len);
  std::lock_guard<std::mutex> lock(g_engines_mu);
  auto*& registry = pinned ? g_kernel_pinned : g_kernel_written;
  if (registry == nullptr) registry = new std::vector<Interval>();
  LinuxMemory::AddInterval(registry, start, end);
  std::size_t kept_out = 0;
  if (g_engines != nullptr) {
    for (EngineImpl* e : *g_engines) kept_out += e->KeepOut(start, end, pinned);
  }
  return kept_out;
}
}  // namespace

std::size_t Engine::KernelWrites(void* addr, std::size_t len) {
  return KeepOutEverywhere(addr, len, /*pinned=*/false);
}

std::size_t Engine::KernelPins(void* addr, std::size_t len) {
  return KeepOutEverywhere(addr, len, /*pinned=*/true);
}

bool Engine::DiscardWithoutAllocating(void* addr, std::size_t len,
                                      bool zero_fill,
                                      bool (*change)(void* arg), void* arg,
                                      bool* result) {
  if (!backend::FrameMappingsKnowable()) return false;
  const auto [start, end] = PagesOf(addr, len);
  if (backend::ProcessStateRange().first == 0) {  // no engine ever: no frames
    *result = change(arg);
    return true;
  }
  // Not g_engines_mu, nor an engine's lock: the caller may be the scanner,
  // holding its engine's lock, in a malloc it called. Windows never
  // allocate, so the window lock is never held by the caller. Shared: a
  // fork may hold it, waiting in the allocator's fork handler for a lock
  // the caller holds.
  backend::WindowsClosed windows_closed;
  *result = change(arg);
  if (*result && zero_fill) backend::ZeroFrameMappedPages(start, end);
  return true;
}

bool Engine::OutsideWindows(bool (*change)(void* arg), void* arg) {
  if (backend::ProcessStateRange().first == 0) return change(arg);  // no engine
  backend::WindowLock window;
  return change(arg);
}

bool Engine::AllocatorChange(bool (*change)(void* arg), void* arg) {
  if (backend::ProcessStateRange().first == 0) return change(arg);  // no engine
  // Shared, as DiscardWithoutAllocating's: the caller may hold the
  // allocator's locks, which fork's handlers take while fork holds it.
  backend::WindowsClosed windows_closed;
  return change(arg);
}

void Engine::ThreadExiting() {
  if (ThreadInsideEngine()) return;
  backend::NoteThreadExiting();  // a no-op without the process state
}

Status Engine::Create(const EngineOptions& options,
                      std::unique_ptr<Engine>* engine) {
  const LinuxMemoryOptions backend_options = ToBackendOptions(options);
  std::unique_ptr<LinuxMemory> memory;
  Status st = LinuxMemory::Create(backend_options, &memory);
  if (!st.ok()) return st;
  *engine = std::make_unique<EngineImpl>(backend_options, std::move(memory));
  return Status::Ok();
}

}  // namespace samepage
