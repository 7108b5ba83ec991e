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

}  // namespace samepage

#endif  // SAMEPAGE_CORE_HASH_H_
