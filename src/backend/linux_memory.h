// LinuxMemory: the samepage::Memory contract on this process's real memory.
//
// Merging a page maps a frame of the FrameStore's memfd over it with
// mmap(MAP_PRIVATE | MAP_FIXED): every sharer maps the one page-cache page and
// the kernel copies on write. Each merge opens a write-protect window over
// the pages (Protector + write_protect.h), compares them in full while
// protected, remaps the equal ones (one mmap per run of consecutive pages
// with consecutive frames), makes the rest writable again and closes the
// window. Writers that hit a window wait and then retry: no write is lost.
//
// Also owns: the cached view of /proc/self/(s)maps (which pages we may touch
// at all), /proc/self/pagemap probing, the VMA budget, and the exclusions
// (our own memory, the main stack, the stacks and TLS of threads that call
// in, anything passed to Exclude): excluded pages report kExcluded and are
// never protected, because write-protecting a thread's own stack kills it.
//
// Thread safety: like every Memory, called by one thread at a time (the
// engine's lock); application threads may fault concurrently. The object is
// allocated in its own anonymous mapping (operator new) that is excluded
// from merging, so its members may be written while windows are open.
//
// Known limits:
//  - The replacement (mmap MAP_FIXED, mremap) is not atomic with respect to
//    the application's own munmap + mmap of the same address during a window
//    (microseconds): its new mapping would be overwritten. Only an
//    interceptor that serialises the application's munmap/mmap/mremap with
//    our windows can close this.
//  - VMAs with MADV_WIPEONFORK, sealing or the application's own
//    userfaultfd are never merged: a replacement mapping would lose the
//    property. MADV_DONTFORK, MADV_DONTDUMP and mlock are applied again to
//    the replacement inside the window. A locked replacement is mapped
//    read-only with MAP_LOCKED and then locked with MLOCK_ONFAULT (smaps
//    "lo lf", where the application had "lo"): a plain mlock of a private
//    writable mapping populates it with write faults, which would copy
//    every frame at once.
//  - Locked memory is merged only while the kernel would let the process
//    lock one more page (RLIMIT_MEMLOCK or CAP_IPC_LOCK): replacing a
//    locked page unlocks it for a moment, so the lock must be sure to come
//    back. Otherwise it is left as it is (lock_skips).
//  - Unmerge gives contents back but not VMAs: the restored anonymous VMA
//    has its own anon_vma and the kernel does not join it with its
//    neighbours (scattered merges cost 2 VMAs per page, also after Unmerge).
//  - userfaultfd mode registers every mergeable VMA with our descriptor:
//    such VMAs no longer join unregistered neighbours (brk growth, new
//    mmaps) until they are registered at the next full scan too.
//  - mprotect mode: a sigaltstack in ordinary heap memory could be
//    write-protected; thread stacks are recognised only by glibc's layout.

#ifndef SAMEPAGE_BACKEND_LINUX_MEMORY_H_
#define SAMEPAGE_BACKEND_LINUX_MEMORY_H_

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend/cheaper_of.h"
#include "backend/frame_store.h"
#include "backend/proc_maps.h"
#include "backend/protector.h"
#include "core/memory.h"
#include "samepage/status.h"

namespace samepage::backend {

struct LinuxMemoryOptions {
  enum class Protection { kAuto, kUserfaultfd, kMprotect };
  // kAuto: userfaultfd if its probe round trip succeeds, else mprotect.
  Protection protection = Protection::kAuto;
  // VMAs our merges may add; 0 derives it from /proc/sys/vm/max_map_count
  // minus the mappings the process holds and a safety margin.
  std::size_t vma_budget = 0;
  // Injectable procfs paths (tests exercise the error paths).
  static constexpr const char* kOwnSmaps = "/proc/self/smaps";
  std::string maps_path = kOwnSmaps;
  // The same without per-VMA statistics and VmFlags: read instead of smaps
  // at a full scan when the layout, seen through it, is what the last smaps
  // read showed up to our own merges (see ReadView). "" always reads smaps.
  std::string plain_maps_path = "/proc/self/maps";
  // A smaps read that would take at least this long is expensive
  // (ReadView): the reads the layout alone asks for are put off until the
  // time since the last one is smaps_cost_share times what a read would
  // take (so that they take at most a twentieth of the time). What it
  // would take: the last read, and smaps_ns_per_mapping for each mapping
  // added since (about 4 us a one-page mapping on the KVM guest: 0.10 s
  // at 25,400 mappings).
  std::int64_t smaps_expensive_ns = 20'000'000;
  std::int64_t smaps_cost_share = 20;
  std::int64_t smaps_ns_per_mapping = 4'000;
  // The background scanner's full scans keep a view younger than this
  // whatever it cost (ReuseRecentViews): an idle process of a few
  // thousand pages ends a full scan every batch, fifty a second at the
  // default knobs, and read its maps at each (0.3 ms for 300 mappings: a
  // twentieth of a core for each of a PostgreSQL server's processes).
  // Memory mapped meanwhile waits that long more, well within a full scan
  // of a process at kernel KSM's pace.
  std::int64_t recent_view_ns = 100'000'000;
  // A frame mapped over one page alone (scattered merges: a mapping, a VMA,
  // of its own) is mapped into the page table at once (UFFDIO_CONTINUE),
  // which also gives the VMA its anon_vma: its first read then does not
  // fault and its first write costs what kernel KSM's copy-on-write does,
  // not about 1 us more (the allocation), for about 2 us of the scanner's
  // CPU a mapping (docs/performance.md, twentieth session). Runs share one
  // anon_vma, so their pages are left to fault.
  bool map_lone_pages = true;
  // Two choices whose cheaper way depends on the machine: how a compare
  // reads a frame likely not read through our view lately
  // (FramesLikelyCold; kMeasured: PreadBeatsColdView, a probe at the first
  // join of frames),
  // and how pages are copied into new frames, through our scratch area or
  // with pwritev straight from the pages (kMeasured: CheaperOf times both
  // on the work). Tests force one.
  enum class ColdFrameRead { kMeasured, kView, kPread };
  ColdFrameRead cold_frame_read = ColdFrameRead::kMeasured;
  enum class FrameFill { kMeasured, kBounce, kDirect };
  FrameFill frame_fill = FrameFill::kMeasured;
  std::string pagemap_path = "/proc/self/pagemap";
  std::string max_map_count_path = "/proc/sys/vm/max_map_count";
  std::string status_path = "/proc/self/status";  // VmLck
  // Tests: called before each frame mapping of a discard-first window
  // (MergeSpanDiscardFirst); a non-zero errno fails that mapping as the
  // kernel would, so the pages must be filled back from their frames.
  int (*fail_discard_first_map)(Addr at, std::size_t len) = nullptr;
  // Tests: called inside a discard-first window right before its discard
  // of [at, at + len), as a thread that unmaps part of the span there would.
  void (*before_discard_first_discard)(Addr at, std::size_t len) = nullptr;
  // Tests: called inside Unmerge's window over [at, at + len), before the
  // copy that replaces it; a non-zero errno fails that replacement (the
  // pages stay mapped to their frames, as after a failed copy or mremap).
  int (*fail_unmerge_copy)(Addr at, std::size_t len) = nullptr;
  // Tests: a maps read's search for stray frame mappings skips the entries
  // this returns true for, as a read torn by a concurrent mremap would
  // miss a moved mapping (the confirming read it then makes does not ask).
  bool (*stray_walk_misses)(const MapEntry& e) = nullptr;
  // Tests: microseconds each merge sleeps between its last check that its
  // pages are still there (StillProtected) and the mapping of their frames,
  // as a scanner preempted there would. Debug builds set it from
  // SAMEPAGE_DEBUG_MAP_DELAY_US (Engine::Create).
  std::int64_t map_delay_us = 0;
  // Frame stores of ancestors (a forked child's parent), as (dev, inode):
  // their private mappings count as merged pages of ours for probing,
  // merging over and unmerging, but their frames are never allocated or
  // freed here.
  std::vector<std::pair<dev_t, ino_t>> adopted_memfds;
};

// Tells every LinuxMemory that VmFlags may have changed without a change of
// layout (the LD_PRELOAD layer calls it after madvise, mlock ...): the next
// view is read from smaps.
void NoteVmaFlagsChanged();

// Tells every LinuxMemory that memory may have been made read-only (or
// given a protection key) by a call the engines did not see: another
// allocator's mprotect (preload, Engine::AllocatorChange), made with no
// window open. Merges planned on a view read before it would map frames
// read+write over that memory (and without PROT_EXEC): merge windows do
// not open until the view is read again, which the next Probe does.
// Allocates nothing.
void NoteUnseenReprotect();

// For discards made from inside the program's allocator (preload), where
// nothing may allocate or take an engine's lock. True if the kernel tells
// which mappings are frames (PROCMAP_QUERY, Linux 6.11).
bool FrameMappingsKnowable();
// Writes zeros into every page of [start, end) that a private mapping of
// a frame store of this process (or of an ancestor it adopted) holds: after
// MADV_DONTNEED such a page reads the frame's bytes, where anonymous memory
// reads zeros. REQUIRES: the window lock held (no window is open). No
// allocation, no lock.
void ZeroFrameMappedPages(Addr start, Addr end);

// mremap(old, old_len, new_len, flags, new_addr) for a range the kernel
// refused with EFAULT because it spans several mappings, where they are
// pieces of what could be one private anonymous mapping (contiguous, the
// same protection and name): a merge puts a mapping in place per run of
// merged pages, and the anonymous copies that give them back are not
// joined with their neighbours again, so a program's one mapping may have
// become many. Each piece is moved with mremap in turn, keeping its own
// flags (locked, dontfork...), the last one grown as asked; what was moved
// goes back if a later piece cannot. Returns the new address, or
// MAP_FAILED with errno: EFAULT where the range is not such pieces (or
// has a hole), as the call said.
void* MremapPieces(Addr old, std::size_t old_len, std::size_t new_len,
                   int flags, Addr new_addr);

class LinuxMemory final : public Memory {
 public:
  using Protection = LinuxMemoryOptions::Protection;
  using Range = std::pair<Addr, std::size_t>;  // start, length in bytes
  struct Interval {
    Addr start;
    Addr end;
  };
  // Adds [start, end) to a sorted set of disjoint intervals, joining the
  // ones it overlaps or touches.
  static void AddInterval(std::vector<Interval>* set, Addr start, Addr end);
  // Takes [start, end) out of such a set, cutting the intervals it meets.
  static void RemoveInterval(std::vector<Interval>* set, Addr start, Addr end);

