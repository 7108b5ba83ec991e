// LinuxMemory on real memory: merge, copy-on-write, zero pages, unmerge,
// VMA budget, probing, and the engine's range queries.

#include "backend/linux_memory.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "backend/memory_configs.h"
#include "backend/proc_maps.h"
#include "backend/write_protect.h"
#include "core/hash.h"

namespace samepage::backend {
namespace {

using Protection = LinuxMemoryOptions::Protection;

// An anonymous private mapping owned by the test, with a hole on each side
// so that it never joins a neighbour (our own excluded memory, or a PROT_NONE
// mapping below that would make it look like a thread stack).
class Region {
 public:
  // Between two unmapped pages; or, with `read_only_guards`, between two
  // read-only pages of its own, which no other mapping can take (and join
  // with it). Not PROT_NONE: a writable mapping right above one looks like
  // a thread stack.
  explicit Region(std::size_t pages, bool read_only_guards = false)
      : pages_(pages), guards_(read_only_guards) {
    void* p = mmap(nullptr, (pages + 2) * kPageSize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    base_ = static_cast<unsigned char*>(p) + kPageSize;
    if (guards_) {
      mprotect(p, kPageSize, PROT_READ);
      mprotect(base_ + pages * kPageSize, kPageSize, PROT_READ);
    } else {
      munmap(p, kPageSize);
      munmap(base_ + pages * kPageSize, kPageSize);
    }
  }
  ~Region() {
    if (base_ && guards_)
      munmap(base_ - kPageSize, (pages_ + 2) * kPageSize);
    else if (base_)
      munmap(base_, pages_ * kPageSize);
  }
  unsigned char* page(std::size_t i) const { return base_ + i * kPageSize; }
  Addr addr(std::size_t i) const { return reinterpret_cast<Addr>(page(i)); }
  std::size_t pages() const { return pages_; }
  void Forget() { base_ = nullptr; }

 private:
  unsigned char* base_ = nullptr;
  std::size_t pages_;
  bool guards_;
};

void Fill(unsigned char* page, unsigned seed) {
  for (std::size_t i = 0; i < kPageSize; ++i)
    page[i] = static_cast<unsigned char>(seed * 131 + i * 7 + (i >> 8));
}

// Page i of a and page slot(i) of b both hold Fill(i), for i < n: pairs
// whose partners lie in another order.
template <typename Slot>
void FillShuffled(const Region& a, const Region& b, std::size_t n, Slot slot) {
  for (std::size_t i = 0; i < n; ++i) {
    Fill(a.page(i), static_cast<unsigned>(i));
    Fill(b.page(slot(i)), static_cast<unsigned>(i));
  }
}

// Page i of a and of b: the same content, seed i.
void FillAlike(const Region& a, const Region& b) {
  FillShuffled(a, b, a.pages(), [](std::size_t i) { return i; });
}

bool Same(const void* a, const void* b) {
  return std::memcmp(a, b, kPageSize) == 0;
}

long Maps() { return CountMappings("/proc/self/maps"); }

// Under AddressSanitizer some counts of smaps reads are the runtime's: its
// allocator maps more of its regions as a test allocates (memory the last
// read knew, grown: read again), so a test that expects no read sees one.
constexpr bool kSmapsReadsCountTheRuntimes =
#if defined(__SANITIZE_ADDRESS__)
    true;
#else
    false;
#endif
constexpr const char* kSmapsReadsSkip =
    "counts smaps reads; the sanitizer's allocator grows its regions "
    "meanwhile";

// The process's mappings that overlap [start, start + pages).
std::size_t VmasIn(Addr start, std::size_t pages) {
  std::vector<MapEntry> maps;
  EXPECT_TRUE(ReadMaps("/proc/self/maps", &maps).ok());
  std::size_t n = 0;
  for (const auto& e : maps)
    n += e.end > start && e.start < start + pages * kPageSize;
  return n;
}

std::uint64_t Pagemap(const void* p) {
  int fd = open("/proc/self/pagemap", O_RDONLY);
  std::uint64_t e = 0;
  EXPECT_EQ(pread(fd, &e, 8, reinterpret_cast<Addr>(p) / kPageSize * 8), 8);
  close(fd);
  return e;
}
bool Present(const void* p) { return Pagemap(p) >> 63 & 1; }
// A private copy of the process's own (anonymous), not a page of a file
// mapped in (bit 61: file page or shared anonymous).
bool PrivateCopy(const void* p) {
  const std::uint64_t e = Pagemap(p);
  return (e >> 63 & 1) && !(e >> 61 & 1);
}

// The configuration the current parameterised test runs with.
MemoryConfig g_config = kMemoryConfigs[0];

// Of the current configuration, all but the protection.
std::unique_ptr<LinuxMemory> NewMemoryWith(std::size_t budget,
                                           Protection prot) {
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.protection = prot;
  o.vma_budget = budget;
  std::unique_ptr<LinuxMemory> m;
  Status s = LinuxMemory::Create(o, &m);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return m;
}

std::unique_ptr<LinuxMemory> NewMemory(std::size_t budget = 0) {
  return NewMemoryWith(budget, g_config.protection);
}

// This config's memory with the test hooks set in o.
std::unique_ptr<LinuxMemory> NewHookedMemory(LinuxMemoryOptions o) {
  g_config.ApplyTo(&o);
  std::unique_ptr<LinuxMemory> m;
  Status s = LinuxMemory::Create(o, &m);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return m;
}

// A full scan over memory mapped since the LinuxMemory was made: as
// madvise(MADV_MERGEABLE) does before the engine scans it, a fresh smaps
// read first (new memory stays out of a scan's cheaper view until then).
void Rescan(LinuxMemory& m) {
  EXPECT_TRUE(m.RefreshMaps().ok());
  m.BeginFullScan();
}

// As madvise(MADV_MERGEABLE) through the engine. It reads no smaps: the
// memory's flags are read at the next full scan or Probe that reaches it,
// and it is left alone until then.
void Advise(LinuxMemory& m, const Region& r) {
  std::vector<LinuxMemory::Range> parts;
  EXPECT_TRUE(m.MergeableParts(r.addr(0), r.pages() * kPageSize, &parts).ok());
}

class LinuxMemoryTest : public ::testing::TestWithParam<MemoryConfig> {
 protected:
  void SetUp() override {
    g_config = GetParam();
    if (g_config.protection == Protection::kUserfaultfd) {
      LinuxMemoryOptions o;
      g_config.ApplyTo(&o);
      std::unique_ptr<LinuxMemory> m;
      Status s = LinuxMemory::Create(o, &m);
      if (!s.ok()) GTEST_SKIP() << s.ToString();
    }
  }
};

std::vector<Addr> Addrs(const Region& r, std::size_t from, std::size_t n) {
  std::vector<Addr> v;
  for (std::size_t i = 0; i < n; ++i) v.push_back(r.addr(from + i));
  return v;
}

// a and b filled alike, page for page, and merged as pairs, each of which
// must merge; returns their frames.
std::vector<FrameId> MergeAlike(LinuxMemory& m, const Region& a,
                                const Region& b) {
  FillAlike(a, b);
  Rescan(m);
  const std::size_t n = a.pages();
  std::vector<FrameId> frames(n);
  std::vector<MergeResult> res(n);
  m.MergePairs(Addrs(a, 0, n), Addrs(b, 0, n), frames, res);
  for (std::size_t i = 0; i < n; ++i) {
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
  }
  return frames;
}

PageState ProbeOne(LinuxMemory& m, Addr a) {
  PageState s;
  m.Probe(a, std::span<PageState>(&s, 1));
  return s;
}

TEST_P(LinuxMemoryTest, CreateReportsProtection) {
  auto m = NewMemoryWith(0, Protection::kMprotect);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->protection(), Protection::kMprotect);
  EXPECT_FALSE(m->SyscallWritesWait());
  auto a = NewMemoryWith(0, Protection::kAuto);
  ASSERT_NE(a, nullptr);
  EXPECT_TRUE(a->protection() == Protection::kMprotect ||
              a->protection() == Protection::kUserfaultfd);
}

TEST_P(LinuxMemoryTest, CreateFailsCleanlyOnBadProcPaths) {
  std::unique_ptr<LinuxMemory> m;
  LinuxMemoryOptions o;
  o.protection = Protection::kMprotect;
  o.pagemap_path = "/nonexistent/pagemap";
  Status s = LinuxMemory::Create(o, &m);
  EXPECT_EQ(s.code(), ENOENT) << s.ToString();
  EXPECT_EQ(m, nullptr);
  o = LinuxMemoryOptions();
  o.protection = Protection::kMprotect;
  o.maps_path = "/nonexistent/maps";
  EXPECT_EQ(LinuxMemory::Create(o, &m).code(), ENOENT);
  o = LinuxMemoryOptions();
  o.protection = Protection::kMprotect;
  o.max_map_count_path = "/nonexistent/max_map_count";
  EXPECT_EQ(LinuxMemory::Create(o, &m).code(), ENOENT);
  o.vma_budget = 10;  // the file is only needed to derive a budget
  EXPECT_TRUE(LinuxMemory::Create(o, &m).ok());
}

// The VmFlags smaps shows for the mapping that holds `addr` ("" if none).
std::string VmFlagsAt(Addr addr) {
  std::vector<MapEntry> maps;
  EXPECT_TRUE(ReadMaps("/proc/self/smaps", &maps).ok());
  for (const MapEntry& e : maps) {
    if (e.start <= addr && addr < e.end) return e.vm_flags;
  }
  return "";
}

bool MergePair(LinuxMemory& m, Addr p, Addr q) {
  FrameId f;
  MergeResult r;
  m.MergePairs(std::span<const Addr>(&p, 1), std::span<const Addr>(&q, 1),
               std::span<FrameId>(&f, 1), std::span<MergeResult>(&r, 1));
  return r == MergeResult::kMerged;
}

// A new backend's view is the plain maps (its creation is the first
// madvise, in the program's thread: smaps walks the page tables of all its
// memory). Memory advised then is read before it is touched, so flags set
// before the advice still keep a page out, and the rest merges.
TEST_P(LinuxMemoryTest, CreationReadsNoSmapsButAdvisedFlagsAreStillRead) {
  Region a(4), b(4), c(4);
  FillAlike(a, b);
  FillAlike(a, c);
  ASSERT_EQ(madvise(c.page(0), 4 * kPageSize, MADV_WIPEONFORK), 0);
  auto m = NewMemory();
  EXPECT_EQ(m->Stats().smaps_reads, 0u) << "creation read smaps";
  EXPECT_EQ(ProbeOne(*m, a.addr(0)), PageState::kGone)
      << "memory of unknown flags taken before any read";
  Advise(*m, a);
  Advise(*m, b);
  Advise(*m, c);
  EXPECT_EQ(m->Stats().smaps_reads, 0u) << "advice read smaps";
  m->BeginFullScan();
  EXPECT_EQ(m->Stats().smaps_reads, 1u);
  EXPECT_EQ(ProbeOne(*m, c.addr(1)), PageState::kGone)
      << "wipe-on-fork memory taken without its flags";
  EXPECT_FALSE(MergePair(*m, a.addr(1), c.addr(1)));
  ASSERT_EQ(ProbeOne(*m, a.addr(1)), PageState::kAnon);
  EXPECT_TRUE(MergePair(*m, a.addr(1), b.addr(1)));
  unsigned char expect[kPageSize];
  Fill(expect, 1);
  EXPECT_TRUE(Same(a.page(1), expect));
  EXPECT_TRUE(Same(b.page(1), expect));
  EXPECT_TRUE(Same(c.page(1), expect));
  ASSERT_EQ(madvise(c.page(0), 4 * kPageSize, MADV_KEEPONFORK), 0);
}

// Full scans read the cheap /proc/self/maps when the layout allows; flags
// the application set since the last smaps read must still be seen before
// a page is replaced.
TEST_P(LinuxMemoryTest, FlagsSetSinceTheLastSmapsReadAreKeptByMerges) {
  auto m = NewMemory();
  Region a(8), b(8);
  FillAlike(a, b);
  Advise(*m, a);
  Advise(*m, b);
  m->BeginFullScan();  // the same layout: read from the plain maps
  // Part of a mapping: the split shows in the plain maps.
  ASSERT_EQ(madvise(a.page(2), 2 * kPageSize, MADV_DONTFORK), 0);
  m->BeginFullScan();
  ASSERT_TRUE(MergePair(*m, a.addr(2), b.addr(2)));
  EXPECT_NE(VmFlagsAt(a.addr(2)).find("dc"), std::string::npos)
      << VmFlagsAt(a.addr(2));
  EXPECT_EQ(VmFlagsAt(b.addr(2)).find("dc"), std::string::npos);
  // A whole mapping: no change of layout; the preload says so.
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_DONTDUMP), 0);
  NoteVmaFlagsChanged();
  m->BeginFullScan();
  ASSERT_TRUE(MergePair(*m, a.addr(5), b.addr(5)));
  EXPECT_NE(VmFlagsAt(b.addr(5)).find("dd"), std::string::npos)
      << VmFlagsAt(b.addr(5));
  // Contents intact.
  unsigned char expect[kPageSize];
  Fill(expect, 5);
  EXPECT_TRUE(Same(b.page(5), expect));
  ASSERT_EQ(madvise(a.page(2), 2 * kPageSize, MADV_DOFORK), 0);
}

// Two regions of 8 pages with the same bytes, advised, after a full scan.
struct AdvisedTwins {
  explicit AdvisedTwins(LinuxMemory& m) {
    FillAlike(a, b);
    Advise(m, a);
    Advise(m, b);
    m.BeginFullScan();
  }
  Region a{8}, b{8};
};

// Merges each page of twins.a with its twin in b; the frames, one a pair.
std::vector<FrameId> MergeTwins(LinuxMemory& m, const AdvisedTwins& twins) {
  std::vector<FrameId> frames(8);
  std::vector<MergeResult> res(8);
  m.MergePairs(Addrs(twins.a, 0, 8), Addrs(twins.b, 0, 8), frames, res);
  for (std::size_t i = 0; i < 8; ++i)
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
  return frames;
}

// A full scan does not walk every page table (smaps) because memory was
// mapped somewhere: that memory is not mergeable until advised, and advice
// reads smaps itself. Known memory that grew in place is read again, so
// its advised part keeps merging.
TEST_P(LinuxMemoryTest, NewMemoryWaitsForAdviceButGrownMemoryIsReadAgain) {
  if (kSmapsReadsCountTheRuntimes) GTEST_SKIP() << kSmapsReadsSkip;
  // Mapped before any read but of no mergeable kind (PROT_NONE) at every
  // read, so that no read saw mergeable memory at its address (a read's
  // own buffer, freed since, say): new memory once made writable.
  Region fresh(4, /*read_only_guards=*/true);
  ASSERT_EQ(mprotect(fresh.page(0), 4 * kPageSize, PROT_NONE), 0);
  auto m = NewMemory();
  const AdvisedTwins twins(*m);
  const Region& a = twins.a;
  const Region& b = twins.b;
  // Scans may grow the heap after their reads (known memory grown, read
  // again at the next): scanned until one reads no smaps.
  std::uint64_t reads = m->Stats().smaps_reads;
  for (int i = 0; i < 10; ++i) {
    m->BeginFullScan();
    if (m->Stats().smaps_reads == reads) break;
    reads = m->Stats().smaps_reads;
  }

  ASSERT_EQ(mprotect(fresh.page(0), 4 * kPageSize, PROT_READ | PROT_WRITE), 0);
  FillAlike(fresh, fresh);
  m->BeginFullScan();
  EXPECT_EQ(m->Stats().smaps_reads, reads) << "new memory read smaps";
  EXPECT_EQ(ProbeOne(*m, fresh.addr(0)), PageState::kGone);
  ASSERT_TRUE(MergePair(*m, a.addr(1), b.addr(1)));  // the rest as before
  Advise(*m, fresh);
  EXPECT_EQ(ProbeOne(*m, fresh.addr(0)), PageState::kAnon);

  // b's last mapping (pages 2-7; page 1 is merged) grows in place over
  // the hole after it, as brk grows the heap: partly new, so its flags are
  // read again, and it stays mergeable.
  void* grown = mremap(b.page(2), 6 * kPageSize, 7 * kPageSize, 0);
  ASSERT_EQ(grown, b.page(2)) << "no room to grow in place";
  m->BeginFullScan();
  EXPECT_EQ(m->Stats().smaps_reads, reads + 2)
      << "grown memory did not read smaps";
  ASSERT_TRUE(MergePair(*m, a.addr(3), b.addr(3)));
  unsigned char expect[kPageSize];
  Fill(expect, 3);
  EXPECT_TRUE(Same(b.page(3), expect));
  ASSERT_EQ(mremap(b.page(2), 7 * kPageSize, 6 * kPageSize, 0), b.page(2));
}

// madvise(MADV_MERGEABLE) asks the kernel for the VMAs of its range only
// (PROCMAP_QUERY), not smaps, whose page-table walk of the whole process
// cost 0.4 ms a call: any number of calls, no read. The flags the kernel
// holds are still what counts: flags set behind samepage's back since the
// last smaps read (here MADV_WIPEONFORK, which a frame mapping would lose)
// are read by the first Probe that reaches the advised memory, before
// anything there is touched.
TEST_P(LinuxMemoryTest, AdviceReadsNoSmapsButFlagsAreReadBeforeATouch) {
  Region a(8), b(8), c(8);
  FillAlike(a, b);
  FillAlike(a, c);
  auto m = NewMemory();  // its smaps read sees a, b and c without flags
  if (!FrameMappingsKnowable()) GTEST_SKIP() << "no PROCMAP_QUERY here";
  // A first scan may read smaps for memory of the process that grew in
  // place since (the malloc arena); the flag set next is not in that read.
  m->BeginFullScan();
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_WIPEONFORK), 0);
  const std::uint64_t reads = m->Stats().smaps_reads;
  std::vector<LinuxMemory::Range> parts;
  // MADV_UNMERGEABLE's check of the range asks for no read later (a Probe
  // reads smaps only for advice not read yet; a full scan may read it for
  // other reasons, such as the malloc arena grown in place).
  ASSERT_TRUE(m->MergeableParts(b.addr(0), 8 * kPageSize, &parts,
                                /*advising=*/false)
                  .ok());
  (void)ProbeOne(*m, b.addr(0));
  EXPECT_EQ(m->Stats().smaps_reads, reads) << "unadvice asked for a read";
  for (int round = 0; round < 50; ++round) {
    for (const Region* r : {&a, &b, &c}) {
      ASSERT_TRUE(
          m->MergeableParts(r->addr(round % 8), kPageSize, &parts).ok());
      ASSERT_EQ(parts.size(), 1u);
    }
  }
  EXPECT_EQ(m->Stats().smaps_reads, reads) << "madvise read smaps";
  // Left alone until read: no merge, not even probed.
  EXPECT_FALSE(MergePair(*m, a.addr(0), c.addr(0)));
  EXPECT_EQ(m->Stats().smaps_reads, reads);
  EXPECT_EQ(ProbeOne(*m, b.addr(1)), PageState::kGone)
      << "wipe-on-fork memory taken with the flags of an old read";
  EXPECT_EQ(m->Stats().smaps_reads, reads + 1);
  EXPECT_FALSE(MergePair(*m, a.addr(1), b.addr(1)));
  EXPECT_EQ(ProbeOne(*m, c.addr(1)), PageState::kAnon);
  EXPECT_TRUE(MergePair(*m, a.addr(1), c.addr(1)));
  EXPECT_EQ(m->Stats().smaps_reads, reads + 1);
  unsigned char expect[kPageSize];
  Fill(expect, 1);
  EXPECT_TRUE(Same(b.page(1), expect));
  EXPECT_TRUE(Same(c.page(1), expect));
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_KEEPONFORK), 0);
}

