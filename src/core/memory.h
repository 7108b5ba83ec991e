// The narrow interface between the merging algorithm (core) and memory.
//
// The core decides *what* to merge; a Memory implementation does every byte
// access and every mapping change. The Linux backend (src/backend) works on
// the real address space; FakeMemory (tests/core) simulates one so the
// algorithm can be tested exhaustively without touching the OS.
//
// Contract for every implementation:
//  - Addresses are page-aligned and refer to pages the core was told about.
//  - Every merge operation write-protects the pages it replaces, compares them
//    in full (never by hash alone) while protected, and only then remaps. A
//    page that differs, or that cannot be protected, is left exactly as it was
//    (contents intact and writable) and reported as not merged.
//  - Nothing here throws or crashes on memory the application has unmapped:
//    such pages are reported as PageState::kGone or as not merged.
//
// Thread safety: implementations are called by one thread at a time (the
// engine serialises calls under its mutex). Write faults from application
// threads may arrive concurrently with any call; implementations handle them.

#ifndef SAMEPAGE_CORE_MEMORY_H_
#define SAMEPAGE_CORE_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace samepage {

using Addr = std::uintptr_t;
inline constexpr std::size_t kPageSize = 4096;
inline constexpr std::size_t kPageShift = 12;

// Index of one page-sized frame in the frame store. Frames f and f + 1 are
// adjacent in the store, so runs of consecutive frames can be mapped with one
// call.
using FrameId = std::uint32_t;
inline constexpr FrameId kNoFrame = UINT32_MAX;

// What a page is right now, as far as the scanner needs to know.
enum class PageState : std::uint8_t {
  kGone,    // not mapped any more, or no longer memory we may merge: forget it
  kAbsent,  // mapped, but no page of its own: never touched, dropped, or
            // mapping the shared zero page (which costs no memory); not
            // one of our frames (an absent page of a frame's mapping,
            // which reads as the frame, is kFrame)
  kExcluded,  // memory to leave as it is (samepage's own, a thread's stack,
              // Exclude()): never read, protected or replaced
  kAnon,      // a present private anonymous page of its own
  kFrame,     // a present page that is one of our frames (not yet copied away)
};

// Why a page was not merged; one entry per page of a merge request.
enum class MergeResult : std::uint8_t {
  kMerged = 0,
  kDiffers,   // full compare under write-protection found a difference
  kGone,      // page unmapped or unprotectable (ENOMEM/EFAULT)
  kNoBudget,  // merging would exceed the VMA budget; page left as it was
  kFailed,    // any other failure (frame store full, mapping call failed)
};

struct MemoryStats {
  std::uint64_t frames_in_use = 0;     // frames allocated and not released
  std::uint64_t frames_pinned = 0;     // released but kept: may be mapped by a
                                       // forked child, so never punched
  std::uint64_t vma_budget = 0;        // mappings we may create in total
  std::uint64_t vmas_used = 0;         // mappings our merges are estimated to hold
  std::uint64_t budget_skips = 0;      // pages left unmerged for lack of budget
  std::uint64_t lock_skips = 0;        // locked pages left unmerged: the lock
                                       // could not have been applied again
  std::uint64_t locks_lost = 0;        // pages whose lock could not be applied
                                       // again (intact, writable, unlocked)
  std::uint64_t protect_faults = 0;    // writes that waited on a merge window
  std::uint64_t pinned_io_skips = 0;   // pages left alone: direct I/O was in
                                       // flight into them (pinned)
  std::uint64_t smaps_reads = 0;       // full reads of the mappings' flags
                                       // (a page-table walk of all memory)
  std::uint64_t maps_reads = 0;        // reads of the plain maps for the view
  // Pages merged by a window that discarded them before mapping their
  // frames (no TLB flush a mapping).
  std::uint64_t discard_first_pages = 0;
  // Discarded pages that could not get their bytes back after their
  // frame's mapping failed (only when no page could be allocated).
  std::uint64_t fill_failures = 0;
  // Pages unmerging had the kernel copy into fresh pages (UFFDIO_COPY)
  // rather than populating them first and copying into them.
  std::uint64_t unmerge_filled_pages = 0;
  // Merged pages a discard (MADV_DONTNEED) took back to fresh anonymous
  // memory without copying them first (LinuxMemory::DropFrameMappings).
  std::uint64_t dropped_frame_pages = 0;
};