  // Pages per write-protect window: bounds how long a writer may wait.
  static constexpr std::size_t kMaxWindowPages = 128;
  // A run of consecutive pages joining frames in one window: its calls
  // (protect, pagemap and lock checks, registration, wake) spread over four
  // times the pages of kMaxWindowPages. On a machine where system calls are
  // dear (a PVM guest), identical pages took 20% less merge CPU than with
  // 128 pages (256: 13%); a writer may wait for up to about 1 ms there.
  static constexpr std::size_t kMaxRunWindowPages = 512;
  // Pairs whose first pages are consecutive, in one window (and one on
  // their partners' side), ending where a page table does: a window over
  // all 512 pages of one maps them with one call that replaces the whole
  // table (kPageTableSpan). Pairs in runs 8% less merge CPU than windows
  // of 256 pairs, two identical 512 MiB halves 20%; a writer waited up to
  // 1.4 ms for such a window on the PVM machine (256 pairs: 0.9 ms).
  static constexpr std::size_t kMaxPairWindowPages = 512;
  // A run of zero pages to drop, ending where a page table does: the
  // window's work per page is one read (the all-zero check) between the
  // protect and the discard.
  static constexpr std::size_t kMaxZeroWindowPages = 512;
  // The span of one page table (x86-64: 512 entries). On the PVM machine
  // (docs/performance.md) a discard or mapping call that covers a whole
  // page table costs 0.2 us a page, one that covers part of it 0.5-1 us
  // (511 pages: 0.4-0.5): windows of runs end at these boundaries.
  static constexpr Addr kPageTableSpan = Addr{512} * kPageSize;
  // A run window can cover one whole page table (MergeIntoFrames).
  static_assert(kMaxRunWindowPages * kPageSize == kPageTableSpan);
  // A window of pages joining frames takes the discard-first way
  // (MergeSpanDiscardFirst) when it needs at least this many mappings: its
  // fixed cost (three flushes, and registering the span for missing pages
  // and back, which splits and joins VMAs) is about that of 16 flushes on
  // an idle machine (prototype, 128-page spans: 16 mappings break even
  // there, 4 lose by 2.3x; with another vCPU busy 4 already win by 1.7x).
  static constexpr std::size_t kMinDiscardFirstMappings = 16;
  // Windows over partners per pair batch: scattered partners of a run of
  // pages share the run's window, protect, copy and mapping on its side.
  static constexpr std::size_t kMaxPartnerRuns = 8;
  // Pairs whose pages run on together on both sides for at least this many
  // pairs go a window per run (MergePairBatch); shorter ones are merged in
  // address order, each pair's p copied into a new frame and both pages
  // then joining it (MergeScatteredPairs), where windows are discard-first
  // (userfaultfd with kernel faults waiting).
  static constexpr std::size_t kMinPairRun = 8;
  // Pages per Unmerge replacement (one mremap, one new VMA each).
  static constexpr std::size_t kUnmergeChunkPages = 1024;
  // Unmerge asks PROCMAP_QUERY for the mappings of a range up to this long
  // (at most a query per page, 0.7 us each), and reads the maps beyond.
  static constexpr std::size_t kQueriedUnmergePages = 4096;

