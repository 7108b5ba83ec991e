// Core algorithm tests on FakeMemory: the scenarios, the kernel's
// counter formulas, and long random operation sequences checked against a
// simple model of what the application must observe.

#include "core/ksm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>

#include "core/fake_memory.h"
#include "core/hash.h"
#include "core/resident_memory.h"

namespace samepage {
namespace {

constexpr Addr kBase = 0x10000000;

Addr Page(std::size_t i) { return kBase + i * kPageSize; }

class FakeClock : public Clock {
 public:
  std::uint64_t now = 0, cpu = 0;
  std::uint64_t NowNanos() override { return now; }
  std::uint64_t CpuNanos() override { return cpu; }
};

// n full scans of a core of the test's own, in batches of 100 pages.
void FullScansOf(Ksm& ksm, int n) {
  const std::uint64_t target = ksm.GetCounters().full_scans + n;
  for (int guard = 0; ksm.GetCounters().full_scans < target; ++guard) {
    ASSERT_LT(guard, 1000) << "scanner made no progress";
    ksm.ScanBatch(100, /*stop_at_scan_end=*/true);
    ksm.CheckInvariants();
  }
}

class KsmTest : public ::testing::Test {
 protected:
  KsmTest() : ksm_(&mem_, &clock_) {}

  // Maps n pages, fills page i with fill(i), marks them mergeable.
  template <typename F>
  void Setup(std::size_t n, F fill) {
    mem_.Map(kBase, n);
    for (std::size_t i = 0; i < n; ++i) mem_.Write(Page(i), fill(i));
    ksm_.Advise(kBase, n);
  }

  // Setup with page i equal to page i + n/2 (byte 1 + i % (n/2), n <= 510),
  // merged by two full scans.
  void SetupMergedPairs(std::size_t n) {
    Setup(n, [n](std::size_t i) { return 1 + i % (n / 2); });
    FullScans(2);
    ASSERT_EQ(ksm_.GetCounters().pages_sharing, n / 2);
  }

  void FullScans(int n) {
    const std::uint64_t target = ksm_.GetCounters().full_scans + n;
    for (int guard = 0; ksm_.GetCounters().full_scans < target; ++guard) {
      ASSERT_LT(guard, 100000) << "scanner made no progress";
      ksm_.ScanBatch(100, /*stop_at_scan_end=*/true);
      ksm_.CheckInvariants();
    }
  }

  std::size_t CopiesFirstBreaks(std::size_t max_deferred);

  FakeMemory mem_;
  FakeClock clock_;
  Ksm ksm_;
};

// A core given memory whose pages already map frames it did not merge
// them into (a forked child's rebuilt core: the pages map its parent's
// frames, shared with the parent) leaves them so: merging them again
// copied each content into a frame of its own, doubling what the merged
// memory took while the child lived. Written, a page is a private copy
// and merges as any page.
TEST_F(KsmTest, PagesMappingFramesItDidNotMergeAreLeftShared) {
  ksm_.knobs().smart_scan = false;
  Setup(8, [](std::size_t i) -> std::uint8_t { return 10 + i % 4; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 4u);
  ASSERT_EQ(mem_.frames_live(), 4u);
  std::vector<FrameId> frames;
  for (std::size_t i = 0; i < 8; ++i) frames.push_back(mem_.FrameOf(Page(i)));
  Ksm child(&mem_, &clock_);
  child.knobs().smart_scan = false;
  child.Advise(kBase, 8);
  const std::map<Addr, std::size_t> hashed = mem_.hashes;
  auto child_scans = [&](int n) {
    const std::uint64_t target = child.GetCounters().full_scans + n;
    for (int guard = 0; child.GetCounters().full_scans < target; ++guard) {
      ASSERT_LT(guard, 1000);
      child.ScanBatch(100, /*stop_at_scan_end=*/true);
      child.CheckInvariants();
    }
  };
  child_scans(3);
  // Not even read: the backend's merge would copy each into a new frame
  // (this fake refuses frame-mapped pages instead).
  EXPECT_EQ(mem_.hashes, hashed);
  EXPECT_EQ(mem_.frames_live(), 4u) << "merged again into frames of its own";
  for (std::size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(mem_.FrameOf(Page(i)), frames[i]) << i;
    EXPECT_EQ(mem_.Read(Page(i))[0], 10 + i % 4) << i;
  }
  EXPECT_EQ(child.GetCounters().pages_sharing, 0u);
  // Pages 0 and 1 written alike: private copies, merged by the child.
  mem_.Write(Page(0), 0x77);
  mem_.Write(Page(1), 0x77);
  child_scans(2);
  ASSERT_TRUE(mem_.MapsFrame(Page(0)));
  EXPECT_EQ(mem_.FrameOf(Page(0)), mem_.FrameOf(Page(1)));
  EXPECT_NE(mem_.FrameOf(Page(0)), frames[0]);
  EXPECT_EQ(child.GetCounters().pages_sharing, 1u);
  EXPECT_EQ(mem_.Read(Page(4))[0], 10);
  EXPECT_TRUE(child.UnmergeAll());
}

TEST_F(KsmTest, TenIdenticalPagesMergeIntoOne) {
  Setup(10, [](std::size_t) { return 0x2a; });
  FullScans(1);
  // First visits only record checksums.
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 0u);
  FullScans(1);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 9u);
  EXPECT_EQ(c.pages_unshared, 0u);
  EXPECT_EQ(c.pages_volatile, 0u);
  EXPECT_EQ(c.rmap_items, 10u);
  EXPECT_EQ(mem_.frames_live(), 1u);
  for (std::size_t i = 0; i < 10; ++i) {
    EXPECT_TRUE(mem_.MapsFrame(Page(i)));
    EXPECT_EQ(mem_.Read(Page(i))[100], 0x2a);
  }
  EXPECT_EQ(c.general_profit,
            std::int64_t(9 * kPageSize) - 10 * std::int64_t(Ksm::kItemBytes));
}

TEST_F(KsmTest, WrittenPagesLeaveAndTheFrameIsReleased) {
  Setup(2, [](std::size_t) { return 7; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_shared, 1u);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 1u);
  mem_.Write(Page(0), 1);
  mem_.Write(Page(1), 2);
  FullScans(1);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 0u);
  EXPECT_EQ(c.pages_sharing, 0u);
  EXPECT_EQ(mem_.frames_live(), 0u);
  EXPECT_EQ(mem_.frames_released(), 1u);
  EXPECT_EQ(mem_.Read(Page(0))[0], 1);
  EXPECT_EQ(mem_.Read(Page(1))[0], 2);
}

TEST_F(KsmTest, ZeroPagesMergeLikeAnyOtherWithoutUseZeroPages) {
  Setup(10, [](std::size_t) { return 0; });
  FullScans(2);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 9u);
  EXPECT_EQ(c.ksm_zero_pages, 0u);
}

TEST_F(KsmTest, ZeroPagesDropToTheZeroPageWithUseZeroPages) {
  ksm_.knobs().use_zero_pages = true;
  Setup(10, [](std::size_t) { return 0; });
  FullScans(2);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 0u);
  EXPECT_EQ(c.pages_sharing, 0u);
  EXPECT_EQ(c.ksm_zero_pages, 10u);
  EXPECT_EQ(mem_.frames_live(), 0u);
  for (std::size_t i = 0; i < 10; ++i) EXPECT_FALSE(mem_.IsPresent(Page(i)));
  // As in the kernel, whose scanner keeps no rmap_item for a page mapping
  // the zero page: no item counted, none charged, none volatile.
  EXPECT_EQ(c.rmap_items, 0u);
  EXPECT_EQ(c.pages_volatile, 0u);
  EXPECT_EQ(c.general_profit, std::int64_t(10 * kPageSize));
  EXPECT_EQ(ksm_.GetSpaceStat().rmap_items, 0u);
  // A write brings the page back as an ordinary one, with an item again.
  mem_.Write(Page(3), 5);
  FullScans(1);
  c = ksm_.GetCounters();
  EXPECT_EQ(c.ksm_zero_pages, 9u);
  EXPECT_EQ(c.rmap_items, 1u);
  EXPECT_EQ(c.pages_volatile, 1u);
  EXPECT_EQ(c.general_profit,
            std::int64_t(9 * kPageSize) - std::int64_t(Ksm::kItemBytes));
}

TEST_F(KsmTest, PagesThatStopBeingZeroStillMergeWithUseZeroPages) {
  // A page that was all zeros at its last visit goes to the zero page
  // without a second hash; if it was written meanwhile, its new content must
  // be remembered, so that it merges like any other page later.
  ksm_.knobs().use_zero_pages = true;
  Setup(4, [](std::size_t) { return 0; });
  FullScans(1);  // all four remembered as zero pages' content
  for (std::size_t i = 0; i < 4; ++i) mem_.Write(Page(i), 0x42);
  FullScans(1);  // not dropped: they are not zeros any more
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.ksm_zero_pages, 0u);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_TRUE(mem_.IsPresent(Page(i)));
  FullScans(1);  // unchanged since the last visit: merged
  c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 3u);
  EXPECT_EQ(c.ksm_zero_pages, 0u);
}

// A first visit takes a page whose sampled lines are zero for zeros
// (FakeMemory guesses as LinuxMemory does). Such a page with bytes
// between the sampled lines, from the start or written after that visit,
// is never dropped: it merges with its twin once hashed in full, a scan
// later than a page read in full at its first visit.
TEST_F(KsmTest, BytesPastTheSampledLinesKeepAPageFromTheZeroPage) {
  ASSERT_TRUE(mem_.guesses_zero_from_samples);
  ksm_.knobs().use_zero_pages = true;
  PageBytes sparse{};
  sparse[100] = 7;  // not in a sampled line
  ASSERT_TRUE(SampledLinesZero(sparse.data()));
  // Pages 0..3 zeros; 4 and 5 sparse from the start; 1 and 3 written
  // sparse after the first visit.
  Setup(6, [](std::size_t) { return 0; });
  mem_.WriteBytes(Page(4), sparse);
  mem_.WriteBytes(Page(5), sparse);
  FullScans(1);
  mem_.WriteBytes(Page(1), sparse);
  mem_.WriteBytes(Page(3), sparse);
  for (int scan = 0; scan < 2; ++scan) {
    FullScans(1);
    EXPECT_EQ(ksm_.GetCounters().ksm_zero_pages, 2u);
    for (std::size_t i : {1, 3, 4, 5}) {
      EXPECT_TRUE(mem_.IsPresent(Page(i))) << i;
      EXPECT_EQ(mem_.Read(Page(i)), sparse) << i;
    }
    EXPECT_EQ(mem_.Read(Page(0)), PageBytes{});
    EXPECT_EQ(mem_.Read(Page(2)), PageBytes{});
  }
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 3u);
  for (std::size_t i : {1, 3, 4, 5}) EXPECT_TRUE(mem_.MapsFrame(Page(i))) << i;
}

