// ZeroedArray: zero-initialised elements, sparse copies of a tail, and
// memory taken only by the elements written.

#include "core/zeroed_array.h"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "core/resident_memory.h"

namespace samepage {
namespace {

long MinorFaults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

struct Elem {
  std::uint32_t a = 0;
  std::uint32_t b = 0;
};

TEST(ZeroedArray, ElementsStartAsTheirDefault) {
  ZeroedArray<Elem> v(1000);
  ASSERT_EQ(v.size(), 1000u);
  for (std::size_t i = 0; i < v.size(); ++i) {
    EXPECT_EQ(v[i].a, 0u);
    EXPECT_EQ(v[i].b, 0u);
  }
}

TEST(ZeroedArray, TailAndTruncateKeepTheirHalves) {
  ZeroedArray<Elem> v(100);
  for (std::size_t i = 0; i < 100; i += 3) v[i] = {std::uint32_t(i + 1), 7};
  const ZeroedArray<Elem> tail = v.Tail(40);
  v.Truncate(40);
  ASSERT_EQ(v.size(), 40u);
  ASSERT_EQ(tail.size(), 60u);
  for (std::size_t i = 0; i < 100; ++i) {
    const Elem& e = i < 40 ? v[i] : tail[i - 40];
    const bool written = i % 3 == 0;
    EXPECT_EQ(e.a, written ? i + 1 : 0u) << i;
    EXPECT_EQ(e.b, written ? 7u : 0u) << i;
  }
  ZeroedArray<Elem> moved = std::move(v);
  EXPECT_EQ(moved.size(), 40u);
  EXPECT_EQ(moved[39].a, 40u);
  EXPECT_EQ(v.size(),
            0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
  moved.Truncate(0);
  EXPECT_EQ(moved.size(), 0u);
  EXPECT_EQ(v.Tail(0).size(), 0u);
}

// A head copied off and dropped: the tail's elements stay where they are
// (no copy) while the dropped ones do not outnumber them; past that the
// tail moves to a block of its own. Each way the elements keep their
// values, and the array shrinks, moves and empties as any other.
TEST(ZeroedArray, HeadAndDropHeadKeepTheirHalves) {
  ZeroedArray<Elem> v(100);
  for (std::size_t i = 0; i < 100; ++i) v[i] = {std::uint32_t(i + 1), 9};
  auto any = [](std::size_t, std::size_t) { return true; };
  const ZeroedArray<Elem> head = v.Head(10, any);
  ASSERT_EQ(head.size(), 10u);
  EXPECT_EQ(head[9].a, 10u);
  const Elem* eleventh = &v[10];
  v.DropHead(10, any);
  ASSERT_EQ(v.size(), 90u);
  EXPECT_EQ(&v[0], eleventh) << "the tail was copied";
  EXPECT_EQ(v[0].a, 11u);
  v.DropHead(30, any);  // 40 dropped, 60 kept: still in place
  EXPECT_EQ(&v[0], eleventh + 30);
  EXPECT_EQ(v[59].a, 100u);
  v.DropHead(20, any);  // 60 dropped would outnumber 40 kept: moved
  ASSERT_EQ(v.size(), 40u);
  for (std::size_t i = 0; i < 40; ++i) ASSERT_EQ(v[i].a, i + 61) << i;
  v.DropHead(5, any);  // in place again, in the new block
  v.Truncate(30);
  ASSERT_EQ(v.size(), 30u);
  EXPECT_EQ(v[0].a, 66u);
  EXPECT_EQ(v[29].a, 95u);
  ZeroedArray<Elem> moved = std::move(v);
  EXPECT_EQ(moved[29].b, 9u);
  const ZeroedArray<Elem> tail = moved.Tail(20);
  EXPECT_EQ(tail[0].a, 86u);
  moved.DropHead(30, any);
  EXPECT_EQ(moved.size(), 0u);
}

TEST(ZeroedArray, ForEachNonZeroVisitsWhatWasWrittenInOrder) {
  ZeroedArray<Elem> v(5000);
  const std::size_t written[] = {0, 1023, 1024, 2500, 4999};
  for (std::size_t i : written) v[i] = {std::uint32_t(i), 0};
  v[1024].a = 0;  // written back to zero: not visited
  std::vector<std::size_t> seen;
  v.ForEachNonZero([&](std::size_t i, Elem& e) {
    EXPECT_EQ(e.a, i);
    seen.push_back(i);
  });
  EXPECT_EQ(seen, (std::vector<std::size_t>{1023, 2500, 4999}));
  EXPECT_TRUE(ZeroedArray<Elem>::AllZero(&v[1024], 1476));
  EXPECT_FALSE(ZeroedArray<Elem>::AllZero(&v[1024], 1477));
}

// 32 Mi elements of 8 bytes (256 MiB) with one in every 65,536 written:
// what is resident is the pages written, for the array and for its tail.
TEST(ZeroedArray, OnlyTheElementsWrittenTakeMemory) {
  constexpr std::size_t kCount = std::size_t{32} << 20;
  const long before = ResidentKiB();
  ASSERT_GT(before, 0);
  ZeroedArray<Elem> v(kCount);
  for (std::size_t i = 0; i < kCount; i += 65536) v[i] = {1, 2};
  const ZeroedArray<Elem> tail = v.Tail(kCount / 2);
  v.Truncate(kCount / 2);
  const long grown = ResidentKiB() - before;
  EXPECT_LT(grown, 16 * 1024) << "KiB resident after 256 MiB of elements";
  EXPECT_EQ(tail[0].a, 1u);
  EXPECT_EQ(tail[65536].b, 2u);
  EXPECT_EQ(tail[1].a, 0u);
  EXPECT_EQ(v[kCount / 2 - 65536].a, 1u);
}

// An array larger than the machine's memory (the items of a 16 TiB
// reservation are 48 GB) is address space only: it is made, written at
// both ends and cut, and takes memory for what was written; a cut gives
// the address space of its tail back.
TEST(ZeroedArray, AnArrayLargerThanMemoryTakesOnlyWhatIsWritten) {
  std::FILE* f = std::fopen("/proc/sys/vm/overcommit_memory", "r");
  int mode = 0;
  if (f != nullptr) {
    if (std::fscanf(f, "%d", &mode) != 1) mode = 0;
    std::fclose(f);
  }
  if (mode == 2) GTEST_SKIP() << "strict overcommit: no room for 48 GB";
  constexpr std::size_t kCount = std::size_t{6} << 30;  // 48 GB of Elem
  const long rss_before = ResidentKiB();
  ZeroedArray<Elem> v(kCount);
  const long vm_made = StatusKiB("VmSize:");
  ASSERT_EQ(v.size(), kCount);
  v[0] = {1, 2};
  v[kCount - 1] = {3, 4};
  v[kCount / 2] = {5, 6};
  EXPECT_EQ(v[kCount - 1].b, 4u);
  EXPECT_EQ(v[kCount - 2].a, 0u);
  v.DropHead(1, [](std::size_t, std::size_t) { return true; });
  ASSERT_EQ(v.size(), kCount - 1);
  EXPECT_EQ(v[kCount - 2].a, 3u);
  v.Truncate(kCount / 2);
  EXPECT_EQ(v[kCount / 2 - 1].a, 5u);
  EXPECT_LT(StatusKiB("VmSize:"), vm_made - 20L * 1024 * 1024)
      << "KiB of address space kept after cutting 24 GB off";
  EXPECT_LT(ResidentKiB() - rss_before, 8 * 1024);
}

// What may_hold says holds nothing is not read: the elements of an array
// the caller knows to be untouched stay untouched (no memory, no page
// faults), and a group it rules out is neither visited nor copied.
TEST(ZeroedArray, GroupsRuledOutByMayHoldAreNotRead) {
  constexpr std::size_t kCount = std::size_t{32} << 20;  // 256 MiB
  ZeroedArray<Elem> v(kCount);
  v[3] = {1, 1};
  v[kCount - 1] = {2, 2};
  const long faults_before = MinorFaults();
  std::size_t asked = 0;
  auto ends = [&](std::size_t first, std::size_t count) {
    asked += count;
    return first == 0 || first + count == kCount;
  };
  std::vector<std::size_t> seen;
  v.ForEachNonZero([&](std::size_t i, Elem&) { seen.push_back(i); }, ends);
  const ZeroedArray<Elem> tail = v.Tail(1, ends);
  // A read of all of it would fault 65,536 times (each page maps the zero
  // page), taking no memory: faults tell.
  EXPECT_LT(MinorFaults() - faults_before, 1000)
      << "page faults reading what may hold something";
  EXPECT_EQ(asked, 2 * kCount - 1) << "every element asked about";
  EXPECT_EQ(seen, (std::vector<std::size_t>{3, kCount - 1}));
  EXPECT_EQ(tail[kCount - 2].a, 2u);
  // Ruled out, though written: the tail's first group is left zero.
  EXPECT_EQ(tail[2].a, 0u);
  std::size_t visited = 0;
  v.ForEachNonZero([&](std::size_t, Elem&) { ++visited; },
                   [](std::size_t, std::size_t) { return false; });
  EXPECT_EQ(visited, 0u);
}

}  // namespace
}  // namespace samepage