  // Fails if the process state (fault handler), the frame store, pagemap or
  // the maps file cannot be set up, or kUserfaultfd was asked for and the
  // probe failed.
  static Status Create(const LinuxMemoryOptions& options,
                       std::unique_ptr<LinuxMemory>* memory);
  // Create, in a forked child, taking the first view from the plain maps
  // and the VmFlags of `parent`'s last smaps read (the parent's backend,
  // copied by fork; those flags a child does not inherit, the locks, left
  // out), where no flag change was reported since: a smaps read walks
  // every page table (4-5 ms in a PostgreSQL backend, whose page tables
  // include shared_buffers), and the child's layout is the parent's. Not
  // where memory was advised since the parent's last smaps read.
  static Status CreateInChild(const LinuxMemoryOptions& options,
                              const LinuxMemory& parent,
                              std::unique_ptr<LinuxMemory>* memory);
  ~LinuxMemory() override;

  LinuxMemory(const LinuxMemory&) = delete;
  LinuxMemory& operator=(const LinuxMemory&) = delete;

  // The object lives in its own excluded anonymous mapping.
  static void* operator new(std::size_t size);
  static void operator delete(void* p, std::size_t size);

  // --- Memory ---
  void BeginFullScan() override;
  void Probe(Addr addr, std::span<PageState> states) override;
  Addr SkipAbsent(Addr from, Addr to) override;
  [[nodiscard]] bool Hash(Addr addr, std::uint64_t* hash) override;
  [[nodiscard]] bool HashFirstVisit(Addr addr, std::uint64_t* hash,
                                    bool* guessed) override;
  void MergeIntoFrames(std::span<const Addr> pages,
                       std::span<const FrameId> frames,
                       std::span<MergeResult> results) override;
  void MergePairs(std::span<const Addr> p, std::span<const Addr> q,
                  std::span<FrameId> frames,
                  std::span<MergeResult> results) override;
  // Pairs in runs are checked in MergePairBatch's compare loop, from the
  // cache; a scattered pair's p is read first.
  void MergePairsExpecting(std::span<const Addr> p, std::span<const Addr> q,
                           std::span<FrameId> frames,
                           std::span<MergeResult> results,
                           std::span<const std::uint64_t> expected) override;
  // Where windows are discard-first (MergeScatteredPairs).
  bool WantsScatteredPairsTogether() const override {
    return protection_ == Protection::kUserfaultfd &&
           protector_->KernelFaultsWait();
  }
  void DropZeroPages(std::span<const Addr> pages,
                     std::span<MergeResult> results) override;
  [[nodiscard]] bool Unmerge(Addr addr, std::size_t npages) override;
  // Before a discard that leaves [start, end) reading zeros (MADV_DONTNEED,
  // MADV_DONTNEED_LOCKED, MADV_FREE, under the engine's lock): our frame
  // mappings there become fresh anonymous memory, without the copy of what
  // Unmerge would keep and the call drops. A range with locked memory, and
  // any mapping that cannot be replaced, is left mapped for Unmerge.
  void DropFrameMappings(Addr start, Addr end);
  void ReleaseFrame(FrameId frame) override;
  void NoteUnseenUnmap() override { hold_releases_ = true; }
  void NoteCopiedAway(Addr page) override;
  [[nodiscard]] bool UnmergeForgotten(Addr start, Addr end) override;
  void FlushReleasedFrames() override;
  // Frames held for a mapping that moved unseen (see held_) are waiting
  // for it to go; a full scan checks them, and this does where none runs.
  bool HoldsFrames() const { return !held_.empty(); }
  void RecheckHeldFrames();
  MemoryStats Stats() const override;

  // --- Linux specific ---
  // kMprotect or kUserfaultfd: what Create chose.
  Protection protection() const { return protection_; }
  // True if a syscall writing into a page during a window waits (userfaultfd
  // with kernel faults) rather than failing with EFAULT.
  bool SyscallWritesWait() const { return protector_->KernelFaultsWait(); }

  // Never protect or merge [addr, addr + len) (rounded out to pages).
  void Exclude(Addr addr, std::size_t len);

  // Pages of the scratch area resident now (a mincore call): memory that
  // merging costs the process besides its metadata. Not in Stats(), which
  // the engine reads on every discard the application makes.
  std::size_t ScratchResidentPages() const;

  // madvise(MADV_MERGEABLE)'s checks, from the kernel's VMAs now:
  // EINVAL if addr is not page-aligned or len overflows; len is rounded up
  // to pages; ENOMEM if part of the range is unmapped (parts still holds the
  // mapped mergeable pieces, as the kernel still advises those). parts = the
  // private anonymous writable pieces (and our own merged mappings); shared,
  // file-backed, hugetlb and special VMAs are skipped silently.
  // The VMAs come from PROCMAP_QUERY (Linux 6.11), a query per VMA of the
  // range, which shows no VmFlags: the parts are left alone
  // (advised_unread_) until the next full scan, or the first Probe that
  // reaches them, reads smaps,
  // where flag-bearing memory (see proc_maps.h) drops out as kGone. Where
  // the query does not work, smaps is read here, as the flags then are.
  // `advising` false (MADV_UNMERGEABLE, which only needs the holes): the
  // parts are not going to be advised, and need no read.
  // not_writable (may be null): the private anonymous pieces that are not
  // read+write (or are executable), which the kernel would advise too and
  // samepage merges once mprotect makes them read+write.
  [[nodiscard]] Status MergeableParts(
      Addr addr, std::size_t len, std::vector<Range>* parts,
      bool advising = true, std::vector<Range>* not_writable = nullptr);

  // The application is about to register [start, end) with a userfaultfd
  // of its own: our registration (write-protection) leaves it, as a VMA
  // takes one userfaultfd. Not registered again while the maps show the
  // application's (ApplyMaps: not Eligible).
  void YieldToUserfaultfd(Addr start, Addr end);

  // The parts of [start, end) mapped as private anonymous memory, of any
  // protection (not [vdso] and the like): memory the kernel would keep
  // advised. With left_out, only the parts samepage leaves out where the
  // kernel keeps merging what was advised: read+write memory for its flags
  // (wipe-on-fork, a protection key, sealed, the program's own
  // userfaultfd), or memory of another protection (read-only, PROT_NONE,
  // executable; an unseen mprotect in library mode): by the last view, or by
  // the view Probe had when it called them kGone (a view read since, after the
  // program's userfaultfd left, say, may show them eligible again); that
  // note of Probe's over [start, end) is then dropped. False (and empty)
  // where the maps cannot be read.
  bool AdvisableParts(Addr start, Addr end, bool left_out,
                      std::vector<Range>* parts);
  // Drops that note of Probe's over [start, end) without asking the
  // kernel for the mappings: for a caller that holds no advice (merge-any
  // advises memory anew at its sweeps).
  void ForgetGoneLeftOut(Addr start, Addr end) {
    RemoveInterval(&gone_left_out_, start, end);
  }
  // The parts of [start, end) samepage merges by the last view (eligible
  // mappings, not excluded). With unread_too, also the read+write private
  // anonymous mappings whose flags that view has not read yet (new or
  // grown since the last smaps read, as memory an unseen mprotect made
  // read+write again is): advised, they are read before any page of them
  // is touched.
  void EligibleParts(Addr start, Addr end, std::vector<Range>* parts,
                     bool unread_too = false) const;