// Where PROCMAP_QUERY cannot be used (before Linux 6.11; here, a maps
// path that is not the process's own by name), madvise reads smaps itself,
// and its memory is touchable at once.
TEST_P(LinuxMemoryTest, WithoutTheQueryAdviceReadsSmapsItself) {
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.maps_path = "/proc/self/./smaps";
  std::unique_ptr<LinuxMemory> m;
  ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
  Region a(8), b(8);
  FillAlike(a, b);
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_WIPEONFORK), 0);
  const std::uint64_t reads = m->Stats().smaps_reads;
  std::vector<LinuxMemory::Range> parts;
  ASSERT_TRUE(m->MergeableParts(a.addr(0), 8 * kPageSize, &parts).ok());
  ASSERT_EQ(parts.size(), 1u);
  ASSERT_TRUE(m->MergeableParts(b.addr(0), 8 * kPageSize, &parts).ok());
  EXPECT_TRUE(parts.empty()) << "wipe-on-fork memory advised";
  EXPECT_EQ(m->Stats().smaps_reads, reads + 2);
  EXPECT_EQ(ProbeOne(*m, a.addr(1)), PageState::kAnon);
  EXPECT_EQ(m->Stats().smaps_reads, reads + 2);
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_KEEPONFORK), 0);
}

// A page Probe calls gone because the view leaves it out for its flags
// keeps that reason until the engine asks (AdvisableParts), though a view
// read in between no longer shows the flags: the program's userfaultfd
// unregistered (here, MADV_KEEPONFORK) between a scan's probe and the end
// of its batch. The engine then holds the pages' advice and takes it up
// again, as the kernel's VM_MERGEABLE never left. Before, the later view
// had the advice dropped, and the pages were never merged again
// (preload.userfaultfd_test failed about 1 run in 10 in Debug).
TEST_P(LinuxMemoryTest, PagesGoneForTheirFlagsStayLeftOutUntilAsked) {
  Region b(8);
  auto m = NewMemory();
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_WIPEONFORK), 0);
  ASSERT_TRUE(m->RefreshMaps().ok());
  std::vector<PageState> states(8, PageState::kAnon);
  m->Probe(b.addr(0), states);
  for (std::size_t i = 0; i < states.size(); ++i)
    ASSERT_EQ(states[i], PageState::kGone) << "page " << i;
  ASSERT_EQ(madvise(b.page(0), 8 * kPageSize, MADV_KEEPONFORK), 0);
  ASSERT_TRUE(m->RefreshMaps().ok());
  EXPECT_NE(ProbeOne(*m, b.addr(3)), PageState::kGone) << "the new view";
  std::vector<LinuxMemory::Range> parts;
  m->AdvisableParts(b.addr(0), b.addr(0) + 8 * kPageSize, /*left_out=*/true,
                    &parts);
  ASSERT_EQ(parts.size(), 1u) << "the pages' advice would be lost";
  EXPECT_EQ(parts[0].first, b.addr(0));
  EXPECT_EQ(parts[0].second, 8 * kPageSize);
  // Asked once, the note is gone, and the view leaves nothing out.
  m->AdvisableParts(b.addr(0), b.addr(0) + 8 * kPageSize, /*left_out=*/true,
                    &parts);
  EXPECT_TRUE(parts.empty());
}

// merge-any's sweeps (a smaps read each) are spaced by what a read costs:
// it walks the page tables of every present page, so 256 MiB more of them
// must lengthen the spacing several times over.
TEST_P(LinuxMemoryTest, SmapsReadSpacingGrowsWithWhatAReadWalks) {
  if (kSmapsReadsCountTheRuntimes)
    GTEST_SKIP() << "times smaps reads; under the sanitizer a small "
                    "process's read is already slow";
  auto m = NewMemory();
  // The backend's first smaps read (its creation reads the plain maps)
  // sizes its buffer and warms up: not the one measured. The small
  // process's spacing is the least of five reads: one read slowed down by
  // the host (or the test running beside this one) took 67.8 ms of
  // spacing against the big one's 101 in a CI run.
  ASSERT_TRUE(m->RefreshMaps().ok());
  std::int64_t small = std::numeric_limits<std::int64_t>::max();
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(m->RefreshMaps().ok());
    small = std::min(small, m->SmapsReadSpacing());
  }
  EXPECT_GT(small, 0);
  constexpr std::size_t kPages = 65536;
  Region big(kPages);
  for (std::size_t i = 0; i < kPages; ++i) big.page(i)[0] = 1;
  ASSERT_TRUE(m->RefreshMaps().ok());
  EXPECT_GT(m->SmapsReadSpacing(), 3 * small)
      << "small " << small << " ns, big " << m->SmapsReadSpacing() << " ns";
}

// Reads of the maps and smaps so far.
std::uint64_t ViewReads(const LinuxMemory& m) {
  const MemoryStats s = m.Stats();
  return s.maps_reads + s.smaps_reads;
}

// smaps reads that count as expensive (all of them), the next one put off
// for good unless asked for (full, or NoteVmaFlagsChanged).
std::unique_ptr<LinuxMemory> NewMemoryWithExpensiveSmaps() {
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.smaps_expensive_ns = 0;
  o.smaps_cost_share = 1'000'000'000;
  std::unique_ptr<LinuxMemory> m;
  EXPECT_TRUE(LinuxMemory::Create(o, &m).ok());
  return m;
}

// At a full scan the background scanner keeps a view read less than
// smaps_cost_share times what the read took ago (here: for good); a reported
// flag change, or a scan a caller asked for, reads it again. Before, a small
// process scanned at a high rate read /proc/self/maps at every one of its
// hundreds of full scans a second.
TEST_P(LinuxMemoryTest, TheScannersBackToBackFullScansKeepARecentView) {
  auto m = NewMemoryWithExpensiveSmaps();
  Region a(4);
  for (std::size_t i = 0; i < 4; ++i) Fill(a.page(i), i);
  ASSERT_TRUE(m->RefreshMaps().ok());
  const auto views = [&] { return ViewReads(*m); };
  const auto before = views();
  m->ReuseRecentViews(true);
  for (int i = 0; i < 5; ++i) m->BeginFullScan();
  EXPECT_EQ(views(), before) << "a recent view read again";
  NoteVmaFlagsChanged();
  m->BeginFullScan();
  EXPECT_EQ(views(), before + 1) << "a flag change left unread";
  m->BeginFullScan();
  EXPECT_EQ(views(), before + 1);
  m->ReuseRecentViews(false);
  m->BeginFullScan();
  m->BeginFullScan();
  EXPECT_EQ(views(), before + 3) << "a scan asked for kept the view";
  // The view still serves: the pages are there to probe.
  std::vector<PageState> states(4);
  m->Probe(a.addr(0), states);
  for (std::size_t i = 0; i < 4; ++i)
    EXPECT_EQ(states[i], PageState::kAnon) << i;
}

// Small unmerges (a madvise(MADV_DONTNEED) of a merged buffer) ask the
// kernel for their own mappings while the flags held are what a view read
// now would give: where smaps is expensive, for as long as the views keep
// to the plain maps, not only kSmapsInterval. Before, past two seconds each
// such call read every mapping (a forked Redis's save dismissing 95,000
// values: 63 s against 2 natively).
TEST_P(LinuxMemoryTest, SmallUnmergesReadNoMapsWhileTheViewsKeepTheirFlags) {
  if (!FrameMappingsKnowable()) GTEST_SKIP() << "no PROCMAP_QUERY here";
  auto m = NewMemoryWithExpensiveSmaps();
  const AdvisedTwins twins(*m);  // smaps read
  const Region& a = twins.a;
  const Region& b = twins.b;
  const std::vector<FrameId> frames = MergeTwins(*m, twins);
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  const auto before = ViewReads(*m);
  for (std::size_t i = 0; i < 8; ++i) {
    ASSERT_TRUE(m->Unmerge(a.addr(i), 1)) << i;
    EXPECT_EQ(ProbeOne(*m, a.addr(i)), PageState::kAnon) << i;
  }
  EXPECT_EQ(ViewReads(*m), before) << "each unmerge read the maps";
  for (std::size_t i = 0; i < 8; ++i) {
    unsigned char expect[kPageSize];
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
    a.page(i)[0] ^= 1;  // writable, its own page
    EXPECT_TRUE(Same(b.page(i), expect)) << i;
  }
  ASSERT_TRUE(m->Unmerge(b.addr(0), 8));
  for (FrameId f : frames) m->ReleaseFrame(f);
}

// A discard that leaves its range reading zeros (MADV_DONTNEED) takes
// merged pages back to fresh anonymous memory without copying them first:
// they read zeros, are writable pages of their own, and the pages around
// keep their bytes; a range with locked memory is left to Unmerge.
TEST_P(LinuxMemoryTest, DroppedFrameMappingsReadZerosWithoutACopy) {
  if (!FrameMappingsKnowable()) GTEST_SKIP() << "no PROCMAP_QUERY here";
  auto m = NewMemory();
  const AdvisedTwins twins(*m);
  const Region& a = twins.a;
  const Region& b = twins.b;
  const std::vector<FrameId> frames = MergeTwins(*m, twins);
  const std::uint64_t filled = m->Stats().unmerge_filled_pages;
  m->DropFrameMappings(a.addr(2), a.addr(5));
  EXPECT_EQ(m->Stats().dropped_frame_pages, 3u);
  for (std::size_t i = 0; i < 8; ++i) {
    unsigned char expect[kPageSize];
    Fill(expect, static_cast<unsigned>(i));
    const bool dropped = i >= 2 && i < 5;
    EXPECT_EQ(ProbeOne(*m, a.addr(i)),
              dropped ? PageState::kAbsent : PageState::kFrame)
        << i;
    if (dropped) {
      EXPECT_EQ(a.page(i)[0], 0) << i;
      EXPECT_EQ(std::memcmp(a.page(i), a.page(i) + 1, kPageSize - 1), 0) << i;
    } else {
      EXPECT_TRUE(Same(a.page(i), expect)) << i;
    }
    EXPECT_TRUE(Same(b.page(i), expect)) << i;
  }
  // Nothing left to copy back there: Unmerge finds no frame.
  ASSERT_TRUE(m->Unmerge(a.addr(2), 3));
  EXPECT_EQ(m->Stats().unmerge_filled_pages, filled);
  a.page(3)[5] = 9;
  EXPECT_EQ(a.page(3)[5], 9);
  EXPECT_EQ(b.page(3)[5], [] {
    unsigned char e[kPageSize];
    Fill(e, 3);
    return e[5];
  }());
#if !defined(__SANITIZE_ADDRESS__)  // its runtime makes mlock() a no-op
  // Locked memory in the range: nothing dropped.
  ASSERT_EQ(mlock(a.page(6), kPageSize), 0) << std::strerror(errno);
  ASSERT_TRUE(m->RefreshMaps().ok());
  m->DropFrameMappings(a.addr(5), a.addr(8));
  EXPECT_EQ(m->Stats().dropped_frame_pages, 3u);
  EXPECT_EQ(ProbeOne(*m, a.addr(5)), PageState::kFrame);
  ASSERT_EQ(munlock(a.page(6), kPageSize), 0);
#endif
  ASSERT_TRUE(m->Unmerge(a.addr(0), 8));
  ASSERT_TRUE(m->Unmerge(b.addr(0), 8));
  for (FrameId f : frames) m->ReleaseFrame(f);
}

// However cheap the view, the background scanner keeps one younger than
// options.recent_view_ns: an idle process ends a full scan every batch.
// (Here an hour, and 20 ms between scans: a view a twentieth of a
// millisecond's read would otherwise be read again at each.)
TEST_P(LinuxMemoryTest, TheScannerKeepsEvenACheapViewAWhile) {
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.recent_view_ns = std::int64_t{3600} * 1'000'000'000;
  std::unique_ptr<LinuxMemory> m;
  ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
  Region a(4);
  ASSERT_TRUE(m->RefreshMaps().ok());
  const auto views = [&] { return ViewReads(*m); };
  const auto before = views();
  m->ReuseRecentViews(true);
  for (int i = 0; i < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    m->BeginFullScan();
  }
  m->ReuseRecentViews(false);
  EXPECT_EQ(views(), before) << "a recent view read again";
}

// Where smaps is expensive, the read that known memory grown in place asks
// for is put off: that memory is left alone meanwhile (its pages report
// excluded, nothing merges there, its bytes stay and take writes) while the
// rest merges, and it merges again once smaps is read.
void ExpectGrownMemoryToWaitForSmaps(LinuxMemory& m) {
  const AdvisedTwins twins(m);
  const Region& a = twins.a;
  const Region& b = twins.b;
  ASSERT_TRUE(MergePair(m, a.addr(1), b.addr(1)));
  void* grown = mremap(b.page(2), 6 * kPageSize, 7 * kPageSize, 0);
  ASSERT_EQ(grown, b.page(2)) << "no room to grow in place";
  const std::uint64_t reads = m.Stats().smaps_reads;
  m.BeginFullScan();
  EXPECT_EQ(m.Stats().smaps_reads, reads) << "read at once";
  EXPECT_EQ(ProbeOne(m, b.addr(3)), PageState::kExcluded);
  EXPECT_FALSE(MergePair(m, a.addr(3), b.addr(3)));
  unsigned char expect[kPageSize];
  Fill(expect, 3);
  EXPECT_TRUE(Same(b.page(3), expect));
  b.page(3)[0] ^= 1;
  b.page(3)[0] ^= 1;
  EXPECT_TRUE(MergePair(m, a.addr(0), b.addr(0))) << "memory not grown";

  NoteVmaFlagsChanged();
  m.BeginFullScan();
  EXPECT_EQ(m.Stats().smaps_reads, reads + 1);
  EXPECT_EQ(ProbeOne(m, b.addr(3)), PageState::kAnon);
  ASSERT_TRUE(MergePair(m, a.addr(3), b.addr(3)));
  EXPECT_TRUE(Same(b.page(3), expect));
  ASSERT_EQ(mremap(b.page(2), 7 * kPageSize, 6 * kPageSize, 0), b.page(2));
}

TEST_P(LinuxMemoryTest, GrownMemoryWaitsForAnExpensiveSmapsRead) {
  if (kSmapsReadsCountTheRuntimes) GTEST_SKIP() << kSmapsReadsSkip;
  auto m = NewMemoryWithExpensiveSmaps();
  ExpectGrownMemoryToWaitForSmaps(*m);
}

// A smaps read is judged by what it would cost now, not by what the last
// one cost: the last read here was cheap, but each mapping added since
// (the merge's) is taken to cost 100 ms of smaps text, so the read that
// grown memory asks for is put off as above, not made at once.
TEST_P(LinuxMemoryTest, MappingsAddedSinceTheLastSmapsReadMakeItExpensive) {
  if (kSmapsReadsCountTheRuntimes) GTEST_SKIP() << kSmapsReadsSkip;
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.smaps_ns_per_mapping = 100'000'000;
  std::unique_ptr<LinuxMemory> m;
  ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
  ExpectGrownMemoryToWaitForSmaps(*m);
}

// Likewise a split of anonymous memory that the application made (here
// MADV_DONTFORK on part of a mapping, straight to the kernel): both sides
// are left alone until smaps is read, which then sees the flag.
TEST_P(LinuxMemoryTest, AnUnknownSplitWaitsForAnExpensiveSmapsRead) {
  auto m = NewMemoryWithExpensiveSmaps();
  const AdvisedTwins twins(*m);
  const Region& a = twins.a;
  const Region& b = twins.b;
  const std::uint64_t reads = m->Stats().smaps_reads;
  ASSERT_EQ(madvise(b.page(4), 4 * kPageSize, MADV_DONTFORK), 0);
  m->BeginFullScan();
  EXPECT_EQ(m->Stats().smaps_reads, reads) << "read at once";
  EXPECT_EQ(ProbeOne(*m, b.addr(2)), PageState::kExcluded);
  EXPECT_EQ(ProbeOne(*m, b.addr(5)), PageState::kExcluded);
  EXPECT_FALSE(MergePair(*m, a.addr(2), b.addr(2)));

  NoteVmaFlagsChanged();
  m->BeginFullScan();
  EXPECT_EQ(m->Stats().smaps_reads, reads + 1);
  EXPECT_EQ(ProbeOne(*m, b.addr(2)), PageState::kAnon);
  EXPECT_TRUE(MergePair(*m, a.addr(2), b.addr(2)));
  unsigned char expect[kPageSize];
  Fill(expect, 2);
  EXPECT_TRUE(Same(b.page(2), expect));
  ASSERT_EQ(madvise(b.page(4), 4 * kPageSize, MADV_DOFORK), 0);
}

// A page given back anonymous between anonymous neighbours splits them
// (its own anon_vma keeps it apart): that split is ours, and the next full
// scan reads the plain maps, not smaps.
TEST_P(LinuxMemoryTest, APageGivenBackAnonymousAsksForNoSmapsRead) {
  if (kSmapsReadsCountTheRuntimes) GTEST_SKIP() << kSmapsReadsSkip;
  auto m = NewMemory();
  const AdvisedTwins twins(*m);
  const Region& a = twins.a;
  const Region& b = twins.b;
  ASSERT_TRUE(MergePair(*m, a.addr(3), b.addr(3)));
  m->BeginFullScan();
  const std::uint64_t reads = m->Stats().smaps_reads;
  ASSERT_TRUE(m->Unmerge(b.addr(3), 1));
  ASSERT_EQ(VmasIn(b.addr(0), 8), 3u) << "the page joined its neighbours";
  m->BeginFullScan();
  EXPECT_EQ(m->Stats().smaps_reads, reads);
  EXPECT_EQ(ProbeOne(*m, b.addr(3)), PageState::kAnon);
  unsigned char expect[kPageSize];
  Fill(expect, 3);
  EXPECT_TRUE(Same(b.page(3), expect));
}

