// Tests for the 2008 /dev/ksm ABI (api/devksm.h).
//
// DevKsmTest drives DevKsm over a fake Engine that records what it is asked,
// to pin down the mapping onto madvise, knobs and ScanNow. DevKsmEndToEnd
// runs the old API over the real engine: register duplicate pages, KSM_SCAN,
// and observe merging, copy-on-write and unmerging as a program would.

#include "api/devksm.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "api/sysfs_text.h"
#include "samepage/engine.h"
#include "samepage/ksm2008.h"

namespace samepage {
namespace {

constexpr std::size_t kPage = 4096;

// An Engine that records calls. Knobs use the real sysfs text rules.
class FakeEngine : public Engine {
 public:
  struct MadviseCall {
    std::uintptr_t addr;
    std::size_t len;
    int advice;
    bool operator==(const MadviseCall&) const = default;
  };

  Status Madvise(void* addr, std::size_t len, int advice) override {
    const auto a = reinterpret_cast<std::uintptr_t>(addr);
    madvise_calls.push_back({a, len, advice});
    if (a % kPage != 0 || a + len < a) return Status::Error(EINVAL, "align");
    if (a <= hole && hole < a + len) return Status::Error(ENOMEM, "hole");
    return Status::Ok();
  }
  Status SetMergeAny(bool on) override {
    merge_any = on;
    return Status::Ok();
  }
  bool MergeAny() const override { return merge_any; }
  Status ReadKnob(std::string_view name, std::string* text) override {
    if (!IsKsmFile(name)) return Status::Error(ENOENT, "no such file");
    *text = FormatKnob(knobs, counters, name);
    return Status::Ok();
  }
  Status WriteKnob(std::string_view name, std::string_view text) override {
    knob_writes.emplace_back(name, text);
    return samepage::WriteKnob(&knobs, name, text, KnobContext{});
  }
  std::vector<std::string> KnobNames() const override { return {}; }
  std::string KsmStatText() override { return ""; }
  std::string KsmMergingPagesText() override { return ""; }
  // Every scanned page merges while `mergeable` lasts.
  std::size_t ScanNow(std::size_t pages) override {
    scan_calls.push_back(pages);
    const std::size_t merged = std::min<std::uint64_t>(pages, mergeable);
    mergeable -= merged;
    counters.pages_sharing += merged;
    return pages;
  }
  void RunFullScans(int) override {}
  EngineStats Stats() override { return {}; }

  std::vector<MadviseCall> madvise_calls;
  std::vector<std::pair<std::string, std::string>> knob_writes;
  std::vector<std::size_t> scan_calls;
  std::uintptr_t hole = 0;  // an unmapped address, if nonzero
  std::uint64_t mergeable = 0;
  bool merge_any = false;
  Knobs knobs;
  Counters counters;
};

// ioctl through DevKsm, returning -1 and the errno as a syscall would.
struct Result {
  int ret;
  int err;
};

class DevKsmTest : public ::testing::Test {
 protected:
  Result Ioctl(int fd, unsigned long request, void* arg) {
    int result = 0;
    const Status s = dev_.Ioctl(fd, request, arg, &result);
    if (!s.ok()) return {-1, s.code()};
    return {result, 0};
  }
  int OpenDevice() {
    int fd = -1;
    EXPECT_TRUE(dev_.Open(&fd).ok());
    return fd;
  }
  int Create(unsigned long request) {
    const Result r = Ioctl(device_, request, nullptr);
    EXPECT_EQ(r.err, 0);
    return r.ret;
  }
  Result Register(int area, std::uintptr_t addr, std::uint32_t npages) {
    ksm_memory_region mem{npages, 0, addr};
    return Ioctl(area, KSM_REGISTER_MEMORY_REGION, &mem);
  }