  // Every private anonymous writable mapping (merge-any mode), minus the
  // excluded ranges and the main stack; in mprotect mode also minus thread
  // stacks (an anonymous rw mapping right above a PROT_NONE guard, as glibc
  // lays them out), whose owners would die on a write fault.
  // For the background scanner (ReuseRecentViews) a view as recent as its
  // full scans keep serves, if it showed no new memory.
  std::vector<Range> AnonymousRanges();
  // How far apart reads of smaps that the caller may put off should be, so
  // that they take at most their share of the time (smaps_cost_share times
  // what the last read took; 0 before any read).
  std::int64_t SmapsReadSpacing() const {
    return options_.smaps_cost_share * smaps_took_;
  }
  // For the background scanner (true) only: a full scan, and merge-any's
  // sweep (AnonymousRanges), may keep the maps view applied less than
  // smaps_cost_share times what reading it took, or options_.recent_view_ns,
  // ago (no flag change reported since). A small
  // process scanned at a high rate ends hundreds of full scans a second, and
  // read /proc/self/maps at each: most of its scanner's time, idle. Scans a
  // caller asks for (false) read it at each full scan, as before.
  void ReuseRecentViews(bool reuse) { reuse_recent_views_ = reuse; }

  // Around an mlockall by the application (the engine's lock held, no
  // window open): shield=true makes samepage's own mappings (the frame view
  // and the unmerge scratch area) inaccessible, so MCL_CURRENT does not
  // populate them; false unlocks them and gives their access back.
  void ShieldOwnMappings(bool shield);

  FrameStore& frame_store() { return store_; }
  // This store's memfd and the adopted ones: what a child adopts.
  std::vector<std::pair<dev_t, ino_t>> MemfdLineage() const;
  // The cached view and exclusions, one interval per line (debugging).
  std::string DebugString() const;
  // Refreshes the maps view now from smaps, new memory included. Each
  // BeginFullScan refreshes it too, from the plain maps where it can (see
  // ReadView): memory mapped since the last smaps read stays out of that
  // view.
  [[nodiscard]] Status RefreshMaps(bool full = true);

 private:
  LinuxMemory() = default;
  Status Init(const LinuxMemoryOptions& options);
  // Init's view: the plain maps, every mapping's flags unknown.
  [[nodiscard]] Status ReadFirstView();

  void RegisterThread();
  bool RegisterWithProtector(Addr start, std::size_t len);
  // The interval of the set holding page, or nullptr.
  static const Interval* Find(const std::vector<Interval>& set, Addr page);
  static bool Contains(const std::vector<Interval>& set, Addr page);
  bool IsExcluded(Addr page) const;
  bool IsTouchable(Addr page) const;
  // Not excluded and touchable: a page we may protect and replace.
  // Re-applies MADV_DONTFORK / MADV_DONTDUMP to a mapping we just put in
  // place over [start, start + len), where the one it replaced had them,
  // and with `lock` the application's mlock (for anonymous copies, whose
  // pages are all present: mlock populates nothing). Called inside the
  // window: fork() waits for the window lock, so no child ever sees the
  // mapping without the flag. False if a call failed.
  bool ReapplyVmaFlags(Addr start, std::size_t len, bool lock);
  // Inside an open window over [at, at + len), pages protected: maps the
  // frames from `first` on over it, with the VMA flags the application had
  // there. kMerged, or why not, with the range left as it was (or, if a
  // lock could not be applied again, given back as anonymous memory).
  MergeResult MapFrames(Addr at, std::size_t len, FrameId first,
                        ProtectMethod how);