TEST_F(KsmTest, MaxPageSharingBuildsChainsOfDups) {
  Setup(600, [](std::size_t) { return 0x55; });
  FullScans(2);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 3u);
  EXPECT_EQ(c.pages_sharing, 597u);
  EXPECT_EQ(c.stable_node_chains, 1u);
  EXPECT_EQ(c.stable_node_dups, 3u);
  EXPECT_EQ(mem_.frames_live(), 3u);
}

// A run of identical pages takes as many frames as the kernel's dups would
// (ceil(pages / max_page_sharing)), laid out so that consecutive pages map
// consecutive frames: page i on frame i mod F, one mapping call per F pages.
TEST_F(KsmTest, RunsOfIdenticalPagesMapConsecutiveFrames) {
  ksm_.knobs().max_page_sharing = 64;
  constexpr std::size_t kPages = 1000;  // two runs: 600 of 0x11, 400 of 0x22
  Setup(kPages, [](std::size_t i) { return i < 600 ? 0x11 : 0x22; });
  for (int scan = 0; scan < 2; ++scan) {  // whole runs in each batch
    const std::uint64_t target = ksm_.GetCounters().full_scans + 1;
    for (int guard = 0; ksm_.GetCounters().full_scans < target; ++guard) {
      ASSERT_LT(guard, 10);
      ksm_.ScanBatch(kPages, /*stop_at_scan_end=*/true);
      ksm_.CheckInvariants();
    }
  }
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 10u + 7u);  // ceil(600/64), ceil(400/64)
  EXPECT_EQ(c.pages_sharing, kPages - 17u);
  EXPECT_EQ(c.stable_node_chains, 2u);
  EXPECT_EQ(c.stable_node_dups, 17u);
  EXPECT_EQ(mem_.frames_live(), 17u);
  std::map<FrameId, std::size_t> sharers;
  std::size_t breaks = 0;
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(mem_.MapsFrame(Page(i))) << i;
    EXPECT_EQ(mem_.Read(Page(i))[0], i < 600 ? 0x11 : 0x22) << i;
    ++sharers[mem_.FrameOf(Page(i))];
    if (i + 1 < kPages && mem_.FrameOf(Page(i + 1)) != mem_.FrameOf(Page(i)) + 1) ++breaks;
  }
  for (const auto& [frame, n] : sharers) EXPECT_LE(n, 64u) << frame;
  // One break per F pages of each run, not one per page.
  EXPECT_LE(breaks, 600u / 10 + 400u / 7 + 2);
  // Writes still copy, and the layout survives rescans.
  mem_.Write(Page(300), 0x33);
  FullScans(2);
  EXPECT_EQ(mem_.Read(Page(300))[0], 0x33);
  EXPECT_EQ(mem_.Read(Page(301))[0], 0x11);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, kPages - 17u - 1u);
}

// use_zero_pages = 0 (the default): zero pages merge as the kernel counts
// them, in KSM pages of zeros of max_page_sharing sharers each, but they
// map no frame: they go back to the zero page, costing no memory and no
// mapping of their own wherever they lie.
TEST_F(KsmTest, ZeroContentMergesWithoutFrames) {
  constexpr std::size_t kPages = 1200;  // every other page zero
  Setup(kPages, [](std::size_t i) { return i % 2 == 0 ? 0 : 1 + i % 200; });
  FullScans(2);
  Counters c = ksm_.GetCounters();
  // 600 zero pages: ceil(600 / 256) = 3 nodes; the 600 others are 100
  // values of 6 pages, 100 nodes.
  EXPECT_EQ(c.pages_shared, 3u + 100u);
  EXPECT_EQ(c.pages_sharing, 597u + 500u);
  EXPECT_EQ(c.ksm_zero_pages, 0u);
  EXPECT_EQ(c.stable_node_chains, 1u);
  EXPECT_EQ(c.stable_node_dups, 3u);
  EXPECT_EQ(mem_.frames_live(), 100u);  // none for the zeros
  for (std::size_t i = 0; i < kPages; i += 2) {
    ASSERT_FALSE(mem_.IsPresent(Page(i))) << i;
    ASSERT_EQ(mem_.Read(Page(i))[0], 0) << i;
  }
  // A write lands in a page of its own; the rest stay merged.
  mem_.Write(Page(10), 7);
  FullScans(2);
  c = ksm_.GetCounters();
  EXPECT_EQ(mem_.Read(Page(10))[0], 7);
  EXPECT_EQ(mem_.Read(Page(12))[0], 0);
  EXPECT_EQ(c.pages_shared + c.pages_sharing, 599u + 600u);
  // Unmerging leaves them zero.
  ASSERT_TRUE(ksm_.UnmergeAll());
  for (std::size_t i = 12; i < kPages; i += 2) ASSERT_EQ(mem_.Read(Page(i))[0], 0) << i;
  EXPECT_EQ(ksm_.GetCounters().pages_shared, 0u);
}

// The background scanner at pages_to_scan = 100: a run of identical pages
// spans many batches, so its merges wait for the run to end (carry_runs)
// and it is laid out as a whole, not a mapping per page.
class KsmCarryTest : public KsmTest {
 protected:
  // Full scans in batches of 100 pages, as the background scanner makes
  // them; `between` runs after every batch.
  template <typename F>
  void CarriedScans(int n, F between) {
    const std::uint64_t target = ksm_.GetCounters().full_scans + n;
    for (int guard = 0; ksm_.GetCounters().full_scans < target; ++guard) {
      ASSERT_LT(guard, 100000) << "scanner made no progress";
      ksm_.ScanBatch(100, /*stop_at_scan_end=*/false, /*carry_runs=*/true);
      ksm_.CheckInvariants();
      between();
      if (HasFatalFailure()) return;
    }
  }
  // Two full scans of n identical pages; `f` runs once, half-way through
  // the second, while the run's merges wait. False if that never came.
  template <typename F>
  bool MidRun(std::size_t n, F f) {
    bool ran = false;
    CarriedScans(2, [&] {
      const Counters c = ksm_.GetCounters();
      if (ran || c.full_scans != 1 || c.pages_scanned < n + n / 2) return;
      ran = true;
      ASSERT_EQ(c.pages_sharing, 0u) << "the run's merges were not waiting";
      f();
    });
    return ran;
  }
  // Places where page i + 1 does not map the frame after page i's.
  std::size_t Breaks(std::size_t n) {
    std::size_t breaks = 0;
    for (std::size_t i = 0; i + 1 < n; ++i) {
      if (!mem_.MapsFrame(Page(i)) || !mem_.MapsFrame(Page(i + 1)) ||
          mem_.FrameOf(Page(i + 1)) != mem_.FrameOf(Page(i)) + 1) {
        ++breaks;
      }
    }
    return breaks;
  }
};

TEST_F(KsmCarryTest, RunsLongerThanABatchMapConsecutiveFrames) {
  ksm_.knobs().max_page_sharing = 64;
  constexpr std::size_t kPages = 3000;
  Setup(kPages, [](std::size_t) { return 0x11; });
  bool waited = false;
  CarriedScans(2, [&] {
    const Counters c = ksm_.GetCounters();
    if (c.full_scans == 1 && c.pages_sharing == 0 && c.pages_scanned < 2 * kPages) {
      waited = true;
      // Nothing merged yet: the nodes that waiting plans made are not shown.
      EXPECT_EQ(c.stable_node_dups, 0u);
      EXPECT_EQ(c.stable_node_chains, 0u);
      EXPECT_EQ(c.pages_shared, 0u);
    }
  });
  EXPECT_TRUE(waited) << "the run's merges were done batch by batch";
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 47u);  // ceil(3000 / 64), as the kernel's dups
  EXPECT_EQ(c.pages_sharing, kPages - 47u);
  EXPECT_EQ(c.stable_node_dups, 47u);
  EXPECT_EQ(mem_.frames_live(), 47u);
  // A mapping per 47 pages (64 of them), not one per page.
  EXPECT_LE(Breaks(kPages), 64u + 1u);
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_EQ(mem_.Read(Page(i))[0], 0x11) << i;
}

// A run whose merges were done part-way (FinishPlans: a knob write, an
// unmap) goes on by topping up its part-used nodes; the rest of it is
// still laid over consecutive frames.
TEST_F(KsmCarryTest, ARunThatTopsUpNodesStripesTheRest) {
  ksm_.knobs().max_page_sharing = 64;
  constexpr std::size_t kPages = 3000;
  Setup(kPages, [](std::size_t) { return 0x11; });
  CarriedScans(1, [] {});
  ksm_.ScanBatch(1000, /*stop_at_scan_end=*/false, /*carry_runs=*/true);
  ksm_.FinishPlans();
  // 1000 pages over ceil(1000 / 64) = 16 nodes of 62-63 sharers each.
  ASSERT_EQ(ksm_.GetCounters().pages_shared, 16u);
  CarriedScans(1, [] {});
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 47u);  // ceil(3000 / 64)
  EXPECT_EQ(c.pages_sharing, kPages - 47u);
  std::size_t breaks = 0;
  for (std::size_t i = 1000; i + 1 < kPages; ++i) {
    ASSERT_TRUE(mem_.MapsFrame(Page(i))) << i;
    if (mem_.FrameOf(Page(i + 1)) != mem_.FrameOf(Page(i)) + 1) ++breaks;
  }
  // The 24 pages that fill the 16 nodes up, then a mapping per 31 pages
  // (ceil(1976 / 64) frames), 64 of them.
  EXPECT_LE(breaks, 24u + 64u + 2u);
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_EQ(mem_.Read(Page(i))[0], 0x11) << i;
}

// Past kCarryPlans the run's merges are done where its last node is full,
// so the next part starts on fresh nodes instead of filling a part-used one
// a page at a time.
TEST_F(KsmCarryTest, ALongRunIsCutWhereANodeIsFull) {
  ksm_.knobs().max_page_sharing = 64;
  constexpr std::size_t kPages = 20000;
  static_assert(kPages > 2 * Ksm::kCarryPlans);
  Setup(kPages, [](std::size_t) { return 0x22; });
  CarriedScans(2, [] {});
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 313u);  // ceil(20000 / 64)
  EXPECT_EQ(c.pages_sharing, kPages - 313u);
  EXPECT_EQ(mem_.frames_live(), 313u);
  // Three parts, each a mapping per 64 pages; a cut inside a node would
  // add a mapping for every page that tops that node up.
  EXPECT_LE(Breaks(kPages), 3u * 64u + 3u);
}