// Unmerging a small range asks the kernel for its own mappings
// (PROCMAP_QUERY) instead of reading all of the process's again: a program
// giving back merged buffers one by one paid a read of every mapping per
// call (7 ms a call with 5,000 merged one-page buffers). After a flag
// change is reported, the view is read again first, as before.
TEST_P(LinuxMemoryTest, UnmergeOfASmallRangeReadsNoMaps) {
  auto m = NewMemory();
  if (!FrameMappingsKnowable()) GTEST_SKIP() << "no PROCMAP_QUERY here";
  const AdvisedTwins twins(*m);
  const Region& a = twins.a;
  const Region& b = twins.b;
  for (std::size_t i : {1, 3, 5})
    ASSERT_TRUE(MergePair(*m, a.addr(i), b.addr(i)));
  ASSERT_TRUE(m->RefreshMaps().ok());  // flags as fresh as can be
  const MemoryStats before = m->Stats();
  ASSERT_TRUE(m->Unmerge(b.addr(3), 1));
  ASSERT_TRUE(m->Unmerge(a.addr(3), 1));
  EXPECT_EQ(m->Stats().maps_reads, before.maps_reads);
  EXPECT_EQ(m->Stats().smaps_reads, before.smaps_reads);
  EXPECT_TRUE(PrivateCopy(a.page(3)));
  EXPECT_TRUE(PrivateCopy(b.page(3)));
  NoteVmaFlagsChanged();
  ASSERT_TRUE(m->Unmerge(b.addr(5), 1));
  EXPECT_EQ(m->Stats().smaps_reads, before.smaps_reads + 1)
      << "a reported flag change did not read the view";
  EXPECT_TRUE(PrivateCopy(b.page(5)));
  EXPECT_FALSE(PrivateCopy(b.page(1))) << "a page outside the range";
  unsigned char expect[kPageSize];
  for (unsigned i = 0; i < 8; ++i) {
    Fill(expect, i);
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
    EXPECT_TRUE(Same(b.page(i), expect)) << i;
  }
  // Writes reach only their own page.
  b.page(3)[0] ^= 1;
  b.page(1)[0] ^= 1;
  EXPECT_NE(a.page(3)[0], b.page(3)[0]);
  EXPECT_NE(a.page(1)[0], b.page(1)[0]);
}

TEST_P(LinuxMemoryTest, MergePairsSharesOneFrameAndCopiesOnWrite) {
  auto m = NewMemory();
  Region a(4), b(4);
  FillAlike(a, b);
  Fill(b.page(3), 99);  // differs
  Rescan(*m);
  auto p = Addrs(a, 0, 4), q = Addrs(b, 0, 4);
  std::vector<FrameId> frames(4);
  std::vector<MergeResult> res(4);
  m->MergePairs(p, q, frames, res);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
    EXPECT_EQ(frames[i], frames[0] + i) << "consecutive frames";
    EXPECT_EQ(ProbeOne(*m, a.addr(i)), PageState::kFrame);
    EXPECT_EQ(ProbeOne(*m, b.addr(i)), PageState::kFrame);
  }
  EXPECT_EQ(res[3], MergeResult::kDiffers);
  EXPECT_EQ(frames[3], kNoFrame);
  EXPECT_EQ(m->Stats().frames_in_use, 3u);

  unsigned char expect[kPageSize];
  Fill(expect, 1);
  EXPECT_TRUE(Same(a.page(1), expect));
  EXPECT_TRUE(Same(b.page(1), expect));
  EXPECT_TRUE(Same(m->frame_store().FrameAddress(frames[1]), expect));

  // A write changes only the writer's page.
  a.page(1)[100] ^= 0xff;
  EXPECT_FALSE(Same(a.page(1), expect));
  EXPECT_TRUE(Same(b.page(1), expect));
  EXPECT_TRUE(Same(m->frame_store().FrameAddress(frames[1]), expect));
  EXPECT_EQ(ProbeOne(*m, a.addr(1)), PageState::kAnon);
  EXPECT_EQ(ProbeOne(*m, b.addr(1)), PageState::kFrame);

  // The page that differed is untouched and writable.
  b.page(3)[0] = 1;
  EXPECT_EQ(b.page(3)[0], 1);
}

// The frame view grows without MAP_FIXED, as malloc maps; a program that
// maps over a chunk of it (MAP_FIXED where it had unmapped, another thread
// having mapped in between) must not have merges compare with its memory:
// they are refused, the chunk is mapped again, and the next merge compares
// with the real frame.
TEST_P(LinuxMemoryTest, AViewChunkMappedOverIsNotComparedWith) {
  auto m = NewMemory();
  Region a(2), b(1);
  Fill(a.page(0), 7);
  Fill(a.page(1), 7);
  Fill(b.page(0), 9);
  Rescan(*m);
  auto p = Addrs(a, 0, 1), q = Addrs(a, 1, 1);
  std::vector<FrameId> frames(1);
  std::vector<MergeResult> res(1);
  m->MergePairs(p, q, frames, res);
  ASSERT_EQ(res[0], MergeResult::kMerged);
  const FrameId f = frames[0];
  std::byte* old_view = m->frame_store().FrameAddress(f);
  std::byte* chunk = old_view - f % FrameStore::kGrowFrames * kPageSize;
  const std::size_t chunk_bytes =
      m->frame_store().ChunkFrames(m->frame_store().ChunkOf(f)) * kPageSize;
  // The program's memory where f's page was seen, equal to b's page.
  ASSERT_EQ(mmap(chunk, chunk_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
            chunk);
  Fill(reinterpret_cast<unsigned char*>(old_view), 9);
  std::vector<Addr> pages = Addrs(b, 0, 1);
  std::vector<MergeResult> into(1);
  m->MergeIntoFrames(pages, std::vector<FrameId>{f}, into);
  EXPECT_NE(into[0], MergeResult::kMerged);
  unsigned char nine[kPageSize], seven[kPageSize];
  Fill(nine, 9);
  Fill(seven, 7);
  EXPECT_TRUE(Same(b.page(0), nine)) << "b's bytes are b's";
  EXPECT_EQ(ProbeOne(*m, b.addr(0)), PageState::kAnon);
  EXPECT_NE(m->frame_store().FrameAddress(f), old_view) << "mapped again";
  EXPECT_TRUE(Same(m->frame_store().FrameAddress(f), seven));
  // Through the view mapped again, an equal page merges.
  Fill(b.page(0), 7);
  m->MergeIntoFrames(pages, std::vector<FrameId>{f}, into);
  EXPECT_EQ(into[0], MergeResult::kMerged);
  EXPECT_TRUE(Same(b.page(0), seven));
  EXPECT_EQ(ProbeOne(*m, b.addr(0)), PageState::kFrame);
  munmap(chunk, chunk_bytes);
}

// n pages of a run (a) and their partners in another region (b), reversed
// and every other page: partner(i) = b[2 (n - 1 - i)]. Page i and its
// partner hold Fill(i); the page after a partner holds Fill(1000 + i).
struct ScatteredPairs {
  explicit ScatteredPairs(std::size_t pages) : n(pages), a(n), b(2 * n) {
    for (std::size_t i = 0; i < n; ++i) {
      Fill(a.page(i), static_cast<unsigned>(i));
      Fill(partner(i), static_cast<unsigned>(i));
      Fill(partner(i) + kPageSize, static_cast<unsigned>(1000 + i));
    }
  }
  unsigned char* partner(std::size_t i) const {
    return b.page(2 * (n - 1 - i));
  }
  std::vector<Addr> p() const { return Addrs(a, 0, n); }
  std::vector<Addr> q() const {
    std::vector<Addr> v;
    for (std::size_t i = 0; i < n; ++i)
      v.push_back(reinterpret_cast<Addr>(partner(i)));
    return v;
  }
  std::size_t n;
  Region a, b;
};

// A thread on its way out (NoteThreadExiting, from Engine::ThreadExiting)
// may still trim the heap with calls nobody sees (glibc frees its malloc
// cache at thread exit): while it runs, no merge window opens (pairs in
// runs and scattered pairs are left as they are, to be tried again), and
// giving merged memory back waits for it rather than failing. Once it is
// gone, merging goes on; giving back waits at most kExitingWaitNs, and a
// registration older than kExitingGiveUpNs holds nothing back.
TEST_P(LinuxMemoryTest, NoWindowOpensWhileAThreadExits) {
  using std::chrono::milliseconds;
  auto m = NewMemory();
  Region a(2), b(2);
  ScatteredPairs scattered(4);
  FillAlike(a, b);
  Rescan(*m);
  // A thread that registers, then stays until told to go (at most 10 s).
  std::atomic<int> stage{0};
  std::atomic<pid_t> tid{0};
  auto exiting = [&stage, &tid](int go) {
    return std::thread([&stage, &tid, go] {
      NoteThreadExiting();
      tid.store(static_cast<pid_t>(syscall(SYS_gettid)));
      stage.store(go - 1);
      const auto end =
          std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (stage.load() != go && std::chrono::steady_clock::now() < end)
        std::this_thread::sleep_for(milliseconds(1));
    });
  };
  auto wait_for = [&stage](int want) {
    const auto end =
        std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (stage.load() != want && std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(milliseconds(1));
    ASSERT_EQ(stage.load(), want);
  };
  // Joined, a thread may still be on its way out of the kernel (its tid
  // cleared, the task not yet gone), where windows still wait for it.
  auto join = [&tid](std::thread& t) {
    t.join();
    const auto end =
        std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (syscall(SYS_tgkill, getpid(), tid.load(), 0) == 0 &&
           std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(milliseconds(1));
  };
  std::vector<FrameId> frames(4);
  std::vector<MergeResult> res(4);
  auto merge = [&] {
    m->MergePairs(Addrs(a, 0, 2), Addrs(b, 0, 2), std::span(frames).first(2),
                  std::span(res).first(2));
    const MergeResult runs = res[0];
    EXPECT_EQ(res[1], runs);
    m->MergePairs(scattered.p(), scattered.q(), frames, res);
    for (std::size_t i = 1; i < 4; ++i) EXPECT_EQ(res[i], res[0]) << i;
    return std::make_pair(runs, res[0]);
  };

  std::thread t = exiting(2);
  wait_for(1);
  EXPECT_EQ(merge(),
            std::make_pair(MergeResult::kFailed, MergeResult::kFailed));
  EXPECT_EQ(ProbeOne(*m, a.addr(0)), PageState::kAnon);
  EXPECT_EQ(ProbeOne(*m, scattered.q()[0]), PageState::kAnon);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
  stage.store(2);
  join(t);
  EXPECT_EQ(merge(),
            std::make_pair(MergeResult::kMerged, MergeResult::kMerged));
  EXPECT_EQ(ProbeOne(*m, a.addr(0)), PageState::kFrame);
  EXPECT_EQ(ProbeOne(*m, scattered.q()[0]), PageState::kFrame);

  // Giving a page back waits until the thread is gone: it goes once told
  // to, 5 ms on (well within kExitingWaitNs), so an unmerge that returns
  // before that did not wait.
  t = exiting(4);
  wait_for(3);
  std::thread release([&stage] {
    std::this_thread::sleep_for(milliseconds(5));
    stage.store(4);
  });
  EXPECT_TRUE(m->Unmerge(a.addr(0), 2));
  EXPECT_EQ(stage.load(), 4) << "given back while the thread was there";
  release.join();
  join(t);
  EXPECT_EQ(ProbeOne(*m, a.addr(0)), PageState::kAnon);
  unsigned char expect[kPageSize];
  for (unsigned i = 0; i < 2; ++i) {
    Fill(expect, i);
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
  }

  // A thread that stays longer than giving back waits (kExitingWaitNs)
  // still holds merges back: a heap trim of its own may come at any time
  // before it is gone (a thread preempted under load). Giving back no
  // longer waits for it.
  Region c(1), d(1), e(1), f(1);
  Fill(c.page(0), 7);
  Fill(d.page(0), 7);
  Fill(e.page(0), 8);
  Fill(f.page(0), 8);
  Rescan(*m);
  auto merge_one = [&](Region& p, Region& q) {
    m->MergePairs(Addrs(p, 0, 1), Addrs(q, 0, 1), std::span(frames).first(1),
                  std::span(res).first(1));
    return res[0];
  };
  ASSERT_EQ(merge_one(c, d), MergeResult::kMerged);
  t = exiting(6);
  wait_for(5);
  const auto registered = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::nanoseconds(kExitingWaitNs) +
                              milliseconds(200));
  EXPECT_EQ(merge_one(e, f), MergeResult::kFailed);
  EXPECT_EQ(ProbeOne(*m, e.addr(0)), PageState::kAnon);
  const auto unmerge_start = std::chrono::steady_clock::now();
  EXPECT_TRUE(m->Unmerge(c.addr(0), 1));
  EXPECT_LT(std::chrono::steady_clock::now() - unmerge_start,
            std::chrono::nanoseconds(kExitingGiveUpNs) / 2);
  EXPECT_EQ(ProbeOne(*m, c.addr(0)), PageState::kAnon);
  Fill(expect, 7);
  EXPECT_TRUE(Same(c.page(0), expect));
  // A thread stuck in its exit for kExitingGiveUpNs holds nothing back.
  std::this_thread::sleep_until(registered +
                                std::chrono::nanoseconds(kExitingGiveUpNs) +
                                milliseconds(20));
  EXPECT_EQ(merge_one(e, f), MergeResult::kMerged);
  stage.store(6);
  join(t);
}

// Page i of a run pairs with a page of another region, far from the
// partners of i - 1 and i + 1 (reversed, every other page): more partner
// windows than one batch holds. Every equal pair shares a frame and copies
// on write; the pair that differs and the pair whose partner was unmapped
// behind the view's back are left as they were, and nothing is mapped where
// the application unmapped.
TEST_P(LinuxMemoryTest, MergePairsWithScatteredPartners) {
  constexpr std::size_t kN = 20;
  constexpr std::size_t kDiffering = 5, kUnmapped = 9;
  auto m = NewMemory();
  ScatteredPairs pairs(kN);
  const Region& a = pairs.a;
  auto partner = [&](std::size_t i) { return pairs.partner(i); };
  Fill(partner(kDiffering), 555);
  Rescan(*m);
  ASSERT_EQ(munmap(partner(kUnmapped), kPageSize), 0);
  std::vector<Addr> p = pairs.p(), q = pairs.q();
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(p, q, frames, res);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
    if (i == kDiffering || i == kUnmapped) {
      EXPECT_EQ(res[i],
                i == kDiffering ? MergeResult::kDiffers : MergeResult::kGone);
      EXPECT_EQ(frames[i], kNoFrame);
      EXPECT_EQ(ProbeOne(*m, p[i]), PageState::kAnon);
      continue;
    }
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
    EXPECT_EQ(ProbeOne(*m, p[i]), PageState::kFrame) << i;
    EXPECT_EQ(ProbeOne(*m, q[i]), PageState::kFrame) << i;
    EXPECT_TRUE(Same(partner(i), expect)) << i;
    EXPECT_TRUE(Same(m->frame_store().FrameAddress(frames[i]), expect)) << i;
    // The pages between the partners were not touched.
    Fill(expect, static_cast<unsigned>(1000 + i));
    EXPECT_TRUE(Same(partner(i) + kPageSize, expect)) << i;
    EXPECT_EQ(ProbeOne(*m, q[i] + kPageSize), PageState::kAnon) << i;
  }
  EXPECT_EQ(m->Stats().frames_in_use, kN - 2);
  EXPECT_EQ(msync(partner(kUnmapped), kPageSize, MS_ASYNC), -1);
  // Writes on either side change only the writer's page.
  a.page(3)[7] ^= 0xff;
  partner(12)[9] ^= 0xff;
  Fill(expect, 3);
  EXPECT_TRUE(Same(partner(3), expect));
  EXPECT_FALSE(Same(a.page(3), expect));
  Fill(expect, 12);
  EXPECT_TRUE(Same(a.page(12), expect));
  EXPECT_FALSE(Same(partner(12), expect));
  // The pairs left alone are writable.
  a.page(kDiffering)[0] ^= 1;
  partner(kDiffering)[0] ^= 1;
  a.page(kUnmapped)[0] ^= 1;
}

TEST_P(LinuxMemoryTest, MergeIntoFramesLeavesDifferentPagesWritable) {
  auto m = NewMemory();
  Region a(2), b(2), c(3);
  Fill(a.page(0), 1);
  Fill(a.page(1), 2);
  std::memcpy(b.page(0), a.page(0), 2 * kPageSize);
  Rescan(*m);
  std::vector<FrameId> frames(2);
  std::vector<MergeResult> res(2);
  m->MergePairs(Addrs(a, 0, 2), Addrs(b, 0, 2), frames, res);
  ASSERT_EQ(res[0], MergeResult::kMerged);
  ASSERT_EQ(res[1], MergeResult::kMerged);

  Fill(c.page(0), 1);
  Fill(c.page(1), 2);
  Fill(c.page(2), 3);
  std::vector<FrameId> into = {frames[0], frames[1], frames[0]};
  std::vector<MergeResult> r2(3);
  m->MergeIntoFrames(Addrs(c, 0, 3), into, r2);
  EXPECT_EQ(r2[0], MergeResult::kMerged);
  EXPECT_EQ(r2[1], MergeResult::kMerged);
  EXPECT_EQ(r2[2], MergeResult::kDiffers);
  EXPECT_EQ(ProbeOne(*m, c.addr(0)), PageState::kFrame);
  EXPECT_EQ(ProbeOne(*m, c.addr(2)), PageState::kAnon);
  unsigned char expect[kPageSize];
  Fill(expect, 3);
  EXPECT_TRUE(Same(c.page(2), expect));
  c.page(2)[5] = 42;  // still writable
  EXPECT_EQ(c.page(2)[5], 42);

  // COW: a write to c[0] leaves a[0], b[0] and the frame alone.
  Fill(expect, 1);
  c.page(0)[0] ^= 1;
  EXPECT_TRUE(Same(a.page(0), expect));
  EXPECT_TRUE(Same(b.page(0), expect));
  EXPECT_TRUE(Same(m->frame_store().FrameAddress(frames[0]), expect));
  EXPECT_FALSE(Same(c.page(0), expect));
}

// Every VMA over n pages at p whose VmFlags hold `flag` (smaps), as text.
std::string VmasWithFlag(const unsigned char* p, std::size_t n,
                         const char* flag) {
  std::vector<MapEntry> maps;
  if (!ReadMaps("/proc/self/smaps", &maps).ok()) return "cannot read smaps";
  const Addr lo = reinterpret_cast<Addr>(p), hi = lo + n * kPageSize;
  std::string out;
  for (const MapEntry& e : maps) {
    if (e.end <= lo || e.start >= hi || !e.HasVmFlag(flag)) continue;
    out += std::to_string(e.start) + "-" + std::to_string(e.end) + " ";
  }
  return out;
}

// c's page i holds the content of a's page Scatter(i): consecutive pages
// joining frames in scattered order, a mapping each.
std::size_t Scatter(std::size_t i) { return (i * 37 + 11) % 64; }

// 64 pages of c, page i a copy of a's page Scatter(i), a merged with b
// first: c's pages join a's frames, each page a run of its own, in one
// discard-first window where userfaultfd takes all faults.
struct ScatteredCopies {
  explicit ScatteredCopies(LinuxMemory& m,
                           std::size_t (*source_of)(std::size_t) = Scatter)
      : source(source_of) {
    FillAlike(a, b);
    for (std::size_t i = 0; i < 64; ++i)
      std::memcpy(c.page(i), a.page(source(i)), kPageSize);
    Rescan(m);
    std::vector<FrameId> frames(64);
    m.MergePairs(Addrs(a, 0, 64), Addrs(b, 0, 64), frames, res);
    for (std::size_t i = 0; i < 64; ++i) into[i] = frames[source(i)];
  }
  void Merge(LinuxMemory& m) { m.MergeIntoFrames(Addrs(c, 0, 64), into, res); }
  std::size_t (*source)(std::size_t);  // c's page i copies a's source(i)
  Region a{64}, b{64}, c{64};
  std::vector<FrameId> into = std::vector<FrameId>(64);
  std::vector<MergeResult> res = std::vector<MergeResult>(64);
};

// With userfaultfd for all faults such a window discards the equal pages
// first and maps their frames into the empty page tables; elsewhere it maps
// over them. Either way the same pages merge, hold the right bytes, copy on
// write, and no mapping keeps the missing-page registration ("um").
TEST_P(LinuxMemoryTest, ScatteredFramesJoinAMappingEach) {
  auto m = NewMemory();
  ScatteredCopies copies(*m);
  for (MergeResult r : copies.res) ASSERT_EQ(r, MergeResult::kMerged);
  const Region &a = copies.a, &c = copies.c;
  const std::vector<FrameId>& into = copies.into;
  const std::vector<MergeResult>& res = copies.res;
  c.page(5)[100] ^= 1;  // differs from its frame
  const std::uint64_t before = m->Stats().discard_first_pages;
  copies.Merge(*m);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < 64; ++i) {
    Fill(expect, static_cast<unsigned>(Scatter(i)));
    if (i == 5) {
      EXPECT_EQ(res[i], MergeResult::kDiffers);
      EXPECT_EQ(ProbeOne(*m, c.addr(i)), PageState::kAnon);
      expect[100] ^= 1;
    } else {
      EXPECT_EQ(res[i], MergeResult::kMerged) << "page " << i;
      EXPECT_EQ(ProbeOne(*m, c.addr(i)), PageState::kFrame) << "page " << i;
    }
    EXPECT_TRUE(Same(c.page(i), expect)) << "page " << i;
  }
  const std::uint64_t discarded = m->Stats().discard_first_pages - before;
  EXPECT_EQ(discarded, m->SyscallWritesWait() ? 63u : 0u);
  EXPECT_EQ(VmasWithFlag(c.page(0), 64, "um"), "");
  EXPECT_EQ(m->Stats().fill_failures, 0u);
  // Copy on write: the writer's copy changes, the sharers and frame do not.
  c.page(9)[0] ^= 1;
  c.page(5)[0] ^= 1;  // not merged: still writable
  Fill(expect, static_cast<unsigned>(Scatter(9)));
  EXPECT_TRUE(Same(a.page(Scatter(9)), expect));
  EXPECT_TRUE(Same(m->frame_store().FrameAddress(into[9]), expect));
  EXPECT_FALSE(Same(c.page(9), expect));
}

