// The fault handler: windows make writers wait, guarded reads survive
// unmapped memory, and faults that are not ours reach the program's own
// action (installed before us, or since through ChainedSigaction) as the
// kernel would have delivered them.

#include "backend/write_protect.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "backend/protector.h"
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

// The direct-I/O registry: ranges overlap as half-open intervals, every
// slot taken means everything overlaps, and a forked child starts with
// none of the parent's I/O (its threads are gone).
TEST(WriteProtectTest, PinnedIoRegistryTracksRangesAndResetsInAChild) {
  ASSERT_TRUE(InitProcessState().ok());
  const Addr base = Addr{1} << 40;
  EXPECT_FALSE(PinnedIoOverlaps(base, base + kPageSize));
  const int io = BeginPinnedIo(base + 10, base + 20);
  ASSERT_GE(io, 0);
  EXPECT_TRUE(PinnedIoOverlaps(base, base + kPageSize));
  EXPECT_TRUE(PinnedIoOverlaps(base + 19, base + 30));
  EXPECT_FALSE(PinnedIoOverlaps(base + 20, base + 30));
  EXPECT_FALSE(PinnedIoOverlaps(base, base + 10));
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) _exit(PinnedIoOverlaps(base, base + kPageSize) ? 1 : 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_TRUE(PinnedIoOverlaps(base, base + kPageSize));  // the parent's
  EndPinnedIo(io);
  EXPECT_FALSE(PinnedIoOverlaps(base, base + kPageSize));

  std::vector<int> tokens;
  int t = 0;
  while ((t = BeginPinnedIo(base, base + 1)) >= 0 && tokens.size() < 10000) {
    tokens.push_back(t);
  }
  ASSERT_EQ(t, kPinnedIoOverflow);
  EXPECT_TRUE(PinnedIoOverlaps(base + 5 * kPageSize, base + 6 * kPageSize));
  EndPinnedIo(t);
  EXPECT_FALSE(PinnedIoOverlaps(base + 5 * kPageSize, base + 6 * kPageSize));
  for (int k : tokens) EndPinnedIo(k);
  EXPECT_FALSE(PinnedIoOverlaps(base, base + kPageSize));
}

// Once the process uses an interface that pins pages where samepage cannot
// see which (an io_uring), every page counts as pinned. In a child: the
// state lasts for the life of the process.
TEST(WriteProtectTest, PinningIoInUseMakesEveryPageCountAsPinned) {
  ASSERT_TRUE(InitProcessState().ok());
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int bits = PinningIoInUse() ? 1 : 0;
    if (PinnedIoOverlaps(0x10000, 0x11000)) bits |= 2;
    NotePinningIoInUse();
    if (!PinningIoInUse()) bits |= 4;
    if (!PinnedIoOverlaps(0x10000, 0x11000)) bits |= 8;
    _exit(bits);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// The zero check sees one non-zero byte wherever it is, for page-sized and
// odd lengths, and unaligned starts.
TEST(WriteProtectTest, IsZeroFindsANonZeroByteAnywhere) {
  ASSERT_TRUE(InitProcessState().ok());
  std::vector<unsigned char> buf(2 * kPageSize, 0);
  for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{13}}) {
    for (std::size_t n : {kPageSize, std::size_t{511}, std::size_t{1000}, std::size_t{513}}) {
      unsigned char* p = buf.data() + offset;
      bool zero = false;
      ASSERT_TRUE(GuardedIsZero(p, n, &zero));
      EXPECT_TRUE(zero) << offset << " " << n;
      for (std::size_t i = 0; i < n; ++i) {
        p[i] = 0x80;
        ASSERT_TRUE(GuardedIsZero(p, n, &zero));
        ASSERT_FALSE(zero) << "byte " << i << " of " << n << " at +" << offset;
        p[i] = 0;
      }
      p[n] = 1;  // a byte just past the range does not count
      ASSERT_TRUE(GuardedIsZero(p, n, &zero));
      EXPECT_TRUE(zero);
      p[n] = 0;
    }
  }
}

