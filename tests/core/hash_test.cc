// HashPage: the AVX-512 build of XXH3 gives the hash the AVX2 and SSE2
// builds give, on any page.

#include "core/hash.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

namespace samepage {
namespace {

std::vector<unsigned char> Pages(std::size_t n) {
  std::vector<unsigned char> v(n * kPageSize);
  std::mt19937_64 rng(7);
  for (std::size_t i = 0; i < v.size(); i += 8) {
    const std::uint64_t x = rng();
    std::memcpy(&v[i], &x, 8);
  }
  // Pages alike but for one byte, at the start, the middle and the end
  // of the page (XXH3's last stripe is read apart from the rest).
  std::memset(&v[0], 0, kPageSize);
  std::memset(&v[kPageSize], 0xff, kPageSize);
  for (std::size_t k = 2; k < 5; ++k)
    std::memset(&v[k * kPageSize], 'x', kPageSize);
  v[2 * kPageSize] = 'y';
  v[3 * kPageSize + kPageSize / 2] = 'y';
  v[4 * kPageSize + kPageSize - 1] = 'y';
  return v;
}

TEST(HashPage, EveryBuildOfXxh3GivesTheSameHash) {
  const auto v = Pages(64);
  for (std::size_t k = 0; k < 64; ++k) {
    const unsigned char* p = &v[k * kPageSize];
    // This file is built without -mavx2: its inlined XXH3 is the SSE2 one.
    const std::uint64_t sse2 = XXH3_64bits(p, kPageSize);
    EXPECT_EQ(internal::HashPageAvx2(p, kPageSize), sse2) << "page " << k;
    EXPECT_EQ(HashPage(p), sse2) << "page " << k;
  }
  EXPECT_EQ(HashPage(&v[0]), ZeroPageHash());
}

TEST(HashPage, Avx512BuildAgreesWithAvx2) {
  if (!internal::CpuHasAvx512()) {
    GTEST_SKIP() << "this CPU has no AVX-512: HashPage uses the AVX2 build";
  }
  const auto v = Pages(64);
  for (std::size_t k = 0; k < 64; ++k) {
    const unsigned char* p = &v[k * kPageSize];
    EXPECT_EQ(internal::HashPageAvx512(p, kPageSize),
              internal::HashPageAvx2(p, kPageSize))
        << "page " << k;
  }
  // Pages that differ in one byte hash apart.
  EXPECT_NE(HashPage(&v[2 * kPageSize]), HashPage(&v[3 * kPageSize]));
  EXPECT_NE(HashPage(&v[3 * kPageSize]), HashPage(&v[4 * kPageSize]));
}

}  // namespace
}  // namespace samepage
