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
// leaves its stable node; smart scan may skip the page; a page last seen
// with the hash of a stable node with room, or of a page in this scan's
// unstable index, merges with it without being read first (the merge's
// compare decides); else its hash is taken and the stable index is
// searched (merging on a hit); a page whose hash changed
// since the last visit is only remembered; an all-zero page is dropped to the
// zero page if use_zero_pages; the unstable index is searched (a hit merges
// the two pages into a new stable node) or the page is inserted. Unlike the
// kernel, a hit that would not continue a run of pairs waits for a partner
// that does until the end of the scan (deferred pairing, see deferred_):
// the same merges, in runs of frames where copies lie in order.
//
// Merges found during a batch are planned and executed together at the end
// of the batch, so that runs of consecutive pages cost one write-protect and
// one mapping call each; runs of identical pages are first laid out over
// consecutive frames (StripeRuns) so that they map in runs too.
//
// Thread safety: not thread-safe; the engine serialises all calls.

#ifndef SAMEPAGE_CORE_KSM_H_
#define SAMEPAGE_CORE_KSM_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "core/knobs.h"
#include "core/memory.h"
#include "core/zeroed_array.h"

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
  // The "frame" of a node of zero content: none, its sharers read the
  // system's zero page.
  static constexpr FrameId kZeroFrame = kNoFrame - 1;

  // REQUIRES: memory and clock outlive this object.
  Ksm(Memory* memory, Clock* clock);
  Ksm(const Ksm&) = delete;
  Ksm& operator=(const Ksm&) = delete;

  // Marks [start, start + npages pages) mergeable. Pages already mergeable
  // stay as they are. False if there was no memory for the items of some
  // part of it (which stays unadvised; the parts before it are advised),
  // as the kernel's madvise may fail with ENOMEM.
  bool Advise(Addr start, std::size_t npages);
  // Unmerges every page of the range (contents kept, ordinary anonymous
  // memory again) and stops tracking it. False if Memory could not restore
  // some page (it is still readable, and no longer tracked).
  [[nodiscard]] bool Unadvise(Addr start, std::size_t npages);
  // Unmerges every page of the range as Unadvise does and forgets what was
  // known of them (a MADV_DONTNEED is about to drop them), but they stay
  // mergeable, and the range's bookkeeping is neither cut nor copied: a
  // program dropping many small pieces of one range in turn (a forked
  // child dismissing what it has written) costs what each piece holds.
  // False if Memory could not restore some page: that part stays merged
  // and tracked, as in Unadvise.
  [[nodiscard]] bool Unmerge(Addr start, std::size_t npages);
  // Stops tracking a range without touching it (the application unmapped it,
  // or mapped something new there): merges waiting for its pages are
  // dropped, not done.
  void Forget(Addr start, std::size_t npages);
  bool IsAdvised(Addr addr) const;
  std::size_t AdvisedPages() const { return advised_pages_; }
  // The advised ranges as (start, npages), adjacent ones joined.
  std::vector<std::pair<Addr, std::size_t>> AdvisedRanges() const;
  // The same within [from, to) (page-aligned), clipped to it: a lookup,
  // not a walk of every range.
  std::vector<std::pair<Addr, std::size_t>> AdvisedRanges(Addr from,
                                                          Addr to) const;

  // Visits up to `pages` present pages from the cursor, merging what it
  // finds; returns the number of pages scanned (pages_scanned grows by it).
  // At the end of the ranges a full scan completes and the next begins, in
  // the same batch unless `stop_at_scan_end`.
  //
  // With `carry_runs` (the background scanner), a run of identical pages
  // that reaches the end of the batch keeps its planned merges for the next
  // batch, so that it is laid out over consecutive frames as a whole
  // (StripeRuns) instead of a mapping per page; its merges then wait, for
  // at most about kCarryPlans plans and 2 s. So do plans that are mostly
  // scattered pairs (HoldScattered), up to their own cap and the same 2 s,
  // and always no later than the end of the full scan. Without it every
  // merge found is done on return.
  //
  // `pause`, asked every kPauseCheck page visits once some are scanned and
  // before the next full scan begins, ends the batch early when it returns
  // true (someone waits for the caller's lock); the batch ends as any
  // other, and the caller continues it with the pages left.
  std::size_t ScanBatch(std::size_t pages, bool stop_at_scan_end = false,
                        bool carry_runs = false,
                        const std::function<bool()>& pause = {});
  // Called, with the caller's lock held, as the counters change within a
  // batch: after each set of merges is done and at the end of each full
  // scan. The kernel's counters move with each merge; a caller that shows
  // counters only between batches (Engine) publishes them here, so that a
  // reader sees merges when they are done, not once the batch that did them
  // has also begun the next full scan and scanned on.
  void SetProgressHook(std::function<void()> hook) {
    progress_ = std::move(hook);
  }
  // Called, with the caller's lock held, for each run of pages a scan
  // forgets because it found them gone (unmapped, or no longer memory the
  // backend merges), as they leave the advised ranges.
  void SetGoneHook(std::function<void(Addr, std::size_t)> hook) {
    gone_hook_ = std::move(hook);
  }
  // Called, with the caller's lock held, as each full scan begins, once the
  // backend has read its view of the memory (Memory::BeginFullScan) and
  // before any page is visited: the hook may Advise more.
  void SetScanStartHook(std::function<void()> hook) {
    scan_start_hook_ = std::move(hook);
  }
  // Counts a full scan over no advised page, as ksmd counts its passes over
  // a process whose VM_MERGEABLE memory holds nothing it tracks (advice
  // given to memory the backend cannot merge). Nothing else changes; a
  // no-op while any page is advised.
  void CountEmptyFullScan();
  // Does the merges that a batch left waiting for a run (carry_runs). The
  // range calls below do it themselves; callers that change knobs call it
  // first.
  void FinishPlans();
  // Merges a growing run may keep waiting across batches.
  static constexpr std::size_t kCarryPlans = 8192;
  // Pages that may wait for a partner in a run at once (deferred pairing,
  // about 50 bytes each at the end of the scan); past it pages pair as the
  // kernel's do. Lower for tests.
  static constexpr std::size_t kMaxDeferredPages = std::size_t{1} << 18;
  // Pages a probe asks about (Memory::Probe): an aligned chunk of this
  // many, or an eighth of it while a chunk's probe takes longer than
  // kSlowProbeNanos.
  static constexpr std::size_t kProbeChunkPages = 512;
  static constexpr std::uint64_t kSlowProbeNanos = 50'000;
  void set_max_deferred_pages(std::size_t n) { max_deferred_pages_ = n; }

  // run=2: unmerges every merged page and forgets all rmap items (ranges stay
  // mergeable). False if some page could not be restored.
  [[nodiscard]] bool UnmergeAll();

  Knobs& knobs() { return knobs_; }
  const Knobs& knobs() const { return knobs_; }
  Counters GetCounters() const;
  SpaceStat GetSpaceStat() const;

  // Bytes of samepage metadata per tracked page (rmap item).
  static constexpr std::size_t kItemBytes = 12;

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
    kUnread,    // in the unstable index on the hash of its last visit, not
                // read in this scan (valid only if seq == scan seq): read
                // at the scan's end (VerifyUnread) if no merge came first
  };
  // Whether an item of this state has an entry in the unstable index (if
  // its seq is this scan's).
  static bool Indexed(ItemState s) {
    return s == ItemState::kUnstable || s == ItemState::kUnread;
  }

  // A 64-bit hash kept as two halves, so that the structs holding it need
  // only 4-byte alignment (Item: 12 bytes, Node: 20).
  struct SplitHash {
    std::uint32_t lo = 0;
    std::uint32_t hi = 0;
    std::uint64_t get() const { return std::uint64_t{hi} << 32 | lo; }
    void set(std::uint64_t h) {
      lo = std::uint32_t(h);
      hi = std::uint32_t(h >> 32);
    }
  };

  // A merged page needs no hash of its own (its node has it), so kStable
  // items keep their node in its place.
  struct Item {
    SplitHash h;  // the hash, or in h.lo the node while kStable
    ItemState state = ItemState::kNew;
    std::uint8_t age = 0;  // smart scan: visits without merging
    std::uint8_t remaining_skips = 0;
    std::uint8_t seq = 0;  // full-scan sequence of an unstable insertion

    std::uint64_t hash() const { return h.get(); }
    void set_hash(std::uint64_t v) { h.set(v); }
    NodeId node() const { return h.lo; }
    void set_node(NodeId id) { h.set(id); }
  };
  static_assert(sizeof(Item) == kItemBytes);

  // A page never visited keeps an all-zero item (checked in Advise):
  // ZeroedArray leaves those untouched, so they take no memory.
  struct Range {
    Addr start = 0;
    ZeroedArray<Item> items;  // one per page
    Addr end() const { return start + items.size() * kPageSize; }
  };

  // A merged page's frame and sharers, the kernel's stable_node: 20 bytes.
  // Nodes with the same hash form a chain (the kernel's stable_node_chain of
  // dups), listed in dup_chains_; the stable index holds one of them.
  // sharers and pending never pass max_page_sharing (at most INT_MAX, as in
  // the kernel), so 31 bits each are enough.
  struct Node {
    SplitHash h;
    FrameId frame = kNoFrame;
    std::uint32_t sharers : 31 = 0;  // items in kStable pointing here
    std::uint32_t live : 1 = 0;
    std::uint32_t pending : 31 = 0;  // items planned to join in this batch
    std::uint32_t in_chain : 1 = 0;  // listed in dup_chains_

    std::uint64_t hash() const { return h.get(); }
    void set_hash(std::uint64_t v) { h.set(v); }
    std::uint32_t load() const { return std::uint32_t{sharers} + std::uint32_t{pending}; }
  };
  static_assert(sizeof(Node) == 20);

  // The dups of a content with two or more nodes (dup_chains_).
  struct Chain {
    std::vector<NodeId> dups;
    // FindStableWithRoom's answer while no load in the chain went down and
    // no dup came or went (only the chosen dup's load goes up in between).
    NodeId best = kNoNode;
    bool best_known = false;
    std::uint32_t best_for = 0;  // the max_page_sharing it was found under
  };

  // Index lookups. Both indexes hold small ids (a node id; a page address)
  // and take the 64-bit hash from the node or the item, so a slot is 4 or
  // 8 bytes instead of a (hash, value) pair.
  struct HashKey {
    std::uint64_t hash;
  };
  struct PageKey {
    Addr addr;
    std::uint64_t hash;
  };
  struct StableHash {
    using is_transparent = void;
    const Ksm* ksm;
    std::size_t operator()(NodeId id) const { return ksm->nodes_[id].hash(); }
    std::size_t operator()(HashKey k) const { return k.hash; }
  };
  struct StableEq {
    using is_transparent = void;
    const Ksm* ksm;
    bool operator()(NodeId a, NodeId b) const { return a == b; }
    bool operator()(NodeId a, HashKey k) const {
      return ksm->nodes_[a].hash() == k.hash;
    }
    bool operator()(HashKey k, NodeId a) const { return (*this)(a, k); }
  };
  // An unstable index entry: the page's address with the top 12 bits of its
  // hash in the (always zero) offset bits, which settle almost every
  // lookup without finding the item.
  using UnstableEntry = std::uint64_t;
  static constexpr UnstableEntry kFragmentMask = kPageSize - 1;
  static UnstableEntry MakeEntry(Addr addr, std::uint64_t hash) {
    return addr | (hash >> 52);
  }
  struct UnstableHash {
    using is_transparent = void;
    const Ksm* ksm;
    std::size_t operator()(UnstableEntry e) const {
      return ksm->FindItem(e & ~kFragmentMask)->hash();
    }
    std::size_t operator()(HashKey k) const { return k.hash; }
    std::size_t operator()(PageKey k) const { return k.hash; }
  };
  struct UnstableEq {
    using is_transparent = void;
    const Ksm* ksm;
    bool operator()(UnstableEntry a, UnstableEntry b) const { return a == b; }
    bool operator()(UnstableEntry e, HashKey k) const {
      return (e & kFragmentMask) == (k.hash >> 52) &&
             ksm->FindItem(e & ~kFragmentMask)->hash() == k.hash;
    }
    bool operator()(UnstableEntry e, PageKey k) const {
      return (e & ~kFragmentMask) == k.addr;
    }
    bool operator()(HashKey k, UnstableEntry e) const { return (*this)(e, k); }
    bool operator()(PageKey k, UnstableEntry e) const { return (*this)(e, k); }
  };
  using UnstableSet =
      absl::flat_hash_set<UnstableEntry, UnstableHash, UnstableEq>;

  // Plans collected during a batch, or kept across batches for a run
  // (carried_). Item pointers stay valid while they wait: ranges change only
  // in Forget, which first drops or does every waiting plan (Advise adds
  // ranges without moving items).
  // A plan `unhashed` was made on the hash of the page's last visit (a
  // pair's p), without reading it again (see VisitPage): the merge's
  // compare decides. A pair's q, whose hash its node takes, is always
  // hashed in this full scan.
  struct PairPlan {
    Addr p;
    Item* p_item;
    Addr q;
    Item* q_item;
    NodeId node;
    bool unhashed = false;
    bool q_unread = false;  // q was in the index unread (kUnread)
    // Neither page was read in this scan: the node's hash is their last
    // visits', and the merge checks the content still has it.
    bool unread_pair = false;
  };
  struct StablePlan {
    Addr page;
    Item* item;
    NodeId node;
    bool unhashed = false;
  };
  struct ZeroPlan {
    Addr page;
    Item* item;
  };

  // Splits the range holding addr so that a range starts there.
  void SplitRangeAt(Addr addr);

  // The range holding addr, or the first one after it (ranges_.end()).
  std::map<Addr, Range>::iterator RangeFrom(Addr addr);
  Item* FindItem(Addr addr);
  const Item* FindItem(Addr addr) const;

  void VisitPage(Addr addr, Item& item, PageState state);
  // Fetches the index slots a later VisitPage of `item` will look up.
  void PrefetchLookups(const Item& item) const;
  static constexpr std::size_t kLookAhead = 8;
  // A page of this batch was planned for merging, or put in the unstable
  // index, with this hash: it extends the current run of identical
  // consecutive pages or starts a new one.
  void NoteRun(Addr addr, std::uint64_t hash);
  // Lays runs of identical pages planned into fresh nodes over consecutive
  // frames, page i of a run on frame i mod F (ExecutePlans, first).
  void StripeRuns();
  void ForgetGone();  // drops the pages found gone in this batch
  // After a probe of n pages that took `nanos`: the size of the next ones.
  void AdaptProbePages(std::size_t n, std::uint64_t nanos);
  void BeginFullScan();
  void ExecutePlans();
  // Zero content (a node whose hash is the zero page's): its plans drop
  // their pages to the zero page (Memory::DropZeroPages) instead of mapping
  // a frame; the node keeps kZeroFrame. ExecutePlans, first.
  void DropZeroContent();
  bool IsZeroNode(NodeId id) const;
  // rmap_items as the kernel counts them (see ksm.cc).
  std::uint64_t ReportedItems() const;
  std::size_t PlanCount() const {
    return pair_plans_.size() + stable_plans_.size() + zero_plans_.size();
  }
  // Whether the merges planned so far wait for the run of identical pages
  // ending at `next` to grow (cut, past the cap, where its last node is
  // full, so that the next part starts on fresh nodes).
  bool HoldForRun(Addr next, std::size_t cap) const;
  // Whether the merges planned so far wait for more (within this batch,
  // and with carry_runs across batches): while most are pairs that do not
  // run on from the pair before, up to kMaxScatteredPlans. The backend merges
  // such pairs in address order (LinuxMemory::MergeScatteredPairs), and the
  // more of them one call holds, the more of their pages lie in memory no merge
  // has cut up yet, where one window and one TLB flush serve many of them:
  // scattered pairs took half the merge CPU with plans held to the batch's end
  // as with flushes every kPlanFlush plans (docs/performance.md). Pages
  // waiting in deferred_ count as such pairs: they are planned at the end of
  // the scan, and the few pairs planned meanwhile wait for them. Only where
  // the backend asks for it (Memory::WantsScatteredPairsTogether).
  bool HoldScattered() const;
  // With plans waiting across batches: drops those touching [start, end)
  // (their pages stay as they are) and does the rest (FinishPlans).
  void DropWaitingPlans(Addr start, Addr end);
  // Unadvise's and Unmerge's walk: drops the plans waiting on [start, end),
  // has Memory give back each advised part of it, and calls
  // restored(range, from, to) for each part given back. False if some part
  // could not be.
  template <typename F>
  bool UnmergeEach(Addr start, Addr end, F&& restored);
  // Forget without finishing plans (ForgetGone, once they are done).
  void ForgetRange(Addr start, std::size_t npages);
  // Whether some range overlaps [from, to).
  bool AnyRangeIn(Addr from, Addr to) const;
  // Frees the per-batch scratch.
  void ReleaseScratch();
  // Whether the chunk of n pages from item idx of r, at the cursor, just
  // probed into states_, has nothing a visit would change.
  bool NothingToVisit(const Range& r, std::size_t idx, std::size_t n) const;
  // Where the scan goes on from the cursor, in r: past the chunks that hold
  // no written item (written_chunks_) and no page (Memory::SkipAbsent), in
  // r and in the ranges after it (the result may lie past r).
  Addr PassUnwritten(const Range& r) const;
  // After the visits of items [idx, idx + n) of r, from the cursor: keeps
  // written_chunks_ covering every item that is not all zero.
  void NoteWritten(const Range& r, std::size_t idx, std::size_t n);
  // stable_node_chains and stable_node_dups without the nodes that only
  // waiting plans have made.
  void UncountWaitingNodes(Counters* c) const;

  // Stable index.
  NodeId FindStableWithRoom(std::uint64_t hash) const;
  // Plans the page's merge into a stable node (its item holds the node's
  // hash).
  void PlanJoin(Addr addr, Item& item, NodeId node, bool unhashed);
  NodeId NewNode(std::uint64_t hash);
  void LinkNode(NodeId id);
  void UnlinkNode(NodeId id);
  // A page planned on an old hash failed to merge: it keeps its current
  // hash, as a visit would have (or is forgotten if it cannot be read).
  void TakeNewHash(Addr addr, Item& item);
  void AddSharer(NodeId id);
  void RemoveSharer(NodeId id);
  void MaybeFreeNode(NodeId id);
  // A load in this node's chain went down: the cached best dup may be wrong.
  void ForgetBestDup(NodeId id);
  NodeId WalkForRoom(const Chain& chain) const;
  // Calls f(id) for every node with this hash (index entry `first`).
  template <typename F>
  void ForEachDup(NodeId first, F&& f) const;

  // Unstable index.
  bool InUnstable(Addr addr, const Item& item) const;
  // Plans a pair of this page and the unstable index's page of this hash,
  // or a page of it waiting in deferred_, if that continues a run; else
  // lets this page wait there too (deferred pairing). True if the page was
  // handled.
  bool PairWithUnstable(Addr addr, Item& item, std::uint64_t hash, bool unhashed);
  void RemoveFromUnstable(Addr addr, Item& item);
  // A page whose last visit's hash finds nothing to pair with enters the
  // unstable index on that hash without being read (kUnread).
  void InsertUnread(Addr addr, Item& item);
  // Reads a kUnread page of the index: if it still has its hash it stays
  // (kUnstable), else it leaves the index with its new hash.
  void ReadIndexed(Addr addr, Item& item);
  // At the scan's end: reads the kUnread pages no merge read, at most
  // `budget` of them; returns how many it read.
  std::size_t VerifyUnread(std::size_t budget,
                           const std::function<bool()>& pause);
  // The index's page at `it` joins `node` (a stable plan, out of address
  // order); returns its address.
  Addr JoinIndexed(UnstableSet::iterator it, NodeId node);
  // Plans the pair of this page and the index's page at `it`.
  bool PairWithIndexed(Addr addr, Item& item, std::uint64_t hash, bool unhashed,
                       UnstableSet::iterator it);
  // Deferred pairing (deferred_). The pages of a content waiting, if any.
  using DeferredList = absl::InlinedVector<Addr, 1>;
  const DeferredList* FindDeferred(std::uint64_t hash) const;
  // A list entry's page, and whether it waits unread (kDeferredUnhashed).
  static Addr WaitingPage(Addr entry) { return entry & ~kDeferredUnhashed; }
  static bool WaitsUnread(Addr entry) {
    return (entry & kDeferredUnhashed) != 0;
  }
  static bool ListHolds(const DeferredList* list, Addr page);
  // Puts `addr`, kUnstable already and counted, on its content's list.
  void AddDeferred(std::uint64_t hash, Addr addr, bool unhashed);
  // A stable plan made out of address order (ExecutePlans sorts them):
  // `item` leaves the unstable state for `node`.
  void PlanUnstableJoin(Addr addr, Item* item, NodeId node, bool unhashed);
  // Takes `addr` off its content's list; false if it is not there.
  bool EraseDeferred(std::uint64_t hash, Addr addr, bool* unhashed);
  // The waiting page `waiting` of this hash pairs with `addr` (true),
  // unless it changed (it was waiting unread) or cannot be read, when it
  // stops waiting (false).
  bool TakeDeferred(Addr addr, Item& item, std::uint64_t hash, bool unhashed,
                    Addr waiting);
  // `addr`, whose partners lie scattered from it, waits in deferred_ (see
  // PairWithUnstable).
  void Defer(Addr addr, Item& item, std::uint64_t hash, bool unhashed);
  // The page deferred just before the one visited pairs with a candidate of
  // its content one page before a candidate of the visited page's
  // (`indexed`, `waiting`), after all: a run begins. False if none is.
  bool UndeferLast(Addr indexed, const DeferredList* waiting);
  // A waiting page found on the hash of its last visit is read before it
  // pairs as q; false (and it is remembered with its new hash) if changed.
  bool ReadWaiting(Addr addr, Item* item, std::uint64_t hash);
  // End of a full scan: each page still waiting pairs with its partner, or
  // joins the node its content has by now, as it would have on its visit.
  void ResolveDeferred();
  // Plans the pair (p, q) on a new node of this hash; `unhashed` as for
  // PairPlan (q was read in this scan, unless `unread_pair`: neither was,
  // and the merge checks the content still has `hash`). Deferred pairing plans
  // some out of address order (ExecutePlans sorts them).
  NodeId PlanPair(Addr p, Item* p_item, Addr q, Item* q_item,
                  std::uint64_t hash, bool unhashed, bool unread_pair = false);

  // Turns an item back into kNew, leaving whatever index it is in.
  void ResetItem(Addr addr, Item& item);

  void RunAdvisor();

  Memory* const memory_;
  Clock* const clock_;
  Knobs knobs_;
  std::function<void()> progress_;  // SetProgressHook
  std::function<void(Addr, std::size_t)> gone_hook_;  // SetGoneHook
  std::function<void()> scan_start_hook_;             // SetScanStartHook

  std::map<Addr, Range> ranges_;  // keyed by start; non-overlapping
  std::size_t advised_pages_ = 0;
  Addr cursor_ = 0;        // next address to visit
  bool in_scan_ = false;   // a full scan has begun
  // Pages entered the unstable index unread in this scan (InsertUnread):
  // VerifyUnread reads them, from verify_cursor_, before the scan ends.
  bool unread_in_scan_ = false;
  Addr verify_cursor_ = 0;
  std::uint8_t seq_ = 0;   // full-scan sequence number

  // A deque: grows without copying and without a doubled capacity.
  std::deque<Node> nodes_;
  std::vector<NodeId> free_nodes_;
  // Every live node's hash, one node per hash; the rest of a chain (hashes
  // with two or more nodes) in dup_chains_, newest last.
  absl::flat_hash_set<NodeId, StableHash, StableEq> stable_{0, StableHash{this},
                                                            StableEq{this}};
  mutable absl::flat_hash_map<std::uint64_t, Chain> dup_chains_;
  // Pages of this full scan waiting for a partner. Every entry's item is
  // kUnstable or kUnread with this scan's seq and the hash it was inserted
  // with.
  UnstableSet unstable_{0, UnstableHash{this}, UnstableEq{this}};
  std::size_t unstable_peak_ = 0;  // largest size in the last full scan
  // Deferred pairing. A page whose partners (the unstable index's page of
  // its content, pages waiting here) would not continue a run with it
  // waits here too, in its content's list, instead of pairing with the
  // first: a later page of its content that pairs with it continues a run
  // (the same data at a third place, a second guest or buffer holding the
  // same pages in order; TakeDeferred), or begins one with the page before
  // (UndeferLast), and the index's page then joins their node. Memory where
  // a copy lying scattered is scanned first would otherwise pair in one-page
  // mappings whose frames come from another batch than their neighbours',
  // cutting the runs the later copies map in (docs/performance.md, the
  // mixed workload). Pages still waiting at the end of the scan pair or join
  // then (ResolveDeferred), so the scan merges what the kernel's would. A
  // waiting page is kUnstable with this scan's seq (pages_unshared, as the
  // kernel's unstable tree entry it stands for) but not in unstable_. An
  // address with kDeferredUnhashed set was found on the hash of its last
  // visit, and is read before it pairs as a pair's q.
  absl::flat_hash_map<std::uint64_t, DeferredList> deferred_;
  std::size_t deferred_pages_ = 0;
  std::size_t max_deferred_pages_ = kMaxDeferredPages;
  static constexpr Addr kDeferredUnhashed = 1;
  // The page deferred last, and its content: the next page, pairing one page
  // further than it with a candidate of that content, begins a run with it
  // (UndeferLast).
  Addr last_deferred_ = 0;
  std::uint64_t last_deferred_hash_ = 0;
  // The page after the one planned last into a pair's node, and the pages
  // after that node's other pages: a pair of the two continues a run of
  // frames on both sides (PairWithUnstable).
  Addr cont_next_ = 0;
  Addr cont_to_[2] = {0, 0};
  void SetContinuation(Addr page, Addr a, Addr b);

  std::vector<PairPlan> pair_plans_;
  std::vector<StablePlan> stable_plans_;
  std::vector<ZeroPlan> zero_plans_;
  std::vector<Addr> gone_;  // pages found unmapped in this batch, ascending
  // The run of identical consecutive pages the last planned page belongs to.
  Addr run_end_ = 0;  // address after its last page
  std::uint64_t run_hash_ = 0;
  std::size_t run_pages_ = 0;
  std::size_t longest_run_ = 0;  // since the last ExecutePlans
  NodeId run_node_ = kNoNode;    // the node of the last planned page
  // Pair plans since the last ExecutePlans that do not continue the one
  // before (both pages one page further).
  std::size_t scattered_pairs_ = 0;
  bool carried_ = false;         // plans (and gone_) wait across batches
  std::uint64_t carry_since_ = 0;  // NowNanos when they began to wait
  // Scratch for Memory calls, reused across batches.
  std::vector<Addr> addr_a_, addr_b_;
  std::vector<FrameId> frames_;
  std::vector<MergeResult> results_;
  std::vector<std::uint64_t> expected_;  // MergePairsExpecting's
  std::vector<PageState> states_;
  std::size_t probe_pages_ = kProbeChunkPages;  // AdaptProbePages
  // The chunks (kProbeChunk pages, by address) that may hold an item that
  // is not all zero: every such item lies in one (CheckInvariants). Only a
  // visit writes an item that was all zero, and visits note their chunk.
  // Between these chunks a scan asks Memory where the next page is instead
  // of probing every chunk: a sparse reservation of a terabyte is passed in
  // a few calls. A chunk leaves the set when a visit of all of it leaves
  // all its items zero, or when no range holds it any more.
  absl::btree_set<std::uint64_t> written_chunks_;

  // Counters kept incrementally.
  std::uint64_t pages_shared_ = 0;
  std::uint64_t pages_sharing_ = 0;
  std::uint64_t rmap_items_ = 0;
  std::uint64_t zero_pages_ = 0;
  // Items in kUnstable or kUnread state, this scan's and the last one's
  // (the kernel's ksm_pages_unshared: an entry of the last scan's unstable
  // tree counts until its page is visited again).
  std::uint64_t unshared_ = 0;
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
