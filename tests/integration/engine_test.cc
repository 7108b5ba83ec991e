// The engine on real memory: what an application observes — page contents,
// copy-on-write isolation, memory saved by the kernel's own accounting, the
// kernel's counters and error codes.

#include <fcntl.h>
#include <linux/capability.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "integration/test_util.h"

namespace samepage::testing {
namespace {

TEST(Engine, TenIdenticalPagesShareOneFrame) {
  auto e = NewEngine();
  Mapping m(10);
  m.FillAll(0x2a);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared"), 1);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 9);
  for (std::size_t i = 0; i < 10; ++i) {
    EXPECT_TRUE(MapsSharedFrame(m.page(i))) << i;
    EXPECT_TRUE(m.Holds(i, 0x2a)) << i;
  }
}

// pages_unshared as the kernel counts it: the last scan's unstable pages
// until each is visited again, not only until the next scan begins.
TEST(Engine, UnsharedPagesCountUntilRevisited) {
  auto e = NewEngine();
  ASSERT_TRUE(e->WriteKnob("smart_scan", "0").ok());  // no page skipped
  Mapping m(8);
  for (std::size_t i = 0; i < 8; ++i) m.Fill(i, static_cast<unsigned char>(i + 1));
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_unshared"), 8);
  m.Fill(0, 0x71);  // changed: the next visit takes them out
  m.Fill(1, 0x72);
  ASSERT_EQ(e->ScanNow(2), 2u);
  EXPECT_EQ(Counter(*e, "pages_unshared"), 6);
  EXPECT_EQ(Counter(*e, "pages_volatile"), 2);
  ASSERT_EQ(e->ScanNow(6), 6u);  // unchanged: in the new scan's index
  EXPECT_EQ(Counter(*e, "pages_unshared"), 6);
  EXPECT_EQ(Counter(*e, "pages_volatile"), 2);
  for (std::size_t i = 2; i < 8; ++i) EXPECT_TRUE(m.Holds(i, static_cast<unsigned char>(i + 1))) << i;
}

// A synchronous scan runs on the caller's thread, whatever its stack: pairs
// in runs (merged 512 at a time), zero pages and a run of identical pages,
// scanned from a thread with a 32 KiB stack.
TEST(Engine, ScansOnAThreadWithASmallStack) {
  auto e = NewEngine();
  ASSERT_TRUE(e->WriteKnob("use_zero_pages", "1").ok());
  constexpr std::size_t kPairs = 1024, kZero = 1024, kSame = 1024;
  Mapping m(2 * kPairs + kZero + kSame);
  for (std::size_t i = 0; i < kPairs; ++i) {
    m.FillKey(i, i + 1);
    m.FillKey(kPairs + i, i + 1);
  }
  for (std::size_t i = 0; i < kZero; ++i) m.Fill(2 * kPairs + i, 0);
  for (std::size_t i = 0; i < kSame; ++i) m.Fill(2 * kPairs + kZero + i, 0x3c);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
#if defined(__SANITIZE_ADDRESS__)
  // Its redzones around every local array take several times the stack.
  constexpr std::size_t kStack = 128 * 1024;
#else
  constexpr std::size_t kStack = 32 * 1024;
#endif
  ASSERT_EQ(pthread_attr_setstacksize(&attr, kStack), 0);
  pthread_t thread;
  auto scan = [](void* engine) -> void* {
    static_cast<Engine*>(engine)->RunFullScans(2);
    return nullptr;
  };
  ASSERT_EQ(pthread_create(&thread, &attr, scan, e.get()), 0);
  ASSERT_EQ(pthread_join(thread, nullptr), 0);
  pthread_attr_destroy(&attr);
  EXPECT_EQ(Counter(*e, "ksm_zero_pages"), static_cast<std::int64_t>(kZero));
  // kPairs nodes of two, and the run's nodes (max_page_sharing 256).
  EXPECT_EQ(Counter(*e, "pages_shared"), static_cast<std::int64_t>(kPairs + 4));
  EXPECT_EQ(Counter(*e, "pages_sharing"),
            static_cast<std::int64_t>(kPairs + kSame - 4));
  for (std::size_t i = 0; i < kPairs; ++i) {
    EXPECT_TRUE(MapsSharedFrame(m.page(kPairs + i))) << i;
    EXPECT_TRUE(m.HoldsKey(i, i + 1) && m.HoldsKey(kPairs + i, i + 1)) << i;
  }
  for (std::size_t i = 0; i < kZero; ++i)
    EXPECT_TRUE(m.Holds(2 * kPairs + i, 0)) << i;
  for (std::size_t i = 0; i < kSame; ++i)
    EXPECT_TRUE(m.Holds(2 * kPairs + kZero + i, 0x3c)) << i;
}

TEST(Engine, WritesCopyAndLeaveTheStableNode) {
  auto e = NewEngine();
  Mapping m(2);
  m.FillAll(7);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 1);
  m.page(0)[10] = 1;  // each merged page written once
  m.page(1)[20] = 2;
  EXPECT_EQ(m.page(0)[10], 1);
  EXPECT_EQ(m.page(1)[10], 7);  // the other page did not see the write
  EXPECT_EQ(m.page(1)[20], 2);
  EXPECT_EQ(m.page(0)[20], 7);
  e->RunFullScans(1);
  EXPECT_EQ(Counter(*e, "pages_shared"), 0);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
}

// 4,096 identical pages: the kernel's 16 dups of 256 sharers, laid out so
// that the run maps with one call per 16 pages instead of one per page.
// `merge` merges them.
template <typename F>
void IdenticalRunTakesFewMappings(F merge) {
  auto e = NewEngine();
  constexpr std::size_t kPages = 4096;
  Mapping m(kPages);
  m.FillAll(0x2a);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  merge(*e, std::int64_t(kPages - 16));
  EXPECT_EQ(Counter(*e, "pages_shared"), 16);
  EXPECT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPages - 16));
  EXPECT_EQ(Counter(*e, "stable_node_dups"), 16);
  EXPECT_LE(e->Stats().vmas_used, kPages / 8);  // one per page: 2 * kPages
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_TRUE(m.Holds(i, 0x2a)) << i;
  m.page(100)[7] = 1;  // copy-on-write of one sharer
  EXPECT_EQ(m.page(100)[7], 1);
  EXPECT_EQ(m.page(101)[7], 0x2a);
  EXPECT_EQ(m.page(116)[7], 0x2a);  // the other sharers of its frame
  EXPECT_EQ(m.page(84)[7], 0x2a);
}

TEST(Engine, RunsOfIdenticalPagesTakeFewMappings) {
  IdenticalRunTakesFewMappings([](Engine& e, std::int64_t) { e.RunFullScans(2); });
}

// The same from the background scanner at the default pages_to_scan = 100:
// the run spans 41 batches, and its merges wait for it to end.
TEST(Engine, RunsOfIdenticalPagesTakeFewMappingsAtDefaultPagesToScan) {
  IdenticalRunTakesFewMappings([](Engine& e, std::int64_t sharing) {
    ASSERT_EQ(Counter(e, "pages_to_scan"), 100);
    Set(e, "sleep_millisecs", "0");
    Set(e, "run", "1");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (Counter(e, "pages_sharing") < sharing &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    Set(e, "run", "0");
  });
}

// Copies of the run's content elsewhere, before and after it, join its
// nodes: they used to keep the run from being laid out over consecutive
// frames, a mapping per page.
TEST(Engine, ARunOfIdenticalPagesWithCopiesElsewhereTakesFewMappings) {
  auto e = NewEngine();
  constexpr std::size_t kRun = 4000, kSide = 64, kPages = kRun + 2 * kSide;
  Mapping m(kPages);  // 64 pages, the run, 64 pages
  auto copy = [&](std::size_t i) {
    return (i >= kSide && i < kSide + kRun) || i % 16 == 3;
  };
  for (std::size_t i = 0; i < kPages; ++i) {
    if (copy(i)) {
      m.Fill(i, 0x2a);
    } else {
      m.FillKey(i, i);
    }
  }
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  const std::int64_t copies = kRun + 2 * kSide / 16;
  EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"), copies);
  EXPECT_LE(Counter(*e, "pages_shared"), 16 + 2);  // ceil(4008 / 256) = 16
  // The run in pieces, each copy alone: a mapping per page was ~2 * kRun.
  EXPECT_LE(e->Stats().vmas_used, kRun / 8 + 4 * (2 * kSide / 16));
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(copy(i) ? m.Holds(i, 0x2a) : m.HoldsKey(i, i)) << i;
  }
  m.page(3)[7] = 1;  // copy-on-write of one sharer
  EXPECT_EQ(m.page(3)[7], 1);
  EXPECT_EQ(m.page(kPages - 13)[7], 0x2a);
  EXPECT_EQ(m.page(kSide)[7], 0x2a);
}

// use_zero_pages = 0: zero pages count as the kernel counts them (KSM pages
// of zeros), but take no frame and no mapping: scattered among other pages
// they would otherwise need a VMA each.
TEST(Engine, ZeroPagesWithoutUseZeroPagesCountAsKsmPagesButMapNothing) {
  if (kUnderSanitizer)
    GTEST_SKIP() << "checks RSS, which the sanitizer's own memory moves";
  auto e = NewEngine();
  constexpr std::size_t kPages = 4096;
  Mapping m(kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    if (i % 2 == 0) {
      m.Fill(i, 0);  // touched, so present
    } else {
      m.FillKey(i, i);  // unique
    }
  }
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  const long rss_before = RollupKib("Rss");
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared"), 8);  // ceil(2048 / 256)
  EXPECT_EQ(Counter(*e, "pages_sharing"), 2040);
  EXPECT_EQ(Counter(*e, "ksm_zero_pages"), 0);
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
  EXPECT_LE(e->Stats().vmas_used, 4u);  // with a frame each: ~4,096
  EXPECT_LE(RollupKib("Rss"), rss_before - 2048 * 4 + 1024);  // 8 MiB freed
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(i % 2 == 0 ? m.Holds(i, 0) : m.HoldsKey(i, i)) << i;
  }
  m.page(100)[5] = 9;  // still ordinary, writable memory
  EXPECT_EQ(m.page(100)[5], 9);
  EXPECT_TRUE(m.Holds(102, 0));
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"), 2047);
  Set(*e, "run", "2");
  EXPECT_EQ(Counter(*e, "pages_shared"), 0);
  EXPECT_TRUE(m.Holds(102, 0));
  EXPECT_EQ(m.page(100)[5], 9);
}

// A merged page's private copy (in a frame's mapping) that becomes all
// zeros merges with the other zero pages too.
TEST(Engine, ZeroedCopyOfAMergedPageMergesAsZeros) {
  auto e = NewEngine();
  Mapping m(8);
  m.Fill(0, 0x11);
  m.Fill(1, 0x11);
  for (std::size_t i = 2; i < 8; ++i) m.Fill(i, 0);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_shared"), 2);  // 0x11 and zeros
  ASSERT_TRUE(MapsSharedFrame(m.page(0)));
  std::memset(m.page(0), 0, kPage);  // copy-on-write, then zeros
  e->RunFullScans(3);
  EXPECT_EQ(Counter(*e, "pages_shared"), 2);  // page 1 alone on its frame
  EXPECT_EQ(Counter(*e, "pages_sharing"), 6);  // zeros: pages 0 and 2..7
  for (std::size_t i = 0; i < 8; ++i) ASSERT_TRUE(m.Holds(i, i == 1 ? 0x11 : 0)) << i;
  m.page(0)[1] = 3;
  EXPECT_EQ(m.page(0)[1], 3);
  EXPECT_TRUE(m.Holds(2, 0));
}

// Over more than one window (runs of up to 512 pages): every page dropped,
// and the memory given back to the system.
TEST(Engine, ZeroPagesWithUseZeroPagesNeedNoFrame) {
  if (kUnderSanitizer)
    GTEST_SKIP() << "checks RSS, which the sanitizer's own memory moves";
  auto e = NewEngine();
  Set(*e, "use_zero_pages", "1");
  constexpr std::size_t kPages = 1300;
  Mapping m(kPages);
  m.FillAll(0);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  const long rss_before = RollupKib("Rss");
  e->RunFullScans(2);
  const long rss_after = RollupKib("Rss");
  EXPECT_EQ(Counter(*e, "pages_shared"), 0);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  EXPECT_EQ(Counter(*e, "ksm_zero_pages"), std::int64_t(kPages));
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
  EXPECT_GT(rss_before - rss_after, long(kPages * 4 * 9 / 10))
      << "KiB given back";
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(m.Holds(i, 0)) << i;
  m.page(3)[0] = 9;  // still ordinary, writable memory
  EXPECT_EQ(m.page(3)[0], 9);
  EXPECT_TRUE(m.Holds(4, 0));
}