  // The replacement over [at, at + len) of locked memory, mapped read-only:
  // locks it on fault where the application had locked it, makes it
  // writable and faults its frames in (read faults share, and lock them).
  bool LockFrameMapping(Addr at, std::size_t len);
  // True if the kernel would let this process lock again what a
  // replacement unlocks (locked_vm within RLIMIT_MEMLOCK, or CAP_IPC_LOCK).
  bool LockRoomForReplacement();
  // Before a window: false (counted in lock_skips_) if [start, start + len)
  // holds locked memory that could not be locked again once replaced.
  bool LockRoomFor(Addr start, std::size_t len);
  // Inside a window, before anything is replaced: [start, start + len) is
  // locked now (some part of it) but not in our view, or the other way
  // round (the application locked or unlocked it since the maps were
  // read). Then the window must not replace anything; the maps are read
  // again at the next full scan.
  bool LockViewStale(Addr start, std::size_t len);
  // True if the frame view still maps the frames (our memfd, at their
  // offsets), as far as PROCMAP_QUERY tells (before Linux 6.11: true). The
  // view is mapped as the store grows, without MAP_FIXED, as malloc maps:
  // a program that unmaps a range and maps it again with MAP_FIXED in two
  // steps can land on a chunk mapped between them, and a compare through
  // it would read the program's memory. A chunk found replaced is mapped
  // again elsewhere (the merges are refused this time). Not in a window.
  bool ViewIntact(const FrameId* frames, std::size_t n);
  static bool Overlaps(const std::vector<Interval>& set, Addr start, Addr end);
  // The start of the first interval of the set that ends after a (at or
  // before a if one holds a); ~0 if there is none.
  static Addr NextIntervalStart(const std::vector<Interval>& set, Addr a);
  // [start, end) lies within one interval of the set.
  static bool Covers(const std::vector<Interval>& set, Addr start, Addr end);
  bool MayReplace(Addr page) const {
    return IsTouchable(page) && !IsExcluded(page);
  }
  // A mapping of this store's memfd; IsOurMemfd also takes the memfds of
  // the stores a forked child adopted.
  bool IsStoreMemfd(const MapEntry& e) const;
  bool IsOurMemfd(const MapEntry& e) const;
  bool Eligible(const MapEntry& e) const;
  static bool IsThreadStackLike(const std::vector<MapEntry>& maps,
                                std::size_t i);
  Status ApplyMaps(const std::vector<MapEntry>& maps);
  // The process's mappings, with VmFlags for every mapping we may merge.
  // Reads smaps when `full`, on the first call, or when kSmapsInterval has
  // passed since the last smaps read. Otherwise reads the plain maps (~6x
  // cheaper with tens of thousands of merged mappings) and gives each
  // mergeable mapping the VmFlags the last smaps read showed at its
  // address: our merges and unmerges only switch pieces of that memory
  // between anonymous and our memfd, keeping the flags. A mapping wholly
  // outside it is new memory: marked flags_unknown, not merged until the
  // next smaps read (memory becomes mergeable only through MergeableParts,
  // whose parts wait for a smaps read, and AnonymousRanges, which reads
  // smaps). Known memory that grew or was
  // joined with new (brk, mremap in place) makes it read smaps. A flag
  // changed on a whole mapping without a change of
  // layout (madvise DONTFORK, mlock of a whole mapping), or memory unmapped
  // and mapped again in place, is seen within kSmapsInterval, or at once
  // after NoteVmaFlagsChanged(); a split of anonymous memory that we did not
  // make (AnonSplitsKnown) makes it read smaps too.
  // Where smaps is expensive (a read would take options_.smaps_expensive_ns
  // or more, judged by the last read and the mappings added since: about
  // 4-8 us a mapping, 0.5 s at 59,000 mappings), reads are
  // options_.smaps_cost_share times their cost apart, kSmapsInterval at
  // the least;
  // until the next one, mappings that would have asked for it are marked
  // flags_deferred and left alone (ApplyMaps: excluded). Reads for `full`
  // and after NoteVmaFlagsChanged() are never put off.
  Status ReadView(std::vector<MapEntry>* maps, bool full);
  // The VMAs that meet [start, end), from PROCMAP_QUERY, without VmFlags
  // (but "ht" for hugetlb). False where the query does not work (before
  // Linux 6.11) or maps_path is not the process's own.
  bool QueryMappings(Addr start, Addr end, std::vector<MapEntry>* maps) const;
  // Private read-write non-executable memory that is anonymous or ours:
  // what merges and unmerges turn into one another.
  bool MergeableKind(const MapEntry& e) const;
  // Our merges split anonymous memory only where our memfd begins or ends,
  // or where a page went back anonymous (RegisterRestored notes those).
  // A split between two anonymous mappings that the last smaps read did not
  // show was made by the application (mlock, madvise or mprotect of part of
  // a mapping): its flags may differ, so smaps must be read. With `defer`,
  // both sides of such a split are marked flags_deferred instead, and true
  // is returned.
  bool AnonSplitsKnown(std::vector<MapEntry>* maps, bool defer) const;
  bool IsAnonSplit(const MapEntry& a, const MapEntry& b) const;
  void NoteAnonSplits(const std::vector<MapEntry>& maps);
  bool RangeMapped(Addr start, std::size_t len) const;
  // The last smaps read is younger than SmapsInterval() and no flag
  // change was reported since: ReadView would give no fresher flags.
  bool SmapsReadFresh() const;
  // What a smaps read would cost now with this many mappings (the last
  // read's time, and its text for each mapping added since).
  std::int64_t SmapsCost(std::size_t mappings) const;
  // How long ReadView keeps to the plain maps between smaps reads:
  // kSmapsInterval, or smaps_cost_share times the cost where smaps is
  // expensive.
  std::int64_t SmapsInterval() const;
  MergeResult ClassifyProtectError(int err, Addr start, std::size_t len) const;
  template <typename Body>
  void InProtectedWindow(Addr base, std::size_t n, std::uint64_t cost,
                         MergeResult* local, Body&& body);
  void CopyOutResults(const MergeResult* local, std::size_t n,
                      MergeResult* out);
  // Frame mappings made by merges: recorded after their window closed,
  // registered with userfaultfd per flush rather than per mapping, and
  // added to the interval sets once per call. Writers that faulted on the
  // pages they replaced are woken by their window, before it closes
  // (WakeReplaced).
  struct NewMapping {
    Addr start;
    Addr end;
    bool registered;  // with userfaultfd already
  };
  void NoteMapped(Addr start, Addr end, bool registered = false);
  // Wakes the writers that faulted on write-protected pages of
  // [start, end) that a window replaced with new mappings: they sleep in
  // the kernel on the old PTEs until woken, and may hold a lock (malloc's)
  // that whoever takes the window lock next, or the merging thread itself,
  // waits for. Before the window closes, then. One call over the span.
  void WakeReplaced(Addr start, Addr end);
  // Registers what NoteMapped recorded since the last flush.
  // REQUIRES: no window open.
  void FlushMapped();
  // Records the flushed mappings in frame_mapped_ and uffd_registered_.
  void CommitMapped();
  // Every page of [start, end) is touchable and none is excluded.
  bool SpanReplaceable(Addr start, Addr end) const;
  // A discard-first window may cover [from, page + kPageSize), in our view,
  // to discard `page`: replaceable and unlocked throughout, and `page` maps
  // no frame (a frame's private copy would read the frame's bytes once
  // discarded). Mappings of frames before `page` are only protected.
  bool DiscardFirstCovers(Addr from, Addr page) const;
  static void AddIntervals(std::vector<Interval>* set,
                           std::vector<Interval>* adds);
  // VMAs a mapping of frames over [start, end) may add: the VMA it lands
  // in split at each end, unless the page on the other side of that end
  // is a frame mapping of ours and [start, end) maps none (an edge between
  // two VMAs already). frame_mapped_ misses no frame mapping made before
  // the last CommitMapped; of ours made since, only the last one made
  // (last_mapped_end_) and one ending at mapped_to, which the caller
  // makes first, count as edges. An edge the application has taken away
  // since (unmapped a frame mapping and mapped anonymous memory in its
  // place) goes unseen until the next view: the budget's margin covers
  // that.
  std::uint64_t MappingCost(Addr start, Addr end, Addr mapped_to = 0) const;
  bool BudgetAllows(std::uint64_t extra) const {
    return vmas_used_ + extra <= budget_;
  }
  // When `extra` more mappings would not fit the estimate, counts the real
  // mappings (rate-limited). Allocates: never inside a window.
  void RecountIfShort(std::uint64_t extra);
  // Sets vmas_used_ and budget_ from the process's real mapping count.
  void UpdateBudget(long count);

