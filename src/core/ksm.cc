#include "core/ksm.h"

#include <time.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <new>

#include "core/hash.h"

namespace samepage {
namespace {

// Pages probed per Memory::Probe call: one pagemap read covers them all.
constexpr std::size_t kProbeChunk = Ksm::kProbeChunkPages;
// The chunk of an address (Ksm::written_chunks_), and where one begins.
constexpr std::uint64_t ChunkOf(Addr addr) {
  return (addr >> kPageShift) / kProbeChunk;
}
constexpr Addr ChunkStart(std::uint64_t chunk) {
  return Addr{chunk * kProbeChunk} << kPageShift;
}
// For ZeroedArray::Tail and ForEachNonZero on the items of the range at
// `start`: whether items [first, first + count) may hold something, that
// is lie in one of the written chunks. The rest need not be read (memory
// never written faults a page at a time when read).
auto MayHold(const absl::btree_set<std::uint64_t>& written, Addr start) {
  return [&written, start](std::size_t first, std::size_t count) {
    auto it = written.lower_bound(ChunkOf(start + first * kPageSize));
    return it != written.end() &&
           *it <= ChunkOf(start + (first + count - 1) * kPageSize);
  };
}
// Planned merges run once this many are pending (and at every batch end),
// unless a run of identical pages is still growing (StripeRuns), up to
// kMaxRunPlans.
constexpr std::size_t kPlanFlush = 256;
// Pages visited between two questions whether to pause the batch.
constexpr std::size_t kPauseCheck = 8;
constexpr std::size_t kMaxRunPlans = 65536;
// Plans held while most are scattered pairs (Ksm::HoldScattered).
constexpr std::size_t kMaxScatteredPlans = 16384;
// How long merges may wait across batches for a run (ScanBatch carry_runs),
// beside Ksm::kCarryPlans.
constexpr std::uint64_t kCarryNanos = 2'000'000'000;

[[noreturn]] void InvariantFailure(const char* what) {
  std::fprintf(stderr, "samepage: core invariant violated: %s\n", what);
  std::abort();
}

// Smart scan: how many full scans to skip a page that has not merged for
// `age` visits (mm/ksm.c skip_age()).
std::uint8_t SkipAge(std::uint8_t age) {
  if (age <= 3) return 1;
  if (age <= 5) return 2;
  if (age <= 8) return 4;
  return 8;
}

class SystemClock : public Clock {
 public:
  std::uint64_t NowNanos() override { return Read(CLOCK_MONOTONIC); }
  std::uint64_t CpuNanos() override { return Read(CLOCK_THREAD_CPUTIME_ID); }

 private:
  static std::uint64_t Read(clockid_t id) {
    timespec ts{};
    clock_gettime(id, &ts);
    return std::uint64_t(ts.tv_sec) * 1000000000u + std::uint64_t(ts.tv_nsec);
  }
};

}  // namespace

Clock* RealClock() {
  // Never destroyed: a scanner thread may still read it while exit() runs
  // the static destructors (a destroyed one aborted QEMU's exit with "pure
  // virtual method called" in a debug build).
  static SystemClock* const clock = new SystemClock;
  return clock;
}

Ksm::Ksm(Memory* memory, Clock* clock) : memory_(memory), clock_(clock) {}

namespace {
// Frees the memory of the frames an operation released, on every way out
// of it (Memory::FlushReleasedFrames).
class FlushReleasedOnReturn {
 public:
  explicit FlushReleasedOnReturn(Memory* memory) : memory_(memory) {}
  ~FlushReleasedOnReturn() { memory_->FlushReleasedFrames(); }
  FlushReleasedOnReturn(const FlushReleasedOnReturn&) = delete;
  FlushReleasedOnReturn& operator=(const FlushReleasedOnReturn&) = delete;

