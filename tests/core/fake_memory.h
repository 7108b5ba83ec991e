// FakeMemory: an in-memory simulation of an address space for core tests.
//
// Pages are anonymous (own bytes), mapped to a frame (shared bytes, copied on
// the first write), absent, or unmapped. It checks the Memory contract from
// the other side: it aborts the test if the core releases a frame that some
// page still maps, and it can inject a concurrent write between the scanner's
// hash and its merge (the write-protected compare must then refuse).

#ifndef SAMEPAGE_TESTS_CORE_FAKE_MEMORY_H_
#define SAMEPAGE_TESTS_CORE_FAKE_MEMORY_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "core/memory.h"

namespace samepage {

using PageBytes = std::array<std::uint8_t, kPageSize>;

class FakeMemory : public Memory {
 public:
  // --- what an application does ---
  void Map(Addr addr, std::size_t npages);
  void Unmap(Addr addr, std::size_t npages);
  // madvise(MADV_DONTNEED) on anonymous pages: they read zeros, with no
  // page of their own. Pages mapping a frame keep it (a private file
  // mapping reads the file again).
  void Discard(Addr addr, std::size_t npages);
  // Writes a page filled with `fill` (copy-on-write if it maps a frame).
  void Write(Addr addr, std::uint8_t fill);
  void WriteBytes(Addr addr, const PageBytes& bytes);
  PageBytes Read(Addr addr) const;  // zeros for absent pages
  bool IsMapped(Addr addr) const;
  bool MapsFrame(Addr addr) const;
  bool IsPresent(Addr addr) const;
  FrameId FrameOf(Addr addr) const {
    auto it = pages_.find(addr);
    return it != pages_.end() && it->second.kind == Page::kFrame ? it->second.frame : kNoFrame;
  }

  // Called (once per page) right before a merge compares a page; lets a test
  // write to it "concurrently".
  std::function<void(Addr)> before_compare;
  // Called before a visit reads a page (Hash, HashFirstVisit): a test may
  // unmap it there, as a thread of the program may between the probe that
  // found the page and the read.
  std::function<void(Addr)> before_read;
  // Merges allowed before kNoBudget is returned (simulates the VMA budget).
  std::size_t merge_budget = SIZE_MAX;
  // Unmerge gives back no page of a range overlapping [unmerge_fails_from,
  // unmerge_fails_to) and returns false (as when the restoring mapping
  // cannot be made: ENOMEM); those pages keep mapping their frames.
  Addr unmerge_fails_from = 0;
  Addr unmerge_fails_to = 0;
  // The ranges UnmergeForgotten was asked about, in order, and what it
  // answers (as LinuxMemory does for mappings moved or reprotected unseen).
  std::vector<std::pair<Addr, Addr>> forgotten_unmerges;
  bool forgotten_unmerge_ok = true;

  // Hash calls per page, since the start.
  std::map<Addr, std::size_t> hashes;
  // Pages Probe was asked about, since the start.
  std::size_t probed_pages = 0;
  // Called at each Probe with its start and pages (a test may advance its
  // clock, as a slow probe would).
  std::function<void(Addr, std::size_t)> on_probe;
  // Pairs handed to each MergePairs call, in order.
  std::vector<std::size_t> pair_calls;
  // What WantsScatteredPairsTogether answers.
  bool scattered_together = true;
  // Whether MergePairsExpecting checks the expected hashes on the contents
  // it compares (as LinuxMemory does for pairs in runs), or leaves it to
  // Memory's default, which reads each p first (Hash, counted in hashes).
  bool checks_expected_in_compare = true;
  // Whether HashFirstVisit takes a page whose sampled lines are all zero
  // (SampledLinesZero) for zeros, as LinuxMemory does, or reads it
  // (Memory's default). Counted in hashes either way.
  bool guesses_zero_from_samples = true;

  std::size_t frames_live() const { return frame_refs_.size(); }
  std::size_t frames_released() const { return released_; }
  // Frames released since the core last called FlushReleasedFrames.
  std::size_t frames_unflushed() const { return unflushed_; }
  std::size_t pages_mapping_frames() const;

  // --- Memory ---
  void Probe(Addr addr, std::span<PageState> states) override;
  // Passes mapped absent pages, as Linux's passes empty page tables.
  Addr SkipAbsent(Addr from, Addr to) override;
  bool Hash(Addr addr, std::uint64_t* hash) override;
  bool HashFirstVisit(Addr addr, std::uint64_t* hash, bool* guessed) override;
  void MergeIntoFrames(std::span<const Addr> pages,
                       std::span<const FrameId> frames,
                       std::span<MergeResult> results) override;
  void MergePairs(std::span<const Addr> p, std::span<const Addr> q,
                  std::span<FrameId> frames,
                  std::span<MergeResult> results) override;
  void MergePairsExpecting(std::span<const Addr> p, std::span<const Addr> q,
                           std::span<FrameId> frames,
                           std::span<MergeResult> results,
                           std::span<const std::uint64_t> expected) override;
  bool WantsScatteredPairsTogether() const override {
    return scattered_together;
  }
  void DropZeroPages(std::span<const Addr> pages,
                     std::span<MergeResult> results) override;
  bool Unmerge(Addr addr, std::size_t npages) override;
  bool UnmergeForgotten(Addr start, Addr end) override {
    forgotten_unmerges.emplace_back(start, end);
    return forgotten_unmerge_ok;
  }
  void ReleaseFrame(FrameId frame) override;
  void FlushReleasedFrames() override { unflushed_ = 0; }
  MemoryStats Stats() const override;

 private:
  struct Page {
    enum Kind { kAbsent, kAnon, kFrame } kind = kAbsent;
    PageBytes bytes{};      // kAnon
    FrameId frame = kNoFrame;  // kFrame
  };
  const PageBytes& Content(const Page& p) const;
  void Unref(FrameId f);

  std::map<Addr, Page> pages_;
  std::vector<PageBytes> frames_;
  std::map<FrameId, std::size_t> frame_refs_;  // live frames: pages mapping
  std::vector<bool> released_frames_;
  std::size_t released_ = 0;
  std::size_t unflushed_ = 0;
};

}  // namespace samepage

#endif  // SAMEPAGE_TESTS_CORE_FAKE_MEMORY_H_