  // Inside a window: the protected page against its frame, in full.
  // kMerged if equal, kDiffers if not, kGone if the page could not be read.
  // use_pread: read the frame with pread rather than through the view.
  MergeResult CompareWithFrame(Addr page, FrameId frame, bool use_pread);
  // Whether the window's frames are likely not read through the view
  // lately (fresh_frames_, or no frame of many pages among them): read
  // with pread where PreadColdFrames().
  bool FramesLikelyCold(const FrameId* frames, std::size_t n) const;
  // Batches: contiguous pages, at most kMaxRunWindowPages, all MayReplace.
  void MergeBatchIntoFrames(Addr base, std::size_t n, const FrameId* frames,
                            MergeResult* results);
  // The discard-first way of joining frames, for pages (ascending, within
  // kMaxWindowPages of the first) whose frames need several mappings.
  // Mapping a frame over a present page zaps it, and each zap flushes the
  // TLB: on a virtual machine where a flush of the running process's own
  // mapping is expensive (6 µs, and 25-40 µs while another vCPU is busy,
  // measured on this kind of machine) that flush was most of a merge.
  // Here one window write-protects the span, compares, registers it for
  // missing-page faults too, discards the equal pages with one
  // process_madvise (one flush), makes the span writable again (one flush)
  // and maps the frames into the empty page tables (no flush); readers and
  // writers of a discarded page wait in the kernel until its frame is
  // mapped and they are woken. Only where kernel faults wait
  // (SyscallWritesWait): with a user-mode-only descriptor a system call
  // reading such a page would fail. False, with nothing done or reported,
  // where it does not apply (the caller merges the pages the usual way).
  bool MergeSpanDiscardFirst(const Addr* pages, const FrameId* frames,
                             std::size_t n, MergeResult* results);
  // Inside a discard-first window: gives the pages of [at, at + len) that
  // have no page back the bytes of frames first.. (equal to what they held).
  void FillFromFrames(Addr at, std::size_t len, FrameId first);
  // Ends a discard-first window's missing-page registration of
  // [start, start + len): registered for write-protect faults only again
  // (true), or, where that failed, not registered at all (false).
  bool ForgetMissing(Addr start, std::size_t len);
  // Pairs: p contiguous, each q[k] anywhere; the q form at most
  // kMaxPartnerRuns runs of consecutive pages (a window each).
  // expected (may be null): as for MergePairsExpecting.
  void MergePairBatch(Addr pbase, const Addr* q, std::size_t n, FrameId* frames,
                      MergeResult* results, const std::uint64_t* expected);
  // The pairs `which` (indices into p, q, frames and results, p ascending)
  // in address order: each pair's p is copied into a new frame (frames in
  // OrderPairFrames' order, so that neighbours in memory take neighbouring
  // frames whichever side of their pairs they are; unprotected: the join
  // compares it in full), then both pages join that frame with
  // MergeIntoFrames, sorted by address, so that pages of many pairs close
  // together share a window, and, discard-first, the mappings go into
  // emptied page tables without a TLB flush each. A pair of which only one
  // page could join gets that page back anonymous (RestoreAnonymous). Pairs
  // past the VMA budget (each mapping the layout takes charged the edges it
  // may add, MappingCost) are not tried: the pairs go in slices the budget
  // has room for.
  void MergeScatteredPairs(std::span<const Addr> p, std::span<const Addr> q,
                           std::span<const std::size_t> which,
                           std::span<FrameId> frames,
                           std::span<MergeResult> results);
  // One slice of MergeScatteredPairs, all of it within the budget: pair
  // which[order[k]] takes the slice's k-th frame.
  void MergeScatteredSlice(std::span<const Addr> p, std::span<const Addr> q,
                           std::span<const std::size_t> which,
                           std::span<const std::uint32_t> order,
                           std::span<FrameId> frames,
                           std::span<MergeResult> results);
  // pages: ascending, in one page table (kPageTableSpan); one window over
  // their span. False, with nothing done or reported, if a sparse span
  // could not be protected.
  bool DropZeroBatch(const Addr* pages, std::size_t n, MergeResult* results);
  static bool Readable(Addr page);  // a guarded read of its first bytes
  // Reads the pagemap entries of n <= kProbeChunk pages at base into
  // pagemap_buf_; returns how many arrived.
  std::size_t ReadPagemap(Addr base, std::size_t n);
  // Just before a call that replaces or drops [at, at + len) inside a
  // window: true if those pages are still the ones we protected. glibc
  // frees and allocates memory with internal munmap/mmap that the preload
  // cannot hold back during our windows; a block freed and allocated again
  // at the same address since we protected it would otherwise be
  // overwritten. Narrows that race to the time between this check and the
  // call; does not close it (a preempted scanner: limitations.md item 5).
  bool StillProtected(Addr at, std::size_t len, ProtectMethod how);
  // Inside a window, protection applied: direct I/O registered with
  // BeginPinnedIo may be writing into [at, at + len) through a pin, so
  // nothing there may be replaced (counted in pinned_io_skips_).
  bool PinnedIoIn(Addr at, std::size_t len);
  // Every VMA over [at, at + len) is anonymous (no file: not a merged page's
  // private copy, where MADV_DONTNEED would bring the frame's bytes back).
  // False where it cannot tell (no PROCMAP_QUERY before Linux 6.11). If
  // true and last_end is given, it receives the end of the last VMA seen
  // (anonymous up to there).
  bool AnonymousVmas(Addr at, std::size_t len, Addr* last_end = nullptr);
  // Copies the n pages at src into frames first.. with pwrite (the kernel
  // copies into the page cache: no fault on the frame view, no zeroing),
  // through the scratch area. REQUIRES: no other use of the scratch area
  // is under way (Unmerge and restores use it too, one at a time).
  // copied[k]: page k arrived whole (false where src was unmapped).
  void CopyIntoFrames(Addr src, std::size_t n, FrameId first, bool* copied);
  // As CopyIntoFrames, page src[k] into frame first + k (gathered in the
  // scratch area).
  void GatherIntoFrames(const Addr* src, std::size_t n, FrameId first,
                        bool* copied);
  // The body of both: page source_of(k) into frame first + k.
  template <typename SourceOf>
  void CopyPagesIntoFrames(SourceOf source_of, std::size_t n, FrameId first,
                           bool* copied);
  // Makes [start, start + len) writable again except pages marked kMerged
  // (if skip_merged) in results (one entry per page); of pages marked
  // kGone, only what is still registered with our userfaultfd, and their
  // waiting writers are woken.
  void UnprotectRest(Addr start, std::size_t n, const MergeResult* results,
                     bool skip_merged, ProtectMethod how);
  // After a userfaultfd unprotect of [start, start + len) failed: clears
  // the write-protect bit of every page that still has it (its VMA lost
  // its registration), registering the page first.
  void ClearStrayProtection(Addr start, std::size_t len);
  // REQUIRES: an open window over the range, pages protected (or mapped
  // read-only). Replaces the range by anonymous memory with the same bytes.
  bool ReplaceWithAnonymousCopy(Addr start, std::size_t len, int prot);
  // Outside any window, after a successful ReplaceWithAnonymousCopy of the
  // range with `prot`: registers the new VMA, and records whether it is.
  void RegisterRestored(Addr start, std::size_t len, int prot);
  bool RestoreAnonymous(Addr start, std::size_t len, int prot);

