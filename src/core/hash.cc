#include "core/hash.h"

namespace samepage {

std::uint64_t ZeroPageHash() {
  alignas(64) static const unsigned char kZeros[kPageSize] = {};
  static const std::uint64_t hash = HashPage(kZeros);
  return hash;
}

}  // namespace samepage
