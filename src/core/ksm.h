// samepage::Ksm — the merging algorithm of mm/ksm.c, knowing nothing of Linux.
//
// Ksm owns the mergeable ranges of one address space, a reverse-map item per
// page, the stable index (merged pages, one frame each, chained in dups of at
// most max_page_sharing sharers) and the unstable index (candidates seen this
// full scan, rebuilt every full scan), the scan cursor and every counter of
// /sys/kernel/mm/ksm. It reads and remaps memory only through Memory.
//
// Indexes are hash tables keyed by the 64-bit page hash instead of the
// kernel's memcmp-ordered red-black trees: a lookup is one probe instead of
// log2(n) page compares, and a hash match only nominates a candidate — every
// merge is decided by a full compare under write-protection in Memory. See
// docs/design.md for the measurement behind the choice.
//
// Per page visit, in the kernel's order: a merged page that was copied away
// leaves its stable node; smart scan may skip the page; its hash is taken;
// the stable index is searched (merging on a hit); a page whose hash changed
// since the last visit is only remembered; an all-zero page is dropped to the
// zero page if use_zero_pages; the unstable index is searched (a hit merges
// the two pages into a new stable node) or the page is inserted.
//
// Merges found during a batch are planned and executed together at the end
// of the batch, so that runs of consecutive pages cost one write-protect and
// one mapping call each.
//
// Thread safety: not thread-safe; the engine serialises all calls.

#ifndef SAMEPAGE_CORE_KSM_H_
#define SAMEPAGE_CORE_KSM_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "core/knobs.h"
#include "core/memory.h"

namespace samepage {

// Time sources for the scan-time advisor; injectable for tests.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::uint64_t NowNanos() = 0;
  virtual std::uint64_t CpuNanos() = 0;  // CPU time of the scanning thread
};
Clock* RealClock();

class Ksm {
 public:
  using NodeId = std::uint32_t;
  static constexpr NodeId kNoNode = UINT32_MAX;

  // REQUIRES: memory and clock outlive this object.
  Ksm(Memory* memory, Clock* clock);
  Ksm(const Ksm&) = delete;
  Ksm& operator=(const Ksm&) = delete;

  // Marks [start, start + npages pages) mergeable. Pages already mergeable
  // stay as they are.
  void Advise(Addr start, std::size_t npages);
  // Unmerges every page of the range (contents kept, ordinary anonymous
  // memory again) and stops tracking it. False if Memory could not restore
  // some page (it is still readable, and no longer tracked).
  [[nodiscard]] bool Unadvise(Addr start, std::size_t npages);
  // Stops tracking a range without touching it (the application unmapped it).
  void Forget(Addr start, std::size_t npages);
  bool IsAdvised(Addr addr) const;
  std::size_t AdvisedPages() const { return advised_pages_; }
  // The advised ranges as (start, npages), adjacent ones joined.
  std::vector<std::pair<Addr, std::size_t>> AdvisedRanges() const;

  // Visits up to `pages` present pages from the cursor, merging what it
  // finds; returns the number of pages scanned (pages_scanned grows by it).
  // At the end of the ranges a full scan completes and the next begins, in
  // the same batch unless `stop_at_scan_end`.
  std::size_t ScanBatch(std::size_t pages, bool stop_at_scan_end = false);

  // run=2: unmerges every merged page and forgets all rmap items (ranges stay
  // mergeable). False if some page could not be restored.
  [[nodiscard]] bool UnmergeAll();

  Knobs& knobs() { return knobs_; }
  const Knobs& knobs() const { return knobs_; }
  Counters GetCounters() const;
  SpaceStat GetSpaceStat() const;

  // Bytes of samepage metadata per tracked page (rmap item).
  static constexpr std::size_t kItemBytes = 16;

  // Forgets the advisor's history (writing advisor_mode does this).
  void ResetAdvisor();

  // Merges planned but not done because Memory refused them (content
  // changed, page gone, no VMA budget).
  std::uint64_t merge_failures() const { return merge_failures_; }

  // Aborts with a message if the indexes, items and counters disagree.
  void CheckInvariants() const;

 private:
  enum class ItemState : std::uint8_t {
    kNew,       // no rmap item yet: never visited, or forgotten
    kVolatile,  // visited; hash holds the last content hash
    kUnstable,  // in the unstable index (valid only if seq == scan seq)
    kStable,    // merged into stable node `node`
    kZero,      // dropped to the zero page (use_zero_pages)
    kPending,   // part of a merge planned in this batch
  };

