// FrameStore on a real memfd: contiguity, hole punching, fork pinning.

#include "backend/frame_store.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "backend/linux_memory.h"
#include "backend/proc_maps.h"
#include "backend/write_protect.h"

namespace samepage::backend {
namespace {

long Blocks(int fd) {
  struct stat st;
  EXPECT_EQ(fstat(fd, &st), 0);
  return static_cast<long>(st.st_blocks);
}

// Waits for `pid` for at most `timeout`; kills it after that. Exit status,
// or -1 on timeout/abnormal end.
int WaitBounded(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (r < 0) return -1;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

class FrameStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(InitProcessState().ok());
    ASSERT_TRUE(store_.Init().ok());
  }
  FrameStore store_;
};

TEST_F(FrameStoreTest, AllocatesContiguousRunsAndNeverReuses) {
  FrameId a = store_.Allocate(3);
  FrameId b = store_.Allocate(5);
  ASSERT_NE(a, kNoFrame);
  ASSERT_NE(b, kNoFrame);
  EXPECT_EQ(b, a + 3);
  EXPECT_EQ(store_.frames_in_use(), 8u);
  store_.Release(a);
  FrameId c = store_.Allocate(1);
  EXPECT_EQ(c, b + 5) << "a released offset is never handed out again";
  EXPECT_EQ(store_.Allocate(0), kNoFrame);
  // View bytes: the shared mappings of the store's file.
  auto view_bytes = [&] {
    std::vector<MapEntry> maps;
    EXPECT_TRUE(ReadMaps("/proc/self/maps", &maps).ok());
    std::uint64_t bytes = 0;
    for (const auto& e : maps)
      if (e.shared && e.inode == store_.inode()) bytes += e.size();
    return bytes;
  };
  EXPECT_EQ(view_bytes(), FrameStore::kMinChunkFrames * kPageSize)
      << "a few frames take the smallest chunk";
  // A run spanning a growth step: every frame's address is its offset in a
  // shared mapping of the file, written there and read back through the fd.
  FrameId big = store_.Allocate(FrameStore::kGrowFrames + 10);
  ASSERT_NE(big, kNoFrame);
  EXPECT_EQ(store_.view_chunks(), 2u);
  const std::uint64_t allocated = store_.frames_allocated() * kPageSize;
  EXPECT_GE(view_bytes(), allocated);
  EXPECT_LE(view_bytes(), 2 * allocated)
      << "the view takes address space in proportion to the frames";
  std::vector<MapEntry> maps;
  ASSERT_TRUE(ReadMaps("/proc/self/maps", &maps).ok());
  auto offset_of = [&](const std::byte* a) -> std::int64_t {
    const auto addr = reinterpret_cast<Addr>(a);
    for (const auto& e : maps)
      if (e.shared && e.inode == store_.inode() && addr >= e.start &&
          addr < e.end)
        return static_cast<std::int64_t>(e.offset + (addr - e.start));
    return -1;
  };
  const auto grow = static_cast<FrameId>(FrameStore::kGrowFrames);
  for (FrameId f : {big, FrameId(big + grow - 1), FrameId(big + grow + 9)}) {
    EXPECT_EQ(offset_of(store_.FrameAddress(f)), store_.FrameOffset(f)) << f;
    std::memset(store_.FrameAddress(f), static_cast<int>(f & 0x7f), kPageSize);
    char buf[1];
    ASSERT_EQ(pread(store_.fd(), buf, 1, store_.FrameOffset(f) + 100), 1);
    EXPECT_EQ(buf[0], static_cast<char>(f & 0x7f)) << f;
  }
}

TEST_F(FrameStoreTest, ReleasePunchesTheFrame) {
  FrameId f = store_.Allocate(64);
  ASSERT_NE(f, kNoFrame);
  for (int i = 0; i < 64; ++i)
    std::memset(store_.FrameAddress(f + i), 0x5a, kPageSize);
  long full = Blocks(store_.fd());
  EXPECT_GE(full, 64 * 8);  // 512-byte blocks
  for (int i = 0; i < 64; ++i) store_.Release(f + i);
  store_.Flush();
  EXPECT_LE(Blocks(store_.fd()), full - 64 * 8);
  EXPECT_EQ(store_.frames_pinned(), 0u);
  EXPECT_EQ(store_.frames_punched(), 64u);
  EXPECT_EQ(store_.frames_in_use(), 0u);
  // A stale view of a punched frame reads zeros, never other data.
  EXPECT_EQ(static_cast<int>(store_.FrameAddress(f)[100]), 0);
}

// Releases in any order, more than wait at once, and runs of frames with
// gaps between them: every frame released is punched, and no other.
TEST_F(FrameStoreTest, EveryReleasedFrameIsPunchedWhateverTheOrder) {
  constexpr std::size_t kN = 3 * FrameStore::kPendingPunches;
  FrameId f = store_.Allocate(kN);
  ASSERT_NE(f, kNoFrame);
  for (std::size_t i = 0; i < kN; ++i)
    std::memset(store_.FrameAddress(f + FrameId(i)), 0x5a, kPageSize);
  const long full = Blocks(store_.fd());
  // Every frame but each seventh, in a shuffled order.
  std::vector<FrameId> order;
  for (std::size_t i = 0; i < kN; ++i)
    if (i % 7 != 3) order.push_back(f + FrameId(i));
  std::mt19937 rng(5);
  std::shuffle(order.begin(), order.end(), rng);
  for (FrameId r : order) store_.Release(r);
  store_.Flush();
  EXPECT_EQ(store_.frames_punched(), order.size());
  EXPECT_EQ(Blocks(store_.fd()),
            full - static_cast<long>(order.size() * kPageSize / 512));
  for (std::size_t i = 0; i < kN; ++i) {
    const char want = i % 7 == 3 ? 0x5a : 0;
    ASSERT_EQ(static_cast<char>(store_.FrameAddress(f + FrameId(i))[7]), want)
        << i;
  }
  store_.Flush();  // nothing left: nothing more punched
  EXPECT_EQ(store_.frames_punched(), order.size());
}

TEST(FrameStoreForkTest, FramesAChildMayMapArePinned) {
  LinuxMemoryOptions o;
  o.protection = LinuxMemoryOptions::Protection::kMprotect;
  std::unique_ptr<LinuxMemory> m;
  ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
  constexpr int kN = 16;
  void* pa = mmap(nullptr, kN * kPageSize, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void* pb = mmap(nullptr, kN * kPageSize, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  auto* a = static_cast<unsigned char*>(pa);
  auto* b = static_cast<unsigned char*>(pb);
  std::memset(a, 0x77, kN * kPageSize);
  std::memset(b, 0x77, kN * kPageSize);
  ASSERT_TRUE(m->RefreshMaps().ok());  // new memory: as madvise would
  m->BeginFullScan();
  std::vector<Addr> p, q;
  for (int i = 0; i < kN; ++i) {
    p.push_back(reinterpret_cast<Addr>(a + i * kPageSize));
    q.push_back(reinterpret_cast<Addr>(b + i * kPageSize));
  }
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(p, q, frames, res);
  for (auto r : res) ASSERT_EQ(r, MergeResult::kMerged);

  int go[2];
  ASSERT_EQ(pipe(go), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: wait until the parent has released, then keep reading the
    // merged pages for a while. Any byte that is not 0x77 is corruption.
    char c;
    if (read(go[0], &c, 1) != 1) _exit(3);
    auto end =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    do {
      for (int i = 0; i < kN * static_cast<int>(kPageSize); i += 512) {
        if (a[i] != 0x77 || b[i] != 0x77) _exit(1);
      }
    } while (std::chrono::steady_clock::now() < end);
    // The child never punches the parent's frames, nor allocates from them.
    m->ReleaseFrame(frames[0]);
    if (m->frame_store().frames_punched() != 0) _exit(4);
    if (m->frame_store().Allocate(1) != kNoFrame) _exit(5);
    _exit(0);
  }
  // Parent: copy every page away from its frame, then release the frames.
  long before = Blocks(m->frame_store().fd());
  for (int i = 0; i < kN; ++i) {
    a[i * kPageSize] = 1;
    b[i * kPageSize] = 1;
  }
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_pinned, static_cast<std::uint64_t>(kN));
  EXPECT_EQ(m->frame_store().frames_punched(), 0u);
  EXPECT_EQ(Blocks(m->frame_store().fd()), before);
  ASSERT_EQ(write(go[1], "x", 1), 1);
  EXPECT_EQ(WaitBounded(pid, std::chrono::seconds(10)), 0);
  close(go[0]);
  close(go[1]);

  // Frames allocated after the fork (and the first release after it) are
  // punched as usual.
  FrameId later = m->frame_store().Allocate(1);
  ASSERT_NE(later, kNoFrame);
  std::memset(m->frame_store().FrameAddress(later), 1, kPageSize);
  m->ReleaseFrame(later);
  m->FlushReleasedFrames();
  EXPECT_EQ(m->frame_store().frames_punched(), 1u);
  munmap(pa, kN * kPageSize);
  munmap(pb, kN * kPageSize);
}

}  // namespace
}  // namespace samepage::backend