// Identical pages laid out over F frames (Ksm::StripeRuns) take a mapping
// per F pages. With userfaultfd for all faults, a run over a whole page
// table is discarded in one call and mapped into the emptied table; the
// rest maps over the pages. Either way the equal pages merge, the one that
// differs stays anonymous and writable, every page holds its bytes, and
// writes copy.
TEST_P(LinuxMemoryTest, StripedRunOverAWholePageTableMergesDiscardFirst) {
  auto m = NewMemory();
  constexpr std::size_t kF = 100, kN = 1200;  // kN holds a whole table
  Region a(kF), b(kF), c(kN);
  FillAlike(a, b);
  for (std::size_t i = 0; i < kN; ++i)
    std::memcpy(c.page(i), a.page(i % kF), kPageSize);
  constexpr Addr kTable = 512 * kPageSize;
  const Addr first_table = (c.addr(0) + kTable - 1) / kTable * kTable;
  const std::size_t tables = (c.addr(kN) - first_table) / kTable;
  ASSERT_GE(tables, 1u);
  const std::size_t differs = (first_table - c.addr(0)) / kPageSize + 7;
  c.page(differs)[100] ^= 1;
  Rescan(*m);
  std::vector<FrameId> frames(kF), into(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(Addrs(a, 0, kF), Addrs(b, 0, kF), frames, res);
  for (std::size_t i = 0; i < kF; ++i) ASSERT_EQ(res[i], MergeResult::kMerged);
  for (std::size_t i = 0; i < kN; ++i) into[i] = frames[i % kF];
  const std::uint64_t before = m->Stats().discard_first_pages;
  m->MergeIntoFrames(Addrs(c, 0, kN), into, res);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    SCOPED_TRACE(i);
    Fill(expect, static_cast<unsigned>(i % kF));
    if (i == differs) {
      EXPECT_EQ(res[i], MergeResult::kDiffers);
      EXPECT_EQ(ProbeOne(*m, c.addr(i)), PageState::kAnon);
      expect[100] ^= 1;
    } else {
      ASSERT_EQ(res[i], MergeResult::kMerged);
      EXPECT_EQ(ProbeOne(*m, c.addr(i)), PageState::kFrame);
    }
    ASSERT_TRUE(Same(c.page(i), expect));
  }
  // The whole tables' pages, but the one that differs, went discard-first.
  const std::uint64_t discarded = m->Stats().discard_first_pages - before;
  EXPECT_EQ(discarded, m->SyscallWritesWait() ? tables * 512 - 1 : 0u);
  EXPECT_EQ(VmasWithFlag(c.page(0), kN, "um"), "");
  EXPECT_EQ(m->Stats().fill_failures, 0u);
  // Copy on write, inside the table and outside it.
  for (std::size_t i : {differs - 1, differs, differs + 1, std::size_t{0}}) {
    c.page(i)[0] ^= 1;
    Fill(expect, static_cast<unsigned>(i % kF));
    EXPECT_TRUE(Same(a.page(i % kF), expect));
    EXPECT_TRUE(Same(m->frame_store().FrameAddress(into[i]), expect));
    if (i == differs) expect[100] ^= 1;
    expect[0] ^= 1;
    EXPECT_TRUE(Same(c.page(i), expect)) << "page " << i;
  }
}

// A frame mapping that fails after the pages were discarded (the kernel's
// ENOMEM at the mapping limit, or anything else) gives the pages back their
// bytes, as anonymous memory, writable, and reports them not merged.
int g_failed_maps = 0;
int FailEveryOtherMap(Addr, std::size_t) {
  return ++g_failed_maps % 2 == 0 ? ENOMEM : EPERM;
}

TEST_P(LinuxMemoryTest,
       DiscardedPagesWhoseFramesCannotBeMappedGetTheirBytesBack) {
  LinuxMemoryOptions o;
  o.fail_discard_first_map = FailEveryOtherMap;
  auto m = NewHookedMemory(o);
  if (!m->SyscallWritesWait()) GTEST_SKIP() << "no discard-first windows here";
  ScatteredCopies copies(*m);
  const Region& c = copies.c;
  g_failed_maps = 0;
  const std::uint64_t charged = m->Stats().vmas_used;
  copies.Merge(*m);
  EXPECT_EQ(g_failed_maps, 64);  // every page was discarded, none mapped
  EXPECT_EQ(m->Stats().discard_first_pages, 0u);
  // No mapping is left, nor charged (not wrapped below zero either).
  EXPECT_EQ(m->Stats().vmas_used, charged);
  EXPECT_EQ(m->Stats().fill_failures, 0u);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < 64; ++i) {
    EXPECT_TRUE(copies.res[i] == MergeResult::kNoBudget ||
                copies.res[i] == MergeResult::kFailed)
        << int(copies.res[i]);
    EXPECT_EQ(ProbeOne(*m, c.addr(i)), PageState::kAnon) << "page " << i;
    EXPECT_TRUE(Present(c.page(i))) << "page " << i;
    Fill(expect, static_cast<unsigned>(Scatter(i)));
    EXPECT_TRUE(Same(c.page(i), expect)) << "page " << i;
    c.page(i)[0] ^= 1;  // writable
  }
  EXPECT_EQ(VmasWithFlag(c.page(0), 64, "um"), "");
  EXPECT_NE(VmasWithFlag(c.page(0), 64, "uw"), "")
      << "registered for write-protection again";
}

// A thread that unmaps part of a discard-first window's span right before
// its discard (a call samepage does not see, library mode): the runs it
// reaches are reported gone, not failed, and nothing is mapped where they
// were; their pages still mapped keep their bytes, anonymous and
// writable; the rest of the span merges as before.
Addr g_unmap_at = 0;
std::size_t g_unmap_pages = 0;
void UnmapBeforeDiscard(Addr, std::size_t) {
  munmap(reinterpret_cast<void*>(g_unmap_at), g_unmap_pages * kPageSize);
}

// c's pages in runs of four consecutive frames, the runs' frames apart.
std::size_t ScatterFours(std::size_t i) {
  return (i / 4 * 5 + 3) % 16 * 4 + i % 4;
}

// Pages [hole, hole_end) unmapped before the discard; the runs over them
// span [gone, gone_end).
void MergeWithPagesUnmappedBeforeTheDiscard(std::size_t (*source)(std::size_t),
                                            std::size_t hole,
                                            std::size_t hole_end,
                                            std::size_t gone,
                                            std::size_t gone_end) {
  LinuxMemoryOptions o;
  o.before_discard_first_discard = UnmapBeforeDiscard;
  auto m = NewHookedMemory(o);
  if (!m->SyscallWritesWait()) GTEST_SKIP() << "no discard-first windows here";
  ScatteredCopies copies(*m, source);
  const Region& c = copies.c;
  g_unmap_at = c.addr(hole);
  g_unmap_pages = hole_end - hole;
  const std::uint64_t charged = m->Stats().vmas_used;
  const long maps = Maps();
  copies.Merge(*m);
  const std::size_t merged = 64 - (gone_end - gone);
  EXPECT_EQ(m->Stats().discard_first_pages, merged);
  // The charge covers the mappings made, and no more than two a page.
  const std::uint64_t now = m->Stats().vmas_used;
  EXPECT_GE(now, charged + static_cast<std::uint64_t>(Maps() - maps));
  EXPECT_LE(now, charged + 2 * merged);
  EXPECT_EQ(m->Stats().fill_failures, 0u);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < 64; ++i) {
    SCOPED_TRACE(i);
    const bool in_gone_run = i >= gone && i < gone_end;
    if (in_gone_run) {
      EXPECT_EQ(copies.res[i], MergeResult::kGone);
      if (i >= hole && i < hole_end) continue;
    } else {
      ASSERT_EQ(copies.res[i], MergeResult::kMerged);
    }
    EXPECT_EQ(ProbeOne(*m, c.addr(i)),
              in_gone_run ? PageState::kAnon : PageState::kFrame);
    Fill(expect, static_cast<unsigned>(copies.source(i)));
    EXPECT_TRUE(Same(c.page(i), expect));
    c.page(i)[0] ^= 1;  // writable, and copies
    EXPECT_FALSE(Same(c.page(i), expect));
    EXPECT_TRUE(Same(m->frame_store().FrameAddress(copies.into[i]), expect));
  }
  // Nothing was mapped into the hole.
  EXPECT_NE(msync(c.page(hole), (hole_end - hole) * kPageSize, MS_ASYNC), 0);
  EXPECT_EQ(errno, ENOMEM);
  EXPECT_EQ(VmasWithFlag(c.page(0), hole, "um"), "");
  EXPECT_EQ(VmasWithFlag(c.page(hole_end), 64 - hole_end, "um"), "");
}

TEST_P(LinuxMemoryTest, PagesUnmappedBeforeTheDiscardFirstDiscardAreGone) {
  MergeWithPagesUnmappedBeforeTheDiscard(Scatter, 16, 24, 16, 24);
}

TEST_P(LinuxMemoryTest, RunsPartlyUnmappedBeforeTheDiscardKeepTheirOtherPages) {
  // The runs [16, 20), [20, 24) and [24, 28) lose [18, 26).
  MergeWithPagesUnmappedBeforeTheDiscard(ScatterFours, 18, 26, 16, 28);
}

// Direct I/O registered over a page (the preload's O_DIRECT reads): no
// merge or zero drop replaces it while the registration lasts, since the
// device would write into the page no longer mapped; once it ends, the
// same merges go through.
TEST_P(LinuxMemoryTest, PagesWithDirectIoInFlightAreNotReplaced) {
  auto m = NewMemory();
  Region a(2), b(2), c(2), z(2);
  Fill(a.page(0), 9);
  Fill(a.page(1), 9);
  std::memcpy(b.page(0), a.page(0), 2 * kPageSize);
  std::memcpy(c.page(0), a.page(0), 2 * kPageSize);
  std::memset(z.page(0), 0, 2 * kPageSize);
  Rescan(*m);
  // A read into the second page of b only.
  int io = BeginPinnedIo(b.addr(1) + 100, b.addr(1) + 200);
  ASSERT_GE(io, 0);
  std::vector<FrameId> frames(2);
  std::vector<MergeResult> res(2);
  m->MergePairs(Addrs(a, 0, 2), Addrs(b, 0, 2), frames, res);
  EXPECT_NE(res[1], MergeResult::kMerged);
  EXPECT_EQ(ProbeOne(*m, b.addr(1)), PageState::kAnon);
  const std::uint64_t skips = m->Stats().pinned_io_skips;
  EXPECT_GT(skips, 0u);
  EndPinnedIo(io);

  m->MergePairs(Addrs(a, 0, 2), Addrs(b, 0, 2), frames, res);
  ASSERT_EQ(res[0], MergeResult::kMerged);
  ASSERT_EQ(res[1], MergeResult::kMerged);
  io = BeginPinnedIo(c.addr(0), c.addr(2));
  ASSERT_GE(io, 0);
  m->MergeIntoFrames(Addrs(c, 0, 2), frames, res);
  EXPECT_NE(res[0], MergeResult::kMerged);
  EXPECT_NE(res[1], MergeResult::kMerged);
  EXPECT_EQ(ProbeOne(*m, c.addr(0)), PageState::kAnon);
  EndPinnedIo(io);
  m->MergeIntoFrames(Addrs(c, 0, 2), frames, res);
  EXPECT_EQ(res[0], MergeResult::kMerged);
  EXPECT_EQ(res[1], MergeResult::kMerged);

  io = BeginPinnedIo(z.addr(0), z.addr(1));
  ASSERT_GE(io, 0);
  m->DropZeroPages(Addrs(z, 0, 2), res);
  EXPECT_NE(res[0], MergeResult::kMerged);
  EXPECT_TRUE(Present(z.page(0)));
  EndPinnedIo(io);
  m->DropZeroPages(Addrs(z, 0, 2), res);
  EXPECT_EQ(res[0], MergeResult::kMerged);
  EXPECT_FALSE(Present(z.page(0)));
  EXPECT_GT(m->Stats().pinned_io_skips, skips);
}

TEST_P(LinuxMemoryTest, RunsOfConsecutiveFramesUseOneMapping) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "counts the process's mappings; the sanitizer's allocator "
                  "maps memory meanwhile";
#endif
  constexpr std::size_t kN = 1000;
  auto m = NewMemory();
  Region a(kN), b(kN), c(kN);
  for (std::size_t i = 0; i < kN; ++i) {
    Fill(a.page(i), static_cast<unsigned>(i));
    Fill(b.page(i), static_cast<unsigned>(i));
    Fill(c.page(i), static_cast<unsigned>(i));
  }
  Rescan(*m);
  long before = Maps();
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(Addrs(a, 0, kN), Addrs(b, 0, kN), frames, res);
  for (std::size_t i = 0; i < kN; ++i) {
    ASSERT_EQ(res[i], MergeResult::kMerged) << i;
    ASSERT_EQ(frames[i], frames[0] + i);
  }
  long after_pairs = Maps();
  m->MergeIntoFrames(Addrs(c, 0, kN), frames, res);
  for (std::size_t i = 0; i < kN; ++i) ASSERT_EQ(res[i], MergeResult::kMerged);
  long after = Maps();
  // Each region becomes one memfd mapping (windows of 128 pages are joined
  // by the kernel): a few VMAs, not thousands.
  EXPECT_LE(after_pairs - before, 4);
  EXPECT_LE(after - before, 6);
  std::printf("VMAs: before %ld, after pairs %ld, after frames %ld\n", before,
              after_pairs, after);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; i += 97) {
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(c.page(i), expect));
  }
}

// Pairs merge in windows of up to 512 pairs, copied into their frames
// through the scratch area a part at a time: no more than 1 MiB of it stays
// resident afterwards.
// The scratch area is populated ahead of the copy, as far as a window
// needs it: a few pairs make only their own pages of it resident.
TEST_P(LinuxMemoryTest, PairWindowsKeepAtMostOneMiBOfScratchResident) {
  auto m = NewMemory();
  constexpr std::size_t kN = 2048;
  constexpr std::size_t kFew = 10;
  Region a(kN), b(kN);
  FillAlike(a, b);
  Rescan(*m);
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(Addrs(a, 0, kFew), Addrs(b, 0, kFew),
                std::span(frames).first(kFew), std::span(res).first(kFew));
  for (std::size_t i = 0; i < kFew; ++i)
    ASSERT_EQ(res[i], MergeResult::kMerged) << i;
  EXPECT_GT(m->ScratchResidentPages(), 0u);
  EXPECT_LE(m->ScratchResidentPages(), kFew);
  m->MergePairs(Addrs(a, kFew, kN - kFew), Addrs(b, kFew, kN - kFew),
                std::span(frames).subspan(kFew), std::span(res).subspan(kFew));
  for (std::size_t i = 0; i < kN; ++i)
    ASSERT_EQ(res[i], MergeResult::kMerged) << i;
  const std::size_t resident = m->ScratchResidentPages();
  EXPECT_GT(resident, 0u);  // the copies went through it
  EXPECT_LE(resident, 256u);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; i += 97) {
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(a.page(i), expect) && Same(b.page(i), expect)) << i;
  }
}

TEST_P(LinuxMemoryTest, DropZeroPagesFreesVerifiedZeroPagesOnly) {
  auto m = NewMemory();
  Region r(4);
  std::memset(r.page(0), 0, 4 * kPageSize);  // present, all zero
  r.page(2)[17] = 1;                         // not zero
  Rescan(*m);
  ASSERT_TRUE(Present(r.page(0)));
  std::vector<MergeResult> res(4);
  m->DropZeroPages(Addrs(r, 0, 4), res);
  EXPECT_EQ(res[0], MergeResult::kMerged);
  EXPECT_EQ(res[1], MergeResult::kMerged);
  EXPECT_EQ(res[2], MergeResult::kDiffers);
  EXPECT_EQ(res[3], MergeResult::kMerged);
  EXPECT_FALSE(Present(r.page(0)));
  EXPECT_FALSE(Present(r.page(1)));
  EXPECT_TRUE(Present(r.page(2)));
  EXPECT_EQ(ProbeOne(*m, r.addr(0)), PageState::kAbsent);
  EXPECT_EQ(r.page(2)[17], 1);
  for (std::size_t i = 0; i < kPageSize; ++i) ASSERT_EQ(r.page(0)[i], 0);
  r.page(0)[1] = 5;  // writable again
  EXPECT_EQ(r.page(0)[1], 5);
  r.page(2)[0] = 5;
  EXPECT_EQ(r.page(2)[0], 5);
}

