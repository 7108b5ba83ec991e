// Page content hashing: XXH3-64, inlined so it runs at memory bandwidth,
// built for AVX-512 where the CPU has it (hash_avx512.cc).
//
// The hash only selects candidates; equality is always decided by a full
// compare of the pages under write-protection (see memory.h).

#ifndef SAMEPAGE_CORE_HASH_H_
#define SAMEPAGE_CORE_HASH_H_

#include <cstdint>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/memory.h"

namespace samepage {

namespace internal {
// XXH3-64 built for AVX2 and for AVX-512: the same hash.
std::uint64_t HashPageAvx2(const void* page, std::size_t n);
std::uint64_t HashPageAvx512(const void* page, std::size_t n);
// Whether the CPU has AVX-512 (F and BW) and the kernel saves its state.
bool CpuHasAvx512();
// Whether HashPage uses HashPageAvx512: CpuHasAvx512() and AVX512_VBMI2
// (a CPU that keeps its clock with 512-bit vectors), unless the
// environment has SAMEPAGE_NO_AVX512 (to measure the AVX2 build).
bool HashUsesAvx512();
}  // namespace internal

inline std::uint64_t HashPage(const void* page) {
  static const bool avx512 = internal::HashUsesAvx512();
  return avx512 ? internal::HashPageAvx512(page, kPageSize)
                : XXH3_64bits(page, kPageSize);
}

// The hash of a page of zeros, computed once.
std::uint64_t ZeroPageHash();

// A page seen for the first time may be taken for a page of zeros from a
// sample of its cache lines (Memory::HashFirstVisit): eight lines, 576
// bytes apart, the first and the last among them (an eighth of the page).
inline constexpr std::size_t kZeroSampleLines = 8;
inline constexpr std::size_t kZeroSampleStride = 576;

// Whether the sampled lines of the page at p are all zero: true of every
// page of zeros, and of some pages with bytes elsewhere.
inline bool SampledLinesZero(const void* p) {
  using V = std::uint64_t __attribute__((vector_size(32), aligned(8)));
  const auto* b = static_cast<const unsigned char*>(p);
  V acc{};
  for (std::size_t l = 0; l < kZeroSampleLines; ++l) {
    V v0, v1;
    __builtin_memcpy(&v0, b + l * kZeroSampleStride, 32);
    __builtin_memcpy(&v1, b + l * kZeroSampleStride + 32, 32);
    acc |= v0 | v1;
  }
  return (acc[0] | acc[1] | acc[2] | acc[3]) == 0;
}
static_assert((kZeroSampleLines - 1) * kZeroSampleStride + 64 == kPageSize);

}  // namespace samepage

#endif  // SAMEPAGE_CORE_HASH_H_