// A page of zeros is hashed by a zero check (GuardedHash): its hash is
// still XXH3's of the page, and a page with one byte that is not zero,
// wherever it is, gets XXH3's hash of its own bytes.
TEST(WriteProtectTest, HashOfAZeroPageIsXxh3sWithoutHashing) {
  ASSERT_TRUE(InitProcessState().ok());
  unsigned char* p = MapPages(1);
  std::memset(p, 0, kPageSize);
  std::uint64_t h = 0;
  ASSERT_TRUE(GuardedHash(p, &h));
  EXPECT_EQ(h, HashPage(p));
  EXPECT_EQ(h, ZeroPageHash());
  for (std::size_t i = 0; i < kPageSize; i += 97) {
    p[i] = 1;
    ASSERT_TRUE(GuardedHash(p, &h));
    ASSERT_EQ(h, HashPage(p)) << "byte " << i;
    ASSERT_NE(h, ZeroPageHash()) << "byte " << i;
    p[i] = 0;
  }
  p[kPageSize - 1] = 0x80;
  ASSERT_TRUE(GuardedHash(p, &h));
  EXPECT_EQ(h, HashPage(p));
  EXPECT_NE(h, ZeroPageHash());
  munmap(p, kPageSize);
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
  // Started before the window: a thread with a window open must not
  // allocate (debug builds abort).
  std::atomic<bool> go{false};
  std::thread writer([&] {
    while (!go.load()) std::this_thread::yield();
    stage = 1;
    p[0] = 2;  // faults, waits in the handler
    stage = 2;
  });
  int slot;
  {
    WindowLock lock;
    slot = OpenWindow(reinterpret_cast<Addr>(p),
                      reinterpret_cast<Addr>(p) + kPageSize);
    EXPECT_GE(slot, 0);
    EXPECT_EQ(mprotect(p, kPageSize, PROT_READ), 0);
  }
  go.store(true);
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

// Whether the kernel holds a userfaultfd write-protection on the page at p
// (pagemap bit 57).
bool UffdWriteProtected(const void* p) {
  const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  std::uint64_t e = 0;
  const off_t at =
      static_cast<off_t>(reinterpret_cast<Addr>(p) / kPageSize * 8);
  const bool read = fd >= 0 && pread(fd, &e, sizeof(e), at) == sizeof(e);
  if (fd >= 0) close(fd);
  return read && ((e >> 57) & 1) != 0;
}

// A userfaultfd write-protection that fails part way (a VMA of the range
// not registered) is undone before the mprotect fallback. A remap racing
// between the two can put a VMA that is not registered in the part
// protected; the kernel stops a range at the first such VMA, so undoing
// with one call left the rest protected, with no window to wake its
// writers (RaceTest.ConcurrentUnmapNeverCrashes hung so). The remap comes
// on cue here, and the page after it must come out unprotected.
TEST(WriteProtectTest, APartialProtectionIsUndonePastARemapInside) {
  struct Cue {
    unsigned char* first = nullptr;
    bool remapped = false;
  } cue;
  auto remap_first_page = [](void* arg) {
    auto* c = static_cast<Cue*>(arg);
    munmap(c->first, kPageSize);
    c->remapped = mmap(c->first, kPageSize, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1,
                       0) == c->first;
  };
  std::unique_ptr<Protector> protector;
  Status s = NewUffdProtector(&protector, remap_first_page, &cue);
  if (!s.ok())
    GTEST_SKIP() << "no userfaultfd write-protection: " << s.ToString();
  unsigned char* p = MapPages(3);
  for (int i = 0; i < 3; ++i)
    p[i * kPageSize] = static_cast<unsigned char>(i + 1);
  cue.first = p;
  const Addr start = reinterpret_cast<Addr>(p);
  // Pages 0 and 1 registered (one VMA), page 2 not.
  ASSERT_TRUE(protector->RegisterRange(start, 2 * kPageSize));
  ProtectMethod how = ProtectMethod::kNone;
  ASSERT_EQ(protector->Protect(start, 3 * kPageSize, &how), 0);
  ASSERT_TRUE(cue.remapped) << "the cue did not run";
  EXPECT_EQ(how, ProtectMethod::kMprotect);
  ASSERT_FALSE(UffdWriteProtected(p + kPageSize))
      << "page 1 left write-protected with no window open";
  ASSERT_TRUE(protector->Unprotect(start, 3 * kPageSize, how));
  p[kPageSize] = 9;  // would wait for good if still protected
  EXPECT_EQ(p[kPageSize], 9);
  EXPECT_EQ(p[2 * kPageSize], 3);
  (void)protector->Unregister(start, 3 * kPageSize);
  munmap(p, 3 * kPageSize);
}

// A writer asleep on a write-protected page that a call samepage does not
// see unmaps and maps anew (another allocator's munmap and mmap) is not
// woken by clearing the protection, which fails there: the new mapping is
// not registered. Unprotect wakes the whole range when any page fails;
// before 2026-12-07 such a writer slept for good.
TEST(WriteProtectTest, AWriterAsleepOnAPageMappedAnewIsWokenByTheUnprotect) {
  std::unique_ptr<Protector> protector;
  Status s = NewUffdProtector(&protector);
  if (!s.ok())
    GTEST_SKIP() << "no userfaultfd write-protection: " << s.ToString();
  unsigned char* p = MapPages(2);
  p[0] = 1;
  p[kPageSize] = 2;
  const Addr start = reinterpret_cast<Addr>(p);
  ASSERT_TRUE(protector->RegisterRange(start, 2 * kPageSize));
  ProtectMethod how = ProtectMethod::kNone;
  ASSERT_EQ(protector->Protect(start, 2 * kPageSize, &how), 0);
  ASSERT_EQ(how, ProtectMethod::kUffd);
  std::atomic<pid_t> tid{0};
  std::atomic<bool> done{false};
  std::thread writer([&] {
    tid.store(static_cast<pid_t>(syscall(SYS_gettid)));
    *reinterpret_cast<volatile unsigned char*>(p) = 7;  // sleeps
    done.store(true);
  });
  // Until the writer sleeps on the page (at most 5 s).
  auto asleep = [&] {
    char path[64], wchan[64] = {};
    std::snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", tid.load());
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return false;
    const ssize_t n = read(fd, wchan, sizeof(wchan) - 1);
    close(fd);
    return n > 0 && std::strstr(wchan, "userfault") != nullptr;
  };
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while ((tid.load() == 0 || !asleep()) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(asleep()) << "the writer did not fault";
  ASSERT_EQ(munmap(p, kPageSize), 0);
  ASSERT_EQ(mmap(p, kPageSize, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0),
            p);
  EXPECT_FALSE(protector->Unprotect(start, 2 * kPageSize, how));
  const auto woken_by =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!done.load() && std::chrono::steady_clock::now() < woken_by)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_TRUE(done.load()) << "the writer still sleeps on the old page";
  protector->Replaced(start, 2 * kPageSize, ProtectMethod::kUffd);  // if not
  writer.join();
  EXPECT_EQ(p[0], 7);
  EXPECT_EQ(p[kPageSize], 2);
  (void)protector->Unregister(start, 2 * kPageSize);
  munmap(p, 2 * kPageSize);
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

// --- the program's actions installed after ours (ChainedSigaction) ---

struct sigaction SiginfoAction(void (*f)(int, siginfo_t*, void*), int flags) {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = f;
  sa.sa_flags = SA_SIGINFO | flags;
  sigemptyset(&sa.sa_mask);
  return sa;
}

// Writes to a fresh page made `prot`; exits 0 if that did not end the
// process.
[[noreturn]] void WriteToProtectedPage(int prot) {
  unsigned char* p = MapPages(1);
  mprotect(p, kPageSize, prot);
  *reinterpret_cast<volatile unsigned char*>(p) = 1;
  _exit(0);
}

// Not installed yet: ChainedSigaction is the real sigaction(), and the
// install chains what it set.
void SetBeforeInstallThenFault() {
  struct sigaction sa = SiginfoAction(ExitHandler, 0);
  struct sigaction k;
  if (ChainedSigaction(SIGSEGV, &sa, nullptr) != 0) _exit(1);
  sigaction(SIGSEGV, nullptr, &k);
  if (k.sa_sigaction != ExitHandler) _exit(2);
  if (!InitProcessState().ok()) _exit(3);
  if (ChainedSigaction(SIGSEGV, nullptr, &k) != 0) _exit(4);
  if (k.sa_sigaction != ExitHandler) _exit(5);
  WriteToProtectedPage(PROT_READ);  // to ExitHandler
}

TEST(WriteProtectDeathTest, ActionSetBeforeInstallIsChained) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(SetBeforeInstallThenFault(), ::testing::ExitedWithCode(42), "");
}

// Installed: our handler stays, writers in windows still wait in it, and
// the program's own faults reach the program's handler.
void SetAfterInstallThenFault() {
  // SIG_DFL, or a sanitizer runtime's handler, installed before main.
  struct sigaction before;
  sigaction(SIGSEGV, nullptr, &before);
  if (!InitProcessState().ok()) _exit(1);
  struct sigaction sa = SiginfoAction(ExitHandler, 0);
  struct sigaction old;
  struct sigaction k;
  if (ChainedSigaction(SIGSEGV, &sa, &old) != 0) _exit(2);
  if (old.sa_handler != before.sa_handler) _exit(3);
  sigaction(SIGSEGV, nullptr, &k);
  if (k.sa_sigaction == ExitHandler) _exit(4);
  unsigned char* p = MapPages(1);
  // Started before the window: a thread with a window open must not
  // allocate (debug builds abort).
  std::atomic<bool> go{false};
  std::thread writer([p, &go] {
    while (!go.load()) std::this_thread::yield();
    p[0] = 7;
  });
  int slot;
  {
    WindowLock lock;
    slot = OpenWindow(reinterpret_cast<Addr>(p),
                      reinterpret_cast<Addr>(p) + kPageSize);
    mprotect(p, kPageSize, PROT_READ);
  }
  go.store(true);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (WindowWaiters(slot) == 0) {
    if (std::chrono::steady_clock::now() > deadline) _exit(6);
    std::this_thread::yield();
  }
  {
    WindowLock lock;
    mprotect(p, kPageSize, PROT_READ | PROT_WRITE);
    CloseWindow(slot);
  }
  writer.join();
  if (p[0] != 7) _exit(5);
  WriteToProtectedPage(PROT_NONE);  // to ExitHandler
}

TEST(WriteProtectDeathTest, ActionSetAfterInstallKeepsOursInPlace) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(SetAfterInstallThenFault(), ::testing::ExitedWithCode(42), "");
}