// Zero pages scattered among others are dropped under one window over
// their span; the pages between them are protected for a moment and left
// as they were.
TEST_P(LinuxMemoryTest, DropZeroPagesDropsScatteredPagesAndLeavesTheRest) {
  auto m = NewMemory();
  Region r(64);
  std::vector<Addr> zeros;
  for (std::size_t i = 0; i < 64; ++i) {
    if (i % 3 == 0) {
      std::memset(r.page(i), 0, kPageSize);
      zeros.push_back(r.addr(i));
    } else {
      Fill(r.page(i), static_cast<unsigned>(i));
    }
  }
  std::memset(r.page(30), 0, kPageSize);  // zero, but not asked for
  Rescan(*m);
  std::vector<MergeResult> res(zeros.size());
  m->DropZeroPages(zeros, res);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < 64; ++i) {
    SCOPED_TRACE(i);
    if (i % 3 == 0) {
      EXPECT_EQ(res[i / 3], MergeResult::kMerged);
      EXPECT_FALSE(Present(r.page(i)));
      for (std::size_t b = 0; b < kPageSize; b += 512) ASSERT_EQ(r.page(i)[b], 0);
    } else {
      EXPECT_TRUE(Present(r.page(i)));
      if (i != 30) {
        Fill(expect, static_cast<unsigned>(i));
        EXPECT_TRUE(Same(r.page(i), expect));
      }
    }
    r.page(i)[1] = 1;  // all writable
    EXPECT_EQ(r.page(i)[1], 1);
  }
}

// Windows of scattered zero pages span up to a page table; pages asked
// for in descending order (or across tables) still get their own results,
// and the pages between are left as they were.
TEST_P(LinuxMemoryTest, DropZeroPagesTakesScatteredPagesInAnyOrder) {
  auto m = NewMemory();
  constexpr std::size_t kN = 1200;  // at least two page tables
  Region r(kN);
  std::vector<Addr> asked;
  for (std::size_t i = 0; i < kN; ++i) {
    if (i % 5 == 0) {
      std::memset(r.page(i), 0, kPageSize);
    } else {
      Fill(r.page(i), static_cast<unsigned>(i));
    }
    if (i % 5 == 0 || i % 101 == 1)
      asked.push_back(r.addr(i));  // some not zero
  }
  std::reverse(asked.begin(), asked.end());
  Rescan(*m);
  std::vector<MergeResult> res(asked.size());
  m->DropZeroPages(asked, res);
  for (std::size_t k = 0; k < asked.size(); ++k) {
    const std::size_t i = (asked[k] - r.addr(0)) / kPageSize;
    SCOPED_TRACE(i);
    EXPECT_EQ(res[k],
              i % 5 == 0 ? MergeResult::kMerged : MergeResult::kDiffers);
  }
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    SCOPED_TRACE(i);
    if (i % 5 == 0) {
      EXPECT_FALSE(Present(r.page(i)));
      for (std::size_t b = 0; b < kPageSize; b += 512)
        ASSERT_EQ(r.page(i)[b], 0);
    } else {
      Fill(expect, static_cast<unsigned>(i));
      EXPECT_TRUE(Same(r.page(i), expect));
    }
    r.page(i)[1] = 1;  // all writable
    ASSERT_EQ(r.page(i)[1], 1);
  }
}

TEST_P(LinuxMemoryTest, DropZeroPagesMapsTheZeroFrameOverAMergedPagesPrivateCopy) {
  // A zero page that is a private copy inside a memfd mapping must not be
  // MADV_DONTNEED'ed: that would bring back the frame's bytes. It maps the
  // zero frame (never written) instead, and its copy is freed.
  auto m = NewMemory();
  Region a(1), b(1);
  Fill(a.page(0), 7);
  Fill(b.page(0), 7);
  Rescan(*m);
  FrameId f;
  MergeResult r;
  m->MergePairs(std::span<const Addr>(std::vector<Addr>{a.addr(0)}),
                std::span<const Addr>(std::vector<Addr>{b.addr(0)}),
                std::span<FrameId>(&f, 1), std::span<MergeResult>(&r, 1));
  ASSERT_EQ(r, MergeResult::kMerged);
  std::memset(a.page(0), 0, kPageSize);  // COW copy, all zero
  ASSERT_TRUE(Present(a.page(0)));
  Addr pa = a.addr(0);
  m->DropZeroPages(std::span<const Addr>(&pa, 1),
                   std::span<MergeResult>(&r, 1));
  EXPECT_EQ(r, MergeResult::kMerged);
  EXPECT_FALSE(PrivateCopy(a.page(0)));  // the copy is freed
  for (std::size_t i = 0; i < kPageSize; ++i) ASSERT_EQ(a.page(0)[i], 0);
  EXPECT_EQ(m->Stats().frames_in_use, 2u);  // b's and the zero frame
  unsigned char expect[kPageSize];
  Fill(expect, 7);
  EXPECT_TRUE(Same(b.page(0), expect));  // the frame is b's still
  a.page(0)[3] = 1;  // ordinary memory again
  EXPECT_EQ(a.page(0)[3], 1);
  EXPECT_TRUE(Same(b.page(0), expect));
  // A full scan registers and protects it like any memory.
  Rescan(*m);
  std::memset(a.page(0), 0, kPageSize);
  m->DropZeroPages(std::span<const Addr>(&pa, 1),
                   std::span<MergeResult>(&r, 1));
  EXPECT_EQ(r, MergeResult::kMerged);
  // Freed again (the zero frame, which the read above gave a page of the
  // memfd, may be mapped in its place: a lone page's mapping is).
  EXPECT_FALSE(PrivateCopy(a.page(0)));
  for (std::size_t i = 0; i < kPageSize; ++i) ASSERT_EQ(a.page(0)[i], 0);
}

// A page given back as anonymous memory next to a range given back before
// leaves that range registered with userfaultfd. The kernel joins the moved
// copy with such a neighbour when they look alike (both come from the
// scratch area, at consecutive offsets) and then drops the joined VMA's
// registration (mremap without UFFD_FEATURE_EVENT_REMAP) but not its pages'
// write-protect bits: a neighbour inside an open window would stay
// write-protected for good, and its next writer would wait forever.
TEST_P(LinuxMemoryTest, RestoringNextToARestoredRangeKeepsItRegistered) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "userfaultfd registration only";
  auto m = NewMemory();
  Region a(2), b(2);
  FillAlike(a, b);
  Rescan(*m);
  ASSERT_NE(VmFlagsAt(a.addr(1)).find("uw"), std::string::npos);
  std::vector<FrameId> frames(2);
  std::vector<MergeResult> res(2);
  m->MergePairs(Addrs(a, 0, 2), Addrs(b, 0, 2), frames, res);
  ASSERT_EQ(res[0], MergeResult::kMerged);
  ASSERT_EQ(res[1], MergeResult::kMerged);
  ASSERT_TRUE(m->Unmerge(a.addr(0), 2));  // both pages, from the scratch area
  // Page 0 alone: merged again, then given back.
  MergeResult r;
  Addr p = a.addr(0);
  m->MergeIntoFrames(std::span<const Addr>(&p, 1),
                     std::span<const FrameId>(&frames[0], 1),
                     std::span<MergeResult>(&r, 1));
  ASSERT_EQ(r, MergeResult::kMerged);
  ASSERT_TRUE(m->Unmerge(a.addr(0), 1));
  EXPECT_NE(VmFlagsAt(a.addr(1)).find("uw"), std::string::npos)
      << VmFlagsAt(a.addr(1));
  EXPECT_NE(VmFlagsAt(a.addr(0)).find("uw"), std::string::npos)
      << VmFlagsAt(a.addr(0));
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < 2; ++i) {
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
    a.page(i)[0] ^= 1;  // writable
  }
  ASSERT_TRUE(m->Unmerge(b.addr(0), 2));
  for (FrameId fr : frames) m->ReleaseFrame(fr);
}

// Where a maps read starts, the moved mapping the next test's read misses.
Addr g_torn_read_misses = 0;
bool TornReadMisses(const MapEntry& e) { return e.start == g_torn_read_misses; }

// Frames released while a mapping moved unseen may map them are held until
// a maps read shows which do. /proc/self/maps is not one snapshot: a
// mapping moved while it is read may show nowhere. Such a read (simulated:
// its search for stray mappings skips the moved one) must not free the
// frames under it: a second read confirms before any is freed. Without
// it the moved pages read zeros.
TEST_P(LinuxMemoryTest, FramesOfAMovedMappingATornMapsReadMissedAreKept) {
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.stray_walk_misses = TornReadMisses;
  std::unique_ptr<LinuxMemory> m;
  ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
  constexpr std::size_t kPages = 8;
  Region a(kPages), b(kPages);
  const std::vector<FrameId> frames = MergeAlike(*m, a, b);
  ASSERT_FALSE(HasFailure());
  // b moves away unseen (library mode sees no mremap).
  void* dst = mmap(nullptr, kPages * kPageSize, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(dst, MAP_FAILED);
  ASSERT_EQ(mremap(b.page(0), kPages * kPageSize, kPages * kPageSize,
                   MREMAP_MAYMOVE | MREMAP_FIXED, dst),
            dst);
  b.Forget();
  const auto* moved = static_cast<const unsigned char*>(dst);
  // As the core does: b's pages found gone, a's unmerged, the frames then
  // released (held).
  m->NoteUnseenUnmap();
  ASSERT_TRUE(m->Unmerge(a.addr(0), kPages));
  for (FrameId f : frames) m->ReleaseFrame(f);
  g_torn_read_misses = reinterpret_cast<Addr>(dst);
  m->FlushReleasedFrames();  // a maps read, torn
  g_torn_read_misses = 0;
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kPages; ++i) {
    Fill(expect, static_cast<unsigned>(i));
    ASSERT_TRUE(Same(moved + i * kPageSize, expect)) << i;
  }
  EXPECT_EQ(m->Stats().frames_in_use, kPages);
  // Once it is gone, the next read frees them.
  ASSERT_EQ(munmap(dst, kPages * kPageSize), 0);
  ASSERT_TRUE(m->RefreshMaps().ok());
  m->FlushReleasedFrames();
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

TEST_P(LinuxMemoryTest, UnmergeRestoresAnonymousSemantics) {
  auto m = NewMemory();
  Region a(8), b(8);
  const std::vector<FrameId> frames = MergeAlike(*m, a, b);
  ASSERT_FALSE(HasFailure());
  a.page(2)[0] ^= 1;  // one page copied away already

  // While merged, MADV_DONTNEED brings back the frame, not zeros (the
  // documented difference from anonymous memory).
  madvise(b.page(5), kPageSize, MADV_DONTNEED);
  unsigned char expect[kPageSize];
  Fill(expect, 5);
  EXPECT_TRUE(Same(b.page(5), expect));

  ASSERT_TRUE(m->Unmerge(a.addr(0), 8));
  ASSERT_TRUE(m->Unmerge(b.addr(0), 8));
  for (int i = 0; i < 8; ++i) {
    Fill(expect, i);
    if (i == 2) expect[0] ^= 1;
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
    Fill(expect, i);
    EXPECT_TRUE(Same(b.page(i), expect)) << i;
    EXPECT_EQ(ProbeOne(*m, a.addr(i)), PageState::kAnon);
  }
  // No memfd mapping left in the range.
  std::vector<MapEntry> maps;
  ASSERT_TRUE(ReadMaps("/proc/self/maps", &maps).ok());
  for (const auto& e : maps) {
    if (e.end > a.addr(0) && e.start < a.addr(0) + 8 * kPageSize) {
      EXPECT_EQ(e.inode, 0u) << e.path;
    }
  }
  // Anonymous again: MADV_DONTNEED reads zeros.
  ASSERT_EQ(madvise(a.page(0), 8 * kPageSize, MADV_DONTNEED), 0);
  for (int i = 0; i < 8; ++i)
    for (std::size_t k = 0; k < kPageSize; k += 64) ASSERT_EQ(a.page(i)[k], 0);
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

// Unmerge's replacements in the tests below: those g_fail_unmerge_len long
// (kFailAll: every one) fail, as a copy or mremap the kernel refused.
constexpr std::size_t kFailAll = std::numeric_limits<std::size_t>::max();
std::size_t g_fail_unmerge_len = 0;
std::size_t g_unmerge_calls = 0;
int FailUnmergeOfLen(Addr, std::size_t len) {
  ++g_unmerge_calls;
  return g_fail_unmerge_len == kFailAll || len == g_fail_unmerge_len ? ENOMEM
                                                                     : 0;
}

struct ScatteredMerge {
  static constexpr std::size_t kN = 64;
  static std::size_t Slot(std::size_t i) { return (i * 37) % kN; }
  std::unique_ptr<LinuxMemory> m;
  Region a{kN}, b{kN};
  std::vector<FrameId> frames = std::vector<FrameId>(kN);

  // b holds a's pages in another order, merged pair by pair: b maps its
  // frames in many small mappings. Unmerge's replacements go through
  // FailUnmergeOfLen.
  void Merge(const MemoryConfig& config) {
    LinuxMemoryOptions o;
    config.ApplyTo(&o);
    o.fail_unmerge_copy = FailUnmergeOfLen;
    g_fail_unmerge_len = 0;
    ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
    FillShuffled(a, b, kN, Slot);
    Rescan(*m);
    std::vector<Addr> q;
    for (std::size_t i = 0; i < kN; ++i) q.push_back(b.addr(Slot(i)));
    std::vector<MergeResult> res(kN);
    m->MergePairs(Addrs(a, 0, kN), q, frames, res);
    for (std::size_t i = 0; i < kN; ++i)
      ASSERT_EQ(res[i], MergeResult::kMerged) << i;
  }
  std::size_t VmasInB() const { return VmasIn(b.addr(0), kN); }
  // A write to b's copy of page i: copied away before any unmerge.
  void CopyAway(std::size_t i) {
    b.page(Slot(i))[7] ^= 1;
    copied = i;
  }
  std::size_t copied = kN;  // none
  // a's pages, the frames' other sharers, hold the frames' bytes; b's hold
  // them too (the one copied away its write), and take a write.
  void ExpectIntactAndWritable(PageState state) {
    unsigned char expect[kPageSize];
    for (std::size_t i = 0; i < kN; ++i) {
      Fill(expect, static_cast<unsigned>(i));
      EXPECT_TRUE(Same(a.page(i), expect)) << i;
      if (i == copied) expect[7] ^= 1;
      EXPECT_TRUE(Same(b.page(Slot(i)), expect)) << i;
      EXPECT_EQ(ProbeOne(*m, b.addr(Slot(i))),
                i == copied ? PageState::kAnon : state)
          << i;
      b.page(Slot(i))[0] ^= 1;
      expect[0] ^= 1;
      EXPECT_TRUE(Same(b.page(Slot(i)), expect)) << i;
    }
  }
  // After an unmerge: anonymous memory again (MADV_DONTNEED reads zeros).
  void ExpectAnonymousAndWritable() {
    ExpectIntactAndWritable(PageState::kAnon);
    ASSERT_EQ(madvise(b.page(0), kN * kPageSize, MADV_DONTNEED), 0);
    for (std::size_t i = 0; i < kN; ++i)
      for (std::size_t k = 0; k < kPageSize; k += 64)
        ASSERT_EQ(b.page(i)[k], 0) << i;
  }
  void Release() {
    g_fail_unmerge_len = 0;
    ASSERT_TRUE(m->Unmerge(a.addr(0), kN));
    for (FrameId f : frames) m->ReleaseFrame(f);
    EXPECT_EQ(m->Stats().frames_in_use, 0u);
  }
};

// Pages that map their frames one VMA each (their partners were merged in
// another order) are given back together: the range ends as one anonymous
// VMA, with every page's bytes, writable, and anonymous (MADV_DONTNEED
// reads zeros).
TEST_P(LinuxMemoryTest, UnmergeGivesAdjacentOnePageMappingsBackAsOne) {
  ScatteredMerge t;
  ASSERT_NO_FATAL_FAILURE(t.Merge(GetParam()));
  ASSERT_GE(t.VmasInB(), ScatteredMerge::kN / 2);  // a mapping per page, nearly
  t.CopyAway(3);
  ASSERT_TRUE(t.m->Unmerge(t.b.addr(0), ScatteredMerge::kN));
  EXPECT_EQ(t.VmasInB(), 1u);
  t.ExpectAnonymousAndWritable();
  t.Release();
}

// If the replacement of a chunk made of several mappings fails, each
// mapping of the chunk is given back on its own, with the same result for
// its pages.
TEST_P(LinuxMemoryTest, UnmergeOfAFailedChunkGoesAMappingAtATime) {
  ScatteredMerge t;
  ASSERT_NO_FATAL_FAILURE(t.Merge(GetParam()));
  const std::size_t mappings = t.VmasInB();
  ASSERT_GE(mappings, ScatteredMerge::kN / 2);
  t.CopyAway(5);
  g_unmerge_calls = 0;
  g_fail_unmerge_len = ScatteredMerge::kN * kPageSize;  // the whole chunk
  ASSERT_TRUE(t.m->Unmerge(t.b.addr(0), ScatteredMerge::kN));
  EXPECT_EQ(g_unmerge_calls, 1 + mappings);  // the chunk, then each mapping
  EXPECT_EQ(t.VmasInB(), mappings);          // each given back on its own
  t.ExpectAnonymousAndWritable();
  t.Release();
}

// When no replacement succeeds, Unmerge reports it and the pages stay as
// they were: mapped to their frames, their bytes intact, writable (a write
// copies the page, as after a merge), and the frames still shared.
TEST_P(LinuxMemoryTest, UnmergeThatCannotReplaceLeavesPagesMappedAndWritable) {
  ScatteredMerge t;
  ASSERT_NO_FATAL_FAILURE(t.Merge(GetParam()));
  const std::size_t mappings = t.VmasInB();
  g_unmerge_calls = 0;
  g_fail_unmerge_len = kFailAll;
  EXPECT_FALSE(t.m->Unmerge(t.b.addr(0), ScatteredMerge::kN));
  EXPECT_EQ(g_unmerge_calls, 1 + mappings);
  EXPECT_EQ(t.VmasInB(), mappings);
  EXPECT_EQ(t.m->Stats().frames_in_use, ScatteredMerge::kN);
  t.ExpectIntactAndWritable(PageState::kFrame);  // each write copies its page
  // A later Unmerge that can replace gives them back.
  g_fail_unmerge_len = 0;
  EXPECT_TRUE(t.m->Unmerge(t.b.addr(0), ScatteredMerge::kN));
  t.Release();
}

// Scattered pairs join their frames in address order (userfaultfd, kernel
// faults waiting): p's run is copied into consecutive frames and mapped as
// one piece, and the partners, dense in their region, are discarded and
// mapped in a discard-first window instead of a TLB flush a mapping each.
TEST_P(LinuxMemoryTest, ScatteredPairsJoinTheirFramesInDiscardFirstWindows) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "discard-first windows are userfaultfd's";
  ScatteredMerge t;
  ASSERT_NO_FATAL_FAILURE(t.Merge(GetParam()));
  if (!t.m->SyscallWritesWait())
    GTEST_SKIP() << "a user-mode-only userfaultfd: no discard-first windows";
  EXPECT_GE(t.m->Stats().discard_first_pages, ScatteredMerge::kN);
  for (std::size_t i = 0; i < ScatteredMerge::kN; ++i)
    EXPECT_EQ(t.frames[i], t.frames[0] + i) << i;
  EXPECT_EQ(VmasIn(t.a.addr(0), ScatteredMerge::kN), 1u);
  EXPECT_EQ(t.m->Stats().frames_in_use, ScatteredMerge::kN);
  t.ExpectIntactAndWritable(PageState::kFrame);
  t.Release();
}

// Pairs at random within one region: neighbours in memory take
// neighbouring frames whichever side of their pairs they are, so that the
// region takes about one mapping a pair, where frames in the order of the
// lower pages would take a third more. Every page keeps its bytes and
// takes a write.
// A frame mapped over a page alone (a VMA of its own) is in the page table
// at once, with its anon_vma: no fault at its first read, and its first
// write costs kernel KSM's copy-on-write (docs/performance.md). Pages of
// longer mappings fault in as before. The bytes are the frame's either way.
TEST_P(LinuxMemoryTest, LonePageMappingsAreMappedAtOnce) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "UFFDIO_CONTINUE needs our userfaultfd registration";
  for (const bool map_lone : {true, false}) {
    SCOPED_TRACE(map_lone ? "map_lone_pages" : "without");
    LinuxMemoryOptions o;
    g_config.ApplyTo(&o);
    o.map_lone_pages = map_lone;
    std::unique_ptr<LinuxMemory> m;
    ASSERT_TRUE(LinuxMemory::Create(o, &m).ok());
    // Runs of 8 pairs in order (their pages map in runs), and 64 pairs
    // whose second pages lie in reverse order (a mapping each).
    constexpr std::size_t kRun = 8, kLone = 64;
    Region a(kRun + kLone), b(kRun + kLone);
    FillShuffled(a, b, kRun + kLone, [&](std::size_t i) {
      return i < kRun ? i : kRun + kLone - 1 - (i - kRun);
    });
    Rescan(*m);
    std::vector<Addr> p, q;
    for (std::size_t i = 0; i < kRun + kLone; ++i) {
      p.push_back(a.addr(i));
      q.push_back(b.addr(i < kRun ? i : kRun + kLone - 1 - (i - kRun)));
    }
    std::vector<FrameId> frames(p.size());
    std::vector<MergeResult> res(p.size());
    m->MergePairs(p, q, frames, res);
    for (std::size_t i = 0; i < p.size(); ++i)
      ASSERT_EQ(res[i], MergeResult::kMerged) << i;
    // Before any access: which pages of each mapping are in the page table.
    std::vector<MapEntry> maps;
    ASSERT_TRUE(ReadMaps("/proc/self/maps", &maps).ok());
    std::size_t lone = 0, lone_present = 0, run_present = 0, run_pages = 0;
    for (const auto& e : maps) {
      for (const Region* r : {&a, &b}) {
        if (e.end <= r->addr(0) ||
            e.start >= r->addr(0) + r->pages() * kPageSize)
          continue;
        const bool alone = e.size() == kPageSize;
        for (Addr x = e.start; x < e.end; x += kPageSize) {
          const bool present = Present(reinterpret_cast<const void*>(x));
          if (alone) {
            ++lone;
            lone_present += present;
          } else {
            ++run_pages;
            run_present += present;
          }
        }
      }
    }
    EXPECT_GE(lone, kLone) << "the layout has lone pages to map";
    EXPECT_EQ(lone_present, map_lone ? lone : 0u);
    EXPECT_EQ(run_present, 0u) << "of " << run_pages;
    unsigned char expect[kPageSize];
    for (std::size_t i = 0; i < p.size(); ++i) {
      Fill(expect, static_cast<unsigned>(i));
      EXPECT_TRUE(Same(reinterpret_cast<const void*>(p[i]), expect)) << i;
      EXPECT_TRUE(Same(reinterpret_cast<const void*>(q[i]), expect)) << i;
      reinterpret_cast<unsigned char*>(q[i])[9] ^= 1;  // copied away alone
      EXPECT_TRUE(Same(reinterpret_cast<const void*>(p[i]), expect)) << i;
    }
    ASSERT_TRUE(m->Unmerge(a.addr(0), a.pages()));
    ASSERT_TRUE(m->Unmerge(b.addr(0), b.pages()));
  }
}