  FakeEngine engine_;
  DevKsm dev_{&engine_};
  int device_ = OpenDevice();
};

std::string FdTarget(int fd) {
  char buf[256];
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = readlink(link.c_str(), buf, sizeof(buf));
  return n > 0 ? std::string(buf, n) : "";
}

TEST_F(DevKsmTest, AbiNumbersOfTheNovember2008Driver) {
  EXPECT_EQ(KSMIO, 0xAB);
  EXPECT_EQ(KSM_GET_API_VERSION, 0xAB00u);
  EXPECT_EQ(KSM_CREATE_SHARED_MEMORY_AREA, 0xAB01u);
  EXPECT_EQ(KSM_CREATE_SCAN, 0xAB02u);
  EXPECT_EQ(KSM_START_STOP_KTHREAD, 0x4010AB03u);
  EXPECT_EQ(KSM_GET_INFO_KTHREAD, 0x4010AB04u);
  EXPECT_EQ(KSM_REGISTER_MEMORY_REGION, 0x4010AB20u);
  EXPECT_EQ(KSM_REMOVE_MEMORY_REGION, 0xAB21u);
  EXPECT_EQ(KSM_SCAN, 0x4008AB40u);
  EXPECT_EQ(offsetof(ksm_memory_region, addr), 8u);
}

TEST_F(DevKsmTest, DescriptorsAreRealUniqueFds) {
  ASSERT_GE(device_, 0);
  const int area = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  const int scan = Create(KSM_CREATE_SCAN);
  ASSERT_GE(area, 0);
  ASSERT_GE(scan, 0);
  EXPECT_NE(area, device_);
  EXPECT_NE(scan, area);
  EXPECT_NE(fcntl(area, F_GETFD), -1);
  EXPECT_NE(FdTarget(device_).find("memfd:samepage-ksm"), std::string::npos);
  EXPECT_NE(FdTarget(area).find("memfd:samepage-ksm-sma"), std::string::npos);
  EXPECT_NE(FdTarget(scan).find("memfd:samepage-ksm-scan"), std::string::npos);
  EXPECT_TRUE(dev_.Owns(area));
  EXPECT_FALSE(dev_.Owns(STDIN_FILENO));
  ASSERT_TRUE(dev_.Close(area).ok());
  EXPECT_FALSE(dev_.Owns(area));
  EXPECT_EQ(fcntl(area, F_GETFD), -1);  // really closed
  EXPECT_EQ(dev_.Close(area).code(), EBADF);
  EXPECT_EQ(dev_.Close(STDIN_FILENO).code(), EBADF);
  EXPECT_EQ(Ioctl(STDIN_FILENO, KSM_GET_API_VERSION, nullptr).err, EBADF);
}

TEST_F(DevKsmTest, ApiVersionOnlyOnTheDevice) {
  EXPECT_EQ(Ioctl(device_, KSM_GET_API_VERSION, nullptr).ret, 1);
  const int area = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  const int scan = Create(KSM_CREATE_SCAN);
  EXPECT_EQ(Ioctl(area, KSM_GET_API_VERSION, nullptr).err, EINVAL);
  EXPECT_EQ(Ioctl(scan, KSM_GET_API_VERSION, nullptr).err, EINVAL);
}

TEST_F(DevKsmTest, UnknownRequestsAreEinval) {
  const int area = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  const int scan = Create(KSM_CREATE_SCAN);
  ksm_user_scan s{10, 10};
  ksm_memory_region m{1, 0, 0x10000};
  EXPECT_EQ(Ioctl(device_, _IO(KSMIO, 0x99), nullptr).err, EINVAL);
  EXPECT_EQ(Ioctl(device_, KSM_SCAN, &s).err, EINVAL);
  EXPECT_EQ(Ioctl(device_, KSM_REGISTER_MEMORY_REGION, &m).err, EINVAL);
  EXPECT_EQ(Ioctl(area, KSM_SCAN, &s).err, EINVAL);
  EXPECT_EQ(Ioctl(area, KSM_CREATE_SCAN, nullptr).err, EINVAL);
  EXPECT_EQ(Ioctl(scan, KSM_REGISTER_MEMORY_REGION, &m).err, EINVAL);
  EXPECT_EQ(Ioctl(scan, KSM_REMOVE_MEMORY_REGION, nullptr).err, EINVAL);
  EXPECT_TRUE(engine_.madvise_calls.empty());
  EXPECT_TRUE(engine_.scan_calls.empty());
}

TEST_F(DevKsmTest, RegisterIsMadviseMergeable) {
  const int area = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  EXPECT_EQ(Register(area, 0x100000, 16).ret, 0);
  EXPECT_EQ(Register(area, 0x110000, 1).ret, 0);  // adjacent: no overlap
  const std::vector<FakeEngine::MadviseCall> expected = {
      {0x100000, 16 * kPage, 12}, {0x110000, kPage, 12}};
  EXPECT_EQ(engine_.madvise_calls, expected);
}

TEST_F(DevKsmTest, RegisterErrors) {
  const int area = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  const int other = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  EXPECT_EQ(Ioctl(area, KSM_REGISTER_MEMORY_REGION, nullptr).err, EFAULT);
  EXPECT_EQ(
      Ioctl(area, KSM_REGISTER_MEMORY_REGION, reinterpret_cast<void*>(8)).err,
      EFAULT);
  EXPECT_EQ(Register(area, 0x100000, 0).err, EPERM);
  ASSERT_EQ(Register(area, 0x100000, 16).ret, 0);
  // Overlaps, in this area or another one of the process.
  EXPECT_EQ(Register(area, 0x100000, 16).err, EPERM);
  EXPECT_EQ(Register(area, 0x10f000, 2).err, EPERM);
  EXPECT_EQ(Register(other, 0x0ff000, 2).err, EPERM);
  EXPECT_EQ(Register(other, 0x0f0000, 64).err, EPERM);  // covers it
  EXPECT_EQ(engine_.madvise_calls.size(), 1u);
  // madvise's own errors pass through.
  EXPECT_EQ(Register(other, 0x200001, 1).err, EINVAL);
  engine_.hole = 0x302000;
  engine_.madvise_calls.clear();
  EXPECT_EQ(Register(other, 0x300000, 4).err, ENOMEM);
  // ...and a failed registration leaves nothing marked.
  const std::vector<FakeEngine::MadviseCall> expected = {
      {0x300000, 4 * kPage, 12}, {0x300000, 4 * kPage, 13}};
  EXPECT_EQ(engine_.madvise_calls, expected);
  engine_.hole = 0;
  EXPECT_EQ(Register(other, 0x300000, 4).ret, 0);  // not left registered
}

TEST_F(DevKsmTest, RemoveAndCloseUnregisterTheAreasRegions) {
  const int a = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  const int b = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  ASSERT_EQ(Register(a, 0x100000, 1).ret, 0);
  ASSERT_EQ(Register(a, 0x200000, 2).ret, 0);
  ASSERT_EQ(Register(b, 0x300000, 3).ret, 0);
  engine_.madvise_calls.clear();
  EXPECT_EQ(Ioctl(a, KSM_REMOVE_MEMORY_REGION, nullptr).ret, 0);
  std::vector<FakeEngine::MadviseCall> expected = {{0x100000, kPage, 13},
                                                   {0x200000, 2 * kPage, 13}};
  EXPECT_EQ(engine_.madvise_calls, expected);
  // Removed: the range may be registered again; removing twice is a no-op.
  EXPECT_EQ(Register(b, 0x100000, 1).ret, 0);
  engine_.madvise_calls.clear();
  EXPECT_EQ(Ioctl(a, KSM_REMOVE_MEMORY_REGION, nullptr).ret, 0);
  EXPECT_TRUE(engine_.madvise_calls.empty());
  ASSERT_TRUE(dev_.Close(b).ok());
  expected = {{0x300000, 3 * kPage, 13}, {0x100000, kPage, 13}};
  EXPECT_EQ(engine_.madvise_calls, expected);
}

TEST_F(DevKsmTest, AreaClosedBehindOurBackIsReleasedNotReclosed) {
  const int area = Create(KSM_CREATE_SHARED_MEMORY_AREA);
  ASSERT_EQ(Register(area, 0x100000, 1).ret, 0);
  const int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(null_fd, 0);
  ASSERT_EQ(close(area), 0);  // the application bypasses samepage
  // The number is reused for another file.
  const int other = dup2(null_fd, area);
  close(null_fd);
  ASSERT_EQ(other, area);
  engine_.madvise_calls.clear();
  EXPECT_FALSE(dev_.Owns(other));
  const std::vector<FakeEngine::MadviseCall> expected = {{0x100000, kPage, 13}};
  EXPECT_EQ(engine_.madvise_calls, expected);
  EXPECT_EQ(dev_.Close(other).code(), EBADF);
  EXPECT_NE(fcntl(other, F_GETFD), -1);  // still the application's file
  close(other);
}

TEST_F(DevKsmTest, StartStopKthreadWritesTheKnobs) {
  ksm_kthread_info info{1500, 1000, 7, 1};
  ASSERT_EQ(Ioctl(device_, KSM_START_STOP_KTHREAD, &info).ret, 0);
  EXPECT_EQ(engine_.knobs.pages_to_scan, 1000u);
  EXPECT_EQ(engine_.knobs.sleep_millisecs, 2u);  // µs rounded up
  EXPECT_EQ(engine_.knobs.run, 1u);
  ksm_kthread_info got{};
  ASSERT_EQ(Ioctl(device_, KSM_GET_INFO_KTHREAD, &got).ret, 0);
  EXPECT_EQ(got.sleep, 1500u);  // the µs value is kept
  EXPECT_EQ(got.pages_to_scan, 1000u);
  EXPECT_EQ(got.max_pages_to_merge, 7u);
  EXPECT_EQ(got.running, 1u);

  // Any nonzero `running` runs; 0 stops; sleep 0 means no sleep.
  info = {0, 5, 0, 0};
  ASSERT_EQ(Ioctl(device_, KSM_START_STOP_KTHREAD, &info).ret, 0);
  EXPECT_EQ(engine_.knobs.run, 0u);
  EXPECT_EQ(engine_.knobs.sleep_millisecs, 0u);
  info = {1, 5, 0, 42};
  ASSERT_EQ(Ioctl(device_, KSM_START_STOP_KTHREAD, &info).ret, 0);
  EXPECT_EQ(engine_.knobs.run, 1u);
  EXPECT_EQ(engine_.knobs.sleep_millisecs, 1u);

  // A later change through sysfs shows in GET_INFO.
  ASSERT_TRUE(engine_.WriteKnob("sleep_millisecs", "50").ok());
  ASSERT_TRUE(engine_.WriteKnob("run", "2").ok());
  ASSERT_EQ(Ioctl(device_, KSM_GET_INFO_KTHREAD, &got).ret, 0);
  EXPECT_EQ(got.sleep, 50000u);
  EXPECT_EQ(got.running, 0u);
}

TEST_F(DevKsmTest, StartStopKthreadErrors) {
  EXPECT_EQ(Ioctl(device_, KSM_START_STOP_KTHREAD, nullptr).err, EFAULT);
  EXPECT_EQ(Ioctl(device_, KSM_GET_INFO_KTHREAD, nullptr).err, EFAULT);
  EXPECT_EQ(
      Ioctl(device_, KSM_GET_INFO_KTHREAD, reinterpret_cast<void*>(8)).err,
      EFAULT);
  // While the advisor owns pages_to_scan nothing is changed.
  ASSERT_TRUE(engine_.WriteKnob("advisor_mode", "scan-time").ok());
  const Knobs before = engine_.knobs;
  ksm_kthread_info info{1000, 1000, 0, 1};
  EXPECT_EQ(Ioctl(device_, KSM_START_STOP_KTHREAD, &info).err, EINVAL);
  EXPECT_EQ(engine_.knobs.run, before.run);
  EXPECT_EQ(engine_.knobs.sleep_millisecs, before.sleep_millisecs);
}

TEST_F(DevKsmTest, ScanRunsInTheCaller) {
  const int scan = Create(KSM_CREATE_SCAN);
  ksm_user_scan s{100, UINT32_MAX};
  ASSERT_EQ(Ioctl(scan, KSM_SCAN, &s).ret, 0);
  EXPECT_EQ(engine_.scan_calls, std::vector<std::size_t>{100});
  // The driver's loop runs while both counts are positive.
  engine_.scan_calls.clear();
  s = {0, 10};
  ASSERT_EQ(Ioctl(scan, KSM_SCAN, &s).ret, 0);
  s = {10, 0};
  ASSERT_EQ(Ioctl(scan, KSM_SCAN, &s).ret, 0);
  EXPECT_TRUE(engine_.scan_calls.empty());
  EXPECT_EQ(Ioctl(scan, KSM_SCAN, nullptr).err, EFAULT);
}

TEST_F(DevKsmTest, ScanStopsAfterMaxPagesToMerge) {
  const int scan = Create(KSM_CREATE_SCAN);
  engine_.mergeable = 1000;  // every page scanned would merge
  ksm_user_scan s{100, 5};
  ASSERT_EQ(Ioctl(scan, KSM_SCAN, &s).ret, 0);
  EXPECT_EQ(engine_.counters.pages_sharing, 5u);
  // Nothing left to merge: scans the full count in bounded chunks.
  engine_.mergeable = 0;
  engine_.scan_calls.clear();
  s = {100, 30};
  ASSERT_EQ(Ioctl(scan, KSM_SCAN, &s).ret, 0);
  std::size_t total = 0;
  for (std::size_t c : engine_.scan_calls) {
    EXPECT_LE(c, 30u);
    total += c;
  }
  EXPECT_EQ(total, 100u);
}

TEST(DevKsmLifetimeTest, DestructorClosesEverything) {
  FakeEngine engine;
  auto dev = std::make_unique<DevKsm>(&engine);
  int device = -1;
  int area = -1;
  ASSERT_TRUE(dev->Open(&device).ok());
  ASSERT_TRUE(
      dev->Ioctl(device, KSM_CREATE_SHARED_MEMORY_AREA, nullptr, &area).ok());
  ksm_memory_region mem{1, 0, 0x100000};
  int r = 0;
  ASSERT_TRUE(dev->Ioctl(area, KSM_REGISTER_MEMORY_REGION, &mem, &r).ok());
  engine.madvise_calls.clear();
  dev.reset();
  const std::vector<FakeEngine::MadviseCall> expected = {{0x100000, kPage, 13}};
  EXPECT_EQ(engine.madvise_calls, expected);
  EXPECT_EQ(fcntl(device, F_GETFD), -1);
  EXPECT_EQ(fcntl(area, F_GETFD), -1);
}

// --- the real engine ---

class DevKsmEndToEnd : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(Engine::Create(EngineOptions{}, &engine_).ok());
    dev_ = std::make_unique<DevKsm>(engine_.get());
  }
  void TearDown() override {
    dev_.reset();
    engine_.reset();
  }
  std::uint64_t Counter(const char* name) {
    std::string text;
    EXPECT_TRUE(engine_->ReadKnob(name, &text).ok());
    return std::stoull(text);
  }
  int Ioctl(int fd, unsigned long request, void* arg) {
    int result = -1;
    const Status s = dev_->Ioctl(fd, request, arg, &result);
    EXPECT_TRUE(s.ok()) << s.message();
    return result;
  }

