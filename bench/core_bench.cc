// Micro-benchmarks of the core's hot paths: page hashing, and the choice of
// index (hash table vs the kernel's memcmp-ordered tree) for lookups.

#include <benchmark/benchmark.h>

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "core/hash.h"

namespace samepage {
namespace {

// n distinct random pages, in one allocation.
std::vector<unsigned char> RandomPages(std::size_t n) {
  std::vector<unsigned char> pages(n * kPageSize);
  std::mt19937_64 rng(1);
  for (std::size_t i = 0; i < pages.size(); i += 8) {
    const std::uint64_t v = rng();
    std::memcpy(&pages[i], &v, 8);
  }
  return pages;
}

void BM_Hash_Xxh3Page(benchmark::State& state) {
  auto pages = RandomPages(1024);
  std::size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(HashPage(&pages[(i++ % 1024) * kPageSize]));
  }
  state.SetBytesProcessed(state.iterations() * kPageSize);
}
BENCHMARK(BM_Hash_Xxh3Page);

void BM_Compare_EqualPages(benchmark::State& state) {
  auto pages = RandomPages(2);
  std::memcpy(&pages[kPageSize], &pages[0], kPageSize);
  for (auto _ : state) {
    benchmark::DoNotOptimize(std::memcmp(&pages[0], &pages[kPageSize], kPageSize));
  }
  state.SetBytesProcessed(state.iterations() * kPageSize);
}
BENCHMARK(BM_Compare_EqualPages);

struct PageLess {
  bool operator()(const unsigned char* a, const unsigned char* b) const {
    return std::memcmp(a, b, kPageSize) < 0;
  }
};

// The kernel's way: a tree ordered by page content; a lookup of a page that
// is not there costs log2(n) memcmp calls (each cheap on random data).
void BM_Index_MemcmpTreeLookup(benchmark::State& state) {
  const std::size_t n = state.range(0);
  auto pages = RandomPages(n + 1024);
  std::map<const unsigned char*, std::size_t, PageLess> tree;
  for (std::size_t i = 0; i < n; ++i) tree.emplace(&pages[i * kPageSize], i);
  std::size_t i = 0;
  for (auto _ : state) {
    const unsigned char* probe = &pages[(n + i++ % 1024) * kPageSize];
    benchmark::DoNotOptimize(tree.find(probe));
  }
}
BENCHMARK(BM_Index_MemcmpTreeLookup)->Arg(1 << 14)->Arg(1 << 17)->Arg(1 << 20);

// samepage's way: the page is hashed anyway for the volatility check, so a
// lookup is one probe of a hash table (verification happens at merge time).
void BM_Index_HashTableLookup(benchmark::State& state) {
  const std::size_t n = state.range(0);
  auto pages = RandomPages(1024);
  absl::flat_hash_map<std::uint64_t, std::uint64_t> table;
  std::mt19937_64 rng(2);
  for (std::size_t i = 0; i < n; ++i) table.emplace(rng(), i);
  std::vector<std::uint64_t> probes;
  for (std::size_t i = 0; i < 1024; ++i) probes.push_back(HashPage(&pages[i * kPageSize]));
  std::size_t i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(table.find(probes[i++ % 1024]));
}
BENCHMARK(BM_Index_HashTableLookup)->Arg(1 << 14)->Arg(1 << 17)->Arg(1 << 20);

void BM_Index_HashTableInsertErase(benchmark::State& state) {
  absl::flat_hash_map<std::uint64_t, std::uint64_t> table;
  std::mt19937_64 rng(3);
  for (int i = 0; i < state.range(0); ++i) table.emplace(rng(), i);
  for (auto _ : state) {
    const std::uint64_t k = rng();
    table.emplace(k, 1);
    table.erase(k);
  }
}
BENCHMARK(BM_Index_HashTableInsertErase)->Arg(1 << 17);

}  // namespace
}  // namespace samepage