 private:
  Memory* memory_;
};
}  // namespace

// ---------------------------------------------------------------------------
// Ranges

std::map<Addr, Ksm::Range>::iterator Ksm::RangeFrom(Addr addr) {
  auto it = ranges_.upper_bound(addr);
  if (it != ranges_.begin() && std::prev(it)->second.end() > addr) --it;
  return it;
}

Ksm::Item* Ksm::FindItem(Addr addr) {
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return nullptr;
  --it;
  if (addr >= it->second.end()) return nullptr;
  return &it->second.items[(addr - it->first) >> kPageShift];
}

const Ksm::Item* Ksm::FindItem(Addr addr) const {
  return const_cast<Ksm*>(this)->FindItem(addr);
}

bool Ksm::IsAdvised(Addr addr) const { return FindItem(addr) != nullptr; }

std::vector<std::pair<Addr, std::size_t>> Ksm::AdvisedRanges() const {
  return AdvisedRanges(0, ~Addr{0} & ~(kPageSize - 1));
}

std::vector<std::pair<Addr, std::size_t>> Ksm::AdvisedRanges(Addr from,
                                                             Addr to) const {
  std::vector<std::pair<Addr, std::size_t>> out;
  auto it = ranges_.upper_bound(from);
  if (it != ranges_.begin()) --it;  // the one that may hold `from`
  for (; it != ranges_.end() && it->first < to; ++it) {
    const Addr start = std::max(from, it->first);
    const Addr end =
        std::min(to, it->first + it->second.items.size() * kPageSize);
    if (start >= end) continue;
    const std::size_t pages = (end - start) / kPageSize;
    if (!out.empty() && out.back().first + out.back().second * kPageSize == start) {
      out.back().second += pages;
    } else {
      out.emplace_back(start, pages);
    }
  }
  return out;
}

bool Ksm::Advise(Addr start, std::size_t npages) {
  // ZeroedArray's items start as all-zero bytes: that must be Item{}.
  static_assert(std::bit_cast<std::array<unsigned char, sizeof(Item)>>(
                    Item{}) == std::array<unsigned char, sizeof(Item)>{});
  const Addr end = start + npages * kPageSize;
  Addr cur = start;
  auto it = ranges_.upper_bound(start);
  if (it != ranges_.begin() && std::prev(it)->second.end() > start) --it;
  bool all = true;
  auto add = [&](Addr from, Addr to) {
    Range r;
    r.start = from;
    try {
      r.items = ZeroedArray<Item>((to - from) >> kPageShift);
      ranges_.emplace(from, std::move(r));
    } catch (const std::bad_alloc&) {
      all = false;
      return;
    }
    advised_pages_ += (to - from) >> kPageShift;
  };
  for (; it != ranges_.end() && it->first < end; ++it) {
    if (it->first > cur) add(cur, it->first);
    cur = std::max(cur, it->second.end());
  }
  if (cur < end) add(cur, end);
  return all;
}

void Ksm::Forget(Addr start, std::size_t npages) {
  FlushReleasedOnReturn flush(memory_);
  DropWaitingPlans(start, start + npages * kPageSize);
  ForgetRange(start, npages);
}

void Ksm::ForgetRange(Addr start, std::size_t npages) {
  const Addr end = start + npages * kPageSize;
  SplitRangeAt(start);
  SplitRangeAt(end);
  auto it = ranges_.lower_bound(start);
  while (it != ranges_.end() && it->first < end) {
    Range& r = it->second;
    // Items never written (kNew, all zero) have nothing to reset.
    r.items.ForEachNonZero(
        [&](std::size_t i, Item& item) {
          ResetItem(r.start + i * kPageSize, item);
        },
        MayHold(written_chunks_, r.start));
    advised_pages_ -= r.items.size();
    it = ranges_.erase(it);
  }
  // Chunks forgotten whole hold no item any more; nor do the chunks at
  // either end once no range is left in them (a process that maps and
  // unmaps small buffers at new addresses would otherwise leave one entry
  // behind for each).
  if (npages == 0) return;
  const std::uint64_t first = ChunkOf(start);
  const std::uint64_t last = ChunkOf(end - 1);
  if (last > first + 1) {
    written_chunks_.erase(written_chunks_.lower_bound(first + 1),
                          written_chunks_.lower_bound(last));
  }
  for (const std::uint64_t chunk : {first, last}) {
    if (!AnyRangeIn(ChunkStart(chunk), ChunkStart(chunk + 1)))
      written_chunks_.erase(chunk);
  }
}

bool Ksm::AnyRangeIn(Addr from, Addr to) const {
  auto it = ranges_.lower_bound(from);
  if (it != ranges_.end() && it->first < to) return true;
  return it != ranges_.begin() && std::prev(it)->second.end() > from;
}

template <typename F>
bool Ksm::UnmergeEach(Addr start, Addr end, F&& restored) {
  DropWaitingPlans(start, end);
  bool ok = true;
  auto it = ranges_.upper_bound(start);
  if (it != ranges_.begin()) --it;
  for (; it != ranges_.end() && it->first < end; ++it) {
    const Addr from = std::max(start, it->first);
    const Addr to = std::min(end, it->second.end());
    if (from >= to) continue;
    if (memory_->Unmerge(from, (to - from) >> kPageShift)) {
      restored(it->second, from, to);
    } else {
      ok = false;
    }
  }
  return ok;
}

bool Ksm::Unadvise(Addr start, std::size_t npages) {
  FlushReleasedOnReturn flush(memory_);
  // Give the memory back first: a frame is released only when nothing maps
  // it. A part that cannot be given back (ENOMEM) stays advised and merged,
  // as the kernel's madvise(MADV_UNMERGEABLE) fails leaving it mergeable:
  // forgetting it would release frames its pages still map.
  std::vector<std::pair<Addr, std::size_t>> restored;
  const bool ok = UnmergeEach(
      start, start + npages * kPageSize, [&](Range&, Addr from, Addr to) {
        restored.emplace_back(from, (to - from) >> kPageShift);
      });
  for (auto [from, n] : restored) ForgetRange(from, n);
  // Merged pages moved here unseen are VM_MERGEABLE memory to the kernel,
  // whose madvise(MADV_UNMERGEABLE) unmerges them too.
  const bool forgotten =
      memory_->UnmergeForgotten(start, start + npages * kPageSize);
  return ok && forgotten;
}

bool Ksm::Unmerge(Addr start, std::size_t npages) {
  FlushReleasedOnReturn flush(memory_);
  return UnmergeEach(
      start, start + npages * kPageSize, [&](Range& r, Addr from, Addr to) {
        r.items.ForEachNonZeroIn((from - r.start) >> kPageShift,
                                 (to - r.start) >> kPageShift,
                                 [&](std::size_t i, Item& item) {
                                   ResetItem(r.start + i * kPageSize, item);
                                 },
                                 MayHold(written_chunks_, r.start));
      });
}

bool Ksm::UnmergeAll() {
  FlushReleasedOnReturn flush(memory_);
  DropWaitingPlans(0, ~Addr{0});  // and forgets the pages found gone
  bool ok = true;
  for (auto& [start, r] : ranges_) {
    const bool restored = memory_->Unmerge(start, r.items.size());
    ok &= restored;
    r.items.ForEachNonZero(
        [&](std::size_t i, Item& item) {
          // Where the range could not be given back (ENOMEM) its merged
          // pages still map their frames: they stay merged (run=2 then
          // fails, as in the kernel), and only the unstable index is left
          // behind.
          if (restored) {
            ResetItem(start + i * kPageSize, item);
          } else {
            RemoveFromUnstable(start + i * kPageSize, item);
          }
        },
        MayHold(written_chunks_, start));
  }
  // And merged pages moved or made read-only unseen, wherever they are:
  // the kernel's run=2 unmerges every VM_MERGEABLE mapping.
  ok &= memory_->UnmergeForgotten(0, ~Addr{0});
  unstable_.clear();
  deferred_.clear();
  deferred_pages_ = 0;
  last_deferred_ = 0;
  in_scan_ = false;
  unread_in_scan_ = false;
  full_scans_ = 0;  // the kernel's full_scans is the scan sequence, reset here
  return ok;
}

// ---------------------------------------------------------------------------
// Item bookkeeping

bool Ksm::InUnstable(Addr addr, const Item& item) const {
  if (!Indexed(item.state) || item.seq != seq_) return false;
  return unstable_.contains(PageKey{addr, item.hash()});
}

void Ksm::RemoveFromUnstable(Addr addr, Item& item) {
  if (!Indexed(item.state)) return;
  if (item.seq == seq_ && unstable_.erase(PageKey{addr, item.hash()}) == 0) {
    // Waiting for a partner in a run instead (deferred_).
    (void)EraseDeferred(item.hash(), addr, nullptr);
  }
  item.state = ItemState::kVolatile;
  --unshared_;
}

void Ksm::InsertUnread(Addr addr, Item& item) {
  const std::uint64_t hash = item.hash();
  item.state = ItemState::kUnread;
  item.seq = seq_;
  ++unshared_;
  unread_in_scan_ = true;
  NoteRun(addr, hash);
  unstable_.lazy_emplace(PageKey{addr, hash}, [&](const auto& construct) {
    construct(MakeEntry(addr, hash));
  });
  unstable_peak_ = std::max(unstable_peak_, unstable_.size());
}

void Ksm::ReadIndexed(Addr addr, Item& item) {
  std::uint64_t now = 0;
  if (memory_->Hash(addr, &now) && now == item.hash()) {
    item.state = ItemState::kUnstable;  // read in this scan
    return;
  }
  // Changed since its last visit (or unreadable, which its next visit
  // finds): it leaves the index, remembered with its new content as a
  // visit would have.
  RemoveFromUnstable(addr, item);
  if (now != 0) item.set_hash(now);
}

std::size_t Ksm::VerifyUnread(std::size_t budget,
                              const std::function<bool()>& pause) {
  // A chunk of items at a time, in address order (each read prefetches
  // the next page), until the budget is spent: the batch that ends a scan
  // reads no more pages than any other.
  std::size_t read = 0;
  while (unread_in_scan_ && read < budget) {
    if (read != 0 && pause && pause()) break;
    auto it = RangeFrom(verify_cursor_);
    if (it == ranges_.end()) {
      unread_in_scan_ = false;
      verify_cursor_ = 0;
      break;
    }
    Range& r = it->second;
    if (verify_cursor_ < r.start) verify_cursor_ = r.start;
    const std::size_t first = (verify_cursor_ - r.start) >> kPageShift;
    const std::size_t last = std::min(r.items.size(), first + kProbeChunk);
    std::size_t stop = last;  // where the budget ran out
    r.items.ForEachNonZeroIn(
        first, last,
        [&, start = r.start](std::size_t i, Item& item) {
          if (item.state != ItemState::kUnread || item.seq != seq_) return;
          if (read == budget) {
            stop = std::min(stop, i);
            return;
          }
          ++read;
          ReadIndexed(start + i * kPageSize, item);
        },
        MayHold(written_chunks_, r.start));
    verify_cursor_ = r.start + stop * kPageSize;
  }
  return read;
}

void Ksm::ResetItem(Addr addr, Item& item) {
  switch (item.state) {
    case ItemState::kNew:
      // Not counted, but a visit may have aged it (smart scan) before its
      // page turned out to be gone: all zero again.
      item = Item{};
      return;
    case ItemState::kUnstable:
    case ItemState::kUnread:
      RemoveFromUnstable(addr, item);
      break;
    case ItemState::kStable:
      RemoveSharer(item.node());
      break;
    case ItemState::kZero:
      --zero_pages_;
      break;
    case ItemState::kPending:
      InvariantFailure("ResetItem on a page with a merge in flight");
    case ItemState::kVolatile:
      break;
  }
  --rmap_items_;
  item = Item{};
}

// ---------------------------------------------------------------------------
// Stable index

template <typename F>
void Ksm::ForEachDup(NodeId first, F&& f) const {
  if (!nodes_[first].in_chain) {
    f(first);
    return;
  }
  const std::vector<NodeId>& dups = dup_chains_.find(nodes_[first].hash())->second.dups;
  // Newest first, as the kernel adds dups at the head of the chain.
  for (auto it = dups.rbegin(); it != dups.rend(); ++it) f(*it);
}

// Like the kernel's stable_node_dup(): the fullest dup that still has room,
// so that chains stay compact.
Ksm::NodeId Ksm::WalkForRoom(const Chain& chain) const {
  NodeId best = kNoNode;
  std::uint32_t best_load = 0;
  for (auto it = chain.dups.rbegin(); it != chain.dups.rend(); ++it) {
    const Node& n = nodes_[*it];
    const std::uint32_t load = n.load();
    if (load >= knobs_.max_page_sharing) continue;
    if (n.sharers == 0 && n.pending == 0) continue;
    if (best == kNoNode || load > best_load) {
      best = *it;
      best_load = load;
    }
  }
  return best;
}

Ksm::NodeId Ksm::FindStableWithRoom(std::uint64_t hash) const {
  auto it = stable_.find(HashKey{hash});
  if (it == stable_.end()) return kNoNode;
  const Node& first = nodes_[*it];
  if (!first.in_chain) {
    const std::uint32_t load = first.load();
    return load < knobs_.max_page_sharing && load != 0 ? *it : kNoNode;
  }
  // A chain of a run of identical pages has a hundred dups: walk it only when
  // the last answer may have changed. It stays right while only its own
  // load grows, until that load reaches max_page_sharing.
  Chain& chain = dup_chains_.find(hash)->second;
  if (chain.best_known && chain.best_for == knobs_.max_page_sharing &&
      (chain.best == kNoNode || nodes_[chain.best].load() < knobs_.max_page_sharing)) {
    return chain.best;
  }
  chain.best = WalkForRoom(chain);
  chain.best_known = true;
  chain.best_for = knobs_.max_page_sharing;
  return chain.best;
}

void Ksm::ForgetBestDup(NodeId id) {
  if (!nodes_[id].in_chain) return;
  dup_chains_.find(nodes_[id].hash())->second.best_known = false;
}

Ksm::NodeId Ksm::NewNode(std::uint64_t hash) {
  NodeId id;
  if (!free_nodes_.empty()) {
    id = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    id = NodeId(nodes_.size());
    nodes_.emplace_back();
  }
  Node& n = nodes_[id];
  n = Node{};
  n.set_hash(hash);
  n.live = 1;
  LinkNode(id);
  return id;
}

void Ksm::LinkNode(NodeId id) {
  Node& n = nodes_[id];
  // Looked up by hash: an insert by id would not see another node's entry.
  auto it = stable_.lazy_emplace(HashKey{n.hash()},
                                 [&](const auto& construct) { construct(id); });
  if (*it == id) return;
  Node& first = nodes_[*it];
  Chain& chain = dup_chains_[n.hash()];
  chain.best_known = false;
  std::vector<NodeId>& dups = chain.dups;
  if (!first.in_chain) {
    first.in_chain = 1;
    dups.push_back(*it);
    ++chains_;
    ++dups_;
  }
  n.in_chain = 1;
  dups.push_back(id);
  ++dups_;
}

void Ksm::UnlinkNode(NodeId id) {
  Node& n = nodes_[id];
  if (!n.in_chain) {
    if (stable_.erase(id) == 0) InvariantFailure("stable node missing from index");
    return;
  }
  auto chain = dup_chains_.find(n.hash());
  if (chain == dup_chains_.end()) InvariantFailure("chained node without a chain");
  chain->second.best_known = false;
  std::vector<NodeId>& dups = chain->second.dups;
  auto pos = std::find(dups.begin(), dups.end(), id);
  if (pos == dups.end()) InvariantFailure("chained node missing from its chain");
  dups.erase(pos);
  n.in_chain = 0;
  auto it = stable_.find(id);
  if (it != stable_.end()) {  // the index entry moves to another dup
    stable_.erase(it);
    stable_.insert(dups.back());
  }
  if (dups.size() == 1) {
    nodes_[dups.front()].in_chain = 0;
    dup_chains_.erase(chain);
    --chains_;
    dups_ -= 2;
  } else {
    --dups_;
  }
}

void Ksm::TakeNewHash(Addr addr, Item& item) {
  std::uint64_t hash = 0;
  if (memory_->Hash(addr, &hash)) {
    item.set_hash(hash);
  } else {
    ResetItem(addr, item);
  }
}

void Ksm::AddSharer(NodeId id) {
  Node& n = nodes_[id];
  if (n.sharers == 0) {
    ++pages_shared_;
  } else {
    ++pages_sharing_;
  }
  ++n.sharers;
}

void Ksm::RemoveSharer(NodeId id) {
  Node& n = nodes_[id];
  ForgetBestDup(id);
  --n.sharers;
  if (n.sharers == 0) {
    --pages_shared_;
  } else {
    --pages_sharing_;
  }
  MaybeFreeNode(id);
}

void Ksm::MaybeFreeNode(NodeId id) {
  Node& n = nodes_[id];
  if (!n.live || n.sharers != 0 || n.pending != 0) return;
  if (n.frame != kNoFrame && n.frame != kZeroFrame) memory_->ReleaseFrame(n.frame);
  UnlinkNode(id);
  n.live = 0;
  n.frame = kNoFrame;
  free_nodes_.push_back(id);
}

// ---------------------------------------------------------------------------
// Scanning

void Ksm::BeginFullScan() {
  ++seq_;
  unstable_.clear();
  deferred_.clear();  // ResolveDeferred emptied it, unless the scan was cut
  deferred_pages_ = 0;
  last_deferred_ = 0;
  unread_in_scan_ = false;  // VerifyUnread finished, unless the scan was cut
  verify_cursor_ = 0;
  // Room for as many candidates as the last scan had: no rehash on the way
  // (a rehash looks every entry's item up again).
  unstable_.reserve(unstable_peak_);
  unstable_peak_ = 0;
  memory_->BeginFullScan();
  if (scan_start_hook_) scan_start_hook_();
  cursor_ = ranges_.empty() ? 0 : ranges_.begin()->first;
  in_scan_ = true;
  scan_start_nanos_ = clock_->NowNanos();
}

std::size_t Ksm::ScanBatch(std::size_t pages, bool stop_at_scan_end,
                           bool carry_runs,
                           const std::function<bool()>& pause) {
  if (ranges_.empty() || pages == 0) return 0;
  FlushReleasedOnReturn flush(memory_);
  if (!in_scan_) BeginFullScan();
  // Plans carried from earlier batches wait at most kCarryPlans; within one
  // batch a run may grow to kMaxRunPlans.
  const std::size_t cap = carried_ ? kCarryPlans : kMaxRunPlans;
  carried_ = false;
  std::size_t scanned = 0;
  std::size_t scanned_this_pass = 0;
  while (scanned < pages) {
    // Asked before a chunk's probe, which a pause would waste.
    if (scanned != 0 && pause && pause()) break;
    auto it = RangeFrom(cursor_);
    if (it == ranges_.end()) {
      // The pages that entered the index unread are read first, within
      // this batch's budget (a large process's could be gigabytes).
      if (unread_in_scan_) {
        scanned += VerifyUnread(pages - scanned, pause);
        if (unread_in_scan_) break;  // goes on in the next batch
      }
      // End of a full scan: merges planned so far refer to this scan's
      // unstable index, so they run before it is dropped; so do the pairs
      // that waited for a partner in a run.
      ResolveDeferred();
      ExecutePlans();
      ForgetGone();
      ++full_scans_;
      RunAdvisor();
      if (progress_) progress_();
      // The next scan begins (dropping the unstable index) on the next
      // visit.
      in_scan_ = false;
      if (stop_at_scan_end || scanned_this_pass == 0) break;
      if (pause && pause()) break;  // before the next scan's maps read
      BeginFullScan();
      scanned_this_pass = 0;
      continue;
    }
    Range& r = it->second;
    if (cursor_ < r.start) cursor_ = r.start;
    cursor_ = PassUnwritten(r);
    if (cursor_ >= r.end()) continue;  // past r: the range at the cursor
    std::size_t idx = (cursor_ - r.start) >> kPageShift;
    // Chunks end at addresses aligned to kProbeChunk pages, so that the
    // plans flushed after a chunk do too: the backend's windows over runs
    // then cover whole page tables (512 pages on x86-64), whose discard or
    // remap costs less per page (docs/performance.md, zero pages).
    // Where probes are slow, a chunk goes in aligned pieces (probe_pages_).
    const std::size_t probe = probe_pages_;
    const std::size_t to_boundary = probe - ((cursor_ >> kPageShift) % probe);
    const std::size_t n = std::min(r.items.size() - idx, to_boundary);
    const bool chunk_end = idx + n == r.items.size() ||
                           ((cursor_ >> kPageShift) + n) % kProbeChunk == 0;
    states_.resize(n);
    const std::uint64_t probe_start = clock_->NowNanos();
    memory_->Probe(cursor_, std::span<PageState>(states_.data(), n));
    AdaptProbePages(n, clock_->NowNanos() - probe_start);
    const bool nothing = NothingToVisit(r, idx, n);
    std::size_t i = nothing ? n : 0;
    for (; i < n && scanned < pages; ++i) {
      if (i != 0 && i % kPauseCheck == 0 && scanned != 0 && pause && pause()) break;
      const std::uint64_t before = pages_scanned_;
      const Addr addr = cursor_ + i * kPageSize;
      if (i + kLookAhead < n) PrefetchLookups(r.items[idx + i + kLookAhead]);
      VisitPage(addr, r.items[idx + i], states_[i]);
      const std::size_t visited = std::size_t(pages_scanned_ - before);
      scanned += visited;
      scanned_this_pass += visited;
      // A run past the cap is cut where its last node is full.
      if (PlanCount() >= cap && !HoldForRun(addr + kPageSize, cap) &&
          !HoldScattered()) {
        ExecutePlans();
      }
    }
    if (!nothing) {
      NoteWritten(r, idx, i);
    } else if (n == kProbeChunk) {
      // A whole chunk with nothing in it (NothingToVisit read its items if
      // it was in the set).
      written_chunks_.erase(ChunkOf(cursor_));
    }
    cursor_ += i * kPageSize;
    if (i < n && scanned < pages) break;  // paused
    // Merge while the planned pages are still in the CPU's caches: the
    // merge reads each of them again under write-protection. A run of
    // identical pages that reaches the cursor is let grow first: the longer
    // it is, the fewer mappings it takes (StripeRuns).
    if (chunk_end && PlanCount() >= kPlanFlush && !HoldForRun(cursor_, cap) &&
        !HoldScattered()) {
      ExecutePlans();
    }
  }
  if (carry_runs && in_scan_ && PlanCount() != 0 &&
      (HoldForRun(cursor_, cap) || HoldScattered())) {
    // The run, or the scattered pairs, go on in the next batch, unless
    // their merges have waited for kCarryNanos already (a long
    // sleep_millisecs).
    const std::uint64_t now = clock_->NowNanos();
    if (carry_since_ == 0) carry_since_ = now;
    if (now - carry_since_ < kCarryNanos) {
      carried_ = true;
      return scanned;
    }
  }
  ExecutePlans();
  ForgetGone();
  ReleaseScratch();
  return scanned;
}

void Ksm::AdaptProbePages(std::size_t n, std::uint64_t nanos) {
  // A probe is one step of the scanner's, and a control call that waits
  // for the engine's lock (each MADV_DONTNEED of merged memory, munmap,
  // a knob write) waits for it. Over memory cut into a mapping per merged
  // page a chunk's probe walks hundreds of VMAs: 0.3-0.4 ms on the KVM
  // guest, where a chunk of plain memory takes a few microseconds. Chunks
  // go in eighths then, until a piece is cheap again: one whose cost, times
  // eight, is under the limit (a piece of memory with frames mapped but
  // not cut up, 2-3 us, goes back to whole chunks; a host's hiccup in one
  // probe costs a piece or two).
  if (n == kProbeChunk && nanos > kSlowProbeNanos) {
    probe_pages_ = kProbeChunk / 8;
  } else if (probe_pages_ != kProbeChunk && n == probe_pages_ &&
             nanos * (kProbeChunk / n) < kSlowProbeNanos) {
    probe_pages_ = kProbeChunk;
  }
}

bool Ksm::NothingToVisit(const Range& r, std::size_t idx, std::size_t n) const {
  // Pages with no page of their own whose items were never written (all
  // zero: kNew) are visited for nothing: VisitPage leaves both as they are.
  // A chunk PassUnwritten could not pass (a frame mapped near it, an
  // exclusion, a kernel without PAGEMAP_SCAN) goes by a chunk at a time.
  if (std::any_of(states_.begin(), states_.begin() + n, [](PageState s) {
        return s != PageState::kAbsent && s != PageState::kExcluded;
      })) {
    return false;
  }
  // The chunk is the cursor's; outside written_chunks_ its items are all
  // zero without a read (memory never written faults when read).
  return !written_chunks_.contains(ChunkOf(cursor_)) ||
         ZeroedArray<Item>::AllZero(&r.items[idx], n);
}

Addr Ksm::PassUnwritten(const Range& r) const {
  const std::uint64_t chunk = ChunkOf(cursor_);
  auto next = written_chunks_.lower_bound(chunk);
  if (next != written_chunks_.end() && *next == chunk) return cursor_;
  // Up to the next chunk that may hold a written item every item is all
  // zero, in this range and in the ranges after it: only a page would give
  // a visit something to do. Many small ranges go by together.
  const Addr last_end = std::prev(ranges_.end())->second.end();
  const Addr limit = next == written_chunks_.end()
                         ? last_end
                         : std::min(last_end, ChunkStart(*next));
  // Within this range and chunk one Probe answers as cheaply.
  if (limit <= std::min(r.end(), ChunkStart(chunk + 1))) return cursor_;
  return std::clamp(memory_->SkipAbsent(cursor_, limit), cursor_, limit);
}

void Ksm::NoteWritten(const Range& r, std::size_t idx, std::size_t n) {
  if (n == 0) return;
  const std::uint64_t chunk = ChunkOf(cursor_);
  if (!ZeroedArray<Item>::AllZero(&r.items[idx], n)) {
    written_chunks_.insert(chunk);
  } else if (n == kProbeChunk) {
    // All of the chunk (chunks are aligned, so this range holds it whole),
    // and none of its items written.
    written_chunks_.erase(chunk);
  }
}

void Ksm::ReleaseScratch() {
  // Candidates that merged leave their slots empty; give the memory back
  // once the index is mostly empty.
  if (unstable_.capacity() > 1024 && unstable_.size() < unstable_.capacity() / 16) {
    unstable_.rehash(0);
  }
  // Scratch lives for one batch (about 30 KiB: a few allocations per batch
  // against 4 bytes per page for a small process between batches).
  for (auto* v : {&addr_a_, &addr_b_}) std::vector<Addr>().swap(*v);
  std::vector<PairPlan>().swap(pair_plans_);
  std::vector<StablePlan>().swap(stable_plans_);
  std::vector<ZeroPlan>().swap(zero_plans_);
  std::vector<Addr>().swap(gone_);
  std::vector<FrameId>().swap(frames_);
  std::vector<MergeResult>().swap(results_);
  std::vector<std::uint64_t>().swap(expected_);
  std::vector<PageState>().swap(states_);
}

void Ksm::FinishPlans() {
  FlushReleasedOnReturn flush(memory_);
  if (!carried_) return;
  carried_ = false;
  ExecutePlans();
  ForgetGone();
  ReleaseScratch();
}

bool Ksm::HoldForRun(Addr next, std::size_t cap) const {
  if (run_end_ != next || run_pages_ < 2) return false;
  if (run_hash_ == ZeroPageHash()) return false;  // no frames to lay out
  const std::size_t planned = PlanCount();
  if (planned < cap) return true;
  // Past the cap: until the node being filled is full (at most one more
  // node's worth of pages), so that the rest of the run starts afresh
  // instead of filling a part-used node with a mapping per page.
  if (planned >= cap + 2 * std::size_t{knobs_.max_page_sharing}) return false;
  return run_node_ != kNoNode && nodes_[run_node_].load() < knobs_.max_page_sharing;
}

bool Ksm::HoldScattered() const {
  const std::size_t planned = PlanCount();
  const std::size_t waiting = deferred_pages_;
  return planned < kMaxScatteredPlans &&
         2 * (scattered_pairs_ + waiting) > planned + waiting &&
         memory_->WantsScatteredPairsTogether();
}

void Ksm::DropWaitingPlans(Addr start, Addr end) {
  if (!carried_) return;
  auto inside = [&](Addr a) { return a >= start && a < end; };
  auto drop = [&](Item* item, NodeId node, std::uint32_t count) {
    item->state = ItemState::kVolatile;  // its hash is the current one
    nodes_[node].pending -= count;
    ForgetBestDup(node);
    MaybeFreeNode(node);
  };
  std::erase_if(pair_plans_, [&](const PairPlan& p) {
    if (!inside(p.p) && !inside(p.q)) return false;
    p.q_item->state = ItemState::kVolatile;
    drop(p.p_item, p.node, 2);  // stable plans on its node then fail
    return true;
  });
  std::erase_if(stable_plans_, [&](const StablePlan& p) {
    if (!inside(p.page)) return false;
    drop(p.item, p.node, 1);
    return true;
  });
  std::erase_if(zero_plans_, [&](const ZeroPlan& p) {
    if (!inside(p.page)) return false;
    p.item->state = ItemState::kVolatile;
    return true;
  });
  FinishPlans();
}

void Ksm::ForgetGone() {
  // Runs of consecutive pages are forgotten with one call each.
  std::size_t i = 0;
  while (i < gone_.size()) {
    std::size_t j = i + 1;
    while (j < gone_.size() && gone_[j] == gone_[j - 1] + kPageSize) ++j;
    ForgetRange(gone_[i], j - i);
    if (gone_hook_) gone_hook_(gone_[i], j - i);
    i = j;
  }
  gone_.clear();
}

void Ksm::CountEmptyFullScan() {
  if (!ranges_.empty()) return;
  ++full_scans_;
  if (progress_) progress_();
}

// flatten: abseil's prefetch() holds nothing but __builtin_prefetch, which
// GCC's pure-const analysis takes for no effect at all; called rather than
// inlined, the call was deleted and this function compiled to a bare
// return (tests/core/prefetch_compiled_test.sh checks the instructions).
__attribute__((flatten)) void Ksm::PrefetchLookups(const Item& item) const {
  // A page visited with the hash of its last visit asks both indexes for
  // it before reading the page (VisitPage, step 0): their slots are
  // fetched a few pages ahead, as the hash index misses the caches.
  if (item.state == ItemState::kVolatile || Indexed(item.state)) {
    const HashKey key{item.hash()};
    stable_.prefetch(key);
    unstable_.prefetch(key);
    if (!deferred_.empty()) deferred_.prefetch(item.hash());
  }
}

void Ksm::VisitPage(Addr addr, Item& item, PageState state) {
  if (state == PageState::kGone) {
    // Unmapped (or no longer mergeable memory): it leaves the advised ranges,
    // so whatever is mapped there later is not merged, as the kernel would
    // not merge a new mapping.
    if (item.state == ItemState::kStable) memory_->NoteUnseenUnmap();
    ResetItem(addr, item);
    gone_.push_back(addr);
    return;
  }
  if (state == PageState::kExcluded) {
    // Left as it is: a merged page keeps its frame (the engine unmerges
    // memory before excluding it; what it could not unmerge stays merged),
    // a zero page stays zero. Anything else no longer has a page to track.
    if (item.state != ItemState::kStable && item.state != ItemState::kZero) {
      ResetItem(addr, item);
    }
    return;
  }
  if (state == PageState::kAbsent) {
    // A zero page stays zero, as does a page of a node of zero content
    // without a frame (merged with use_zero_pages=0: it reads the zero
    // page). Any other merged page no longer maps its frame (an absent
    // page of a frame's mapping is kFrame): its memory was mapped anew by
    // a call samepage did not see (library mode, a raw system call), and
    // the frame must not be counted, nor kept, for it. Anything else no
    // longer has a page to track.
    const bool reads_its_node = item.state == ItemState::kZero ||
                                (item.state == ItemState::kStable &&
                                 nodes_[item.node()].frame == kZeroFrame);
    if (!reads_its_node) {
      if (item.state == ItemState::kStable) memory_->NoteUnseenUnmap();
      ResetItem(addr, item);
    }
    return;
  }
  if (item.state == ItemState::kPending) {
    InvariantFailure("page visited twice in one batch");
  }
  if (item.state == ItemState::kStable && state == PageState::kFrame) {
    ++pages_scanned_;  // still merged: nothing to do
    return;
  }

  if (item.state == ItemState::kZero && state == PageState::kFrame) {
    // Memory that could not be dropped (locked, a frame's mapping) maps a
    // frame of zeros instead: still the zero page.
    ++pages_scanned_;
    return;
  }
  if (state == PageState::kFrame) {
    // A frame this core did not merge the page into: one the backend
    // adopted (a forked child maps its parent's frames, shared with the
    // parent, as a kernel KSM process's child shares its KSM pages).
    // Merging it again would copy it into a new frame: a child of a
    // process with 20,000 merged pairs took another 80 MB of frames. Left
    // as it is until written; a private copy then merges as any page.
    ResetItem(addr, item);  // kNew, kVolatile or kUnstable here
    ++pages_scanned_;
    return;
  }
  if (item.state == ItemState::kZero) {
    // Written since it was dropped: an ordinary page again (if it is still
    // all zeros, the unstable path below drops it once more).
    --zero_pages_;
    item.state = ItemState::kVolatile;
  }

  // Smart scan (mm/ksm.c should_skip_rmap_item): pages that keep failing to
  // merge are visited less often. Merged pages are never skipped.
  if (knobs_.smart_scan && item.state != ItemState::kStable) {
    const std::uint8_t age = item.age;
    if (age != UINT8_MAX) ++item.age;
    if (age >= 3) {
      if (item.remaining_skips == 0) {
        item.remaining_skips = SkipAge(age);
      } else {
        --item.remaining_skips;
        ++pages_skipped_;
        RemoveFromUnstable(addr, item);
        return;
      }
    }
  }

  ++pages_scanned_;
  // The hash of the last visit, if it holds one (not a page just copied
  // away from a merge).
  const bool last_hash =
      item.state == ItemState::kVolatile || Indexed(item.state);
  if (item.state == ItemState::kStable) {
    // The page was copied away (written to): it leaves its stable node, and
    // its next visit takes it as changed.
    memory_->NoteCopiedAway(addr);
    RemoveSharer(item.node());
    item.set_hash(0);
    item.state = ItemState::kVolatile;
  }
  // A page that was all zeros at its last visit goes straight to the zero
  // page: the drop checks, under write-protection, that it still is all
  // zeros, which is the "unchanged since the last visit" rule and the final
  // compare in one read (a hash first would read it twice). Not while a
  // stable node holds zero content (merged with use_zero_pages=0).
  if (knobs_.use_zero_pages && item.state == ItemState::kVolatile &&
      item.hash() == ZeroPageHash() && FindStableWithRoom(item.hash()) == kNoNode) {
    item.state = ItemState::kPending;
    zero_plans_.push_back({addr, &item});
    return;
  }
  // 0. A page last seen holding the content of a stable node with room is
  //    planned into it without being read again: the merge compares it in
  //    full with the node's frame under write-protection, and merges it
  //    only if it still holds that content, which is what the kernel's
  //    stable tree search (a compare by content, before any checksum)
  //    would have found. If it changed, the failed merge takes its new hash
  //    (TakeNewHash), as this visit would have. One page read saved per
  //    page that joins a merged content (the third copy on), zero pages
  //    at use_zero_pages = 0 among them.
  //    Likewise a page last seen with the hash of a page in this scan's
  //    unstable index pairs with it unread: the pair's compare decides, and
  //    a page that changed, which the kernel's checksum rule would have
  //    left alone this visit, only fails it. The node takes its hash from
  //    the other page, hashed in this scan.
  const std::uint64_t item_hash_before = item.hash();
  // Changed (or new) at its last visit, not yet found unchanged.
  const bool was_volatile = item.state == ItemState::kVolatile;
  if (last_hash) {
    RemoveFromUnstable(addr, item);
    const NodeId node = FindStableWithRoom(item.hash());
    if (node != kNoNode) {
      PlanJoin(addr, item, node, /*unhashed=*/true);
      return;
    }
    if (PairWithUnstable(addr, item, item.hash(), /*unhashed=*/true)) return;
    // A page new or changed at its last visit, with nothing of that
    // content to pair with yet, waits in the unstable index on its last
    // visit's hash, unread. A later page of that content pairs with it and
    // the pair's merge reads it, checking that both are unchanged since
    // (the first copies of pages in runs: read once in the first scan, not
    // again in the second); the pages no merge read are read at the
    // scan's end (VerifyUnread), where those changed since their last
    // visit leave the index, as the kernel's checksum rule would have kept
    // them out. Pages found unchanged at their last visit (unique pages
    // from the second scan on) are read here: their reads at the scan's
    // end took longer than at their visits (unique pages, 3 of 12
    // alternating runs faster).
    if (was_volatile) {
      InsertUnread(addr, item);
      return;
    }
  }
  // A page seen for the first time may be taken for zeros from a sample
  // of its lines (Memory::HashFirstVisit). Such a `guessed` hash is taken
  // as the hash of an earlier visit is: the page is merged or dropped
  // only after a full compare, and a failed merge takes its real hash.
  // Its next visit drops it unread with use_zero_pages (above), or pairs
  // it unread (last_hash).
  const bool had_hash = item.state != ItemState::kNew;
  std::uint64_t hash = 0;
  bool guessed = false;
  const bool hashed = had_hash ? memory_->Hash(addr, &hash)
                               : memory_->HashFirstVisit(addr, &hash, &guessed);
  if (!hashed) {
    ResetItem(addr, item);
    return;
  }
  if (!had_hash) ++rmap_items_;
  // A page in the unstable index left it above (last_hash), where both
  // indexes were asked already if the hash is still the last visit's.
  const bool asked = last_hash && hash == item_hash_before;

  // 1. The stable index, even on a first visit.
  const NodeId node = asked ? kNoNode : FindStableWithRoom(hash);
  if (node != kNoNode) {
    item.set_hash(hash);
    PlanJoin(addr, item, node, /*unhashed=*/guessed);
    return;
  }
  // 2. A page whose content changed since the last visit is only remembered.
  if (!had_hash || item.hash() != hash) {
    item.set_hash(hash);
    item.state = ItemState::kVolatile;
    return;
  }
  // 3. Zero pages go back to the system's zero page.
  if (knobs_.use_zero_pages && hash == ZeroPageHash()) {
    item.state = ItemState::kPending;
    zero_plans_.push_back({addr, &item});
    return;
  }
  // 4. The unstable index: a match makes a new stable node of both pages.
  if (!asked && PairWithUnstable(addr, item, hash, /*unhashed=*/false)) return;
  item.state = ItemState::kUnstable;
  item.seq = seq_;
  ++unshared_;
  NoteRun(addr, hash);
  unstable_.lazy_emplace(PageKey{addr, hash}, [&](const auto& construct) {
    construct(MakeEntry(addr, hash));
  });
  unstable_peak_ = std::max(unstable_peak_, unstable_.size());
}

void Ksm::PlanJoin(Addr addr, Item& item, NodeId node, bool unhashed) {
  cont_next_ = 0;  // no pair to continue (Defer sets one after it)
  ++nodes_[node].pending;
  item.state = ItemState::kPending;
  stable_plans_.push_back({addr, &item, node, unhashed});
  NoteRun(addr, item.hash());
  run_node_ = node;
}

bool Ksm::PairWithUnstable(Addr addr, Item& item, std::uint64_t hash, bool unhashed) {
  // The candidates: the index's page of this hash, and the pages of this
  // hash waiting for a partner in a run (deferred_).
  // (Its slot is looked up once, and again only after the index changed:
  // each lookup finds the entry's item, a search of the ranges.)
  auto it = unstable_.end();
  auto indexed_now = [&] {
    it = unstable_.find(HashKey{hash});
    return it != unstable_.end() ? *it & ~kFragmentMask : Addr{0};
  };
  Addr indexed = indexed_now();
  const DeferredList* waiting = FindDeferred(hash);
  if (indexed == 0 && waiting == nullptr) return false;
  // Whether pairing with `other` continues the node sequence of the page
  // before this one: that page was planned into a node with other's
  // neighbour, so their frames can follow each other on both sides.
  auto continues = [&](Addr other) {
    return other != 0 && addr == cont_next_ &&
           (other == cont_to_[0] || other == cont_to_[1]);
  };
  auto continuing_waiter = [&]() -> Addr {
    if (waiting == nullptr || addr != cont_next_) return 0;
    for (const Addr e : *waiting) {
      const Addr w = WaitingPage(e);
      if (w == cont_to_[0] || w == cont_to_[1]) return w;
    }
    return 0;
  };
  if (run_end_ == addr && run_hash_ == hash) {
    // A run of identical pages goes on (StripeRuns lays it out): the page
    // before, if it waits, pairs with this one; else as any pair.
    if (ListHolds(waiting, addr - kPageSize) &&
        TakeDeferred(addr, item, hash, unhashed, addr - kPageSize)) {
      return true;
    }
    return indexed != 0 && PairWithIndexed(addr, item, hash, unhashed, it);
  }
  if (!continues(indexed) && continuing_waiter() == 0 && last_deferred_ != 0 &&
      last_deferred_ + kPageSize == addr) {
    // If the page before this one waits with a partner next to one of ours,
    // it pairs with it after all, and this pair continues theirs (a run
    // begins). Either way the lists may have changed.
    (void)UndeferLast(indexed, waiting);
    indexed = indexed_now();
    waiting = FindDeferred(hash);
  }
  if (!continues(indexed)) {
    // A waiting page that continues the run pairs with this one.
    const Addr w = continuing_waiter();
    if (w != 0 && TakeDeferred(addr, item, hash, unhashed, w)) return true;
    waiting = FindDeferred(hash);
    if (memory_->WantsScatteredPairsTogether() &&
        deferred_pages_ < max_deferred_pages_ &&
        (indexed == 0 ? waiting != nullptr : indexed + kPageSize != addr)) {
      // Scattered (a run of identical pages is not: StripeRuns lays it
      // out): this page waits too, for a later page that pairs with it in
      // a run, or for the scan's end.
      Defer(addr, item, hash, unhashed);
      return true;
    }
    if (indexed == 0) return false;
  }
  if (!continues(indexed)) ++scattered_pairs_;
  return PairWithIndexed(addr, item, hash, unhashed, it);
}

Addr Ksm::JoinIndexed(UnstableSet::iterator it, NodeId node) {
  const Addr addr = *it & ~kFragmentMask;
  Item* item = FindItem(addr);
  if (item == nullptr)
    InvariantFailure("unstable index entry without its item");
  unstable_.erase(it);
  // Read in this scan (it went into the index with this hash), unless it
  // went in unread: then the compare with the node's frame decides, and a
  // failed one takes its new hash.
  PlanUnstableJoin(addr, item, node, item->state == ItemState::kUnread);
  return addr;
}

bool Ksm::PairWithIndexed(Addr addr, Item& item, std::uint64_t hash,
                          bool unhashed, UnstableSet::iterator it) {
  const Addr indexed = *it & ~kFragmentMask;
  Item* other = FindItem(indexed);
  if (other == nullptr || indexed == addr) {
    InvariantFailure("unstable index entry without its item");
  }
  unstable_.erase(it);
  --unshared_;
  // Neither page read in this scan: the merge checks that their content
  // still has the hash (ExecutePlans).
  run_node_ = PlanPair(addr, &item, indexed, other, hash, unhashed,
                       unhashed && other->state == ItemState::kUnread);
  NoteRun(addr, hash);
  SetContinuation(addr, indexed, 0);
  return true;
}

void Ksm::SetContinuation(Addr page, Addr a, Addr b) {
  cont_next_ = page + kPageSize;
  cont_to_[0] = a != 0 ? a + kPageSize : 0;
  cont_to_[1] = b != 0 ? b + kPageSize : 0;
}

bool Ksm::ListHolds(const DeferredList* list, Addr page) {
  return list != nullptr &&
         std::any_of(list->begin(), list->end(),
                     [&](Addr e) { return WaitingPage(e) == page; });
}

void Ksm::AddDeferred(std::uint64_t hash, Addr addr, bool unhashed) {
  deferred_[hash].push_back(addr | (unhashed ? kDeferredUnhashed : 0));
  ++deferred_pages_;
}

void Ksm::PlanUnstableJoin(Addr addr, Item* item, NodeId node, bool unhashed) {
  --unshared_;
  ++nodes_[node].pending;
  item->state = ItemState::kPending;
  stable_plans_.push_back({addr, item, node, unhashed});
}

const Ksm::DeferredList* Ksm::FindDeferred(std::uint64_t hash) const {
  if (deferred_.empty()) return nullptr;
  auto d = deferred_.find(hash);
  return d != deferred_.end() ? &d->second : nullptr;
}

bool Ksm::EraseDeferred(std::uint64_t hash, Addr addr, bool* unhashed) {
  auto d = deferred_.find(hash);
  if (d == deferred_.end()) return false;
  DeferredList& list = d->second;
  for (auto e = list.begin(); e != list.end(); ++e) {
    if (WaitingPage(*e) != addr) continue;
    if (unhashed != nullptr) *unhashed = WaitsUnread(*e);
    list.erase(e);
    if (list.empty()) deferred_.erase(d);
    --deferred_pages_;
    if (last_deferred_ == addr) last_deferred_ = 0;
    return true;
  }
  return false;
}

void Ksm::Defer(Addr addr, Item& item, std::uint64_t hash, bool unhashed) {
  item.state = ItemState::kUnstable;
  item.seq = seq_;
  ++unshared_;
  NoteRun(addr, hash);
  AddDeferred(hash, addr, unhashed);
  last_deferred_ = addr;
  last_deferred_hash_ = hash;
  cont_next_ = 0;
}

Ksm::NodeId Ksm::PlanPair(Addr p, Item* p_item, Addr q, Item* q_item,
                          std::uint64_t hash, bool unhashed, bool unread_pair) {
  const bool q_unread = q_item->state == ItemState::kUnread;
  p_item->state = ItemState::kPending;
  q_item->state = ItemState::kPending;
  // The node's hash is the one p or q was read with in this scan, or if
  // neither was (unread_pair), their last visits'.
  const NodeId fresh = NewNode(hash);
  nodes_[fresh].pending = 2;
  pair_plans_.push_back(
      {p, p_item, q, q_item, fresh, unhashed, q_unread, unread_pair});
  return fresh;
}

bool Ksm::ReadWaiting(Addr addr, Item* item, std::uint64_t hash) {
  std::uint64_t now = 0;
  if (memory_->Hash(addr, &now) && now == hash) return true;
  // Changed (or unreadable, which its next visit finds): remembered with
  // its new content, as a visit would have.
  item->state = ItemState::kVolatile;
  if (now != 0) item->set_hash(now);
  return false;
}

bool Ksm::TakeDeferred(Addr addr, Item& item, std::uint64_t hash, bool unhashed,
                       Addr waiting) {
  Item* w = FindItem(waiting);
  bool waited_unread = false;
  if (w == nullptr || waiting == addr || w->state != ItemState::kUnstable ||
      !EraseDeferred(hash, waiting, &waited_unread)) {
    InvariantFailure("deferred page without its item");
  }
  --unshared_;
  // It becomes the pair's q, whose hash the node takes: read it now.
  if (waited_unread && !ReadWaiting(waiting, w, hash)) return false;
  const NodeId fresh = PlanPair(addr, &item, waiting, w, hash, unhashed);
  NoteRun(addr, hash);
  run_node_ = fresh;
  // The index's page joins their node, as it would have joined the node of
  // the pair it would have made (the other waiting pages do at the scan's
  // end, or their own pairs).
  auto it = unstable_.find(HashKey{hash});
  if (it != unstable_.end() && nodes_[fresh].load() < knobs_.max_page_sharing) {
    const Addr other_addr = JoinIndexed(it, fresh);
    SetContinuation(addr, waiting, other_addr);
    return true;
  }
  SetContinuation(addr, waiting, 0);
  return true;
}

bool Ksm::UndeferLast(Addr indexed, const DeferredList* waiting) {
  const Addr p = last_deferred_;
  const std::uint64_t h = last_deferred_hash_;
  last_deferred_ = 0;
  // The candidates of the page before, one page before ours.
  auto it = unstable_.find(HashKey{h});
  const Addr prev_indexed = it != unstable_.end() ? *it & ~kFragmentMask : 0;
  const DeferredList* prev_waiting = FindDeferred(h);
  auto prev_has = [&](Addr c) {
    return c != 0 && c != p &&
           (c == prev_indexed || ListHolds(prev_waiting, c));
  };
  Addr partner = 0;
  if (indexed != 0 && prev_has(indexed - kPageSize))
    partner = indexed - kPageSize;
  if (partner == 0 && waiting != nullptr) {
    for (const Addr e : *waiting) {
      const Addr c = WaitingPage(e) - kPageSize;
      if (prev_has(c)) {
        partner = c;
        break;
      }
    }
  }
  if (partner == 0) return false;
  Item* p_item = FindItem(p);
  Item* q_item = FindItem(partner);
  bool p_unhashed = false;
  if (p_item == nullptr || q_item == nullptr ||
      !EraseDeferred(h, p, &p_unhashed))
    InvariantFailure("deferred page without its item");
  if (partner == prev_indexed) {
    unstable_.erase(it);
  } else {
    bool q_unhashed = false;
    (void)EraseDeferred(h, partner, &q_unhashed);
    if (q_unhashed && !ReadWaiting(partner, q_item, h)) {
      // Its partner changed (and leaves the unstable state): the page
      // before waits again.
      --unshared_;
      AddDeferred(h, p, p_unhashed);
      return false;
    }
  }
  unshared_ -= 2;
  ++scattered_pairs_;  // the run's first pair
  run_node_ = PlanPair(p, p_item, partner, q_item, h, p_unhashed,
                       p_unhashed && q_item->state == ItemState::kUnread);
  SetContinuation(p, partner, 0);
  if (partner != prev_indexed && prev_indexed != 0 &&
      nodes_[run_node_].load() < knobs_.max_page_sharing) {
    // The index's page of that content joins their node, as in
    // TakeDeferred (other waiting pages find it at the scan's end).
    (void)JoinIndexed(it, run_node_);
  }
  return true;
}

void Ksm::ResolveDeferred() {
  last_deferred_ = 0;
  if (deferred_.empty()) return;
  std::vector<std::pair<std::uint64_t, DeferredList>> groups(
      std::make_move_iterator(deferred_.begin()),
      std::make_move_iterator(deferred_.end()));
  deferred_.clear();
  deferred_pages_ = 0;
  std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) {
    return a.second.front() < b.second.front();
  });
  for (const auto& [hash, list] : groups) {
    NodeId node = kNoNode;
    for (const Addr entry : list) {
      const Addr addr = WaitingPage(entry);
      const bool unhashed = WaitsUnread(entry);
      Item* item = FindItem(addr);
      if (item == nullptr || item->state != ItemState::kUnstable)
        InvariantFailure("deferred page without its item");
      if (node == kNoNode || nodes_[node].load() >= knobs_.max_page_sharing)
        node = FindStableWithRoom(hash);
      if (node != kNoNode) {
        PlanUnstableJoin(addr, item, node, unhashed);
        continue;
      }
      auto it = unstable_.find(HashKey{hash});
      if (it != unstable_.end()) {
        const Addr other_addr = *it & ~kFragmentMask;
        Item* other = FindItem(other_addr);
        if (other == nullptr)
          InvariantFailure("unstable index entry without its item");
        // VerifyUnread has read every page that went in unread.
        if (other->state == ItemState::kUnread)
          InvariantFailure("an unread index page at the scan's end");
        unstable_.erase(it);
        unshared_ -= 2;
        ++scattered_pairs_;
        node = PlanPair(addr, item, other_addr, other, hash, unhashed);
        continue;
      }
      // Nothing of its content to pair with yet: an entry of the index,
      // whose pages are read in this scan.
      if (unhashed && !ReadWaiting(addr, item, hash)) {
        --unshared_;
        continue;
      }
      unstable_.lazy_emplace(PageKey{addr, hash}, [&](const auto& construct) {
        construct(MakeEntry(addr, hash));
      });
    }
  }
}