sigjmp_buf g_chain_jump;
volatile sig_atomic_t g_chain_calls = 0;
volatile sig_atomic_t g_chain_mask_ok = 0;

void MaskCheckingHandler(int sig, siginfo_t*, void*) {
  sigset_t now;
  pthread_sigmask(SIG_SETMASK, nullptr, &now);
  g_chain_mask_ok = sig == SIGSEGV && sigismember(&now, SIGSEGV) &&
                    sigismember(&now, SIGUSR1) && !sigismember(&now, SIGUSR2);
  g_chain_calls = g_chain_calls + 1;
  siglongjmp(g_chain_jump, 1);
}

// Faults on a PROT_NONE page `n` times; true if each reached the handler.
bool FaultTimes(int n) {
  unsigned char* p = MapPages(1);
  mprotect(p, kPageSize, PROT_NONE);
  int caught = 0;
  for (int i = 0; i < n; ++i) {
    if (sigsetjmp(g_chain_jump, 1) == 0) {
      *reinterpret_cast<volatile unsigned char*>(p) = 1;
    } else {
      ++caught;
    }
  }
  munmap(p, kPageSize);
  return caught == n;
}

TEST(WriteProtectTest, ChainedHandlerRunsWithItsMaskBlocked) {
  ASSERT_TRUE(InitProcessState().ok());
  struct sigaction sa = SiginfoAction(MaskCheckingHandler, 0), saved, k;
  sigaddset(&sa.sa_mask, SIGUSR1);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &sa, &saved), 0);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, nullptr, &k), 0);
  EXPECT_EQ(k.sa_sigaction, MaskCheckingHandler);
  EXPECT_TRUE(sigismember(&k.sa_mask, SIGUSR1));
  g_chain_calls = 0;
  EXPECT_TRUE(FaultTimes(1));
  EXPECT_EQ(g_chain_calls, 1);
  EXPECT_TRUE(g_chain_mask_ok);
  sigset_t now;
  pthread_sigmask(SIG_SETMASK, nullptr, &now);
  EXPECT_FALSE(sigismember(&now, SIGSEGV));  // siglongjmp restored it
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &saved, nullptr), 0);
}

