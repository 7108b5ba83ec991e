// The maps/smaps parser on fixed text, and on this process's own maps.

#include "backend/proc_maps.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

namespace samepage::backend {
namespace {

constexpr char kSmaps[] =
    "55d59742e000-55d597430000 r--p 00000000 fe:00 247134    /usr/bin/cat\n"
    "Size:                  8 kB\n"
    "AnonHugePages:         0 kB\n"
    "VmFlags: rd mr mw me \n"
    "55d5d5563000-55d5d5584000 rw-p 00000000 00:00 0          [heap]\n"
    "VmFlags: rd wr mr mw me ac \n"
    "7f585c2a8000-7f585c2ca000 rw-p 00000000 00:00 0 \n"
    "VmFlags: rd wr mr mw me lo ac \n"
    "7f0000001000-7f0000002000 rw-p 00003000 00:01 1129   /memfd:samepage "
    "(deleted)\n"
    "7f0000002000-7f0000003000 rw-s 00000000 00:01 77     /dev/zero (deleted)\n"
    "7f585c51a000-7f585c51e000 r--p 00000000 00:00 0      [vvar]\n"
    "7f585c600000-7f585c601000 rw-p 00000000 00:00 0      [anon:my arena]\n";

TEST(ProcMapsTest, ParsesHeadersAndVmFlags) {
  std::vector<MapEntry> e;
  ASSERT_TRUE(ParseMaps(kSmaps, &e).ok());
  ASSERT_EQ(e.size(), 7u);
  EXPECT_EQ(e[0].start, 0x55d59742e000u);
  EXPECT_EQ(e[0].end, 0x55d597430000u);
  EXPECT_TRUE(e[0].read);
  EXPECT_FALSE(e[0].write);
  EXPECT_EQ(e[0].inode, 247134u);
  EXPECT_EQ(e[0].dev_major, 0xfeu);
  EXPECT_EQ(e[0].path, "/usr/bin/cat");
  EXPECT_TRUE(e[0].has_vm_flags);
  EXPECT_TRUE(e[1].HasVmFlag("wr"));
  EXPECT_FALSE(e[1].HasVmFlag("w"));
  EXPECT_TRUE(IsPrivateAnonymous(e[1]));
  EXPECT_FALSE(IsSpecialMapping(e[1]));
  EXPECT_FALSE(HasUnmergeableVmFlags(e[1]));
  // mlocked: merged, with the lock applied again (LinuxMemory).
  EXPECT_TRUE(e[2].HasVmFlag("lo"));
  EXPECT_FALSE(HasUnmergeableVmFlags(e[2]));
  EXPECT_EQ(e[3].path, "/memfd:samepage (deleted)");
  EXPECT_EQ(e[3].offset, 0x3000u);
  EXPECT_EQ(e[3].dev_minor, 1u);
  EXPECT_FALSE(IsPrivateAnonymous(e[3]));
  EXPECT_TRUE(e[4].shared);
  EXPECT_TRUE(IsSpecialMapping(e[5]));
  EXPECT_TRUE(IsPrivateAnonymous(e[6]));
  EXPECT_FALSE(IsSpecialMapping(e[6]));
  EXPECT_EQ(e[6].path, "[anon:my arena]");
}

TEST(ProcMapsTest, UffdWriteProtectFlagIsOnlyFineWhenOurs) {
  std::vector<MapEntry> e;
  ASSERT_TRUE(ParseMaps("1000-2000 rw-p 0 00:00 0\nVmFlags: rd wr uw\n"
                        "2000-3000 rw-p 0 00:00 0\nVmFlags: rd wr um\n",
                        &e)
                  .ok());
  ASSERT_EQ(e.size(), 2u);
  EXPECT_TRUE(HasUnmergeableVmFlags(e[0]));
  EXPECT_FALSE(HasUnmergeableVmFlags(e[0], /*uffd_wp_is_ours=*/true));
  EXPECT_TRUE(HasUnmergeableVmFlags(e[1], /*uffd_wp_is_ours=*/true));
}

// smaps shows a memory protection key (pkey_mprotect) on a line of its own,
// before VmFlags: a key other than 0 adds "pk", and keeps the mapping
// unmerged (a mapping samepage puts in place would have key 0).
TEST(ProcMapsTest, AProtectionKeyOtherThanZeroKeepsAMappingUnmerged) {
  std::vector<MapEntry> e;
  ASSERT_TRUE(ParseMaps("1000-2000 rw-p 0 00:00 0\n"
                        "Size:                  4 kB\n"
                        "ProtectionKey:         1\n"
                        "VmFlags: rd wr mr mw me ac\n"
                        "2000-3000 rw-p 0 00:00 0\n"
                        "ProtectionKey:         0\n"
                        "VmFlags: rd wr mr mw me ac\n"
                        "3000-4000 rw-p 0 00:00 0\n"
                        "VmFlags: rd wr mr mw me ac\n"
                        "ProtectionKey:        15\n",
                        &e)
                  .ok());
  ASSERT_EQ(e.size(), 3u);
  EXPECT_TRUE(e[0].HasVmFlag("pk"));
  EXPECT_TRUE(HasUnmergeableVmFlags(e[0]));
  EXPECT_FALSE(e[1].HasVmFlag("pk"));
  EXPECT_FALSE(HasUnmergeableVmFlags(e[1]));
  EXPECT_TRUE(HasUnmergeableVmFlags(e[2]));  // whichever line comes first
  EXPECT_EQ(FlagsReadBySamepage(e[0].vm_flags, false), "pk");
}

// The saved flags keep what samepage reads and nothing else, so that an
// anonymous page ("ac") and a frame mapping ("nr") beside it form one run.
TEST(ProcMapsTest, FlagsReadBySamepageKeepOnlyWhatIsRead) {
  EXPECT_EQ(FlagsReadBySamepage("rd wr mr mw me ac sd mg", false), "");
  EXPECT_EQ(FlagsReadBySamepage("rd wr mr mw me nr", false), "");
  EXPECT_EQ(FlagsReadBySamepage("rd wr mr mw me dc ac dd lo mg uw", false), "dc dd lo uw");
  EXPECT_EQ(FlagsReadBySamepage("rd wr mr mw me dc ac dd lo mg uw", true), "dc dd lo");
  EXPECT_EQ(FlagsReadBySamepage("rd wr wf ht io pf sl um ui dp lf", true),
            "wf ht io pf sl um ui dp lf");
  MapEntry e;
  e.vm_flags = FlagsReadBySamepage("rd wr mr mw me ac wf", false);
  e.has_vm_flags = true;
  EXPECT_TRUE(HasUnmergeableVmFlags(e));  // what decides survives
  // MAP_DROPPABLE (Linux 6.11) shows as "dp", as /proc/PID/smaps names it;
  // kernel KSM leaves such memory alone too.
  e.vm_flags = FlagsReadBySamepage("rd wr mr mw me nr dp", false);
  EXPECT_EQ(e.vm_flags, "dp");
  EXPECT_TRUE(HasUnmergeableVmFlags(e));
}

// fork() clears the locks in the child and copies no DONTFORK mapping; the
// rest of what samepage reads stays.
TEST(ProcMapsTest, AForkedChildKeepsAllButTheLocks) {
  EXPECT_EQ(FlagsInAForkedChild("lo dd"), "dd");
  EXPECT_EQ(FlagsInAForkedChild("wf lf"), "wf");
  EXPECT_EQ(FlagsInAForkedChild("dc"), "");
  EXPECT_EQ(FlagsInAForkedChild("uw ht"), "uw ht");
  EXPECT_EQ(FlagsInAForkedChild(""), "");
}

TEST(ProcMapsTest, RejectsMalformedHeaders) {
  std::vector<MapEntry> e;
  EXPECT_EQ(ParseMaps("1000-2000 rw-x 0 00:00 0\n", &e).code(), EINVAL);
  EXPECT_EQ(ParseMaps("2000-1000 rw-p 0 00:00 0\n", &e).code(), EINVAL);
  EXPECT_EQ(ParseMaps("1000-2000 rw-p zz 00:00 0\n", &e).code(), EINVAL);
  EXPECT_TRUE(ParseMaps("", &e).ok());
  EXPECT_TRUE(e.empty());
}

TEST(ProcMapsTest, ReadErrorsCarryErrno) {
  std::vector<MapEntry> e;
  Status s = ReadMaps("/nonexistent/maps", &e);
  EXPECT_EQ(s.code(), ENOENT);
  EXPECT_NE(s.message().find("/nonexistent/maps"), std::string::npos);
  EXPECT_EQ(CountMappings("/nonexistent/maps"), -1);
}

TEST(ProcMapsTest, SeesOwnMappings) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "counts the process's mappings; the sanitizer's allocator "
                  "maps memory meanwhile";
#endif
  void* p = mmap(nullptr, 3 * 4096, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  long n1 = CountMappings("/proc/self/maps");
  ASSERT_EQ(mprotect(static_cast<char*>(p) + 4096, 4096, PROT_READ), 0);
  EXPECT_EQ(CountMappings("/proc/self/maps"), n1 + 2);
  std::vector<MapEntry> e;
  ASSERT_TRUE(ReadMaps("/proc/self/smaps", &e).ok());
  bool found = false;
  for (const auto& m : e) {
    if (m.start == reinterpret_cast<Addr>(p) + 4096) {
      found = true;
      EXPECT_FALSE(m.write);
      EXPECT_TRUE(m.has_vm_flags);
      EXPECT_TRUE(m.HasVmFlag("rd"));
    }
  }
  EXPECT_TRUE(found);
  munmap(p, 3 * 4096);
}

}  // namespace
}  // namespace samepage::backend