void Ksm::NoteRun(Addr addr, std::uint64_t hash) {
  if (addr == run_end_ && hash == run_hash_) {
    ++run_pages_;
  } else {
    run_hash_ = hash;
    run_pages_ = 1;
    run_node_ = kNoNode;
  }
  run_end_ = addr + kPageSize;
  longest_run_ = std::max(longest_run_, run_pages_);
}

// The kernel puts the sharers of one content in dups of max_page_sharing
// pages each, which here would make every page of a run of identical pages
// a mapping of its own (consecutive pages, same frame). The same number of
// frames, F = ceil(G / max_page_sharing) for a run of G pages, laid out
// consecutively with page i on frame i mod F, map the run with one call per
// F pages; pages_shared and pages_sharing stay the kernel's.
void Ksm::StripeRuns() {
  const std::size_t max_sharing = knobs_.max_page_sharing;
  const std::size_t longest = longest_run_;
  longest_run_ = 0;
  // No run of this batch (pages planned or waiting in the unstable index)
  // is long enough for two frames.
  if (longest <= max_sharing) return;
  struct Planned {
    Addr addr;
    Item* item;
    NodeId node;
    bool unhashed;  // planned on an old hash (see StablePlan, PairPlan)
  };
  std::vector<Planned> pages;
  pages.reserve(2 * pair_plans_.size() + stable_plans_.size());
  for (const PairPlan& p : pair_plans_) {
    const Planned pp{p.p, p.p_item, p.node, p.unhashed};
    const Planned qq{p.q, p.q_item, p.node, p.q_unread};
    pages.push_back(p.q < p.p ? qq : pp);
    pages.push_back(p.q < p.p ? pp : qq);
  }
  const std::size_t npairs = pages.size();
  for (const StablePlan& p : stable_plans_) {
    pages.push_back({p.page, p.item, p.node, p.unhashed});
  }
  // In address order. Stable plans are already (ExecutePlans sorts them),
  // and so, as a rule, are the pairs' pages where a run of identical pages
  // is planned (its first pair, then the rest joining their node): a sort
  // of all 25,600 plans took 3.5% of the merge CPU of 100 MiB of identical
  // pages; a check and a merge of the two parts take a pass each.
  auto by_addr = [](const Planned& a, const Planned& b) {
    return a.addr < b.addr;
  };
  const auto mid = pages.begin() + static_cast<std::ptrdiff_t>(npairs);
  if (!std::is_sorted(pages.begin(), mid, by_addr))
    std::sort(pages.begin(), mid, by_addr);
  if (!std::is_sorted(mid, pages.end(), by_addr))
    std::sort(mid, pages.end(), by_addr);
  std::inplace_merge(pages.begin(), mid, pages.end(), by_addr);
  struct Run {
    std::size_t begin, end;     // in pages
    std::vector<NodeId> nodes;  // the new layout: page k on nodes[k % F]
  };
  std::vector<Run> runs;
  // Whether a page still holds content of this hash (one planned on an old
  // hash is hashed now, and keeps the new hash).
  auto HoldsHash = [&](const Planned& pg, std::uint64_t hash) {
    if (!pg.unhashed) return true;
    std::uint64_t now = 0;
    if (!memory_->Hash(pg.addr, &now)) return false;
    pg.item->set_hash(now);
    return now == hash;
  };
  // A page taken out of the plans (always after HoldsHash: its hash is
  // current): merged, if it can be, at a later visit.
  auto Unplan = [&](const Planned& pg) { pg.item->state = ItemState::kVolatile; };
  // Nodes made for these plans (no frame, no sharers) can be given up for
  // the new layout; pages joining an existing node cannot.
  auto fresh = [&](const Planned& p) {
    const Node& n = nodes_[p.node];
    return n.sharers == 0 && n.frame == kNoFrame;
  };
  // 1. The stretches to lay out again: consecutive identical pages, all
  //    planned into fresh nodes or all into existing ones (a run that
  //    begins by filling up an existing node stripes the rest), long enough
  //    for two frames; zero content maps no frames.
  std::vector<bool> in_stripe(pages.size(), false);
  std::size_t i = 0;
  while (i < pages.size()) {
    const std::uint64_t hash = pages[i].item->hash();
    const bool is_fresh = fresh(pages[i]);
    std::size_t j = i + 1;
    while (j < pages.size() && pages[j].addr == pages[j - 1].addr + kPageSize &&
           pages[j].item->hash() == hash && fresh(pages[j]) == is_fresh) {
      ++j;
    }
    const std::size_t g = j - i;
    const std::size_t f = (g + max_sharing - 1) / max_sharing;
    // The pages that will pair up (the first 2F) give the new nodes their
    // hash: those planned on an old hash are hashed now.
    bool ok = is_fresh && f >= 2 && g >= 2 * f && hash != ZeroPageHash();
    for (std::size_t k = i; ok && k < i + 2 * f; ++k) ok = HoldsHash(pages[k], hash);
    if (ok) {
      runs.push_back(Run{i, j, std::vector<NodeId>(f)});
      std::fill(in_stripe.begin() + i, in_stripe.begin() + j, true);
    }
    i = j;
  }
  if (runs.empty()) return;
  // 2. Their nodes are given up. Pages planned into those nodes outside
  //    every stretch (a copy elsewhere that joined, or paired with, a page
  //    of the run) join the run's new nodes where there is room.
  absl::flat_hash_set<NodeId> given_up;
  for (const Run& r : runs) {
    for (std::size_t k = r.begin; k < r.end; ++k) given_up.insert(pages[k].node);
  }
  std::vector<std::size_t> outside;  // indexes into pages
  for (std::size_t k = 0; k < pages.size(); ++k) {
    if (!in_stripe[k] && given_up.contains(pages[k].node)) outside.push_back(k);
  }
  for (const NodeId id : given_up) {
    nodes_[id].pending = 0;
    MaybeFreeNode(id);
  }
  std::erase_if(pair_plans_, [&](const PairPlan& p) { return given_up.contains(p.node); });
  std::erase_if(stable_plans_, [&](const StablePlan& p) { return given_up.contains(p.node); });
  for (Run& r : runs) {
    const std::size_t g = r.end - r.begin;
    const std::size_t f = r.nodes.size();
    const std::uint64_t hash = pages[r.begin].item->hash();
    for (std::size_t k = 0; k < f; ++k) {
      r.nodes[k] = NewNode(hash);
      // Its pages: k, k + f, k + 2f ... below g (the first two pair up:
      // consecutive pairs get consecutive frames; the rest join it).
      nodes_[r.nodes[k]].pending = std::uint32_t((g - 1 - k) / f + 1);
      const Planned& p = pages[r.begin + k];
      const Planned& q = pages[r.begin + f + k];
      pair_plans_.push_back({p.addr, p.item, q.addr, q.item, r.nodes[k]});
    }
    for (std::size_t k = 2 * f; k < g; ++k) {
      const Planned& pg = pages[r.begin + k];
      stable_plans_.push_back({pg.addr, pg.item, r.nodes[k % f], pg.unhashed});
    }
  }
  // The pages left over (no room) go in nodes of their own, max_page_sharing
  // at a time: the first two of each pair up, the rest join; a lone last
  // one merges at a later visit.
  absl::flat_hash_map<std::uint64_t, std::vector<std::size_t>> left;  // by hash
  for (const std::size_t k : outside) {
    const Planned& pg = pages[k];
    NodeId to = kNoNode;
    for (const Run& r : runs) {
      if (pages[r.begin].item->hash() != pg.item->hash()) continue;
      for (const NodeId id : r.nodes) {
        if (nodes_[id].load() < max_sharing &&
            (to == kNoNode || nodes_[id].load() < nodes_[to].load())) {
          to = id;
        }
      }
    }
    if (to == kNoNode) {
      left[pg.item->hash()].push_back(k);
      continue;
    }
    ++nodes_[to].pending;
    ForgetBestDup(to);
    stable_plans_.push_back({pg.addr, pg.item, to, pg.unhashed});
  }
  for (const auto& [hash, ks] : left) {
    NodeId id = kNoNode;
    const Planned* first = nullptr;  // waiting for a partner
    for (const std::size_t k : ks) {
      const Planned& pg = pages[k];
      if (id != kNoNode && nodes_[id].load() < max_sharing) {
        ++nodes_[id].pending;
        stable_plans_.push_back({pg.addr, pg.item, id, pg.unhashed});
      } else if (!HoldsHash(pg, hash)) {
        Unplan(pg);
      } else if (first == nullptr) {
        first = &pg;
      } else {
        id = NewNode(hash);
        nodes_[id].pending = 2;
        pair_plans_.push_back({first->addr, first->item, pg.addr, pg.item, id});
        first = nullptr;
      }
    }
    if (first != nullptr) Unplan(*first);  // a lone one merges at a later visit
  }
  std::sort(pair_plans_.begin(), pair_plans_.end(),
            [](const PairPlan& a, const PairPlan& b) { return a.p < b.p; });
  std::sort(stable_plans_.begin(), stable_plans_.end(),
            [](const StablePlan& a, const StablePlan& b) { return a.page < b.page; });
}

