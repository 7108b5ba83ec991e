// Behaviour that differs from kernel KSM, shown as it is (docs/limitations.md
// refers to these tests), and the application's own signal handling, which
// samepage must keep working.

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "integration/test_util.h"

namespace samepage::testing {
namespace {

std::string ReadMaps() {
  std::ifstream in("/proc/self/maps");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(Limitations, MergedPagesShowAsMemfdMappings) {
  auto e = NewEngine();
  Mapping m(4);
  m.FillAll('q');
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 3);
  EXPECT_NE(ReadMaps().find("/memfd:samepage"), std::string::npos);
}

TEST(Limitations, MremapAcrossMergedAndPlainPagesFails) {
  auto e = NewEngine();
  Mapping m(4);
  m.Fill(0, 'a');
  m.Fill(1, 'a');
  m.Fill(2, 'b');
  m.Fill(3, 'c');
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), 1);
  // On plain anonymous memory this mremap succeeds; here the range spans a
  // frame mapping and an anonymous one.
  void* r = mremap(m.data(), m.bytes(), 2 * m.bytes(), MREMAP_MAYMOVE);
  EXPECT_EQ(r, MAP_FAILED);
  EXPECT_EQ(errno, EFAULT);
  EXPECT_TRUE(m.Holds(0, 'a') && m.Holds(1, 'a') && m.Holds(2, 'b'));
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_UNMERGEABLE).ok());
  EXPECT_TRUE(m.Holds(0, 'a') && m.Holds(3, 'c'));
}

