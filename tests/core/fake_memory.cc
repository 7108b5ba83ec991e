#include "core/fake_memory.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#include "core/hash.h"

namespace samepage {
namespace {
const PageBytes kZeroBytes{};
}

void FakeMemory::Map(Addr addr, std::size_t npages) {
  for (std::size_t i = 0; i < npages; ++i) pages_[addr + i * kPageSize] = Page{};
}

void FakeMemory::Unmap(Addr addr, std::size_t npages) {
  for (std::size_t i = 0; i < npages; ++i) {
    auto it = pages_.find(addr + i * kPageSize);
    if (it == pages_.end()) continue;
    if (it->second.kind == Page::kFrame) Unref(it->second.frame);
    pages_.erase(it);
  }
}

void FakeMemory::Discard(Addr addr, std::size_t npages) {
  for (std::size_t i = 0; i < npages; ++i) {
    auto it = pages_.find(addr + i * kPageSize);
    if (it != pages_.end() && it->second.kind == Page::kAnon)
      it->second = Page{};
  }
}

void FakeMemory::WriteBytes(Addr addr, const PageBytes& bytes) {
  Page& p = pages_.at(addr);
  if (p.kind == Page::kFrame) Unref(p.frame);
  p.kind = Page::kAnon;
  p.frame = kNoFrame;
  p.bytes = bytes;
}

void FakeMemory::Write(Addr addr, std::uint8_t fill) {
  PageBytes b;
  b.fill(fill);
  WriteBytes(addr, b);
}

const PageBytes& FakeMemory::Content(const Page& p) const {
  switch (p.kind) {
    case Page::kAnon:
      return p.bytes;
    case Page::kFrame:
      return frames_[p.frame];
    case Page::kAbsent:
      break;
  }
  return kZeroBytes;
}

PageBytes FakeMemory::Read(Addr addr) const { return Content(pages_.at(addr)); }
bool FakeMemory::IsMapped(Addr addr) const { return pages_.count(addr) != 0; }
bool FakeMemory::MapsFrame(Addr addr) const {
  auto it = pages_.find(addr);
  return it != pages_.end() && it->second.kind == Page::kFrame;
}
bool FakeMemory::IsPresent(Addr addr) const {
  auto it = pages_.find(addr);
  return it != pages_.end() && it->second.kind != Page::kAbsent;
}

std::size_t FakeMemory::pages_mapping_frames() const {
  std::size_t n = 0;
  for (const auto& [a, p] : pages_) n += p.kind == Page::kFrame;
  return n;
}

void FakeMemory::Unref(FrameId f) {
  auto it = frame_refs_.find(f);
  if (it == frame_refs_.end() || it->second == 0) {
    ADD_FAILURE() << "unref of frame " << f << " that no page maps";
    return;
  }
  --it->second;
}

Addr FakeMemory::SkipAbsent(Addr from, Addr to) {
  Addr at = from;
  for (auto it = pages_.find(from);
       at < to && it != pages_.end() && it->first == at &&
       it->second.kind == Page::kAbsent;
       ++it) {
    at += kPageSize;
  }
  return at;
}

void FakeMemory::Probe(Addr addr, std::span<PageState> states) {
  probed_pages += states.size();
  if (on_probe) on_probe(addr, states.size());
  for (std::size_t i = 0; i < states.size(); ++i) {
    auto it = pages_.find(addr + i * kPageSize);
    if (it == pages_.end()) {
      states[i] = PageState::kGone;
      continue;
    }
    switch (it->second.kind) {
      case Page::kAbsent:
        states[i] = PageState::kAbsent;
        break;
      case Page::kAnon:
        states[i] = PageState::kAnon;
        break;
      case Page::kFrame:
        states[i] = PageState::kFrame;
        break;
    }
  }
}

bool FakeMemory::Hash(Addr addr, std::uint64_t* hash) {
  if (before_read) before_read(addr);
  auto it = pages_.find(addr);
  if (it == pages_.end()) return false;
  ++hashes[addr];
  *hash = HashPage(Content(it->second).data());
  return true;
}

bool FakeMemory::HashFirstVisit(Addr addr, std::uint64_t* hash, bool* guessed) {
  if (before_read) before_read(addr);
  auto it = pages_.find(addr);
  if (!guesses_zero_from_samples || it == pages_.end() ||
      !SampledLinesZero(Content(it->second).data())) {
    return Memory::HashFirstVisit(addr, hash, guessed);
  }
  ++hashes[addr];
  *hash = ZeroPageHash();
  *guessed = true;
  return true;
}

void FakeMemory::MergeIntoFrames(std::span<const Addr> pages,
                                 std::span<const FrameId> frames,
                                 std::span<MergeResult> results) {
  for (std::size_t i = 0; i < pages.size(); ++i) {
    if (i > 0 && pages[i] <= pages[i - 1]) ADD_FAILURE() << "pages not sorted";
    if (before_compare) before_compare(pages[i]);
    auto it = pages_.find(pages[i]);
    if (it == pages_.end()) {
      results[i] = MergeResult::kGone;
      continue;
    }
    if (!frame_refs_.count(frames[i])) {
      ADD_FAILURE() << "merge into released frame " << frames[i];
      results[i] = MergeResult::kFailed;
      continue;
    }
    Page& p = it->second;
    if (p.kind != Page::kAnon || p.bytes != frames_[frames[i]]) {
      results[i] = MergeResult::kDiffers;
      continue;
    }
    if (merge_budget == 0) {
      results[i] = MergeResult::kNoBudget;
      continue;
    }
    --merge_budget;
    p.kind = Page::kFrame;
    p.frame = frames[i];
    ++frame_refs_[frames[i]];
    results[i] = MergeResult::kMerged;
  }
}

void FakeMemory::MergePairs(std::span<const Addr> p, std::span<const Addr> q,
                            std::span<FrameId> frames,
                            std::span<MergeResult> results) {
  pair_calls.push_back(p.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    frames[i] = kNoFrame;
    if (before_compare) {
      before_compare(p[i]);
      before_compare(q[i]);
    }
    auto a = pages_.find(p[i]);
    auto b = pages_.find(q[i]);
    if (a == pages_.end() || b == pages_.end()) {
      results[i] = MergeResult::kGone;
      continue;
    }
    if (a->second.kind != Page::kAnon || b->second.kind != Page::kAnon ||
        a->second.bytes != b->second.bytes) {
      results[i] = MergeResult::kDiffers;
      continue;
    }
    if (merge_budget < 2) {
      results[i] = MergeResult::kNoBudget;
      continue;
    }
    merge_budget -= 2;
    const FrameId f = FrameId(frames_.size());
    frames_.push_back(a->second.bytes);
    frame_refs_[f] = 2;
    for (auto* pg : {&a->second, &b->second}) {
      pg->kind = Page::kFrame;
      pg->frame = f;
    }
    frames[i] = f;
    results[i] = MergeResult::kMerged;
  }
}

void FakeMemory::MergePairsExpecting(std::span<const Addr> p,
                                     std::span<const Addr> q,
                                     std::span<FrameId> frames,
                                     std::span<MergeResult> results,
                                     std::span<const std::uint64_t> expected) {
  if (!checks_expected_in_compare) {
    Memory::MergePairsExpecting(p, q, frames, results, expected);
    return;
  }
  // The check on p's content as the compare has it, not a read (Hash).
  MergePairsWhere(p, q, frames, results, [&](std::size_t i) {
    auto it = pages_.find(p[i]);
    return expected[i] == 0 || it == pages_.end() ||
           HashPage(Content(it->second).data()) == expected[i];
  });
}

void FakeMemory::DropZeroPages(std::span<const Addr> pages,
                               std::span<MergeResult> results) {
  for (std::size_t i = 0; i < pages.size(); ++i) {
    if (before_compare) before_compare(pages[i]);
    auto it = pages_.find(pages[i]);
    if (it == pages_.end()) {
      results[i] = MergeResult::kGone;
    } else if (it->second.kind != Page::kAnon ||
               it->second.bytes != kZeroBytes) {
      results[i] = MergeResult::kDiffers;
    } else {
      it->second = Page{};
      results[i] = MergeResult::kMerged;
    }
  }
}

bool FakeMemory::Unmerge(Addr addr, std::size_t npages) {
  if (addr < unmerge_fails_to &&
      unmerge_fails_from < addr + npages * kPageSize) {
    return false;
  }
  for (std::size_t i = 0; i < npages; ++i) {
    auto it = pages_.find(addr + i * kPageSize);
    if (it == pages_.end() || it->second.kind != Page::kFrame) continue;
    WriteBytes(it->first, frames_[it->second.frame]);
  }
  return true;
}

void FakeMemory::ReleaseFrame(FrameId frame) {
  auto it = frame_refs_.find(frame);
  if (it == frame_refs_.end()) {
    ADD_FAILURE() << "frame " << frame << " released twice";
    return;
  }
  if (it->second != 0) {
    ADD_FAILURE() << "frame " << frame << " released while " << it->second
                  << " page(s) still map it";
    return;
  }
  frame_refs_.erase(it);
  ++released_;
  ++unflushed_;
}

MemoryStats FakeMemory::Stats() const {
  MemoryStats s;
  s.frames_in_use = frame_refs_.size();
  return s;
}

}  // namespace samepage