// A page's first visit reads an eighth of it to take it for zeros
// (SampledLinesZero); a page with bytes only between the sampled lines is
// taken for zeros too, and must then be neither dropped nor lost: its
// compare at the next visit finds the bytes, and it merges with its twin
// a scan later than a page read in full would. Both use_zero_pages
// settings: a drop, or a node of zero content.
TEST(Engine, PagesTakenForZerosFromASampleAreComparedInFull) {
  for (const char* use_zero_pages : {"1", "0"}) {
    SCOPED_TRACE(std::string("use_zero_pages=") + use_zero_pages);
    auto e = NewEngine();
    Set(*e, "use_zero_pages", use_zero_pages);
    constexpr std::size_t kPages = 1024;
    Mapping m(kPages);
    // Pages 4k, 4k+1: zeros; 4k+2 and 4k+3: twins whose only byte, k + 1,
    // lies at offset 100 (not sampled); 4k + 4... alike for every k.
    auto sparse = [](std::size_t i) { return i % 4 >= 2; };
    auto value = [](std::size_t i) {
      return static_cast<unsigned char>(1 + (i / 4) % 200);
    };
    m.FillAll(0);
    for (std::size_t i = 0; i < kPages; ++i) {
      if (sparse(i)) m.page(i)[100] = value(i);
    }
    auto intact = [&] {
      for (std::size_t i = 0; i < kPages; ++i) {
        for (std::size_t b = 0; b < kPage; ++b) {
          const unsigned char want = sparse(i) && b == 100 ? value(i) : 0;
          if (m.page(i)[b] != want) {
            ADD_FAILURE() << "page " << i << " byte " << b;
            return false;
          }
        }
      }
      return true;
    };
    ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    ASSERT_TRUE(intact());
    const std::int64_t zeros = kPages / 2;
    if (use_zero_pages[0] == '1') {
      EXPECT_EQ(Counter(*e, "ksm_zero_pages"), zeros);
    } else {
      EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"),
                zeros);
    }
    e->RunFullScans(1);  // the twins, hashed in full at their second visit
    ASSERT_TRUE(intact());
    // 256 twins of 200 values (twins of a value alike: 56 values have 4).
    const std::int64_t sparse_merged = kPages / 2;
    if (use_zero_pages[0] == '1') {
      EXPECT_EQ(Counter(*e, "ksm_zero_pages"), zeros);
      EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"),
                sparse_merged);
    } else {
      EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"),
                zeros + sparse_merged);
    }
    // A KSM page per value of the twins (and, at use_zero_pages=0, two or
    // three of zeros, as their merges filled them).
    if (use_zero_pages[0] == '1') {
      EXPECT_EQ(Counter(*e, "pages_shared"), 200);
    } else {
      EXPECT_GE(Counter(*e, "pages_shared"), 200 + 2);
      EXPECT_LE(Counter(*e, "pages_shared"), 200 + 3);
    }
    m.page(2)[100] = 77;  // copy-on-write, the rest unchanged
    m.page(0)[5] = 9;
    EXPECT_EQ(m.page(2)[100], 77);
    EXPECT_EQ(m.page(0)[5], 9);
    EXPECT_EQ(m.page(3)[100], value(3));
    EXPECT_EQ(m.page(1)[5], 0);
  }
}

TEST(Engine, MaxPageSharingSplitsIntoChains) {
  auto e = NewEngine();
  Mapping m(600);
  m.FillAll(0x55);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared"), 3);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 597);
  EXPECT_EQ(Counter(*e, "stable_node_chains"), 1);
  EXPECT_EQ(Counter(*e, "stable_node_dups"), 3);
  for (std::size_t i = 0; i < 600; ++i) ASSERT_TRUE(m.Holds(i, 0x55)) << i;
}

TEST(Engine, MemorySavedShowsInKernelAccounting) {
  auto e = NewEngine();
  constexpr std::size_t kPages = 8192;  // 32 MiB of one content
  Mapping m(kPages);
  m.FillAll(0x33);
  const long before = RollupKib("Pss");
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  Set(*e, "max_page_sharing", "4096");
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPages) - 2);
  const long after = RollupKib("Pss");
  // 32 MiB became 2 frames: at least 24 MiB less in use (the rest is slack
  // for the engine's own metadata and a sanitizer's quarantine).
  EXPECT_GT(before - after, 24 * 1024) << "Pss " << before << " -> " << after;
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_TRUE(m.Holds(i, 0x33));
}

TEST(Engine, UnmergeableGivesBackOrdinaryMemory) {
  auto e = NewEngine();
  Mapping m(20);
  m.FillAll(0x11);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 19);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_UNMERGEABLE).ok());
  EXPECT_EQ(Counter(*e, "pages_shared"), 0);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  for (std::size_t i = 0; i < 20; ++i) {
    EXPECT_FALSE(MapsSharedFrame(m.page(i))) << i;
    EXPECT_TRUE(m.Holds(i, 0x11)) << i;
  }
  // Anonymous memory again: MADV_DONTNEED reads back zeros.
  ASSERT_EQ(madvise(m.data(), 10 * kPage, MADV_DONTNEED), 0);
  for (std::size_t i = 0; i < 10; ++i) EXPECT_TRUE(m.Holds(i, 0)) << i;
  for (std::size_t i = 10; i < 20; ++i) EXPECT_TRUE(m.Holds(i, 0x11)) << i;
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);  // no longer mergeable
}

TEST(Engine, UnmergeableAfterDontneedOfHalfTheRange) {
  auto e = NewEngine();
  Mapping m(20);
  m.FillAll(0x12);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 19);
  // Library mode, documented in docs/limitations.md: MADV_DONTNEED on a merged
  // page made outside samepage drops the private copy, and the page reads the
  // frame's content again instead of zeros (`samepage run` interposes
  // madvise to give the kernel's answer).
  ASSERT_EQ(madvise(m.data(), 10 * kPage, MADV_DONTNEED), 0);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_UNMERGEABLE).ok());
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  for (std::size_t i = 10; i < 20; ++i) EXPECT_TRUE(m.Holds(i, 0x12)) << i;
  for (std::size_t i = 0; i < 20; ++i) {
    EXPECT_FALSE(MapsSharedFrame(m.page(i))) << i;
    m.page(i)[0] = 1;  // writable
  }
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
}

// A sparse reservation: 64 GiB mapped MAP_NORESERVE, a few pages in use.
// Each test unmaps what it leaves mapped.
class SparseReservation : public ::testing::Test {
 protected:
  static constexpr std::size_t kBytes = std::size_t{64} << 30;
  static constexpr std::size_t kGiB = std::size_t{1} << 30;

  void SetUp() override {
    void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED && errno == ENOMEM) {
      GTEST_SKIP() << "no 64 GiB reservation here (vm.overcommit_memory 2?)";
    }
    ASSERT_NE(p, MAP_FAILED);
    base_ = static_cast<unsigned char*>(p);
  }

  unsigned char* base_ = nullptr;
};

// Scans pass its empty stretches without probing them chunk by chunk, and
// still find every page in use, one written after the first scans too;
// the range is given back whole, contents kept.
TEST_F(SparseReservation, MergesThePagesItUses) {
  const std::size_t used[] = {0, 20 * kGiB + 7 * kPage, 50 * kGiB, 33 * kGiB};
  for (std::size_t i = 0; i < 3; ++i) std::memset(base_ + used[i], 0x5a, kPage);
  std::memset(base_ + 40 * kGiB, 0x17, kPage);  // unique
  auto e = NewEngine();
  ASSERT_TRUE(e->Madvise(base_, kBytes, MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared"), 1);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 2);
  std::memset(base_ + used[3], 0x5a, kPage);  // in a stretch passed so far
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 3);
  for (std::size_t at : used) {
    EXPECT_TRUE(MapsSharedFrame(base_ + at)) << at / kPage;
    EXPECT_EQ(base_[at + 100], 0x5a) << at / kPage;
  }
  EXPECT_FALSE(MapsSharedFrame(base_ + 40 * kGiB));
  ASSERT_TRUE(e->Madvise(base_, kBytes, MADV_UNMERGEABLE).ok());
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  for (std::size_t at : used) {
    EXPECT_FALSE(MapsSharedFrame(base_ + at)) << at / kPage;
    EXPECT_EQ(base_[at + kPage - 1], 0x5a) << at / kPage;
    base_[at] = 1;  // writable
  }
  EXPECT_EQ(base_[40 * kGiB], 0x17);
  munmap(base_, kBytes);
}

// A hole unmapped in the middle of it is found as the kernel would find
// it (its pages leave the advised range, so memory mapped there again is
// not merged), and the pages past it still merge.
TEST_F(SparseReservation, WithAHoleKeepsMergingPastIt) {
  std::memset(base_, 0x5a, kPage);
  std::memset(base_ + 20 * kGiB, 0x5a, kPage);
  auto e = NewEngine();
  ASSERT_TRUE(e->Madvise(base_, kBytes, MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 1);
  ASSERT_EQ(munmap(base_ + 10 * kGiB, kGiB), 0);
  std::memset(base_ + 45 * kGiB, 0x5a, kPage);
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 2) << "the page past the hole";
  // New memory in the hole, where nothing else is mapped yet (malloc may
  // have put its own mappings there since): never MAP_FIXED over a hole.
  constexpr std::size_t kSlot = std::size_t{2} << 20;
  unsigned char* fresh = nullptr;
  for (std::size_t off = 0; off < kGiB && fresh == nullptr; off += kSlot) {
    void* p = mmap(base_ + 10 * kGiB + off, kSlot, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == base_ + 10 * kGiB + off) {
      fresh = static_cast<unsigned char*>(p);
    } else if (p != MAP_FAILED) {
      munmap(p, kSlot);  // before Linux 4.17 the address was only a hint
    }
  }
  ASSERT_NE(fresh, nullptr) << "no free 2 MiB left in the hole";
  std::memset(fresh + 5 * kPage, 0x5a, kPage);
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 2) << "new memory is not advised";
  EXPECT_FALSE(MapsSharedFrame(fresh + 5 * kPage));
  ASSERT_TRUE(e->Madvise(base_, 10 * kGiB, MADV_UNMERGEABLE).ok());
  ASSERT_TRUE(
      e->Madvise(base_ + 11 * kGiB, kBytes - 11 * kGiB, MADV_UNMERGEABLE).ok());
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  for (std::size_t at : {std::size_t{0}, 20 * kGiB, 45 * kGiB}) {
    EXPECT_FALSE(MapsSharedFrame(base_ + at)) << at / kPage;
    EXPECT_EQ(base_[at + kPage - 1], 0x5a) << at / kPage;
  }
  EXPECT_EQ(fresh[6 * kPage - 1], 0x5a);
  munmap(fresh, kSlot);
  munmap(base_, 10 * kGiB);  // not the hole: other mappings may be there now
  munmap(base_ + 11 * kGiB, kBytes - 11 * kGiB);
}

TEST(Engine, RunTwoUnmergesEverything) {
  auto e = NewEngine();
  Set(*e, "use_zero_pages", "1");
  Mapping m(64);
  for (std::size_t i = 0; i < 64; ++i) m.Fill(i, i % 3 == 0 ? 0 : i % 3);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_GT(Counter(*e, "pages_sharing"), 0);
  ASSERT_GT(Counter(*e, "ksm_zero_pages"), 0);
  Set(*e, "run", "2");
  EXPECT_EQ(Counter(*e, "pages_shared"), 0);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  EXPECT_EQ(Counter(*e, "ksm_zero_pages"), 0);
  for (std::size_t i = 0; i < 64; ++i) {
    EXPECT_TRUE(m.Holds(i, i % 3 == 0 ? 0 : i % 3)) << i;
    EXPECT_FALSE(MapsSharedFrame(m.page(i))) << i;
  }
  Set(*e, "run", "0");
}

// Memory the kernel writes for the application (KVM guest RAM): where
// kernel faults cannot wait for a merge window, it is unmerged and never
// merged again, by this engine and by engines created later. The range
// stays kept out for the life of the process, so these mappings are never
// unmapped: no later test may get memory at those addresses.
unsigned char* KernelWrittenMapping(std::size_t pages, unsigned char fill) {
  void* p = mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  std::memset(p, fill, pages * kPage);
  return static_cast<unsigned char*>(p);
}

