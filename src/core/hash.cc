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
  // Only on CPUs with AVX512_VBMI2 (Intel from Ice Lake, AMD from Zen 4),
  // which run 512-bit vectors at about their usual clock: on Skylake and
  // Cascade Lake servers a core running them slows down, and with it a
  // hyperthread of the application sharing the core, for a gain that is
  // small on pages read from memory (about 5% with the L2 prefetch,
  // BM_LinuxMemory_Hash/131072) and large only on pages in the cache.
  return CpuHasAvx512() && __builtin_cpu_supports("avx512vbmi2") &&
         std::getenv("SAMEPAGE_NO_AVX512") == nullptr;
}

}  // namespace internal

std::uint64_t ZeroPageHash() {
  alignas(64) static const unsigned char kZeros[kPageSize] = {};
  static const std::uint64_t hash = HashPage(kZeros);
  return hash;
}

}  // namespace samepage