// MergePairsExpecting (pairs neither of whose pages the scan read): a pair
// merges only if its content still has the hash it is expected to, in runs
// (checked in the compare loop) and scattered (p read first); a pair whose
// content changed since is left as it was, intact and writable.
TEST_P(LinuxMemoryTest, PairsExpectedUnchangedMergeOnlyIfTheyAre) {
  auto m = NewMemory();
  Region r(48);
  // Pairs in a run: pages 0-7 with 16-23. Scattered: 30 with 41, 33 with
  // 38, 35 with 44, 36 with 47.
  std::vector<Addr> p, q;
  for (std::size_t i = 0; i < 8; ++i) {
    p.push_back(r.addr(i));
    q.push_back(r.addr(16 + i));
  }
  const std::pair<std::size_t, std::size_t> scattered[] = {
      {30, 41}, {33, 38}, {35, 44}, {36, 47}};
  for (auto [a, b] : scattered) {
    p.push_back(r.addr(a));
    q.push_back(r.addr(b));
  }
  const std::size_t n = p.size();
  std::vector<std::uint64_t> expected(n);
  for (std::size_t i = 0; i < n; ++i) {
    auto* a = reinterpret_cast<unsigned char*>(p[i]);
    auto* b = reinterpret_cast<unsigned char*>(q[i]);
    Fill(a, 100 + static_cast<unsigned>(i));
    Fill(b, 100 + static_cast<unsigned>(i));
    // Every third pair expected to hold other content (it changed since
    // its last visit: pairs 0 and 3 in the run, 9 scattered), one in five
    // expecting nothing.
    expected[i] = i % 5 == 1 ? 0 : HashPage(a) + (i % 3 == 0 ? 1 : 0);
  }
  Rescan(*m);
  std::vector<FrameId> frames(n);
  std::vector<MergeResult> res(n);
  m->MergePairsExpecting(p, q, frames, res, expected);
  unsigned char want[kPageSize];
  for (std::size_t i = 0; i < n; ++i) {
    Fill(want, 100 + static_cast<unsigned>(i));
    const bool changed = i % 5 != 1 && i % 3 == 0;
    EXPECT_EQ(res[i], changed ? MergeResult::kDiffers : MergeResult::kMerged)
        << i;
    for (Addr a : {p[i], q[i]}) {
      auto* page = reinterpret_cast<unsigned char*>(a);
      EXPECT_TRUE(Same(page, want)) << i;
      EXPECT_EQ(ProbeOne(*m, a) == PageState::kFrame, !changed) << i;
    }
    if (changed) {
      auto* page = reinterpret_cast<unsigned char*>(p[i]);
      page[5] ^= 0xff;  // writable, and only its own copy changes
      EXPECT_FALSE(Same(page, want)) << i;
      EXPECT_TRUE(Same(reinterpret_cast<unsigned char*>(q[i]), want)) << i;
    }
  }
}

TEST_P(LinuxMemoryTest, RandomPairsTakeAboutOneMappingAPair) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "pairs are laid out so in discard-first windows only";
  constexpr std::size_t kPairs = 256;
  auto m = NewMemory();
  if (!m->SyscallWritesWait())
    GTEST_SKIP() << "a user-mode-only userfaultfd: no discard-first windows";
  Region r(2 * kPairs);
  std::vector<std::size_t> slots(2 * kPairs);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(11));
  std::vector<std::pair<std::size_t, std::size_t>> pairs;
  for (std::size_t i = 0; i < kPairs; ++i) {
    pairs.emplace_back(std::min(slots[2 * i], slots[2 * i + 1]),
                       std::max(slots[2 * i], slots[2 * i + 1]));
  }
  std::sort(pairs.begin(), pairs.end());
  std::vector<Addr> p, q;
  for (std::size_t i = 0; i < kPairs; ++i) {
    Fill(r.page(pairs[i].first), static_cast<unsigned>(i));
    Fill(r.page(pairs[i].second), static_cast<unsigned>(i));
    p.push_back(r.addr(pairs[i].first));
    q.push_back(r.addr(pairs[i].second));
  }
  Rescan(*m);
  std::vector<FrameId> frames(kPairs);
  std::vector<MergeResult> res(kPairs);
  m->MergePairs(p, q, frames, res);
  for (std::size_t i = 0; i < kPairs; ++i)
    ASSERT_EQ(res[i], MergeResult::kMerged) << i;
  EXPECT_LE(VmasIn(r.addr(0), 2 * kPairs), kPairs * 105 / 100);
  EXPECT_EQ(m->Stats().frames_in_use, kPairs);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kPairs; ++i) {
    Fill(expect, static_cast<unsigned>(i));
    for (std::size_t page : {pairs[i].first, pairs[i].second}) {
      EXPECT_TRUE(Same(r.page(page), expect)) << page;
      EXPECT_EQ(ProbeOne(*m, r.addr(page)), PageState::kFrame) << page;
    }
    r.page(pairs[i].second)[9] ^= 1;  // copied away, its partner intact
    EXPECT_TRUE(Same(r.page(pairs[i].first), expect)) << pairs[i].first;
    expect[9] ^= 1;
    EXPECT_TRUE(Same(r.page(pairs[i].second), expect)) << pairs[i].second;
  }
  ASSERT_TRUE(m->Unmerge(r.addr(0), 2 * kPairs));
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

// A discard-first window may span pages that map frames already (merged
// earlier, one mapping each): those are only protected for the moment.
// Here every other page maps a frame, one of them written since (its own
// copy); the pages between join frames in another order, all in one
// window. Every page keeps its bytes, the written copy included.
TEST_P(LinuxMemoryTest, DiscardFirstWindowsSpanMappingsOfFramesBetween) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "discard-first windows are userfaultfd's";
  constexpr std::size_t kHalf = 32;
  auto m = NewMemory();
  if (!m->SyscallWritesWait())
    GTEST_SKIP() << "a user-mode-only userfaultfd: no discard-first windows";
  // Frames: k < kHalf hold Fill(k), the joiners' bytes; kHalf + k hold
  // Fill(1000 + k), the bytes of r's even page 2k.
  Region a(2 * kHalf), b(2 * kHalf), r(2 * kHalf);
  auto slot = [](std::size_t k) { return (k * 7) % kHalf; };
  for (std::size_t k = 0; k < kHalf; ++k) {
    for (const Region* x : {&a, &b}) {
      Fill(x->page(k), static_cast<unsigned>(k));
      Fill(x->page(kHalf + k), static_cast<unsigned>(1000 + k));
    }
    Fill(r.page(2 * k), static_cast<unsigned>(1000 + k));
    Fill(r.page(2 * k + 1), static_cast<unsigned>(slot(k)));
  }
  Rescan(*m);
  std::vector<FrameId> frames(2 * kHalf);
  std::vector<MergeResult> res(2 * kHalf);
  m->MergePairs(Addrs(a, 0, 2 * kHalf), Addrs(b, 0, 2 * kHalf), frames, res);
  for (std::size_t k = 0; k < 2 * kHalf; ++k)
    ASSERT_EQ(res[k], MergeResult::kMerged) << k;
  std::vector<Addr> even, odd;
  std::vector<FrameId> even_frames, odd_frames;
  for (std::size_t k = 0; k < kHalf; ++k) {
    even.push_back(r.addr(2 * k));
    even_frames.push_back(frames[kHalf + k]);
    odd.push_back(r.addr(2 * k + 1));
    odd_frames.push_back(frames[slot(k)]);
  }
  std::vector<MergeResult> into(kHalf);
  m->MergeIntoFrames(even, even_frames, into);
  for (std::size_t k = 0; k < kHalf; ++k)
    ASSERT_EQ(into[k], MergeResult::kMerged) << k;
  r.page(2 * 3)[5] ^= 0xff;  // page 6 has its own copy now
  const std::uint64_t before = m->Stats().discard_first_pages;
  m->MergeIntoFrames(odd, odd_frames, into);
  for (std::size_t k = 0; k < kHalf; ++k)
    EXPECT_EQ(into[k], MergeResult::kMerged) << k;
  EXPECT_EQ(m->Stats().discard_first_pages - before, kHalf);
  unsigned char expect[kPageSize];
  for (std::size_t k = 0; k < kHalf; ++k) {
    Fill(expect, static_cast<unsigned>(1000 + k));
    if (k == 3) expect[5] ^= 0xff;
    EXPECT_TRUE(Same(r.page(2 * k), expect)) << 2 * k;
    EXPECT_EQ(ProbeOne(*m, r.addr(2 * k)),
              k == 3 ? PageState::kAnon : PageState::kFrame)
        << 2 * k;
    Fill(expect, static_cast<unsigned>(slot(k)));
    EXPECT_TRUE(Same(r.page(2 * k + 1), expect)) << 2 * k + 1;
    EXPECT_EQ(ProbeOne(*m, r.addr(2 * k + 1)), PageState::kFrame) << 2 * k + 1;
  }
  // Writable, each write in the writer's page only.
  for (std::size_t i = 0; i < 2 * kHalf; ++i) r.page(i)[0] ^= 1;
  Fill(expect, 0);
  EXPECT_TRUE(Same(a.page(0), expect));
  ASSERT_TRUE(m->Unmerge(r.addr(0), 2 * kHalf));
  ASSERT_TRUE(m->Unmerge(a.addr(0), 2 * kHalf));
  ASSERT_TRUE(m->Unmerge(b.addr(0), 2 * kHalf));
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

// kN scattered pairs, pair kDiffering's partner changed, merged by a
// LinuxMemory whose Unmerge replacements call `hook` first.
struct HalfJoinedPairs {
  static constexpr std::size_t kN = 32, kDiffering = 11;
  HalfJoinedPairs(const MemoryConfig& config, int (*hook)(Addr, std::size_t))
      : pairs(kN), p(pairs.p()), q(pairs.q()), frames(kN), res(kN) {
    LinuxMemoryOptions o;
    config.ApplyTo(&o);
    o.fail_unmerge_copy = hook;
    EXPECT_TRUE(LinuxMemory::Create(o, &m).ok());
    Fill(pairs.partner(kDiffering), 555);
  }
  void Merge() {
    Rescan(*m);
    m->MergePairs(p, q, frames, res);
  }
  std::unique_ptr<LinuxMemory> m;
  ScatteredPairs pairs;
  std::vector<Addr> p, q;
  std::vector<FrameId> frames;
  std::vector<MergeResult> res;
};

// A scattered pair of which one page joined its frame and the other could
// not (it differs) gives the joined page back anonymous. Where even that
// fails, the page keeps the frame: its bytes intact, writable (a write
// copies it), the frame still allocated; a later Unmerge gives it back.
TEST_P(LinuxMemoryTest,
       AHalfJoinedScatteredPairThatCannotBeUndoneKeepsItsFrame) {
  constexpr std::size_t kN = HalfJoinedPairs::kN;
  constexpr std::size_t kDiffering = HalfJoinedPairs::kDiffering;
  HalfJoinedPairs t(GetParam(), FailUnmergeOfLen);
  ASSERT_NE(t.m, nullptr);
  auto& [m, pairs, p, q, frames, res] = t;
  g_fail_unmerge_len = kFailAll;
  t.Merge();
  g_fail_unmerge_len = 0;
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(pairs.a.page(i), expect)) << i;
    EXPECT_EQ(res[i],
              i == kDiffering ? MergeResult::kDiffers : MergeResult::kMerged)
        << i;
  }
  EXPECT_EQ(frames[kDiffering], kNoFrame);
  unsigned char other[kPageSize];
  Fill(other, 555);
  EXPECT_TRUE(Same(pairs.partner(kDiffering), other));
  EXPECT_EQ(ProbeOne(*m, q[kDiffering]), PageState::kAnon);
  // The mprotect way merges a pair in one window: nothing is half joined.
  const bool half_joined = GetParam().protection == Protection::kUserfaultfd &&
                           m->SyscallWritesWait();
  EXPECT_EQ(ProbeOne(*m, p[kDiffering]),
            half_joined ? PageState::kFrame : PageState::kAnon);
  EXPECT_EQ(m->Stats().frames_in_use, kN - (half_joined ? 0 : 1));
  // Writable either way; the write stays in the writer's page.
  pairs.a.page(kDiffering)[3] ^= 1;
  Fill(expect, static_cast<unsigned>(kDiffering));
  expect[3] ^= 1;
  EXPECT_TRUE(Same(pairs.a.page(kDiffering), expect));
  EXPECT_TRUE(Same(pairs.partner(kDiffering), other));
  EXPECT_EQ(ProbeOne(*m, p[kDiffering]), PageState::kAnon);
  ASSERT_TRUE(m->Unmerge(p[0], kN));
  ASSERT_TRUE(m->Unmerge(pairs.b.addr(0), 2 * kN));
  for (std::size_t i = 0; i < kN; ++i) {
    if (frames[i] != kNoFrame) m->ReleaseFrame(frames[i]);
  }
  // The frame the half-joined page kept is not any pair's: it is the one
  // leaked, still counted.
  EXPECT_EQ(m->Stats().frames_in_use, half_joined ? 1u : 0u);
}

// Direct I/O registered (BeginPinnedIo) over a page that Unmerge or an
// undone half of a pair would replace with a copy: in the real case a read
// pinned the page after it was merged and written (a private copy, not
// protected then), and a copy in its place would miss what the device
// writes. The hook below registers it at the last moment, inside the
// replacement's window, as such a read would have been.
int g_pinned_token = kNoPinnedIo;
bool g_pin_on_replace = false;
int PinOnReplace(Addr at, std::size_t len) {
  if (g_pin_on_replace && g_pinned_token == kNoPinnedIo) {
    g_pinned_token = BeginPinnedIo(at, at + len);
  }
  return 0;
}
void EndPin() {
  EndPinnedIo(g_pinned_token);
  g_pinned_token = kNoPinnedIo;
}