class Memory {
 public:
  virtual ~Memory() = default;

  // Called at the start of every full scan: refresh any cached view of the
  // address space (for instance /proc/self/maps).
  virtual void BeginFullScan() {}

  // Fills states[i] for the page at addr + i * kPageSize, i < states.size().
  virtual void Probe(Addr addr, std::span<PageState> states) = 0;

  // An address in [from, to], page-aligned, such that Probe would say
  // kAbsent of every page in [from, result) now: a sparse reservation's
  // unused stretches are passed with one question instead of a Probe per
  // chunk. Stopping early is always allowed; the default passes nothing.
  // REQUIRES: from and to page-aligned, from <= to.
  virtual Addr SkipAbsent(Addr from, Addr to) {
    (void)to;
    return from;
  }

  // The 64-bit content hash (samepage::HashPage) of one page. False if the
  // page cannot be read (it was unmapped).
  [[nodiscard]] virtual bool Hash(Addr addr, std::uint64_t* hash) = 0;

  // Hash, for a page's first visit. A backend may take a page whose
  // sampled lines are all zero (SampledLinesZero) for a page of zeros
  // without reading the rest: *hash = ZeroPageHash() and *guessed = true.
  // The core merges or drops a page on such a hash only after a full
  // compare under write-protection, as it does on any hash of a visit
  // before (a page of zeros, the usual case, is read once in full instead
  // of twice). The default reads the page: *guessed = false.
  [[nodiscard]] virtual bool HashFirstVisit(Addr addr, std::uint64_t* hash,
                                            bool* guessed) {
    *guessed = false;
    return Hash(addr, hash);
  }

  // For each i: write-protect pages[i], compare it in full with frames[i],
  // and if equal map frames[i] over it (copy-on-write). `pages` is sorted
  // ascending; consecutive pages with consecutive frames are remapped with one
  // call. results[i] receives the outcome.
  virtual void MergeIntoFrames(std::span<const Addr> pages,
                               std::span<const FrameId> frames,
                               std::span<MergeResult> results) = 0;

  // For each i: write-protect p[i] and q[i], compare them in full, and if
  // equal copy the content into a newly allocated frame, map that frame over
  // both, and store its id in frames[i] (kNoFrame otherwise). Frames for
  // consecutive pairs are allocated consecutively. `p` is sorted ascending;
  // no address appears twice in p and q together.
  virtual void MergePairs(std::span<const Addr> p, std::span<const Addr> q,
                          std::span<FrameId> frames,
                          std::span<MergeResult> results) = 0;

  // MergePairs, where a pair with expected[i] != 0 merges only if its
  // content still has that hash (HashPage): neither page was read since
  // its last visit, and the kernel merges only pages unchanged between two
  // visits. Otherwise results[i] is kDiffers. The backend checks it where
  // it has the content at hand, write-protected; this default reads each
  // such p first.
  virtual void MergePairsExpecting(std::span<const Addr> p,
                                   std::span<const Addr> q,
                                   std::span<FrameId> frames,
                                   std::span<MergeResult> results,
                                   std::span<const std::uint64_t> expected) {
    MergePairsWhere(p, q, frames, results, [&](std::size_t i) {
      return Unchanged(p[i], expected[i]);
    });
  }

  // Whether MergePairs gains from many pairs whose pages lie scattered
  // coming in one call (it merges them in address order): the core then
  // lets such pairs wait for each other (Ksm::HoldScattered).
  virtual bool WantsScatteredPairsTogether() const { return false; }