TEST(WriteProtectTest, ResetHandResetsTheChainedActionOnce) {
  ASSERT_TRUE(InitProcessState().ok());
  struct sigaction sa = SiginfoAction(MaskCheckingHandler, SA_RESETHAND);
  struct sigaction saved, k;
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &sa, &saved), 0);
  g_chain_calls = 0;
  EXPECT_TRUE(FaultTimes(1));
  EXPECT_EQ(g_chain_calls, 1);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, nullptr, &k), 0);
  EXPECT_EQ(k.sa_handler, SIG_DFL);  // the kernel keeps flags and mask
  EXPECT_EQ(k.sa_flags & (SA_SIGINFO | SA_RESETHAND),
            SA_SIGINFO | SA_RESETHAND);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &saved, nullptr), 0);
}

TEST(WriteProtectTest, ChainedActionIsStoredAsTheKernelStoresIt) {
  ASSERT_TRUE(InitProcessState().ok());
  // What the kernel itself makes of an action, on a signal nobody uses.
  struct sigaction sa = SiginfoAction(MaskCheckingHandler, 0);
  sa.sa_flags |= 0x400 | SA_ONSTACK;  // SA_UNSUPPORTED: the kernel drops it
  sigaddset(&sa.sa_mask, SIGKILL);
  sigaddset(&sa.sa_mask, SIGUSR2);
  struct sigaction saved_usr1, kernel, saved, chained;
  ASSERT_EQ(sigaction(SIGUSR1, &sa, &saved_usr1), 0);
  ASSERT_EQ(sigaction(SIGUSR1, nullptr, &kernel), 0);
  ASSERT_EQ(sigaction(SIGUSR1, &saved_usr1, nullptr), 0);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &sa, &saved), 0);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, nullptr, &chained), 0);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &saved, nullptr), 0);
  EXPECT_EQ(chained.sa_sigaction, kernel.sa_sigaction);
  EXPECT_EQ(chained.sa_flags, kernel.sa_flags);
  EXPECT_EQ(reinterpret_cast<void*>(chained.sa_restorer),
            reinterpret_cast<void*>(kernel.sa_restorer));
  for (int sig = 1; sig <= 64; ++sig) {
    EXPECT_EQ(sigismember(&chained.sa_mask, sig),
              sigismember(&kernel.sa_mask, sig))
        << sig;
  }
}