bool AllHold(const unsigned char* p, std::size_t bytes, unsigned char v) {
  for (std::size_t i = 0; i < bytes; ++i) {
    if (p[i] != v) return false;
  }
  return true;
}

TEST(Engine,
     KernelWrittenMemoryIsUnmergedAndKeptOutWhereKernelFaultsCannotWait) {
  EngineOptions options;
  options.protection = EngineOptions::Protection::kMprotect;
  auto e = NewEngine(options);
  ASSERT_FALSE(e->Stats().kernel_faults_wait);
  // (Ranges other tests of this process kept out are kept out here too.)
  const std::uint64_t kept_before = e->Stats().kept_out_pages;
  constexpr std::size_t kPages = 64;
  unsigned char* p = KernelWrittenMapping(kPages, 0x4b);
  ASSERT_NE(p, nullptr);
  Mapping other(16);  // the same content, not written by the kernel
  other.FillAll(0x4b);
  ASSERT_TRUE(e->Madvise(p, kPages * kPage, MADV_MERGEABLE).ok());
  ASSERT_TRUE(e->Madvise(other.data(), other.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), kPages + 16 - 1);

  EXPECT_EQ(Engine::KernelWrites(p, kPages * kPage), kPages);
  // Unmerged at once, contents intact, ordinary anonymous memory.
  EXPECT_EQ(Counter(*e, "pages_sharing"), 16 - 1);
  for (std::size_t i = 0; i < kPages; ++i) {
    EXPECT_FALSE(MapsSharedFrame(p + i * kPage)) << i;
  }
  EXPECT_TRUE(AllHold(p, kPages * kPage, 0x4b));
  e->RunFullScans(3);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 16 - 1);  // never merged again
  for (std::size_t i = 0; i < kPages; ++i) {
    EXPECT_FALSE(MapsSharedFrame(p + i * kPage)) << i;
  }
  EXPECT_TRUE(AllHold(p, kPages * kPage, 0x4b));
  const EngineStats s = e->Stats();
  EXPECT_EQ(s.kept_out_pages, kept_before + kPages);
  EXPECT_EQ(s.advised_pages,
            kPages + 16);  // still advised, as the kernel keeps it
  // Once is enough: the same range again keeps nothing more out.
  EXPECT_EQ(Engine::KernelWrites(p + kPage, 10 * kPage), 0u);
  EXPECT_EQ(e->Stats().kept_out_pages, kept_before + kPages);
  // Writable, as ordinary memory.
  for (std::size_t i = 0; i < kPages; ++i) p[i * kPage] = 1;
  EXPECT_EQ(p[0], 1);
  EXPECT_EQ(other.page(0)[0], 0x4b);
}

TEST(Engine, KernelWrittenMemoryRegisteredBeforeAnEngineExistsIsKeptOut) {
  constexpr std::size_t kPages = 32;
  unsigned char* p = KernelWrittenMapping(kPages, 0x4c);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(Engine::KernelWrites(p, kPages * kPage), 0u);  // no engine of ours
  EngineOptions options;
  options.protection = EngineOptions::Protection::kMprotect;
  auto e = NewEngine(options);
  EXPECT_GE(e->Stats().kept_out_pages, kPages);
  ASSERT_TRUE(e->Madvise(p, kPages * kPage, MADV_MERGEABLE).ok());
  e->RunFullScans(3);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  EXPECT_TRUE(AllHold(p, kPages * kPage, 0x4c));
}

// Memory the kernel pins for as long as a registration lasts (io_uring's
// registered buffers) is kept out under every protection, also where
// kernel faults wait for a merge window.
TEST(Engine, KernelPinnedMemoryIsKeptOutUnderEveryProtection) {
  for (auto protection : {EngineOptions::Protection::kAuto,
                          EngineOptions::Protection::kMprotect}) {
    EngineOptions options;
    options.protection = protection;
    auto e = NewEngine(options);
    constexpr std::size_t kPages = 16;
    unsigned char* p = KernelWrittenMapping(kPages, 0x4e);
    ASSERT_NE(p, nullptr);
    ASSERT_TRUE(e->Madvise(p, kPages * kPage, MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    ASSERT_EQ(Counter(*e, "pages_sharing"), kPages - 1);
    EXPECT_EQ(Engine::KernelPins(p, kPages * kPage), kPages)
        << e->Stats().protection;
    EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
    e->RunFullScans(2);
    EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
    EXPECT_TRUE(AllHold(p, kPages * kPage, 0x4e));
    for (std::size_t i = 0; i < kPages; ++i) {
      EXPECT_FALSE(MapsSharedFrame(p + i * kPage)) << i;
    }
  }
}

TEST(Engine, KernelWrittenMemoryStillMergesWhereKernelFaultsWait) {
  auto e = NewEngine();
  if (!e->Stats().kernel_faults_wait) {
    GTEST_SKIP() << "kernel faults do not wait here (" << e->Stats().protection
                 << ", user faults only): the test above covers this case";
  }
  constexpr std::size_t kPages = 32;
  unsigned char* p = KernelWrittenMapping(kPages, 0x4d);
  ASSERT_NE(p, nullptr);
  ASSERT_TRUE(e->Madvise(p, kPages * kPage, MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), kPages - 1);
  // (Ranges other tests of this process had pinned are kept out too.)
  const std::uint64_t kept_before = e->Stats().kept_out_pages;
  EXPECT_EQ(Engine::KernelWrites(p, kPages * kPage), 0u);
  EXPECT_EQ(Counter(*e, "pages_sharing"), kPages - 1);
  EXPECT_EQ(e->Stats().kept_out_pages, kept_before);
  // A read() into merged memory (a kernel write) works and copies the page.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(write(fds[1], "kernel", 6), 6);
  EXPECT_EQ(read(fds[0], p + 5 * kPage, 6), 6);
  close(fds[0]);
  close(fds[1]);
  EXPECT_EQ(std::memcmp(p + 5 * kPage, "kernel", 6), 0);
  EXPECT_EQ(p[4 * kPage], 0x4d);
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), kPages - 2);
}

TEST(Engine, BackgroundScannerMergesWhileRunIsOne) {
  auto e = NewEngine();
  Mapping m(1000);
  for (std::size_t i = 0; i < 1000; ++i) m.FillKey(i, i % 500);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  Set(*e, "pages_to_scan", "5000");
  Set(*e, "sleep_millisecs", "0");
  Set(*e, "run", "1");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (Counter(*e, "pages_sharing") < 500 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  Set(*e, "run", "0");
  EXPECT_EQ(Counter(*e, "pages_sharing"), 500);
  EXPECT_EQ(Counter(*e, "pages_shared"), 500);
  for (std::size_t i = 0; i < 1000; ++i) ASSERT_TRUE(m.HoldsKey(i, i % 500)) << i;
}

// The median time `call` takes while the background scanner runs one batch
// per full scan of unique pages read every time (smart_scan=0), and the
// time of one scan. A call that waited for the batch to end would take
// half a scan on average.
struct CallTimes {
  double median_s = 0, scan_s = 0;
};
CallTimes TimeCallsWhileScanning(Engine& e, const std::function<void()>& call) {
  constexpr std::size_t kPages = 32768;
  Mapping m(kPages);
  for (std::size_t i = 0; i < kPages; ++i) m.FillKey(i, i);
  EXPECT_TRUE(e.Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  Set(e, "smart_scan", "0");
  Set(e, "pages_to_scan", "32768");
  Set(e, "sleep_millisecs", "0");
  using Clock = std::chrono::steady_clock;
  std::vector<double> call_s;
  const std::int64_t scans0 = Counter(e, "full_scans");
  Set(e, "run", "1");
  const auto start = Clock::now();
  // Six scans take 1–5 s in a Debug build here; on a loaded machine (the
  // suite at -j3 beside two busy loops) they once took more than 20 s.
  const auto deadline = start + std::chrono::seconds(90);
  std::int64_t scans = scans0;
  while (scans < scans0 + 6 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(500));  // a monitor
    const auto t0 = Clock::now();
    call();
    call_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    scans = Counter(e, "full_scans");
  }
  CallTimes t;
  t.scan_s = std::chrono::duration<double>(Clock::now() - start).count() /
             double(std::max<std::int64_t>(1, scans - scans0));
  Set(e, "run", "0");
  EXPECT_GE(scans, scans0 + 6)
      << "the scanner did not finish six scans in 90 s";
  std::sort(call_s.begin(), call_s.end());
  t.median_s = call_s[call_s.size() / 2];
  EXPECT_EQ(Counter(e, "pages_sharing"), 0);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(m.HoldsKey(i, i)) << i;
  return t;
}

// A counter read does not wait for the scanner's batch to end, as a read
// of kernel KSM's sysfs files never waits for ksmd.
TEST(Engine, CounterReadsDoNotWaitForTheScannersBatch) {
  auto e = NewEngine();
  const CallTimes t =
      TimeCallsWhileScanning(*e, [&] { (void)Counter(*e, "pages_sharing"); });
  EXPECT_LT(t.median_s, t.scan_s / 4)
      << "reads waited for the batch: median " << t.median_s * 1e3
      << " ms, a scan " << t.scan_s * 1e3 << " ms";
}

// Counters move as the scanner's batch goes on, as kernel KSM's move with
// each merge: a batch of two thousand full scans of a small mapping shows
// its merges and its first scans long before it ends.
TEST(Engine, CountersMoveWithinTheScannersBatch) {
  auto e = NewEngine();
  constexpr std::size_t kPages = 64;
  Mapping m(kPages);
  for (std::size_t i = 0; i < kPages; ++i) m.FillKey(i, i % (kPages / 2));
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  constexpr std::int64_t kScansABatch = 2000;
  Set(*e, "smart_scan", "0");  // every page counts as scanned, every scan
  Set(*e, "pages_to_scan", std::to_string(kPages * kScansABatch).c_str());
  Set(*e, "sleep_millisecs", "10000");
  const std::int64_t scans0 = Counter(*e, "full_scans");
  Set(*e, "run", "1");
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(20);
  std::int64_t scans = scans0, sharing = 0;
  while (sharing < std::int64_t{kPages / 2} &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    sharing = Counter(*e, "pages_sharing");
    scans = Counter(*e, "full_scans");
  }
  Set(*e, "run", "0");
  EXPECT_EQ(sharing, std::int64_t{kPages / 2});
  // Seen after the second scan, and long before the batch's last.
  EXPECT_GE(scans, scans0 + 1);
  EXPECT_LT(scans, scans0 + kScansABatch / 2)
      << "the merges showed only when the batch ended";
  for (std::size_t i = 0; i < kPages; ++i)
    ASSERT_TRUE(m.HoldsKey(i, i % (kPages / 2))) << i;
}

// A control call pauses the scanner's batch instead of waiting for its
// end, as kernel KSM holds a process's mmap lock for a page or so at a time,
// not for pages_to_scan pages. Stats() stands for every call that takes the
// engine's lock (madvise, munmap and mremap of advised memory, knob writes,
// fork) without work of its own that would blur the wait.
TEST(Engine, ControlCallsPauseTheScannersBatch) {
  auto e = NewEngine();
  std::uint64_t advised = 0;
  const CallTimes t =
      TimeCallsWhileScanning(*e, [&] { advised = e->Stats().advised_pages; });
  EXPECT_EQ(advised, 32768u);
  EXPECT_LT(t.median_s, t.scan_s / 4)
      << "control calls waited for the batch: median " << t.median_s * 1e3
      << " ms, a scan " << t.scan_s * 1e3 << " ms";
}

TEST(Engine, MergeAnyCoversMappingsWithoutMadvise) {
  auto e = NewEngine();
  Mapping m(32);
  m.FillAll(0x77);
  ASSERT_TRUE(e->SetMergeAny(true).ok());
  EXPECT_TRUE(e->MergeAny());
  Mapping later(32);  // made after merge-any was turned on
  later.FillAll(0x78);
  e->RunFullScans(3);
  for (std::size_t i = 0; i < 32; ++i) {
    EXPECT_TRUE(MapsSharedFrame(m.page(i))) << i;
    EXPECT_TRUE(MapsSharedFrame(later.page(i))) << i;
    EXPECT_TRUE(m.Holds(i, 0x77));
    EXPECT_TRUE(later.Holds(i, 0x78));
  }
  EXPECT_GE(Counter(*e, "pages_sharing"), 62);
  EXPECT_NE(e->KsmStatText().find("ksm_merge_any: yes"), std::string::npos);
  ASSERT_TRUE(e->SetMergeAny(false).ok());
  EXPECT_FALSE(e->MergeAny());
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  for (std::size_t i = 0; i < 32; ++i) {
    EXPECT_FALSE(MapsSharedFrame(m.page(i))) << i;
    EXPECT_TRUE(m.Holds(i, 0x77));
  }
  EXPECT_NE(e->KsmStatText().find("ksm_merge_any: no"), std::string::npos);
}

// Under merge-any the background scanner finds mappings made while it runs
// (its look for them is rate-limited, not dropped) and merges them.
TEST(Engine, MergeAnyBackgroundScannerMergesMappingsMadeWhileItRuns) {
  auto e = NewEngine();
  Mapping keep(64);
  keep.FillAll(0x31);
  ASSERT_TRUE(e->SetMergeAny(true).ok());
  Set(*e, "pages_to_scan", "5000");
  Set(*e, "sleep_millisecs", "0");
  Set(*e, "run", "1");
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (Counter(*e, "pages_sharing") < 63 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(Counter(*e, "pages_sharing"), 63);
  Mapping later(64);  // made while the scanner runs, never advised
  later.FillAll(0x32);
  bool merged = false;
  while (!merged && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    merged = Counter(*e, "pages_sharing") >= 126;
  }
  Set(*e, "run", "0");
  EXPECT_TRUE(merged) << "pages_sharing " << Counter(*e, "pages_sharing");
  for (std::size_t i = 0; i < 64; ++i) {
    EXPECT_TRUE(later.Holds(i, 0x32)) << i;
    EXPECT_TRUE(keep.Holds(i, 0x31)) << i;
  }
  ASSERT_TRUE(e->SetMergeAny(false).ok());
}

// After fork the child maps the parent's frames: the parent must never free
// them, whatever it merges, writes or unmerges later.
TEST(Engine, ForkChildAndParentSeeOnlyTheirOwnWrites) {
  auto e = NewEngine();
  constexpr std::size_t kPages = 64;
  Mapping m(kPages);
  m.FillAll('A');
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPages) - 1);

  int to_child[2], to_parent[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(to_parent), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: own write visible only here; then wait until the parent has
    // written everything and rescanned, and check nothing changed here.
    int code = 0;
    m.page(0)[0] = 'C';
    for (std::size_t i = 1; i < kPages; ++i) code |= m.Holds(i, 'A') ? 0 : 1;
    char c = 'r';
    if (write(to_parent[1], &c, 1) != 1) code |= 2;
    if (read(to_child[0], &c, 1) != 1) code |= 4;
    for (std::size_t i = 1; i < kPages; ++i) code |= m.Holds(i, 'A') ? 0 : 8;
    code |= m.page(0)[0] == 'C' ? 0 : 16;
    _exit(code);
  }
  char c;
  ASSERT_EQ(read(to_parent[0], &c, 1), 1);
  // Parent: copy every page away, so the old frame has no sharer here, and
  // rescan: the frame is released, but must not be freed (the child maps it).
  for (std::size_t i = 0; i < kPages; ++i) m.Fill(i, 'P');
  e->RunFullScans(3);
  EXPECT_EQ(m.page(0)[0], 'P');
  ASSERT_EQ(write(to_child[1], "x", 1), 1);
  int status = 0;
  pid_t r = 0;
  for (int i = 0; i < 2000 && (r = waitpid(pid, &status, WNOHANG)) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (r == 0) kill(pid, SIGKILL), waitpid(pid, &status, 0);
  ASSERT_EQ(r, pid) << "child did not finish";
  ASSERT_TRUE(WIFEXITED(status)) << "child died: signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child saw foreign data, bits="
                                    << WEXITSTATUS(status);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(m.Holds(i, 'P')) << i;
  EXPECT_GT(e->Stats().frames_pinned, 0u);
  // The parent's new identical pages merge again, and nothing is corrupted.
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPages) - 1);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(m.Holds(i, 'P')) << i;
  for (int fd : {to_child[0], to_child[1], to_parent[0], to_parent[1]}) close(fd);
}