bool Ksm::IsZeroNode(NodeId id) const { return nodes_[id].hash() == ZeroPageHash(); }

void Ksm::DropZeroContent() {
  // The pages planned into nodes of zero content, in address order (as
  // Memory expects them): pair plans' p and q, stable plans' page.
  struct Page {
    Addr addr;
    std::uint32_t plan;
    std::uint8_t kind;  // 0: a pair's p, 1: its q, 2: a stable plan's page
  };
  std::vector<Page> pages;
  for (std::size_t i = 0; i < pair_plans_.size(); ++i) {
    if (!IsZeroNode(pair_plans_[i].node)) continue;
    pages.push_back({pair_plans_[i].p, std::uint32_t(i), 0});
    pages.push_back({pair_plans_[i].q, std::uint32_t(i), 1});
  }
  for (std::size_t i = 0; i < stable_plans_.size(); ++i) {
    if (IsZeroNode(stable_plans_[i].node)) {
      pages.push_back({stable_plans_[i].page, std::uint32_t(i), 2});
    }
  }
  if (pages.empty()) return;
  std::sort(pages.begin(), pages.end(),
            [](const Page& a, const Page& b) { return a.addr < b.addr; });
  addr_a_.resize(pages.size());
  for (std::size_t i = 0; i < pages.size(); ++i) addr_a_[i] = pages[i].addr;
  results_.assign(pages.size(), MergeResult::kFailed);
  memory_->DropZeroPages(addr_a_, results_);
  // Per plan: which of its pages now read as the zero page.
  std::vector<std::uint8_t> pair_dropped(pair_plans_.size(), 0);
  std::vector<bool> stable_dropped(stable_plans_.size(), false);
  for (std::size_t i = 0; i < pages.size(); ++i) {
    if (results_[i] != MergeResult::kMerged) continue;
    if (pages[i].kind == 2) {
      stable_dropped[pages[i].plan] = true;
    } else {
      pair_dropped[pages[i].plan] |= std::uint8_t(1u << pages[i].kind);
    }
  }
  auto join = [&](Item* item, NodeId id) {
    item->state = ItemState::kStable;
    item->set_node(id);
    item->age = 0;
    AddSharer(id);
  };
  auto fail = [&](Item* item, NodeId id) {
    // A page dropped while its partner was not is zero and costs nothing,
    // but merged with nothing: it is not counted (its next visit finds it
    // absent and forgets it), as the kernel would not have merged it.
    item->state = ItemState::kVolatile;
    ++merge_failures_;
    ForgetBestDup(id);  // its load went down
  };
  // Pairs first: they make their nodes (frameless: kZeroFrame) for the
  // stable plans that wait on them.
  for (std::size_t i = 0; i < pair_plans_.size(); ++i) {
    const PairPlan& plan = pair_plans_[i];
    if (!IsZeroNode(plan.node)) continue;
    Node& node = nodes_[plan.node];
    node.pending -= 2;
    if (pair_dropped[i] == 3) {
      node.frame = kZeroFrame;
      join(plan.p_item, plan.node);
      join(plan.q_item, plan.node);
    } else {
      fail(plan.p_item, plan.node);
      plan.q_item->state = ItemState::kVolatile;
      if (plan.unhashed) TakeNewHash(plan.p, *plan.p_item);
      if (plan.q_unread) TakeNewHash(plan.q, *plan.q_item);
    }
  }
  for (std::size_t i = 0; i < stable_plans_.size(); ++i) {
    const StablePlan& plan = stable_plans_[i];
    if (!IsZeroNode(plan.node)) continue;
    --nodes_[plan.node].pending;
    if (stable_dropped[i] && nodes_[plan.node].frame == kZeroFrame) {
      join(plan.item, plan.node);
    } else {
      fail(plan.item, plan.node);
      if (plan.unhashed) TakeNewHash(plan.page, *plan.item);
    }
  }
  for (const Page& page : pages) {
    MaybeFreeNode(page.kind == 2 ? stable_plans_[page.plan].node
                                 : pair_plans_[page.plan].node);
  }
  std::erase_if(pair_plans_, [&](const PairPlan& p) { return IsZeroNode(p.node); });
  std::erase_if(stable_plans_, [&](const StablePlan& p) { return IsZeroNode(p.node); });
}