TEST_P(LinuxMemoryTest, AHalfJoinedPageWithDirectIoInFlightKeepsItsFrame) {
  constexpr std::size_t kN = HalfJoinedPairs::kN;
  constexpr std::size_t kDiffering = HalfJoinedPairs::kDiffering;
  HalfJoinedPairs t(GetParam(), PinOnReplace);
  ASSERT_NE(t.m, nullptr);
  auto& [m, pairs, p, q, frames, res] = t;
  if (GetParam().protection != Protection::kUserfaultfd ||
      !m->SyscallWritesWait()) {
    GTEST_SKIP() << "the mprotect way merges a pair in one window";
  }
  g_pin_on_replace = true;
  t.Merge();
  g_pin_on_replace = false;
  const Addr pinned_at = g_pinned_token == kNoPinnedIo ? 0 : p[kDiffering];
  EndPin();
  for (std::size_t i = 0; i < kN; ++i) {
    EXPECT_EQ(res[i],
              i == kDiffering ? MergeResult::kDiffers : MergeResult::kMerged)
        << i;
  }
  ASSERT_EQ(pinned_at, p[kDiffering]) << "no replacement was tried";
  EXPECT_EQ(res[kDiffering], MergeResult::kDiffers);
  EXPECT_EQ(frames[kDiffering], kNoFrame);
  // Not replaced: the page the read pinned is the page mapped there.
  EXPECT_EQ(ProbeOne(*m, p[kDiffering]), PageState::kFrame);
  EXPECT_EQ(m->Stats().frames_in_use, kN);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(pairs.a.page(i), expect)) << i;
  }
  ASSERT_TRUE(m->Unmerge(p[0], kN));
  ASSERT_TRUE(m->Unmerge(pairs.b.addr(0), 2 * kN));
  EXPECT_EQ(ProbeOne(*m, p[kDiffering]), PageState::kAnon);
  Fill(expect, static_cast<unsigned>(kDiffering));
  EXPECT_TRUE(Same(pairs.a.page(kDiffering), expect));
  for (std::size_t i = 0; i < kN; ++i) {
    if (frames[i] != kNoFrame) m->ReleaseFrame(frames[i]);
  }
}

// Unmerge leaves a range with direct I/O in flight merged and intact (it
// fails, as for ENOMEM), and gives it back once the I/O has ended.
TEST_P(LinuxMemoryTest, UnmergeLeavesDirectIoInFlightMergedUntilItEnds) {
  auto m = NewMemory();
  Region a(8), b(8);
  const std::vector<FrameId> frames = MergeAlike(*m, a, b);
  ASSERT_FALSE(HasFailure());
  a.page(3)[7] ^= 1;  // a private copy now, as a read's buffer would be
  const int token = BeginPinnedIo(a.addr(3), a.addr(4));
  EXPECT_FALSE(m->Unmerge(a.addr(0), 8));
  const auto merged = ProbeOne(*m, a.addr(0));
  EndPinnedIo(token);
  EXPECT_EQ(merged, PageState::kFrame);
  unsigned char expect[kPageSize];
  for (int i = 0; i < 8; ++i) {
    Fill(expect, i);
    if (i == 3) expect[7] ^= 1;
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
  }
  ASSERT_TRUE(m->Unmerge(a.addr(0), 8));
  ASSERT_TRUE(m->Unmerge(b.addr(0), 8));
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(ProbeOne(*m, a.addr(i)), PageState::kAnon) << i;
    Fill(expect, i);
    if (i == 3) expect[7] ^= 1;
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
  }
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

// Every mapping of the process that has VmFlag flag, as "start-end ".
std::string AllVmasWithFlag(const char* flag) {
  std::vector<MapEntry> maps;
  if (!ReadMaps("/proc/self/smaps", &maps).ok()) return "cannot read smaps";
  std::string out;
  for (const MapEntry& e : maps) {
    if (e.HasVmFlag(flag))
      out += std::to_string(e.start) + "-" + std::to_string(e.end) + " ";
  }
  return out;
}

// Unmerging copies a chunk into the scratch area before moving it into
// place: into the part a pair window left populated with a copy, and, with
// userfaultfd, the rest by the kernel straight into fresh pages. Every page
// gets its own bytes either way, and no mapping is left registered for
// missing pages.
TEST_P(LinuxMemoryTest, UnmergeFillsTheScratchAreaPastItsPopulatedPart) {
  constexpr std::size_t kN = 600;  // one chunk, past the populated part
  auto m = NewMemory();
  Region a(kN), b(kN);
  // Fill repeats every 256 seeds: each page also holds its index.
  auto fill = [](unsigned char* page, std::size_t i) {
    Fill(page, static_cast<unsigned>(i));
    std::memcpy(page + 100, &i, sizeof(i));
  };
  for (std::size_t i = 0; i < kN; ++i) {
    fill(a.page(i), i);
    fill(b.page(i), i);
  }
  Rescan(*m);
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(Addrs(a, 0, kN), Addrs(b, 0, kN), frames, res);
  for (std::size_t i = 0; i < kN; ++i)
    ASSERT_EQ(res[i], MergeResult::kMerged) << i;
  const std::size_t populated = m->ScratchResidentPages();
  ASSERT_GT(populated, 0u);
  ASSERT_LT(populated, kN);
  a.page(7)[9] ^= 1;  // copied away before the unmerge
  ASSERT_TRUE(m->Unmerge(a.addr(0), kN));
  ASSERT_TRUE(m->Unmerge(b.addr(0), kN));  // nothing populated now
  EXPECT_EQ(m->Stats().unmerge_filled_pages,
            GetParam().protection == Protection::kUserfaultfd
                ? 2 * kN - populated
                : 0);
  EXPECT_EQ(AllVmasWithFlag("um"), "");
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    for (Region* r : {&a, &b}) {
      fill(expect, i);
      if (r == &a && i == 7) expect[9] ^= 1;
      EXPECT_TRUE(Same(r->page(i), expect)) << i;
      EXPECT_EQ(ProbeOne(*m, r->addr(i)), PageState::kAnon) << i;
      r->page(i)[0] ^= 1;  // writable
    }
  }
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

bool VmaLocked(const void* p) {
  std::vector<MapEntry> maps;
  EXPECT_TRUE(ReadMaps("/proc/self/smaps", &maps).ok());
  const auto a = reinterpret_cast<Addr>(p);
  for (const auto& e : maps) {
    if (e.start <= a && a < e.end) return e.HasVmFlag("lo");
  }
  return false;
}

// A forked child's backend takes its parent's view from the plain maps (no
// smaps read: 4-5 ms in a PostgreSQL backend), without the locks fork does
// not copy; memory advised since the parent's last smaps read makes the
// child read smaps (taken for new memory of unknown flags, it would be
// found gone and forgotten).
TEST_P(LinuxMemoryTest, AForkedChildTakesItsParentsViewButNotItsLocks) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the sanitizer's runtime makes mlock() a no-op";
#endif
  auto m = NewMemory();
  Region a(4), b(4), c(2), d(2);
  FillAlike(a, b);
  FillAlike(c, d);
  ASSERT_EQ(mlock(a.page(0), 4 * kPageSize), 0) << std::strerror(errno);
  Advise(*m, a);
  Advise(*m, b);
  m->BeginFullScan();  // smaps: a locked
  LinuxMemoryOptions o;
  g_config.ApplyTo(&o);
  o.adopted_memfds = m->MemfdLineage();
  // 0: as asked; 1-4: what went wrong.
  auto child = [&](bool advised_since) -> int {
    std::unique_ptr<LinuxMemory> c2;
    if (!LinuxMemory::CreateInChild(o, *m, &c2).ok()) return 1;
    if (c2->Stats().smaps_reads != (advised_since ? 1u : 0u)) return 2;
    if (advised_since && ProbeOne(*c2, c.addr(0)) != PageState::kAnon) return 3;
    if (!MergePair(*c2, a.addr(1), b.addr(1))) return 4;
    std::string status;
    if (!ReadProcFile("/proc/self/status", &status).ok()) return 5;
    return status.find("VmLck:\t       0 kB") != std::string::npos ? 0 : 6;
  };
  for (const bool advised_since : {false, true}) {
    if (advised_since) {
      Advise(*m, c);
      Advise(*m, d);
    }
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) _exit(child(advised_since));
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "advised since: " << advised_since << ", status " << status;
  }
  EXPECT_EQ(munlock(a.page(0), 4 * kPageSize), 0);
}

// The lock state is read with the maps, once per full scan. If the
// application locks or unlocks memory after that, a merge must not replace
// it with the old idea of its lock (a lock lost, or one made up): the
// window finds out (msync MS_INVALIDATE) and leaves the pages alone.
TEST_P(LinuxMemoryTest, MergeWithStaleViewOfTheLockLeavesPagesAlone) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the sanitizer's runtime makes mlock() a no-op";
#endif
  auto m = NewMemory();
  Region a(4), b(4);
  FillAlike(a, b);
  Rescan(*m);
  ASSERT_EQ(mlock(a.page(0), 4 * kPageSize), 0) << std::strerror(errno);
  std::vector<FrameId> frames(4);
  std::vector<MergeResult> res(4);
  m->MergePairs(Addrs(a, 0, 4), Addrs(b, 0, 4), frames, res);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(res[i], MergeResult::kFailed) << i;
    EXPECT_EQ(ProbeOne(*m, a.addr(i)), PageState::kAnon) << i;
    EXPECT_TRUE(VmaLocked(a.page(i))) << i;
  }
  // The next full scan knows: merged, and locked again.
  Rescan(*m);
  m->MergePairs(Addrs(a, 0, 4), Addrs(b, 0, 4), frames, res);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
    EXPECT_TRUE(VmaLocked(a.page(i))) << i;
    EXPECT_FALSE(VmaLocked(b.page(i))) << i;
  }
  ASSERT_TRUE(m->Unmerge(a.addr(0), 4));
  ASSERT_TRUE(m->Unmerge(b.addr(0), 4));
  for (FrameId f : frames) m->ReleaseFrame(f);
  // Unlocked behind the view's back: not locked again by a merge.
  ASSERT_EQ(munlock(a.page(0), 4 * kPageSize), 0);
  m->MergePairs(Addrs(a, 0, 4), Addrs(b, 0, 4), frames, res);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(res[i], MergeResult::kFailed) << i;
    EXPECT_FALSE(VmaLocked(a.page(i))) << i;
  }
  EXPECT_EQ(m->Stats().locks_lost, 0u);
}

// The same with the lock on scattered partners: each partner run's window
// asks the kernel, and every partner piece is locked again when it merges.
TEST_P(LinuxMemoryTest, ScatteredLockedPartnersAreLockedAgain) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the sanitizer's runtime makes mlock() a no-op";
#endif
  constexpr std::size_t kN = 4;
  auto m = NewMemory();
  ScatteredPairs pairs(kN);
  const Region &a = pairs.a, &b = pairs.b;
  auto partner = [&](std::size_t i) { return pairs.partner(i); };
  Rescan(*m);
  ASSERT_EQ(mlock(b.page(0), 2 * kN * kPageSize), 0) << std::strerror(errno);
  std::vector<Addr> p = pairs.p(), q = pairs.q();
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(p, q, frames, res);
  for (std::size_t i = 0; i < kN; ++i) {
    EXPECT_EQ(res[i], MergeResult::kFailed) << i;
    EXPECT_EQ(ProbeOne(*m, q[i]), PageState::kAnon) << i;
    EXPECT_TRUE(VmaLocked(partner(i))) << i;
  }
  Rescan(*m);
  m->MergePairs(p, q, frames, res);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
    EXPECT_TRUE(VmaLocked(partner(i))) << i;
    EXPECT_TRUE(VmaLocked(partner(i) + kPageSize)) << i;
    EXPECT_FALSE(VmaLocked(a.page(i))) << i;
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(partner(i), expect)) << i;
  }
  partner(1)[0] ^= 1;  // writable, and a's page keeps its bytes
  Fill(expect, 1);
  EXPECT_TRUE(Same(a.page(1), expect));
  EXPECT_EQ(m->Stats().locks_lost, 0u);
  ASSERT_TRUE(m->Unmerge(a.addr(0), kN));
  ASSERT_TRUE(m->Unmerge(b.addr(0), 2 * kN));
  for (FrameId f : frames) m->ReleaseFrame(f);
  EXPECT_EQ(m->Stats().frames_in_use, 0u);
}

TEST_P(LinuxMemoryTest, SmallVmaBudgetLeavesPagesAsTheyWere) {
  auto m = NewMemory(/*budget=*/6);
  constexpr int kN = 8;
  Region a(2 * kN), b(2 * kN);
  for (int i = 0; i < 2 * kN; ++i) {
    Fill(a.page(i), i);
    Fill(b.page(i), i);
  }
  Rescan(*m);
  // Scattered pairs (every other page): each costs VMAs.
  std::vector<Addr> p, q;
  for (int i = 0; i < kN; ++i) {
    p.push_back(a.addr(2 * i));
    q.push_back(b.addr(2 * i));
  }
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(p, q, frames, res);
  int merged = 0, skipped = 0;
  for (int i = 0; i < kN; ++i) {
    if (res[i] == MergeResult::kMerged) ++merged;
    if (res[i] == MergeResult::kNoBudget) {
      ++skipped;
      EXPECT_EQ(frames[i], kNoFrame);
      EXPECT_EQ(ProbeOne(*m, p[i]), PageState::kAnon);
      // Untouched and writable.
      unsigned char expect[kPageSize];
      Fill(expect, 2 * i);
      EXPECT_TRUE(Same(a.page(2 * i), expect));
      a.page(2 * i)[0] ^= 1;
      b.page(2 * i)[0] ^= 1;
    }
  }
  EXPECT_GE(merged, 1);
  EXPECT_GE(skipped, 1);
  MemoryStats st = m->Stats();
  EXPECT_EQ(st.vma_budget, 6u);
  EXPECT_LE(st.vmas_used, 6u);
  EXPECT_EQ(st.budget_skips, static_cast<std::uint64_t>(skipped));
}

TEST_P(LinuxMemoryTest, DerivedBudgetIsBelowMaxMapCount) {
  auto m = NewMemory();
  MemoryStats st = m->Stats();
  EXPECT_GT(st.vma_budget, 1000u);
  EXPECT_LT(st.vma_budget, 65530u);
}

// A first visit takes a page for zeros from its sampled lines (an eighth
// of it): the zero page's hash, marked as a guess. A byte in any sampled
// line makes it read in full; a byte between them does not.
TEST_P(LinuxMemoryTest, FirstVisitTakesPagesForZerosFromSampledLines) {
  auto m = NewMemory();
  constexpr std::size_t kSampled = kZeroSampleLines;
  Region r(kSampled + 4);
  std::memset(r.page(0), 0, kPageSize);  // zeros
  std::memset(r.page(1), 0, kPageSize);
  r.page(1)[100] = 3;  // between the sampled lines
  for (std::size_t l = 0; l < kSampled; ++l) {
    std::memset(r.page(2 + l), 0, kPageSize);
    r.page(2 + l)[l * kZeroSampleStride + 63] = 1;  // a line's last byte
  }
  Fill(r.page(kSampled + 2), 0x44);
  // Page kSampled + 3 never touched: it reads zeros from the zero page.
  Advise(*m, r);
  m->BeginFullScan();
  for (std::size_t i = 0; i < kSampled + 4; ++i) {
    SCOPED_TRACE(i);
    std::uint64_t h = 0;
    bool guessed = true;
    ASSERT_TRUE(m->HashFirstVisit(r.addr(i), &h, &guessed));
    const bool zeros_sampled = i <= 1 || i == kSampled + 3;
    EXPECT_EQ(guessed, zeros_sampled);
    EXPECT_EQ(h, zeros_sampled ? ZeroPageHash() : HashPage(r.page(i)));
    std::uint64_t full = 0;
    ASSERT_TRUE(m->Hash(r.addr(i), &full));
    EXPECT_EQ(full, HashPage(r.page(i)));
  }
  std::uint64_t h = 0;
  bool guessed = false;
  ASSERT_EQ(munmap(r.page(0), kPageSize), 0);
  m->BeginFullScan();
  EXPECT_FALSE(m->HashFirstVisit(r.addr(0), &h, &guessed));
}

TEST_P(LinuxMemoryTest, ProbeAndHashReportUnmappedPagesAsGone) {
  auto m = NewMemory();
  Region r(4);
  Fill(r.page(0), 1);
  Fill(r.page(1), 1);
  // Advised, as the engine does before scanning: the cache now believes r
  // is mapped.
  Advise(*m, r);
  m->BeginFullScan();
  std::vector<PageState> st(4);
  m->Probe(r.addr(0), st);
  EXPECT_EQ(st[0], PageState::kAnon);
  EXPECT_EQ(st[2], PageState::kAbsent);  // never touched
  std::uint64_t h = 0;
  ASSERT_TRUE(m->Hash(r.addr(0), &h));
  EXPECT_EQ(h, HashPage(r.page(0)));

  ASSERT_EQ(munmap(r.page(1), kPageSize), 0);
  m->Probe(r.addr(0), st);
  EXPECT_EQ(st[0], PageState::kAnon);
  EXPECT_EQ(st[1], PageState::kGone);
  EXPECT_FALSE(m->Hash(r.addr(1), &h));
  // A page made inaccessible (not in the cache's view any more after a
  // refresh) is gone too; Hash does not crash on it either way.
  ASSERT_EQ(mprotect(r.page(0), kPageSize, PROT_NONE), 0);
  EXPECT_FALSE(m->Hash(r.addr(0), &h));
  m->BeginFullScan();
  EXPECT_EQ(ProbeOne(*m, r.addr(0)), PageState::kGone);
  // Merging gone pages reports kGone and creates no mapping.
  Addr gone = r.addr(1);
  MergeResult res;
  m->DropZeroPages(std::span<const Addr>(&gone, 1),
                   std::span<MergeResult>(&res, 1));
  EXPECT_EQ(res, MergeResult::kGone);
  EXPECT_EQ(msync(r.page(1), kPageSize, MS_ASYNC), -1);
}

TEST_P(LinuxMemoryTest, MergeWithStaleViewOfUnmappedPageReportsGone) {
  auto m = NewMemory();
  // A first merge makes the frame store map its view of frames (mmap with
  // no address): made during the merge below, it could land where b was,
  // and the check below would take it for a mapping at b (1 run in 14).
  Region c(1), d(1);
  Fill(c.page(0), 4);
  Fill(d.page(0), 4);
  Rescan(*m);
  {
    Addr p = c.addr(0), q = d.addr(0);
    FrameId f;
    MergeResult r;
    m->MergePairs(std::span<const Addr>(&p, 1), std::span<const Addr>(&q, 1),
                  std::span<FrameId>(&f, 1), std::span<MergeResult>(&r, 1));
    ASSERT_EQ(r, MergeResult::kMerged);
  }
  Region a(1), b(1);
  Fill(a.page(0), 3);
  Fill(b.page(0), 3);
  Rescan(*m);  // b is in the view
  void* bp = b.page(0);
  ASSERT_EQ(munmap(bp, kPageSize), 0);
  b.Forget();
  Addr p = a.addr(0), q = reinterpret_cast<Addr>(bp);
  FrameId f;
  MergeResult r;
  m->MergePairs(std::span<const Addr>(&p, 1), std::span<const Addr>(&q, 1),
                std::span<FrameId>(&f, 1), std::span<MergeResult>(&r, 1));
  EXPECT_EQ(r, MergeResult::kGone);
  EXPECT_EQ(f, kNoFrame);
  // Nothing was mapped where the application unmapped, and a is intact.
  EXPECT_EQ(msync(bp, kPageSize, MS_ASYNC), -1);
  unsigned char expect[kPageSize];
  Fill(expect, 3);
  EXPECT_TRUE(Same(a.page(0), expect));
  a.page(0)[0] ^= 1;
}

