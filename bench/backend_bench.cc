// Per-page costs of the Linux backend on real memory.
//
// Each benchmark times only the operation named (manual time); set-up and
// undo run untimed. Items = pages. Arg 0: 0 = mprotect, 1 = userfaultfd.

#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "backend/linux_memory.h"

namespace samepage::backend {
namespace {

using Clock = std::chrono::steady_clock;
using Protection = LinuxMemoryOptions::Protection;

constexpr std::size_t kPages = 4096;

std::unique_ptr<LinuxMemory> NewMemory(benchmark::State& state) {
  LinuxMemoryOptions o;
  o.protection =
      state.range(0) == 0 ? Protection::kMprotect : Protection::kUserfaultfd;
  std::unique_ptr<LinuxMemory> m;
  Status s = LinuxMemory::Create(o, &m);
  if (!s.ok()) state.SkipWithError(s.ToString().c_str());
  return m;
}

unsigned char* Map(std::size_t pages, unsigned char fill) {
  void* p = mmap(nullptr, pages * kPageSize, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  auto* c = static_cast<unsigned char*>(p);
  for (std::size_t i = 0; i < pages; ++i) {
    std::memset(c + i * kPageSize, fill, kPageSize);
    c[i * kPageSize] = static_cast<unsigned char>(i);  // pages differ
  }
  return c;
}

std::vector<Addr> Addrs(unsigned char* base, std::size_t n, std::size_t step) {
  std::vector<Addr> v;
  for (std::size_t i = 0; i < n; ++i)
    v.push_back(reinterpret_cast<Addr>(base + i * step * kPageSize));
  return v;
}

void Seconds(benchmark::State& state, Clock::time_point t0) {
  state.SetIterationTime(
      std::chrono::duration<double>(Clock::now() - t0).count());
}

// Pairs in runs of consecutive pages (step 1) or scattered (step 2).
void BM_LinuxMemory_MergePairs(benchmark::State& state) {
  auto m = NewMemory(state);
  if (!m) return;
  const std::size_t step = static_cast<std::size_t>(state.range(1));
  const std::size_t n = kPages / step;
  std::vector<FrameId> frames(n);
  std::vector<MergeResult> res(n);
  for (auto _ : state) {
    // Fresh regions each time: unmerged pages keep their extra VMAs.
    unsigned char* a = Map(kPages, 1);
    unsigned char* b = Map(kPages, 1);
    (void)m->RefreshMaps();  // new memory: as madvise would
    m->BeginFullScan();
    auto p = Addrs(a, n, step), q = Addrs(b, n, step);
    auto t0 = Clock::now();
    m->MergePairs(p, q, frames, res);
    Seconds(state, t0);
    if (res[0] != MergeResult::kMerged) state.SkipWithError("not merged");
    munmap(a, kPages * kPageSize);
    munmap(b, kPages * kPageSize);
    for (FrameId f : frames) m->ReleaseFrame(f);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}
BENCHMARK(BM_LinuxMemory_MergePairs)
    ->ArgsProduct({{0, 1}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_LinuxMemory_MergeIntoFrames(benchmark::State& state) {
  auto m = NewMemory(state);
  if (!m) return;
  unsigned char* a = Map(kPages, 2);
  unsigned char* b = Map(kPages, 2);
  unsigned char* c = Map(kPages, 2);
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  auto p = Addrs(a, kPages, 1), q = Addrs(b, kPages, 1),
       r = Addrs(c, kPages, 1);
  std::vector<FrameId> frames(kPages);
  std::vector<MergeResult> res(kPages);
  m->MergePairs(p, q, frames, res);
  for (auto _ : state) {
    auto t0 = Clock::now();
    m->MergeIntoFrames(r, frames, res);
    Seconds(state, t0);
    if (res[0] != MergeResult::kMerged) state.SkipWithError("not merged");
    (void)m->Unmerge(r[0], kPages);
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * kPages));
  for (unsigned char* x : {a, b, c}) munmap(x, kPages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_MergeIntoFrames)
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// Times MergeIntoFrames of kPages fresh pages, page i holding the content
// of frame source(i) of nframes made by merging pairs beforehand. busy_cpu:
// another thread keeps a second CPU busy meanwhile (on a virtual machine
// that makes every TLB flush of ours costly).
void JoinFrames(benchmark::State& state, std::size_t nframes,
                std::size_t (*source)(std::size_t), bool busy_cpu) {
  auto m = NewMemory(state);
  if (!m) return;
  std::atomic<bool> stop{false};
  std::thread busy;
  if (busy_cpu) {
    busy = std::thread([&] {
      while (!stop.load(std::memory_order_relaxed)) {
      }
    });
  }
  unsigned char* a = Map(nframes, 2);
  unsigned char* b = Map(nframes, 2);
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  auto p = Addrs(a, nframes, 1), q = Addrs(b, nframes, 1);
  std::vector<FrameId> frames(nframes), into(kPages);
  std::vector<MergeResult> res(kPages);
  m->MergePairs(p, q, frames, res);
  for (std::size_t i = 0; i < kPages; ++i) into[i] = frames[source(i)];
  for (auto _ : state) {
    // Fresh memory each time: merged pages keep their mappings.
    unsigned char* c = Map(kPages, 2);
    for (std::size_t i = 0; i < kPages; ++i)
      std::memcpy(c + i * kPageSize, a + source(i) * kPageSize, kPageSize);
    (void)m->RefreshMaps();
    auto r = Addrs(c, kPages, 1);
    auto t0 = Clock::now();
    m->MergeIntoFrames(r, into, res);
    Seconds(state, t0);
    if (res[0] != MergeResult::kMerged) state.SkipWithError("not merged");
    munmap(c, kPages * kPageSize);
  }
  stop = true;
  if (busy.joinable()) busy.join();
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * kPages));
  for (unsigned char* x : {a, b}) munmap(x, nframes * kPageSize);
}

// Identical pages laid out over 100 frames (Ksm::StripeRuns): page i
// joins frame i mod 100, a mapping per 100 pages. Where kernel faults wait
// (userfaultfd, root) a run over a whole page table is discarded first and
// mapped into the emptied table.
void BM_LinuxMemory_MergeIntoStripedFrames(benchmark::State& state) {
  JoinFrames(
      state, 100, [](std::size_t i) { return i % 100; }, false);
}
BENCHMARK(BM_LinuxMemory_MergeIntoStripedFrames)
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// Consecutive pages joining frames in scattered order (a page each): the
// common case of memory that finds its content among merged pages
// elsewhere. Arg 1: 1 = another CPU kept busy.
void BM_LinuxMemory_MergeIntoScatteredFrames(benchmark::State& state) {
  JoinFrames(
      state, kPages, [](std::size_t i) { return (i * 2654435761u) % kPages; },
      state.range(1) != 0);
}
BENCHMARK(BM_LinuxMemory_MergeIntoScatteredFrames)
    ->ArgsProduct({{0, 1}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_LinuxMemory_Unmerge(benchmark::State& state) {
  auto m = NewMemory(state);
  if (!m) return;
  unsigned char* a = Map(kPages, 3);
  unsigned char* b = Map(kPages, 3);
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  auto p = Addrs(a, kPages, 1), q = Addrs(b, kPages, 1);
  std::vector<FrameId> frames(kPages);
  std::vector<MergeResult> res(kPages);
  for (auto _ : state) {
    m->MergePairs(p, q, frames, res);
    auto t0 = Clock::now();
    (void)m->Unmerge(p[0], kPages);
    Seconds(state, t0);
    (void)m->Unmerge(q[0], kPages);
    for (FrameId f : frames) m->ReleaseFrame(f);
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * kPages));
  munmap(a, kPages * kPageSize);
  munmap(b, kPages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_Unmerge)
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_LinuxMemory_DropZeroPages(benchmark::State& state) {
  auto m = NewMemory(state);
  if (!m) return;
  unsigned char* a = Map(kPages, 0);
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  auto p = Addrs(a, kPages, 1);
  std::vector<MergeResult> res(kPages);
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t i = 0; i < kPages; ++i) a[i * kPageSize] = 0;  // present
    state.ResumeTiming();
    auto t0 = Clock::now();
    m->DropZeroPages(p, res);
    Seconds(state, t0);
    if (res[0] != MergeResult::kMerged) state.SkipWithError("not dropped");
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * kPages));
  munmap(a, kPages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_DropZeroPages)
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_LinuxMemory_Probe(benchmark::State& state) {
  auto m = NewMemory(state);
  if (!m) return;
  unsigned char* a = Map(kPages, 4);
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  std::vector<PageState> st(kPages);
  for (auto _ : state) {
    m->Probe(reinterpret_cast<Addr>(a), st);
    benchmark::DoNotOptimize(st.data());
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * kPages));
  munmap(a, kPages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_Probe)->Arg(0);

// Hashes `pages` pages from a in address order, as a scan reads them:
// with Hash, or with HashFirstVisit (a first visit: pages of zeros are
// taken for zeros from a sample of their lines).
void HashInOrder(benchmark::State& state, unsigned char* a, std::size_t pages,
                 bool first_visit) {
  auto m = NewMemory(state);
  if (!m) return;
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  std::uint64_t h = 0;
  bool guessed = false;
  for (auto _ : state) {
    for (std::size_t i = 0; i < pages; ++i) {
      const Addr page = reinterpret_cast<Addr>(a + i * kPageSize);
      if (!(first_visit ? m->HashFirstVisit(page, &h, &guessed)
                        : m->Hash(page, &h))) {
        state.SkipWithError("hash failed");
      }
    }
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * pages));
}

// Pages hashed in address order: 16 MiB (from the last-level cache) and
// 512 MiB (from memory, past this machine's 300 MiB of L3).
// SAMEPAGE_NO_AVX512=1 measures the AVX2 build of XXH3.
void BM_LinuxMemory_Hash(benchmark::State& state) {
  const auto pages = static_cast<std::size_t>(state.range(0));
  unsigned char* a = Map(pages, 5);
  HashInOrder(state, a, pages, /*first_visit=*/false);
  munmap(a, pages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_Hash)
    ->Arg(kPages)
    ->Arg(131072)
    ->Unit(benchmark::kMillisecond);

// 512 MiB of pages of zeros (written, so present), as a first full scan
// reads free memory: read in full (range(1) = 0, Hash) or at their first
// visit (1, HashFirstVisit: an eighth of each page sampled).
void BM_LinuxMemory_FirstVisitOfZeroPages(benchmark::State& state) {
  const auto pages = static_cast<std::size_t>(state.range(0));
  unsigned char* a = Map(pages, 1);
  std::memset(a, 0, pages * kPageSize);
  HashInOrder(state, a, pages, /*first_visit=*/state.range(1) != 0);
  munmap(a, pages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_FirstVisitOfZeroPages)
    ->Args({131072, 0})
    ->Args({131072, 1})
    ->Unit(benchmark::kMillisecond);

// A write to a merged page: the kernel's copy-on-write.
void BM_LinuxMemory_CowAfterMerge(benchmark::State& state) {
  auto m = NewMemory(state);
  if (!m) return;
  unsigned char* a = Map(kPages, 6);
  unsigned char* b = Map(kPages, 6);
  (void)m->RefreshMaps();  // new memory: as madvise would
  m->BeginFullScan();
  auto p = Addrs(a, kPages, 1), q = Addrs(b, kPages, 1);
  std::vector<FrameId> frames(kPages);
  std::vector<MergeResult> res(kPages);
  for (auto _ : state) {
    m->MergePairs(p, q, frames, res);
    auto t0 = Clock::now();
    for (std::size_t i = 0; i < kPages; ++i) a[i * kPageSize + 1] = 9;
    Seconds(state, t0);
    for (std::size_t i = 0; i < kPages; ++i) a[i * kPageSize + 1] = 6;
    (void)m->Unmerge(p[0], kPages);
    (void)m->Unmerge(q[0], kPages);
    for (FrameId f : frames) m->ReleaseFrame(f);
  }
  state.SetItemsProcessed(
      static_cast<std::int64_t>(state.iterations() * kPages));
  munmap(a, kPages * kPageSize);
  munmap(b, kPages * kPageSize);
}
BENCHMARK(BM_LinuxMemory_CowAfterMerge)
    ->Arg(0)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace samepage::backend