void Ksm::ExecutePlans() {
  const bool any = PlanCount() != 0;
  // Memory takes pages in address order; deferred pairing plans some out
  // of it (ResolveDeferred, and the partner that joins in TakeDeferred).
  auto by_p = [](const PairPlan& a, const PairPlan& b) { return a.p < b.p; };
  auto by_page = [](const StablePlan& a, const StablePlan& b) {
    return a.page < b.page;
  };
  if (!std::is_sorted(pair_plans_.begin(), pair_plans_.end(), by_p))
    std::sort(pair_plans_.begin(), pair_plans_.end(), by_p);
  if (!std::is_sorted(stable_plans_.begin(), stable_plans_.end(), by_page))
    std::sort(stable_plans_.begin(), stable_plans_.end(), by_page);
  StripeRuns();
  // Zero content needs no frame: its pages go back to the zero page, and
  // its nodes only count them, as the kernel's KSM page of zeros would.
  DropZeroContent();
  // Pairs first: they give new stable nodes their frames, which stable plans
  // made later in the batch may be waiting for.
  if (!pair_plans_.empty()) {
    const std::size_t n = pair_plans_.size();
    addr_a_.resize(n);
    addr_b_.resize(n);
    frames_.assign(n, kNoFrame);
    results_.assign(n, MergeResult::kFailed);
    for (std::size_t i = 0; i < n; ++i) {
      addr_a_[i] = pair_plans_[i].p;
      addr_b_[i] = pair_plans_[i].q;
    }
    // Pairs neither of whose pages was read in this scan merge only if
    // their content still has the hash both had at their last visits.
    const bool expect =
        std::any_of(pair_plans_.begin(), pair_plans_.end(),
                    [](const PairPlan& plan) { return plan.unread_pair; });
    if (expect) {
      expected_.resize(n);
      for (std::size_t i = 0; i < n; ++i) {
        expected_[i] =
            pair_plans_[i].unread_pair ? nodes_[pair_plans_[i].node].hash() : 0;
      }
      memory_->MergePairsExpecting(addr_a_, addr_b_, frames_, results_,
                                   expected_);
    } else {
      memory_->MergePairs(addr_a_, addr_b_, frames_, results_);
    }
    for (std::size_t i = 0; i < n; ++i) {
      PairPlan& plan = pair_plans_[i];
      Node& node = nodes_[plan.node];
      node.pending -= 2;
      for (Item* item : {plan.p_item, plan.q_item}) {
        if (results_[i] == MergeResult::kMerged) {
          item->state = ItemState::kStable;
          item->set_node(plan.node);
          item->age = 0;
          node.frame = frames_[i];
          AddSharer(plan.node);
        } else {
          item->state = ItemState::kVolatile;
        }
      }
      if (results_[i] != MergeResult::kMerged) {
        ++merge_failures_;
        ForgetBestDup(plan.node);  // its load went down
        if (plan.unhashed) TakeNewHash(plan.p, *plan.p_item);
        if (plan.q_unread) TakeNewHash(plan.q, *plan.q_item);
      }
    }
  }
  if (!stable_plans_.empty()) {
    const std::size_t n = stable_plans_.size();
    addr_a_.clear();
    frames_.clear();
    for (const StablePlan& plan : stable_plans_) {
      const FrameId frame = nodes_[plan.node].frame;
      if (frame == kNoFrame) continue;  // its pair failed
      addr_a_.push_back(plan.page);
      frames_.push_back(frame);
    }
    results_.assign(addr_a_.size(), MergeResult::kFailed);
    memory_->MergeIntoFrames(addr_a_, frames_, results_);
    std::size_t r = 0;
    for (std::size_t i = 0; i < n; ++i) {
      StablePlan& plan = stable_plans_[i];
      Node& node = nodes_[plan.node];
      --node.pending;
      const bool attempted = node.frame != kNoFrame;
      const bool merged = attempted && results_[r] == MergeResult::kMerged;
      if (attempted) ++r;
      if (merged) {
        plan.item->state = ItemState::kStable;
        plan.item->set_node(plan.node);
        plan.item->age = 0;
        AddSharer(plan.node);
      } else {
        plan.item->state = ItemState::kVolatile;
        ++merge_failures_;
        ForgetBestDup(plan.node);  // its load went down
        if (plan.unhashed) TakeNewHash(plan.page, *plan.item);
      }
    }
  }
  if (!zero_plans_.empty()) {
    const std::size_t n = zero_plans_.size();
    addr_a_.resize(n);
    for (std::size_t i = 0; i < n; ++i) addr_a_[i] = zero_plans_[i].page;
    results_.assign(n, MergeResult::kFailed);
    memory_->DropZeroPages(addr_a_, results_);
    for (std::size_t i = 0; i < n; ++i) {
      Item* item = zero_plans_[i].item;
      if (results_[i] == MergeResult::kMerged) {
        item->state = ItemState::kZero;
        item->age = 0;
        ++zero_pages_;
      } else {
        // Not all zeros any more: remembered with its new content's hash,
        // as any page that changed since its last visit.
        item->state = ItemState::kVolatile;
        std::uint64_t hash = 0;
        if (memory_->Hash(addr_a_[i], &hash)) {
          item->set_hash(hash);
        } else {
          ResetItem(addr_a_[i], *item);
        }
        ++merge_failures_;
      }
    }
  }
  // Nodes whose merges all failed are dropped now that nothing is pending.
  for (const PairPlan& plan : pair_plans_) MaybeFreeNode(plan.node);
  for (const StablePlan& plan : stable_plans_) MaybeFreeNode(plan.node);
  pair_plans_.clear();
  stable_plans_.clear();
  zero_plans_.clear();
  run_node_ = kNoNode;
  scattered_pairs_ = 0;
  carry_since_ = 0;
  if (any && progress_) progress_();
}