// A forked child keeps its mergeable ranges and merges on its own, with its
// own frames, while the parent's frames stay intact for both. Its counters
// are its own from its first read on, not the values its parent published.
TEST(Engine, ForkedChildMergesItsOwnPages) {
  auto e = NewEngine();
  constexpr std::size_t kPages = 32;
  Mapping m(kPages);
  m.FillAll('A');
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPages) - 1);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int code = 0;
    const std::int64_t first_read = Counter(*e, "full_scans");
    (void)e->Stats();  // a control call: the child's own engine by now
    if (Counter(*e, "full_scans") != first_read) code |= 16;
    for (std::size_t i = 0; i < kPages; ++i) m.Fill(i, 'K');  // all copied
    e->RunFullScans(3);
    if (Counter(*e, "pages_sharing") != std::int64_t(kPages) - 1) code |= 1;
    for (std::size_t i = 0; i < kPages; ++i) {
      if (!m.Holds(i, 'K')) code |= 2;
      if (!MapsSharedFrame(m.page(i))) code |= 4;
    }
    m.page(5)[0] = 'x';  // copy-on-write in the child's own frames
    if (m.page(6)[0] != 'K') code |= 8;
    _exit(code);
  }
  int status = 0;
  pid_t r = 0;
  for (int i = 0; i < 4000 && (r = waitpid(pid, &status, WNOHANG)) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (r == 0) kill(pid, SIGKILL), waitpid(pid, &status, 0);
  ASSERT_EQ(r, pid) << "child did not finish";
  ASSERT_TRUE(WIFEXITED(status)) << "child died: signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "bits " << WEXITSTATUS(status);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(m.Holds(i, 'A')) << i;
  EXPECT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPages) - 1);
}

// VmFlags of every mapping that overlaps [start, end), from smaps.
std::vector<std::string> VmFlagsOver(const void* start, std::size_t len) {
  const auto lo = reinterpret_cast<std::uintptr_t>(start);
  const auto hi = lo + len;
  std::ifstream in("/proc/self/smaps");
  std::vector<std::string> out;
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    unsigned long a, b;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2 &&
        line.find(':') > line.find(' ')) {
      inside = a < hi && b > lo;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      out.push_back(line);
    }
  }
  return out;
}

// True in a forked child if none of the pages is mapped there.
// Runs `body` in a forked child: its exit code, or -1 if the child did not
// exit within 10 s (then killed, by its pid) or died of a signal.
template <typename Body>
int InChild(Body body) {
  const pid_t pid = fork();
  if (pid == 0) _exit(body());
  int status = 0;
  pid_t r = 0;
  for (int i = 0; i < 2000 && (r = waitpid(pid, &status, WNOHANG)) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (r == 0) kill(pid, SIGKILL), waitpid(pid, &status, 0);
  return r == pid && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool ChildSeesNoMapping(const Mapping& m) {
  return InChild([&] {
           int mapped = 0;
           for (std::size_t i = 0; i < m.pages(); ++i) {
             // msync fails with ENOMEM on an address that is not mapped.
             if (msync(m.page(i), kPage, MS_ASYNC) == 0 || errno != ENOMEM)
               ++mapped;
           }
           return mapped == 0 ? 0 : 1;
         }) == 0;
}

// Kernel KSM puts a forked child's memory behind ksmd's cursor: the child
// is first scanned once ksmd has gone round the rest. Here a child's
// scanner waits as long as a full scan of its parent takes (2,000 pages at
// 100 every 100 ms: 2 s), so a child that lives less is never scanned;
// then it scans and merges on its own. Until 2026-12-07 it started 20 ms
// after the fork, whatever the parent's pace.
TEST(Engine, ForkedChildIsScannedAfterAFullScanOfItsParent) {
  if (kUnderThreadSanitizer)
    GTEST_SKIP() << "the child's scanner thread would end it (runtime)";
  // g++ 12's AddressSanitizer does not take its allocator's locks across
  // fork(): the parent's scanner, allocating as it scans, can leave one
  // held in the child, whose next allocation then waits for good.
  if (kUnderSanitizer)
    GTEST_SKIP() << "the sanitizer's allocator may be locked in the child";
  auto e = NewEngine();
  constexpr std::size_t kPages = 2000;
  Mapping m(kPages);
  m.FillAll('f');
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  Set(*e, "pages_to_scan", "100");
  Set(*e, "sleep_millisecs", "100");
  Set(*e, "run", "1");
  const auto forked = std::chrono::steady_clock::now();
  auto since_fork = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                         forked)
        .count();
  };
  const int code = InChild([&] {
    int bits = 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    // A control call: the child's own engine (and counters) from here on.
    if (Counter(*e, "pages_scanned") != 0) bits |= 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(700));
    if (Counter(*e, "pages_scanned") != 0) bits |= 2;  // 1 s after the fork
    while (Counter(*e, "pages_scanned") == 0 && since_fork() < 6) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (Counter(*e, "pages_scanned") == 0) bits |= 4;
    Set(*e, "pages_to_scan", "5000");
    Set(*e, "sleep_millisecs", "0");
    while (Counter(*e, "pages_sharing") == 0 && since_fork() < 9) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (Counter(*e, "pages_sharing") == 0) bits |= 8;
    for (std::size_t i = 0; i < kPages; ++i) bits |= m.Holds(i, 'f') ? 0 : 16;
    return bits;
  });
  EXPECT_EQ(code, 0) << "bits (1, 2: scanned within 1 s; 4: not by 6 s; "
                        "8: no merge; 16: lost bytes; -1: no exit)";
  Set(*e, "run", "0");
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(m.Holds(i, 'f')) << i;
}

// QEMU marks guest RAM MADV_DONTFORK: such memory merges, and every mapping
// samepage puts in its place (merged runs, and restored memory after
// unmerging) keeps the advice, so a child never inherits it.
TEST(Engine, DontforkAndDontdumpMemoryMergesAndKeepsItsAdvice) {
  auto e = NewEngine();
  Mapping m(16);
  m.FillAll('d');
  ASSERT_EQ(madvise(m.data(), m.bytes(), MADV_DONTFORK), 0);
  ASSERT_EQ(madvise(m.data(), m.bytes(), MADV_DONTDUMP), 0);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 15);
  EXPECT_TRUE(MapsSharedFrame(m.page(3)));
  auto check_advice = [&](const char* when) {
    const auto flags = VmFlagsOver(m.data(), m.bytes());
    ASSERT_FALSE(flags.empty()) << when;
    for (const std::string& f : flags) {
      EXPECT_NE(f.find(" dc"), std::string::npos) << when << ": " << f;
      EXPECT_NE(f.find(" dd"), std::string::npos) << when << ": " << f;
    }
    EXPECT_TRUE(ChildSeesNoMapping(m)) << when << ": a child inherited it";
  };
  check_advice("merged");
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_UNMERGEABLE).ok());
  EXPECT_FALSE(MapsSharedFrame(m.page(3)));
  check_advice("unmerged");
  for (std::size_t i = 0; i < 16; ++i) EXPECT_TRUE(m.Holds(i, 'd')) << i;
}

// MADV_WIPEONFORK memory is never merged: a frame mapped in its place would
// hand its bytes to a child, which must see zeros. Here the flag is set
// after the engine first read the process's flags, and the advice itself
// reads none (it asks the kernel only for the VMAs of its range): the flags
// are read before any page of the advised memory is touched. (Whether that
// read is the one advice asks for or one that the engine's own growth
// asks for, the backend test AdviceReadsNoSmapsButFlagsAreReadBeforeATouch
// tells apart.)
TEST(Engine, WipeOnForkMemoryIsNeverMergedAndChildrenSeeItWiped) {
  Mapping plain(16), wiped(16);
  plain.FillAll('w');
  wiped.FillAll('w');
  auto e = NewEngine();
  ASSERT_TRUE(e->Madvise(plain.data(), plain.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 15);
  ASSERT_EQ(madvise(wiped.data(), wiped.bytes(), MADV_WIPEONFORK), 0);
  ASSERT_TRUE(e->Madvise(wiped.data(), wiped.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(3);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 15) << "only plain merges";
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_TRUE(MapsSharedFrame(plain.page(i))) << i;
    EXPECT_FALSE(MapsSharedFrame(wiped.page(i))) << i;
  }
  const int child = InChild([&] {
    int code = 0;
    for (std::size_t i = 0; i < 16; ++i) {
      code |= wiped.Holds(i, 0) ? 0 : 1;
      code |= plain.Holds(i, 'w') ? 0 : 2;
    }
    return code;
  });
  EXPECT_EQ(child, 0) << "bit 1: the child saw wiped memory's bytes";
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_TRUE(wiped.Holds(i, 'w')) << i;
    EXPECT_TRUE(plain.Holds(i, 'w')) << i;
  }
}