// Waiting merges never touch pages that were unadvised or forgotten since.
TEST_F(KsmCarryTest, WaitingMergesOfUnadvisedPagesAreDropped) {
  constexpr std::size_t kPages = 2000;
  Setup(kPages, [](std::size_t) { return 0x33; });
  ASSERT_TRUE(MidRun(kPages, [&] {
    // Unadvise the first half, forget (as if unmapped) a stretch of the
    // second.
    ASSERT_TRUE(ksm_.Unadvise(kBase, 1000));
    mem_.Unmap(Page(1000), 100);
    ksm_.Forget(Page(1000), 100);
    ksm_.CheckInvariants();
    for (std::size_t i = 0; i < 1000; ++i) {
      ASSERT_FALSE(mem_.MapsFrame(Page(i))) << i;
      ASSERT_EQ(mem_.Read(Page(i))[0], 0x33) << i;
    }
  }));
  CarriedScans(1, [] {});
  for (std::size_t i = 0; i < 1000; ++i) ASSERT_FALSE(mem_.MapsFrame(Page(i))) << i;
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared + c.pages_sharing, kPages - 1100u);
  EXPECT_EQ(c.pages_shared, 4u);  // ceil(900 / 256)
}

TEST_F(KsmCarryTest, UnmergeAllDropsWaitingMerges) {
  constexpr std::size_t kPages = 2000;
  Setup(kPages, [](std::size_t) { return 0x44; });
  ASSERT_TRUE(MidRun(kPages, [&] {
    ASSERT_TRUE(ksm_.UnmergeAll());
    EXPECT_EQ(mem_.pages_mapping_frames(), 0u);
    EXPECT_EQ(ksm_.GetCounters().rmap_items, 0u);
  }));
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_EQ(mem_.Read(Page(i))[0], 0x44) << i;
}

// A scan the caller asks for (no carry) has done its merges on return, and
// so does FinishPlans for the background scanner's.
TEST_F(KsmCarryTest, FinishPlansDoesTheWaitingMerges) {
  constexpr std::size_t kPages = 2000;
  Setup(kPages, [](std::size_t) { return 0x55; });
  FullScans(1);
  ksm_.ScanBatch(1000, /*stop_at_scan_end=*/false, /*carry_runs=*/true);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 0u);  // waiting for the run
  ksm_.FinishPlans();
  ksm_.CheckInvariants();
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 1000u - 4u);  // 4 dups
  ksm_.ScanBatch(500);
  ksm_.CheckInvariants();
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 1500u - 6u);
}

TEST_F(KsmTest, LowerMaxPageSharingLeavesALoneRemainder) {
  ksm_.knobs().max_page_sharing = 4;
  Setup(9, [](std::size_t) { return 3; });
  FullScans(2);
  Counters c = ksm_.GetCounters();
  // 4 + 4 merged; the ninth has nobody left to pair with.
  EXPECT_EQ(c.pages_shared, 2u);
  EXPECT_EQ(c.pages_sharing, 6u);
  EXPECT_EQ(c.pages_unshared, 1u);
}

// As the kernel's ksm_pages_unshared: the last scan's unstable entries
// count until their pages are visited again, not only until the next scan
// begins.
TEST_F(KsmTest, UnsharedPagesCountUntilRevisited) {
  Setup(4, [](std::size_t i) { return static_cast<std::uint8_t>(i + 1); });
  FullScans(2);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_unshared, 4u);
  EXPECT_EQ(c.pages_volatile, 0u);
  // The next scan's first two visits find their pages changed: only they
  // leave the count.
  mem_.Write(Page(0), 7);
  mem_.Write(Page(1), 8);
  ksm_.ScanBatch(2, /*stop_at_scan_end=*/true);
  ksm_.CheckInvariants();
  c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_unshared, 2u);
  EXPECT_EQ(c.pages_volatile, 2u);
  // The other two, unchanged, go into the new scan's index: still counted.
  ksm_.ScanBatch(2, /*stop_at_scan_end=*/true);
  ksm_.CheckInvariants();
  c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_unshared, 2u);
  EXPECT_EQ(c.pages_volatile, 2u);
  EXPECT_EQ(c.rmap_items, 4u);
}

// Pairs in runs (page i = page i + n/2): in the second scan each first
// copy waits in the unstable index on its last visit's hash, unread, and
// its second copy pairs with it on its own: the merge's compare reads
// both and checks that they still have that hash. Each page is read once
// in the first scan and not again (where the backend checks in its
// compare; else the pair's p is read first).
TEST_F(KsmTest, FirstCopiesWaitInTheIndexUnread) {
  for (const bool backend_checks : {true, false}) {
    SCOPED_TRACE(backend_checks ? "checked in the compare" : "p read first");
    FakeMemory mem;
    mem.checks_expected_in_compare = backend_checks;
    Ksm ksm(&mem, &clock_);
    constexpr std::size_t kPages = 200;
    mem.Map(kBase, kPages);
    for (std::size_t i = 0; i < kPages; ++i)
      mem.Write(Page(i), static_cast<std::uint8_t>(1 + i % (kPages / 2)));
    ksm.Advise(kBase, kPages);
    auto scans = [&](int n) { FullScansOf(ksm, n); };
    scans(1);
    for (std::size_t i = 0; i < kPages; ++i)
      ASSERT_EQ(mem.hashes.at(Page(i)), 1u);
    // A first copy that changes since its last visit is not merged: the
    // compare finds it different, and it takes its new content's hash.
    mem.Write(Page(3), 0xee);
    scans(1);
    EXPECT_EQ(ksm.GetCounters().pages_sharing, kPages / 2 - 1);
    for (std::size_t i = 0; i < kPages; ++i) {
      if (i % (kPages / 2) == 3) continue;
      ASSERT_TRUE(mem.MapsFrame(Page(i))) << i;
      EXPECT_EQ(mem.Read(Page(i))[0], 1 + i % (kPages / 2)) << i;
      // Where the backend cannot check in its compare, the second copy
      // (the pair's p) is read before the merge.
      if (backend_checks || i < kPages / 2) {
        EXPECT_EQ(mem.hashes.at(Page(i)), 1u) << "read again: page " << i;
      }
    }
    EXPECT_FALSE(mem.MapsFrame(Page(3)));
    EXPECT_FALSE(mem.MapsFrame(Page(3 + kPages / 2)));
    EXPECT_EQ(mem.Read(Page(3))[0], 0xee);
    // Written back, page 3 merges with its twin.
    mem.Write(Page(3), 1 + 3);
    scans(2);
    EXPECT_EQ(ksm.GetCounters().pages_sharing, kPages / 2);
    EXPECT_TRUE(mem.MapsFrame(Page(3)));
  }
}

// Two pages that were alike at their last visits and were rewritten alike
// since are not merged in the scan that pairs them unread: the merge finds
// their content no longer has the hash both had (the kernel merges only
// pages unchanged between two visits). The next scan, which finds them
// unchanged, merges them.
TEST_F(KsmTest, PagesRewrittenAlikeWaitAScan) {
  for (const bool backend_checks : {true, false}) {
    SCOPED_TRACE(backend_checks ? "checked in the compare" : "p read first");
    FakeMemory mem;
    mem.checks_expected_in_compare = backend_checks;
    Ksm ksm(&mem, &clock_);
    ksm.knobs().smart_scan = false;
    mem.Map(kBase, 4);
    const std::uint8_t fill[4] = {0x11, 0x21, 0x11, 0x31};
    for (std::size_t i = 0; i < 4; ++i) mem.Write(Page(i), fill[i]);
    ksm.Advise(kBase, 4);
    auto scans = [&](int n) { FullScansOf(ksm, n); };
    scans(1);
    mem.Write(Page(0), 0x99);
    mem.Write(Page(2), 0x99);
    scans(1);
    EXPECT_FALSE(mem.MapsFrame(Page(0)));
    EXPECT_FALSE(mem.MapsFrame(Page(2)));
    EXPECT_EQ(ksm.GetCounters().pages_sharing, 0u);
    EXPECT_EQ(ksm.GetCounters().pages_volatile, 2u);
    scans(1);
    EXPECT_TRUE(mem.MapsFrame(Page(0)));
    EXPECT_EQ(mem.FrameOf(Page(0)), mem.FrameOf(Page(2)));
    EXPECT_EQ(ksm.GetCounters().pages_sharing, 1u);
    EXPECT_EQ(mem.Read(Page(0))[0], 0x99);
    EXPECT_EQ(mem.Read(Page(2))[0], 0x99);
    // A third copy of the content, found by its hash, joins the node.
    mem.Write(Page(1), 0x99);
    scans(2);
    EXPECT_EQ(mem.FrameOf(Page(1)), mem.FrameOf(Page(0)));
    EXPECT_EQ(ksm.GetCounters().pages_sharing, 2u);
  }
}

// Pages new at their last visit with nothing to pair with wait in the
// index unread (counted in pages_unshared), and are read at the scan's end
// within the batch's budget: those changed since leave the count.
TEST_F(KsmTest, UnreadIndexPagesAreReadAtTheScansEndWithinTheBudget) {
  Setup(4, [](std::size_t i) { return static_cast<std::uint8_t>(i + 1); });
  FullScans(1);
  auto hash_calls = [&] {
    std::size_t n = 0;
    for (const auto& [page, calls] : mem_.hashes) n += calls;
    return n;
  };
  const std::size_t reads = hash_calls();
  mem_.Write(Page(0), 7);
  mem_.Write(Page(1), 8);
  ksm_.ScanBatch(4, /*stop_at_scan_end=*/true);
  ksm_.CheckInvariants();
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(hash_calls(), reads);  // four visits, no read
  EXPECT_EQ(c.pages_unshared, 4u);
  EXPECT_EQ(c.full_scans, 1u);
  ksm_.ScanBatch(1, /*stop_at_scan_end=*/true);
  ksm_.CheckInvariants();
  EXPECT_EQ(hash_calls(), reads + 1);
  EXPECT_EQ(ksm_.GetCounters().full_scans, 1u);  // not ended yet
  ksm_.ScanBatch(4, /*stop_at_scan_end=*/true);
  ksm_.CheckInvariants();
  c = ksm_.GetCounters();
  EXPECT_EQ(hash_calls(), reads + 4);
  EXPECT_EQ(c.full_scans, 2u);
  EXPECT_EQ(c.pages_unshared, 2u);
  EXPECT_EQ(c.pages_volatile, 2u);
  // The next scan reads the two unchanged ones at their visits and puts
  // the two changed ones in the index unread again.
  FullScans(1);
  c = ksm_.GetCounters();
  EXPECT_EQ(hash_calls(), reads + 4 + 2 + 2);
  EXPECT_EQ(c.pages_unshared, 4u);
  EXPECT_EQ(c.pages_volatile, 0u);
}