// ---------------------------------------------------------------------------
// Scan-time advisor (mm/ksm.c scan_time_advisor), run after each full scan.

void Ksm::ResetAdvisor() {
  advisor_prev_scan_secs_ = 0;
  advisor_change_ = 0;
  advisor_cpu_nanos_ = 0;
  scan_start_nanos_ = clock_->NowNanos();
}

void Ksm::RunAdvisor() {
  if (knobs_.advisor_mode != AdvisorMode::kScanTime) return;
  const std::uint64_t now = clock_->NowNanos();
  const std::uint64_t cpu = clock_->CpuNanos();
  std::uint64_t scan_time = (now - scan_start_nanos_) / 1000000000u;
  if (scan_time == 0) scan_time = 1;
  const std::uint64_t cpu_ms = (cpu - advisor_cpu_nanos_) / 1000000u;
  std::uint64_t cpu_percent = cpu_ms * 100 / (scan_time * 1000);
  if (cpu_percent == 0) cpu_percent = 1;
  const std::uint64_t last =
      advisor_prev_scan_secs_ ? advisor_prev_scan_secs_ : scan_time;
  std::uint64_t factor = knobs_.advisor_target_scan_time * 100 / scan_time;
  if (factor == 0) factor = 1;
  std::uint64_t change = scan_time * 100 / last;
  if (change == 0) change = 1;
  constexpr std::uint64_t kEwmaWeight = 30;
  change = (advisor_change_ * kEwmaWeight + change * (100 - kEwmaWeight)) / 100;
  std::uint64_t pages = std::uint64_t(knobs_.pages_to_scan) * 100 / factor;
  pages = pages * change / 100;
  std::uint64_t per_page_cost = knobs_.pages_to_scan / cpu_percent;
  if (per_page_cost == 0) per_page_cost = 1;
  constexpr std::uint64_t kAdvisorMinCpu = 10;
  pages = std::min(pages, per_page_cost * knobs_.advisor_max_cpu);
  pages = std::max(pages, per_page_cost * kAdvisorMinCpu);
  pages = std::min(pages, knobs_.advisor_max_pages_to_scan);
  advisor_change_ = change;
  advisor_prev_scan_secs_ = scan_time;
  advisor_cpu_nanos_ = cpu;
  knobs_.pages_to_scan = std::uint32_t(std::min<std::uint64_t>(pages, UINT32_MAX));
}

