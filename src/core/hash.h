// Page content hashing: XXH3-64, inlined so it runs at memory bandwidth.
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

inline std::uint64_t HashPage(const void* page) {
  return XXH3_64bits(page, kPageSize);
}

// The hash of a page of zeros, computed once.
std::uint64_t ZeroPageHash();

}  // namespace samepage

#endif  // SAMEPAGE_CORE_HASH_H_