// A field of /proc/self/status in KiB (VmLck: the process's locked_vm).
long StatusKib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      return std::stol(line.substr(field.size() + 1));
    }
  }
  return -1;
}

// True if every mapping over [start, start + len) is (or none is) locked.
bool AllLocked(const void* start, std::size_t len, bool locked) {
  const auto flags = VmFlagsOver(start, len);
  if (flags.empty()) return false;
  for (const std::string& f : flags) {
    if ((f.find(" lo") != std::string::npos) != locked) return false;
  }
  return true;
}

// Kernel KSM merges locked memory and the merged page stays locked. So does
// samepage: every mapping it puts in place is locked again (VmFlags "lo",
// locked_vm unchanged), and the lock survives writes, mlock of merged
// memory and unmerging; munlock unlocks it and merging goes on.
// Zero pages (use_zero_pages=0) cannot be dropped while locked
// (MADV_DONTNEED refuses locked memory): they map a frame of zeros.
void LockedMemoryMergesAndStaysLocked(unsigned char fill) {
  if (kUnderSanitizer)
    GTEST_SKIP() << "the sanitizer's runtime makes mlock() a no-op";
  auto e = NewEngine();
  const long base = StatusKib("VmLck");
  Mapping m(16);
  m.FillAll(fill);
  ASSERT_EQ(mlock(m.data(), m.bytes()), 0) << std::strerror(errno);
  ASSERT_EQ(StatusKib("VmLck"), base + 64);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 15);
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_TRUE(MapsSharedFrame(m.page(i))) << i;
  }
  EXPECT_TRUE(AllLocked(m.data(), m.bytes(), true)) << "merged";
  EXPECT_EQ(StatusKib("VmLck"), base + 64) << "merged";
  EXPECT_EQ(e->Stats().lock_skips, 0u);
  EXPECT_EQ(e->Stats().locks_lost, 0u);

  // A write copies the page and nothing else.
  m.page(3)[7] = 'x';
  EXPECT_EQ(m.page(3)[7], 'x');
  EXPECT_TRUE(m.Holds(4, fill));

  // munlock unlocks it all; merging goes on.
  ASSERT_EQ(munlock(m.data(), m.bytes()), 0);
  EXPECT_TRUE(AllLocked(m.data(), m.bytes(), false)) << "munlocked";
  EXPECT_EQ(StatusKib("VmLck"), base);
  m.page(3)[7] = fill;
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 15);

  // mlock of merged memory populates it with write faults, which copy the
  // pages (kernel KSM's too); the scanner merges them again, locked.
  ASSERT_EQ(mlock(m.data(), m.bytes()), 0) << std::strerror(errno);
  e->RunFullScans(3);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 15);
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_TRUE(MapsSharedFrame(m.page(i))) << i;
  }
  EXPECT_TRUE(AllLocked(m.data(), m.bytes(), true)) << "locked again";
  EXPECT_EQ(StatusKib("VmLck"), base + 64);

  // Unmerging gives back locked anonymous memory.
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_UNMERGEABLE).ok());
  EXPECT_FALSE(MapsSharedFrame(m.page(3)));
  EXPECT_TRUE(AllLocked(m.data(), m.bytes(), true)) << "unmerged";
  EXPECT_EQ(StatusKib("VmLck"), base + 64);
  for (std::size_t i = 0; i < 16; ++i) EXPECT_TRUE(m.Holds(i, fill)) << i;
  EXPECT_EQ(e->Stats().locks_lost, 0u);
  ASSERT_EQ(munlock(m.data(), m.bytes()), 0);
}

TEST(Engine, LockedMemoryMergesAndStaysLocked) { LockedMemoryMergesAndStaysLocked('l'); }

TEST(Engine, LockedZeroPagesMergeAndStayLocked) { LockedMemoryMergesAndStaysLocked(0); }

// While it lasts, this thread has no CAP_IPC_LOCK in its effective set and
// RLIMIT_MEMLOCK is what the process has locked plus `extra_kib` (negative:
// the limit was lowered below it, as setrlimit allows).
class LockLimit {
 public:
  explicit LockLimit(long extra_kib) {
    header_.version = _LINUX_CAPABILITY_VERSION_3;
    ok_ = syscall(SYS_capget, &header_, saved_) == 0 &&
          getrlimit(RLIMIT_MEMLOCK, &limit_) == 0;
    if (!ok_) return;
    __user_cap_data_struct caps[2];
    std::memcpy(caps, saved_, sizeof(caps));
    caps[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
    rlimit lowered = limit_;
    lowered.rlim_cur =
        static_cast<rlim_t>(StatusKib("VmLck") + extra_kib) * 1024;
    ok_ = syscall(SYS_capset, &header_, caps) == 0 &&
          setrlimit(RLIMIT_MEMLOCK, &lowered) == 0;
  }
  ~LockLimit() {
    setrlimit(RLIMIT_MEMLOCK, &limit_);
    syscall(SYS_capset, &header_, saved_);
  }
  bool ok() const { return ok_; }

 private:
  __user_cap_header_struct header_ = {};
  __user_cap_data_struct saved_[2] = {};
  rlimit limit_ = {};
  bool ok_ = false;
};

// Replacing a locked page unlocks it for a moment. At RLIMIT_MEMLOCK
// exactly, locking it again is allowed (the kernel merges at any limit);
// beyond it (the limit lowered below what is locked), samepage could not
// lock it again and leaves it alone: locked, unmerged, counted. Once there
// is room again it merges.
TEST(Engine, LockedMemoryIsLeftAloneWithoutRoomToLockItAgain) {
  if (kUnderSanitizer)
    GTEST_SKIP() << "the sanitizer's runtime makes mlock() a no-op";
  auto e = NewEngine();
  Mapping m(16), n(16);
  m.FillAll('r');
  n.FillAll('n');
  ASSERT_EQ(mlock(m.data(), m.bytes()), 0) << std::strerror(errno);
  ASSERT_EQ(mlock(n.data(), n.bytes()), 0) << std::strerror(errno);
  const long locked = StatusKib("VmLck");
  {
    LockLimit at_limit(0);
    ASSERT_TRUE(at_limit.ok()) << std::strerror(errno);
    ASSERT_NE(mlock(m.data(), m.bytes() + kPage), 0) << "room left to lock";
    ASSERT_TRUE(e->Madvise(n.data(), n.bytes(), MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    EXPECT_EQ(Counter(*e, "pages_sharing"), 15);
    EXPECT_TRUE(AllLocked(n.data(), n.bytes(), true));
    EXPECT_EQ(e->Stats().lock_skips, 0u);
  }
  {
    LockLimit beyond(-4);
    ASSERT_TRUE(beyond.ok()) << std::strerror(errno);
    ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    EXPECT_EQ(Counter(*e, "pages_sharing"), 15) << "only n merged";
    EXPECT_GT(e->Stats().lock_skips, 0u);
    EXPECT_FALSE(MapsSharedFrame(m.page(3)));
    EXPECT_TRUE(AllLocked(m.data(), m.bytes(), true));
    EXPECT_EQ(StatusKib("VmLck"), locked);
    for (std::size_t i = 0; i < 16; ++i) EXPECT_TRUE(m.Holds(i, 'r')) << i;
    m.page(2)[0] = 'w';  // still writable
    m.page(2)[0] = 'r';
  }
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 30);
  EXPECT_TRUE(AllLocked(m.data(), m.bytes(), true));
  EXPECT_EQ(StatusKib("VmLck"), locked);
  EXPECT_EQ(e->Stats().locks_lost, 0u);
  ASSERT_EQ(munlock(m.data(), m.bytes()), 0);
  ASSERT_EQ(munlock(n.data(), n.bytes()), 0);
}

// The memory right above a merging thread's stack merges like any other:
// the thread's TLS and TCB, which samepage keeps out of merging, end where
// its stack block ends (until this change the allowance for the TCB ran a
// page past it, and that page of the program never merged).
struct StackTopArgs {
  Engine* engine;
  unsigned char* data;  // just above the thread's stack
  std::size_t pages;
  bool madvised;
};

void* MergeFromThreadOnStack(void* arg) {
  auto* a = static_cast<StackTopArgs*>(arg);
  a->madvised =
      a->engine->Madvise(a->data, a->pages * kPage, MADV_MERGEABLE).ok();
  a->engine->RunFullScans(2);  // this thread merges: its stack is excluded
  return nullptr;
}

TEST(Engine, PagesRightAboveAMergingThreadsStackMerge) {
  auto e = NewEngine();
  // ThreadSanitizer's runtime wants 900 KiB of a thread's own stack.
  constexpr std::size_t kStackPages = kUnderSanitizer ? 512 : 64;
  constexpr std::size_t kDataPages = 8;
  Mapping block(kStackPages + kDataPages);
  unsigned char* data = block.page(kStackPages);
  std::memset(data, 'S', kDataPages * kPage);
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstack(&attr, block.data(), kStackPages * kPage), 0);
  StackTopArgs args{e.get(), data, kDataPages, false};
  pthread_t t;
  ASSERT_EQ(pthread_create(&t, &attr, MergeFromThreadOnStack, &args), 0);
  pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
  ASSERT_TRUE(args.madvised);
  EXPECT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kDataPages) - 1);
  for (std::size_t i = 0; i < kDataPages; ++i) {
    EXPECT_TRUE(MapsSharedFrame(data + i * kPage)) << "page " << i;
    EXPECT_EQ(std::count(data + i * kPage, data + (i + 1) * kPage, 'S'),
              std::ptrdiff_t(kPage))
        << i;
  }
}

