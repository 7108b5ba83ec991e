// The fault handler: windows make writers wait, guarded reads survive
// unmapped memory, and faults that are not ours reach the previous handler.

#include "backend/write_protect.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/hash.h"

namespace samepage::backend {
namespace {

unsigned char* MapPages(std::size_t n) {
  void* p = mmap(nullptr, n * kPageSize, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  EXPECT_NE(p, MAP_FAILED);
  return static_cast<unsigned char*>(p);
}

TEST(WriteProtectTest, GuardedReadsSurviveUnmappedAndProtectedMemory) {
  ASSERT_TRUE(InitProcessState().ok());
  unsigned char* p = MapPages(3);
  std::memset(p, 7, 3 * kPageSize);
  std::uint64_t h = 0;
  ASSERT_TRUE(GuardedHash(p, &h));
  EXPECT_EQ(h, HashPage(p));
  bool eq = false;
  ASSERT_TRUE(GuardedEqual(p, p + kPageSize, kPageSize, &eq));
  EXPECT_TRUE(eq);
  ASSERT_EQ(munmap(p + kPageSize, kPageSize), 0);
  ASSERT_EQ(mprotect(p + 2 * kPageSize, kPageSize, PROT_NONE), 0);
  EXPECT_FALSE(GuardedHash(p + kPageSize, &h));
  EXPECT_FALSE(GuardedHash(p + 2 * kPageSize, &h));
  EXPECT_FALSE(GuardedEqual(p, p + kPageSize, kPageSize, &eq));
  bool zero = true;
  EXPECT_FALSE(GuardedIsZero(p + kPageSize, kPageSize, &zero));
  unsigned char buf[kPageSize];
  EXPECT_FALSE(GuardedCopy(buf, p + 2 * kPageSize, kPageSize));
  // Still works after a fault was caught.
  ASSERT_TRUE(GuardedIsZero(p, kPageSize, &zero));
  EXPECT_FALSE(zero);
  munmap(p, 3 * kPageSize);
}

TEST(WriteProtectTest, SigbusOnTruncatedFileIsCaught) {
  ASSERT_TRUE(InitProcessState().ok());
  int fd = memfd_create("t", MFD_CLOEXEC);
  ASSERT_EQ(ftruncate(fd, kPageSize), 0);
  void* p = mmap(nullptr, kPageSize, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(p, MAP_FAILED);
  ASSERT_EQ(ftruncate(fd, 0), 0);
  std::uint64_t h;
  EXPECT_FALSE(GuardedHash(p, &h));
  munmap(p, kPageSize);
  close(fd);
}

TEST(WriteProtectTest, WriterWaitsForTheWindowAndItsWriteLands) {
  ASSERT_TRUE(InitProcessState().ok());
  unsigned char* p = MapPages(1);
  p[0] = 1;
  std::uint64_t faults_before = ProtectFaults();
  std::atomic<int> stage{0};
  int slot;
  {
    WindowLock lock;
    slot = OpenWindow(reinterpret_cast<Addr>(p),
                      reinterpret_cast<Addr>(p) + kPageSize);
    ASSERT_GE(slot, 0);
    ASSERT_EQ(mprotect(p, kPageSize, PROT_READ), 0);
  }
  std::thread writer([&] {
    stage = 1;
    p[0] = 2;  // faults, waits in the handler
    stage = 2;
  });
  // The writer must be parked in the handler, not done.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (WindowWaiters(slot) == 0 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(WindowWaiters(slot), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(stage.load(), 1);
  EXPECT_EQ(p[0], 1);
  {
    WindowLock lock;
    ASSERT_EQ(mprotect(p, kPageSize, PROT_READ | PROT_WRITE), 0);
    CloseWindow(slot);
  }
  writer.join();
  EXPECT_EQ(stage.load(), 2);
  EXPECT_EQ(p[0], 2);
  EXPECT_EQ(ProtectFaults(), faults_before + 1);
  munmap(p, kPageSize);
}

// --- chaining: faults that are not ours reach the previous handler ---

void ExitHandler(int, siginfo_t* info, void*) {
  _exit(info->si_code == SEGV_ACCERR ? 42 : 43);
}

TEST(WriteProtectDeathTest, ChainsToThePreviousSiginfoHandler) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        // Installed before ours: ours must forward to it.
        struct sigaction sa;
        std::memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = ExitHandler;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, nullptr);
        if (!InitProcessState().ok()) _exit(1);
        unsigned char* p = MapPages(1);
        mprotect(p, kPageSize, PROT_READ);
        // Open and close a window elsewhere, so the retry logic is armed.
        unsigned char* q = MapPages(1);
        int slot = OpenWindow(reinterpret_cast<Addr>(q),
                              reinterpret_cast<Addr>(q) + kPageSize);
        CloseWindow(slot);
        *reinterpret_cast<volatile unsigned char*>(p) = 1;
        _exit(0);
      },
      ::testing::ExitedWithCode(42), "");
}

TEST(WriteProtectDeathTest, DefaultActionStillKills) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof(sa));
        sa.sa_handler = SIG_DFL;
        sigaction(SIGSEGV, &sa, nullptr);
        if (!InitProcessState().ok()) _exit(1);
        unsigned char* p = MapPages(1);
        mprotect(p, kPageSize, PROT_NONE);
        *reinterpret_cast<volatile unsigned char*>(p) = 1;
        _exit(0);
      },
      ::testing::KilledBySignal(SIGSEGV), "");
}

}  // namespace
}  // namespace samepage::backend
