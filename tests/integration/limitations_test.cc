// Behaviour that differs from kernel KSM, shown as it is (docs/limitations.md
// refers to these tests), and the application's own signal handling, which
// samepage must keep working.

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>

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
