// XXH3-64 of one page built for AVX-512 (this file alone is compiled with
// -mavx512f -mavx512bw; HashPage calls it only where the CPU and the
// kernel support AVX-512, on CPUs that keep their clock with it:
// internal::HashUsesAvx512). XXH3's result does not depend on the vector
// width it was built for.
//
// Nothing here may be an inline or template function from a shared
// header: a copy built with AVX-512 instructions could be the one the
// linker keeps for the whole program. XXH_INLINE_ALL makes XXH3's
// functions static to this file.

#include <cstddef>
#include <cstdint>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace samepage::internal {

std::uint64_t HashPageAvx512(const void* page, std::size_t n) {
  return XXH3_64bits(page, n);
}

}  // namespace samepage::internal
