#include "backend/cheaper_of.h"

#include <gtest/gtest.h>

namespace samepage::backend {
namespace {

// Feeds `picks` choices of c, each costing cost[way] per unit; returns how
// many went to way 1.
int PickAndRecord(CheaperOf& c, int picks, const double cost[2]) {
  int ones = 0;
  for (int i = 0; i < picks; ++i) {
    const int way = c.Pick();
    ones += way;
    c.Record(way, static_cast<std::int64_t>(cost[way] * 100), 100);
  }
  return ones;
}

TEST(CheaperOfTest, AForcedWayIsAlwaysPicked) {
  const double cost[2] = {1000, 10};
  CheaperOf first(0), second(1);
  EXPECT_EQ(PickAndRecord(first, 100, cost), 0);
  EXPECT_EQ(PickAndRecord(second, 100, cost), 100);
}

TEST(CheaperOfTest, MeasuresBothWaysFirst) {
  CheaperOf c;
  const double cost[2] = {10, 1000};
  int ones = 0;
  for (std::uint32_t i = 0; i < 2 * CheaperOf::kWarmup; ++i) {
    const int way = c.Pick();
    ones += way;
    c.Record(way, static_cast<std::int64_t>(cost[way]), 1);
  }
  EXPECT_EQ(ones, static_cast<int>(CheaperOf::kWarmup));
  EXPECT_DOUBLE_EQ(c.Cost(0), 10);
  EXPECT_DOUBLE_EQ(c.Cost(1), 1000);
}

TEST(CheaperOfTest, UsesTheCheaperWayAndTriesTheOtherNowAndThen) {
  for (int cheap = 0; cheap < 2; ++cheap) {
    CheaperOf c;
    double cost[2] = {2000, 2000};
    cost[cheap] = 1000;
    PickAndRecord(c, 2 * CheaperOf::kWarmup, cost);
    const int picks = 16 * CheaperOf::kExploreEvery;
    const int ones = PickAndRecord(c, picks, cost);
    const int other = cheap == 1 ? picks - ones : ones;
    EXPECT_EQ(other, picks / static_cast<int>(CheaperOf::kExploreEvery))
        << "cheap way " << cheap;
  }
}

TEST(CheaperOfTest, FollowsAChangeOfConditions) {
  CheaperOf c;
  const double before[2] = {1000, 3000};
  const double after[2] = {3000, 1000};
  PickAndRecord(c, 200, before);
  EXPECT_EQ(PickAndRecord(c, CheaperOf::kExploreEvery, before), 1);
  // Only the explored picks see way 1 get cheaper; way 0's cost goes up at
  // once. Within a few hundred picks the choice turns.
  PickAndRecord(c, 400, after);
  const int picks = 4 * CheaperOf::kExploreEvery;
  EXPECT_EQ(PickAndRecord(c, picks, after),
            picks - picks / static_cast<int>(CheaperOf::kExploreEvery));
}

TEST(CheaperOfTest, OneOutlierDoesNotTurnTheChoice) {
  CheaperOf c;
  const double cost[2] = {1000, 1500};
  PickAndRecord(c, 100, cost);
  // One pick of way 0 interrupted for a millisecond a unit.
  c.Record(0, 100'000'000, 100);
  EXPECT_LT(c.Cost(0), c.Cost(1));
}

TEST(CheaperOfTest, IgnoresEmptyAndInvalidSamples) {
  CheaperOf c;
  c.Record(0, 500, 0);
  c.Record(1, -5, 10);
  c.Record(2, 500, 10);
  EXPECT_DOUBLE_EQ(c.Cost(0), 0);
  EXPECT_DOUBLE_EQ(c.Cost(1), 0);
}

}  // namespace
}  // namespace samepage::backend
