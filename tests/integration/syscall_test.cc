// A system call (read() from a pipe) writing into mergeable buffers while the
// scanner merges them at full speed. Whatever the protection mode, no byte
// may be lost or misplaced; with mprotect-based write-protection a read() that
// meets a page inside a merge window fails with EFAULT (the data stays in the
// pipe). The counts are printed and recorded in docs/limitations.md.

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "integration/test_util.h"

namespace samepage::testing {
namespace {

constexpr unsigned char kFill = 0x5a;

void RunPipeReads(EngineOptions::Protection protection) {
  EngineOptions options;
  options.protection = protection;
  auto e = NewEngine(options);
  const std::string mode = e->Stats().protection;
  constexpr std::size_t kPages = 256;
  Mapping m(kPages);
  m.FillAll(kFill);
  ASSERT_TRUE(e->Madvise(m.data(), m.bytes(), MADV_MERGEABLE).ok());
  Set(*e, "pages_to_scan", "10000");
  Set(*e, "sleep_millisecs", "0");
  Set(*e, "run", "1");

  signal(SIGPIPE, SIG_IGN);  // the writer sees EPIPE when the test ends
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  std::atomic<bool> stop{false};
  // Records of one page: the sequence number, then the fill byte.
  std::thread writer([&] {
    std::vector<unsigned char> rec(kPage, kFill);
    for (std::uint64_t seq = 0; !stop.load(); ++seq) {
      std::memcpy(rec.data(), &seq, sizeof(seq));
      std::size_t off = 0;
      while (off < kPage && !stop.load()) {
        const ssize_t n = write(fds[1], rec.data() + off, kPage - off);
        if (n > 0) off += std::size_t(n);
      }
    }
  });

  std::uint64_t ok = 0, efault = 0, partial = 0, expect_seq = 0;
  std::size_t i = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  while (std::chrono::steady_clock::now() < end) {
    unsigned char* page = m.page(i % kPages);
    std::size_t got = 0;
    while (got < kPage) {
      const ssize_t n = read(fds[0], page + got, kPage - got);
      if (n < 0 && errno == EFAULT) {
        ++efault;  // nothing consumed: retry the same bytes
        continue;
      }
      ASSERT_GT(n, 0) << std::strerror(errno);
      if (std::size_t(n) < kPage - got) ++partial;
      got += std::size_t(n);
    }
    std::uint64_t seq;
    std::memcpy(&seq, page, sizeof(seq));
    ASSERT_EQ(seq, expect_seq) << "a record was lost or duplicated";
    for (std::size_t k = sizeof(seq); k < kPage; ++k) {
      ASSERT_EQ(page[k], kFill) << "byte " << k << " of record " << seq;
    }
    ++expect_seq;
    ++ok;
    std::memset(page, kFill, kPage);  // identical again: a merge candidate
    ++i;
  }
  stop = true;
  close(fds[0]);  // unblocks the writer (EPIPE)
  writer.join();
  close(fds[1]);
  Set(*e, "run", "0");
  std::printf("[ info ] protection=%s: %lu records read, %lu read() calls "
              "failed with EFAULT, %lu short reads, %ld pages_sharing at end, "
              "%lu full scans\n",
              mode.c_str(), (unsigned long)ok, (unsigned long)efault,
              (unsigned long)partial, (long)Counter(*e, "pages_sharing"),
              (unsigned long)Counter(*e, "full_scans"));
  EXPECT_GT(ok, 100u);
  EXPECT_GT(Counter(*e, "full_scans"), 2);
}

TEST(Syscalls, PipeReadsIntoMergeableBuffersMprotect) {
  RunPipeReads(EngineOptions::Protection::kMprotect);
}

TEST(Syscalls, PipeReadsIntoMergeableBuffersAuto) {
  RunPipeReads(EngineOptions::Protection::kAuto);
}

}  // namespace
}  // namespace samepage::testing
