#include "core/hash.h"

#include <cstdlib>

namespace samepage {

namespace internal {

std::uint64_t HashPageAvx2(const void* page, std::size_t n) {
  return XXH3_64bits(page, n);
}

bool CpuHasAvx512() {
  // libgcc's check covers the kernel's side too (XGETBV: the ZMM state is
  // saved on context switches).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw");
}

bool HashUsesAvx512() {
  return CpuHasAvx512() && std::getenv("SAMEPAGE_NO_AVX512") == nullptr;
}

}  // namespace internal

std::uint64_t ZeroPageHash() {
  alignas(64) static const unsigned char kZeros[kPageSize] = {};
  static const std::uint64_t hash = HashPage(kZeros);
  return hash;
}

}  // namespace samepage