  LinuxMemoryOptions options_;
  Protection protection_ = Protection::kMprotect;
  std::unique_ptr<Protector> protector_;
  FrameStore store_;
  // A frame never written, mapped by zero pages that cannot be dropped
  // (DropZeroBatch); allocated at the first need, never released.
  FrameId zero_frame_ = kNoFrame;
  int pagemap_fd_ = -1;
  int maps_query_fd_ = -1;  // /proc/self/maps, for PROCMAP_QUERY
  // Where Unmerge builds replacement pages: a mapping we own for good, so
  // that no scratch address is ever a hole the application could map into
  // (mremap MREMAP_DONTUNMAP moves the pages out and leaves it mapped).
  Addr scratch_ = 0;
  static constexpr std::size_t kScratchBytes = kUnmergeChunkPages * kPageSize;
  // Pages a pair window copies through the scratch area at a time (1 MiB):
  // what of it stays resident between merges (CopyIntoFrames).
  static constexpr std::size_t kBouncePages = 256;
  static_assert(kBouncePages * kPageSize <= kScratchBytes);
  // Pages at the start of the scratch area known to be populated
  // (WarmScratch); 0 again once a copy is moved out or dropped
  // (ReplaceWithAnonymousCopy).
  std::size_t scratch_warm_pages_ = 0;
  // Populates the scratch area's first npages, if not known to be.
  void WarmScratch(std::size_t npages);
  // Copies the len bytes at src into the start of the scratch area: false
  // if src could not be read.
  bool CopyIntoScratch(Addr src, std::size_t len);
  // The fewest pages CopyIntoScratch has the kernel fill (UFFDIO_COPY): a
  // fill costs two registration calls more. C probe, pages given back k at
  // a time: k = 1 no faster (the calls vary from 6 to 21 us), k = 4 14.4
  // against 11.3 us a page, k = 16 12.9 against 8.8, k = 64 7.2 against 3.6.
  static constexpr std::size_t kMinKernelFillPages = 4;
  std::uint64_t id_ = 0;  // distinguishes instances for RegisterThread
  // MergePairBatch's arrays per pair, too large for the stack of a thread
  // that scans synchronously. Written inside windows, so in *this, whose
  // mapping is excluded from merging: a heap block may lie in memory that
  // merges (merge-any), and a write to it inside a window over it would
  // wait for that window forever (preload.malloc_test hung so once).
  struct PairWindowState {
    std::size_t run_of[kMaxPairWindowPages];
    MergeResult local[kMaxPairWindowPages];
    FrameId frames[kMaxPairWindowPages];
    Interval mapped[2 * kMaxPairWindowPages];
    ProtectMethod mapped_how[2 * kMaxPairWindowPages];
    bool pgone[kMaxPairWindowPages];
    bool qgone[kMaxPairWindowPages];
    bool frames_leaked[kMaxPairWindowPages];
    bool copied[kMaxPairWindowPages];
    Interval restored_pieces[kMaxPairWindowPages];
    MergeResult side[kMaxPairWindowPages];
  };
  PairWindowState pair_window_;
  // MergeSpanDiscardFirst's arrays per page of its span (up to a page
  // table's worth, kMaxRunWindowPages), for the same reasons.
  struct SpanWindowState {
    MergeResult local[kMaxRunWindowPages];
    FrameId frame_of[kMaxRunWindowPages];
    bool asked[kMaxRunWindowPages];
    iovec runs[kMaxRunWindowPages];
    iovec spans[kMaxRunWindowPages];  // adjacent runs joined
    std::size_t run_first[kMaxRunWindowPages];
    std::uint8_t charged[kMaxRunWindowPages];  // per run: MappingCost, 0-3
    bool edge_before[kMaxRunWindowPages];      // left edge: the run before's
    bool mapped[kMaxRunWindowPages];
    bool discarded[kMaxRunWindowPages];
    bool unmapped[kMaxRunWindowPages];  // its discard found part unmapped
    MergeResult mine[kMaxRunWindowPages];
  };
  SpanWindowState span_window_;
  // Debug builds: aborts unless [p, p + size) lies in memory excluded from
  // merging (design.md, "The backend's own memory").
  void CheckWindowStateExcluded(const void* p, std::size_t size) const;

  // The maps view, rebuilt by RefreshMaps. touchable_: coalesced ranges of
  // private writable memory that is anonymous or our memfd; our own merges
  // and unmerges only move pages between those two kinds, so they never
  // invalidate it. auto_excluded_: main stack, thread stacks (mprotect).
  std::vector<Interval> touchable_;  // sorted, coalesced
  mutable Interval touchable_hit_ = {0, 0};  // IsTouchable's last answer
  std::vector<Interval> auto_excluded_;
  // Private anonymous mappings left out, by the last view, where the
  // kernel would keep merging advised pages: read+write ones for their
  // VmFlags, and those of other protections (ApplyMaps; AdvisableParts).
  std::vector<Interval> left_out_;
  // Read+write private anonymous mappings whose flags the last view has
  // not read (EligibleParts with unread_too).
  std::vector<Interval> flags_unread_;
  // Pages Probe called kGone for being in left_out_, until
  // AdvisableParts reports them: a view read in between (the program's
  // userfaultfd unregistered, say) may no longer leave them out, and their
  // advice must not be lost with it.
  std::vector<Interval> gone_left_out_;
  std::vector<Interval> excluded_;  // ours, thread stacks/TLS, Exclude()
  // Where our memfd is mapped (merged pages, absent or not, and their
  // private copies): from the maps plus our own merges and unmerges since.
  // Lets Probe call an absent merged page kFrame (it reads as the frame),
  // and outside it Probe uses mincore, which cannot tell a frame page from
  // an anonymous one: it must never miss a mapping we made (a superset is
  // only slower).
  std::vector<Interval> frame_mapped_;
  // Where the application asked for MADV_DONTFORK / MADV_DONTDUMP (smaps "dc",
  // "dd"): every mapping we put there gets the same advice again.
  // The maps view was applied after the last BeginFullScan: the next one
  // need not read smaps again.
  bool view_fresh_ = false;
  // The last view applied (RefreshMaps, AnonymousRanges): when, what
  // reading and applying it took, the flag epoch it saw; and whether a
  // full scan may keep it a while (ReuseRecentViews).
  std::int64_t view_read_at_ = 0;
  std::int64_t view_took_ = 0;
  std::uint64_t view_epoch_ = 0;
  // NoteUnseenReprotect's count when the last view was read.
  std::uint64_t view_unseen_ = 0;
  // A merge window, opened only if no unseen reprotect came since the
  // view (else -1, as for a busy slot). REQUIRES: the window lock.
  int OpenMergeWindowSeen(Addr start, Addr end);
  bool reuse_recent_views_ = false;
  bool RecentViewReusable() const;
  // The last view showed memory whose flags it did not know (new memory
  // seen through the plain maps).
  bool view_unknown_ = false;
  // ReadView, then ApplyMaps, noting when and at what cost (the above).
  Status ReadAndApplyView(bool full, std::vector<MapEntry>* maps);
  // Applies a view read since `started` at flags epoch `epoch`, and keeps
  // when, what it took and whether it showed memory of unknown flags.
  Status ApplyView(const std::vector<MapEntry>& maps, std::int64_t started,
                   std::uint64_t epoch, std::uint64_t unseen);
  // From the last smaps read (ReadView): the VmFlags of its mergeable
  // memory as runs of equal flags (our own "uw" left out:
  // uffd_registered_ says where that is).
  struct FlagRun {
    Addr start;
    Addr end;
    std::string flags;
  };
  std::vector<FlagRun> flag_runs_;
  // Set by CreateInChild for Init's first view: from the plain maps, what
  // asks for a smaps read put off (ReadView).
  bool inherited_view_ = false;
  // Memory advised (MergeableParts) since the last smaps read, which only
  // PROCMAP_QUERY looked at: mapped, of mergeable kind, but with VmFlags
  // not read yet (memory mapped again where other memory was at that read
  // may carry any flag). Left alone, as auto_excluded_, until the next
  // full scan, or the first Probe that reaches it, reads smaps: one read
  // for every madvise since.
  std::vector<Interval> advised_unread_;
  std::vector<Addr> anon_splits_;  // sorted: starts of split anon mappings
  // Splits we made since (RegisterRestored), unsorted: into anon_splits_
  // at the next ReadView.
  std::vector<Addr> anon_splits_made_;
  // Set while MergeScatteredSlice joins pages to the frames it has just
  // written, which nothing has read through the frame view yet: their
  // windows count as cold (FramesLikelyCold).
  bool fresh_frames_ = false;
  // Whether frames likely cold are read with pread (else through the
  // view), from the options. kMeasured: PreadBeatsColdView, measured once
  // per process at the first such question, not at start, so that a process
  // that never asks (most short-lived ones under `samepage run`; pairs in
  // runs read their fresh frames through the copy) does not pay for the
  // probe (3 MiB written and read). Never inside a window: the probe
  // allocates.
  bool PreadColdFrames() const;
  // Pages are copied into frames through the scratch area (way 0) or with
  // pwritev straight from them (way 1). Set by Init from the options.
  CheaperOf fills_;
  std::uint64_t smaps_epoch_ = 0;  // NoteVmaFlagsChanged count at that read
  std::int64_t smaps_read_at_ = 0;  // steady clock, nanoseconds
  std::int64_t smaps_took_ = 0;     // the last smaps read, nanoseconds
  std::size_t smaps_mappings_ = 0;  // the mappings it showed
  std::size_t view_mappings_ = 0;   // the mappings the last view showed
  std::uint64_t smaps_reads_ = 0;
  std::uint64_t maps_reads_ = 0;
  static constexpr std::int64_t kSmapsInterval = 2'000'000'000;
  std::vector<Interval> dontfork_;
  std::vector<Interval> dontdump_;
  std::vector<Interval> hugepage_;    // MADV_HUGEPAGE ("hg")
  std::vector<Interval> nohugepage_;  // MADV_NOHUGEPAGE ("nh")
  // Where the application locked memory (smaps "lo"): every mapping we put
  // there is locked again.
  std::vector<Interval> locked_;
  // Ranges registered with our userfaultfd: their "uw" VmFlag is ours.
  std::vector<Interval> uffd_registered_;
  // NoteMapped/FlushMapped/CommitMapped state (see there).
  std::vector<NewMapping> unflushed_;
  std::size_t unflushed_pages_ = 0;
  std::vector<Interval> new_frame_mapped_;
  std::vector<Interval> new_registered_;

