// Tests for the C API (include/samepage/samepage.h): the kernel's KSM entry
// points and their errno values, over the process-wide default engine. The
// expected errors are those Linux 6.18 gives for the same calls (measured
// with madvise(2), prctl(2) and the /sys/kernel/mm/ksm files).

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <regex>
#include <string>
#include <vector>

#include "api/sysfs_text.h"
#include "samepage/samepage.h"

namespace samepage {
namespace {

constexpr std::size_t kPage = 4096;

// A syscall-style result: the return value, and errno when it is negative.
struct Call {
  long ret;
  int err;
};
Call C(long ret) { return {ret, ret < 0 ? errno : 0}; }

std::string Read(const char* name) {
  char buf[256];
  const ssize_t n = samepage_sysfs_read(name, buf, sizeof(buf));
  return n < 0 ? "error" : std::string(buf, n);
}

ssize_t Write(const char* name, const std::string& text) {
  return samepage_sysfs_write(name, text.data(), text.size());
}

// Private anonymous pages, unmarked and unmapped at the end. Holes punched
// with Hole() are never unmapped again: by then the range may belong to
// someone else (samepage's own structures, for one).
class Mapping {
 public:
  explicit Mapping(std::size_t pages) : pages_(pages), hole_(pages, false) {
    addr_ = static_cast<unsigned char*>(
        mmap(nullptr, size(), PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  }
  ~Mapping() {
    if (addr_ == MAP_FAILED) return;
    for (std::size_t i = 0; i < pages_; ++i) {
      if (hole_[i]) continue;
      samepage_madvise(addr_ + i * kPage, kPage, SAMEPAGE_MADV_UNMERGEABLE);
      munmap(addr_ + i * kPage, kPage);
    }
  }
  void Hole(std::size_t page) {
    ASSERT_EQ(munmap(addr_ + page * kPage, kPage), 0);
    hole_[page] = true;
  }
  unsigned char* get() const { return addr_; }
  std::size_t size() const { return pages_ * kPage; }

 private:
  std::size_t pages_;
  std::vector<bool> hole_;
  unsigned char* addr_;
};

TEST(CApiMadvise, KernelErrors) {
  // Create the engine first, so that its own mappings cannot fill the hole.
  ASSERT_EQ(Read("run"), "0\n");
  Mapping m(8);
  ASSERT_NE(m.get(), MAP_FAILED);
  m.Hole(4);
  EXPECT_EQ(C(samepage_madvise(m.get(), kPage, 0)).err, EINVAL);
  EXPECT_EQ(C(samepage_madvise(m.get(), kPage, 99)).err, EINVAL);
  EXPECT_EQ(C(samepage_madvise(m.get(), kPage, 14 /*HUGEPAGE*/)).err, EINVAL);
  EXPECT_EQ(
      C(samepage_madvise(m.get() + 1, kPage, SAMEPAGE_MADV_MERGEABLE)).err,
      EINVAL);
  EXPECT_EQ(C(samepage_madvise(m.get() + 1, 0, SAMEPAGE_MADV_MERGEABLE)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_madvise(m.get(), static_cast<size_t>(-kPage),
                               SAMEPAGE_MADV_MERGEABLE))
                .err,
            EINVAL);
  EXPECT_EQ(
      C(samepage_madvise(m.get(), 8 * kPage, SAMEPAGE_MADV_MERGEABLE)).err,
      ENOMEM);
  EXPECT_EQ(
      C(samepage_madvise(m.get(), 8 * kPage, SAMEPAGE_MADV_UNMERGEABLE)).err,
      ENOMEM);
  EXPECT_EQ(C(samepage_madvise(m.get(), 0, SAMEPAGE_MADV_MERGEABLE)).ret, 0);
  EXPECT_EQ(
      C(samepage_madvise(m.get(), 4 * kPage, SAMEPAGE_MADV_MERGEABLE)).ret, 0);
  // A length that is not a page multiple covers the partial page.
  EXPECT_EQ(C(samepage_madvise(m.get(), 4095, SAMEPAGE_MADV_UNMERGEABLE)).ret,
            0);
  EXPECT_EQ(
      C(samepage_madvise(m.get(), 4 * kPage, SAMEPAGE_MADV_UNMERGEABLE)).ret,
      0);
}

TEST(CApiPrctl, ArgumentChecksAndState) {
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 0, 0, 0, 0)).ret, 0);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 1, 0, 0, 0)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 0, 1, 0, 0)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 0, 0, 0, 1)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_SET_MEMORY_MERGE, 1, 1, 0, 0)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_SET_MEMORY_MERGE, 1, 0, 1, 0)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_SET_MEMORY_MERGE, 1, 0, 0, 1)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_prctl(12345, 0, 0, 0, 0)).err, EINVAL);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 0, 0, 0, 0)).ret,
            0);  // failed calls changed nothing

  // Any nonzero arg2 turns merging of all anonymous memory on.
  ASSERT_EQ(C(samepage_prctl(SAMEPAGE_PR_SET_MEMORY_MERGE, 2, 0, 0, 0)).ret, 0);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 0, 0, 0, 0)).ret, 1);
  char buf[512];
  ssize_t n = samepage_ksm_stat(buf, sizeof(buf));
  ASSERT_GT(n, 0);
  EXPECT_NE(std::string(buf, n).find("ksm_merge_any: yes\n"),
            std::string::npos);
  ASSERT_EQ(C(samepage_prctl(SAMEPAGE_PR_SET_MEMORY_MERGE, 0, 0, 0, 0)).ret, 0);
  EXPECT_EQ(C(samepage_prctl(SAMEPAGE_PR_GET_MEMORY_MERGE, 0, 0, 0, 0)).ret, 0);
  n = samepage_ksm_stat(buf, sizeof(buf));
  ASSERT_GT(n, 0);
  EXPECT_NE(std::string(buf, n).find("ksm_merge_any: no\n"), std::string::npos);
}