// Library mode: an mremap that grows a merged run in place (one mapping
// of consecutive frames, room after it) extends the memfd mapping, so the
// grown part maps the memfd's next pages, here frames of other merged
// pages, where anonymous memory would read zeros. Through
// Engine::ChangeMapping (as the preload makes every mremap) the run is
// unmerged first, and the grown part reads zeros.
TEST(Limitations, GrowingAMergedRunInPlaceMapsTheMemfdsNextPages) {
  for (bool through_engine : {false, true}) {
    SCOPED_TRACE(through_engine);
    auto e = NewEngine();
    constexpr std::size_t kRun = 8;
    // a: kRun pages with room for as many after them; then b, c, d. At
    // the start of a page table: a scan takes memory in aligned chunks,
    // and a run across two of them merges in two pieces on frames apart
    // (two mappings, which mremap cannot grow; 3 in 200 runs before).
    constexpr std::size_t kTable = 512 * kPage;
    void* r = mmap(nullptr, 8 * kRun * kPage + kTable, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(r, MAP_FAILED);
    const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(r);
    const std::uintptr_t aligned = (at + kTable - 1) / kTable * kTable;
    auto* a = reinterpret_cast<unsigned char*>(aligned);
    if (aligned != at) ASSERT_EQ(munmap(r, aligned - at), 0);
    ASSERT_EQ(munmap(a + 8 * kRun * kPage, at + kTable - aligned), 0);
    ASSERT_EQ(munmap(a + kRun * kPage, 3 * kRun * kPage), 0);
    unsigned char* b = a + 4 * kRun * kPage;
    auto fill = [](unsigned char* p, unsigned char v, std::size_t i) {
      std::memset(p, v, kPage);
      p[0] = static_cast<unsigned char>(i + 1);
    };
    for (std::size_t i = 0; i < kRun; ++i) {
      fill(a + i * kPage, 0x5a, i);  // a and b alike, page for page
      fill(b + i * kPage, 0x5a, i);
      fill(b + (kRun + i) * kPage, 0x6b, i);  // and c and d
      fill(b + (2 * kRun + i) * kPage, 0x6b, i);
    }
    ASSERT_TRUE(e->Madvise(a, kRun * kPage, MADV_MERGEABLE).ok());
    ASSERT_TRUE(e->Madvise(b, 3 * kRun * kPage, MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    ASSERT_EQ(Counter(*e, "pages_sharing"), static_cast<long>(2 * kRun));
    struct Grow {
      void* at;
      std::size_t from, to;
      bool ok = false;
    } grow{a, kRun * kPage, 2 * kRun * kPage};
    auto run = [](void* g) {
      auto* x = static_cast<Grow*>(g);
      x->ok = mremap(x->at, x->from, x->to, 0) == x->at;
      return x->ok;
    };
    if (through_engine) {
      Engine::ChangeMapping(a, kRun * kPage, Engine::MappingChange::kMove, run,
                            &grow);
    } else {
      run(&grow);
    }
    ASSERT_TRUE(grow.ok) << std::strerror(errno);
    std::size_t zero_pages = 0;
    for (std::size_t i = kRun; i < 2 * kRun; ++i) {
      bool zero = true;
      for (std::size_t k = 0; k < kPage && zero; ++k)
        zero = a[i * kPage + k] == 0;
      zero_pages += zero;
    }
    EXPECT_EQ(zero_pages, through_engine ? kRun : 0u);
    for (std::size_t i = 0; i < kRun; ++i)
      EXPECT_EQ(a[i * kPage], static_cast<unsigned char>(i + 1));
    ASSERT_EQ(munmap(a, 8 * kRun * kPage), 0);
  }
}

// MREMAP_DONTUNMAP moves a range's pages and leaves the source mapped,
// reading zeros (anonymous memory). Made raw in library mode on a merged
// run (one private mapping of a memfd), the source keeps mapping the memfd
// and reads the frames' bytes again, as after MADV_DONTNEED (item 1).
// Through Engine::ChangeMapping (as the preload makes every mremap) the
// run is unmerged first, and the source reads zeros. Either way the moved
// pages hold the bytes.
TEST(Limitations, MovingAMergedRunWithDontunmapLeavesItsSourceOnTheFrames) {
#ifndef MREMAP_DONTUNMAP
  constexpr int MREMAP_DONTUNMAP = 4;
#endif
  for (bool through_engine : {false, true}) {
    SCOPED_TRACE(through_engine);
    auto e = NewEngine();
    constexpr std::size_t kRun = 8;
    Mapping a(kRun), b(kRun);
    for (std::size_t i = 0; i < kRun; ++i) {
      a.FillKey(i, 100 + i);  // a and b alike, page for page
      b.FillKey(i, 100 + i);
    }
    ASSERT_TRUE(e->Madvise(a.data(), a.bytes(), MADV_MERGEABLE).ok());
    ASSERT_TRUE(e->Madvise(b.data(), b.bytes(), MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    ASSERT_EQ(Counter(*e, "pages_sharing"), static_cast<long>(kRun));
    struct Move {
      void* from;
      std::size_t len;
      void* to = MAP_FAILED;
      int err = 0;
    } move{a.data(), a.bytes()};
    auto run = [](void* m) {
      auto* x = static_cast<Move*>(m);
      // The new address too (here none): mremap takes it whatever the
      // flags, and a stray register's value fails the call with EINVAL.
      x->to = mremap(x->from, x->len, x->len, MREMAP_MAYMOVE | MREMAP_DONTUNMAP,
                     nullptr);
      x->err = x->to == MAP_FAILED ? errno : 0;
      return x->to != MAP_FAILED;
    };
    if (through_engine) {
      Engine::ChangeMapping(a.data(), a.bytes(), Engine::MappingChange::kMove,
                            run, &move);
    } else {
      run(&move);
    }
    ASSERT_NE(move.to, MAP_FAILED) << std::strerror(move.err);
    const auto* moved = static_cast<const unsigned char*>(move.to);
    std::size_t zero_pages = 0;
    for (std::size_t i = 0; i < kRun; ++i) {
      EXPECT_TRUE(HoldsKeyAt(moved + i * kPage, 100 + i)) << "page " << i;
      zero_pages += a.Holds(i, 0);
    }
    EXPECT_EQ(zero_pages, through_engine ? kRun : 0u);
    if (!through_engine) {
      for (std::size_t i = 0; i < kRun; ++i)
        EXPECT_TRUE(a.HoldsKey(i, 100 + i)) << "the source's page " << i;
    }
    ASSERT_EQ(munmap(move.to, a.bytes()), 0);
  }
}

long ThreadMinorFaults() {
  rusage u{};
  getrusage(RUSAGE_THREAD, &u);
  return u.ru_minflt;
}

// A merged page is mapped when it is first touched, not by the merge: its
// first read after the merge takes a minor fault, where kernel KSM's merged
// page stays mapped. Later reads do not.
TEST(Limitations, FirstReadOfAMergedPageFaults) {
  constexpr std::size_t kN = 64;
  auto e = NewEngine();
  Mapping m(kN);
  for (std::size_t i = 0; i < kN; ++i) m.FillKey(i, i % 16);  // 4 copies each
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  e->RunFullScans(2);
  ASSERT_EQ(Counter(*e, "pages_sharing"), static_cast<long>(kN - 16));
  auto read_all = [&] {
    const long before = ThreadMinorFaults();
    for (std::size_t i = 0; i < kN; ++i)
      EXPECT_TRUE(m.HoldsKey(i, i % 16)) << i;
    return ThreadMinorFaults() - before;
  };
  const long first = read_all();
  const long second = read_all();
  std::printf("minor faults: first read %ld, second %ld (%zu pages)\n", first,
              second, kN);
  EXPECT_GT(first, 0);
  EXPECT_EQ(second, 0);
}

sigjmp_buf g_jump;
volatile sig_atomic_t g_app_handler_calls = 0;

void AppHandler(int, siginfo_t*, void*) {
  g_app_handler_calls = g_app_handler_calls + 1;
  siglongjmp(g_jump, 1);
}

// A handler the application installed before samepage still receives the
// application's own faults, while merging goes on.
TEST(Signals, ApplicationSegvHandlerStillRuns) {
  struct sigaction sa = {}, old = {};
  sa.sa_sigaction = AppHandler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  ASSERT_EQ(sigaction(SIGSEGV, &sa, &old), 0);
  {
    EngineOptions options;
    options.protection = EngineOptions::Protection::kMprotect;
    auto e = NewEngine(options);
    Mapping m(16);
    m.FillAll('s');
    ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
    e->RunFullScans(2);
    ASSERT_EQ(Counter(*e, "pages_sharing"), 15);
    void* guard = mmap(nullptr, kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
    ASSERT_NE(guard, MAP_FAILED);
    if (sigsetjmp(g_jump, 1) == 0) {
      *static_cast<volatile char*>(guard) = 1;  // the application's own bug
      ADD_FAILURE() << "no fault";
    }
    EXPECT_EQ(g_app_handler_calls, 1);
    munmap(guard, kPage);
    m.page(3)[0] = 'w';  // a write to a merged page: plain copy-on-write
    EXPECT_EQ(g_app_handler_calls, 1);
    EXPECT_TRUE(m.Holds(4, 's'));
  }
  sigaction(SIGSEGV, &old, nullptr);
}

}  // namespace
}  // namespace samepage::testing
