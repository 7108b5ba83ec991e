// LinuxMemory under concurrency: writers never lose a write, syscalls into
// a page being merged fail cleanly (counted), concurrent unmapping never
// crashes the merging thread.

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backend/linux_memory.h"
#include "backend/memory_configs.h"
#include "backend/proc_maps.h"
#include "backend/write_protect.h"

namespace samepage::backend {
namespace {

using Clock = std::chrono::steady_clock;
using Protection = LinuxMemoryOptions::Protection;

// n pages whose middle is a page table's boundary (2 MiB): runs of pages
// end there, so merging all of them takes a window on each side.
unsigned char* MapPagesAcrossATable(std::size_t n) {
  constexpr std::size_t kTable = 512 * kPageSize;
  void* p = mmap(nullptr, 2 * kTable, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  EXPECT_NE(p, MAP_FAILED);
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t boundary = (at + kTable) & ~(kTable - 1);
  auto* base = reinterpret_cast<unsigned char*>(boundary - n / 2 * kPageSize);
  // A page of hole on each side, as MapPages leaves.
  munmap(p, static_cast<std::size_t>(base - kPageSize -
                                     static_cast<unsigned char*>(p)));
  unsigned char* end = base + n * kPageSize + kPageSize;
  munmap(end, static_cast<std::size_t>(static_cast<unsigned char*>(p) +
                                       2 * kTable - end));
  munmap(base - kPageSize, kPageSize);
  munmap(base + n * kPageSize, kPageSize);
  return base;
}

unsigned char* MapPages(std::size_t n) {
  // One page of hole on each side: never joins an excluded neighbour.
  void* p = mmap(nullptr, (n + 2) * kPageSize, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  EXPECT_NE(p, MAP_FAILED);
  auto* base = static_cast<unsigned char*>(p) + kPageSize;
  munmap(p, kPageSize);
  munmap(base + n * kPageSize, kPageSize);
  return base;
}

std::vector<Addr> Addrs(unsigned char* base, std::size_t n) {
  std::vector<Addr> v;
  for (std::size_t i = 0; i < n; ++i)
    v.push_back(reinterpret_cast<Addr>(base + i * kPageSize));
  return v;
}

// base + partner(i) pages for i < n.
template <typename Partner>
std::vector<Addr> PartnerAddrs(unsigned char* base, std::size_t n,
                               Partner partner) {
  std::vector<Addr> v;
  for (std::size_t i = 0; i < n; ++i)
    v.push_back(reinterpret_cast<Addr>(base + partner(i) * kPageSize));
  return v;
}

// p[i] and q[i] merged as pairs, again and again.
struct Pairs {
  Pairs(std::vector<Addr> p_in, std::vector<Addr> q_in)
      : p(std::move(p_in)),
        q(std::move(q_in)),
        frames(p.size()),
        res(p.size()) {}
  // Returns how many pairs merged.
  std::uint64_t Merge(LinuxMemory& m) {
    m.MergePairs(p, q, frames, res);
    return static_cast<std::uint64_t>(
        std::count(res.begin(), res.end(), MergeResult::kMerged));
  }
  // After both sides were unmerged: the frames of the last merge.
  void ReleaseFrames(LinuxMemory& m) {
    for (std::size_t i = 0; i < p.size(); ++i)
      if (res[i] == MergeResult::kMerged) m.ReleaseFrame(frames[i]);
  }
  std::vector<Addr> p, q;
  std::vector<FrameId> frames;
  std::vector<MergeResult> res;
};

// Stops and joins a helper thread however the test body exits (a failed
// ASSERT returns early; a joinable std::thread would terminate()).
struct StopAndJoin {
  std::atomic<bool>& stop;
  std::thread& thread;
  ~StopAndJoin() {
    stop = true;
    if (thread.joinable()) thread.join();
  }
};

// The VMAs over n pages at p that are not registered with userfaultfd.
std::string UnregisteredVmas(unsigned char* p, std::size_t n) {
  std::vector<MapEntry> maps;
  if (!ReadMaps("/proc/self/smaps", &maps).ok()) return "cannot read smaps";
  const Addr lo = reinterpret_cast<Addr>(p), hi = lo + n * kPageSize;
  std::string out;
  for (const MapEntry& e : maps) {
    if (e.end <= lo || e.start >= hi || e.HasVmFlag("uw")) continue;
    char line[96];
    std::snprintf(line, sizeof(line), "%lx-%lx ", e.start, e.end);
    out += line;
  }
  return out;
}

// A thread that keeps unmapping n pages at r and mapping them again, filled
// with `byte`, until stopped (at the latest when destroyed). Another thread
// may map something into the hole between the two calls (the sanitizers'
// allocators did): then the remapping stops rather than replace it.
class Remapper {
 public:
  Remapper(unsigned char* r, std::size_t n, int byte)
      : thread_([this, r, n, byte] {
          while (!stop_.load()) {
            munmap(r, n * kPageSize);
            // Counted here: a merge may map a frame into the hole before
            // the mmap below (the race these tests run), which then ends
            // the loop at its first round (lost).
            ++cycles_;
            void* p =
                mmap(r, n * kPageSize, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (p != r) {
              if (p != MAP_FAILED) munmap(p, n * kPageSize);
              lost_ = true;
              break;
            }
            std::memset(r, byte, n * kPageSize);
          }
        }) {}
  ~Remapper() { Stop(); }
  Remapper(const Remapper&) = delete;
  Remapper& operator=(const Remapper&) = delete;
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  std::uint64_t cycles() const { return cycles_.load(); }
  // The range was taken by another mapping: not ours to unmap.
  bool lost() const { return lost_.load(); }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> cycles_{0};
  std::atomic<bool> lost_{false};
  std::thread thread_;  // last: starts once the counters exist
};

class RaceTest : public ::testing::TestWithParam<MemoryConfig> {
 protected:
  void SetUp() override {
    LinuxMemoryOptions o;
    GetParam().ApplyTo(&o);
    Status s = LinuxMemory::Create(o, &m_);
    if (GetParam().protection == Protection::kUserfaultfd && !s.ok())
      GTEST_SKIP() << "userfaultfd write-protect not available: "
                   << s.ToString();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  // n pages of fresh memory, every byte `byte`.
  static unsigned char* MapFilled(std::size_t n, int byte) {
    unsigned char* p = MapPages(n);
    std::memset(p, byte, n * kPageSize);
    return p;
  }
  // New memory joins the view, as madvise would have it, and a scan begins.
  void Rescan() {
    ASSERT_TRUE(m_->RefreshMaps().ok());
    m_->BeginFullScan();
  }
  std::unique_ptr<LinuxMemory> m_;
};

// Which page of a (and b) page i of c holds.
std::size_t Same(std::size_t i) { return i; }
std::size_t Scattered64(std::size_t i) { return (i * 37 + 11) % 64; }

// A writer increments a counter in every page of three regions (a, b, c:
// c's page i holds a's page of(i); equal when the writer is elsewhere)
// while this thread merges pairs of a and b, merges c into their frames,
// and unmerges, in a loop for ~1 s. A reader checks that the bytes the
// writer leaves alone never read otherwise, through the CPU and through
// write(2) (the kernel reading the page): with userfaultfd for all faults
// that system call must never fail, a page being merged included.
// With `held`, the writer holds it around each round of writes (as
// malloc's writes into the heap hold the arena's lock).
void WriterRace(LinuxMemory& m, std::size_t (*of)(std::size_t),
                std::size_t kN = 64, std::mutex* held = nullptr) {
  unsigned char* a = MapPages(kN);
  unsigned char* b = MapPages(kN);
  // With `held`, c takes two windows (see the test that passes it).
  unsigned char* c = held != nullptr ? MapPagesAcrossATable(kN) : MapPages(kN);
  auto content = [](std::size_t i, std::size_t k) {
    return static_cast<unsigned char>(i * 31 + k);
  };
  for (std::size_t i = 0; i < kN; ++i) {
    for (std::size_t k = 8; k < kPageSize; ++k) {
      a[i * kPageSize + k] = b[i * kPageSize + k] = content(i, k);
      c[i * kPageSize + k] = content(of(i), k);
    }
  }
  std::vector<std::size_t> c_of(kN);  // c's page holding a's page i
  for (std::size_t i = 0; i < kN; ++i) c_of[of(i)] = i;
  std::atomic<bool> stop{false};
  std::vector<std::uint64_t> expected(kN, 0);
  std::thread writer([&] {
    std::size_t i = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      std::unique_lock<std::mutex> lock;
      if (held != nullptr) lock = std::unique_lock<std::mutex>(*held);
      for (unsigned char* page :
           {a + i * kPageSize, b + i * kPageSize, c + c_of[i] * kPageSize}) {
        auto* counter = reinterpret_cast<volatile std::uint64_t*>(page);
        *counter = *counter + 1;
      }
      ++expected[i];
      i = (i + 1) % kN;
      if (i == 0) std::this_thread::yield();
    }
  });
  StopAndJoin writer_guard{stop, writer};
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  std::atomic<std::uint64_t> reads{0}, wrong{0}, efault{0};
  std::thread reader([&] {
    for (std::size_t i = 0; !stop.load(std::memory_order_relaxed);
         i = (i + 1) % kN) {
      const unsigned char* page = c + i * kPageSize;
      const std::size_t k = 8 + (i * 97) % (kPageSize - 8);
      unsigned char got[2] = {};
      if (page[k] != content(of(i), k)) ++wrong;
      if (write(fds[1], page + k, 1) != 1) {
        if (errno == EFAULT) ++efault;
        continue;
      }
      if (read(fds[0], got, 1) != 1 || got[0] != content(of(i), k)) ++wrong;
      ++reads;
    }
  });
  StopAndJoin reader_guard{stop, reader};

  m.BeginFullScan();
  ASSERT_TRUE(m.RefreshMaps().ok());
  auto pa = Addrs(a, kN), pb = Addrs(b, kN), pc = Addrs(c, kN);
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN), res2(kN);
  std::uint64_t pair_merges = 0, frame_merges = 0, loops = 0;
  std::uint64_t faults_before = m.Stats().protect_faults;
  auto end = Clock::now() + std::chrono::seconds(1);
  while (Clock::now() < end) {
    m.MergePairs(pa, pb, frames, res);
    std::vector<Addr> cp;
    std::vector<FrameId> cf;
    for (std::size_t i = 0; i < kN; ++i) {
      const std::size_t j = of(i);
      if (res[j] == MergeResult::kMerged) {
        cp.push_back(pc[i]);
        cf.push_back(frames[j]);
      }
    }
    for (std::size_t i = 0; i < kN; ++i) {
      if (res[i] == MergeResult::kMerged) {
        ++pair_merges;
      } else {
        ASSERT_TRUE(res[i] == MergeResult::kDiffers) << int(res[i]);
      }
    }
    res2.resize(cp.size());
    m.MergeIntoFrames(cp, cf, res2);
    for (auto r : res2) frame_merges += r == MergeResult::kMerged;
    ASSERT_TRUE(m.Unmerge(pa[0], kN));
    ASSERT_TRUE(m.Unmerge(pb[0], kN));
    ASSERT_TRUE(m.Unmerge(pc[0], kN));
    for (std::size_t i = 0; i < kN; ++i)
      if (res[i] == MergeResult::kMerged) m.ReleaseFrame(frames[i]);
    ++loops;
  }
  stop = true;
  writer.join();
  reader.join();
  close(fds[0]);
  close(fds[1]);
  for (std::size_t i = 0; i < kN; ++i) {
    for (unsigned char* page :
         {a + i * kPageSize, b + i * kPageSize, c + c_of[i] * kPageSize}) {
      std::uint64_t v;
      std::memcpy(&v, page, 8);
      ASSERT_EQ(v, expected[i]) << "page " << i;
      for (std::size_t k = 8; k < kPageSize; k += 61)
        ASSERT_EQ(page[k], content(i, k));
    }
  }
  std::uint64_t waits = m.Stats().protect_faults - faults_before;
  std::printf(
      "[%s] loops %lu, pair merges %lu, frame merges %lu (discard-first "
      "pages %lu), writes %lu, writer waits (mprotect) %lu, reads %lu, "
      "EFAULT %lu\n",
      m.protection() == Protection::kMprotect ? "mprotect" : "uffd", loops,
      pair_merges, frame_merges, m.Stats().discard_first_pages,
      [&] {
        std::uint64_t s = 0;
        for (auto e : expected) s += e;
        return s;
      }(),
      waits, reads.load(), efault.load());
  EXPECT_GT(pair_merges, 0u);
  EXPECT_GT(frame_merges, 0u);
  EXPECT_GT(reads.load(), 0u);
  EXPECT_EQ(wrong.load(), 0u);
  if (m.SyscallWritesWait()) {
    EXPECT_EQ(efault.load(), 0u);
  }
  EXPECT_EQ(m.Stats().frames_in_use, 0u);
  for (unsigned char* r : {a, b, c}) munmap(r, kN * kPageSize);
}

TEST_P(RaceTest, WriterNeverLosesAnIncrement) { WriterRace(*m_, Same); }

// c's pages join frames in scattered order, a mapping each: where kernel
// faults wait, that window discards them first and maps the frames into
// the empty page tables, while readers and the writer wait for them.
TEST_P(RaceTest, WriterNeverLosesAnIncrementJoiningScatteredFrames) {
  WriterRace(*m_, Scattered64);
  if (m_->SyscallWritesWait()) {
    EXPECT_GT(m_->Stats().discard_first_pages, 0u);
  }
}

// A writer that faults in a window while it holds a lock must be woken
// before the window lock is free again: a thread that takes the window
// lock and then that lock (glibc's free outside windows, then the arena's
// lock) would wait for the writer, and the merging thread, at its next
// window, for that thread. Until 2026-12-07 the writers of pages a window
// had replaced with frames slept until the end of the merge call
// (preload.thread_exit_trim_test hung so beside a QEMU guest, a few runs
// in a hundred; this test, every run). A hang ends the test (abort)
// rather than ctest's timeout.
TEST_P(RaceTest, WriterHoldingALockIsWokenBeforeTheNextWindow) {
  std::mutex held;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> rounds{0};
  std::thread locker([&] {
    while (!stop.load()) {
      {
        WindowLock window;
        std::lock_guard<std::mutex> lock(held);
      }
      ++rounds;
      std::this_thread::yield();
    }
  });
  std::thread watchdog([&] {
    const auto end =
        std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!stop.load() && std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (!stop.load()) {
      std::fprintf(stderr, "no progress in 60 s: deadlock\n");
      std::abort();
    }
  });
  for (auto of : {Same, Scattered64}) WriterRace(*m_, of, 64, &held);
  stop.store(true);
  locker.join();
  watchdog.join();
  EXPECT_GT(rounds.load(), 0u);
}

// c's page i holds a's page of its block of 100 turned by half a block:
// runs of 50 pages on consecutive frames, a few mappings per page table, so
// a run over a whole table (1,536 pages hold at least one) is discarded in
// one call where kernel faults wait, and mapped into the emptied table,
// while readers and the writer wait for it.
std::size_t TurnedBlocks(std::size_t i) {
  return i < 1500 ? i / 100 * 100 + (i % 100 + 50) % 100 : i;
}

TEST_P(RaceTest, WriterNeverLosesAnIncrementJoiningRunsOverWholeTables) {
  WriterRace(*m_, TurnedBlocks, 1536);
  if (m_->SyscallWritesWait()) {
    EXPECT_GE(m_->Stats().discard_first_pages, 512u);
  }
}

// The same with partners scattered in their region (page i of a pairs with
// page 37 i + 11 mod kN of b): a run of a is merged with many windows on b's
// side, and a write to any of them waits, then lands.
TEST_P(RaceTest, WriterNeverLosesAnIncrementWithScatteredPartners) {
  constexpr std::size_t kN = 64;
  auto partner = [](std::size_t i) { return (i * 37 + 11) % kN; };
  unsigned char* a = MapPages(kN);
  unsigned char* b = MapPages(kN);
  auto content = [](std::size_t i, std::size_t k) {
    return static_cast<unsigned char>(i * 31 + k);
  };
  for (std::size_t i = 0; i < kN; ++i) {
    for (std::size_t k = 8; k < kPageSize; ++k) {
      a[i * kPageSize + k] = b[partner(i) * kPageSize + k] = content(i, k);
    }
  }
  std::atomic<bool> stop{false};
  std::vector<std::uint64_t> expected(kN, 0);
  std::thread writer([&] {
    std::size_t i = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      for (unsigned char* page :
           {a + i * kPageSize, b + partner(i) * kPageSize}) {
        auto* counter = reinterpret_cast<volatile std::uint64_t*>(page);
        *counter = *counter + 1;
      }
      ++expected[i];
      i = (i + 1) % kN;
      if (i == 0) std::this_thread::yield();
    }
  });
  StopAndJoin guard{stop, writer};

  ASSERT_NO_FATAL_FAILURE(Rescan());
  Pairs pairs(Addrs(a, kN), PartnerAddrs(b, kN, partner));
  std::uint64_t merges = 0, loops = 0;
  // A pair merges only if the writer is held up between the copy of its p
  // and the window's compare (else one of its pages moved on): with
  // userfaultfd 0-280 merges a second, none in some seconds. A second at
  // least, and on until the first merge (at most 10 s), so that the
  // writes checked below raced merges.
  const auto start = Clock::now();
  while (Clock::now() < start + std::chrono::seconds(1) ||
         (merges == 0 && Clock::now() < start + std::chrono::seconds(10))) {
    merges += pairs.Merge(*m_);
    for (MergeResult r : pairs.res) {
      ASSERT_TRUE(r == MergeResult::kMerged || r == MergeResult::kDiffers)
          << int(r);
    }
    ASSERT_TRUE(m_->Unmerge(reinterpret_cast<Addr>(a), kN));
    ASSERT_TRUE(m_->Unmerge(reinterpret_cast<Addr>(b), kN));
    pairs.ReleaseFrames(*m_);
    ++loops;
  }
  stop = true;
  writer.join();
  for (std::size_t i = 0; i < kN; ++i) {
    for (unsigned char* page :
         {a + i * kPageSize, b + partner(i) * kPageSize}) {
      std::uint64_t v;
      std::memcpy(&v, page, 8);
      ASSERT_EQ(v, expected[i]) << "pair " << i;
      for (std::size_t k = 8; k < kPageSize; k += 61)
        ASSERT_EQ(page[k], content(i, k));
    }
  }
  std::printf("[%s] loops %lu, pair merges %lu\n",
              m_->protection() == Protection::kMprotect ? "mprotect" : "uffd",
              loops, merges);
  EXPECT_GT(merges, 0u);
  EXPECT_EQ(m_->Stats().frames_in_use, 0u);
  munmap(a, kN * kPageSize);
  munmap(b, kN * kPageSize);
}

// read() from a pipe into a page while it is being merged and unmerged.
// With mprotect (and user-mode-only userfaultfd) the kernel's copy into the
// write-protected page fails with EFAULT; the bytes stay in the pipe.
TEST_P(RaceTest, SyscallWritesIntoAWindowFailCleanly) {
  constexpr std::size_t kN = 16;
  unsigned char* a = MapPages(kN);
  unsigned char* b = MapPages(kN);
  std::memset(a, 0, kN * kPageSize);
  std::memset(b, 0, kN * kPageSize);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> ok{0}, efault{0}, other{0}, bytes_read{0};
  std::thread reader([&] {
    // Reads zeros into a[0] (content unchanged, so the pages keep merging).
    while (!stop.load()) {
      ssize_t r = read(fds[0], a + 64, 8);
      if (r > 0) {
        ++ok;
        bytes_read += static_cast<std::uint64_t>(r);
      } else if (r < 0 && errno == EFAULT) {
        ++efault;
      } else {
        ++other;
      }
    }
  });
  StopAndJoin guard{stop, reader};
  const unsigned char zeros[8] = {};
  std::uint64_t written = 0;
  ASSERT_NO_FATAL_FAILURE(Rescan());
  auto pa = Addrs(a, kN), pb = Addrs(b, kN);
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  std::uint64_t merges = 0;
  auto end = Clock::now() + std::chrono::milliseconds(500);
  while (Clock::now() < end) {
    // Keep a few reads' worth of bytes in the pipe.
    for (int i = 0; i < 4; ++i) {
      ASSERT_EQ(write(fds[1], zeros, 8), 8);
      written += 8;
    }
    m_->MergePairs(pa, pb, frames, res);
    for (std::size_t i = 0; i < kN; ++i) {
      if (res[i] == MergeResult::kMerged) ++merges;
    }
    ASSERT_TRUE(m_->Unmerge(pa[0], kN));
    ASSERT_TRUE(m_->Unmerge(pb[0], kN));
    for (std::size_t i = 0; i < kN; ++i)
      if (res[i] == MergeResult::kMerged) m_->ReleaseFrame(frames[i]);
  }
  // Let the reader drain the pipe, then stop it with a last write.
  auto drain = Clock::now() + std::chrono::seconds(5);
  while (bytes_read.load() < written && Clock::now() < drain)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  stop = true;
  ASSERT_EQ(write(fds[1], zeros, 8), 8);
  written += 8;
  reader.join();
  std::printf(
      "[%s] read() into a page being merged: %lu ok, %lu EFAULT, "
      "%lu other; %lu merges\n",
      m_->protection() == Protection::kMprotect ? "mprotect" : "uffd",
      ok.load(), efault.load(), other.load(), merges);
  EXPECT_EQ(other.load(), 0u);
  EXPECT_EQ(bytes_read.load(), written) << "EFAULT must not consume bytes";
  if (m_->SyscallWritesWait()) {
    EXPECT_EQ(efault.load(), 0u);
  }
  EXPECT_GT(merges, 0u);
  for (std::size_t k = 0; k < kN * kPageSize; k += 64) ASSERT_EQ(a[k], 0);
  close(fds[0]);
  close(fds[1]);
  munmap(a, kN * kPageSize);
  munmap(b, kN * kPageSize);
}

// Another thread keeps unmapping and remapping a region while this thread
// hashes, probes and merges it: no crash, and a page is reported gone or
// merged/different, never anything else.
TEST_P(RaceTest, ConcurrentUnmapNeverCrashes) {
  constexpr std::size_t kN = 32;
  unsigned char* r = MapFilled(kN, 3);
  unsigned char* twin = MapFilled(kN, 3);
  ASSERT_NO_FATAL_FAILURE(Rescan());
  Remapper unmapper(r, kN, 3);
  auto pr = Addrs(r, kN), pt = Addrs(twin, kN);
  std::vector<PageState> states(kN);
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  std::uint64_t hashes_failed = 0, gone = 0, merged = 0;
  auto end = Clock::now() + std::chrono::milliseconds(500);
  while (Clock::now() < end) {
    for (Addr p : pr) {
      std::uint64_t h;
      if (!m_->Hash(p, &h)) {
        ++hashes_failed;
      }
    }
    m_->Probe(pr[0], states);
    for (PageState s : states) gone += s == PageState::kGone;
    m_->MergePairs(pr, pt, frames, res);
    for (std::size_t i = 0; i < kN; ++i) {
      ASSERT_TRUE(res[i] == MergeResult::kMerged ||
                  res[i] == MergeResult::kGone ||
                  res[i] == MergeResult::kDiffers)
          << int(res[i]);
      if (res[i] == MergeResult::kMerged) ++merged;
    }
    ASSERT_TRUE(m_->Unmerge(pt[0], kN));
    for (std::size_t i = 0; i < kN; ++i)
      if (res[i] == MergeResult::kMerged) m_->ReleaseFrame(frames[i]);
  }
  unmapper.Stop();
  std::printf(
      "unmap cycles %lu, failed hashes %lu, gone probes %lu, merged "
      "%lu\n",
      unmapper.cycles(), hashes_failed, gone, merged);
  EXPECT_GT(unmapper.cycles(), 0u);
  for (std::size_t k = 0; k < kN * kPageSize; k += 64) ASSERT_EQ(twin[k], 3);
  twin[0] = 4;  // writable
  if (!unmapper.lost()) munmap(r, kN * kPageSize);
  munmap(twin, kN * kPageSize);
}

// The partners of a run are the pages another thread keeps unmapping and
// mapping again, in scattered order: a partner run that is gone fails alone,
// one that went away after p was remapped gives p back as anonymous memory
// with its bytes, and p stays intact and writable whatever happened.
TEST_P(RaceTest, ConcurrentUnmapOfScatteredPartnersLeavesTheRunIntact) {
  constexpr std::size_t kN = 32;
  unsigned char* r = MapFilled(kN, 3);
  unsigned char* run = MapFilled(kN, 3);
  ASSERT_NO_FATAL_FAILURE(Rescan());
  Remapper unmapper(r, kN, 3);
  Pairs pairs(Addrs(run, kN), PartnerAddrs(r, kN, [](std::size_t i) {
                return (i * 13 + 5) % kN;
              }));
  std::uint64_t gone = 0, merged = 0;
  auto end = Clock::now() + std::chrono::milliseconds(500);
  while (Clock::now() < end) {
    merged += pairs.Merge(*m_);
    for (MergeResult res : pairs.res) {
      ASSERT_TRUE(res == MergeResult::kMerged || res == MergeResult::kGone ||
                  res == MergeResult::kDiffers)
          << int(res);
      gone += res == MergeResult::kGone;
    }
    if (GetParam().protection == Protection::kUserfaultfd) {
      // Every piece is registered, those given back as anonymous memory
      // when their partner went away too: a later window over them is then
      // no mprotect one, in which a system call's write would fail.
      ASSERT_EQ(UnregisteredVmas(run, kN), "");
    }
    ASSERT_TRUE(m_->Unmerge(reinterpret_cast<Addr>(run), kN));
    pairs.ReleaseFrames(*m_);
    for (std::size_t k = 0; k < kN * kPageSize; k += 64) ASSERT_EQ(run[k], 3);
  }
  unmapper.Stop();
  std::printf("unmap cycles %lu, merged %lu, gone %lu\n", unmapper.cycles(),
              merged, gone);
  EXPECT_GT(unmapper.cycles(), 0u);
  for (std::size_t k = 0; k < kN * kPageSize; k += 64) ASSERT_EQ(run[k], 3);
  std::memset(run, 4, kN * kPageSize);  // writable
  for (std::size_t k = 0; k < kN * kPageSize; k += 64) ASSERT_EQ(run[k], 4);
  if (!unmapper.lost()) munmap(r, kN * kPageSize);
  munmap(run, kN * kPageSize);
}

INSTANTIATE_TEST_SUITE_P(Configs, RaceTest, ::testing::ValuesIn(kMemoryConfigs),
                         [](const auto& info) {
                           return MemoryConfigName(info.param);
                         });

}  // namespace
}  // namespace samepage::backend
