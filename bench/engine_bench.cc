// Costs a program sees through the engine (library mode, as the LD_PRELOAD
// layer calls it), per call. Manual time: set-up and merging run untimed.

#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>

#include "core/memory.h"
#include "samepage/engine.h"

namespace samepage {
namespace {

using Clock = std::chrono::steady_clock;

long ReadCounter(Engine& engine, const char* name) {
  std::string text;
  if (!engine.ReadKnob(name, &text).ok()) return -1;
  return std::stol(text);
}

struct Piece {
  void* addr;
  std::size_t len;
};

bool DontNeed(void* arg) {
  const auto* p = static_cast<const Piece*>(arg);
  return madvise(p->addr, p->len, MADV_DONTNEED) == 0;
}

// A range of merged pairs (page i = page i + n/2) dropped with
// MADV_DONTNEED two pages at a time, in address order, as a forked child
// dismisses what it has written (Redis 7's save). Items = calls. The time
// a call takes should not grow with the range: each call used to cut the
// range's bookkeeping and copy what was left of it (41 us a call at 40,000
// calls against 5 at 2,000).
void BM_Engine_DropMergedMemoryInTurn(benchmark::State& state) {
  const std::size_t pieces = static_cast<std::size_t>(state.range(0));
  const std::size_t pages = 2 * pieces;
  std::unique_ptr<Engine> engine;
  if (!Engine::Create(EngineOptions{}, &engine).ok()) {
    state.SkipWithError("no engine");
    return;
  }
  for (auto _ : state) {
    const std::size_t len = pages * kPageSize;
    auto* mem =
        static_cast<unsigned char*>(mmap(nullptr, len, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (mem == MAP_FAILED) {
      state.SkipWithError("mmap");
      return;
    }
    for (std::size_t i = 0; i < pages; ++i) {
      std::memset(mem + i * kPageSize, 0x5a, kPageSize);
      const std::size_t key = i % (pages / 2);
      std::memcpy(mem + i * kPageSize, &key, sizeof(key));
    }
    if (!engine->Madvise(mem, len, MADV_MERGEABLE).ok()) {
      state.SkipWithError("madvise");
      return;
    }
    engine->RunFullScans(2);
    if (ReadCounter(*engine, "pages_sharing") < static_cast<long>(pages / 2)) {
      state.SkipWithError("not merged");
      return;
    }
    const auto t0 = Clock::now();
    for (std::size_t k = 0; k < pieces; ++k) {
      Piece p{mem + 2 * k * kPageSize, 2 * kPageSize};
      if (!Engine::ChangeMapping(p.addr, p.len,
                                 Engine::MappingChange::kDiscardToZero,
                                 DontNeed, &p)) {
        state.SkipWithError("MADV_DONTNEED failed");
        return;
      }
    }
    state.SetIterationTime(
        std::chrono::duration<double>(Clock::now() - t0).count());
    if (mem[kPageSize + 8] != 0) state.SkipWithError("not dropped");
    Piece all{mem, len};
    (void)Engine::ChangeMapping(
        mem, len, Engine::MappingChange::kUnmap,
        [](void* arg) {
          const auto* q = static_cast<const Piece*>(arg);
          return munmap(q->addr, q->len) == 0;
        },
        &all);
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * pieces));
}
BENCHMARK(BM_Engine_DropMergedMemoryInTurn)
    ->Arg(1 << 10)
    ->Arg(1 << 13)
    ->Arg(1 << 15)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace samepage