  std::unique_ptr<Engine> engine_;
  std::unique_ptr<DevKsm> dev_;
};

TEST_F(DevKsmEndToEnd, RegisterScanMergeWriteRemove) {
  constexpr std::size_t kPages = 64;  // page i equals page i + 32
  auto* mem = static_cast<unsigned char*>(
      mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(mem, MAP_FAILED);
  for (std::size_t i = 0; i < kPages; ++i) {
    std::memset(mem + i * kPage, 0, kPage);
    std::snprintf(reinterpret_cast<char*>(mem + i * kPage), 64, "page %zu",
                  i % (kPages / 2));
  }

  int device = -1;
  ASSERT_TRUE(dev_->Open(&device).ok());
  EXPECT_EQ(Ioctl(device, KSM_GET_API_VERSION, nullptr), KSM_API_VERSION);
  const int area = Ioctl(device, KSM_CREATE_SHARED_MEMORY_AREA, nullptr);
  const int scan = Ioctl(device, KSM_CREATE_SCAN, nullptr);
  ksm_memory_region region{kPages, 0, reinterpret_cast<std::uint64_t>(mem)};
  ASSERT_EQ(Ioctl(area, KSM_REGISTER_MEMORY_REGION, &region), 0);

  // A page merges on its second visit: a few rounds over the region suffice.
  ksm_user_scan s{kPages, UINT32_MAX};
  for (int round = 0; round < 8 && Counter("pages_sharing") < kPages / 2;
       ++round) {
    ASSERT_EQ(Ioctl(scan, KSM_SCAN, &s), 0);
  }
  EXPECT_EQ(Counter("pages_sharing"), kPages / 2);
  EXPECT_EQ(Counter("pages_shared"), kPages / 2);
  for (std::size_t i = 0; i < kPages; ++i) {
    char expected[64] = {};
    std::snprintf(expected, sizeof(expected), "page %zu", i % (kPages / 2));
    ASSERT_STREQ(reinterpret_cast<char*>(mem + i * kPage), expected) << i;
  }

  // Copy on write: only the written page changes.
  mem[3 * kPage] = 'P';
  EXPECT_EQ(mem[3 * kPage], 'P');
  EXPECT_EQ(mem[(3 + kPages / 2) * kPage], 'p');

  // REMOVE unmerges: the memory is ordinary private memory again.
  ASSERT_EQ(Ioctl(area, KSM_REMOVE_MEMORY_REGION, nullptr), 0);
  EXPECT_EQ(Counter("pages_sharing"), 0u);
  mem[5 * kPage] = 'X';
  EXPECT_EQ(mem[(5 + kPages / 2) * kPage], 'p');
  EXPECT_TRUE(dev_->Close(scan).ok());
  EXPECT_TRUE(dev_->Close(area).ok());
  EXPECT_TRUE(dev_->Close(device).ok());
  munmap(mem, kPages * kPage);
}

TEST_F(DevKsmEndToEnd, KthreadMergesInTheBackground) {
  constexpr std::size_t kPages = 32;
  auto* mem = static_cast<unsigned char*>(
      mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(mem, MAP_FAILED);
  std::memset(mem, 0x5a, kPages * kPage);  // all pages equal
  int device = -1;
  ASSERT_TRUE(dev_->Open(&device).ok());
  const int area = Ioctl(device, KSM_CREATE_SHARED_MEMORY_AREA, nullptr);
  ksm_memory_region region{kPages, 0, reinterpret_cast<std::uint64_t>(mem)};
  ASSERT_EQ(Ioctl(area, KSM_REGISTER_MEMORY_REGION, &region), 0);
  ksm_kthread_info info{1000, 1000, UINT32_MAX, 1};
  ASSERT_EQ(Ioctl(device, KSM_START_STOP_KTHREAD, &info), 0);
  for (int i = 0; i < 500 && Counter("pages_sharing") < kPages - 1; ++i) {
    usleep(10000);
  }
  EXPECT_EQ(Counter("pages_shared") + Counter("pages_sharing"), kPages);
  info.running = 0;
  ASSERT_EQ(Ioctl(device, KSM_START_STOP_KTHREAD, &info), 0);
  ksm_kthread_info got{};
  ASSERT_EQ(Ioctl(device, KSM_GET_INFO_KTHREAD, &got), 0);
  EXPECT_EQ(got.sleep, 1000u);
  EXPECT_EQ(got.pages_to_scan, 1000u);
  EXPECT_EQ(got.running, 0u);
  for (std::size_t i = 0; i < kPages * kPage; i += kPage) {
    ASSERT_EQ(mem[i], 0x5a);
  }
  EXPECT_TRUE(dev_->Close(area).ok());
  EXPECT_EQ(Counter("pages_sharing"), 0u);
  munmap(mem, kPages * kPage);
}

TEST_F(DevKsmEndToEnd, RegisterChecksTheRange) {
  int device = -1;
  ASSERT_TRUE(dev_->Open(&device).ok());
  const int area = Ioctl(device, KSM_CREATE_SHARED_MEMORY_AREA, nullptr);
  auto* mem = static_cast<unsigned char*>(
      mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(mem, MAP_FAILED);
  ASSERT_EQ(munmap(mem + 2 * kPage, kPage), 0);  // a hole
  int r = 0;
  ksm_memory_region unaligned{1, 0, reinterpret_cast<std::uint64_t>(mem) + 1};
  EXPECT_EQ(
      dev_->Ioctl(area, KSM_REGISTER_MEMORY_REGION, &unaligned, &r).code(),
      EINVAL);
  ksm_memory_region holed{4, 0, reinterpret_cast<std::uint64_t>(mem)};
  EXPECT_EQ(dev_->Ioctl(area, KSM_REGISTER_MEMORY_REGION, &holed, &r).code(),
            ENOMEM);
  ksm_memory_region fine{2, 0, reinterpret_cast<std::uint64_t>(mem)};
  EXPECT_TRUE(dev_->Ioctl(area, KSM_REGISTER_MEMORY_REGION, &fine, &r).ok());
  EXPECT_EQ(dev_->Ioctl(area, KSM_REGISTER_MEMORY_REGION, &fine, &r).code(),
            EPERM);
  EXPECT_TRUE(dev_->Close(area).ok());
  // Not the hole: it may be someone else's mapping by now.
  munmap(mem, 2 * kPage);
  munmap(mem + 3 * kPage, kPage);
}

}  // namespace
}  // namespace samepage