TEST_F(KsmTest, ChangingPagesAreNotMerged) {
  Setup(4, [](std::size_t) { return 9; });
  FullScans(1);
  // Content changes between visits: checksum differs, so nothing merges.
  for (std::size_t i = 0; i < 4; ++i) mem_.Write(Page(i), 10);
  FullScans(1);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 0u);
  EXPECT_EQ(ksm_.GetCounters().pages_volatile, 4u);
  FullScans(1);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 3u);
}

// A run of identical pages with copies elsewhere, before it, after it, or in
// a second run: each run is laid out over consecutive frames, and the lone
// copies join the run's nodes (before, one joining the run's last node kept
// the whole run from being laid out: a mapping per page).
struct RunCopies {
  const char* name;
  std::vector<std::size_t> copies;  // pages of 0x11 besides the run 100..699
};
void PrintTo(const RunCopies& c, std::ostream* os) { *os << c.name; }
class KsmRunCopiesTest : public KsmTest,
                         public ::testing::WithParamInterface<RunCopies> {};

TEST_P(KsmRunCopiesTest, RunsMapInRunsAndCopiesJoin) {
  ksm_.knobs().max_page_sharing = 64;
  constexpr std::size_t kPages = 1000;
  const std::vector<std::size_t>& copies = GetParam().copies;
  auto is_11 = [&](std::size_t i) {
    return (i >= 100 && i < 700) ||
           std::find(copies.begin(), copies.end(), i) != copies.end();
  };
  Setup(kPages, [&](std::size_t i) { return is_11(i) ? 0x11 : 0x22; });
  for (int scan = 0; scan < 2; ++scan) {
    const std::uint64_t target = ksm_.GetCounters().full_scans + 1;
    for (int guard = 0; ksm_.GetCounters().full_scans < target; ++guard) {
      ASSERT_LT(guard, 10);
      ksm_.ScanBatch(kPages, /*stop_at_scan_end=*/true);
      ksm_.CheckInvariants();
    }
  }
  std::size_t breaks = 0, allowed = 0, runs = 0;
  for (std::size_t i = 0; i < kPages;) {
    // A run of g pages alike maps as ceil(g / F) pieces over F = ceil(g / 64)
    // consecutive frames (page k on frame k mod F), not as g mappings.
    std::size_t j = i;
    while (j < kPages && is_11(j) == is_11(i)) ++j;
    const std::size_t g = j - i, f = (g + 63) / 64;
    allowed += g / f + 1;
    ++runs;
    for (std::size_t k = i; k < j; ++k) {
      ASSERT_TRUE(mem_.MapsFrame(Page(k))) << k;
      EXPECT_EQ(mem_.Read(Page(k))[0], is_11(k) ? 0x11 : 0x22) << k;
      if (k + 1 < j && mem_.FrameOf(Page(k + 1)) != mem_.FrameOf(Page(k)) + 1) ++breaks;
    }
    i = j;
  }
  EXPECT_LE(breaks, allowed);
  // Every page merged; each run has frames of its own, so at most one more
  // frame per run than the kernel's ceil(copies / max_page_sharing).
  const std::size_t n11 = 600 + copies.size(), n22 = kPages - n11;
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared + c.pages_sharing, kPages);
  EXPECT_GE(c.pages_shared, (n11 + 63) / 64 + (n22 + 63) / 64);
  EXPECT_LE(c.pages_shared, (n11 + 63) / 64 + (n22 + 63) / 64 + runs);
}

INSTANTIATE_TEST_SUITE_P(
    Copies, KsmRunCopiesTest,
    ::testing::Values(RunCopies{"After", {999}}, RunCopies{"Before", {5}},
                      RunCopies{"BothSides", {5, 42, 950}},
                      RunCopies{"SecondRun", {800, 801, 802, 803, 804, 805, 806, 807,
                                              808, 809, 810, 811, 812, 813, 814, 815}}),
    [](const ::testing::TestParamInfo<RunCopies>& info) { return info.param.name; });

// 2 n pages: page i < n holds content i, and so does one page of the upper
// half, at a shuffled place (`shuffled`) or at n + i.
std::vector<std::size_t> TwinKeys(std::size_t n, bool shuffled) {
  std::vector<std::size_t> key(2 * n);
  for (std::size_t i = 0; i < n; ++i) key[i] = key[n + i] = i;
  if (shuffled) std::shuffle(key.begin() + n, key.end(), std::mt19937(3));
  return key;
}

PageBytes KeyBytes(std::size_t key) {
  PageBytes b{};
  std::memcpy(b.data(), &key, sizeof key);
  b[kPageSize - 1] = 1;  // never zeros, nor taken for zeros from a sample
  return b;
}

// Pairs whose partners lie scattered wait for each other within a batch,
// and across batches of the background scanner (carry_runs), so that the
// backend gets them in one call and can merge them in address order
// (LinuxMemory::MergeScatteredPairs); pairs in runs still go every few
// hundred plans, while their pages are in the CPU's caches, and so do all
// pairs where the backend does not ask for them together.
TEST_F(KsmTest, ScatteredPairsWaitForEachOther) {
  constexpr std::size_t kPairs = 1000;
  struct Case {
    bool shuffled;
    std::size_t batch;
    bool carry;
    bool wanted = true;
  };
  // A batch of a whole scan: its 2 * kPairs visits and, at its end, the
  // reads of the first copies that went into the index unread.
  constexpr std::size_t kScan = 3 * kPairs + 1;
  for (const Case c :
       {Case{true, kScan, false}, Case{false, kScan, false},
        Case{true, kPairs / 3, true}, Case{true, kScan, false, false}}) {
    const bool shuffled = c.shuffled;
    SCOPED_TRACE(std::string(shuffled ? "scattered" : "in runs") +
                 ", batches of " + std::to_string(c.batch) +
                 (c.wanted ? "" : ", not wanted together"));
    FakeMemory mem;
    mem.scattered_together = c.wanted;
    Ksm ksm(&mem, &clock_);
    const std::vector<std::size_t> key = TwinKeys(kPairs, shuffled);
    const Addr base = kBase;
    mem.Map(base, 2 * kPairs);
    for (std::size_t i = 0; i < 2 * kPairs; ++i)
      mem.WriteBytes(base + i * kPageSize, KeyBytes(key[i]));
    ksm.Advise(base, 2 * kPairs);
    // Two full scans: the first hashes, the second merges.
    for (int guard = 0; ksm.GetCounters().full_scans < 2; ++guard) {
      ASSERT_LT(guard, 100);
      ksm.ScanBatch(c.batch, /*stop_at_scan_end=*/true, c.carry);
      ksm.CheckInvariants();
    }
    EXPECT_EQ(ksm.GetCounters().pages_sharing, kPairs);
    for (std::size_t i = 0; i < 2 * kPairs; ++i) {
      ASSERT_TRUE(mem.MapsFrame(base + i * kPageSize)) << i;
      ASSERT_EQ(mem.Read(base + i * kPageSize), KeyBytes(key[i])) << i;
    }
    std::size_t handed = 0;
    for (std::size_t n : mem.pair_calls) handed += n;
    EXPECT_EQ(handed, kPairs);
    if (shuffled && c.wanted) {
      EXPECT_EQ(mem.pair_calls.size(), 1u);
    } else {
      EXPECT_GT(mem.pair_calls.size(), 1u);
    }
  }
}

// The progress hook shows merges as they are done and a full scan as it
// ends, within the batch that does them: a reader of the counters (the
// engine publishes them there) is not kept waiting for the rest of the
// batch, the next scan's start and its pages.
TEST_F(KsmTest, ProgressIsReportedWithinTheBatch) {
  constexpr std::size_t kPairs = 1000;
  const std::vector<std::size_t> key = TwinKeys(kPairs, /*shuffled=*/false);
  mem_.Map(kBase, 2 * kPairs);
  for (std::size_t i = 0; i < 2 * kPairs; ++i)
    mem_.WriteBytes(Page(i), KeyBytes(key[i]));
  ksm_.Advise(kBase, 2 * kPairs);
  FullScans(1);  // hashes only
  std::vector<Counters> seen;
  ksm_.SetProgressHook([&] { seen.push_back(ksm_.GetCounters()); });
  // One batch: the merging scan, and half of the next.
  ksm_.ScanBatch(3 * kPairs);
  ASSERT_EQ(ksm_.GetCounters().pages_scanned, 5 * kPairs);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, kPairs);
  // Merges are shown while their scan goes on ...
  auto merging = std::find_if(seen.begin(), seen.end(), [](const Counters& c) {
    return c.pages_sharing != 0;
  });
  ASSERT_NE(merging, seen.end());
  EXPECT_EQ(merging->full_scans, 1u);
  EXPECT_LT(merging->pages_scanned, 4 * kPairs);
  // ... and all of them, with the scan's end, before the next scan's first
  // page.
  auto ended = std::find_if(seen.begin(), seen.end(), [](const Counters& c) {
    return c.full_scans == 2;
  });
  ASSERT_NE(ended, seen.end());
  EXPECT_EQ(ended->pages_sharing, kPairs);
  EXPECT_EQ(ended->pages_scanned, 4 * kPairs);
}

// The advised ranges within a window, as every mapping call asks them: the
// ranges that meet it, clipped to it, adjacent ones joined; the same as
// clipping the whole list, for any window.
TEST_F(KsmTest, AdvisedRangesWithinAWindowAreClippedAndJoined) {
  ksm_.Advise(kBase, 4);
  ksm_.Advise(Page(4), 4);  // a range of its own, adjacent: joined
  ksm_.Advise(Page(10), 2);
  ksm_.Advise(Page(20), 1);
  using Ranges = std::vector<std::pair<Addr, std::size_t>>;
  EXPECT_EQ(ksm_.AdvisedRanges(Page(2), Page(11)),
            (Ranges{{Page(2), 6}, {Page(10), 1}}));
  EXPECT_EQ(ksm_.AdvisedRanges(Page(8), Page(10)), Ranges{});
  EXPECT_EQ(ksm_.AdvisedRanges(Page(20), Page(21)), (Ranges{{Page(20), 1}}));
  EXPECT_EQ(ksm_.AdvisedRanges(0, Page(1)), (Ranges{{kBase, 1}}));
  const Ranges all = ksm_.AdvisedRanges();
  ASSERT_EQ(all, (Ranges{{kBase, 8}, {Page(10), 2}, {Page(20), 1}}));
  for (std::size_t from = 0; from < 24; ++from) {
    for (std::size_t to = from; to < 24; ++to) {
      Ranges clipped;
      for (auto [a, n] : all) {
        const Addr s = std::max(Page(from), a);
        const Addr e = std::min(Page(to), a + n * kPageSize);
        if (s < e) clipped.emplace_back(s, (e - s) / kPageSize);
      }
      EXPECT_EQ(ksm_.AdvisedRanges(Page(from), Page(to)), clipped)
          << from << ".." << to;
    }
  }
}