  long baseline_maps_ = 0;  // mappings at Create
  long max_map_count_ = 0;
  std::uint64_t budget_ = 0;
  std::uint64_t vmas_used_ = 0;
  Addr last_mapped_end_ = 0;  // of the last frame mapping made (MappingCost)
  std::uint64_t budget_skips_ = 0;
  // vmas_used_ at the last real count (BudgetAllows recounts past it).
  std::uint64_t recounted_at_ = 0;
  static constexpr std::uint64_t kRecountStep = 1024;
  std::uint64_t lock_skips_ = 0;  // pages left as they were: no lock room
  std::uint64_t locks_lost_ = 0;  // pages whose lock could not come back
  std::uint64_t pinned_io_skips_ = 0;  // pages not replaced: I/O in flight
  std::uint64_t discard_first_pages_ = 0;  // see MemoryStats
  std::uint64_t unmerge_filled_pages_ = 0;  // see MemoryStats
  std::uint64_t dropped_frame_pages_ = 0;   // see MemoryStats
  std::uint64_t fill_failures_ = 0;         // see MemoryStats

  // Frames a mapping samepage did not make may map: the program moved a
  // frame mapping (mremap, unseen in library mode or by a raw system call)
  // or mprotected it out of what merges; its pages are gone for the core,
  // which releases their frames once their other sharers leave, and a
  // punched frame reads zeros in that mapping. A released frame is held,
  // not freed, while hold_releases_ (an unseen departure since the maps
  // were last read: NoteUnseenUnmap, NoteCopiedAway into anonymous
  // memory, or an Unmerge that found a frame mapping gone) or while a stray
  // mapping covers its offset (stray_frames_, found at each maps read: private
  // mappings of our memfd where frame_mapped_, which our own merges and
  // unmerges keep, had none). ApplyMaps gives held frames that no mapping
  // covers back to the store. The core releases frames between our calls,
  // never inside a merge window (which must not write the heap: Debug
  // builds abort there), so held_ grows as needed; a frame it has no room
  // for (out of memory) is kept for good (counted pinned).
  bool hold_releases_ = false;
  std::vector<Interval> stray_mapped_;  // addresses of stray mappings
  // Pages Probe called gone in frame_mapped_ since the last maps read.
  std::vector<Interval> forgotten_frame_mapped_;
  std::vector<Interval> stray_frames_;  // their frames (FrameId, not bytes)
  std::vector<FrameId> held_;
  // At a maps read: the stray mappings in `maps`, and the held frames no
  // mapping covers released.
  void FindStrayFrameMappings(const std::vector<MapEntry>& maps);
  // Adds the private mappings of our memfd in `maps` that `ours` does not
  // explain to stray_mapped_ and stray_frames_.
  void AddStrayFrameMappings(const std::vector<MapEntry>& maps,
                             const std::vector<Interval>& ours,
                             bool first_read);
  // True if the kernel (PROCMAP_QUERY) shows a private mapping of our
  // memfd in [start, end) that frame_mapped_ does not: merged pages moved
  // there unseen (library mode) that no scan and no maps read has found
  // yet. False without frames in use, or without the query.
  bool UnknownFrameMappingIn(Addr start, Addr end) const;
  // Unmerge over [start, end) with `maps` of the kernel's over it: if a
  // frame mapping frame_mapped_ has there is not among them, it left
  // unseen (moved or unmapped), and releases are held.
  void NoteVanishedFrameMappings(Addr start, Addr end,
                                 const std::vector<MapEntry>& maps);

  static constexpr std::size_t kProbeChunk = 512;
  // Probe's states of the pages at `base` that map the shared zero page:
  // kAnon made kAbsent. zero_pfn_scan_works_: PAGEMAP_SCAN answered.
  void LeaveZeroPfnAbsent(Addr base, std::span<PageState> states);
  // Probe's states of the pages at `base` (pagemap_buf_ holds the entries
  // of the first `valid`) where the view has one of our frame mappings: a page
  // with nothing of its own there, or the zero page, whose mapping is now
  // anonymous memory (unmapped and mapped anew by a call samepage did not
  // see: library mode, raw system calls) is kAbsent (the core then takes
  // it out of its node), and the mapping leaves frame_mapped_. Taken for
  // the frame
  // (an absent page of a frame mapping reads as its frame), such pages
  // kept their stable nodes, counted as merged, and the frames they no
  // longer mapped, for as long as they were not written. Asks mincore
  // first (a frame page is in the page cache), then PROCMAP_QUERY (Linux
  // 6.11; before it, nothing changes) for the rest.
  void ForgetReplacedFrameMappings(Addr base, std::span<PageState> states,
                                   std::size_t valid);
  bool zero_pfn_scan_works_ = true;
  std::uint64_t pagemap_buf_[kProbeChunk];
  unsigned char mincore_buf_[kProbeChunk];
};

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_LINUX_MEMORY_H_