// ---------------------------------------------------------------------------
// Counters

std::uint64_t Ksm::ReportedItems() const {
  // The kernel keeps no rmap_item for a page that maps the zero page: its
  // scanner passes over the zero page, and the item is freed. samepage
  // keeps the item (the page's next visit sees whether it was written)
  // but counts as the kernel does: such pages are not in ksm_rmap_items,
  // pages_volatile or the profits' item cost. Every kZero item is counted
  // in rmap_items_ (it was hashed before it was dropped).
  return rmap_items_ - zero_pages_;
}

Counters Ksm::GetCounters() const {
  Counters c;
  c.pages_shared = pages_shared_;
  c.pages_sharing = pages_sharing_;
  c.pages_unshared = unshared_;
  const std::uint64_t items = ReportedItems();
  const std::uint64_t accounted = pages_shared_ + pages_sharing_ + unshared_;
  c.pages_volatile = items > accounted ? items - accounted : 0;
  c.pages_scanned = pages_scanned_;
  c.pages_skipped = pages_skipped_;
  c.full_scans = full_scans_;
  c.stable_node_chains = chains_;
  c.stable_node_dups = dups_;
  c.ksm_zero_pages = zero_pages_;
  c.rmap_items = items;
  c.general_profit = std::int64_t(pages_sharing_ + zero_pages_) * kPageSize -
                     std::int64_t(items) * std::int64_t(kItemBytes);
  if (carried_) UncountWaitingNodes(&c);
  return c;
}