// A large reservation advised mergeable (a runtime's heap under merge-any,
// a virtual machine's memory) takes no memory for its pages until they are
// visited, as the kernel's rmap items are made only for the pages ksmd
// finds: 64 GiB advised and split by an unadvise in the middle take less
// than 8 MiB here, where an item written for every page took 192 MiB.
TEST_F(KsmTest, AHugeAdvisedRangeTakesNoMemoryForItsUnvisitedPages) {
  constexpr std::size_t kPages = std::size_t{16} << 20;  // 64 GiB
  const long before = ResidentKiB();
  ASSERT_GT(before, 0);
  ksm_.Advise(kBase, kPages);
  ASSERT_TRUE(ksm_.Unadvise(Page(kPages / 4), kPages / 2));
  const long grown = ResidentKiB() - before;
  EXPECT_LT(grown, 8 * 1024) << "KiB resident for 64 GiB advised";
  const auto ranges = ksm_.AdvisedRanges();
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0], std::make_pair(kBase, kPages / 4));
  EXPECT_EQ(ranges[1], std::make_pair(Page(3 * kPages / 4), kPages / 4));
  EXPECT_EQ(ksm_.GetCounters().rmap_items, 0u);
  ksm_.CheckInvariants();
}

// Advice over more pages than items can be allocated for (here more than
// the address space holds) fails, as the kernel's madvise may with ENOMEM,
// and leaves that part unadvised; advice that fits still works.
TEST_F(KsmTest, AdviceWithNoRoomForItsItemsFailsAndChangesNothing) {
  EXPECT_FALSE(ksm_.Advise(kBase, std::size_t{1} << 48));
  EXPECT_TRUE(ksm_.AdvisedRanges().empty());
  ksm_.CheckInvariants();
  mem_.Map(kBase, 16);
  for (std::size_t i = 0; i < 16; ++i) mem_.Write(Page(i), 9);
  EXPECT_TRUE(ksm_.Advise(kBase, 16));
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 15u);
}

// Pages whose memory was discarded since their last visit are forgotten
// at the next one, as the kernel drops the rmap items of pages it no
// longer finds, even where whole chunks have nothing in them any more
// (those go by without a visit of each page only while no item there
// holds anything). The merged half keeps its frames.
TEST_F(KsmTest, DiscardedPagesAreForgottenAtTheirNextVisit) {
  constexpr std::size_t kPages = 2048;  // four chunks of a page table
  mem_.Map(kBase, kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    mem_.WriteBytes(Page(i), KeyBytes(i < kPages / 2 ? 0 : i));  // half unique
  }
  ksm_.Advise(kBase, kPages);
  FullScans(2);
  const Counters merged = ksm_.GetCounters();
  ASSERT_EQ(merged.pages_sharing + merged.pages_shared, kPages / 2);
  ASSERT_EQ(merged.rmap_items, kPages);
  mem_.Discard(Page(kPages / 2), kPages / 2);
  FullScans(1);
  const Counters after = ksm_.GetCounters();
  EXPECT_EQ(after.rmap_items, kPages / 2);
  EXPECT_EQ(after.pages_unshared, 0u);
  EXPECT_EQ(after.pages_volatile, 0u);
  EXPECT_EQ(after.pages_sharing, merged.pages_sharing);
  for (std::size_t i = 0; i < kPages / 2; ++i)
    ASSERT_TRUE(mem_.MapsFrame(Page(i))) << i;
}

// Merged pages whose memory was unmapped and mapped anew behind the core's
// back (absent again: no page of their own, no frame) leave their stable
// nodes at their next visit, and a node left with no page gives its frame
// back; the frames of the pages still merged stay.
TEST_F(KsmTest, MergedPagesMappedAnewLeaveTheirNodes) {
  constexpr std::size_t kPages = 1024;
  mem_.Map(kBase, kPages);
  for (std::size_t i = 0; i < kPages; ++i)
    mem_.WriteBytes(Page(i), KeyBytes(i % (kPages / 2)));  // pairs in runs
  ksm_.Advise(kBase, kPages);
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_shared, kPages / 2);
  ASSERT_EQ(mem_.frames_live(), kPages / 2);
  // Both pages of the first 100 pairs, and one page of the next 100.
  for (Addr at : {Page(0), Page(kPages / 2)}) {
    mem_.Unmap(at, 100);
    mem_.Map(at, 100);
  }
  mem_.Unmap(Page(100), 100);
  mem_.Map(Page(100), 100);
  FullScans(1);
  ksm_.CheckInvariants();
  const Counters c = ksm_.GetCounters();
  // A node left with one page stays, as a KSM page mapped once does.
  EXPECT_EQ(c.pages_shared, kPages / 2 - 100);
  EXPECT_EQ(c.pages_sharing, kPages / 2 - 200);
  EXPECT_EQ(mem_.frames_live(), kPages / 2 - 100);
  for (std::size_t i = 100; i < kPages / 2; ++i) {
    if (i >= 200) {
      ASSERT_TRUE(mem_.MapsFrame(Page(i))) << i;
    }
    ASSERT_TRUE(mem_.MapsFrame(Page(i + kPages / 2))) << i;
  }
}

// A page unmapped between the probe that found it and its first read (a
// thread of the program unmapped it meanwhile: glibc's heap trimmed under
// the scanner) leaves its item as it was before the visit, all zero, though
// smart scan had aged it; the item is counted nowhere. Until 2026-12-07 the
// age stayed behind (a never-read item that was not all zero: the
// invariant check aborted the Debug build of preload.heap_trim_test). The
// other pages merge as ever.
TEST_F(KsmTest, APageGoneBeforeItsFirstReadLeavesNothingBehind) {
  ASSERT_TRUE(ksm_.knobs().smart_scan);
  Setup(8, [](std::size_t) { return 7; });
  bool unmapped = false;
  mem_.before_read = [&](Addr a) {
    if (a == Page(3) && !unmapped) {
      unmapped = true;
      mem_.Unmap(Page(3), 1);
    }
  };
  FullScans(3);  // checks the invariants after every batch
  ASSERT_TRUE(unmapped);
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.rmap_items, 7u);
  EXPECT_EQ(c.pages_sharing + c.pages_shared, 7u);
  for (std::size_t i = 0; i < 8; ++i) {
    if (i != 3) {
      EXPECT_TRUE(mem_.MapsFrame(Page(i))) << i;
    }
  }
}

// A sparse reservation: scans probe only the chunks (512 pages) around the
// pages in use, and pass the rest, page tables without pages and items
// never written, in one question to Memory (SkipAbsent). A page that
// comes into use in a stretch passed so far is found and merged all the
// same; a chunk whose pages are all gone again is passed from then on.
TEST_F(KsmTest, ASparseRangeIsProbedOnlyWhereItHasPages) {
  constexpr std::size_t kChunk = 512, kPages = 64 * kChunk;
  mem_.Map(kBase, kPages);
  mem_.Write(Page(5 * kChunk + 3), 0x2a);
  mem_.Write(Page(40 * kChunk + 100), 0x2a);
  mem_.Write(Page(60 * kChunk), 0x17);  // unique
  ksm_.Advise(kBase, kPages);
  FullScans(2);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 1u);
  EXPECT_EQ(c.rmap_items, 3u);
  EXPECT_LE(mem_.probed_pages, 2 * 3 * kChunk) << "two scans of 3 chunks";

  mem_.Write(Page(20 * kChunk + 511), 0x2a);
  FullScans(2);
  c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_sharing, 2u) << "the new page joined";
  EXPECT_TRUE(mem_.MapsFrame(Page(20 * kChunk + 511)));

  mem_.Discard(Page(60 * kChunk), 1);
  FullScans(1);
  EXPECT_EQ(ksm_.GetCounters().rmap_items, 3u) << "the unique page forgotten";
  const std::size_t probed = mem_.probed_pages;
  FullScans(1);
  EXPECT_EQ(mem_.probed_pages - probed, 3 * kChunk) << "its chunk passed";
  for (std::size_t i : {5 * kChunk + 3, 20 * kChunk + 511, 40 * kChunk + 100})
    EXPECT_EQ(mem_.Read(Page(i))[0], 0x2a) << i;
}

// Many small ranges (every other page advised, as a program advising its
// buffers one by one) with no page in use are passed together, not probed
// one by one; a page that comes into use among them is found.
TEST_F(KsmTest, ManySmallEmptyRangesArePassedTogether) {
  constexpr std::size_t kPages = 8 * 512;
  mem_.Map(kBase, kPages);
  for (std::size_t i = 0; i < kPages; i += 2) ksm_.Advise(Page(i), 1);
  ASSERT_EQ(ksm_.AdvisedRanges().size(), kPages / 2);
  FullScans(2);
  EXPECT_EQ(mem_.probed_pages, 0u) << "nothing to probe";
  mem_.Write(Page(3000), 0x44);
  mem_.Write(Page(3002), 0x44);
  mem_.Write(Page(3001), 0x44);  // not advised
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 1u);
  EXPECT_EQ(ksm_.GetCounters().rmap_items, 2u);
  EXPECT_FALSE(mem_.MapsFrame(Page(3001)));
  EXPECT_LE(mem_.probed_pages, 2 * 2 * 512u) << "one chunk, two scans";
}

// Small ranges come and go at new addresses (buffers mapped, advised and
// unmapped): each leaves nothing behind in the core, and a range that
// shares a chunk with another keeps its own entry (CheckInvariants: every
// written item lies in a noted chunk, every noted chunk holds a range).
TEST_F(KsmTest, SmallRangesComeAndGoLeavingNothingBehind) {
  constexpr std::size_t kChunk = 512;
  for (std::size_t round = 0; round < 8; ++round) {
    const std::size_t at = round * 3 * kChunk + 100;
    mem_.Map(Page(at), 4);
    mem_.Map(Page(at + 8), 4);  // the same chunk
    for (std::size_t i = 0; i < 4; ++i) {
      mem_.Write(Page(at + i), 0x31);
      mem_.Write(Page(at + 8 + i), 0x32);
    }
    ksm_.Advise(Page(at), 4);
    ksm_.Advise(Page(at + 8), 4);
    FullScans(2);
    ASSERT_EQ(ksm_.GetCounters().pages_sharing, 6u) << round;
    mem_.Unmap(Page(at), 4);
    ksm_.Forget(Page(at), 4);
    ksm_.CheckInvariants();
    FullScans(1);
    EXPECT_EQ(ksm_.GetCounters().rmap_items, 4u) << round;
    ASSERT_TRUE(ksm_.Unadvise(Page(at + 8), 4));
    mem_.Unmap(Page(at + 8), 4);
    ksm_.CheckInvariants();
    EXPECT_EQ(ksm_.GetCounters().rmap_items, 0u) << round;
  }
}

