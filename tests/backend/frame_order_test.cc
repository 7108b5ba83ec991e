// OrderPairFrames and CostByPrefix: which frame each scattered pair takes,
// and how many mappings that layout costs.

#include "backend/frame_order.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace samepage::backend {
namespace {

constexpr Addr kBase = 0x7f0000000000;

Addr Page(std::size_t i) { return kBase + i * kPageSize; }

// Pairs of pages given by index, p < q.
struct Pairs {
  std::vector<Addr> p, q;
  void Add(std::size_t a, std::size_t b) {
    p.push_back(Page(std::min(a, b)));
    q.push_back(Page(std::max(a, b)));
  }
};

// Random partners over n pages (n even), sorted by lower page as the
// backend gets them.
Pairs RandomPairs(std::size_t n, unsigned seed) {
  std::vector<std::size_t> pages(n);
  std::iota(pages.begin(), pages.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(pages.begin(), pages.end(), rng);
  std::vector<std::pair<std::size_t, std::size_t>> pairs;
  for (std::size_t i = 0; i < n; i += 2) {
    pairs.emplace_back(std::min(pages[i], pages[i + 1]),
                       std::max(pages[i], pages[i + 1]));
  }
  std::sort(pairs.begin(), pairs.end());
  Pairs out;
  for (auto [a, b] : pairs) out.Add(a, b);
  return out;
}

// Mappings counted directly: pages by address, a new mapping wherever a
// page does not follow the one before in memory and in frames; each
// weighs cost(the page it starts at).
std::size_t CountMappings(
    const Pairs& pairs, const std::vector<std::uint32_t>& order,
    std::size_t prefix,
    const std::function<std::size_t(Addr)>& cost = [](Addr) { return 1; }) {
  std::map<Addr, std::size_t> frame_of;
  for (std::size_t k = 0; k < prefix; ++k) {
    frame_of[pairs.p[order[k]]] = k;
    frame_of[pairs.q[order[k]]] = k;
  }
  std::size_t mappings = 0;
  Addr last = 0;
  std::size_t last_frame = 0;
  for (auto [addr, frame] : frame_of) {
    if (last == 0 || addr != last + kPageSize || frame != last_frame + 1)
      mappings += cost(addr);
    last = addr;
    last_frame = frame;
  }
  return mappings;
}

// CostByPrefix with every mapping weighed 1: the mappings themselves.
std::vector<std::uint32_t> MappingsByPrefix(
    std::span<const Addr> p, std::span<const Addr> q,
    std::span<const std::uint32_t> order) {
  const std::vector<std::uint8_t> one(std::min(p.size(), q.size()), 1);
  return CostByPrefix(p, q, order, one, one);
}

std::vector<std::uint32_t> IndexOrder(std::size_t m) {
  std::vector<std::uint32_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  return order;
}

TEST(FrameOrderTest, NoPairsNoOrder) {
  EXPECT_TRUE(OrderPairFrames({}, {}).empty());
  EXPECT_TRUE(MappingsByPrefix({}, {}, {}).empty());
}

TEST(FrameOrderTest, APairWhosePagesAreNeighboursTakesOneFrame) {
  Pairs pairs;
  pairs.Add(4, 5);
  const auto order = OrderPairFrames(pairs.p, pairs.q);
  EXPECT_EQ(order, std::vector<std::uint32_t>({0}));
  // Both pages map the same frame: no mapping covers both.
  EXPECT_EQ(MappingsByPrefix(pairs.p, pairs.q, order),
            std::vector<std::uint32_t>({2}));
}

TEST(FrameOrderTest, ThePartnerBeforeItsNeighbourTakesTheFrameBefore) {
  // Pages 0 A, 2 B, 3 A, 5 B: only B's page 2 lies before A's page 3. In
  // the order of the lower pages (A, B) nothing lines up.
  Pairs pairs;
  pairs.Add(0, 3);
  pairs.Add(2, 5);
  const auto order = OrderPairFrames(pairs.p, pairs.q);
  EXPECT_EQ(order, std::vector<std::uint32_t>({1, 0}));
  EXPECT_EQ(MappingsByPrefix(pairs.p, pairs.q, order),
            std::vector<std::uint32_t>({2, 3}));
  EXPECT_EQ(MappingsByPrefix(pairs.p, pairs.q, IndexOrder(2)).back(), 4u);
}

TEST(FrameOrderTest, PairsInterleavedTwiceShareBothMappings) {
  // Pages 0 A, 1 B, 2 A, 3 B: A then B lines up twice, B then A once (a
  // cycle of successors, cut where it loses only that one).
  Pairs pairs;
  pairs.Add(0, 2);
  pairs.Add(1, 3);
  const auto order = OrderPairFrames(pairs.p, pairs.q);
  EXPECT_EQ(order, std::vector<std::uint32_t>({0, 1}));
  EXPECT_EQ(MappingsByPrefix(pairs.p, pairs.q, order).back(), 2u);

  Pairs swapped;  // the same pages, B given first
  swapped.Add(1, 3);
  swapped.Add(0, 2);
  const auto order2 = OrderPairFrames(swapped.p, swapped.q);
  EXPECT_EQ(order2, std::vector<std::uint32_t>({1, 0}));
  EXPECT_EQ(MappingsByPrefix(swapped.p, swapped.q, order2).back(), 2u);
}

TEST(FrameOrderTest, EveryPairGetsExactlyOneFrame) {
  for (unsigned seed = 1; seed <= 20; ++seed) {
    const Pairs pairs = RandomPairs(2 * (50 + seed * 37), seed);
    auto order = OrderPairFrames(pairs.p, pairs.q);
    ASSERT_EQ(order.size(), pairs.p.size());
    std::sort(order.begin(), order.end());
    EXPECT_EQ(order, IndexOrder(pairs.p.size())) << "seed " << seed;
  }
}

TEST(FrameOrderTest, MappingsByPrefixCountsTheLayoutsRuns) {
  for (unsigned seed = 1; seed <= 10; ++seed) {
    const Pairs pairs = RandomPairs(400, seed);
    for (const auto& order :
         {OrderPairFrames(pairs.p, pairs.q), IndexOrder(pairs.p.size())}) {
      const auto mappings = MappingsByPrefix(pairs.p, pairs.q, order);
      ASSERT_EQ(mappings.size(), order.size());
      for (std::size_t k = 0; k < order.size(); k += 13) {
        EXPECT_EQ(mappings[k], CountMappings(pairs, order, k + 1))
            << "seed " << seed << " prefix " << k + 1;
      }
      EXPECT_EQ(mappings.back(), CountMappings(pairs, order, order.size()));
    }
  }
}

// Each mapping weighed by the page it starts at (the VMAs it may add,
// for the budget): the prefix sums match a direct count, and a page that
// continues a mapping adds nothing whatever its own weight.
TEST(FrameOrderTest, CostByPrefixWeighsEachMappingByWhereItStarts) {
  for (unsigned seed = 1; seed <= 10; ++seed) {
    const Pairs pairs = RandomPairs(400, seed);
    const std::size_t m = pairs.p.size();
    std::mt19937 rng(seed);
    std::map<Addr, std::uint8_t> weight;
    std::vector<std::uint8_t> p_cost(m), q_cost(m);
    for (std::size_t i = 0; i < m; ++i) {
      p_cost[i] = weight[pairs.p[i]] = static_cast<std::uint8_t>(rng() % 3);
      q_cost[i] = weight[pairs.q[i]] = static_cast<std::uint8_t>(rng() % 3);
    }
    auto cost = [&](Addr a) { return std::size_t{weight.at(a)}; };
    for (const auto& order :
         {OrderPairFrames(pairs.p, pairs.q), IndexOrder(m)}) {
      const auto prefix = CostByPrefix(pairs.p, pairs.q, order, p_cost, q_cost);
      ASSERT_EQ(prefix.size(), m);
      for (std::size_t k = 0; k < m; k += 13) {
        EXPECT_EQ(prefix[k], CountMappings(pairs, order, k + 1, cost))
            << "seed " << seed << " prefix " << k + 1;
      }
      EXPECT_EQ(prefix.back(), CountMappings(pairs, order, m, cost));
    }
  }
  // Two pairs side by side in frame order: one mapping on each side, each
  // weighed once, by its first page.
  Pairs two;
  two.Add(0, 10);
  two.Add(1, 11);
  const std::vector<std::uint8_t> pc = {2, 7}, qc = {1, 9};
  EXPECT_EQ(CostByPrefix(two.p, two.q, IndexOrder(2), pc, qc),
            (std::vector<std::uint32_t>{3, 3}));
}

TEST(FrameOrderTest, RandomPartnersTakeAboutAMappingAPair) {
  // 40,000 pages as the benchmark's scattered pairs: in the lower pages'
  // order a third of the pairs' second pages continue a mapping; at best
  // one page of each pair can (each frame has one frame after it).
  const Pairs pairs = RandomPairs(40000, 7);
  const std::size_t m = pairs.p.size();
  const auto order = OrderPairFrames(pairs.p, pairs.q);
  const std::size_t ours = MappingsByPrefix(pairs.p, pairs.q, order).back();
  const std::size_t by_p =
      MappingsByPrefix(pairs.p, pairs.q, IndexOrder(m)).back();
  EXPECT_GT(by_p, m * 13 / 10);
  EXPECT_LT(ours, m * 101 / 100);
  EXPECT_GE(ours, m);
}

}  // namespace
}  // namespace samepage::backend