TEST(CApiSysfs, EveryFileReadsAsText) {
  for (std::string_view name : KsmFileNames()) {
    const std::string text = Read(std::string(name).c_str());
    ASSERT_FALSE(text.empty()) << name;
    EXPECT_EQ(text.back(), '\n') << name;
    EXPECT_NE(text, "error") << name;
  }
  EXPECT_EQ(Read("advisor_mode"), "[none] scan-time\n");
  EXPECT_EQ(Read("max_page_sharing"), "256\n");
}

TEST(CApiSysfs, ReadErrorsAndShortBuffers) {
  char buf[8];
  EXPECT_EQ(C(samepage_sysfs_read("nonexistent", buf, sizeof(buf))).err,
            ENOENT);
  EXPECT_EQ(
      C(samepage_sysfs_read("/sys/kernel/mm/ksm/run", buf, sizeof(buf))).err,
      ENOENT);
  EXPECT_EQ(C(samepage_sysfs_read(nullptr, buf, sizeof(buf))).err, EFAULT);
  EXPECT_EQ(C(samepage_sysfs_read("run", nullptr, 8)).err, EFAULT);
  EXPECT_EQ(C(samepage_sysfs_read("run", nullptr, 0)).ret, 0);
  // Like read(2): a short buffer gets the beginning of the text.
  std::memset(buf, 'x', sizeof(buf));
  EXPECT_EQ(C(samepage_sysfs_read("advisor_mode", buf, 4)).ret, 4);
  EXPECT_EQ(std::string(buf, 5), "[nonx");
  // With room to spare the text is NUL-terminated.
  EXPECT_EQ(C(samepage_sysfs_read("max_page_sharing", buf, 8)).ret, 4);
  EXPECT_STREQ(buf, "256\n");
}

TEST(CApiSysfs, WriteLikeTheKernel) {
  const std::string original = Read("pages_to_scan");
  EXPECT_EQ(Write("pages_to_scan", "1234\n"), 5);
  EXPECT_EQ(Read("pages_to_scan"), "1234\n");
  EXPECT_EQ(Write("pages_to_scan", std::string("77\0junk", 7)), 7);
  EXPECT_EQ(Read("pages_to_scan"), "77\n");
  EXPECT_EQ(Write("pages_to_scan", ""), 0);
  EXPECT_EQ(Read("pages_to_scan"), "77\n");
  EXPECT_EQ(Write("pages_to_scan", std::string(4096, '0') + "9"), 4096);
  EXPECT_EQ(Read("pages_to_scan"), "0\n");

  for (const char* bad :
       {"abc", "-1", " 1", "1 ", "0x10", "99999999999", "1\n\n"}) {
    EXPECT_EQ(C(Write("pages_to_scan", bad)).err, EINVAL) << bad;
  }
  EXPECT_EQ(C(Write("run", "3")).err, EINVAL);
  EXPECT_EQ(C(Write("max_page_sharing", "1")).err, EINVAL);
  EXPECT_EQ(C(Write("max_page_sharing", "99999999999")).err, ERANGE);
  EXPECT_EQ(C(Write("advisor_mode", "sometimes")).err, EINVAL);
  EXPECT_EQ(C(Write("advisor_target_scan_time", "0")).err, EINVAL);
  EXPECT_EQ(C(Write("pages_sharing", "0")).err, EACCES);
  EXPECT_EQ(C(Write("general_profit", "")).err, EACCES);
  EXPECT_EQ(C(Write("nonexistent", "1")).err, ENOENT);
  EXPECT_EQ(C(samepage_sysfs_write(nullptr, "1", 1)).err, EFAULT);
  EXPECT_EQ(C(samepage_sysfs_write("run", nullptr, 1)).err, EFAULT);
  EXPECT_EQ(Read("pages_to_scan"), "0\n");

  ASSERT_EQ(Write("pages_to_scan", original),
            static_cast<ssize_t>(original.size()));
}