// Deferred pairing: a page whose only partner lies scattered (a copy at a
// random place, scanned first) waits for a partner in a run, so that two
// buffers holding the same pages in order pair with each other in runs of
// frames, and the scattered copies join their nodes. Pairing each page
// with the first copy found would give the copied pages frames from the
// batch that found them, the others frames from a later batch: the runs
// of both buffers cut at every copy.
// The merging scan of three buffers, copies of a random two fifths of the
// contents at random places in the first ([0, kN): the rest unique), every
// content in order in the second and third; the places where the second
// and third buffers' frames do not follow each other. Every page merged,
// each copy with its content.
std::size_t KsmTest::CopiesFirstBreaks(std::size_t max_deferred) {
  constexpr std::size_t kN = 1024;
  ksm_.set_max_deferred_pages(max_deferred);
  std::mt19937 rng(11);
  std::vector<std::size_t> key(3 * kN);
  for (std::size_t i = 0; i < kN; ++i) {
    key[i] = rng() % 5 < 2 ? rng() % kN : 10 * kN + i;
    key[kN + i] = key[2 * kN + i] = i;
  }
  mem_.Map(kBase, 3 * kN);
  for (std::size_t i = 0; i < 3 * kN; ++i)
    mem_.WriteBytes(Page(i), KeyBytes(key[i]));
  ksm_.Advise(kBase, 3 * kN);
  FullScans(1);
  // The merging scan a buffer a batch: each batch's merges are done at its
  // end, as the background scanner's are once they stop waiting.
  for (int batch = 0; batch < 3; ++batch) {
    ksm_.ScanBatch(kN);
    ksm_.CheckInvariants();
  }
  FullScans(1);  // the scan's end: pages still waiting pair there
  std::size_t breaks = 0;
  for (std::size_t i = kN; i + 1 < 3 * kN; ++i) {
    if (i + 1 == 2 * kN) continue;
    EXPECT_TRUE(mem_.MapsFrame(Page(i))) << i;
    if (mem_.FrameOf(Page(i + 1)) != mem_.FrameOf(Page(i)) + 1) ++breaks;
  }
  std::size_t copies = 0;
  for (std::size_t i = 0; i < kN; ++i) {
    EXPECT_EQ(mem_.Read(Page(i)), KeyBytes(key[i])) << i;
    if (key[i] >= kN) continue;
    ++copies;
    EXPECT_EQ(mem_.FrameOf(Page(i)), mem_.FrameOf(Page(kN + key[i]))) << i;
  }
  for (std::size_t i = kN; i < 3 * kN; ++i)
    EXPECT_EQ(mem_.Read(Page(i)), KeyBytes(key[i])) << i;
  // Everything merged, as the kernel's pairing would have.
  EXPECT_EQ(ksm_.GetCounters().pages_shared, kN);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, kN + copies);
  return breaks;
}

// Deferred pairing: a page whose only partner lies scattered (a copy at a
// random place, scanned first) waits for a partner in a run, so that two
// buffers holding the same pages in order pair with each other in runs of
// frames, and the scattered copies join their nodes. Pairing each page
// with the first copy found would give the copied pages frames from the
// batch that found them, the others frames from a later batch: the runs
// of both buffers cut at every copy.
TEST_F(KsmTest, ScatteredCopiesDoNotCutTheRunsOfLaterCopies) {
  EXPECT_LE(CopiesFirstBreaks(Ksm::kMaxDeferredPages), 8u)
      << "the runs are cut where scattered copies are";
}

// Past the cap on waiting pages they pair as the kernel's do: the same
// merges, the runs cut.
TEST_F(KsmTest, PagesPairAtOncePastTheCapOnWaitingPages) {
  EXPECT_GT(CopiesFirstBreaks(0), 512u);
}

// A page last seen with the hash of a merged content, or of a page waiting
// in this scan's unstable index, is compared with it without being hashed
// again: of three copies of a content only the first is read on its second
// visit before the merge.
TEST_F(KsmTest, APageFindingItsContentIsNotHashedAgain) {
  Setup(12, [](std::size_t i) { return i == 0 || i == 5 || i == 9 ? 7 : 20 + i; });
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 2u);
  EXPECT_EQ(mem_.FrameOf(Page(5)), mem_.FrameOf(Page(0)));
  EXPECT_EQ(mem_.FrameOf(Page(9)), mem_.FrameOf(Page(0)));
  EXPECT_EQ(mem_.hashes[Page(0)], 2u);
  EXPECT_EQ(mem_.hashes[Page(5)], 1u);  // pairs with page 0
  EXPECT_EQ(mem_.hashes[Page(9)], 1u);  // joins their node
  EXPECT_EQ(mem_.hashes[Page(1)], 2u);  // unique: hashed at every visit
  EXPECT_EQ(mem_.Read(Page(9))[0], 7);
}

// One that changed since then fails the compare and keeps its new hash, so
// it pairs with a page of its new content at its next visit, as it would
// have had it been hashed.
TEST_F(KsmTest, APageChangedSinceItsLastVisitMergesWithItsNewContent) {
  ksm_.knobs().smart_scan = false;
  Setup(6, [](std::size_t i) -> std::uint8_t { return i == 2 ? 8 : i == 3 || i == 5 ? 30 + i : 7; });
  FullScans(1);
  mem_.Write(Page(4), 8);  // was 7, like pages 0 and 1; now like page 2
  FullScans(2);
  EXPECT_EQ(mem_.Read(Page(4))[0], 8);
  EXPECT_EQ(mem_.FrameOf(Page(0)), mem_.FrameOf(Page(1)));
  ASSERT_TRUE(mem_.MapsFrame(Page(4)));
  EXPECT_EQ(mem_.FrameOf(Page(4)), mem_.FrameOf(Page(2)));
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 2u);
}

// The same for a pair: page 1, last seen like page 0, fails to pair with it
// and pairs with page 2, whose content it now holds.
TEST_F(KsmTest, APageChangedSinceItsLastVisitPairsWithItsNewContent) {
  ksm_.knobs().smart_scan = false;
  Setup(4, [](std::size_t i) -> std::uint8_t { return i < 2 ? 7 : i == 2 ? 8 : 40; });
  FullScans(1);
  mem_.Write(Page(1), 8);
  FullScans(2);
  EXPECT_FALSE(mem_.MapsFrame(Page(0)));
  ASSERT_TRUE(mem_.MapsFrame(Page(1)));
  EXPECT_EQ(mem_.FrameOf(Page(1)), mem_.FrameOf(Page(2)));
  EXPECT_EQ(mem_.Read(Page(0))[0], 7);
  EXPECT_EQ(mem_.Read(Page(1))[0], 8);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 1u);
}

// Pages of a run planned on their old hash that changed alike since then
// must not pair up into a node indexed under the old content: the pages
// that pair up when a run is laid out are hashed first. (Were pages 2 and
// 6 paired, their node would hold 0x44 under 0x11's hash, and the 0x11
// pages laid out on it, 10 and 14, would fail to join it at every visit.)
TEST_F(KsmTest, ARunThatChangedSinceItsLastVisitStillMergesEverything) {
  ksm_.knobs().max_page_sharing = 4;
  ksm_.knobs().smart_scan = false;
  Setup(16, [](std::size_t) { return 0x11; });
  FullScans(1);
  mem_.Write(Page(2), 0x44);
  mem_.Write(Page(6), 0x44);
  for (int scan = 0; scan < 4; ++scan) {
    const std::uint64_t target = ksm_.GetCounters().full_scans + 1;
    for (int guard = 0; ksm_.GetCounters().full_scans < target; ++guard) {
      ASSERT_LT(guard, 10);
      ksm_.ScanBatch(16, /*stop_at_scan_end=*/true);  // the run in one batch
      ksm_.CheckInvariants();
    }
  }
  const Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared + c.pages_sharing, 16u);
  for (std::size_t i = 0; i < 16; ++i) {
    ASSERT_TRUE(mem_.MapsFrame(Page(i))) << i;
    EXPECT_EQ(mem_.Read(Page(i))[0], i == 2 || i == 6 ? 0x44 : 0x11) << i;
  }
  EXPECT_EQ(mem_.FrameOf(Page(2)), mem_.FrameOf(Page(6)));
}

TEST_F(KsmTest, AWriteDuringTheMergeIsNeverLost) {
  Setup(2, [](std::size_t) { return 4; });
  FullScans(1);
  // The write lands after the hash but before the protected compare.
  mem_.before_compare = [&](Addr a) {
    if (a == Page(1)) mem_.Write(Page(1), 99);
  };
  FullScans(1);
  mem_.before_compare = nullptr;
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 0u);
  EXPECT_EQ(mem_.Read(Page(1))[0], 99);
  EXPECT_EQ(mem_.Read(Page(0))[0], 4);
  EXPECT_FALSE(mem_.MapsFrame(Page(0)));
  EXPECT_GT(ksm_.merge_failures(), 0u);
}

TEST_F(KsmTest, UntouchedPagesAreNotScanned) {
  mem_.Map(kBase, 100);  // never written: absent
  ksm_.Advise(kBase, 100);
  EXPECT_EQ(ksm_.ScanBatch(50), 0u);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_scanned, 0u);
  EXPECT_EQ(c.rmap_items, 0u);
}

TEST_F(KsmTest, UnadviseGivesBackPlainPagesWithTheirContents) {
  Setup(8, [](std::size_t i) { return i < 4 ? 1 : 2; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 6u);
  ASSERT_TRUE(ksm_.Unadvise(Page(0), 4));
  ksm_.CheckInvariants();
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_FALSE(mem_.MapsFrame(Page(i)));
    EXPECT_EQ(mem_.Read(Page(i))[0], 1);
  }
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 3u);
  EXPECT_EQ(ksm_.AdvisedPages(), 4u);
  EXPECT_FALSE(ksm_.IsAdvised(Page(0)));
  EXPECT_TRUE(ksm_.IsAdvised(Page(4)));
}

// Merged memory the core lost sight of (moved or made read-only unseen)
// is still VM_MERGEABLE memory to the kernel, wherever it went: run=2
// reaches all of it, MADV_UNMERGEABLE its own range, and where the memory
// could not be given back, the call fails (ENOMEM in the kernel).
TEST_F(KsmTest, UnmergingAsksForMemoryTheCoreLostSightOf) {
  SetupMergedPairs(8);
  ASSERT_TRUE(ksm_.Unadvise(Page(0), 2));
  ASSERT_EQ(mem_.forgotten_unmerges.size(), 1u);
  EXPECT_EQ(mem_.forgotten_unmerges[0], std::pair(Page(0), Page(2)));
  ASSERT_TRUE(ksm_.UnmergeAll());
  ASSERT_EQ(mem_.forgotten_unmerges.size(), 2u);
  EXPECT_EQ(mem_.forgotten_unmerges[1], std::pair(Addr{0}, ~Addr{0}));
  mem_.forgotten_unmerge_ok = false;
  EXPECT_FALSE(ksm_.UnmergeAll());
  EXPECT_FALSE(ksm_.Unadvise(Page(2), 2));
  ksm_.CheckInvariants();
}