  // For each i: write-protect pages[i], verify it is all zeros, and give it
  // back to the system so that it reads as the shared zero page (no frame).
  virtual void DropZeroPages(std::span<const Addr> pages,
                             std::span<MergeResult> results) = 0;

  // Makes [addr, addr + npages pages) ordinary private anonymous memory again
  // with unchanged contents: undoes merges (frame mappings) in that range.
  // Pages not merged are left alone. False if some page could not be restored
  // (it stays readable with its contents).
  [[nodiscard]] virtual bool Unmerge(Addr addr, std::size_t npages) = 0;

  // The core knows of no page that still maps `frame` (every sharer copied
  // it away or was unmerged). The store frees its memory, unless another
  // process (a forked child) may still map it, in which case it is pinned.
  virtual void ReleaseFrame(FrameId frame) = 0;
  // The core found a merged page gone, or replaced by memory it did not
  // map, without having unmerged it: the program unmapped it, or moved it
  // (mremap) where the core does not look, and a moved mapping still maps
  // its frame. Frames released from now on are kept (not freed) until the
  // program's mappings show that none maps them.
  virtual void NoteUnseenUnmap() {}
  // The merged page at `page` has a page of its own now: copied on write
  // in its frame's mapping, as a rule; but if the mapping there is
  // anonymous memory, it was replaced unseen (moved away, new memory
  // mapped and written in its place), and this is a NoteUnseenUnmap.
  virtual void NoteCopiedAway(Addr page) { (void)page; }
  // Memory in [start, end) that the core no longer tracks but that still
  // maps frames (merged pages moved or made read-only unseen: see
  // NoteUnseenUnmap) gets anonymous copies of them, as the kernel's
  // unmerge reaches a VM_MERGEABLE mapping wherever it went. Frames that
  // nothing maps afterwards are freed. False if some of it could not be
  // given back (it stays readable with its contents, mapping its frames).
  [[nodiscard]] virtual bool UnmergeForgotten(Addr start, Addr end) {
    (void)start;
    (void)end;
    return true;
  }
  // The memory of frames released may be freed later, in one go (the Linux
  // store punches a hole per run of consecutive frames); the core calls this
  // at the end of every operation that may release frames, so that none
  // waits longer than the operation.
  virtual void FlushReleasedFrames() {}

  virtual MemoryStats Stats() const = 0;

 protected:
  // Whether the page still has the hash `expected` (read by Hash); true
  // where nothing is expected (0).
  bool Unchanged(Addr page, std::uint64_t expected) {
    std::uint64_t h = 0;
    return expected == 0 || (Hash(page, &h) && h == expected);
  }
  // MergePairs of the pairs i for which unchanged(i) holds (p stays
  // ascending); the others are kDiffers.
  template <typename F>
  void MergePairsWhere(std::span<const Addr> p, std::span<const Addr> q,
                       std::span<FrameId> frames,
                       std::span<MergeResult> results, F&& unchanged) {
    std::vector<Addr> pp, qq;
    std::vector<std::size_t> at;
    for (std::size_t i = 0; i < p.size(); ++i) {
      if (!unchanged(i)) {
        frames[i] = kNoFrame;
        results[i] = MergeResult::kDiffers;
        continue;
      }
      pp.push_back(p[i]);
      qq.push_back(q[i]);
      at.push_back(i);
    }
    std::vector<FrameId> ff(at.size(), kNoFrame);
    std::vector<MergeResult> rr(at.size(), MergeResult::kFailed);
    MergePairs(pp, qq, ff, rr);
    for (std::size_t k = 0; k < at.size(); ++k) {
      frames[at[k]] = ff[k];
      results[at[k]] = rr[k];
    }
  }
};

}  // namespace samepage

#endif  // SAMEPAGE_CORE_MEMORY_H_