TEST(CApiSysfs, MaxPageSharingIsBusyWhilePagesAreShared) {
  constexpr std::size_t kPages = 16;  // page i equals page i + 8
  Mapping m(kPages);
  ASSERT_NE(m.get(), MAP_FAILED);
  for (std::size_t i = 0; i < kPages; ++i) {
    std::memset(m.get() + i * kPage, static_cast<int>(1 + i % 8), kPage);
  }
  ASSERT_EQ(samepage_madvise(m.get(), m.size(), SAMEPAGE_MADV_MERGEABLE), 0);
  for (int round = 0; round < 10 && Read("pages_shared") == "0\n"; ++round) {
    samepage_scan(1024);
  }
  ASSERT_NE(Read("pages_shared"), "0\n");
  EXPECT_EQ(Write("max_page_sharing", "256"), 3);  // unchanged: fine
  EXPECT_EQ(C(Write("max_page_sharing", "100")).err, EBUSY);
  EXPECT_EQ(C(Write("merge_across_nodes", "0")).err, EBUSY);
  EXPECT_EQ(Read("max_page_sharing"), "256\n");

  // run 2 unmerges everything; then the change is allowed.
  ASSERT_EQ(Write("run", "2"), 1);
  EXPECT_EQ(Read("pages_shared"), "0\n");
  EXPECT_EQ(Read("pages_sharing"), "0\n");
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_EQ(m.get()[i * kPage + 100], 1 + i % 8);
  }
  EXPECT_EQ(Write("max_page_sharing", "100"), 3);
  EXPECT_EQ(Write("max_page_sharing", "256"), 3);
  EXPECT_EQ(Write("run", "0"), 1);
}

TEST(CApiProcfs, KsmStatFormat) {
  Mapping m(4);
  ASSERT_NE(m.get(), MAP_FAILED);
  ASSERT_EQ(samepage_madvise(m.get(), m.size(), SAMEPAGE_MADV_MERGEABLE), 0);
  char buf[512];
  const ssize_t n = samepage_ksm_stat(buf, sizeof(buf));
  ASSERT_GT(n, 0);
  const std::regex format(
      "ksm_rmap_items [0-9]+\n"
      "ksm_zero_pages -?[0-9]+\n"
      "ksm_merging_pages [0-9]+\n"
      "ksm_process_profit -?[0-9]+\n"
      "ksm_merge_any: (yes|no)\n"
      "ksm_mergeable: yes\n");
  EXPECT_TRUE(std::regex_match(std::string(buf, n), format))
      << std::string(buf, n);

  const ssize_t m_len = samepage_ksm_merging_pages(buf, sizeof(buf));
  ASSERT_GT(m_len, 0);
  EXPECT_TRUE(
      std::regex_match(std::string(buf, m_len), std::regex("[0-9]+\n")));
  EXPECT_EQ(C(samepage_ksm_stat(nullptr, 10)).err, EFAULT);
  EXPECT_EQ(C(samepage_ksm_merging_pages(nullptr, 10)).err, EFAULT);
  EXPECT_EQ(C(samepage_ksm_stat(buf, 0)).ret, 0);
}

TEST(CApiScan, ScansInTheCaller) {
  Mapping m(8);
  ASSERT_NE(m.get(), MAP_FAILED);
  std::memset(m.get(), 7, m.size());
  ASSERT_EQ(samepage_madvise(m.get(), m.size(), SAMEPAGE_MADV_MERGEABLE), 0);
  EXPECT_LE(samepage_scan(4), 4u);
  EXPECT_EQ(samepage_scan(0), 0u);
}

TEST(CApiDevKsm, DescriptorsAndErrors) {
  EXPECT_EQ(samepage_devksm_owns(STDIN_FILENO), 0);
  const int fd = samepage_devksm_open();
  ASSERT_GE(fd, 0);
  EXPECT_EQ(samepage_devksm_owns(fd), 1);
  EXPECT_EQ(samepage_devksm_ioctl(fd, KSM_GET_API_VERSION, nullptr),
            KSM_API_VERSION);
  EXPECT_EQ(C(samepage_devksm_ioctl(fd, _IO(KSMIO, 0x77), nullptr)).err,
            EINVAL);
  EXPECT_EQ(C(samepage_devksm_ioctl(fd, KSM_START_STOP_KTHREAD, nullptr)).err,
            EFAULT);
  const int area =
      samepage_devksm_ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, nullptr);
  ASSERT_GE(area, 0);
  ksm_memory_region zero{0, 0, 0};
  EXPECT_EQ(
      C(samepage_devksm_ioctl(area, KSM_REGISTER_MEMORY_REGION, &zero)).err,
      EPERM);
  EXPECT_EQ(
      C(samepage_devksm_ioctl(STDIN_FILENO, KSM_GET_API_VERSION, nullptr)).err,
      EBADF);
  EXPECT_EQ(samepage_devksm_close(area), 0);
  EXPECT_EQ(samepage_devksm_close(fd), 0);
  EXPECT_EQ(samepage_devksm_owns(fd), 0);
  EXPECT_EQ(C(samepage_devksm_close(fd)).err, EBADF);
}

}  // namespace
}  // namespace samepage