void Ksm::UncountWaitingNodes(Counters* c) const {
  // Every node without sharers was made by a waiting pair plan, one each.
  absl::flat_hash_map<std::uint64_t, std::size_t> waiting;  // hash -> nodes
  for (const PairPlan& p : pair_plans_) {
    const Node& n = nodes_[p.node];
    if (n.sharers == 0 && n.in_chain) ++waiting[n.hash()];
  }
  for (const auto& [hash, count] : waiting) {
    const std::size_t dups = dup_chains_.find(hash)->second.dups.size();
    const std::size_t real = dups - count;
    c->stable_node_dups -= dups - (real >= 2 ? real : 0);
    if (real < 2) --c->stable_node_chains;
  }
}

SpaceStat Ksm::GetSpaceStat() const {
  SpaceStat s;
  s.rmap_items = ReportedItems();
  s.zero_pages = zero_pages_;
  s.merging_pages = pages_shared_ + pages_sharing_;
  s.process_profit = std::int64_t(s.merging_pages + zero_pages_) * kPageSize -
                     std::int64_t(s.rmap_items) * std::int64_t(kItemBytes);
  s.mergeable = !ranges_.empty();
  return s;
}

void Ksm::CheckInvariants() const {
  if (!carried_ && PlanCount() != 0) {
    InvariantFailure("plans left over after a batch");
  }
  // Plans waiting for a run: every pending item and node load is theirs.
  std::vector<std::uint32_t> pending(nodes_.size(), 0);
  std::uint64_t planned_items = 0;
  auto planned = [&](const Item* item, NodeId node, std::uint32_t n) {
    if (item->state != ItemState::kPending) InvariantFailure("planned item not pending");
    if (node != kNoNode) pending[node] += n;
    ++planned_items;
  };
  for (const PairPlan& p : pair_plans_) {
    planned(p.p_item, p.node, 2);
    planned(p.q_item, kNoNode, 0);
  }
  for (const StablePlan& p : stable_plans_) planned(p.item, p.node, 1);
  for (const ZeroPlan& p : zero_plans_) planned(p.item, kNoNode, 0);
  std::uint64_t items = 0, zero = 0, unstable = 0, unshared = 0, advised = 0,
                pending_items = 0, deferred = 0;
  std::vector<std::uint32_t> sharers(nodes_.size(), 0);
  Addr prev_end = 0;
  for (const auto& [start, r] : ranges_) {
    if (start != r.start || start < prev_end) InvariantFailure("ranges overlap");
    prev_end = r.end();
    advised += r.items.size();
    // An item that is all zero bytes is kNew; a kNew item that is not all
    // zero would be one that scans pass over without a visit, wrongly
    // (NothingToVisit).
    std::uint64_t chunk_seen = UINT64_MAX;  // asked once per chunk
    r.items.ForEachNonZero([&, start = start](std::size_t i, const Item& item) {
      const Addr addr = start + i * kPageSize;
      if (ChunkOf(addr) != chunk_seen) {
        chunk_seen = ChunkOf(addr);
        if (!written_chunks_.contains(chunk_seen)) {
          InvariantFailure("a written item outside written_chunks_");
        }
      }
      switch (item.state) {
        case ItemState::kNew:
          InvariantFailure("a new item that is not all zero");
        case ItemState::kPending:
          ++pending_items;
          break;
        case ItemState::kStable:
          if (item.node() >= nodes_.size() || !nodes_[item.node()].live) {
            InvariantFailure("stable item points at a dead node");
          }
          ++sharers[item.node()];
          break;
        case ItemState::kZero:
          ++zero;
          break;
        case ItemState::kUnstable:
        case ItemState::kUnread:
          if (InUnstable(addr, item)) ++unstable;
          if (item.seq == seq_ && ListHolds(FindDeferred(item.hash()), addr))
            ++deferred;
          ++unshared;
          break;
        case ItemState::kVolatile:
          break;
      }
      ++items;
    });
  }
  if (pending_items != planned_items) {
    InvariantFailure("pending items without a plan");
  }
  for (const std::uint64_t chunk : written_chunks_) {
    if (!AnyRangeIn(ChunkStart(chunk), ChunkStart(chunk + 1))) {
      InvariantFailure("a written chunk left behind by its ranges");
    }
  }
  if (advised != advised_pages_) InvariantFailure("advised page count");
  if (items != rmap_items_) InvariantFailure("rmap_items count");
  if (zero != zero_pages_) InvariantFailure("ksm_zero_pages count");
  if (zero_pages_ > rmap_items_)
    InvariantFailure("zero pages outside rmap_items");
  if (unstable != unstable_.size()) InvariantFailure("unstable index size");
  if (deferred != deferred_pages_) InvariantFailure("deferred pages");
  if (unshared != unshared_) InvariantFailure("pages_unshared count");
  for (const UnstableEntry e : unstable_) {
    const Item* item = FindItem(e & ~kFragmentMask);
    if (item == nullptr || !Indexed(item->state) || item->seq != seq_ ||
        MakeEntry(e & ~kFragmentMask, item->hash()) != e) {
      InvariantFailure("unstable index entry without its item");
    }
  }
  std::uint64_t shared = 0, sharing = 0, live = 0, chains = 0, dups = 0;
  for (NodeId id = 0; id < nodes_.size(); ++id) {
    const Node& n = nodes_[id];
    if (!n.live) continue;
    ++live;
    if (n.sharers != sharers[id]) InvariantFailure("node sharer count");
    if (n.pending != pending[id]) InvariantFailure("node pending count");
    if (n.sharers == 0 && n.pending == 0) InvariantFailure("idle live node");
    if (n.sharers != 0 && n.frame == kNoFrame) {
      InvariantFailure("merged node without a frame");
    }
    if (n.sharers > knobs_.max_page_sharing) {
      InvariantFailure("node over max_page_sharing");
    }
    if (n.sharers == 0) continue;  // made by a waiting plan
    ++shared;
    sharing += n.sharers - 1;
  }
  std::uint64_t linked = 0;
  for (const NodeId first : stable_) {
    const std::uint64_t hash = nodes_[first].hash();
    std::size_t len = 0;
    ForEachDup(first, [&](NodeId id) {
      ++len;
      if (!nodes_[id].live || nodes_[id].hash() != hash ||
          nodes_[id].in_chain != nodes_[first].in_chain) {
        InvariantFailure("stable index chain holds a foreign node");
      }
    });
    linked += len;
    if (nodes_[first].in_chain) {
      if (len < 2) InvariantFailure("a chain of fewer than two dups");
      ++chains;
      dups += len;
    }
  }
  if (dup_chains_.size() != chains) InvariantFailure("chains outside the index");
  for (const auto& [hash, chain] : dup_chains_) {
    if (!chain.best_known || chain.best_for != knobs_.max_page_sharing) continue;
    if (chain.best != kNoNode && nodes_[chain.best].load() >= knobs_.max_page_sharing) {
      continue;  // full: the next lookup walks again
    }
    const NodeId walked = WalkForRoom(chain);
    if ((chain.best == kNoNode) != (walked == kNoNode) ||
        (walked != kNoNode && nodes_[walked].load() != nodes_[chain.best].load())) {
      InvariantFailure("cached dup with room is not the fullest");
    }
  }
  if (linked != live) InvariantFailure("live nodes missing from the index");
  if (shared != pages_shared_ || sharing != pages_sharing_) {
    InvariantFailure("pages_shared/pages_sharing counters");
  }
  if (chains != chains_ || dups != dups_) {
    InvariantFailure("stable_node_chains/stable_node_dups counters");
  }
}

// ---------------------------------------------------------------------------

void Ksm::SplitRangeAt(Addr addr) {
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return;
  --it;
  Range& r = it->second;
  if (addr <= r.start || addr >= r.end()) return;
  const std::size_t keep = (addr - r.start) >> kPageShift;
  const auto may_hold = MayHold(written_chunks_, r.start);
  if (keep > r.items.size() - keep) {
    Range tail;
    tail.start = addr;
    tail.items = r.items.Tail(keep, may_hold);
    r.items.Truncate(keep);
    ranges_.emplace(addr, std::move(tail));
    return;
  }
  // The head is the smaller part: it is copied, and the range's own items
  // become the tail's. Copying the tail instead made a program that gives
  // back a large range a page at a time from its start (a forked child
  // dropping what it has written, munmap of an arena in address order)
  // copy what was left of the range at every call.
  Range head;
  head.start = r.start;
  head.items = r.items.Head(keep, may_hold);
  r.items.DropHead(keep, may_hold);
  auto node = ranges_.extract(it);
  node.key() = addr;
  node.mapped().start = addr;
  ranges_.insert(std::move(node));
  ranges_.emplace(head.start, std::move(head));
}

}  // namespace samepage