// A control call waits for the scanner's current step, and a probe is
// one: where a chunk's probe is slow (memory cut into a mapping per
// merged page), the next go in aligned eighths, until one is cheap again.
// Merging goes on as before.
TEST_F(KsmTest, SlowProbesGoInSmallerPieces) {
  constexpr std::size_t kPages = 4096;
  Setup(kPages, [](std::size_t i) { return 1 + i % 100; });
  std::vector<std::size_t> sizes;
  bool slow = true;
  mem_.on_probe = [&](Addr addr, std::size_t n) {
    // Within one piece: none crosses a boundary of its size.
    const std::size_t piece = n <= Ksm::kProbeChunkPages / 8
                                  ? Ksm::kProbeChunkPages / 8
                                  : Ksm::kProbeChunkPages;
    EXPECT_LE((addr / kPageSize) % piece + n, piece);
    sizes.push_back(n);
    clock_.now += slow ? 8 * Ksm::kSlowProbeNanos : 1000;
  };
  ksm_.ScanBatch(2048);
  ASSERT_GE(sizes.size(), 2u);
  EXPECT_GT(sizes[0], Ksm::kProbeChunkPages / 8);
  for (std::size_t k = 1; k < sizes.size(); ++k)
    EXPECT_LE(sizes[k], Ksm::kProbeChunkPages / 8) << k;
  slow = false;
  sizes.clear();
  ksm_.ScanBatch(2048);
  ASSERT_GE(sizes.size(), 2u);
  EXPECT_LE(sizes[0], Ksm::kProbeChunkPages / 8);
  EXPECT_EQ(sizes.back(), Ksm::kProbeChunkPages);
  slow = true;
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, kPages - 100);
}

// A range given back a page at a time from its start (a forked child
// dropping what it wrote, an arena unmapped in address order): each cut
// keeps the rest of the range's items where they are, and every page left
// stays merged with its partner, counted, until its own turn.
TEST_F(KsmTest, ARangeGivenBackFromItsStartKeepsTheRestMerged) {
  constexpr std::size_t kPages = 256;
  SetupMergedPairs(kPages);
  for (std::size_t i = 0; i < kPages / 2; ++i) {
    if (i % 2 == 0) {
      ASSERT_TRUE(ksm_.Unadvise(Page(i), 1));
    } else {
      mem_.Unmap(Page(i), 1);
      ksm_.Forget(Page(i), 1);
    }
    ksm_.CheckInvariants();
    ASSERT_EQ(ksm_.AdvisedPages(), kPages - 1 - i);
    // The partners of the pages given back lost their sharers.
    ASSERT_EQ(ksm_.GetCounters().pages_sharing, kPages / 2 - 1 - i) << i;
    ASSERT_TRUE(mem_.MapsFrame(Page(i + 1))) << i;
  }
  for (std::size_t i = kPages / 2; i < kPages; ++i)
    EXPECT_EQ(mem_.Read(Page(i))[0], 1 + i % (kPages / 2)) << i;
  FullScans(1);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 0u);
}

// Unmerge (a MADV_DONTNEED of merged memory is about to drop the pages):
// each page given back is plain memory with its bytes and stays advised,
// the range is not cut, and the next scans merge the pages again. A part
// that cannot be given back stays merged and tracked.
TEST_F(KsmTest, UnmergedPagesStayAdvisedInTheirRange) {
  constexpr std::size_t kPages = 256;
  SetupMergedPairs(kPages);
  for (std::size_t i = 0; i < kPages / 2; ++i) {
    ASSERT_TRUE(ksm_.Unmerge(Page(i), 1));
    ksm_.CheckInvariants();
    ASSERT_FALSE(mem_.MapsFrame(Page(i))) << i;
    ASSERT_EQ(mem_.Read(Page(i))[0], 1 + i) << i;
    ASSERT_TRUE(ksm_.IsAdvised(Page(i))) << i;
    ASSERT_EQ(ksm_.GetCounters().pages_sharing, kPages / 2 - 1 - i) << i;
  }
  EXPECT_EQ(ksm_.AdvisedRanges().size(), 1u);
  EXPECT_EQ(ksm_.AdvisedPages(), kPages);
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, kPages / 2);
  mem_.unmerge_fails_from = Page(4);
  mem_.unmerge_fails_to = Page(8);
  EXPECT_FALSE(ksm_.Unmerge(Page(0), 8));
  ksm_.CheckInvariants();
  std::size_t given_back = 0;
  for (std::size_t i = 0; i < 8; ++i) {
    EXPECT_TRUE(mem_.MapsFrame(Page(i)) || i < 4) << i;
    given_back += mem_.MapsFrame(Page(i)) ? 0 : 1;
    EXPECT_EQ(mem_.Read(Page(i))[0], 1 + i) << i;
  }
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, kPages / 2 - given_back);
  mem_.unmerge_fails_to = 0;
  EXPECT_TRUE(ksm_.Unmerge(Page(0), 8));
  ksm_.CheckInvariants();
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, kPages / 2 - 8);
}

// A range whose merged pages cannot be given back (ENOMEM from the
// restoring mapping) stays advised and merged, as madvise(MADV_UNMERGEABLE)
// fails in the kernel with the range still mergeable: forgetting it would
// release frames its pages still map (FakeMemory fails the test then).
TEST_F(KsmTest, UnadviseThatCannotRestoreKeepsTheRangeMerged) {
  Setup(8, [](std::size_t) { return 5; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 7u);
  // Two advised ranges: the first is given back, the second cannot be.
  ASSERT_TRUE(ksm_.Unadvise(Page(0), 8));
  ksm_.Advise(Page(0), 4);
  ksm_.Advise(Page(4), 4);
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 7u);
  mem_.unmerge_fails_from = Page(4);
  mem_.unmerge_fails_to = Page(8);
  EXPECT_FALSE(ksm_.Unadvise(Page(0), 8));
  ksm_.CheckInvariants();
  EXPECT_TRUE(ksm_.IsAdvised(Page(4)));
  EXPECT_FALSE(ksm_.IsAdvised(Page(0)));
  for (std::size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(mem_.Read(Page(i))[9], 5) << i;
    EXPECT_EQ(mem_.MapsFrame(Page(i)), i >= 4) << i;
  }
  EXPECT_EQ(mem_.frames_live(), 1u);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 3u);
  // Still merged and scanned; once the failure passes, it unmerges too.
  FullScans(1);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 3u);
  mem_.unmerge_fails_to = 0;
  EXPECT_TRUE(ksm_.Unadvise(Page(0), 8));
  ksm_.CheckInvariants();
  EXPECT_EQ(mem_.frames_live(), 0u);
  EXPECT_EQ(ksm_.AdvisedPages(), 0u);
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(mem_.Read(Page(i))[9], 5) << i;
}

TEST_F(KsmTest, UnmergeAllThatCannotRestoreKeepsThoseMerges) {
  Setup(8, [](std::size_t) { return 6; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 7u);
  mem_.unmerge_fails_from = Page(0);
  mem_.unmerge_fails_to = Page(8);
  EXPECT_FALSE(ksm_.UnmergeAll());
  ksm_.CheckInvariants();
  for (std::size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(mem_.Read(Page(i))[9], 6) << i;
    EXPECT_TRUE(mem_.MapsFrame(Page(i))) << i;
  }
  EXPECT_EQ(mem_.frames_live(), 1u);
  mem_.unmerge_fails_to = 0;
  EXPECT_TRUE(ksm_.UnmergeAll());
  EXPECT_EQ(mem_.frames_live(), 0u);
}

TEST_F(KsmTest, UnmergeAllRestoresEverything) {
  Setup(20, [](std::size_t i) { return i % 3; });
  ksm_.knobs().use_zero_pages = true;
  FullScans(3);
  ASSERT_GT(ksm_.GetCounters().pages_sharing, 0u);
  ASSERT_TRUE(ksm_.UnmergeAll());
  ksm_.CheckInvariants();
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared + c.pages_sharing + c.ksm_zero_pages, 0u);
  EXPECT_EQ(c.rmap_items, 0u);
  EXPECT_EQ(mem_.frames_live(), 0u);
  for (std::size_t i = 0; i < 20; ++i) {
    EXPECT_EQ(mem_.Read(Page(i))[17], i % 3);
  }
}

TEST_F(KsmTest, UnmappedRangesAreForgottenWithoutReleasingMappedFrames) {
  Setup(6, [](std::size_t) { return 8; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 5u);
  mem_.Unmap(Page(0), 3);  // the application unmaps half
  FullScans(1);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared, 1u);
  EXPECT_EQ(c.pages_sharing, 2u);
  EXPECT_EQ(c.rmap_items, 3u);
  mem_.Unmap(Page(3), 3);
  FullScans(1);
  EXPECT_EQ(ksm_.GetCounters().pages_shared, 0u);
  EXPECT_EQ(mem_.frames_live(), 0u);
}

TEST_F(KsmTest, AMappingMadeWhereAdvisedMemoryWasIsNotMerged) {
  Setup(4, [](std::size_t) { return 8; });
  FullScans(2);
  ASSERT_EQ(ksm_.GetCounters().pages_sharing, 3u);
  mem_.Unmap(kBase, 4);
  FullScans(1);  // the scanner finds the hole
  EXPECT_EQ(ksm_.AdvisedPages(), 0u);
  mem_.Map(kBase, 4);  // something new lands at the same address
  for (std::size_t i = 0; i < 4; ++i) mem_.Write(Page(i), 8);
  ksm_.ScanBatch(100);
  ksm_.ScanBatch(100);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 0u);
  EXPECT_FALSE(mem_.MapsFrame(Page(0)));
}

TEST_F(KsmTest, BudgetExhaustionLeavesPagesIntact) {
  mem_.merge_budget = 5;
  Setup(20, [](std::size_t) { return 6; });
  FullScans(3);
  Counters c = ksm_.GetCounters();
  EXPECT_EQ(c.pages_shared + c.pages_sharing, 5u);
  for (std::size_t i = 0; i < 20; ++i) EXPECT_EQ(mem_.Read(Page(i))[9], 6);
}