TEST(WriteProtectTest, IgnoredSignalSentByKillIsDiscarded) {
  ASSERT_TRUE(InitProcessState().ok());
  struct sigaction ign, saved;
  std::memset(&ign, 0, sizeof(ign));
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  ASSERT_EQ(ChainedSigaction(SIGBUS, &ign, &saved), 0);
  EXPECT_EQ(raise(SIGBUS), 0);  // tgkill: si_code < 0, nothing happens
  ASSERT_EQ(ChainedSigaction(SIGBUS, &saved, nullptr), 0);
}

void IgnoreThenFault() {
  if (!InitProcessState().ok()) _exit(1);
  struct sigaction ign;
  std::memset(&ign, 0, sizeof(ign));
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  ChainedSigaction(SIGSEGV, &ign, nullptr);
  WriteToProtectedPage(PROT_NONE);
}

// As with the kernel: a fault cannot be ignored.
TEST(WriteProtectDeathTest, IgnoredFaultStillKills) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(IgnoreThenFault(), ::testing::KilledBySignal(SIGSEGV), "");
}

void OtherHandler(int sig, siginfo_t* info, void* context) {
  MaskCheckingHandler(sig, info, context);
}

// The handler reads the chained action while another thread replaces it:
// it must always find one of the two, whole.
TEST(WriteProtectTest, ChainedActionReadWhileReplaced) {
  ASSERT_TRUE(InitProcessState().ok());
  struct sigaction a = SiginfoAction(MaskCheckingHandler, 0);
  struct sigaction b = SiginfoAction(OtherHandler, SA_ONSTACK);
  sigaddset(&a.sa_mask, SIGUSR1);
  sigaddset(&b.sa_mask, SIGUSR1);
  struct sigaction saved;
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &a, &saved), 0);
  std::atomic<bool> stop{false};
  std::atomic<long> swaps{0};
  std::thread swapper([&] {
    while (!stop.load()) {
      ChainedSigaction(SIGSEGV, swaps.load() % 2 ? &a : &b, nullptr);
      swaps.fetch_add(1);
    }
  });
  g_chain_calls = 0;
  int rounds = 0;
  auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  while (std::chrono::steady_clock::now() < end) {
    ASSERT_TRUE(FaultTimes(100));
    ASSERT_TRUE(g_chain_mask_ok);
    rounds += 100;
  }
  stop = true;
  swapper.join();
  EXPECT_EQ(g_chain_calls, rounds);
  EXPECT_GT(swaps.load(), 0);
  ASSERT_EQ(ChainedSigaction(SIGSEGV, &saved, nullptr), 0);
}