// Runs `body` in a forked child, waited for by pid for at most 20 s (then
// killed); returns its exit code, or -1 if it died or did not finish.
int RunInChild(const std::function<int()>& body) {
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) _exit(body());
  int status = 0;
  pid_t r = 0;
  for (int i = 0; i < 4000 && (r = waitpid(pid, &status, WNOHANG)) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (r == 0) kill(pid, SIGKILL), waitpid(pid, &status, 0);
  return r == pid && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Merges 32 pages of 'v' in a fresh engine and checks them; 0 if all is
// well, else bits from `bit` up.
int MergeAndCheck(unsigned char v, int bit) {
  std::unique_ptr<Engine> e;
  if (!Engine::Create({}, &e).ok()) return bit;
  Mapping m(32);
  m.FillAll(v);
  if (!e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok()) return bit << 1;
  e->RunFullScans(2);
  int code = 0;
  if (Counter(*e, "pages_sharing") != 31) code |= bit << 2;
  for (std::size_t i = 0; i < m.pages(); ++i) {
    if (!m.Holds(i, v) || !MapsSharedFrame(m.page(i))) code |= bit << 3;
  }
  m.page(3)[0] = 'w';  // copy-on-write
  if (!m.Holds(4, v) || m.page(3)[0] != 'w') code |= bit << 4;
  return code;
}

// Under an address-space limit (ulimit -v: RLIMIT_AS) samepage takes
// address space for the frames it uses, not for all it could hold: until
// this change a 1 TiB reservation for the frame view failed every engine
// (samepage run answered ENOMEM to every knob).
TEST(Engine, MergesUnderAnAddressSpaceLimit) {
  const int code = RunInChild([] {
    const long vm_kib = StatusKib("VmSize");
    rlimit lim;
    lim.rlim_cur = lim.rlim_max =
        static_cast<rlim_t>(vm_kib + 256 * 1024) * 1024;
    if (vm_kib <= 0 || setrlimit(RLIMIT_AS, &lim) != 0) return 1;
    return MergeAndCheck('v', 2);
  });
  EXPECT_EQ(code, 0) << "bits " << code
                     << " (2: the engine could not be created)";
}

// What samepage maps for itself grows with the frames it uses: VmSize, and
// what an mlockall(MCL_CURRENT) counts in locked_vm (RLIMIT_MEMLOCK for an
// unprivileged process: until this change VmSize and VmLck took 1 TiB more,
// the reservation for the frame view). Locked memory then merges again,
// locked.
TEST(Engine, AddressSpaceTakenGrowsWithTheFramesUsed) {
  if (kUnderSanitizer)
    GTEST_SKIP() << "checks the address space taken, which the sanitizer's own "
                    "mappings move";
  const int code = RunInChild([] {
    const long before_kib = StatusKib("VmSize");
    std::unique_ptr<Engine> e;
    if (!Engine::Create({}, &e).ok()) return 1;
    Mapping m(32);
    m.FillAll('l');
    if (!e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok()) return 1;
    e->RunFullScans(2);  // the frame view exists
    int code = 0;
    if (StatusKib("VmSize") - before_kib > 256 * 1024) code |= 2;
    if (mlockall(MCL_CURRENT | MCL_ONFAULT) != 0) {
      // Refused without CAP_IPC_LOCK where VmSize exceeds RLIMIT_MEMLOCK,
      // as it would be natively: then only VmSize is checked.
      rlimit lim;
      const bool refused = errno == ENOMEM && geteuid() != 0 &&
                           getrlimit(RLIMIT_MEMLOCK, &lim) == 0 &&
                           StatusKib("VmSize") * 1024 > long(lim.rlim_cur);
      return refused ? code : code | 4;
    }
    if (StatusKib("VmLck") - before_kib > 256 * 1024) code |= 8;
    e->RunFullScans(2);  // locked now: merged again, and locked
    if (Counter(*e, "pages_sharing") != 31) code |= 16;
    for (std::size_t i = 0; i < m.pages(); ++i) {
      if (!m.Holds(i, 'l')) code |= 32;
    }
    if (!AllLocked(m.data(), m.bytes(), true)) code |= 64;
    munlockall();
    return code;
  });
  EXPECT_EQ(code, 0) << "bits " << code;
}

// Application threads keep writing while the scanner merges at full speed:
// every increment must survive, in both write-protection modes.
// (protection, writers, zeroing). With one writer every pass leaves all
// pages alike: one run of identical pages, laid over 32 frames
// (max_page_sharing 16) while the writer breaks it again. Zeroing writers
// set their counters back to 0 every other pass: the pages are then all
// zeros, dropped to the zero page (use_zero_pages=0 too), and the next pass
// writes into dropped pages and pages being dropped.
class ConcurrentWriters
    : public ::testing::TestWithParam<std::tuple<EngineOptions::Protection, int, bool>> {};

TEST_P(ConcurrentWriters, LoseNoWrite) {
  EngineOptions options;
  options.protection = std::get<0>(GetParam());
  auto e = NewEngine(options);
  constexpr std::size_t kPages = 512;
  const int kWriters = std::get<1>(GetParam());
  const bool zeroing = std::get<2>(GetParam());
  Mapping m(kPages);
  m.FillAll(0);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  if (kWriters == 1) Set(*e, "max_page_sharing", "16");
  Set(*e, "pages_to_scan", "10000");
  Set(*e, "sleep_millisecs", "0");
  Set(*e, "run", "1");
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> full_scans{0};  // published by the main thread
  std::vector<std::vector<std::uint64_t>> expected(
      kWriters, std::vector<std::uint64_t>(kPages / kWriters, 0));
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      // Writer w owns pages w, w + kWriters, ...; a pass increments a counter
      // at offset 8*w of each, so after each pass its pages are identical
      // again and get merged, and the next pass breaks them by COW.
      std::mt19937 rng(w);
      for (std::uint64_t pass = 0; !stop.load(std::memory_order_relaxed); ++pass) {
        const bool zero_pass = zeroing && pass % 2 == 1;
        for (std::size_t k = 0; k < kPages / kWriters; ++k) {
          auto* counter = reinterpret_cast<volatile std::uint64_t*>(
              m.page(k * kWriters + w) + 8 * w);
          *counter = zero_pass ? 0 : *counter + 1;
          expected[w][k] = zero_pass ? 0 : expected[w][k] + 1;
          ASSERT_EQ(*counter, expected[w][k]);
        }
        // Pause now and then for a few full scans, so that the pages stay
        // unchanged long enough to merge; the next pass then meets merges in
        // progress and merged pages alike.
        // Mixed on purpose: some passes wait for scans (merges happen),
        // some follow after a random short delay (writes race merges in
        // their windows), some follow at once.
        const unsigned mode = rng() % 3;
        if (mode == 0) {
          const auto scans = full_scans.load();
          const auto until = std::chrono::steady_clock::now() +
                             std::chrono::milliseconds(300);
          while (full_scans.load() < scans + 3 &&
                 std::chrono::steady_clock::now() < until) {
            std::this_thread::sleep_for(std::chrono::microseconds(200));
          }
        } else if (mode == 1) {
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
        }
      }
    });
  }
  // Watch merging happen while the writers run.
  // At least 1.5 s, and until merging has been seen (at most 10 s: slow
  // builds scan slowly).
  std::int64_t max_sharing = 0;
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() < start + std::chrono::milliseconds(1500) ||
         (max_sharing == 0 &&
          std::chrono::steady_clock::now() < start + std::chrono::seconds(10))) {
    max_sharing = std::max(max_sharing, Counter(*e, "pages_sharing"));
    full_scans = Counter(*e, "full_scans");
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  stop = true;
  for (auto& t : writers) t.join();
  Set(*e, "run", "0");
  const EngineStats stats = e->Stats();
  for (int w = 0; w < kWriters; ++w) {
    for (std::size_t k = 0; k < kPages / kWriters; ++k) {
      const auto* counter = reinterpret_cast<const std::uint64_t*>(
          m.page(k * kWriters + w) + 8 * w);
      ASSERT_EQ(*counter, expected[w][k]) << "writer " << w << " page " << k;
    }
  }
  EXPECT_GT(Counter(*e, "full_scans"), 2);
  EXPECT_GT(max_sharing, 0) << "the writers never met a merge";
  std::printf("[ info ] protection=%s: %ld full scans, up to %ld pages "
              "sharing, %lu merges refused, %lu writes waited in the fault "
              "handler\n",
              stats.protection.c_str(), (long)Counter(*e, "full_scans"),
              (long)max_sharing, (unsigned long)stats.merge_failures,
              (unsigned long)stats.protect_faults);
}

INSTANTIATE_TEST_SUITE_P(
    Engine, ConcurrentWriters,
    ::testing::Combine(::testing::Values(EngineOptions::Protection::kMprotect,
                                         EngineOptions::Protection::kAuto),
                       ::testing::Values(2, 1), ::testing::Bool()),
    [](const auto& info) {
      const bool mprotect =
          std::get<0>(info.param) == EngineOptions::Protection::kMprotect;
      return std::string(mprotect ? "Mprotect" : "Auto") +
             (std::get<1>(info.param) == 1 ? "OneWriterRuns" : "TwoWriters") +
             (std::get<2>(info.param) ? "Zeroing" : "");
    });

TEST(Engine, VmaBudgetExhaustedDegradesGracefully) {
  EngineOptions options;
  options.vma_budget = 16;
  auto e = NewEngine(options);
  // Scattered pairs: each merge needs mappings of its own.
  constexpr std::size_t kPages = 400;
  Mapping m(kPages);
  // Page i < 200 holds key i; its twin sits at a random place in the upper
  // half, so no two merges form a run.
  std::vector<std::uint64_t> key(kPages);
  for (std::size_t i = 0; i < kPages / 2; ++i) key[i] = key[kPages / 2 + i] = i;
  std::shuffle(key.begin() + kPages / 2, key.end(), std::mt19937(7));
  for (std::size_t i = 0; i < kPages; ++i) m.FillKey(i, key[i]);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(3);
  const EngineStats s = e->Stats();
  EXPECT_GT(s.budget_skips, 0u);
  EXPECT_LE(s.vmas_used, s.vma_budget);
  const auto saved = Counter(*e, "pages_sharing");
  EXPECT_GT(saved, 0);
  EXPECT_LT(saved, std::int64_t(kPages / 2));
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(m.HoldsKey(i, key[i])) << i;
    m.page(i)[5] = 1;  // every page still writable
  }
}

// The budget charges the worst case, 4 mappings per scattered pair, but the
// kernel often holds fewer (neighbours were split already, consecutive
// frames join): before refusing, the engine counts the real mappings.
TEST(Engine, VmaBudgetCountsRealMappingsBeforeRefusing) {
  constexpr std::size_t kPairs = 1000;
  EngineOptions options;
  options.vma_budget = 3 * kPairs;  // under the 4 * kPairs charged
  auto e = NewEngine(options);
  Mapping m(2 * kPairs);
  std::vector<std::uint64_t> key(2 * kPairs);
  for (std::size_t i = 0; i < kPairs; ++i) key[i] = key[kPairs + i] = i;
  std::shuffle(key.begin() + kPairs, key.end(), std::mt19937(11));
  for (std::size_t i = 0; i < 2 * kPairs; ++i) m.FillKey(i, key[i]);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(3);
  const EngineStats s = e->Stats();
  EXPECT_EQ(s.budget_skips, 0u);
  EXPECT_LE(s.vmas_used, s.vma_budget);
  EXPECT_EQ(Counter(*e, "pages_sharing"), std::int64_t(kPairs));
  for (std::size_t i = 0; i < 2 * kPairs; ++i) {
    ASSERT_TRUE(m.HoldsKey(i, key[i])) << i;
  }
}

// Metadata per tracked page, as the process's heap sees it (the figure the
// side-by-side benchmark reports): at most 32 bytes for every layout, where
// kernel KSM keeps 64 (its rmap item alone).
class MetadataPerPage : public ::testing::TestWithParam<const char*> {};

TEST_P(MetadataPerPage, StaysUnder32Bytes) {
  constexpr std::size_t kPages = 16384;
  const std::string layout = GetParam();
  std::vector<std::uint64_t> key(kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    key[i] = layout == "unique" ? i : i % (kPages / 2);  // pairs: i, i + N/2
  }
  if (layout == "scattered") {
    std::shuffle(key.begin() + kPages / 2, key.end(), std::mt19937(5));
  }
  const std::int64_t expect_sharing = layout == "unique" ? 0 : kPages / 2;
  auto e = NewEngine();
  Mapping m(kPages);
  for (std::size_t i = 0; i < kPages; ++i) m.FillKey(i, key[i]);
  const auto heap = [] {
    const struct mallinfo2 mi = mallinfo2();
    return std::int64_t(mi.uordblks + mi.hblkhd);
  };
  const std::int64_t before = heap();
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(3);
  const double per_page = double(heap() - before) / kPages;
  EXPECT_EQ(Counter(*e, "pages_sharing"), expect_sharing);
  EXPECT_LE(per_page, 32.0) << layout;
  EXPECT_GT(per_page, 0.0) << layout;  // the items themselves are counted
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_TRUE(m.HoldsKey(i, key[i])) << i;
}

INSTANTIATE_TEST_SUITE_P(Layouts, MetadataPerPage,
                         ::testing::Values("runs", "scattered", "unique"),
                         [](const auto& info) { return std::string(info.param); });