TEST_P(LinuxMemoryTest, ExcludedPagesAreLeftAloneAndNeverProtected) {
  auto m = NewMemory();
  Region a(2), b(2);
  Fill(a.page(0), 1);
  Fill(b.page(0), 1);
  Rescan(*m);
  m->Exclude(a.addr(0), kPageSize);
  EXPECT_EQ(ProbeOne(*m, a.addr(0)), PageState::kExcluded);
  FrameId f;
  MergeResult r;
  Addr p = a.addr(0), q = b.addr(0);
  m->MergePairs(std::span<const Addr>(&p, 1), std::span<const Addr>(&q, 1),
                std::span<FrameId>(&f, 1), std::span<MergeResult>(&r, 1));
  EXPECT_EQ(r, MergeResult::kGone);
  // The calling thread's stack is excluded.
  unsigned char local[2 * kPageSize];
  Addr stack_page =
      (reinterpret_cast<Addr>(local) + kPageSize) & ~(kPageSize - 1);
  EXPECT_EQ(ProbeOne(*m, stack_page), PageState::kExcluded);
}

TEST_P(LinuxMemoryTest, MergeablePartsFollowsMadviseRules) {
  auto m = NewMemory();
  std::vector<LinuxMemory::Range> parts;
  Region r(8);
  EXPECT_EQ(m->MergeableParts(r.addr(0) + 1, kPageSize, &parts).code(), EINVAL);
  EXPECT_EQ(m->MergeableParts(r.addr(0), SIZE_MAX - 10, &parts).code(), EINVAL);
  ASSERT_TRUE(m->MergeableParts(r.addr(0), 0, &parts).ok());
  EXPECT_TRUE(parts.empty());
  // Length rounds up to pages.
  ASSERT_TRUE(m->MergeableParts(r.addr(0), 2 * kPageSize + 1, &parts).ok());
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0].first, r.addr(0));
  EXPECT_EQ(parts[0].second, 3 * kPageSize);
  // A hole gives ENOMEM but still the mapped parts.
  ASSERT_EQ(munmap(r.page(3), kPageSize), 0);
  Status s = m->MergeableParts(r.addr(0), 8 * kPageSize, &parts);
  EXPECT_EQ(s.code(), ENOMEM);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].second, 3 * kPageSize);
  EXPECT_EQ(parts[1].first, r.addr(4));
  // Read-only and shared pieces are skipped silently.
  ASSERT_EQ(mprotect(r.page(5), kPageSize, PROT_READ), 0);
  void* shared = mmap(r.page(6), kPageSize, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  ASSERT_NE(shared, MAP_FAILED);
  s = m->MergeableParts(r.addr(4), 4 * kPageSize, &parts);
  EXPECT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].first, r.addr(4));
  EXPECT_EQ(parts[0].second, kPageSize);
  EXPECT_EQ(parts[1].first, r.addr(7));
  // [vdso] is skipped.
  std::vector<MapEntry> maps;
  ASSERT_TRUE(ReadMaps("/proc/self/maps", &maps).ok());
  for (const auto& e : maps) {
    if (e.path == "[vdso]") {
      EXPECT_TRUE(m->MergeableParts(e.start, e.size(), &parts).ok());
      EXPECT_TRUE(parts.empty());
    }
  }
}

TEST_P(LinuxMemoryTest, AnonymousRangesCoverHeapButNotStacksOrOurs) {
  auto m = NewMemory();
  Region r(16);
  auto ranges = m->AnonymousRanges();
  auto covered = [&](Addr a) {
    for (auto [s, len] : ranges)
      if (a >= s && a < s + len) return true;
    return false;
  };
  EXPECT_TRUE(covered(r.addr(0)));
  // (The edges may touch excluded neighbours: our own object, TLS slack.)
  EXPECT_TRUE(covered(r.addr(8)));
  unsigned char local[64];
  EXPECT_FALSE(covered(reinterpret_cast<Addr>(local)));
  EXPECT_FALSE(covered(reinterpret_cast<Addr>(m.get())));
  EXPECT_FALSE(covered(m->frame_store().chunk_table_start()));
}

// merge-any's sweep reads smaps (a walk of every page table) only where
// the layout shows memory it does not know; the background scanner's
// sweep keeps a view read moments ago. An idle PostgreSQL read smaps ten
// times a second in each of its processes.
TEST_P(LinuxMemoryTest, AnonymousRangesReadSmapsOnlyForNewMemory) {
  if (kSmapsReadsCountTheRuntimes) GTEST_SKIP() << kSmapsReadsSkip;
  auto m = NewMemory();
  Region r(16);
  (void)m->AnonymousRanges();
  // The first read's allocations may have grown the heap: known memory
  // grown, read again.
  (void)m->AnonymousRanges();
  const MemoryStats first = m->Stats();
  (void)m->AnonymousRanges();
  MemoryStats now = m->Stats();
  EXPECT_EQ(now.smaps_reads, first.smaps_reads) << "nothing new, smaps read";
  EXPECT_EQ(now.maps_reads, first.maps_reads + 1);
  m->ReuseRecentViews(true);  // as the background scanner's sweep
  (void)m->AnonymousRanges();
  EXPECT_EQ(m->Stats().maps_reads, now.maps_reads) << "a recent view read";
  Region fresh(8);
  const auto ranges = m->AnonymousRanges();
  m->ReuseRecentViews(false);
  now = m->Stats();
  EXPECT_EQ(now.smaps_reads, first.smaps_reads) << "the recent view kept";
  const auto with_fresh = m->AnonymousRanges();
  EXPECT_EQ(m->Stats().smaps_reads, first.smaps_reads + 1)
      << "new memory, smaps not read";
  auto covered = [](const auto& rs, Addr a) {
    for (auto [s, len] : rs)
      if (a >= s && a < s + len) return true;
    return false;
  };
  EXPECT_TRUE(covered(with_fresh, fresh.addr(4)));
  EXPECT_TRUE(covered(with_fresh, r.addr(8)));
  EXPECT_TRUE(covered(ranges, r.addr(8)));
}

// Exclusions cut the mapping that holds them, to the page; a large
// mapping is taken whole (interval by interval: 64 GiB of address space).
TEST_P(LinuxMemoryTest, AnonymousRangesLeaveOutExclusionsToThePage) {
  auto m = NewMemory();
  Region r(16);
  m->Exclude(r.addr(4), 3 * kPageSize);
  m->Exclude(r.addr(15), kPageSize);
  constexpr std::size_t kBig = std::size_t{64} << 30;
  void* big = mmap(nullptr, kBig, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(big, MAP_FAILED);
  const auto ranges = m->AnonymousRanges();
  munmap(big, kBig);
  auto covered = [&](Addr a) {
    for (auto [s, len] : ranges)
      if (a >= s && a < s + len) return true;
    return false;
  };
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_EQ(covered(r.addr(i)), i < 4 || (i >= 7 && i < 15)) << "page " << i;
  }
  const auto b = reinterpret_cast<Addr>(big);
  EXPECT_TRUE(covered(b));
  EXPECT_TRUE(covered(b + kBig - kPageSize));
}

// SkipAbsent passes only pages Probe calls kAbsent, and passes them to
// the first page that has something: a page of the application's, the
// zero page, an exclusion, a frame of ours (one dropped from the page
// table too: it reads as the frame), a hole.
TEST_P(LinuxMemoryTest, SkipAbsentPassesOnlyPagesProbeCallsAbsent) {
  auto m = NewMemory();
  Region r(3000), other(4);
  r.page(700)[0] = 1;
  volatile unsigned char zero = r.page(1500)[0];  // maps the zero page
  (void)zero;
  m->Exclude(r.addr(400), kPageSize);
  for (std::size_t i = 0; i < 4; ++i) {
    Fill(r.page(2000 + i), unsigned(i));
    Fill(other.page(i), unsigned(i));
  }
  Rescan(*m);
  std::vector<FrameId> frames(4);
  std::vector<MergeResult> res(4);
  m->MergePairs(Addrs(r, 2000, 4), Addrs(other, 0, 4), frames, res);
  for (std::size_t i = 0; i < 4; ++i) ASSERT_EQ(res[i], MergeResult::kMerged);
  ASSERT_EQ(madvise(r.page(2000), 4 * kPageSize, MADV_DONTNEED), 0);
  ASSERT_EQ(munmap(r.page(2500), kPageSize), 0);
  const Addr end = r.addr(0) + 3000 * kPageSize;
  if (m->SkipAbsent(r.addr(0), end) == r.addr(0)) {
    GTEST_SKIP() << "PAGEMAP_SCAN is not there (Linux 6.7): nothing passed";
  }
  auto check = [&](std::size_t from, std::size_t to) {
    const Addr got = m->SkipAbsent(r.addr(from), end);
    EXPECT_EQ(got, r.addr(0) + to * kPageSize) << "from page " << from;
    for (Addr a = r.addr(from); a < got; a += kPageSize) {
      ASSERT_EQ(ProbeOne(*m, a), PageState::kAbsent)
          << "page " << (a - r.addr(0)) / kPageSize << " passed";
    }
  };
  check(0, 400);
  check(401, 700);
  check(701, 1500);
  check(1000, 1500);
  check(1501, 2000);
  check(2000, 2000);
  check(2004, 2004);  // a hole the view has not seen: nothing passed
  check(2501, 3000);
  Rescan(*m);
  check(2004, 2500);
  EXPECT_EQ(m->SkipAbsent(r.addr(0), r.addr(100)), r.addr(100)) << "to";
  r.page(1000)[0] = 1;
  EXPECT_EQ(m->SkipAbsent(r.addr(701), end), r.addr(1000)) << "new page";
  r.Forget();
  munmap(r.page(0), 2500 * kPageSize);
  munmap(r.page(2501), 499 * kPageSize);
}

TEST_P(LinuxMemoryTest, ThreadStacksAreLeftOutInMprotectMode) {
  auto m = NewMemory();
  std::atomic<Addr> stack_top{0};
  std::atomic<bool> done{false};
  std::thread t([&] {
    unsigned char local[64];
    local[0] = 1;
    stack_top = reinterpret_cast<Addr>(local);
    while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (stack_top == 0) std::this_thread::yield();
  auto ranges = m->AnonymousRanges();
  bool covered = false;
  for (auto [s, len] : ranges) covered |= stack_top >= s && stack_top < s + len;
  Rescan(*m);
  PageState st = ProbeOne(*m, stack_top & ~(kPageSize - 1));
  done = true;
  t.join();
  if (m->protection() == Protection::kMprotect) {
    EXPECT_FALSE(covered);
    EXPECT_EQ(st, PageState::kExcluded);
  } else {
    EXPECT_TRUE(covered);  // a blocked writer is fine under userfaultfd
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, LinuxMemoryTest,
                         ::testing::ValuesIn(kMemoryConfigs),
                         [](const auto& info) {
                           return MemoryConfigName(info.param);
                         });

// A page that cannot be read when its pair's frame is filled (made
// inaccessible since the last look at the mappings) costs only its own
// pair: the pages of its run, copied together, are copied one by one
// then, and merge.
TEST_P(LinuxMemoryTest, AnUnreadablePageFailsOnlyItsOwnScatteredPair) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "pairs are laid out so in discard-first windows only";
  constexpr std::size_t kN = 16, kBad = 5;
  auto m = NewMemory();
  if (!m->SyscallWritesWait())
    GTEST_SKIP() << "a user-mode-only userfaultfd: no discard-first windows";
  // Partners every other page, in another order: none lie next to each
  // other, so the frames follow p, which are copied as one run.
  Region a(kN), b(2 * kN);
  auto slot = [](std::size_t i) { return 2 * ((i * 7) % kN); };
  FillShuffled(a, b, kN, slot);
  Rescan(*m);
  ASSERT_EQ(mprotect(a.page(kBad), kPageSize, PROT_NONE), 0);
  std::vector<Addr> q;
  for (std::size_t i = 0; i < kN; ++i) q.push_back(b.addr(slot(i)));
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  m->MergePairs(Addrs(a, 0, kN), q, frames, res);
  ASSERT_EQ(mprotect(a.page(kBad), kPageSize, PROT_READ | PROT_WRITE), 0);
  unsigned char expect[kPageSize];
  for (std::size_t i = 0; i < kN; ++i) {
    if (i == kBad) {
      EXPECT_NE(res[i], MergeResult::kMerged);
      EXPECT_EQ(frames[i], kNoFrame);
    } else {
      EXPECT_EQ(res[i], MergeResult::kMerged) << i;
    }
    Fill(expect, static_cast<unsigned>(i));
    EXPECT_TRUE(Same(a.page(i), expect)) << i;
    EXPECT_TRUE(Same(b.page(slot(i)), expect)) << i;
  }
  EXPECT_EQ(m->Stats().frames_in_use, kN - 1);
}

// Page i of a alike page slot(i) = i * step % n of b (contents i), all
// pages different otherwise; scanned once.
struct ShuffledTwins {
  ShuffledTwins(LinuxMemory& m, std::size_t n, std::size_t step)
      : a(n), b(n), n(n), step(step) {
    FillShuffled(a, b, n, [this](std::size_t i) { return slot(i); });
    Rescan(m);
  }
  std::size_t slot(std::size_t i) const { return (i * step) % n; }
  // Every page still holds its bytes; then both sides are unmerged and the
  // frames (kNoFrame for none) released.
  void ExpectIntactThenUnmerge(LinuxMemory& m,
                               const std::vector<FrameId>& frames) const {
    unsigned char expect[kPageSize];
    for (std::size_t i = 0; i < n; ++i) {
      Fill(expect, static_cast<unsigned>(i));
      EXPECT_TRUE(Same(a.page(i), expect)) << i;
      EXPECT_TRUE(Same(b.page(slot(i)), expect)) << i;
    }
    ASSERT_TRUE(m.Unmerge(b.addr(0), n));
    ASSERT_TRUE(m.Unmerge(a.addr(0), n));
    for (FrameId f : frames) {
      if (f != kNoFrame) m.ReleaseFrame(f);
    }
    EXPECT_EQ(m.Stats().frames_in_use, 0u);
  }
  Region a, b;
  std::size_t n, step;
};

// Scattered pairs are admitted by the mappings their layout takes, at two
// VMAs a mapping at the most: 64 pairs whose p run on (one mapping) and
// whose partners lie one to a mapping need 65 mappings, and a budget of
// 131 takes them all (charged at four VMAs a pair, 59 of them were).
TEST_P(LinuxMemoryTest, ScatteredPairsFitABudgetOfTheMappingsTheyTake) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "pairs are laid out so in discard-first windows only";
  constexpr std::size_t kN = 64;
  auto m = NewMemory(/*budget=*/2 * (kN + 1) + 1);
  if (!m->SyscallWritesWait())
    GTEST_SKIP() << "a user-mode-only userfaultfd: no discard-first windows";
  const ShuffledTwins twins(*m, kN, 37);
  std::vector<Addr> q;
  for (std::size_t i = 0; i < kN; ++i) q.push_back(twins.b.addr(twins.slot(i)));
  std::vector<FrameId> frames(kN);
  std::vector<MergeResult> res(kN);
  const long maps_before = Maps();
  const std::uint64_t used_before = m->Stats().vmas_used;
  m->MergePairs(Addrs(twins.a, 0, kN), q, frames, res);
  for (std::size_t i = 0; i < kN; ++i)
    EXPECT_EQ(res[i], MergeResult::kMerged) << i;
  EXPECT_LE(m->Stats().vmas_used, 2 * (kN + 1) + 1);
  // b's pages, each a mapping next to the one mapped just before it, are
  // charged one edge each, as the kernel counts them (not two).
  const long real = Maps() - maps_before;
  const auto charged = static_cast<long>(m->Stats().vmas_used - used_before);
  EXPECT_GE(charged, real);
  EXPECT_LE(charged, real + 4);
  EXPECT_EQ(m->Stats().budget_skips, 0u);
  twins.ExpectIntactThenUnmerge(*m, frames);
}

// The budget charges a scattered mapping only for the VMA edges it adds:
// a page between two frame mappings of ours (an anonymous VMA of its own
// already) adds none, where the worst case would charge two a mapping.
// Whatever is charged is never less than the kernel's real count grows.
TEST_P(LinuxMemoryTest, ScatteredPagesBetweenFrameMappingsAreChargedNoSplit) {
  if (GetParam().protection != Protection::kUserfaultfd)
    GTEST_SKIP() << "pairs are laid out so in discard-first windows only";
  constexpr std::size_t kN = 32;
  auto m = NewMemory(/*budget=*/1000);
  if (!m->SyscallWritesWait())
    GTEST_SKIP() << "a user-mode-only userfaultfd: no discard-first windows";
  // Odd slots for odd pages: b's neighbours of an odd page are even ones.
  const ShuffledTwins twins(*m, kN, 7);
  std::vector<FrameId> frames(kN, kNoFrame);
  auto merge = [&](std::size_t parity) {
    std::vector<Addr> p, q;
    std::vector<std::size_t> index;
    for (std::size_t i = parity; i < kN; i += 2) {
      p.push_back(twins.a.addr(i));
      q.push_back(twins.b.addr(twins.slot(i)));
      index.push_back(i);
    }
    std::vector<FrameId> f(p.size());
    std::vector<MergeResult> res(p.size());
    m->MergePairs(p, q, f, res);
    for (std::size_t k = 0; k < p.size(); ++k) {
      EXPECT_EQ(res[k], MergeResult::kMerged) << index[k];
      frames[index[k]] = f[k];
    }
  };
  const long maps0 = Maps();
  const std::uint64_t used0 = m->Stats().vmas_used;
  merge(0);  // even pages: each alone in the middle of anonymous memory
  const long maps1 = Maps();
  const std::uint64_t used1 = m->Stats().vmas_used;
  EXPECT_GE(static_cast<long>(used1 - used0), maps1 - maps0);
  merge(1);  // odd pages: each between two frame mappings
  const long maps2 = Maps();
  const std::uint64_t used2 = m->Stats().vmas_used;
  EXPECT_GE(static_cast<long>(used2 - used1), maps2 - maps1);
  EXPECT_LE(used2 - used1, 4u) << "charged as if splitting anonymous VMAs";
  EXPECT_EQ(m->Stats().budget_skips, 0u);
  twins.ExpectIntactThenUnmerge(*m, frames);
}

}  // namespace
}  // namespace samepage::backend