// A thread that holds the window lock alone and then takes a share of it
// (the engine allocating inside ChangeMapping, through another allocator
// that discards or unmaps: Engine::AllocatorChange) neither waits for
// itself nor lets go of its hold. glibc's rdlock answers EDEADLK to the
// writer, and WindowsClosed's unlock then released the writer's lock:
// another thread's share came through at once (until 2026-12-07).
TEST(WriteProtectTest, ASharedHoldOnTheWindowLocksHolderKeepsItsHold) {
  ASSERT_TRUE(InitProcessState().ok());
  std::atomic<bool> other_in{false};
  std::thread other;
  {
    WindowLock lock;
    { WindowsClosed nested; }  // returns at once, holding nothing more
    other = std::thread([&] {
      WindowsClosed share;
      other_in.store(true);
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_FALSE(other_in.load()) << "the window lock was let go";
  }
  other.join();
  EXPECT_TRUE(other_in.load());
}

// Debug builds abort on samepage's own allocation, delete or free on a
// thread with a window open (write_protect.cc, the linker's --wrap): a
// writer of the window's pages may hold malloc's lock while it waits.
TEST(WriteProtectTest, DebugBuildsAbortOnAnAllocationInsideAWindow) {
#ifdef NDEBUG
  GTEST_SKIP() << "the check is compiled into Debug builds only";
#else
  ASSERT_TRUE(InitProcessState().ok());
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  unsigned char* p = MapPages(1);
  const Addr a = reinterpret_cast<Addr>(p);
  EXPECT_DEATH(
      {
        WindowLock lock;
        if (OpenWindow(a, a + kPageSize) < 0) std::abort();
        auto* v = new std::vector<int>(16);
        std::printf("%zu\n", v->size());
      },
      "allocation inside a merge window");
  // Outside a window the same allocation is fine.
  auto v = std::make_unique<std::vector<int> >(16);
  EXPECT_EQ(v->size(), 16u);
  munmap(p, kPageSize);
#endif
}

}  // namespace
}  // namespace samepage::backend