TEST(Engine, MadviseRejectsBadInputLikeTheKernel) {
  auto e = NewEngine();
  Mapping m(4);
  m.FillAll(1);
  EXPECT_EQ(e->Madvise(m.page(0) + 1, kPage, MADV_MERGEABLE).code(), EINVAL);
  EXPECT_EQ(e->Madvise(m.data(), kPage, MADV_DONTNEED).code(), EINVAL);
  EXPECT_EQ(e->Madvise(m.data(), SIZE_MAX, MADV_MERGEABLE).code(), EINVAL);
  EXPECT_TRUE(e->Madvise(m.data(), 0, MADV_MERGEABLE).ok());
  EXPECT_EQ(e->Stats().advised_pages, 0u);  // nothing changed
  // Shared and file-backed mappings are silently ignored.
  Mapping shared(4, MAP_SHARED | MAP_ANONYMOUS);
  shared.FillAll(3);
  EXPECT_TRUE(e->Madvise(shared.data(), shared.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  EXPECT_EQ(e->Stats().advised_pages, 0u);
  // A hole: ENOMEM, and (as the kernel does) the mapped parts are marked.
  void* hole = mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(hole, MAP_FAILED);
  ASSERT_EQ(munmap(static_cast<char*>(hole) + kPage, kPage), 0);
  EXPECT_EQ(e->Madvise(hole, 3 * kPage, MADV_MERGEABLE).code(), ENOMEM);
  EXPECT_EQ(e->Stats().advised_pages, 2u);
  EXPECT_EQ(e->Madvise(hole, 3 * kPage, MADV_UNMERGEABLE).code(), ENOMEM);
  EXPECT_EQ(e->Stats().advised_pages, 0u);
  munmap(hole, 3 * kPage);
}

TEST(Engine, KnobErrorsMatchTheKernel) {
  auto e = NewEngine();
  EXPECT_EQ(e->WriteKnob("run", "3").code(), EINVAL);
  EXPECT_EQ(e->WriteKnob("max_page_sharing", "1").code(), EINVAL);
  EXPECT_EQ(e->WriteKnob("pages_shared", "1").code(), EACCES);
  EXPECT_EQ(e->WriteKnob("no_such_knob", "1").code(), ENOENT);
  std::string text;
  EXPECT_EQ(e->ReadKnob("no_such_knob", &text).code(), ENOENT);
  Mapping m(4);
  m.FillAll(5);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_shared"), 1);
  EXPECT_EQ(e->WriteKnob("max_page_sharing", "300").code(), EBUSY);
  EXPECT_TRUE(e->WriteKnob("max_page_sharing", "256").ok());  // same value
  EXPECT_EQ(Counter(*e, "max_page_sharing"), 256);
}

TEST(Engine, KsmStatReportsThisProcess) {
  auto e = NewEngine();
  Mapping m(8);
  m.FillAll(9);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  const std::string stat = e->KsmStatText();
  EXPECT_NE(stat.find("ksm_rmap_items 8\n"), std::string::npos) << stat;
  EXPECT_NE(stat.find("ksm_merging_pages 8\n"), std::string::npos) << stat;
  EXPECT_NE(stat.find("ksm_mergeable: yes\n"), std::string::npos) << stat;
  EXPECT_EQ(e->KsmMergingPagesText(), "8\n");
}

// The application unmaps advised memory behind samepage's back: the scanner
// notices and never crashes the process.
TEST(Engine, UnmappedMemoryIsNoticedNotRead) {
  auto e = NewEngine();
  void* p = mmap(nullptr, 64 * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  std::memset(p, 4, 64 * kPage);
  ASSERT_TRUE(e->Madvise(p, 64 * kPage, MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 63);
  ASSERT_EQ(munmap(p, 64 * kPage), 0);
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared"), 0);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
}

// Library mode sees no munmap: memory unmapped and mapped anew at the same
// place, where merged pages were, is anonymous memory the program owns.
// Its pages must not be counted as merged, nor keep frames, whether they
// are left untouched, only read (the zero page), or written; they read
// zeros; unmerging everything leaves them alone; advised and filled anew
// they merge again.
TEST(Engine, MemoryMappedAnewWhereMergedPagesWereIsNotCountedMerged) {
  enum Use { kUntouched, kRead, kOneWritten, kAdvisedAgain };
  for (Use use : {kUntouched, kRead, kOneWritten, kAdvisedAgain}) {
    SCOPED_TRACE(use);
    auto e = NewEngine();
    constexpr std::size_t kPages = 64;
    void* p = mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(p, MAP_FAILED);
    std::memset(p, 4, kPages * kPage);
    ASSERT_TRUE(e->Madvise(p, kPages * kPage, MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    ASSERT_EQ(Counter(*e, "pages_sharing"), 63);
    ASSERT_EQ(munmap(p, kPages * kPage), 0);
    ASSERT_EQ(mmap(p, kPages * kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0),
              p);
    auto* b = static_cast<volatile unsigned char*>(p);
    if (use == kRead) {
      unsigned sum = 0;
      for (std::size_t i = 0; i < kPages; ++i) sum += b[i * kPage];
      EXPECT_EQ(sum, 0u);
    }
    if (use == kOneWritten) b[5 * kPage + 1] = 7;
    if (use == kAdvisedAgain) {
      ASSERT_TRUE(e->Madvise(p, kPages * kPage, MADV_MERGEABLE).ok());
      std::memset(p, 6, kPages * kPage);
    }
    e->RunFullScans(2);
    if (use == kAdvisedAgain) {
      EXPECT_EQ(Counter(*e, "pages_shared"), 1);
      EXPECT_EQ(Counter(*e, "pages_sharing"), 63);
      EXPECT_EQ(e->Stats().frames_in_use, 1u);
    } else {
      EXPECT_EQ(Counter(*e, "pages_shared"), 0);
      EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
      EXPECT_EQ(e->Stats().frames_in_use, 0u);
    }
    Set(*e, "run", "2");
    EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
    for (std::size_t i = 0; i < kPages * kPage; ++i) {
      const unsigned char want = use == kAdvisedAgain                       ? 6
                                 : use == kOneWritten && i == 5 * kPage + 1 ? 7
                                                                            : 0;
      ASSERT_EQ(b[i], want) << i;
    }
    b[9 * kPage] = 3;  // still the program's own, writable memory
    EXPECT_EQ(b[9 * kPage], 3);
    ASSERT_EQ(munmap(p, kPages * kPage), 0);
  }
}

bool KernelAtLeast(int major, int minor) {
  utsname u{};
  int ma = 0, mi = 0;
  return uname(&u) == 0 && std::sscanf(u.release, "%d.%d", &ma, &mi) == 2 &&
         (ma > major || (ma == major && mi >= minor));
}

// The same, mapped anew in the middle of a full scan, after the scan read
// the maps: the pages leave the counts as the scan reaches them (the maps
// view still has the frame mapping there; PROCMAP_QUERY, Linux 6.11, says
// what is mapped now), not at some later reading of the maps.
TEST(Engine, MemoryMappedAnewMidScanLeavesTheCountsAtItsVisit) {
  if (!KernelAtLeast(6, 11)) GTEST_SKIP() << "no PROCMAP_QUERY before 6.11";
  auto e = NewEngine();
  constexpr std::size_t kPages = 2048;
  Mapping m(kPages);
  m.FillAll(4);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  const std::int64_t merged =
      Counter(*e, "pages_shared") + Counter(*e, "pages_sharing");
  ASSERT_EQ(merged, static_cast<std::int64_t>(kPages));
  const std::int64_t scans = Counter(*e, "full_scans");
  e->ScanNow(512);  // a new full scan begins: the maps are read
  constexpr std::size_t kFirst = 1024, kCount = 64;
  ASSERT_EQ(munmap(m.page(kFirst), kCount * kPage), 0);
  ASSERT_EQ(mmap(m.page(kFirst), kCount * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0),
            m.page(kFirst));
  // The full scan that read the maps before the change ends, and no other
  // begins.
  for (int i = 0; i < 1000 && Counter(*e, "full_scans") == scans; ++i)
    e->ScanNow(64);
  ASSERT_EQ(Counter(*e, "full_scans"), scans + 1);
  EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"),
            merged - static_cast<std::int64_t>(kCount));
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(m.Holds(i, i >= kFirst && i < kFirst + kCount ? 0 : 4)) << i;
  }
}

// A reservation of 16 TiB (MAP_NORESERVE: a sanitizer's shadow, a
// runtime's heap), advised mergeable: the kernel takes the advice, so does
// samepage (its 48 GB of items are address space until written; the
// std::bad_alloc of calloc's refused 48 GB aborted the program under
// `samepage run` until 2026-12-07), and the pages written in it merge.
TEST(Engine, ATerabyteScaleReservationIsAdvisedAndItsPagesMerge) {
  constexpr std::size_t kBytes = std::size_t{16} << 40;
  void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) GTEST_SKIP() << "no 16 TiB of address space here";
  auto* b = static_cast<unsigned char*>(p);
  constexpr std::size_t kStride = std::size_t{1} << 36;  // 64 GiB apart
  for (std::size_t i = 0; i < kBytes / kStride; ++i)
    std::memset(b + i * kStride, 7, kPage);
  auto e = NewEngine();
  ASSERT_TRUE(e->Madvise(p, kBytes, MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  EXPECT_EQ(Counter(*e, "pages_shared"), 1);
  EXPECT_EQ(Counter(*e, "pages_sharing"),
            static_cast<std::int64_t>(kBytes / kStride) - 1);
  for (std::size_t i = 0; i < kBytes / kStride; ++i) {
    for (std::size_t k = 0; k < kPage; ++k)
      ASSERT_EQ(b[i * kStride + k], 7) << i;
  }
  b[kStride] = 8;  // copy-on-write
  EXPECT_EQ(b[kStride], 8);
  EXPECT_EQ(b[0], 7);
  e.reset();
  ASSERT_EQ(munmap(p, kBytes), 0);
}

// Where the items of an advised range cannot be allocated (here the
// address space limit leaves no room for them), madvise fails with ENOMEM,
// as the kernel's may, and the engine goes on: memory advised before still
// merges.
TEST(Engine, AdviceWithNoRoomForItsMetadataFailsWithEnomem) {
  if (kUnderThreadSanitizer)
    GTEST_SKIP() << "a 1 TiB mapping fits the runtime's layout only at times";
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto e = NewEngine();
    Mapping small(16);
    small.FillAll(3);
    bool ok = e->Madvise(small.data(), small.bytes(), MADV_MERGEABLE).ok();
    constexpr std::size_t kBig = std::size_t{1} << 40;  // items: 3 GiB
    void* big = mmap(nullptr, kBig, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    ok = ok && big != MAP_FAILED;
    // Room for 512 MiB more address space, not for the items.
    std::ifstream status("/proc/self/status");
    std::string line;
    long vm_kib = -1;
    while (std::getline(status, line)) {
      if (line.rfind("VmSize:", 0) == 0) vm_kib = std::stol(line.substr(7));
    }
    rlimit lim{};
    lim.rlim_cur = lim.rlim_max =
        static_cast<rlim_t>(vm_kib) * 1024 + (std::size_t{512} << 20);
    ok = ok && vm_kib > 0 && setrlimit(RLIMIT_AS, &lim) == 0;
    const Status st = e->Madvise(big, kBig, MADV_MERGEABLE);
    ok = ok && st.code() == ENOMEM;
    e->RunFullScans(2);
    ok = ok && Counter(*e, "pages_sharing") == 15;
    for (std::size_t i = 0; i < small.pages(); ++i)
      ok = ok && small.Holds(i, 3);
    std::fprintf(stderr, "madvise: %s\n", st.ToString().c_str());
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

}  // namespace
}  // namespace samepage::testing
namespace samepage::testing {
namespace {
// Pages i and i + half of m hold key i (pairs in runs), merged.
void MergeHalves(Engine& e, Mapping& m) {
  const std::size_t half = m.pages() / 2;
  for (std::size_t i = 0; i < m.pages(); ++i) m.FillKey(i, i % half);
  ASSERT_TRUE(e.Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e.RunFullScans(2);
  ASSERT_EQ(Counter(e, "pages_sharing"), static_cast<std::int64_t>(half));
}

// Moves `pages` pages at `from` elsewhere with mremap (the kernel alone:
// library mode sees nothing); nullptr if it cannot.
unsigned char* MoveAway(unsigned char* from, std::size_t pages) {
  void* dst = mmap(nullptr, pages * kPage, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (dst == MAP_FAILED) return nullptr;
  void* moved = mremap(from, pages * kPage, pages * kPage,
                       MREMAP_MAYMOVE | MREMAP_FIXED, dst);
  return moved == dst ? static_cast<unsigned char*>(moved) : nullptr;
}

// MergeHalves, then the second half out of the scanner's sight, unseen:
// made read-only, or moved away (*moved: where it is now).
void MergeHalvesAndLoseSight(Engine& e, Mapping& m, bool read_only,
                             unsigned char** moved) {
  ASSERT_NO_FATAL_FAILURE(MergeHalves(e, m));
  const std::size_t half = m.pages() / 2;
  *moved = m.page(half);
  if (read_only) {
    ASSERT_EQ(mprotect(*moved, half * kPage, PROT_READ), 0);
  } else {
    *moved = MoveAway(m.page(half), half);
    ASSERT_NE(*moved, nullptr) << std::strerror(errno);
    m.Shrink(half);  // its hole may hold other memory by the end
  }
}

// Page i at p holds key i as Mapping::FillKey writes it.
void ExpectKeys(const unsigned char* p, std::size_t pages) {
  for (std::size_t i = 0; i < pages; ++i)
    ASSERT_TRUE(HoldsKeyAt(p + i * kPage, i)) << i;
}

// Library mode sees no mremap: merged pages moved away (or made read-only,
// which samepage does not merge) are gone for the scanner, but the moved
// mapping still maps their frames. Their partners written (or everything
// unmerged, run=2), the frames must not be freed while it maps them: it
// kept its bytes only until the partners left (then read zeros) before
// 2026-12-07. Once the mapping is gone, the frames are freed at the next
// full scan.
TEST(Engine, MergedPagesMovedUnseenKeepTheirBytes) {
  enum Change { kMoved, kMovedThenRun2, kReadOnly };
  for (Change change : {kMoved, kMovedThenRun2, kReadOnly}) {
    SCOPED_TRACE(change);
    auto e = NewEngine();
    Mapping m(64);
    unsigned char* moved = nullptr;
    ASSERT_NO_FATAL_FAILURE(
        MergeHalvesAndLoseSight(*e, m, change == kReadOnly, &moved));
    e->RunFullScans(2);
    if (change == kMovedThenRun2) {
      Set(*e, "run", "2");
    } else {
      for (std::size_t i = 0; i < 32; ++i) m.FillKey(i, 1000 + i);  // copied
    }
    e->RunFullScans(2);
    ASSERT_NO_FATAL_FAILURE(ExpectKeys(moved, 32));
    for (std::size_t i = 0; i < 32; ++i)
      ASSERT_TRUE(m.HoldsKey(i, change == kMovedThenRun2 ? i : 1000 + i)) << i;
    EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"), 0);
    // Gone too now: the frames are freed at the next read of the maps.
    ASSERT_EQ(munmap(moved, 32 * kPage), 0);
    if (change == kMovedThenRun2) Set(*e, "run", "0");
    e->RunFullScans(2);
    EXPECT_EQ(e->Stats().frames_in_use, 0u);
  }
}
// The same moved away in the middle of a full scan, after its maps read,
// with new memory mapped and written where the pages were, and their
// partners written: in that scan the pages are found with pages of their
// own (as if copied on write), and their frames released. The moved
// mapping must keep its bytes: a merged page copied away into anonymous
// memory holds the releases until the maps show the moved mapping.
TEST(Engine, MergedPagesMovedAndWrittenOverMidScanKeepTheirBytes) {
  if (!KernelAtLeast(6, 11)) GTEST_SKIP() << "no PROCMAP_QUERY before 6.11";
  auto e = NewEngine();
  constexpr std::size_t kPages = 64;
  Mapping m(kPages);
  ASSERT_NO_FATAL_FAILURE(MergeHalves(*e, m));
  const std::int64_t scans = Counter(*e, "full_scans");
  e->ScanNow(1);  // a full scan begins: the maps are read
  unsigned char* moved = MoveAway(m.page(32), 32);
  ASSERT_NE(moved, nullptr) << std::strerror(errno);
  ASSERT_EQ(mmap(m.page(32), 32 * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0),
            m.page(32));
  for (std::size_t i = 0; i < kPages; ++i) m.FillKey(i, 1000 + i);
  for (int i = 0; i < 1000 && Counter(*e, "full_scans") == scans; ++i)
    e->ScanNow(8);
  ASSERT_EQ(Counter(*e, "full_scans"), scans + 1);
  ASSERT_NO_FATAL_FAILURE(ExpectKeys(moved, 32));
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_TRUE(m.HoldsKey(i, 1000 + i));
  ASSERT_EQ(munmap(moved, 32 * kPage), 0);
  e->RunFullScans(2);
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
}

// Merged memory the program unmaps (library mode sees no munmap) gives
// every frame back, however many leave in one operation. Pages found gone
// are an unseen departure: the frames released after it are held until a
// maps read shows none of them moved, and before 2026-12-07 those beyond
// 4,096 in one operation were kept for good (counted pinned).
TEST(Engine, MergedMemoryUnmappedUnseenGivesEveryFrameBack) {
  auto e = NewEngine();
  constexpr std::size_t kPairs = 6000;
  const std::size_t len = 2 * kPairs * kPage;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* base = static_cast<unsigned char*>(p);
  for (std::size_t i = 0; i < 2 * kPairs; ++i) {
    const std::uint64_t key = i % kPairs;
    std::memset(base + i * kPage, 0x5a, kPage);
    std::memcpy(base + i * kPage, &key, sizeof(key));
  }
  ASSERT_TRUE(e->Madvise(p, len, MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), static_cast<std::int64_t>(kPairs));
  ASSERT_EQ(e->Stats().frames_in_use, kPairs);
  ASSERT_EQ(munmap(p, len), 0);
  e->ScanNow(4 * kPairs);  // one operation finds every page gone
  e->RunFullScans(1);
  EXPECT_EQ(Counter(*e, "pages_shared") + Counter(*e, "pages_sharing"), 0);
  EXPECT_EQ(e->Stats().frames_pinned, 0u);
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
}

// Frames held for merged pages moved unseen are freed once the moved
// mapping goes, as a kernel KSM page is with its last mapping: with
// nothing left to scan, the background scanner checks for it (it used to
// wait for the next control call or advice).
TEST(Engine, FramesHeldForMovedPagesAreFreedWithNothingLeftToScan) {
  auto e = NewEngine();
  Mapping m(64);
  unsigned char* moved = nullptr;
  ASSERT_NO_FATAL_FAILURE(MergeHalvesAndLoseSight(*e, m, false, &moved));
  e->RunFullScans(2);  // the moved pages found gone; the maps show them
  for (std::size_t i = 0; i < 32; ++i) m.FillKey(i, 1000 + i);  // copied
  e->RunFullScans(2);  // the frames released: held for the moved mapping
  ASSERT_EQ(e->Stats().frames_in_use, 32u);
  ASSERT_TRUE(e->Madvise(m.data(), 32 * kPage, MADV_UNMERGEABLE).ok());
  ASSERT_EQ(e->Stats().advised_pages, 0u);
  Set(*e, "run", "1");
  ASSERT_NO_FATAL_FAILURE(ExpectKeys(moved, 32));
  ASSERT_EQ(munmap(moved, 32 * kPage), 0);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (e->Stats().frames_in_use != 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(e->Stats().frames_in_use, 0u);
  Set(*e, "run", "0");
}

// The line of /proc/self/maps for the mapping holding `addr` ("" if none).
std::string MapsLineOf(const void* addr) {
  std::ifstream in("/proc/self/maps");
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  for (std::string line; std::getline(in, line);) {
    unsigned long start = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &start, &end) == 2 && start <= a &&
        a < end) {
      return line;
    }
  }
  return "";
}

// Merged pages moved (mremap) or made read-only (mprotect) unseen are
// still merged memory to the kernel: its VM_MERGEABLE goes with the
// mapping, and run=2 (or madvise(MADV_UNMERGEABLE) where the pages are
// now) unmerges them. Before 2026-12-07 they kept mapping their frames
// after run=2, and the frames stayed in use until the mapping went; and
// MADV_UNMERGEABLE where they were moved, before any scan or maps read had
// seen the move, left them merged until 2026-12-07 (later that day).
TEST(Engine, UnmergingReachesMergedPagesMovedOrReprotectedUnseen) {
  enum Change {
    kMovedSeen,
    kMovedJustNow,
    kReadOnly,
    kUnadvisedWhereMoved,
    kUnadvisedWhereMovedJustNow
  };
  for (Change change : {kMovedSeen, kMovedJustNow, kReadOnly,
                        kUnadvisedWhereMoved, kUnadvisedWhereMovedJustNow}) {
    SCOPED_TRACE(change);
    auto e = NewEngine();
    Mapping m(64);
    unsigned char* moved = nullptr;
    ASSERT_NO_FATAL_FAILURE(
        MergeHalvesAndLoseSight(*e, m, change == kReadOnly, &moved));
    const bool just_now =
        change == kMovedJustNow || change == kUnadvisedWhereMovedJustNow;
    const bool unadvised =
        change == kUnadvisedWhereMoved || change == kUnadvisedWhereMovedJustNow;
    if (!just_now) e->RunFullScans(2);  // found gone
    if (unadvised) {
      ASSERT_TRUE(e->Madvise(moved, 32 * kPage, MADV_UNMERGEABLE).ok());
    } else {
      Set(*e, "run", "2");
    }
    ASSERT_NO_FATAL_FAILURE(ExpectKeys(moved, 32));
    for (std::size_t i = 0; i < 32; ++i) {
      ASSERT_FALSE(MapsSharedFrame(moved + i * kPage)) << i;
      ASSERT_TRUE(m.HoldsKey(i, i)) << i;
    }
    const std::string line = MapsLineOf(moved);
    EXPECT_EQ(line.find("memfd"), std::string::npos) << line;
    if (change == kReadOnly) {
      EXPECT_NE(line.find(" r--p "), std::string::npos) << line;
      ASSERT_EQ(mprotect(moved, 32 * kPage, PROT_READ | PROT_WRITE), 0);
    }
    // Memory of its own: a write lands, and the rest keeps its bytes.
    moved[5 * kPage + 7] = 0x11;
    EXPECT_EQ(moved[5 * kPage + 7], 0x11);
    EXPECT_TRUE(m.HoldsKey(5, 5));
    if (!unadvised) {
      EXPECT_EQ(e->Stats().frames_in_use, 0u);
      Set(*e, "run", "0");
    }
    if (change != kReadOnly) {
      ASSERT_EQ(munmap(moved, 32 * kPage), 0);
    }
  }
}

// Library mode sees no mprotect: advised memory made read-only (or
// PROT_NONE) unseen is found gone by a scan, as samepage merges only
// read+write memory. The kernel keeps VM_MERGEABLE through an mprotect, so
// once the memory is read+write again it merges. Before 2026-12-07 the
// advice was dropped with the pages (only memory left out for its VmFlags
// kept it), and the memory never merged again.
TEST(Engine, MemoryMadeReadOnlyUnseenMergesOnceWritableAgain) {
  for (bool before_advice : {true, false}) {
    for (int prot : {PROT_READ, PROT_NONE}) {
      SCOPED_TRACE(std::to_string(before_advice) + " " + std::to_string(prot));
      auto e = NewEngine();
      Mapping m(32);  // page i and page i + 16 alike
      for (std::size_t i = 0; i < m.pages(); ++i) m.FillKey(i, i % 16);
      // The second half made read-only (or unreadable) before its advice,
      // which waits, or after it, unseen until a scan finds it gone.
      if (before_advice) {
        ASSERT_EQ(mprotect(m.page(16), 16 * kPage, prot), 0);
      }
      ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
      if (!before_advice) {
        ASSERT_EQ(mprotect(m.page(16), 16 * kPage, prot), 0);
      }
      e->RunFullScans(2);
      EXPECT_EQ(Counter(*e, "pages_sharing"), 0);
      ASSERT_EQ(mprotect(m.page(16), 16 * kPage, PROT_READ | PROT_WRITE), 0);
      e->RunFullScans(3);
      EXPECT_EQ(Counter(*e, "pages_sharing"), 16);
      for (std::size_t i = 0; i < m.pages(); ++i)
        ASSERT_TRUE(m.HoldsKey(i, i % 16)) << i;
    }
  }
}

// Advice held over memory made read-only unseen ends with the mapping, as
// VM_MERGEABLE does: memory mapped at the same address later, read+write
// and never advised, is not merged, though other advised memory keeps the
// scans going (library mode sees neither the munmap nor the mmap). Before
// 2026-12-07 the held advice was dropped only while nothing else was
// advised, and the new memory was merged.
TEST(Engine, AdviceHeldOverMemoryUnmappedUnseenEndsWithIt) {
  auto e = NewEngine();
  Mapping other(16);  // advised, unique: the scans go on over it
  for (std::size_t i = 0; i < other.pages(); ++i) other.FillKey(i, 1000 + i);
  ASSERT_TRUE(e->Madvise(other.data(), other.bytes(), MADV_MERGEABLE).ok());
  constexpr std::size_t kPages = 16;
  auto map_pairs = [](void* at, int flags) {
    void* p = mmap(at, kPages * kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
    if (p == MAP_FAILED) return static_cast<unsigned char*>(nullptr);
    auto* c = static_cast<unsigned char*>(p);
    // Page i and page i + 8 alike.
    for (std::size_t i = 0; i < kPages; ++i) FillKeyAt(c + i * kPage, i % 8);
    return c;
  };
  unsigned char* r = map_pairs(nullptr, 0);
  ASSERT_NE(r, nullptr);
  ASSERT_TRUE(e->Madvise(r, kPages * kPage, MADV_MERGEABLE).ok());
  ASSERT_EQ(mprotect(r, kPages * kPage, PROT_READ), 0);
  e->RunFullScans(2);  // found gone, its advice held
  ASSERT_EQ(munmap(r, kPages * kPage), 0);
  // Scans over the other memory while the hole is there.
  for (int i = 0; i < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(120));
    e->RunFullScans(1);
  }
  unsigned char* fresh = map_pairs(r, MAP_FIXED_NOREPLACE);
  if (fresh != r) {
    if (fresh != nullptr) munmap(fresh, kPages * kPage);
    GTEST_SKIP() << "the address was taken meanwhile";
  }
  e->RunFullScans(3);
  EXPECT_EQ(Counter(*e, "pages_sharing"), 0) << "memory never advised merged";
  ASSERT_EQ(munmap(fresh, kPages * kPage), 0);
}

}  // namespace
}  // namespace samepage::testing