  struct Item {
    std::uint64_t hash = 0;
    NodeId node = kNoNode;
    ItemState state = ItemState::kNew;
    std::uint8_t age = 0;  // smart scan: visits without merging
    std::uint8_t remaining_skips = 0;
    std::uint8_t seq = 0;  // full-scan sequence of an unstable insertion
  };
  static_assert(sizeof(Item) == kItemBytes);

  struct Range {
    Addr start = 0;
    std::vector<Item> items;  // one per page
    Addr end() const { return start + items.size() * kPageSize; }
  };

  // A merged page's frame and sharers, the kernel's stable_node. Nodes with
  // the same hash form a chain (the kernel's stable_node_chain of dups) linked
  // through next_dup; the stable index points at the first.
  struct Node {
    std::uint64_t hash = 0;
    FrameId frame = kNoFrame;
    std::uint32_t sharers = 0;  // items in kStable pointing here
    std::uint32_t pending = 0;  // items planned to join in this batch
    NodeId next_dup = kNoNode;
    bool live = false;
  };

  // Plans collected during a batch. Item pointers stay valid for the batch:
  // ranges do not change while a batch runs.
  struct PairPlan {
    Addr p;
    Item* p_item;
    Addr q;
    Item* q_item;
    NodeId node;
  };
  struct StablePlan {
    Addr page;
    Item* item;
    NodeId node;
  };
  struct ZeroPlan {
    Addr page;
    Item* item;
  };

  static void SplitRangeAt(std::map<Addr, Range>& ranges, Addr addr);

  Item* FindItem(Addr addr);
  const Item* FindItem(Addr addr) const;

  void VisitPage(Addr addr, Item& item, PageState state);
  void ForgetGone();  // drops the pages found gone in this batch
  void BeginFullScan();
  void ExecutePlans();

  // Stable index.
  NodeId FindStableWithRoom(std::uint64_t hash) const;
  NodeId NewNode(std::uint64_t hash);
  void LinkNode(NodeId id);
  void UnlinkNode(NodeId id);
  void AddSharer(NodeId id);
  void RemoveSharer(NodeId id);
  void MaybeFreeNode(NodeId id);
  std::size_t ChainLength(NodeId head) const;

  // Unstable index.
  bool InUnstable(Addr addr, const Item& item) const;
  void RemoveFromUnstable(Addr addr, Item& item);

  // Turns an item back into kNew, leaving whatever index it is in.
  void ResetItem(Addr addr, Item& item);

  void RunAdvisor();

  Memory* const memory_;
  Clock* const clock_;
  Knobs knobs_;

  std::map<Addr, Range> ranges_;  // keyed by start; non-overlapping
  std::size_t advised_pages_ = 0;
  Addr cursor_ = 0;        // next address to visit
  bool in_scan_ = false;   // a full scan has begun
  std::uint8_t seq_ = 0;   // full-scan sequence number

  std::vector<Node> nodes_;
  std::vector<NodeId> free_nodes_;
  absl::flat_hash_map<std::uint64_t, NodeId> stable_;
  absl::flat_hash_map<std::uint64_t, Addr> unstable_;

  std::vector<PairPlan> pair_plans_;
  std::vector<StablePlan> stable_plans_;
  std::vector<ZeroPlan> zero_plans_;
  std::vector<Addr> gone_;  // pages found unmapped in this batch, ascending
  // Scratch for Memory calls, reused across batches.
  std::vector<Addr> addr_a_, addr_b_;
  std::vector<FrameId> frames_;
  std::vector<MergeResult> results_;
  std::vector<PageState> states_;

  // Counters kept incrementally.
  std::uint64_t pages_shared_ = 0;
  std::uint64_t pages_sharing_ = 0;
  std::uint64_t rmap_items_ = 0;
  std::uint64_t zero_pages_ = 0;
  std::uint64_t pages_scanned_ = 0;
  std::uint64_t pages_skipped_ = 0;
  std::uint64_t full_scans_ = 0;
  std::uint64_t chains_ = 0;  // stable index entries with two or more dups
  std::uint64_t dups_ = 0;    // nodes in such entries
  std::uint64_t merge_failures_ = 0;

  // Scan-time advisor state (kernel's advisor_ctx).
  std::uint64_t scan_start_nanos_ = 0;
  std::uint64_t advisor_cpu_nanos_ = 0;
  std::uint64_t advisor_prev_scan_secs_ = 0;
  std::uint64_t advisor_change_ = 0;
};

}  // namespace samepage

#endif  // SAMEPAGE_CORE_KSM_H_
