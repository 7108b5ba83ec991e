#include "cli/demo.h"

#include <fmt/core.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "samepage/engine.h"

namespace samepage {
namespace {

constexpr std::size_t kPage = 4096;

// What each page of the workload must contain: a function of its index, so
// the data can be checked after merging without keeping a second copy.
struct Workload {
  std::size_t pages = 0;
  std::size_t runs_pages = 0;       // [0, runs): first half == second half
  std::size_t scattered_pages = 0;  // copies of a small pool, random order
  std::size_t zero_pages = 0;
  std::size_t unique_pages = 0;
  std::vector<std::uint32_t> scattered_pick;  // pool index per scattered page
  static constexpr std::size_t kPool = 512;

  void Fill(std::size_t page, unsigned char* out) const {
    std::uint64_t seed;
    std::size_t i = page;
    if (i < runs_pages) {
      seed = 0x1000000 + i % (runs_pages / 2);
    } else if ((i -= runs_pages) < scattered_pages) {
      seed = 0x2000000 + scattered_pick[i];
    } else if ((i -= scattered_pages) < zero_pages) {
      std::memset(out, 0, kPage);
      return;
    } else {
      seed = 0x3000000 + (i - zero_pages);
    }
    std::mt19937_64 rng(seed);
    for (std::size_t w = 0; w < kPage / 8; ++w) {
      const std::uint64_t v = rng();
      std::memcpy(out + w * 8, &v, 8);
    }
  }
};

// Proportional set size of this process, in KiB, from /proc/self/smaps_rollup:
// a page mapped k times counts 1/k in each mapping, so merged pages count once.
long PssKib() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string key;
  long value;
  std::string unit;
  while (in >> key) {
    if (key == "Pss:") {
      in >> value;
      return value;
    }
    std::getline(in, unit);
  }
  return -1;
}

std::string ReadKnob(Engine& e, const char* name) {
  std::string text;
  if (!e.ReadKnob(name, &text).ok()) return "?";
  if (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

bool Check(const Status& st, const char* what) {
  if (st.ok()) return true;
  fmt::print(stderr, "samepage demo: {}: {}\n", what, st.ToString());
  return false;
}

}  // namespace

int RunDemo(const DemoOptions& options) {
  Workload w;
  w.pages = options.mib * 1024 * 1024 / kPage;
  w.runs_pages = (w.pages / 2) & ~std::size_t(1);
  w.scattered_pages = w.pages / 8;
  w.zero_pages = w.pages / 8;
  w.unique_pages = w.pages - w.runs_pages - w.scattered_pages - w.zero_pages;
  std::mt19937 pick_rng(42);
  for (std::size_t i = 0; i < w.scattered_pages; ++i) {
    w.scattered_pick.push_back(pick_rng() % Workload::kPool);
  }

  fmt::print("samepage demo: {} MiB workload, {} pages\n", options.mib, w.pages);
  fmt::print("  {:>8} pages in runs of duplicated buffers (two copies of a {} MiB buffer)\n",
             w.runs_pages, w.runs_pages / 2 * kPage >> 20);
  fmt::print("  {:>8} pages scattered copies of {} distinct pages\n",
             w.scattered_pages, Workload::kPool);
  fmt::print("  {:>8} zero pages\n", w.zero_pages);
  fmt::print("  {:>8} unique pages\n\n", w.unique_pages);
  std::fflush(stdout);  // before the progress line on stderr

  const std::size_t bytes = w.pages * kPage;
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    fmt::print(stderr, "samepage demo: mmap {} bytes: {}\n", bytes,
               std::strerror(errno));
    return 1;
  }
  auto* base = static_cast<unsigned char*>(mem);
  for (std::size_t i = 0; i < w.pages; ++i) w.Fill(i, base + i * kPage);

  std::unique_ptr<Engine> engine;
  if (!Check(Engine::Create({}, &engine), "create engine")) return 1;
  const long pss_before = PssKib();

  if (!Check(engine->WriteKnob("pages_to_scan", "30000"), "pages_to_scan") ||
      !Check(engine->WriteKnob("sleep_millisecs", "0"), "sleep_millisecs") ||
      !Check(engine->WriteKnob("use_zero_pages",
                               options.use_zero_pages ? "1" : "0"),
             "use_zero_pages") ||
      !Check(engine->Madvise(mem, bytes, MADV_MERGEABLE), "madvise")) {
    return 1;
  }
  std::vector<bool> used(Workload::kPool);
  std::size_t distinct = 0;
  for (std::uint32_t p : w.scattered_pick) distinct += !used[p], used[p] = true;
  const std::size_t expect_saved =
      w.runs_pages / 2 + (w.scattered_pages - distinct) +
      (options.use_zero_pages ? w.zero_pages : w.zero_pages - 1);

  const auto start = std::chrono::steady_clock::now();
  if (!Check(engine->WriteKnob("run", "1"), "run=1")) return 1;
  double elapsed = 0;
  std::uint64_t saved = 0;
  // On a terminal the progress line is rewritten in place; in a log, a line
  // is added each time the counters move.
  const bool tty = isatty(STDERR_FILENO) == 1;
  std::string last_line;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                            start).count();
    saved = std::stoull(ReadKnob(*engine, "pages_sharing")) +
            std::stoull(ReadKnob(*engine, "ksm_zero_pages"));
    if (options.progress) {
      const std::string counters = fmt::format(
          "full_scans {:>3}  pages_sharing {:>8}  ksm_zero_pages {:>8}  "
          "({:3.0f}% of duplicates)",
          ReadKnob(*engine, "full_scans"), ReadKnob(*engine, "pages_sharing"),
          ReadKnob(*engine, "ksm_zero_pages"), 100.0 * saved / expect_saved);
      if (tty) {
        fmt::print(stderr, "\r  {:6.2f} s  {}", elapsed, counters);
      } else if (counters != last_line) {
        fmt::print(stderr, "  {:6.2f} s  {}\n", elapsed, counters);
      }
      last_line = counters;
    }
    if (saved >= expect_saved || elapsed > options.timeout_seconds) break;
  }
  if (options.progress && tty) fmt::print(stderr, "\n");
  if (!Check(engine->WriteKnob("run", "0"), "run=0")) return 1;
  const long pss_after = PssKib();

  // Every page must still hold exactly what was written.
  std::vector<unsigned char> expect(kPage);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < w.pages; ++i) {
    w.Fill(i, expect.data());
    if (std::memcmp(expect.data(), base + i * kPage, kPage) != 0) ++bad;
  }
  // A write to a merged page changes that page only (copy-on-write).
  base[0] ^= 0xff;
  w.Fill(w.runs_pages / 2, expect.data());
  const bool cow_ok =
      std::memcmp(expect.data(), base + (w.runs_pages / 2) * kPage, kPage) == 0;
  base[0] ^= 0xff;

  fmt::print("\n  {:<22} {:>14} {:>14}\n", "", "before", "after");
  fmt::print("  {:<22} {:>10.1f} MiB {:>10.1f} MiB\n", "memory in use (Pss)",
             pss_before / 1024.0, pss_after / 1024.0);
  for (const char* name : {"pages_shared", "pages_sharing", "pages_unshared",
                           "pages_volatile", "ksm_zero_pages", "full_scans",
                           "pages_scanned", "general_profit"}) {
    fmt::print("  {:<22} {:>14} {:>14}\n", name, 0, ReadKnob(*engine, name));
  }
  const EngineStats stats = engine->Stats();
  fmt::print("\n  samepage: write-protection by {}, {} frames in use, {} of {} "
             "mappings (VMA budget) used, {} merges skipped for budget\n",
             stats.protection, stats.frames_in_use, stats.vmas_used,
             stats.vma_budget, stats.budget_skips);
  fmt::print("  time to merge {} duplicate pages: {:.2f} s\n", saved, elapsed);
  fmt::print("  memory saved: {:.1f} MiB (kernel accounting, Pss)\n",
             (pss_before - pss_after) / 1024.0);
  fmt::print("  data intact: {} ({} of {} pages differ)\n",
             bad == 0 ? "yes" : "NO", bad, w.pages);
  fmt::print("  copy-on-write isolates writers: {}\n", cow_ok ? "yes" : "NO");

  const bool ok = bad == 0 && cow_ok && saved >= expect_saved &&
                  pss_after < pss_before;
  if (!Check(engine->WriteKnob("run", "2"), "run=2")) return 1;
  engine.reset();
  munmap(mem, bytes);
  if (!ok) fmt::print(stderr, "samepage demo: FAILED\n");
  return ok ? 0 : 1;
}

}  // namespace samepage