TEST_F(KsmTest, SmartScanSkipsPagesThatNeverMerge) {
  Setup(50, [](std::size_t i) { return std::uint8_t(i); });  // all unique
  FullScans(12);
  Counters c = ksm_.GetCounters();
  EXPECT_GT(c.pages_skipped, 0u);
  EXPECT_LT(c.pages_scanned, 12u * 50u);
  ksm_.knobs().smart_scan = false;
  const auto before = ksm_.GetCounters();
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_skipped, before.pages_skipped);
  EXPECT_EQ(ksm_.GetCounters().pages_scanned, before.pages_scanned + 100);
}

TEST_F(KsmTest, AdviseTwiceIsHarmlessAndOverlapsExtend) {
  Setup(4, [](std::size_t) { return 1; });
  ksm_.Advise(kBase, 4);
  mem_.Map(Page(4), 4);
  for (int i = 4; i < 8; ++i) mem_.Write(Page(i), 1);
  ksm_.Advise(Page(2), 6);
  EXPECT_EQ(ksm_.AdvisedPages(), 8u);
  FullScans(2);
  EXPECT_EQ(ksm_.GetCounters().pages_sharing, 7u);
}

TEST_F(KsmTest, AdvisorMovesPagesToScanTowardsTheTarget) {
  ksm_.knobs().advisor_mode = AdvisorMode::kScanTime;
  ksm_.knobs().pages_to_scan = 500;
  ksm_.knobs().advisor_target_scan_time = 10;
  ksm_.ResetAdvisor();
  Setup(100, [](std::size_t i) { return std::uint8_t(i); });
  // Each full scan "takes" 100 s at 50% CPU: far slower than the 10 s target.
  for (int i = 0; i < 3; ++i) {
    ksm_.ScanBatch(1);  // the scan begins
    clock_.now += 100ull * 1000000000;
    clock_.cpu += 50ull * 1000000000;
    FullScans(1);  // and ends 100 s later
  }
  EXPECT_GT(ksm_.knobs().pages_to_scan, 500u);
  EXPECT_LE(ksm_.knobs().pages_to_scan, ksm_.knobs().advisor_max_pages_to_scan);
}

// Random operations against a model: after each step the application's view
// (page contents) must equal the model, and the core's invariants hold; after
// quiescence every duplicate must be merged. Seeds past 24 set
// max_page_sharing to 2-4, so that chains of dups form and break up.
class KsmRandomTest : public ::testing::TestWithParam<int> {};
constexpr int kSeedsWithoutChains = 24;

TEST_P(KsmRandomTest, MatchesModel) {
  std::mt19937 rng(GetParam());
  FakeMemory mem;
  FakeClock clock;
  Ksm ksm(&mem, &clock);
  const bool zero_pages = GetParam() % 2 == 1;
  ksm.knobs().use_zero_pages = zero_pages;
  const bool chains = GetParam() > kSeedsWithoutChains;
  if (chains) ksm.knobs().max_page_sharing = 2 + GetParam() % 3;
  const std::size_t max_sharing = ksm.knobs().max_page_sharing;
  constexpr std::size_t kPages = 96;
  // The pages straddle the end of a chunk of 512 (a page table): the scan
  // passes stretches with nothing to visit chunk by chunk.
  const Addr base = kBase + 460 * kPageSize;
  auto Page = [base](std::size_t i) { return base + i * kPageSize; };
  std::map<Addr, std::uint8_t> model;  // mapped pages -> fill byte (absent=0)
  std::set<Addr> advised;
  mem.Map(base, kPages);
  for (std::size_t i = 0; i < kPages; ++i) model[Page(i)] = 0;
  auto check_contents = [&] {
    for (auto& [a, fill] : model) {
      ASSERT_TRUE(mem.IsMapped(a));
      const PageBytes b = mem.Read(a);
      ASSERT_EQ(b[0], fill) << "page " << (a - base) / kPageSize;
      ASSERT_EQ(b[kPageSize - 1], fill);
    }
  };
  for (int step = 0; step < 3000; ++step) {
    const int op = rng() % 100;
    const std::size_t i = rng() % kPages;
    const std::size_t n = 1 + rng() % 8;
    if (op < 40) {
      // Chain seeds write runs of up to 8 pages alike, so that runs longer
      // than max_page_sharing form and get striped over several frames.
      const std::uint8_t v = rng() % 4;  // few values: many duplicates
      const std::size_t m = chains ? std::min(n, kPages - i) : 1;
      for (std::size_t k = 0; k < m; ++k) {
        if (model.count(Page(i + k))) {
          mem.Write(Page(i + k), v);
          model[Page(i + k)] = v;
        }
      }
    } else if (op < 75) {
      // As the background scanner does, half the time: a run reaching the
      // batch's end keeps its merges waiting, across the operations below.
      ksm.ScanBatch(1 + rng() % 64, /*stop_at_scan_end=*/false,
                    /*carry_runs=*/rng() % 2 == 0);
    } else if (op < 83) {
      const std::size_t m = std::min(n, kPages - i);
      bool all_mapped = true;
      for (std::size_t k = 0; k < m; ++k) all_mapped &= model.count(Page(i + k)) > 0;
      if (all_mapped) {
        ksm.Advise(Page(i), m);
        for (std::size_t k = 0; k < m; ++k) advised.insert(Page(i + k));
      }
    } else if (op < 88) {
      const std::size_t m = std::min(n, kPages - i);
      ASSERT_TRUE(ksm.Unadvise(Page(i), m));
      for (std::size_t k = 0; k < m; ++k) {
        advised.erase(Page(i + k));
        if (model.count(Page(i + k))) {
          ASSERT_FALSE(mem.MapsFrame(Page(i + k)));
        }
      }
    } else if (op < 92) {
      const std::size_t m = std::min(n, kPages - i);
      mem.Unmap(Page(i), m);  // the application unmaps behind samepage's back
      for (std::size_t k = 0; k < m; ++k) {
        model.erase(Page(i + k));
        advised.erase(Page(i + k));  // forgotten when the scanner sees it
      }
    } else if (op < 94) {
      const std::size_t m = std::min(n, kPages - i);
      // Remap what was unmapped, fresh and untouched.
      for (std::size_t k = 0; k < m; ++k) {
        if (!model.count(Page(i + k))) {
          mem.Map(Page(i + k), 1);
          model[Page(i + k)] = 0;
          ksm.Forget(Page(i + k), 1);  // a new mapping is not mergeable
          advised.erase(Page(i + k));
        }
      }
    } else if (op < 95) {
      // MADV_DONTNEED behind samepage's back: anonymous pages read zeros,
      // merged ones their frame.
      const std::size_t m = std::min(n, kPages - i);
      mem.Discard(Page(i), m);
      for (std::size_t k = 0; k < m; ++k) {
        if (model.count(Page(i + k)) && !mem.MapsFrame(Page(i + k)))
          model[Page(i + k)] = 0;
      }
    } else if (op < 97) {
      ASSERT_TRUE(ksm.UnmergeAll());
      ASSERT_EQ(mem.pages_mapping_frames(), 0u);
    } else {
      ksm.FinishPlans();  // as the engine does before a knob changes
      ksm.knobs().smart_scan = !ksm.knobs().smart_scan;
    }
    ksm.CheckInvariants();
    check_contents();
    // Frames released by an operation have their memory freed by its end.
    ASSERT_EQ(mem.frames_unflushed(), 0u) << "after op " << op;
    if (HasFatalFailure()) return;
  }
  // Quiescence: with no more writes, enough full scans merge every duplicate.
  // Not with smart scan: two aged pages skipped in different scans can miss
  // each other for good (the kernel's should_skip_rmap_item does the same).
  ksm.knobs().smart_scan = false;
  for (int s = 0; s < 40; ++s) {
    const auto target = ksm.GetCounters().full_scans + 1;
    for (int g = 0; ksm.GetCounters().full_scans < target && g < 10000; ++g) {
      ksm.ScanBatch(50, /*stop_at_scan_end=*/true);
    }
  }
  ksm.CheckInvariants();
  check_contents();
  // Without chains every value has at most one stable node; no page is left
  // unmerged beside a node of its content with room or beside another
  // unmerged page of the same content.
  std::map<std::uint8_t, std::set<FrameId>> frames_by_value;
  std::map<FrameId, std::size_t> sharers;
  std::map<std::uint8_t, std::size_t> unmerged_by_value;
  std::size_t merged = 0;
  std::size_t absent_zeros = 0;  // dropped, or never touched
  for (Addr a : advised) {
    if (model.count(a) && !mem.IsPresent(a) && model[a] == 0) ++absent_zeros;
    if (!model.count(a) || !mem.IsPresent(a)) continue;
    const std::uint8_t v = model[a];
    SCOPED_TRACE(::testing::Message()
                 << "page " << (a - base) / kPageSize << " value " << int(v));
    if (zero_pages) {
      EXPECT_NE(v, 0) << "a zero page was not dropped";
    }
    if (mem.MapsFrame(a)) {
      frames_by_value[v].insert(mem.FrameOf(a));
      ++sharers[mem.FrameOf(a)];
      ++merged;
    } else {
      ++unmerged_by_value[v];
    }
  }
  std::size_t nodes = 0;
  // Zero content merges without frames (use_zero_pages=0: dropped to the
  // zero page, counted in its own nodes).
  EXPECT_EQ(frames_by_value.count(0), 0u) << "a frame holds zeros";
  for (auto& [v, frames] : frames_by_value) {
    if (!chains) {
      EXPECT_EQ(frames.size(), 1u) << "value " << int(v);
    }
    for (FrameId f : frames) {
      EXPECT_LE(sharers[f], max_sharing) << "value " << int(v);
      if (unmerged_by_value[v] != 0) {
        EXPECT_EQ(sharers[f], max_sharing) << "unmerged page beside room, value " << int(v);
      }
    }
    nodes += frames.size();
  }
  for (auto& [v, k] : unmerged_by_value) EXPECT_LE(k, 1u) << "value " << int(v);
  const Counters c = ksm.GetCounters();
  EXPECT_EQ(mem.frames_live(), nodes);
  ASSERT_GE(c.pages_shared, nodes);
  ASSERT_GE(c.pages_shared + c.pages_sharing, merged);
  // The rest are the zero nodes and their sharers: dropped pages.
  const std::size_t zero_nodes = c.pages_shared - nodes;
  const std::size_t zero_sharers = c.pages_shared + c.pages_sharing - merged;
  EXPECT_LE(zero_sharers, absent_zeros);
  EXPECT_LE(zero_nodes, zero_sharers);
  EXPECT_LE(zero_sharers, zero_nodes * max_sharing);
  if (unmerged_by_value[0] != 0) {
    EXPECT_EQ(zero_sharers, zero_nodes * max_sharing) << "unmerged zeros beside room";
  }
  if (zero_pages) {
    EXPECT_EQ(zero_nodes, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, KsmRandomTest, ::testing::Range(1, 37));

}  // namespace
}  // namespace samepage
