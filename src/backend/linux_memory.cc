#include "backend/linux_memory.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/lsan_interface.h>
#endif
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string_view>

#include "backend/frame_order.h"
#include "backend/own_fds.h"
#include "backend/own_memory.h"
#include "backend/proc_fs.h"
#include "backend/write_protect.h"

namespace samepage::backend {
namespace {

constexpr int kReadWrite = PROT_READ | PROT_WRITE;

// pwritev of application pages into the memfd. Under AddressSanitizer the
// system call is made directly: the runtime's pwritev interceptor checks
// the shadow of what it reads, and merge-any copies heap pages the runtime
// keeps poisoned (freed blocks, redzones), which the kernel reads as it
// would for kernel KSM (see Readable() in write_protect.cc).
ssize_t PwritevPages(int fd, const iovec* iov, int n, off_t offset) {
#if defined(__SANITIZE_ADDRESS__)
  // x86-64 and the other 64-bit ABIs: the offset's high half is 0.
  return syscall(SYS_pwritev, fd, iov, n, static_cast<long>(offset), 0L);
#else
  return pwritev(fd, iov, n, offset);
#endif
}

// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
constexpr std::uint64_t kPmPresent = std::uint64_t{1} << 63;
constexpr std::uint64_t kPmFile = std::uint64_t{1} << 61;
constexpr std::uint64_t kPmUffdWp = std::uint64_t{1} << 57;

// PROCMAP_QUERY (Linux 6.11, include/uapi/linux/fs.h; newer than Debian
// 12's headers): one VMA of /proc/self/maps by address, with an ioctl.
struct ProcmapQuery {
  std::uint64_t size;
  std::uint64_t query_flags;
  std::uint64_t query_addr;
  std::uint64_t vma_start;
  std::uint64_t vma_end;
  std::uint64_t vma_flags;
  std::uint64_t vma_page_size;
  std::uint64_t vma_offset;
  std::uint64_t inode;
  std::uint32_t dev_major;
  std::uint32_t dev_minor;
  std::uint32_t vma_name_size;
  std::uint32_t build_id_size;
  std::uint64_t vma_name_addr;
  std::uint64_t build_id_addr;
};
constexpr unsigned long kProcmapQuery = _IOWR('f', 17, ProcmapQuery);

// PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h, also newer than Debian
// 12's headers): the pages of a range in given categories, found by a walk
// of the page tables that passes empty ones whole.
struct PmScanArg {
  std::uint64_t size;
  std::uint64_t flags;
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t walk_end;
  std::uint64_t vec;
  std::uint64_t vec_len;
  std::uint64_t max_pages;
  std::uint64_t category_inverted;
  std::uint64_t category_mask;
  std::uint64_t category_anyof_mask;
  std::uint64_t return_mask;
};
struct PageRegion {
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t categories;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
constexpr std::uint64_t kPageIsPresent = 1 << 3;
constexpr std::uint64_t kPageIsSwapped = 1 << 4;
constexpr std::uint64_t kPageIsPfnZero = 1 << 5;

// The PROT_ bits of a mapping's permissions.
int ProtOf(const MapEntry& e) {
  return (e.read ? PROT_READ : 0) | (e.write ? PROT_WRITE : 0) |
         (e.exec ? PROT_EXEC : 0);
}

// PAGEMAP_SCAN over [start, end): the pages in any of `categories`, as
// regions into `out` (max_pages of them at most; 0: no limit). Returns the
// regions found, or -1 with errno; *walk_end is where the walk stopped.
int PagemapScan(int pagemap_fd, Addr start, Addr end, std::uint64_t categories,
                std::span<PageRegion> out, std::uint64_t max_pages,
                Addr* walk_end) {
  PmScanArg arg{};
  arg.size = sizeof(arg);
  arg.start = start;
  arg.end = end;
  arg.vec = reinterpret_cast<std::uintptr_t>(out.data());
  arg.vec_len = out.size();
  arg.max_pages = max_pages;
  arg.category_anyof_mask = categories;
  arg.return_mask = categories;
  const int found = ioctl(pagemap_fd, kPagemapScan, &arg);
  *walk_end = arg.walk_end;
  return found;
}
constexpr std::uint64_t kProcmapVmaReadable = 0x01;
constexpr std::uint64_t kProcmapVmaWritable = 0x02;
constexpr std::uint64_t kProcmapVmaExecutable = 0x04;
constexpr std::uint64_t kProcmapVmaShared = 0x08;
constexpr std::uint64_t kProcmapCoveringOrNext = 0x10;

// The VMA containing `a` (with kProcmapCoveringOrNext, or the next one
// after it), from the /proc/self/maps descriptor `fd`. False with errno set
// (ENOENT: none; ENOTTY: before Linux 6.11).
// With `name`, also the mapping's name into it ("" if none).
bool QueryVma(int fd, Addr a, ProcmapQuery* q, std::uint64_t flags = 0,
              std::span<char> name = {}) {
  *q = ProcmapQuery{};
  q->size = sizeof(*q);
  q->query_addr = a;
  q->query_flags = flags;
  if (!name.empty()) {
    q->vma_name_addr = reinterpret_cast<std::uintptr_t>(name.data());
    q->vma_name_size = static_cast<std::uint32_t>(name.size());
  }
  return ioctl(fd, kProcmapQuery, q) == 0;
}

// Whether the VMA a query answered with maps a file (anonymous memory has
// no inode and no device).
bool FileBacked(const ProcmapQuery& q) {
  return q.inode != 0 || q.dev_major != 0 || q.dev_minor != 0;
}

// The mappings over [start, end) by PROCMAP_QUERY on `fd`; false with
// errno if a query fails (ENOTTY: before Linux 6.11).
bool QueryMappingsOf(int fd, Addr start, Addr end,
                     std::vector<MapEntry>* maps) {
  maps->clear();
  // On the stack: a small unmerge asks here at every call (MADV_DONTNEED
  // of merged memory), and a std::string of PATH_MAX made for each showed
  // in its profile.
  char name[PATH_MAX];
  for (Addr a = start; a < end;) {
    ProcmapQuery q;
    if (!QueryVma(fd, a, &q, kProcmapCoveringOrNext, name)) {
      if (errno == ENOENT) break;  // nothing mapped from a on
      return false;
    }
    if (q.vma_start >= end) break;
    MapEntry e;
    e.start = q.vma_start;
    e.end = q.vma_end;
    e.read = (q.vma_flags & kProcmapVmaReadable) != 0;
    e.write = (q.vma_flags & kProcmapVmaWritable) != 0;
    e.exec = (q.vma_flags & kProcmapVmaExecutable) != 0;
    e.shared = (q.vma_flags & kProcmapVmaShared) != 0;
    e.offset = q.vma_offset;
    e.dev_major = q.dev_major;
    e.dev_minor = q.dev_minor;
    e.inode = q.inode;
    // vma_name_size counts the terminating NUL; 0 for a nameless mapping.
    e.path.assign(name, q.vma_name_size > 0 ? q.vma_name_size - 1 : 0);
    // The one VmFlag the query shows: hugetlb memory's page size (it is
    // file-backed, on hugetlbfs, so not taken anyway).
    if (q.vma_page_size != kPageSize) {
      e.vm_flags = "ht";
      e.has_vm_flags = true;
    }
    maps->push_back(std::move(e));
    a = q.vma_end;
  }
  return true;
}

// The mappings over [start, end) from a maps file (where PROCMAP_QUERY
// does not serve: before Linux 6.11, or maps injected by tests).
bool ReadMappingsOver(const std::string& path, Addr start, Addr end,
                      std::vector<MapEntry>* maps) {
  maps->clear();
  std::vector<MapEntry> all;
  if (!ReadMaps(path, &all).ok()) return false;
  for (MapEntry& e : all) {
    if (e.end > start && e.start < end) maps->push_back(std::move(e));
  }
  return true;
}

// Every frame store of this process and its ancestors, as (dev, inode),
// for ZeroFrameMappedPages, which may not take locks or allocate: slots are
// written once each, then published by the count.
struct MemfdId {
  std::atomic<std::uint64_t> dev{0};
  std::atomic<std::uint64_t> ino{0};
};
constexpr std::size_t kMaxMemfds = 64;
MemfdId g_memfds[kMaxMemfds];
std::atomic<std::size_t> g_memfd_count{0};
std::mutex g_memfd_mu;  // serialises writers only

void RememberMemfd(dev_t dev, ino_t ino) {
  std::lock_guard<std::mutex> lock(g_memfd_mu);
  const std::size_t n = g_memfd_count.load();
  for (std::size_t i = 0; i < n; ++i) {
    if (g_memfds[i].dev.load() == dev && g_memfds[i].ino.load() == ino) return;
  }
  if (n == kMaxMemfds) return;
  g_memfds[n].dev.store(dev);
  g_memfds[n].ino.store(ino);
  g_memfd_count.store(n + 1, std::memory_order_release);
}

bool IsRememberedMemfd(const ProcmapQuery& q) {
  const std::size_t n = g_memfd_count.load(std::memory_order_acquire);
  for (std::size_t i = 0; i < n; ++i) {
    const dev_t dev = static_cast<dev_t>(g_memfds[i].dev.load());
    if (g_memfds[i].ino.load() == q.inode && major(dev) == q.dev_major &&
        minor(dev) == q.dev_minor) {
      return true;
    }
  }
  return false;
}

// /proc/self/maps of this process for PROCMAP_QUERY outside any
// LinuxMemory, reopened after fork (the descriptor names the process that
// opened it). 1 if the query works, 0 if not (before Linux 6.11).
std::atomic<int> g_query_fd{-1};
std::atomic<pid_t> g_query_pid{0};
std::atomic<int> g_query_works{-1};

int QueryFd() {
  const pid_t self = getpid();
  // The pid is published after the descriptor: seeing ours means seeing a
  // descriptor opened by this process.
  if (g_query_pid.load(std::memory_order_acquire) == self)
    return g_query_fd.load(std::memory_order_relaxed);
  const int fresh =
      AdoptOwnFd(OpenProc("/proc/self/maps", O_RDONLY | O_CLOEXEC));
  if (fresh < 0) return -1;
  // A racing caller's descriptor works as well; the old one (a parent's,
  // inherited over fork) is left open rather than closed under a reader.
  g_query_fd.store(fresh, std::memory_order_relaxed);
  g_query_pid.store(self, std::memory_order_release);
  return fresh;
}

std::atomic<std::uint64_t> g_next_instance{1};
std::atomic<std::uint64_t> g_vma_flags_epoch{0};
std::atomic<std::uint64_t> g_unseen_reprotects{0};
thread_local std::uint64_t tls_registered_instance
    __attribute__((tls_model("initial-exec")));

std::string Hex(Addr a) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%" PRIxPTR, a);
  return buf;
}

// errno becomes a Status here and only here.
Status SysError(int err, const std::string& call, Addr addr) {
  return Status::Error(err, addr ? call + " at " + Hex(addr) : call);
}

std::size_t RoundUp(std::size_t v) {
  return (v + kPageSize - 1) & ~(kPageSize - 1);
}

void* Ptr(Addr a) { return reinterpret_cast<void*>(a); }

// Calls body(k, e) for each run [k, e) of kMerged results, a run extended
// while joins(e) holds. body may rewrite results[k..e).
template <typename Joins, typename Body>
void ForEachMergedRun(const MergeResult* results, std::size_t n, Joins joins,
                      Body body) {
  for (std::size_t k = 0; k < n;) {
    if (results[k] != MergeResult::kMerged) {
      ++k;
      continue;
    }
    std::size_t e = k + 1;
    while (e < n && results[e] == MergeResult::kMerged && joins(e)) ++e;
    body(k, e);
    k = e;
  }
}

}  // namespace

// --- allocation: the object is its own excluded mapping ---

void* LinuxMemory::operator new(std::size_t size) {
  void* p = mmap(nullptr, RoundUp(size), kReadWrite,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#if defined(__SANITIZE_ADDRESS__)
  // LeakSanitizer does not scan mmapped memory: the object's vectors would
  // all be reported as leaked.
  __lsan_register_root_region(p, size);
#endif
  return p;
}

void LinuxMemory::operator delete(void* p, std::size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __lsan_unregister_root_region(p, size);
#endif
  munmap(p, RoundUp(size));
}

// --- setup ---

Status LinuxMemory::Create(const LinuxMemoryOptions& options,
                           std::unique_ptr<LinuxMemory>* memory) {
  memory->reset();
  std::unique_ptr<LinuxMemory> m(new LinuxMemory());
  Status s = m->Init(options);
  if (!s.ok()) return s;
  *memory = std::move(m);
  return Status::Ok();
}

Status LinuxMemory::CreateInChild(const LinuxMemoryOptions& options,
                                  const LinuxMemory& parent,
                                  std::unique_ptr<LinuxMemory>* memory) {
  memory->reset();
  std::unique_ptr<LinuxMemory> m(new LinuxMemory());
  // Not where memory was advised since the parent's read: the parent
  // reads smaps before it probes such memory (advised_unread_); the child,
  // taking it for new memory of unknown flags, would find it gone and
  // forget it (preload.fork_child_test failed so, once in a few runs).
  if (parent.smaps_read_at_ != 0 && parent.advised_unread_.empty() &&
      parent.smaps_epoch_ == g_vma_flags_epoch.load()) {
    m->inherited_view_ = true;
    m->flag_runs_ = parent.flag_runs_;
    for (FlagRun& run : m->flag_runs_)
      run.flags = FlagsInAForkedChild(run.flags);
    m->anon_splits_ = parent.anon_splits_;
    m->anon_splits_made_ = parent.anon_splits_made_;  // ReadView merges them
    m->smaps_took_ = parent.smaps_took_;
    m->smaps_mappings_ = parent.smaps_mappings_;
  }
  Status s = m->Init(options);
  if (!s.ok()) return s;
  *memory = std::move(m);
  return Status::Ok();
}

LinuxMemory::~LinuxMemory() {
  CloseOwnFd(pagemap_fd_);
  CloseOwnFd(maps_query_fd_);
  if (scratch_ != 0) munmap(Ptr(scratch_), kScratchBytes);
}

Status LinuxMemory::Init(const LinuxMemoryOptions& options) {
  options_ = options;
  using Fill = LinuxMemoryOptions::FrameFill;
  Status s = InitProcessState();
  if (!s.ok()) return s;
  fills_ = CheaperOf(options_.frame_fill == Fill::kBounce   ? 0
                     : options_.frame_fill == Fill::kDirect ? 1
                                                            : -1);
  id_ = g_next_instance.fetch_add(1);
  s = store_.Init();
  if (!s.ok()) return s;
  RememberMemfd(store_.dev(), store_.inode());
  for (auto [dev, ino] : options_.adopted_memfds) RememberMemfd(dev, ino);

  pagemap_fd_ =
      AdoptOwnFd(OpenProc(options_.pagemap_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (pagemap_fd_ < 0) {
    int err = errno;
    return SysError(err, "open(" + options_.pagemap_path + ")", 0);
  }
  // For StillProtected in mprotect mode; without it that check is skipped.
  maps_query_fd_ =
      AdoptOwnFd(OpenProc("/proc/self/maps", O_RDONLY | O_CLOEXEC));

  switch (options_.protection) {
    case Protection::kMprotect:
      protector_ = NewMprotectProtector();
      protection_ = Protection::kMprotect;
      break;
    case Protection::kUserfaultfd:
      s = NewUffdProtector(&protector_);
      if (!s.ok()) return s;
      protection_ = Protection::kUserfaultfd;
      break;
    case Protection::kAuto:
      if (NewUffdProtector(&protector_).ok()) {
        protection_ = Protection::kUserfaultfd;
      } else {
        protector_ = NewMprotectProtector();
        protection_ = Protection::kMprotect;
      }
      break;
  }

  {
    std::string text;
    s = ReadProcFile(options_.max_map_count_path, &text);
    if (s.ok()) {
      max_map_count_ = std::strtol(text.c_str(), nullptr, 10);
      if (max_map_count_ <= 0) {
        s = Status::Error(EINVAL, options_.max_map_count_path + ": bad value");
      }
    }
    // Only a derived budget needs it; otherwise assume the kernel default.
    if (!s.ok() && options_.vma_budget == 0) return s;
    if (!s.ok()) max_map_count_ = 65530;
  }

  void* scratch =
      MapUnlocked(nullptr, kScratchBytes, kReadWrite,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (scratch == MAP_FAILED) {
    int err = errno;
    return SysError(err, "mmap(unmerge scratch)", 0);
  }
  scratch_ = reinterpret_cast<Addr>(scratch);

  // Memory we write while windows are open.
  Exclude(scratch_, kScratchBytes);
  Exclude(reinterpret_cast<Addr>(this), sizeof(*this));
  auto [state, state_size] = ProcessStateRange();
  Exclude(state, state_size);
  Exclude(store_.chunk_table_start(), store_.chunk_table_size());
  // Our tables and locks, written all the time (own_memory.h).
  for (auto [start, end] :
       OwnWritableSegments(reinterpret_cast<const void*>(&NoteVmaFlagsChanged)))
    Exclude(start, end - start);
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer's shadow, which our own instrumented code writes as it
  // runs (a function's local arrays are poisoned and unpoisoned there):
  // write-protected in a window, our own thread would wait on itself.
  // The shadow of the whole user address space (47 bits).
  std::size_t shadow_scale = 0;
  std::size_t shadow_offset = 0;
  __asan_get_shadow_mapping(&shadow_scale, &shadow_offset);
  Exclude(shadow_offset, (Addr{1} << 47) >> shadow_scale);
#endif
  RegisterThread();

  if (inherited_view_) {
    // The parent's read, as if made now: the plain maps show what changed.
    smaps_read_at_ = MonotonicNanos();
    smaps_epoch_ = g_vma_flags_epoch.load();
    std::vector<MapEntry> maps;
    const bool ok = ReadAndApplyView(/*full=*/false, &maps).ok();
    inherited_view_ = false;
    if (ok) return Status::Ok();
  }
  return ReadFirstView();
}

Status LinuxMemory::ReadFirstView() {
  // Nothing is advised yet: the plain maps, with the flags of every mapping
  // of mergeable kind unknown. smaps walks the page tables of all memory
  // (13 ms in the first madvise of a process with 800 MB resident); it is
  // read when memory is advised, by the scanner before it touches it
  // (advised_unread_) or by merge-any's sweep (view_unknown_), as the next
  // read is anyway (smaps_read_at_ stays 0). Not in a forked child's
  // backend (adopted memfds): its first control call may unmerge pages
  // that map its parent's frames, before any scan.
  const std::int64_t started = MonotonicNanos();
  const std::uint64_t epoch = g_vma_flags_epoch.load();
  const std::uint64_t unseen = g_unseen_reprotects.load();
  std::vector<MapEntry> maps;
  if (!options_.adopted_memfds.empty() || options_.plain_maps_path.empty() ||
      !ReadMaps(options_.plain_maps_path, &maps).ok()) {
    return RefreshMaps();
  }
  // A missing smaps fails here, as it would at its first read.
  const int fd = OpenProc(options_.maps_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return SysError(err, "open(" + options_.maps_path + ")", 0);
  }
  close(fd);
  ++maps_reads_;
  view_mappings_ = maps.size();
  for (MapEntry& e : maps) {
    if (MergeableKind(e)) e.flags_unknown = true;
  }
  Status s = ApplyView(maps, started, epoch, unseen);
  view_read_at_ = 0;  // no scan keeps this view (RecentViewReusable)
  return s;
}

void LinuxMemory::RegisterThread() {
  if (tls_registered_instance == id_) return;
  tls_registered_instance = id_;
  Addr stack_lo = 0, stack_hi = 0;
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* stack = nullptr;
    std::size_t size = 0;
    if (pthread_attr_getstack(&attr, &stack, &size) == 0) {
      stack_lo = reinterpret_cast<Addr>(stack);
      stack_hi = stack_lo + size;
      Exclude(stack_lo, size);
    }
    pthread_attr_destroy(&attr);
  }
  auto [tls, tls_size] = CurrentThreadTlsRange();
  // A thread glibc made keeps its TLS and TCB at the top of its stack
  // block, which ends where the stack reported ends: the TLS range's
  // allowance for the TCB must not reach past it into the mapping above
  // (the program's memory, which then never merged).
  Addr tls_end = tls + tls_size;
  if (tls >= stack_lo && tls < stack_hi && tls_end > stack_hi) {
    tls_end = stack_hi;
  }
  Exclude(tls, tls_end - tls);
}

bool LinuxMemory::RegisterWithProtector(Addr start, std::size_t len) {
  if (protection_ != Protection::kUserfaultfd) return false;
  // Only the ioctl here: callers may be inside a window, where our heap
  // (the interval vectors) must not be written. They record it after.
  return protector_->RegisterRange(start, len);
}

// --- interval sets ---

void LinuxMemory::AddInterval(std::vector<Interval>* set, Addr start,
                              Addr end) {
  if (start >= end) return;
  auto it =
      std::lower_bound(set->begin(), set->end(), start,
                       [](const Interval& i, Addr a) { return i.end < a; });
  // it: first interval that ends at or after start (may touch it).
  Addr s = start, e = end;
  auto first = it;
  while (it != set->end() && it->start <= e) {
    s = std::min(s, it->start);
    e = std::max(e, it->end);
    ++it;
  }
  it = set->erase(first, it);
  set->insert(it, Interval{s, e});
}

void LinuxMemory::RemoveInterval(std::vector<Interval>* set, Addr start,
                                 Addr end) {
  if (start >= end) return;
  auto it =
      std::lower_bound(set->begin(), set->end(), start,
                       [](const Interval& i, Addr a) { return i.end <= a; });
  while (it != set->end() && it->start < end) {
    Interval cur = *it;
    if (cur.start < start && cur.end > end) {  // split in two
      it->end = start;
      set->insert(it + 1, Interval{end, cur.end});
      return;
    }
    if (cur.start < start) {
      it->end = start;
      ++it;
    } else if (cur.end > end) {
      it->start = end;
      return;
    } else {
      it = set->erase(it);
    }
  }
}

// Calls f(from, to) for each part of [start, end) in the set; false if one
// call returned false.
template <typename F>
static bool ForEachOverlap(const std::vector<LinuxMemory::Interval>& set,
                           Addr start, Addr end, F&& f) {
  bool ok = true;
  for (const LinuxMemory::Interval& i : set) {
    const Addr from = std::max(start, i.start);
    const Addr to = std::min(end, i.end);
    if (from < to && !f(from, to)) ok = false;
  }
  return ok;
}

bool LinuxMemory::ReapplyVmaFlags(Addr start, std::size_t len, bool lock) {
  const Addr end = start + len;
  auto advise = [](int advice) {
    return [advice](Addr from, Addr to) {
      return madvise(Ptr(from), to - from, advice) == 0;
    };
  };
  bool ok = ForEachOverlap(dontfork_, start, end, advise(MADV_DONTFORK));
  ok &= ForEachOverlap(dontdump_, start, end, advise(MADV_DONTDUMP));
  // Transparent huge page advice (until 2026-12-06 a merge or an unmerge
  // dropped it: preload.thp_advice_test).
  ok &= ForEachOverlap(hugepage_, start, end, advise(MADV_HUGEPAGE));
  ok &= ForEachOverlap(nohugepage_, start, end, advise(MADV_NOHUGEPAGE));
  if (lock) {
    ok &= ForEachOverlap(locked_, start, end, [this](Addr from, Addr to) {
      if (mlock(Ptr(from), to - from) == 0) return true;
      locks_lost_ += (to - from) / kPageSize;
      return false;
    });
  }
  return ok;
}

bool LinuxMemory::Covers(const std::vector<Interval>& set, Addr start,
                         Addr end) {
  auto it =
      std::upper_bound(set.begin(), set.end(), start,
                       [](Addr a, const Interval& i) { return a < i.start; });
  return it != set.begin() && std::prev(it)->end >= end;
}

bool LinuxMemory::Overlaps(const std::vector<Interval>& set, Addr start,
                           Addr end) {
  return NextIntervalStart(set, start) < end;
}

Addr LinuxMemory::NextIntervalStart(const std::vector<Interval>& set, Addr a) {
  auto it =
      std::lower_bound(set.begin(), set.end(), a,
                       [](const Interval& i, Addr x) { return i.end <= x; });
  return it == set.end() ? ~Addr{0} : it->start;
}

bool LinuxMemory::LockViewStale(Addr start, std::size_t len) {
  // msync(MS_INVALIDATE) does nothing to private memory, but fails with
  // EBUSY at the first locked VMA of the range: a cheap question.
  const bool locked_now =
      msync(Ptr(start), len, MS_INVALIDATE) != 0 && errno == EBUSY;
  if (locked_now == Overlaps(locked_, start, start + len)) return false;
  view_fresh_ = false;  // read the maps again at the next full scan,
  view_read_at_ = 0;    // however recent the view,
  smaps_read_at_ = 0;   // from smaps: the plain maps show no locks
  return true;
}

bool LinuxMemory::LockRoomForReplacement() {
  // Locking a replacement brings locked_vm back to where it was, which the
  // kernel allows iff locked_vm <= RLIMIT_MEMLOCK (or CAP_IPC_LOCK). Asked
  // of the kernel itself first, one page stricter, on one page of our
  // scratch area (locked on fault, so nothing is populated, then unlocked).
  if (mlock2(Ptr(scratch_), kPageSize, MLOCK_ONFAULT) == 0) {
    munlock(Ptr(scratch_), kPageSize);
    return true;
  }
  // At the limit exactly, or beyond it (the limit was lowered since).
  rlimit limit;
  std::string status;
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0 ||
      !ReadProcFile(options_.status_path, &status).ok()) {
    return false;
  }
  const std::size_t at = status.find("\nVmLck:");
  if (at == std::string::npos) return false;
  const std::uint64_t locked_kib =
      std::strtoull(status.c_str() + at + 7, nullptr, 10);
  return limit.rlim_cur == RLIM_INFINITY || locked_kib * 1024 <= limit.rlim_cur;
}

bool LinuxMemory::LockRoomFor(Addr start, std::size_t len) {
  if (!Overlaps(locked_, start, start + len) || LockRoomForReplacement()) {
    return true;
  }
  lock_skips_ += len / kPageSize;
  return false;
}

bool LinuxMemory::LockFrameMapping(Addr at, std::size_t len) {
  // MLOCK_ONFAULT: nothing is populated now, nor when the VMA is made
  // writable (VM_LOCKONFAULT skips the write-fault populate of mprotect).
  const bool locked =
      ForEachOverlap(locked_, at, at + len, [](Addr from, Addr to) {
        return mlock2(Ptr(from), to - from, MLOCK_ONFAULT) == 0;
      });
  if (!locked || mprotect(Ptr(at), len, kReadWrite) != 0) return false;
  // Read faults map the frames, shared, and lock them: locked memory is
  // resident, as the application asked.
  (void)madvise(Ptr(at), len, MADV_POPULATE_READ);
  return true;
}

bool LinuxMemory::PinnedIoIn(Addr at, std::size_t len) {
  if (!PinnedIoOverlaps(at, at + len)) return false;
  pinned_io_skips_ += len / kPageSize;
  return true;
}

bool LinuxMemory::StillProtected(Addr at, std::size_t len, ProtectMethod how) {
  if (how == ProtectMethod::kUffd) {
    // Every page still carries our write-protect bit (present pages and the
    // markers of never-touched ones): a mapping made since has none.
    for (std::size_t done = 0; done < len / kPageSize;) {
      const std::size_t n = std::min(kProbeChunk, len / kPageSize - done);
      if (ReadPagemap(at + done * kPageSize, n) != n) {
        return true;  // cannot tell: as before this check existed
      }
      for (std::size_t k = 0; k < n; ++k) {
        if (!(pagemap_buf_[k] & kPmUffdWp)) return false;
      }
      done += n;
    }
    return true;
  }
  if (how == ProtectMethod::kMprotect && maps_query_fd_ >= 0) {
    // Still read-only: a mapping made since is writable.
    for (Addr a = at; a < at + len;) {
      ProcmapQuery q;
      if (!QueryVma(maps_query_fd_, a, &q)) {
        return errno != ENOENT;  // ENOTTY (before 6.11): cannot tell
      }
      if (q.vma_start > a || (q.vma_flags & kProcmapVmaWritable)) return false;
      a = q.vma_end;
    }
  }
  return true;
}

bool LinuxMemory::ViewIntact(const FrameId* frames, std::size_t n) {
  if (maps_query_fd_ < 0) return true;
  std::vector<std::size_t> checked;  // frames mostly share a chunk or two
  bool intact = true;
  for (std::size_t k = 0; k < n; ++k) {
    if (!store_.IsAllocated(frames[k])) continue;
    const std::size_t c = store_.ChunkOf(frames[k]);
    if (std::find(checked.begin(), checked.end(), c) != checked.end()) {
      continue;
    }
    checked.push_back(c);
    const Addr a = reinterpret_cast<Addr>(store_.FrameAddress(frames[k]));
    ProcmapQuery q;
    if (!QueryVma(maps_query_fd_, a, &q)) {
      if (errno == ENOTTY) return true;  // before 6.11: cannot tell
      q = ProcmapQuery{};                // ENOENT: unmapped
    }
    const bool ours =
        q.vma_start <= a && (q.vma_flags & kProcmapVmaShared) != 0 &&
        q.inode == store_.inode() && major(store_.dev()) == q.dev_major &&
        minor(store_.dev()) == q.dev_minor &&
        q.vma_offset + (a - q.vma_start) ==
            static_cast<std::uint64_t>(store_.FrameOffset(frames[k]));
    if (!ours) {
      (void)store_.RemapChunk(c);
      intact = false;
    }
  }
  return intact;
}

bool LinuxMemory::AnonymousVmas(Addr at, std::size_t len, Addr* last_end) {
  if (maps_query_fd_ < 0) return false;
  for (Addr a = at; a < at + len;) {
    ProcmapQuery q;
    if (!QueryVma(maps_query_fd_, a, &q)) return false;
    if (q.vma_start > a || FileBacked(q)) return false;
    a = q.vma_end;
    if (last_end != nullptr) *last_end = a;
  }
  return true;
}

MergeResult LinuxMemory::MapFrames(Addr at, std::size_t len, FrameId first,
                                   ProtectMethod how) {
  if (!StillProtected(at, len, how)) return MergeResult::kGone;
  if (options_.map_delay_us > 0)
    usleep(static_cast<useconds_t>(options_.map_delay_us));
  // A locked private mapping made writable (or mapped writable while
  // mlockall(MCL_FUTURE) is in force) is populated with write faults: every
  // frame would be copied at once. Locked memory is mapped read-only first.
  const bool locked = Overlaps(locked_, at, at + len);
  const int prot = locked ? PROT_READ : kReadWrite;
  const int flags = MAP_PRIVATE | MAP_FIXED;
  const int fd = store_.fd();
  const off_t offset = store_.FrameOffset(first);
  // Born locked (and populated with read faults) where it can be, so that
  // the range never shows unlocked. MAP_LOCKED needs RLIMIT_MEMLOCK room
  // for len more while the old mapping still counts: near the limit, the
  // lock comes just after the mapping.
  const bool born_locked =
      locked && Covers(locked_, at, at + len) &&
      mmap(Ptr(at), len, prot, flags | MAP_LOCKED, fd, offset) != MAP_FAILED;
  if (!born_locked &&
      mmap(Ptr(at), len, prot, flags, fd, offset) == MAP_FAILED) {
    return errno == ENOMEM ? MergeResult::kNoBudget : MergeResult::kFailed;
  }
  last_mapped_end_ = at + len;
  if (locked && !LockFrameMapping(at, len)) {
    // Another thread took the room under RLIMIT_MEMLOCK since
    // LockRoomForReplacement. Nothing was written to the read-only frames:
    // give the pages back as anonymous memory, locked again if it can be.
    protector_->Replaced(at, len, how);
    if (ReplaceWithAnonymousCopy(at, len, kReadWrite)) {
      // A new VMA: registered again, as uffd_registered_ has it (should
      // the ioctl fail, the next smaps read finds it out).
      (void)RegisterWithProtector(at, len);
      return MergeResult::kFailed;
    }
    // Still the frames: merged, writable, not locked.
    mprotect(Ptr(at), len, kReadWrite);
    locks_lost_ += len / kPageSize;
  }
  (void)ReapplyVmaFlags(at, len, /*lock=*/false);
  return MergeResult::kMerged;
}

const LinuxMemory::Interval* LinuxMemory::Find(const std::vector<Interval>& set,
                                               Addr page) {
  auto it =
      std::upper_bound(set.begin(), set.end(), page,
                       [](Addr a, const Interval& i) { return a < i.start; });
  if (it == set.begin() || std::prev(it)->end <= page) return nullptr;
  return &*std::prev(it);
}

bool LinuxMemory::Contains(const std::vector<Interval>& set, Addr page) {
  return Find(set, page) != nullptr;
}

void LinuxMemory::Exclude(Addr addr, std::size_t len) {
  Addr start = addr & ~(kPageSize - 1);
  Addr end = RoundUp(addr + len);
  AddInterval(&excluded_, start, end);
}

bool LinuxMemory::IsExcluded(Addr page) const {
  return Contains(excluded_, page) || Contains(auto_excluded_, page);
}

bool LinuxMemory::IsTouchable(Addr page) const {
  // Scans ask page after page of one interval: remember the last one hit.
  if (page >= touchable_hit_.start && page < touchable_hit_.end) return true;
  const Interval* hit = Find(touchable_, page);
  if (hit == nullptr) return false;
  touchable_hit_ = *hit;
  return true;
}

namespace {
bool IsFile(const MapEntry& e, dev_t dev, ino_t ino) {
  return e.inode == ino && e.dev_major == major(dev) &&
         e.dev_minor == minor(dev);
}
}  // namespace

bool LinuxMemory::IsStoreMemfd(const MapEntry& e) const {
  return IsFile(e, store_.dev(), store_.inode());
}

bool LinuxMemory::IsOurMemfd(const MapEntry& e) const {
  if (IsStoreMemfd(e)) return true;
  for (auto [dev, ino] : options_.adopted_memfds) {
    if (IsFile(e, dev, ino)) return true;
  }
  return false;
}

std::vector<std::pair<dev_t, ino_t>> LinuxMemory::MemfdLineage() const {
  auto lineage = options_.adopted_memfds;
  lineage.emplace_back(store_.dev(), store_.inode());
  return lineage;
}

bool LinuxMemory::Eligible(const MapEntry& e) const {
  if (e.shared || !e.read || !e.write || e.exec || e.flags_unknown)
    return false;
  if (IsSpecialMapping(e) ||
      HasUnmergeableVmFlags(e, Contains(uffd_registered_, e.start))) {
    return false;
  }
  return IsPrivateAnonymous(e) || IsOurMemfd(e);
}

bool LinuxMemory::IsThreadStackLike(const std::vector<MapEntry>& maps,
                                    std::size_t i) {
  if (i == 0) return false;
  const MapEntry& e = maps[i];
  const MapEntry& guard = maps[i - 1];
  return guard.end == e.start && !guard.read && !guard.write && !guard.exec &&
         IsPrivateAnonymous(guard) && IsPrivateAnonymous(e) && e.write;
}

// --- the maps view and the VMA budget ---

Status LinuxMemory::RefreshMaps(bool full) {
  std::vector<MapEntry> maps;
  return ReadAndApplyView(full, &maps);
}

Status LinuxMemory::ReadAndApplyView(bool full, std::vector<MapEntry>* maps) {
  const std::int64_t started = MonotonicNanos();
  const std::uint64_t epoch = g_vma_flags_epoch.load();
  const std::uint64_t unseen = g_unseen_reprotects.load();
  Status s = ReadView(maps, full);
  if (s.ok()) s = ApplyView(*maps, started, epoch, unseen);
  return s;
}

Status LinuxMemory::ApplyView(const std::vector<MapEntry>& maps,
                              std::int64_t started, std::uint64_t epoch,
                              std::uint64_t unseen) {
  Status s = ApplyMaps(maps);
  if (!s.ok()) return s;
  view_read_at_ = MonotonicNanos();
  view_took_ = view_read_at_ - started;
  view_epoch_ = epoch;
  view_unseen_ = unseen;
  view_unknown_ = std::any_of(maps.begin(), maps.end(), [](const MapEntry& e) {
    return e.flags_unknown;
  });
  return s;
}

bool LinuxMemory::RecentViewReusable() const {
  return reuse_recent_views_ && view_read_at_ != 0 &&
         g_vma_flags_epoch.load() == view_epoch_ &&
         MonotonicNanos() - view_read_at_ <
             std::max(options_.smaps_cost_share * view_took_,
                      options_.recent_view_ns);
}

bool LinuxMemory::MergeableKind(const MapEntry& e) const {
  return !e.shared && e.read && e.write && !e.exec &&
         (IsPrivateAnonymous(e) || IsOurMemfd(e));
}

void NoteVmaFlagsChanged() { g_vma_flags_epoch.fetch_add(1); }

void NoteUnseenReprotect() { g_unseen_reprotects.fetch_add(1); }

int LinuxMemory::OpenMergeWindowSeen(Addr start, Addr end) {
  // The count only grows under the window lock's shared hold, which this
  // caller's exclusive hold excludes: no reprotect comes between this
  // check and the window's close.
  if (g_unseen_reprotects.load() != view_unseen_) return -1;
  return OpenMergeWindow(start, end);
}

bool FrameMappingsKnowable() {
  int works = g_query_works.load(std::memory_order_acquire);
  if (works < 0) {
    const int fd = QueryFd();
    ProcmapQuery q;
    int local = 0;
    works = fd >= 0 && QueryVma(fd, reinterpret_cast<Addr>(&local), &q) ? 1 : 0;
    g_query_works.store(works, std::memory_order_release);
  }
  return works == 1;
}

void ZeroFrameMappedPages(Addr start, Addr end) {
  const int fd = QueryFd();
  if (fd < 0) return;
  for (Addr a = start; a < end;) {
    ProcmapQuery q;
    if (!QueryVma(fd, a, &q, kProcmapCoveringOrNext) || q.vma_start >= end)
      return;
    const Addr from = std::max<Addr>(a, q.vma_start);
    const Addr to = std::min<Addr>(end, q.vma_end);
    if (!(q.vma_flags & kProcmapVmaShared) &&
        (q.vma_flags & kProcmapVmaWritable) && IsRememberedMemfd(q)) {
      // A private mapping of a frame: each page written reads zeros and is
      // a private copy from now on.
      std::memset(Ptr(from), 0, to - from);
    }
    a = q.vma_end;
  }
}

namespace {

// The mappings over [start, end), from PROCMAP_QUERY or, before Linux
// 6.11, from /proc/self/maps.
bool MappingsOver(Addr start, Addr end, std::vector<MapEntry>* maps) {
  const int fd = QueryFd();
  if (fd >= 0 && FrameMappingsKnowable()) {
    return QueryMappingsOf(fd, start, end, maps);
  }
  return ReadMappingsOver("/proc/self/maps", start, end, maps);
}

// A piece of a range moved by MremapPieces: [start, end) of the range,
// and where it went.
struct MovedPiece {
  Addr start, end, to;
};

}  // namespace

void* MremapPieces(Addr old, std::size_t old_len, std::size_t new_len,
                   int flags, Addr new_addr) {
  old_len = RoundUp(old_len);
  new_len = RoundUp(new_len);
  const Addr end = old + old_len;
  std::vector<MapEntry> maps;
  bool pieces = old_len != 0 && end > old && MappingsOver(old, end, &maps) &&
                maps.size() > 1;
  for (std::size_t i = 0; pieces && i < maps.size(); ++i) {
    const MapEntry& e = maps[i];
    const MapEntry& first = maps.front();
    pieces = IsPrivateAnonymous(e) && ProtOf(e) == ProtOf(first) &&
             e.path == first.path &&
             (i == 0 ? e.start <= old : e.start == maps[i - 1].end);
  }
  if (!pieces || maps.back().end < end) {
    errno = EFAULT;
    return MAP_FAILED;
  }
  const bool fixed = (flags & MREMAP_FIXED) != 0;
  const bool grows = new_len > old_len;
  if (!fixed && !grows) {
    // In place: the kernel shrinks before it looks at the mappings, so
    // only an unchanged size (or a DONTUNMAP move) comes here.
    if (!(flags & MREMAP_DONTUNMAP)) return Ptr(old);
  }
  if (!fixed && grows && maps.back().end == end) {
    // Grown in place where the last piece can grow, as the kernel tries
    // first.
    const Addr last = std::max(maps.back().start, old);
    if (mremap(Ptr(last), end - last, end - last + (new_len - old_len), 0) !=
        MAP_FAILED) {
      return Ptr(old);
    }
  }
  if (!fixed && !(flags & MREMAP_MAYMOVE)) {
    errno = ENOMEM;  // what mremap says when it cannot grow in place
    return MAP_FAILED;
  }
  // A shrinking move drops the tail first, as the kernel does.
  const Addr keep_end = old + std::min(old_len, new_len);
  if (keep_end < end && munmap(Ptr(keep_end), end - keep_end) != 0) {
    return MAP_FAILED;
  }
  // The target: the caller's, or room the kernel finds, held by an
  // inaccessible reservation that the pieces replace one by one.
  Addr to = new_addr;
  if (!fixed) {
    void* room = mmap(nullptr, new_len, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (room == MAP_FAILED) return MAP_FAILED;
    to = reinterpret_cast<Addr>(room);
  }
  const int move = MREMAP_MAYMOVE | MREMAP_FIXED | (flags & MREMAP_DONTUNMAP);
  std::vector<MovedPiece> moved;
  for (const MapEntry& e : maps) {
    const Addr s = std::max(e.start, old), t = std::min(e.end, keep_end);
    if (s >= t) continue;
    const Addr at = to + (s - old);
    const std::size_t grown = t == keep_end ? to + new_len - at : t - s;
    if (mremap(Ptr(s), t - s, grown, move, Ptr(at)) != MAP_FAILED) {
      moved.push_back({s, t, at});
      continue;
    }
    // Back where they were, in the reverse order; the reservation left
    // (never a hole another thread may have mapped since) is given back.
    const int err = errno;
    for (auto m = moved.rbegin(); m != moved.rend(); ++m) {
      (void)mremap(Ptr(m->to), m->end - m->start, m->end - m->start,
                   MREMAP_MAYMOVE | MREMAP_FIXED, Ptr(m->start));
    }
    if (!fixed) (void)munmap(Ptr(at), to + new_len - at);
    errno = err;
    return MAP_FAILED;
  }
  return Ptr(to);
}

// Adjacent anonymous mappings of mergeable kind: a split of anonymous
// memory (our merges only split it where our memfd begins or ends).
bool LinuxMemory::IsAnonSplit(const MapEntry& a, const MapEntry& b) const {
  return a.end == b.start && MergeableKind(a) && MergeableKind(b) &&
         !IsOurMemfd(a) && !IsOurMemfd(b);
}

bool LinuxMemory::AnonSplitsKnown(std::vector<MapEntry>* maps,
                                  bool defer) const {
  for (std::size_t i = 1; i < maps->size(); ++i) {
    MapEntry& a = (*maps)[i - 1];
    MapEntry& b = (*maps)[i];
    // New memory next to known memory is flags_unknown anyway.
    if (!IsAnonSplit(a, b) || !a.has_vm_flags || !b.has_vm_flags) continue;
    if (std::binary_search(anon_splits_.begin(), anon_splits_.end(), b.start))
      continue;
    if (!defer) return false;
    a.flags_deferred = true;
    b.flags_deferred = true;
  }
  return true;
}

void LinuxMemory::NoteAnonSplits(const std::vector<MapEntry>& maps) {
  anon_splits_.clear();
  anon_splits_made_.clear();
  for (std::size_t i = 1; i < maps.size(); ++i) {
    if (IsAnonSplit(maps[i - 1], maps[i]))
      anon_splits_.push_back(maps[i].start);
  }
}

Status LinuxMemory::ReadView(std::vector<MapEntry>* maps, bool full) {
  const std::int64_t now = MonotonicNanos();
  const std::uint64_t epoch = g_vma_flags_epoch.load();
  const std::int64_t age = now - smaps_read_at_;
  // What a smaps read would cost now: the last one, and its text for each
  // mapping added since (merges add thousands of one-page mappings between
  // two reads, and the last read may have seen a hundred).
  auto cost_now = [&](std::size_t mappings) { return SmapsCost(mappings); };
  auto expensive = [&](std::int64_t cost) {
    return cost >= options_.smaps_expensive_ns;
  };
  // Whether a read now keeps smaps within its share of the time.
  auto may_read = [&](std::int64_t cost) {
    return !expensive(cost) || age >= options_.smaps_cost_share * cost;
  };
  // The periodic read, judged by the mappings the last view showed.
  const std::int64_t interval = SmapsInterval();
  if (!full && smaps_read_at_ != 0 && !options_.plain_maps_path.empty() &&
      age < interval && epoch == smaps_epoch_ &&
      ReadMaps(options_.plain_maps_path, maps).ok()) {
    view_mappings_ = maps->size();
    // A forked child's first view puts off what it would read smaps for
    // (its own start grew a malloc arena) to its next read.
    const bool read_now =
        !inherited_view_ && may_read(cost_now(view_mappings_));
    bool known = true;
    for (MapEntry& e : *maps) {
      if (!MergeableKind(e)) continue;
      auto run = std::upper_bound(
          flag_runs_.begin(), flag_runs_.end(), e.start,
          [](Addr a, const FlagRun& r) { return a < r.start; });
      const bool after_prev =
          run == flag_runs_.begin() || std::prev(run)->end <= e.start;
      if (after_prev && (run == flag_runs_.end() || run->start >= e.end)) {
        // Wholly new memory (none of it mergeable at the last smaps read),
        // whose flags only smaps shows: left alone until the next smaps
        // read rather than read now. Memory becomes mergeable only through
        // MergeableParts, whose memory a smaps read must see before it is
        // touched (advised_unread_), and AnonymousRanges, which reads
        // smaps itself; reading it for every new mapping (our own metadata
        // and the scanner's malloc arena among them) walks the page tables
        // of all memory, at every scan of a process that maps often.
        e.flags_unknown = true;
        continue;
      }
      if (after_prev || std::prev(run)->end < e.end) {
        // Known memory grown or joined with new (brk, mremap in place):
        // its flags may have changed with it.
        if (read_now) {
          known = false;
          break;
        }
        e.flags_deferred = true;
        continue;
      }
      e.vm_flags = std::prev(run)->flags;
      if (Contains(uffd_registered_, e.start)) e.vm_flags += " uw";
      e.has_vm_flags = true;
    }
    if (!anon_splits_made_.empty()) {
      std::sort(anon_splits_made_.begin(), anon_splits_made_.end());
      const auto middle =
          anon_splits_.insert(anon_splits_.end(), anon_splits_made_.begin(),
                              anon_splits_made_.end());
      std::inplace_merge(anon_splits_.begin(), middle, anon_splits_.end());
      anon_splits_.erase(std::unique(anon_splits_.begin(), anon_splits_.end()),
                         anon_splits_.end());
      anon_splits_made_.clear();
    }
    ++maps_reads_;
    if (known && AnonSplitsKnown(maps, /*defer=*/!read_now))
      return Status::Ok();
  }
  maps->clear();
  const std::int64_t started = MonotonicNanos();
  Status s = ReadMaps(options_.maps_path, maps);
  if (!s.ok()) return s;
  advised_unread_.clear();  // their flags are in this read
  smaps_took_ = MonotonicNanos() - started;
  smaps_mappings_ = maps->size();
  view_mappings_ = maps->size();
  flag_runs_.clear();
  for (const MapEntry& e : *maps) {
    if (!MergeableKind(e)) continue;
    std::string flags =
        FlagsReadBySamepage(e.vm_flags, Contains(uffd_registered_, e.start));
    if (!flag_runs_.empty() && flag_runs_.back().end == e.start &&
        flag_runs_.back().flags == flags) {
      flag_runs_.back().end = e.end;
    } else {
      flag_runs_.push_back(FlagRun{e.start, e.end, std::move(flags)});
    }
  }
  if (flag_runs_.capacity() > 2 * flag_runs_.size() + 64)
    flag_runs_.shrink_to_fit();
  NoteAnonSplits(*maps);
  smaps_read_at_ = now;
  ++smaps_reads_;
  smaps_epoch_ = epoch;
  return Status::Ok();
}

Status LinuxMemory::ApplyMaps(const std::vector<MapEntry>& maps) {
  FindStrayFrameMappings(maps);  // before frame_mapped_ is read anew
  touchable_.clear();
  touchable_hit_ = Interval{0, 0};
  auto_excluded_.clear();
  left_out_.clear();
  flags_unread_.clear();
  frame_mapped_.clear();
  dontfork_.clear();
  dontdump_.clear();
  hugepage_.clear();
  nohugepage_.clear();
  locked_.clear();
  for (std::size_t i = 0; i < maps.size(); ++i) {
    const MapEntry& e = maps[i];
    if (!e.shared && IsOurMemfd(e)) AddInterval(&frame_mapped_, e.start, e.end);
    if (e.path == "[stack]") {
      AddInterval(&auto_excluded_, e.start, e.end);
      continue;
    }
    // A write fault on a thread's own stack cannot deliver SIGSEGV.
    if (protection_ == Protection::kMprotect && IsThreadStackLike(maps, i)) {
      AddInterval(&auto_excluded_, e.start, e.end);
      continue;
    }
    const bool rw_anonymous = MergeableKind(e) && IsPrivateAnonymous(e);
    if (e.flags_deferred) {
      AddInterval(&auto_excluded_, e.start, e.end);
      if (rw_anonymous) AddInterval(&flags_unread_, e.start, e.end);
      continue;
    }
    if (!Eligible(e)) {
      // Private anonymous memory whose advice the kernel would keep, left
      // out (AdvisableParts): read+write, for flags a replacement would
      // lose; or of another protection, which an mprotect may make
      // read+write again (its flags are known only after a smaps read, but
      // only a droppable mapping's would matter, and mprotect keeps
      // VM_MERGEABLE). Memory whose flags are still to be read (new since
      // the last smaps read) may resume (EligibleParts).
      if (IsPrivateAnonymous(e) && !e.flags_unknown && !e.HasVmFlag("dp") &&
          (e.has_vm_flags || !MergeableKind(e))) {
        AddInterval(&left_out_, e.start, e.end);
      } else if (rw_anonymous && e.flags_unknown) {
        AddInterval(&flags_unread_, e.start, e.end);
      }
      continue;
    }
    AddInterval(&touchable_, e.start, e.end);
    if (e.HasVmFlag("dc")) AddInterval(&dontfork_, e.start, e.end);
    if (e.HasVmFlag("dd")) AddInterval(&dontdump_, e.start, e.end);
    if (e.HasVmFlag("hg")) AddInterval(&hugepage_, e.start, e.end);
    if (e.HasVmFlag("nh")) AddInterval(&nohugepage_, e.start, e.end);
    if (e.HasVmFlag("lo")) AddInterval(&locked_, e.start, e.end);
    // Eligible() accepted a "uw" VMA only as ours: it is registered with our
    // descriptor already (re-registering costs a syscall per VMA per scan).
    if (e.has_vm_flags && e.HasVmFlag("uw")) continue;
    // Never the scratch area: a registered scratch copy moved into place
    // (ReplaceWithAnonymousCopy) may be joined by the kernel with a
    // registered neighbour that came from the scratch area before, and
    // mremap then drops the joined VMA's registration but not its pages'
    // write-protect bits, which no one could clear any more.
    if (e.start < scratch_ + kScratchBytes && scratch_ < e.end) continue;
    if (RegisterWithProtector(e.start, e.size()))
      AddInterval(&uffd_registered_, e.start, e.end);
  }

  for (const Interval& x : advised_unread_)
    AddInterval(&auto_excluded_, x.start, x.end);

  // Merges add to it between refreshes; growing it is not for the hot path.
  frame_mapped_.reserve(2 * frame_mapped_.size() + 1024);

  UpdateBudget(static_cast<long>(maps.size()));
  return Status::Ok();
}

void LinuxMemory::UpdateBudget(long count) {
  if (baseline_maps_ == 0) baseline_maps_ = count;
  // Our estimate only ever shrinks to what the kernel really shows: runs
  // that it joined cost less than we charged.
  std::uint64_t growth =
      count > baseline_maps_
          ? static_cast<std::uint64_t>(count - baseline_maps_)
          : 0;
  vmas_used_ = std::min(vmas_used_, growth);
  recounted_at_ = vmas_used_;
  if (options_.vma_budget != 0) {
    budget_ = options_.vma_budget;
  } else {
    long margin = std::min<long>(2048, max_map_count_ / 4);
    long room = max_map_count_ - count - margin;
    budget_ = vmas_used_ + static_cast<std::uint64_t>(std::max<long>(room, 0));
  }
}

std::uint64_t LinuxMemory::MappingCost(Addr start, Addr end,
                                       Addr mapped_to) const {
  if (Overlaps(frame_mapped_, start, end)) return 2;
  const bool left_edge = start == last_mapped_end_ || start == mapped_to ||
                         Contains(frame_mapped_, start - kPageSize);
  return (left_edge ? 0 : 1) + (Contains(frame_mapped_, end) ? 0 : 1);
}

void LinuxMemory::RecountIfShort(std::uint64_t extra) {
  if (vmas_used_ + extra <= budget_) return;
  // The charge is an upper bound (MappingCost; windows and fallbacks
  // charge the worst case, and the kernel joins some mappings we count
  // apart), and the application may have unmapped memory since. Count what
  // the kernel really holds, at most once per kRecountStep charged
  // mappings or an eighth of what we held at the last count (a count reads
  // /proc/self/maps: 0.5-0.7 us per VMA).
  if (vmas_used_ < recounted_at_ + std::max(kRecountStep, recounted_at_ / 8))
    return;
  long count = CountMappings("/proc/self/maps");
  if (count >= 0) UpdateBudget(count);
}

void LinuxMemory::BeginFullScan() {
  RegisterThread();
  // A view applied since the last scan began (merge-any's AnonymousRanges
  // reads smaps right at the end of a scan) is this scan's view: reading
  // smaps again would double the cost of the biggest per-scan step.
  // On failure keep the previous view. Memory advised since the last
  // smaps read makes this one a smaps read (Probe would make one anyway).
  // A view this recent is kept by the background scanner (see
  // ReuseRecentViews): it is as old as a full scan of a large process's
  // would be by its end.
  // Frames held since the last read (see held_) wait for the next one.
  if (!advised_unread_.empty()) {
    (void)RefreshMaps(/*full=*/true);
  } else if (hold_releases_ || !held_.empty() ||
             (!view_fresh_ && !RecentViewReusable())) {
    (void)RefreshMaps(/*full=*/false);
  }
  view_fresh_ = false;
}

std::int64_t LinuxMemory::SmapsCost(std::size_t mappings) const {
  const std::size_t added =
      mappings > smaps_mappings_ ? mappings - smaps_mappings_ : 0;
  return smaps_took_ +
         static_cast<std::int64_t>(added) * options_.smaps_ns_per_mapping;
}

std::int64_t LinuxMemory::SmapsInterval() const {
  const std::int64_t cost = SmapsCost(view_mappings_);
  return cost >= options_.smaps_expensive_ns
             ? std::max(kSmapsInterval, options_.smaps_cost_share * cost)
             : kSmapsInterval;
}

bool LinuxMemory::SmapsReadFresh() const {
  // As long as ReadView keeps to the plain maps: where smaps is expensive
  // that is longer than kSmapsInterval, and a range unmerged then (each
  // MADV_DONTNEED of a forked Redis's save, say) would read every mapping
  // at every call without ever reading smaps.
  return smaps_read_at_ != 0 &&
         MonotonicNanos() - smaps_read_at_ < SmapsInterval() &&
         g_vma_flags_epoch.load() == smaps_epoch_;
}

bool LinuxMemory::RangeMapped(Addr start, std::size_t len) const {
  // msync(MS_ASYNC) only walks the VMAs: ENOMEM iff part is unmapped.
  return msync(Ptr(start), len, MS_ASYNC) == 0 || errno != ENOMEM;
}

MergeResult LinuxMemory::ClassifyProtectError(int err, Addr start,
                                              std::size_t len) const {
  if (err == ENOMEM) {
    // ENOMEM is both "unmapped" and "would exceed vm.max_map_count"; a range
    // mapped again by now was unmapped for a moment.
    if (!RangeMapped(start, len)) return MergeResult::kGone;
    long count = CountMappings("/proc/self/maps");
    return count < 0 || count + 3 >= max_map_count_ ? MergeResult::kNoBudget
                                                    : MergeResult::kGone;
  }
  if (err == EFAULT || err == EINVAL || err == EACCES || err == EPERM)
    return MergeResult::kGone;
  return MergeResult::kFailed;
}

// --- reading ---

std::size_t LinuxMemory::ReadPagemap(Addr base, std::size_t n) {
  // One pread for the chunk: 8 bytes per page.
  const ssize_t got =
      pread(pagemap_fd_, pagemap_buf_, n * sizeof(std::uint64_t),
            static_cast<off_t>(base / kPageSize * sizeof(std::uint64_t)));
  return got > 0 ? static_cast<std::size_t>(got) / sizeof(std::uint64_t) : 0;
}

void LinuxMemory::Probe(Addr addr, std::span<PageState> states) {
  RegisterThread();
  std::size_t total = states.size();
  // Memory advised since the last smaps read is reached: its flags first.
  // On failure it stays excluded (kExcluded).
  if (!advised_unread_.empty() &&
      Overlaps(advised_unread_, addr, addr + total * kPageSize)) {
    (void)RefreshMaps(/*full=*/true);
  } else if (g_unseen_reprotects.load() != view_unseen_) {
    // Memory made read-only unseen: merge windows wait for a view that
    // shows it (OpenMergeWindowSeen).
    (void)RefreshMaps(/*full=*/false);
  }
  for (std::size_t done = 0; done < total;) {
    std::size_t n = std::min(kProbeChunk, total - done);
    Addr base = addr + done * kPageSize;
    const Addr end = base + n * kPageSize;
    // A chunk wholly in memory we may touch, none of it excluded (the
    // common case), needs no lookups per page below.
    const bool clean = SpanReplaceable(base, end);
    // Where none of our frames is mapped, touchable memory is anonymous
    // only: mincore says which pages are present at about a ninth of
    // pagemap's cost (8 against 75 ns a page, measured here), and is what
    // a full scan of unmerged memory spends most on outside hashing; it
    // fails (ENOMEM) on any hole, so success also says all is mapped.
    // Where frames are mapped, pagemap's file bit tells a frame from a
    // private copy. So frame_mapped_ must cover every frame mapping we
    // made: a present frame page taken for an anonymous one would leave its
    // node, whose frame could then be released while still mapped.
    const bool frames_here = Overlaps(frame_mapped_, base, end);
    std::size_t valid = 0;
    bool all_mapped = false;
    if (!frames_here && mincore(Ptr(base), n * kPageSize, mincore_buf_) == 0) {
      for (std::size_t k = 0; k < n; ++k)
        pagemap_buf_[k] = (mincore_buf_[k] & 1) ? kPmPresent : 0;
      valid = n;
      all_mapped = true;
    } else {
      valid = ReadPagemap(base, n);
      // The maps view may be stale: the application may have unmapped pages.
      all_mapped = RangeMapped(base, n * kPageSize);
    }
    for (std::size_t k = 0; k < n; ++k) {
      Addr page = base + k * kPageSize;
      PageState st;
      if (!clean && IsExcluded(page)) {
        st = PageState::kExcluded;
      } else if ((!clean && !IsTouchable(page)) ||
                 (!all_mapped && !RangeMapped(page, kPageSize))) {
        st = PageState::kGone;
        // Gone for the core, but a mapping of a frame may be there still
        // (made read-only unseen), or moved elsewhere: see stray_mapped_.
        if (frames_here && Contains(frame_mapped_, page))
          AddInterval(&forgotten_frame_mapped_, page, page + kPageSize);
        // Left out by this view (for its flags, or not read+write): its
        // advice is held (AdvisableParts), whatever a later view shows.
        if (!clean && Contains(left_out_, page))
          AddInterval(&gone_left_out_, page, page + kPageSize);
      } else {
        std::uint64_t e = k < valid ? pagemap_buf_[k] : 0;
        if (!(e & kPmPresent)) {
          // An absent page of a merged mapping reads as its frame.
          st = frames_here && Contains(frame_mapped_, page)
                   ? PageState::kFrame
                   : PageState::kAbsent;
        } else {
          // Present and file-backed inside memory we may touch: one of our
          // frames (touchable file mappings are only our memfd's).
          st = (e & kPmFile) ? PageState::kFrame : PageState::kAnon;
        }
      }
      states[done + k] = st;
    }
    LeaveZeroPfnAbsent(base, states.subspan(done, n));
    if (frames_here)
      ForgetReplacedFrameMappings(base, states.subspan(done, n), valid);
    done += n;
  }
}

void LinuxMemory::ForgetReplacedFrameMappings(Addr base,
                                              std::span<PageState> states,
                                              std::size_t valid) {
  if (maps_query_fd_ < 0) return;  // before Linux 6.11: cannot tell cheaply
  const std::size_t n = states.size();
  // A page the view has in a frame mapping with no page of its own there
  // (called kFrame), or mapping the zero page (kAbsent though present),
  // which a mapping of a file never does.
  auto in_question = [&](std::size_t k) {
    const Addr page = base + k * kPageSize;
    if (!Contains(frame_mapped_, page)) return false;
    const bool present = k < valid && (pagemap_buf_[k] & kPmPresent) != 0;
    return (states[k] == PageState::kFrame && !present) ||
           (states[k] == PageState::kAbsent && present);
  };
  std::size_t k = 0;
  while (k < n && !in_question(k)) ++k;
  if (k == n) return;
  // mincore reports an absent page of a file mapping as in core when the
  // file's page is in the page cache, as a frame is; an absent page of
  // anonymous memory as not. It fails on a hole: every page asked about.
  const bool in_core_known =
      mincore(Ptr(base), n * kPageSize, mincore_buf_) == 0;
  for (; k < n; ++k) {
    if (!in_question(k)) continue;
    if (in_core_known && (mincore_buf_[k] & 1) &&
        states[k] == PageState::kFrame) {
      continue;
    }
    const Addr page = base + k * kPageSize;
    ProcmapQuery q;
    if (!QueryVma(maps_query_fd_, page, &q) || q.vma_start > page) continue;
    // Within this chunk: the rest of the mapping is looked at when its
    // pages are probed.
    const Addr from = std::max<Addr>(q.vma_start, base);
    const Addr vma_end = std::min<Addr>(q.vma_end, base + n * kPageSize);
    const bool anonymous =
        !FileBacked(q) && (q.vma_flags & kProcmapVmaShared) == 0;
    if (anonymous) {
      for (std::size_t j = (from - base) / kPageSize;
           base + j * kPageSize < vma_end; ++j) {
        if (states[j] == PageState::kFrame) states[j] = PageState::kAbsent;
      }
      RemoveInterval(&frame_mapped_, from, vma_end);
    }
    k = (vma_end - base) / kPageSize - 1;  // the loop's ++k: past the VMA
  }
}

void LinuxMemory::LeaveZeroPfnAbsent(Addr base, std::span<PageState> states) {
  // mincore and pagemap both call a page that maps the shared zero page
  // present. Taken for a page of its own, such a page was hashed, found
  // zero and dropped again at every full scan (a merge window and a
  // discard), and the program's next read of it faulted again: a page
  // dropped once and then only read, samepage's own tables among them,
  // churned so for ever. Kernel KSM passes the zero page by. PAGEMAP_SCAN
  // names it (Linux 6.7); before, nothing changes.
  if (!zero_pfn_scan_works_) return;
  if (std::find(states.begin(), states.end(), PageState::kAnon) ==
      states.end()) {
    return;
  }
  const Addr end = base + states.size() * kPageSize;
  PageRegion regions[16];
  for (Addr from = base; from < end;) {
    Addr walk_end = 0;
    const int found = PagemapScan(pagemap_fd_, from, end, kPageIsPfnZero,
                                  regions, /*max_pages=*/0, &walk_end);
    if (found < 0) {
      // EINVAL or ENOTTY before Linux 6.7; anything else (the range was
      // unmapped meanwhile) leaves this chunk as it is.
      if (errno == EINVAL || errno == ENOTTY) zero_pfn_scan_works_ = false;
      return;
    }
    for (int r = 0; r < found; ++r) {
      for (Addr a = std::max<Addr>(regions[r].start, base);
           a < std::min<Addr>(regions[r].end, end); a += kPageSize) {
        PageState& st = states[(a - base) / kPageSize];
        if (st == PageState::kAnon) st = PageState::kAbsent;
      }
    }
    if (walk_end <= from) return;
    from = walk_end;
  }
}

Addr LinuxMemory::SkipAbsent(Addr from, Addr to) {
  // Where Probe needs no lookups per page (touchable, none of it excluded,
  // no frame of ours mapped) and all is mapped, it says kAbsent of a page
  // with nothing in its page table entry. PAGEMAP_SCAN finds the first
  // page that has something there (present, or swapped, or a marker),
  // passing empty page tables whole. Before Linux 6.7 it fails: nothing is
  // passed.
  const Interval* touchable = Find(touchable_, from);
  if (touchable == nullptr) return from;
  Addr limit = std::min(to, touchable->end);
  for (const std::vector<Interval>* set :
       {&excluded_, &auto_excluded_, &frame_mapped_}) {
    limit = std::min(limit, std::max(from, NextIntervalStart(*set, from)));
  }
  if (limit <= from || !RangeMapped(from, limit - from)) return from;
  PageRegion region{};
  Addr walk_end = 0;
  const int found = PagemapScan(
      pagemap_fd_, from, limit, kPageIsPresent | kPageIsSwapped,
      std::span<PageRegion>(&region, 1), /*max_pages=*/1, &walk_end);
  if (found < 0) return from;
  const Addr to_page = found > 0 ? region.start : walk_end;
  return std::clamp(to_page & ~(kPageSize - 1), from, limit);
}

bool LinuxMemory::Hash(Addr addr, std::uint64_t* hash) {
  if (!IsTouchable(addr)) return false;
  // The scan visits pages in address order: the next one is likely read
  // next (PrefetchPage).
  PrefetchPage(Ptr(addr + kPageSize));
  return GuardedHash(Ptr(addr), hash);
}

bool LinuxMemory::HashFirstVisit(Addr addr, std::uint64_t* hash,
                                 bool* guessed) {
  if (!IsTouchable(addr)) return false;
  return GuardedHashFirstVisit(Ptr(addr), Ptr(addr + kPageSize), hash, guessed);
}

// --- merging ---

void LinuxMemory::UnprotectRest(Addr start, std::size_t n,
                                const MergeResult* results, bool skip_merged,
                                ProtectMethod how) {
  // Each page is left (merged), gone, or to unprotect; runs of one kind.
  enum Kind { kLeave, kGone, kRest };
  auto kind = [&](std::size_t i) {
    if (skip_merged && results[i] == MergeResult::kMerged) return kLeave;
    return results[i] == MergeResult::kGone ? kGone : kRest;
  };
  std::size_t k = 0;
  while (k < n) {
    const Kind run = kind(k);
    std::size_t e = k + 1;
    while (e < n && kind(e) == run) ++e;
    const Addr at = start + k * kPageSize;
    const std::size_t len = (e - k) * kPageSize;
    k = e;
    // Pages gone under the window (unmapped, discarded or replaced by a
    // call samepage does not see, such as glibc's own): what still carries
    // our write-protection (pages the call left, the markers of
    // never-touched ones) is cleared, and writers that faulted on them are
    // woken, since nothing reads the faults (Unprotect wakes the range,
    // whether or not every page of it could be cleared). A userfaultfd
    // touches only VMAs registered with it; mprotect would change whatever
    // is mapped there now, so under it gone pages are left (their writers
    // wait for the window, not for the page).
    if (run == kLeave || (run == kGone && how != ProtectMethod::kUffd))
      continue;
    if (!protector_->Unprotect(at, len, how) && how == ProtectMethod::kUffd)
      ClearStrayProtection(at, len);
  }
}

void LinuxMemory::ClearStrayProtection(Addr start, std::size_t len) {
  // A page that keeps our write-protect bit in a VMA that lost its
  // registration cannot be unprotected, and would block its next writer
  // for good once the VMA is registered again: register it and clear it.
  for (std::size_t done = 0; done < len / kPageSize;) {
    const Addr base = start + done * kPageSize;
    const std::size_t n = std::min(kProbeChunk, len / kPageSize - done);
    const std::size_t got = ReadPagemap(base, n);
    for (std::size_t k = 0; k < got; ++k) {
      if (!(pagemap_buf_[k] & kPmUffdWp)) continue;
      const Addr page = base + k * kPageSize;
      if (RegisterWithProtector(page, kPageSize))
        (void)protector_->Unprotect(page, kPageSize, ProtectMethod::kUffd);
    }
    done += n;
  }
}

void LinuxMemory::NoteMapped(Addr start, Addr end, bool registered) {
  unflushed_.push_back(NewMapping{start, end, registered});
  unflushed_pages_ += (end - start) / kPageSize;
}

void LinuxMemory::WakeReplaced(Addr start, Addr end) {
  // Waking writers on unrelated pages of the span is harmless: they fault
  // again and wait again. (Under mprotect writers wait for the window in
  // our handler, which its close wakes: callers pass userfaultfd spans.)
  if (start < end)
    protector_->Replaced(start, end - start, ProtectMethod::kUffd);
}

bool LinuxMemory::SpanReplaceable(Addr start, Addr end) const {
  return Covers(touchable_, start, end) && !Overlaps(excluded_, start, end) &&
         !Overlaps(auto_excluded_, start, end);
}

bool LinuxMemory::DiscardFirstCovers(Addr from, Addr page) const {
  const Addr end = page + kPageSize;
  return SpanReplaceable(from, end) && !Overlaps(locked_, from, end) &&
         !Overlaps(frame_mapped_, page, end);
}

void LinuxMemory::FlushMapped() {
  if (unflushed_.empty()) return;
  Addr lo = UINTPTR_MAX, hi = 0;
  std::size_t to_register = 0;  // mappings not registered yet
  for (const NewMapping& m : unflushed_) {
    if (m.registered) {
      new_registered_.push_back(Interval{m.start, m.end});
    } else {
      lo = std::min(lo, m.start);
      hi = std::max(hi, m.end);
      ++to_register;
    }
  }
  for (const NewMapping& m : unflushed_)
    new_frame_mapped_.push_back(Interval{m.start, m.end});
  if (protection_ == Protection::kUserfaultfd && to_register != 0) {
    // mmap over a registered range makes a new, unregistered VMA. Register
    // the whole span at once when all of it is memory we may replace (its
    // other VMAs are ours already: the kernel skips them) and it is dense
    // (the kernel walks every VMA of the span, twice); else each mapping
    // alone.
    const bool dense = (hi - lo) / kPageSize <= 2 * unflushed_pages_;
    if (to_register > 1 && dense && SpanReplaceable(lo, hi) &&
        RegisterWithProtector(lo, hi - lo)) {
      new_registered_.push_back(Interval{lo, hi});
    } else {
      for (const NewMapping& m : unflushed_) {
        if (!m.registered && RegisterWithProtector(m.start, m.end - m.start))
          new_registered_.push_back(Interval{m.start, m.end});
      }
    }
  }
  if (protection_ == Protection::kUserfaultfd && options_.map_lone_pages) {
    for (const NewMapping& m : unflushed_) {
      // Unregistered (its registration failed): EINVAL, and it faults in.
      if (m.end - m.start == kPageSize)
        (void)protector_->MapCachePages(m.start, kPageSize);
    }
  }
  unflushed_.clear();
  unflushed_pages_ = 0;
}

void LinuxMemory::CommitMapped() {
  // Our own now, where a stray mapping was (the program moved a frame
  // mapping there).
  if (!stray_mapped_.empty()) {
    for (const Interval& x : new_frame_mapped_)
      RemoveInterval(&stray_mapped_, x.start, x.end);
  }
  AddIntervals(&frame_mapped_, &new_frame_mapped_);
  AddIntervals(&uffd_registered_, &new_registered_);
  // Per-call scratch: a large batch must not leave its capacity behind
  // (metadata per tracked page).
  for (std::vector<Interval>* v : {&new_frame_mapped_, &new_registered_}) {
    if (v->capacity() > 256) std::vector<Interval>().swap(*v);
  }
}

// Adds many intervals with one linear merge (AddInterval per interval would
// shift the vector each time: quadratic for scattered merges).
void LinuxMemory::AddIntervals(std::vector<Interval>* set,
                               std::vector<Interval>* adds) {
  if (adds->size() <= 2) {
    for (const Interval& i : *adds) AddInterval(set, i.start, i.end);
    adds->clear();
    return;
  }
  auto by_start = [](const Interval& a, const Interval& b) {
    return a.start < b.start;
  };
  std::sort(adds->begin(), adds->end(), by_start);
  std::vector<Interval> merged;
  merged.reserve(set->size() + adds->size());  // trimmed below
  auto push = [&](const Interval& i) {
    if (i.start >= i.end) return;
    if (!merged.empty() && i.start <= merged.back().end) {
      merged.back().end = std::max(merged.back().end, i.end);
    } else {
      merged.push_back(i);
    }
  };
  auto a = set->begin();
  auto b = adds->begin();
  while (a != set->end() || b != adds->end()) {
    if (b == adds->end() || (a != set->end() && a->start <= b->start)) {
      push(*a++);
    } else {
      push(*b++);
    }
  }
  if (merged.capacity() > 2 * merged.size() + 1024) merged.shrink_to_fit();
  set->swap(merged);
  adds->clear();
}

bool LinuxMemory::PreadColdFrames() const {
  using Read = LinuxMemoryOptions::ColdFrameRead;
  switch (options_.cold_frame_read) {
    case Read::kMeasured:
      return PreadBeatsColdView();  // measured at the first call
    case Read::kPread:
      return true;
    case Read::kView:
      return false;
  }
  return false;
}

void LinuxMemory::MergeIntoFrames(std::span<const Addr> pages,
                                  std::span<const FrameId> frames,
                                  std::span<MergeResult> results) {
  RegisterThread();
  std::size_t n = std::min({pages.size(), frames.size(), results.size()});
  auto ok = [&](std::size_t i) {
    return MayReplace(pages[i]) && store_.IsAllocated(frames[i]);
  };
  // Once per call (not per window: the view is not ours to protect).
  const bool view_ok = ViewIntact(frames.data(), n);
  const bool discard_first =
      protection_ == Protection::kUserfaultfd && protector_->KernelFaultsWait();
  const Addr max_span = kMaxWindowPages * kPageSize;
  std::size_t i = 0;
  while (i < n) {
    if (!view_ok || !ok(i)) {
      results[i] =
          MayReplace(pages[i]) ? MergeResult::kFailed : MergeResult::kGone;
      ++i;
      continue;
    }
    // A run of consecutive pages, ending where a page table does.
    std::size_t j = i + 1, run_mappings = 1;
    while (j < n && j - i < kMaxRunWindowPages &&
           pages[j] == pages[j - 1] + kPageSize &&
           pages[j] % kPageTableSpan != 0 && ok(j)) {
      if (frames[j] != frames[j - 1] + 1) ++run_mappings;
      ++j;
    }
    // A run over a whole page table whose frames take several mappings
    // (identical pages laid out over F frames take one per F pages) is
    // discarded in one call and mapped into the emptied table: on the PVM
    // machine each mapping over present pages of part of a table costs
    // 0.9 us a page, the discard of a whole table 0.2 (design.md, "Joins
    // in discard-first windows").
    if (discard_first && run_mappings >= 2 && j - i == kMaxRunWindowPages &&
        pages[i] % kPageTableSpan == 0 &&
        MergeSpanDiscardFirst(&pages[i], &frames[i], j - i, &results[i])) {
      if (unflushed_pages_ >= kMaxWindowPages) FlushMapped();
      i = j;
      continue;
    }
    if (discard_first) {
      // The pages within kMaxWindowPages of this one, if their frames take
      // several mappings: one discard-first window over their span. The
      // span stops before a page, or a gap, that the window could not
      // cover (a hole, memory excluded or locked; a page mapping a frame
      // already, where a gap may hold such mappings): the rest goes to
      // windows of its own rather than failing this one.
      std::size_t e = i + 1, mappings = 1;
      while (e < n && pages[e] > pages[e - 1] &&
             pages[e] + kPageSize - pages[i] <= max_span && ok(e) &&
             DiscardFirstCovers(pages[e - 1] + kPageSize, pages[e])) {
        if (pages[e] != pages[e - 1] + kPageSize ||
            frames[e] != frames[e - 1] + 1) {
          ++mappings;
        }
        ++e;
      }
      if (mappings >= kMinDiscardFirstMappings &&
          MergeSpanDiscardFirst(&pages[i], &frames[i], e - i, &results[i])) {
        if (unflushed_pages_ >= kMaxWindowPages) FlushMapped();
        i = e;
        continue;
      }
    }
    MergeBatchIntoFrames(pages[i], j - i, &frames[i], &results[i]);
    if (unflushed_pages_ >= kMaxWindowPages) FlushMapped();
    i = j;
  }
  FlushMapped();
  CommitMapped();
}

// Opens a window over n pages at base, write-protects them and runs
// body(how); on any failure to get there, fills local[0..n) with the reason
// and does not run body. The window is closed (waiters woken) on return.
template <typename Body>
void LinuxMemory::InProtectedWindow(Addr base, std::size_t n,
                                    std::uint64_t cost, MergeResult* local,
                                    Body&& body) {
  const std::size_t len = n * kPageSize;
  RecountIfShort(cost + 2 * n);  // worst case: a run per page
  if (!BudgetAllows(cost)) {
    std::fill(local, local + n, MergeResult::kNoBudget);
    return;
  }
  int err = 0;
  {
    WindowLock lock;
    const int slot = OpenMergeWindowSeen(base, base + len);
    if (slot < 0) {
      std::fill(local, local + n, MergeResult::kFailed);
      return;
    }
    ProtectMethod how;
    err = protector_->Protect(base, len, &how);
    if (err == 0) body(how);
    CloseWindow(slot);
  }
  // Only once the window is closed: ClassifyProtectError allocates (it
  // reads the maps), and a writer that faulted in the window may hold
  // malloc's lock while it waits for the window to close. Inside the
  // window that deadlocked (preload.thread_exit_trim_test under load: a
  // heap trim unmapped part of a window's range, Protect failed with
  // ENOMEM, the scanner waited in malloc for a thread that waited in our
  // fault handler).
  if (err != 0)
    std::fill(local, local + n, ClassifyProtectError(err, base, len));
}

// Results leave backend-owned memory only after the window closed.
void LinuxMemory::CopyOutResults(const MergeResult* local, std::size_t n,
                                 MergeResult* out) {
  for (std::size_t k = 0; k < n; ++k) {
    if (local[k] == MergeResult::kNoBudget) ++budget_skips_;
    out[k] = local[k];
  }
}

MergeResult LinuxMemory::CompareWithFrame(Addr page, FrameId frame,
                                          bool use_pread) {
  // A frame likely not read through our view lately (FramesLikelyCold) may
  // be read with pread, into our stack (the kernel reads it through its
  // direct map): on the PVM machine the first read of a page through a new
  // page table entry costs about 5 us, prefetched or not, and the compares
  // of scattered pairs took 2.9-3.5 us each that way (joins 6.5-7.7), 2.4
  // with pread (4.2). On a KVM guest the view costs 0.9 us where pread
  // costs 2.2 (C probe, 20,000 frames just written, in random order):
  // PreadBeatsColdView measured which (PreadColdFrames).
  const void* bytes = store_.FrameAddress(frame);
  alignas(64) unsigned char copy[kPageSize];
  if (use_pread &&
      pread(store_.fd(), copy, kPageSize, store_.FrameOffset(frame)) ==
          static_cast<ssize_t>(kPageSize)) {
    bytes = copy;
  }
  bool equal = false;
  if (!GuardedEqual(Ptr(page), bytes, kPageSize, &equal))
    return MergeResult::kGone;
  return equal ? MergeResult::kMerged : MergeResult::kDiffers;
}

bool LinuxMemory::FramesLikelyCold(const FrameId* frames, std::size_t n) const {
  if (fresh_frames_) return true;
  // Frames of many pages (identical content) are read through the view
  // window after window; frames that each page of the window joins alone
  // (their range as wide as the window, or wider) likely were not.
  FrameId lo = frames[0], hi = frames[0];
  for (std::size_t k = 1; k < n; ++k) {
    lo = std::min(lo, frames[k]);
    hi = std::max(hi, frames[k]);
  }
  return std::size_t{hi - lo} + 1 >= n;
}

void LinuxMemory::MergeBatchIntoFrames(Addr base, std::size_t n,
                                       const FrameId* frames,
                                       MergeResult* out) {
  // Everything written inside the window is on our stack or in *this.
  MergeResult local[kMaxRunWindowPages];
  Interval mapped[kMaxRunWindowPages];
  std::size_t nmapped = 0;
  constexpr std::uint64_t kWindowCost = 2;  // mprotect splits the VMA
  std::uint64_t added = 0;
  if (!LockRoomFor(base, n * kPageSize)) {
    std::fill(out, out + n, MergeResult::kFailed);
    return;
  }
  // Outside the window: the first answer runs a probe, which allocates.
  const bool use_pread = FramesLikelyCold(frames, n) && PreadColdFrames();
  InProtectedWindow(base, n, kWindowCost, local, [&](ProtectMethod how) {
    const bool may_replace =
        !LockViewStale(base, n * kPageSize) && !PinnedIoIn(base, n * kPageSize);
    for (std::size_t k = 0; k < n; ++k) {
      // The next page, while this one is compared (PrefetchPage): 100 MiB
      // of identical pages joining their frames, 26 alternating runs,
      // 3-11% less merge CPU in 18.
      if (k + 1 < n) PrefetchPage(Ptr(base + (k + 1) * kPageSize));
      local[k] = may_replace ? CompareWithFrame(base + k * kPageSize, frames[k],
                                                use_pread)
                             : MergeResult::kFailed;
    }
    // One mmap per run of equal pages with consecutive frames.
    auto consecutive = [&](std::size_t e) {
      return frames[e] == frames[e - 1] + 1;
    };
    ForEachMergedRun(local, n, consecutive, [&](std::size_t k, std::size_t e) {
      const Addr at = base + k * kPageSize;
      const std::uint64_t cost = MappingCost(at, base + e * kPageSize);
      MergeResult r = MergeResult::kMerged;
      if (!BudgetAllows(kWindowCost + added +
                        ((k == 0 && e == n) ? 0 : cost))) {
        r = MergeResult::kNoBudget;
      } else {
        r = MapFrames(at, (e - k) * kPageSize, frames[k], how);
        if (r == MergeResult::kMerged) {
          // Registering the new VMA waits for the flush: one call per
          // window instead of per mapping.
          mapped[nmapped++] = Interval{at, at + (e - k) * kPageSize};
          added += cost;
        }
      }
      std::fill(local + k, local + e, r);
    });
    if (nmapped != 0 && how == ProtectMethod::kUffd)
      WakeReplaced(mapped[0].start, mapped[nmapped - 1].end);
    UnprotectRest(base, n, local, /*skip_merged=*/true, how);
  });
  vmas_used_ += added;
  for (std::size_t i = 0; i < nmapped; ++i)
    NoteMapped(mapped[i].start, mapped[i].end);
  CopyOutResults(local, n, out);
}

namespace {

// MADV_DONTNEED over many ranges with one process_madvise, which takes any
// advice for the calling process on this machine's Linux (6.18; older
// kernels answer EINVAL). The process is named by PIDFD_SELF_THREAD_GROUP
// (Linux 6.14: no descriptor, so nothing the program could close or a
// fork could carry into a child, and one system call instead of five);
// before 6.14 by a pidfd opened for the call and closed again, for those
// reasons. False unless every range was discarded; the callers then
// discard each range with madvise, which is harmless twice for the pages
// they pass (zero pages, or pages equal to the frames that replace them,
// protected and filled back if a discard fails).
bool DiscardAtOnce(const iovec* iov, std::size_t n) {
  if (n < 2) return false;
  std::size_t total = 0;
  for (std::size_t k = 0; k < n; ++k) total += iov[k].iov_len;
  static std::atomic<bool> self_named{true};
  if (self_named.load(std::memory_order_relaxed)) {
    const long done = syscall(SYS_process_madvise, kPidfdSelfThreadGroup, iov,
                              n, MADV_DONTNEED, 0);
    if (done >= 0 || errno != EBADF) return done == static_cast<long>(total);
    self_named.store(false, std::memory_order_relaxed);
  }
  const int self =
      AdoptOwnFd(static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0)));
  if (self < 0) return false;
  const long done =
      syscall(SYS_process_madvise, self, iov, n, MADV_DONTNEED, 0);
  CloseOwnFd(self);
  return done == static_cast<long>(total);
}

}  // namespace

bool LinuxMemory::MergeSpanDiscardFirst(const Addr* pages,
                                        const FrameId* frames, std::size_t n,
                                        MergeResult* out) {
  const Addr base = pages[0];
  const Addr end = pages[n - 1] + kPageSize;
  const std::size_t len = end - base;
  const std::size_t span = len / kPageSize;
  if (span > kMaxRunWindowPages) return false;
  // The pages discarded anonymous memory only, as far as our view tells
  // (checked again with the kernel inside the window), the span replaceable
  // and unlocked (locked memory refuses the discard). Mappings of frames
  // between the pages are only protected for the moment, as any page of
  // the span.
  for (std::size_t k = 0; k < n; ++k) {
    if (!DiscardFirstCovers(k == 0 ? base : pages[k - 1] + kPageSize,
                            pages[k])) {
      return false;
    }
  }
  // Everything written inside the window is on our stack or in *this.
  SpanWindowState& w = span_window_;
  CheckWindowStateExcluded(&w, sizeof(w));
  auto& local = w.local;  // per page of the span
  auto& frame_of = w.frame_of;
  auto& asked = w.asked;
  std::fill_n(asked, span, false);
  for (std::size_t k = 0; k < n; ++k) {
    const std::size_t at = (pages[k] - base) / kPageSize;
    asked[at] = true;
    frame_of[at] = frames[k];
  }
  auto& runs = w.runs;
  auto& run_first = w.run_first;  // span index of each run
  std::size_t nruns = 0;
  auto& mapped = w.mapped;  // per run
  auto& charged = w.charged;
  auto& edge_before = w.edge_before;
  std::fill_n(mapped, span, false);
  constexpr std::uint64_t kWindowCost = 2;  // a fallback mprotect's split
  std::uint64_t added = 0;
  bool taken = false;       // the missing-page registration was made
  bool registered = false;  // and undone by registering for WP only
  const bool use_pread = FramesLikelyCold(frames, n) && PreadColdFrames();
  InProtectedWindow(base, span, kWindowCost, local, [&](ProtectMethod how) {
    const bool may_replace = how == ProtectMethod::kUffd &&
                             !LockViewStale(base, len) &&
                             !PinnedIoIn(base, len);
    for (std::size_t k = 0; k < span; ++k) {
      if (k + 1 < span && asked[k + 1])
        PrefetchPage(Ptr(base + (k + 1) * kPageSize));
      if (!asked[k]) {
        local[k] = MergeResult::kDiffers;  // only protected with the rest
      } else {
        local[k] = may_replace ? CompareWithFrame(base + k * kPageSize,
                                                  frame_of[k], use_pread)
                               : MergeResult::kFailed;
      }
    }
    // Still our protected pages, the equal ones anonymous (PROCMAP_QUERY):
    // else the usual way, page by page.
    auto equal_anonymous = [&] {
      bool anonymous = true;
      Addr anon_end = 0;  // end of the anonymous VMA last seen
      ForEachMergedRun(
          local, span, [](std::size_t) { return true; },
          [&](std::size_t k, std::size_t e) {
            const Addr at = base + k * kPageSize;
            const Addr to = base + e * kPageSize;
            if (!anonymous || to <= anon_end) return;
            const Addr from = std::max(at, anon_end);
            anonymous = AnonymousVmas(from, to - from, &anon_end);
          });
      return anonymous;
    };
    if (!may_replace || !StillProtected(base, len, how) || !equal_anonymous()) {
      UnprotectRest(base, span, local, /*skip_merged=*/false, how);
      return;
    }
    if (!protector_->RegisterMissing(base, len)) {
      // A failed registration may have changed part of the span (ENOMEM
      // splitting a VMA): write-protect faults only, as before.
      (void)ForgetMissing(base, len);
      UnprotectRest(base, span, local, /*skip_merged=*/false, how);
      return;
    }
    taken = true;
    auto joins = [&](std::size_t e) {
      return frame_of[e] == frame_of[e - 1] + 1;
    };
    // Runs are mapped in this order below: a run that follows the one
    // before it has its left edge from that one (if that one then fails,
    // the edge is charged to it there).
    Addr admitted_to = 0;
    ForEachMergedRun(local, span, joins, [&](std::size_t k, std::size_t e) {
      const std::uint64_t cost =
          MappingCost(base + k * kPageSize, base + e * kPageSize, admitted_to);
      if (!BudgetAllows(kWindowCost + added + cost)) {
        std::fill(local + k, local + e, MergeResult::kNoBudget);
        return;
      }
      added += cost;
      charged[nruns] = static_cast<std::uint8_t>(cost);
      edge_before[nruns] = nruns != 0 && base + k * kPageSize == admitted_to;
      admitted_to = base + e * kPageSize;
      run_first[nruns] = k;
      runs[nruns++] = iovec{Ptr(base + k * kPageSize), (e - k) * kPageSize};
    });
    // MADV_DONTNEED of every equal page at once: one TLB flush for all.
    // A run that could not be discarded keeps its pages (a failed madvise
    // may have dropped some: those are filled back from the frames, whose
    // bytes they held) and is not mapped.
    auto& discarded = w.discarded;
    auto& unmapped = w.unmapped;
    std::fill(discarded, discarded + nruns, true);
    std::fill(unmapped, unmapped + nruns, false);
    // Adjacent runs are discarded as one range: on the PVM machine a
    // discard of a whole page table costs a third of one over parts of it
    // (each range of a process_madvise is discarded on its own).
    auto& spans = w.spans;
    std::size_t nspans = 0;
    auto any = [](std::size_t) { return true; };
    ForEachMergedRun(local, span, any, [&](std::size_t k, std::size_t e) {
      spans[nspans++] = iovec{Ptr(base + k * kPageSize), (e - k) * kPageSize};
    });
    if (options_.before_discard_first_discard != nullptr)
      options_.before_discard_first_discard(base, len);
    const bool at_once =
        nspans == 1
            ? madvise(spans[0].iov_base, spans[0].iov_len, MADV_DONTNEED) == 0
            : DiscardAtOnce(spans, nspans);
    if (!at_once) {
      for (std::size_t r = 0; r < nruns; ++r) {
        if (madvise(runs[r].iov_base, runs[r].iov_len, MADV_DONTNEED) == 0)
          continue;
        discarded[r] = false;
        // ENOMEM: part of the run was unmapped under the window (a call
        // samepage does not see); what the discard reached is filled back.
        unmapped[r] = errno == ENOMEM;
        FillFromFrames(reinterpret_cast<Addr>(runs[r].iov_base),
                       runs[r].iov_len, frame_of[run_first[r]]);
      }
    }
    // Writable again, the pages not merged with the rest: the discarded
    // ones have no page table entry left, and wait behind the missing-page
    // registration for their frames.
    if (!protector_->Unprotect(base, len, how)) ClearStrayProtection(base, len);
    for (std::size_t r = 0; r < nruns; ++r) {
      const Addr at = reinterpret_cast<Addr>(runs[r].iov_base);
      const std::size_t bytes = runs[r].iov_len;
      const std::size_t k = run_first[r], e = k + bytes / kPageSize;
      int err = discarded[r] ? 0 : EAGAIN;
      if (err == 0 && options_.fail_discard_first_map != nullptr)
        err = options_.fail_discard_first_map(at, bytes);
      if (err == 0 &&
          mmap(Ptr(at), bytes, kReadWrite, MAP_PRIVATE | MAP_FIXED, store_.fd(),
               store_.FrameOffset(frame_of[k])) == MAP_FAILED) {
        err = errno;
      }
      if (err == 0) {
        last_mapped_end_ = at + bytes;
        (void)ReapplyVmaFlags(at, bytes, /*lock=*/false);
        mapped[r] = true;
        continue;
      }
      // Not mapped: the pages get their bytes back, anonymous again. Its
      // charge is taken back; a run right after it that was charged no
      // left edge for it now has anonymous memory there, and one more.
      added -= charged[r];
      if (r + 1 < nruns && edge_before[r + 1]) {
        ++charged[r + 1];
        ++added;
      }
      if (discarded[r]) FillFromFrames(at, bytes, frame_of[k]);
      std::fill(local + k, local + e,
                unmapped[r]     ? MergeResult::kGone
                : err == ENOMEM ? MergeResult::kNoBudget
                                : MergeResult::kFailed);
    }
    // Write-protect faults only again, for the new mappings too; the
    // waiters retry, against the frames.
    registered = ForgetMissing(base, len);
    protector_->Replaced(base, len, how);
  });
  if (!taken) {
    // Nothing replaced: the pages go the usual way (a window of their own).
    return false;
  }
  vmas_used_ += added;
  for (std::size_t r = 0; r < nruns; ++r) {
    if (!mapped[r]) continue;
    const Addr at = reinterpret_cast<Addr>(runs[r].iov_base);
    NoteMapped(at, at + runs[r].iov_len, registered);
    discard_first_pages_ += runs[r].iov_len / kPageSize;
  }
  if (!registered) RemoveInterval(&uffd_registered_, base, end);
  auto& mine = w.mine;
  for (std::size_t k = 0; k < n; ++k)
    mine[k] = local[(pages[k] - base) / kPageSize];
  CopyOutResults(mine, n, out);
  return true;
}

bool LinuxMemory::ForgetMissing(Addr start, std::size_t len) {
  // Registering adds modes, never removes one: unregister first (which
  // wakes every waiter), then register for write-protect faults again.
  if (!protector_->Unregister(start, len)) {
    // Whatever made the range fail, no page of it may keep the
    // missing-page mode: its next reader would wait for good.
    for (Addr a = start; a < start + len; a += kPageSize)
      (void)protector_->Unregister(a, kPageSize);
    return false;
  }
  return protector_->RegisterRange(start, len);
}

void LinuxMemory::FillFromFrames(Addr at, std::size_t len, FrameId first) {
  for (std::size_t k = 0; k < len / kPageSize; ++k) {
    const Addr page = at + k * kPageSize;
    // EEXIST: the page was not discarded; ENOENT: it is no longer in a VMA
    // registered with us (unmapped, or mapped anew, under the window), so
    // not ours to fill. Anything else leaves a page that reads zeros: only
    // an allocation failure (ENOMEM) gets here.
    const int err = protector_->FillMissing(
        page, store_.FrameAddress(first + static_cast<FrameId>(k)));
    if (err != 0 && err != EEXIST && err != ENOENT) ++fill_failures_;
  }
}

void LinuxMemory::MergePairs(std::span<const Addr> p, std::span<const Addr> q,
                             std::span<FrameId> frames,
                             std::span<MergeResult> results) {
  MergePairsExpecting(p, q, frames, results, {});
}

void LinuxMemory::MergePairsExpecting(std::span<const Addr> p,
                                      std::span<const Addr> q,
                                      std::span<FrameId> frames,
                                      std::span<MergeResult> results,
                                      std::span<const std::uint64_t> expected) {
  RegisterThread();
  std::size_t n = std::min({p.size(), q.size(), frames.size(), results.size()});
  if (!expected.empty()) n = std::min(n, expected.size());
  auto ok = [&](std::size_t i) { return MayReplace(p[i]) && MayReplace(q[i]); };
  // Pairs in short runs, or none, join frames in address order where
  // discard-first windows take their mappings without a flush each.
  const bool scattered_way = WantsScatteredPairsTogether();
  std::vector<std::size_t> scattered;
  std::size_t i = 0;
  while (i < n) {
    if (!ok(i)) {
      results[i] = MergeResult::kGone;
      frames[i] = kNoFrame;
      ++i;
      continue;
    }
    // Where both sides run on together.
    std::size_t run_end = i + 1;
    while (run_end < n && p[run_end] == p[run_end - 1] + kPageSize &&
           q[run_end] == q[run_end - 1] + kPageSize && ok(run_end)) {
      ++run_end;
    }
    if (scattered_way && run_end - i < kMinPairRun) {
      for (; i < run_end; ++i) scattered.push_back(i);
      continue;
    }
    const std::size_t limit = scattered_way ? run_end : n;
    // A batch is a run of consecutive p; their partners may lie anywhere,
    // in at most kMaxPartnerRuns runs of their own (one window each).
    std::size_t j = i + 1, partner_runs = 1;
    while (j < limit && j - i < kMaxPairWindowPages &&
           p[j] == p[j - 1] + kPageSize && p[j] % kPageTableSpan != 0 &&
           ok(j)) {
      const bool joins = q[j] == q[j - 1] + kPageSize;
      if (!joins && partner_runs == kMaxPartnerRuns) break;
      partner_runs += joins ? 0 : 1;
      ++j;
    }
    MergePairBatch(p[i], &q[i], j - i, &frames[i], &results[i],
                   expected.empty() ? nullptr : &expected[i]);
    if (unflushed_pages_ >= kMaxWindowPages) FlushMapped();
    i = j;
  }
  FlushMapped();
  CommitMapped();
  // A scattered pair expected unchanged is checked by a read of p first: a
  // pair whose p changed since its last visit is not merged.
  if (!expected.empty()) {
    std::erase_if(scattered, [&](std::size_t k) {
      if (Unchanged(p[k], expected[k])) return false;
      results[k] = MergeResult::kDiffers;
      frames[k] = kNoFrame;
      return true;
    });
  }
  if (!scattered.empty()) MergeScatteredPairs(p, q, scattered, frames, results);
}

void LinuxMemory::MergeScatteredPairs(std::span<const Addr> p,
                                      std::span<const Addr> q,
                                      std::span<const std::size_t> which,
                                      std::span<FrameId> frames,
                                      std::span<MergeResult> results) {
  const std::size_t m = which.size();
  std::vector<Addr> lower(m), upper(m);
  for (std::size_t k = 0; k < m; ++k) {
    lower[k] = p[which[k]];
    upper[k] = q[which[k]];
  }
  const std::vector<std::uint32_t> order = OrderPairFrames(lower, upper);
  // What each page's mapping may add if one starts there (MappingCost of
  // that page: its neighbours as frame mappings of ours stand for edges).
  std::vector<std::uint8_t> lower_cost(m), upper_cost(m);
  for (std::size_t k = 0; k < m; ++k) {
    lower_cost[k] =
        static_cast<std::uint8_t>(MappingCost(lower[k], lower[k] + kPageSize));
    upper_cost[k] =
        static_cast<std::uint8_t>(MappingCost(upper[k], upper[k] + kPageSize));
  }
  const std::vector<std::uint32_t> vmas =
      CostByPrefix(lower, upper, order, lower_cost, upper_cost);
  // As many pairs at a time, in frame order, as the VMA budget leaves room
  // for at the most their mappings may cost; the real count
  // (RecountIfShort) often leaves more. A page continuing a mapping of an
  // earlier slice extends that VMA: counted as no mapping.
  std::size_t done = 0;
  while (done < m) {
    const std::uint64_t before = done == 0 ? 0 : vmas[done - 1];
    auto cost = [&](std::size_t end) {  // of order[done, end)
      return std::uint64_t{vmas[end - 1]} - before;
    };
    auto fitting = [&] {
      if (BudgetAllows(cost(m))) return m - done;
      const std::uint64_t room =
          budget_ > vmas_used_ ? budget_ - vmas_used_ : 0;
      std::size_t fit = 0;
      while (done + fit < m && cost(done + fit + 1) <= room) ++fit;
      return fit;
    };
    // The charge follows the kernel's count closely (MappingCost), so the
    // maps are counted again only when not one more pair fits: a slice
    // that fits goes first, and its mappings make the rest cheaper.
    std::size_t admitted = fitting();
    if (admitted == 0) {
      RecountIfShort(cost(m));
      admitted = fitting();
    }
    if (admitted == 0) {
      for (std::size_t k = done; k < m; ++k) {
        const std::size_t at = which[order[k]];
        results[at] = MergeResult::kNoBudget;
        frames[at] = kNoFrame;
        ++budget_skips_;
      }
      return;
    }
    MergeScatteredSlice(p, q, which, std::span(order).subspan(done, admitted),
                        frames, results);
    done += admitted;
  }
}

void LinuxMemory::MergeScatteredSlice(std::span<const Addr> p,
                                      std::span<const Addr> q,
                                      std::span<const std::size_t> which,
                                      std::span<const std::uint32_t> order,
                                      std::span<FrameId> frames,
                                      std::span<MergeResult> results) {
  const std::size_t m = order.size();
  auto pair_at = [&](std::size_t k) { return which[order[k]]; };
  const FrameId first_frame = store_.Allocate(m);
  if (first_frame == kNoFrame) {
    for (std::size_t k = 0; k < m; ++k) {
      results[pair_at(k)] = MergeResult::kFailed;
      frames[pair_at(k)] = kNoFrame;
    }
    return;
  }
  auto copied = std::make_unique<bool[]>(m);
  {
    std::vector<Addr> src(m);
    for (std::size_t k = 0; k < m; ++k) src[k] = p[pair_at(k)];
    GatherIntoFrames(src.data(), m, first_frame, copied.get());
  }
  auto frame_of = [&](std::size_t k) {
    return first_frame + static_cast<FrameId>(k);
  };
  // Both pages of every pair, by address.
  struct Side {
    Addr addr;
    std::uint32_t pair;  // index into which
  };
  std::vector<Side> sides;
  sides.reserve(2 * m);
  for (std::size_t k = 0; k < m; ++k) {
    if (!copied[k]) continue;
    const auto pair = static_cast<std::uint32_t>(k);
    sides.push_back({p[pair_at(k)], pair});
    sides.push_back({q[pair_at(k)], pair});
  }
  std::sort(sides.begin(), sides.end(),
            [](const Side& a, const Side& b) { return a.addr < b.addr; });
  // Both pages of each pair whose p arrived join its frame.
  std::vector<Addr> pages(sides.size());
  std::vector<FrameId> page_frames(sides.size());
  for (std::size_t s = 0; s < sides.size(); ++s) {
    pages[s] = sides[s].addr;
    page_frames[s] = frame_of(sides[s].pair);
  }
  std::vector<MergeResult> joined(pages.size(), MergeResult::kFailed);
  // Budget skips are counted per pair below, not per page.
  const std::uint64_t skips_before = budget_skips_;
  fresh_frames_ = true;
  MergeIntoFrames(pages, page_frames, joined);
  fresh_frames_ = false;
  budget_skips_ = skips_before;
  // Per pair: how many of its pages joined (0 to 2), or kKeptAlone, and
  // why the others did not.
  constexpr std::uint8_t kKeptAlone = 3;  // one joined, and stays so
  std::vector<std::uint8_t> merged(m, 0);
  std::vector<MergeResult> why(m, MergeResult::kGone);
  for (std::size_t k = 0; k < pages.size(); ++k) {
    const std::uint32_t pair = sides[k].pair;
    if (joined[k] == MergeResult::kMerged) {
      ++merged[pair];
    } else if (why[pair] == MergeResult::kGone ||
               joined[k] == MergeResult::kNoBudget) {
      why[pair] = joined[k];
    }
  }
  for (std::size_t k = 0; k < pages.size(); ++k) {
    const std::uint32_t pair = sides[k].pair;
    if (merged[pair] != 1 || joined[k] != MergeResult::kMerged) continue;
    // Its partner did not join: this page maps the frame alone, and goes
    // back to anonymous memory with its bytes. Where that fails it keeps
    // the frame (its bytes, copy-on-write), which then stays allocated.
    if (!RestoreAnonymous(pages[k], kPageSize, kReadWrite)) {
      merged[pair] = kKeptAlone;
    }
  }
  for (std::size_t k = 0; k < m; ++k) {
    const std::size_t at = pair_at(k);
    if (merged[k] == 2) {
      results[at] = MergeResult::kMerged;
      frames[at] = frame_of(k);
      continue;
    }
    results[at] = why[k];
    frames[at] = kNoFrame;
    if (why[k] == MergeResult::kNoBudget) ++budget_skips_;
    if (merged[k] != kKeptAlone) store_.Release(frame_of(k));
  }
}

void LinuxMemory::CheckWindowStateExcluded(
    [[maybe_unused]] const void* p, [[maybe_unused]] std::size_t size) const {
#ifndef NDEBUG
  // What the windows write lies in memory excluded from merging (design.md,
  // "The backend's own memory"): checked on every window, to catch a
  // refactor that moves it.
  const Addr start = reinterpret_cast<Addr>(p);
  for (Addr a = start & ~(kPageSize - 1); a < start + size; a += kPageSize) {
    if (!IsExcluded(a)) {
      std::fprintf(stderr,
                   "samepage: window scratch in mergeable memory at %#lx\n",
                   static_cast<unsigned long>(a));
      std::abort();
    }
  }
#endif
}

void LinuxMemory::MergePairBatch(Addr pbase, const Addr* q, std::size_t n,
                                 FrameId* frames_out, MergeResult* out,
                                 const std::uint64_t* expected) {
  // Everything written inside the windows is on our stack or in *this.
  struct PartnerRun {
    std::size_t begin,
        end;  // pairs [begin, end): q[k] = at + (k - begin) pages
    Addr at;
    int slot = -1;
    int err = 0;  // Protect's error: classified once nothing is protected
    ProtectMethod how = ProtectMethod::kNone;
    std::size_t bytes() const { return (end - begin) * kPageSize; }
  };
  PartnerRun runs[kMaxPartnerRuns];
  std::size_t nruns = 0;
  // The per-pair arrays live in *this (memory excluded from merging, as
  // the stack is): at 512 pairs they would take 35 KiB of the stack of a
  // thread that scans synchronously (ScanNow).
  PairWindowState& w = pair_window_;
  CheckWindowStateExcluded(&w, sizeof(w));
  auto& run_of = w.run_of;
  for (std::size_t k = 0; k < n; ++k) {
    if (k == 0 || q[k] != q[k - 1] + kPageSize) runs[nruns++] = {k, k, q[k]};
    runs[nruns - 1].end = k + 1;
    run_of[k] = nruns - 1;
  }
  auto& local = w.local;
  auto& frames = w.frames;
  auto& mapped = w.mapped;  // disjoint on each side
  auto& mapped_how = w.mapped_how;
  std::size_t nmapped = 0;
  auto& pgone = w.pgone;
  auto& qgone = w.qgone;
  auto& frames_leaked = w.frames_leaked;
  auto& restored_pieces = w.restored_pieces;  // of p, anonymous again
  std::size_t nrestored = 0;
  std::fill_n(pgone, n, false);
  std::fill_n(qgone, n, false);
  std::fill_n(frames_leaked, n, false);
  std::fill(frames, frames + n, kNoFrame);
  const std::size_t len = n * kPageSize;
  // Each window's protect may split a VMA in three (mprotect).
  const std::uint64_t window_cost = 2 * (1 + nruns);
  std::uint64_t added = 0;
  RecountIfShort(window_cost + 4 * n);  // worst case: a run per pair
  bool lock_room = LockRoomFor(pbase, len);
  for (std::size_t r = 0; lock_room && r < nruns; ++r)
    lock_room = LockRoomFor(runs[r].at, runs[r].bytes());
  if (!BudgetAllows(window_cost)) {
    std::fill(local, local + n, MergeResult::kNoBudget);
  } else if (!lock_room) {
    std::fill(local, local + n, MergeResult::kFailed);
  } else {
    WindowLock lock;
    const int pslot = OpenMergeWindowSeen(pbase, pbase + len);
    bool slots = pslot >= 0;
    for (std::size_t r = 0; slots && r < nruns; ++r) {
      runs[r].slot = OpenWindow(runs[r].at, runs[r].at + runs[r].bytes());
      slots = runs[r].slot >= 0;
    }
    ProtectMethod phow = ProtectMethod::kNone;
    int perr = 0;
    if (!slots) {
      std::fill(local, local + n, MergeResult::kFailed);
    } else if ((perr = protector_->Protect(pbase, len, &phow)) != 0) {
      // Classified once the windows are closed (below).
    } else {
      // A partner run that cannot be protected leaves its pairs as they
      // are; the other runs go on.
      for (std::size_t r = 0; r < nruns; ++r) {
        runs[r].err =
            protector_->Protect(runs[r].at, runs[r].bytes(), &runs[r].how);
      }
      // p's pages go into fresh frames first (the kernel copies them: no
      // page fault on the frame view), then each p is compared with its q.
      // Both sides are protected from before the copy to the remap, so a
      // frame holds exactly its p's bytes, and q only ever maps a frame
      // whose source it was found equal to. p, not the frame: the frame
      // view's fresh page would first take a fault to be mapped here.
      bool may_replace = !LockViewStale(pbase, len) && !PinnedIoIn(pbase, len);
      for (std::size_t r = 0; may_replace && r < nruns; ++r) {
        may_replace =
            runs[r].err != 0 || (!LockViewStale(runs[r].at, runs[r].bytes()) &&
                                 !PinnedIoIn(runs[r].at, runs[r].bytes()));
      }
      const FrameId f = may_replace ? store_.Allocate(n) : kNoFrame;
      auto& copied = w.copied;
      std::fill_n(copied, n, false);
      if (f != kNoFrame) CopyIntoFrames(pbase, n, f, copied);
      for (std::size_t k = 0; k < n; ++k) {
        bool equal = false;
        if (f == kNoFrame || runs[run_of[k]].err != 0) {
          local[k] = MergeResult::kFailed;
        } else if (!copied[k] || !GuardedEqual(Ptr(pbase + k * kPageSize),
                                               Ptr(q[k]), kPageSize, &equal)) {
          // Only the side that faulted is gone: the other one must still
          // be made writable again.
          pgone[k] = !Readable(pbase + k * kPageSize);
          qgone[k] = !Readable(q[k]);
          local[k] = MergeResult::kGone;
        } else {
          // A pair neither of whose pages was read since its last visit
          // merges only if unchanged since: p, just compared (in the
          // cache) and still protected, hashes to what both had then.
          std::uint64_t h = 0;
          if (equal && expected != nullptr && expected[k] != 0 &&
              (!GuardedHash(Ptr(pbase + k * kPageSize), &h) ||
               h != expected[k])) {
            equal = false;
          }
          local[k] = equal ? MergeResult::kMerged : MergeResult::kDiffers;
        }
      }
      // A merged run [k, e) of p takes one mapping; on q's side each piece
      // of it whose partners are consecutive takes one.
      auto piece_end = [&](std::size_t a, std::size_t e) {
        return std::min(e, runs[run_of[a]].end);
      };
      auto any = [](std::size_t) { return true; };
      ForEachMergedRun(local, n, any, [&](std::size_t k, std::size_t e) {
        const Addr pa = pbase + k * kPageSize;
        const std::uint64_t pcost = MappingCost(pa, pa + (e - k) * kPageSize);
        std::uint64_t cost = (k == 0 && e == n) ? 0 : pcost;
        for (std::size_t a = k; a < e; a = piece_end(a, e)) {
          const PartnerRun& r = runs[run_of[a]];
          const Addr qa = q[a];
          const Addr qend = qa + (piece_end(a, e) - a) * kPageSize;
          cost += (a == r.begin && piece_end(a, e) == r.end)
                      ? 0
                      : MappingCost(qa, qend);
        }
        MergeResult res = MergeResult::kNoBudget;
        if (BudgetAllows(window_cost + added + cost)) {
          res = MapFrames(pa, (e - k) * kPageSize, f + static_cast<FrameId>(k),
                          phow);
        }
        if (res != MergeResult::kMerged) {
          std::fill(local + k, local + e, res);  // nothing of p maps them
          return;
        }
        added += pcost;
        for (std::size_t a = k; a < e; a = piece_end(a, e)) {
          const std::size_t b = piece_end(a, e);
          const std::size_t piece = (b - a) * kPageSize;
          const ProtectMethod qhow = runs[run_of[a]].how;
          added += MappingCost(q[a], q[a] + piece);
          const MergeResult qres =
              MapFrames(q[a], piece, f + static_cast<FrameId>(a), qhow);
          if (qres == MergeResult::kMerged) {
            // Woken below, registered at the flush (see NoteMapped).
            mapped_how[nmapped] = qhow;
            mapped[nmapped++] = Interval{q[a], q[a] + piece};
            continue;
          }
          // p already maps these frames (and may have been written since,
          // into its private copy): protect it again and give it back
          // anonymous memory with its current bytes.
          const Addr pp = pbase + a * kPageSize;
          // (Not while direct I/O pinned it since: see RestoreAnonymous.)
          protector_->Replaced(pp, piece, phow);
          const bool restored = mprotect(Ptr(pp), piece, PROT_READ) == 0 &&
                                !PinnedIoIn(pp, piece) &&
                                ReplaceWithAnonymousCopy(pp, piece, kReadWrite);
          if (!restored) mprotect(Ptr(pp), piece, kReadWrite);
          if (restored) restored_pieces[nrestored++] = Interval{pp, pp + piece};
          std::fill(local + a, local + b, qres);
          // Still mapped by p: leak them rather than punch.
          std::fill(frames_leaked + a, frames_leaked + b, !restored);
        }
        // The pieces of p whose partners kept their mappings.
        ForEachMergedRun(local + k, e - k, any,
                         [&](std::size_t a, std::size_t b) {
                           mapped_how[nmapped] = phow;
                           mapped[nmapped++] =
                               Interval{pa + a * kPageSize, pa + b * kPageSize};
                         });
      });
      for (std::size_t k = 0; k < n; ++k) {
        if (local[k] == MergeResult::kMerged)
          frames[k] = f + static_cast<FrameId>(k);
      }
      // Frames that no page maps: their memory goes back at once.
      for (std::size_t k = 0; f != kNoFrame && k < n; ++k) {
        if (local[k] != MergeResult::kMerged && !frames_leaked[k])
          store_.Release(f + static_cast<FrameId>(k));
      }
      auto& side = w.side;
      auto side_of = [&](const bool* gone) {
        for (std::size_t k = 0; k < n; ++k) {
          side[k] = local[k] == MergeResult::kMerged ? MergeResult::kMerged
                    : gone[k]                        ? MergeResult::kGone
                                                     : MergeResult::kDiffers;
        }
        return side;
      };
      // Before the windows close (WakeReplaced): one call over all the
      // new mappings, however far apart.
      Addr wake_lo = UINTPTR_MAX, wake_hi = 0;
      for (std::size_t i = 0; i < nmapped; ++i) {
        if (mapped_how[i] != ProtectMethod::kUffd) continue;
        wake_lo = std::min(wake_lo, mapped[i].start);
        wake_hi = std::max(wake_hi, mapped[i].end);
      }
      WakeReplaced(wake_lo, wake_hi);
      UnprotectRest(pbase, n, side_of(pgone), /*skip_merged=*/true, phow);
      side_of(qgone);
      for (std::size_t r = 0; r < nruns; ++r) {
        if (runs[r].err != 0) continue;
        UnprotectRest(runs[r].at, runs[r].end - runs[r].begin,
                      side + runs[r].begin, /*skip_merged=*/true, runs[r].how);
      }
    }
    for (std::size_t r = nruns; r-- > 0;) {
      if (runs[r].slot >= 0) CloseWindow(runs[r].slot);
    }
    if (pslot >= 0) CloseWindow(pslot);
    // No window is open now: ClassifyProtectError may read the maps (it
    // allocates; see InProtectedWindow).
    if (perr != 0)
      std::fill(local, local + n, ClassifyProtectError(perr, pbase, len));
    for (std::size_t r = 0; slots && perr == 0 && r < nruns; ++r) {
      if (runs[r].err == 0) continue;
      std::fill(local + runs[r].begin, local + runs[r].end,
                ClassifyProtectError(runs[r].err, runs[r].at, runs[r].bytes()));
    }
  }
  vmas_used_ += added;
  for (std::size_t i = 0; i < nrestored; ++i) {
    RegisterRestored(restored_pieces[i].start,
                     restored_pieces[i].end - restored_pieces[i].start,
                     kReadWrite);
  }
  for (std::size_t i = 0; i < nmapped; ++i)
    NoteMapped(mapped[i].start, mapped[i].end);
  for (std::size_t k = 0; k < n; ++k) {
    if (local[k] == MergeResult::kNoBudget) ++budget_skips_;
    out[k] = local[k];
    frames_out[k] = frames[k];
  }
}

bool LinuxMemory::Readable(Addr page) {
  bool zero;
  return GuardedIsZero(Ptr(page), sizeof(std::uint64_t), &zero);
}

void LinuxMemory::CopyIntoFrames(Addr src, std::size_t n, FrameId first,
                                 bool* copied) {
  CopyPagesIntoFrames([src](std::size_t k) { return src + k * kPageSize; }, n,
                      first, copied);
}

void LinuxMemory::GatherIntoFrames(const Addr* src, std::size_t n,
                                   FrameId first, bool* copied) {
  CopyPagesIntoFrames([src](std::size_t k) { return src[k]; }, n, first,
                      copied);
}

template <typename SourceOf>
void LinuxMemory::CopyPagesIntoFrames(SourceOf source_of, std::size_t n,
                                      FrameId first, bool* copied) {
  // Two ways, fills_ measures which is cheaper here (CheaperOf):
  // - through our scratch area, which stays mapped and warm: on a PVM guest
  //   the kernel's first access to each application page through its user
  //   address costs more than our own read of it (pwrite straight from
  //   pages just write-protected: 2.9-3.3 us a page; copied to a reused
  //   buffer first: 1.6-2.0 us; pairs in runs 14% less merge CPU);
  // - one pwritev straight from the pages, where that access is cheap (a
  //   KVM guest: 1.3-1.8 against 2.0 us a page, pairs in runs): one copy
  //   of each page instead of two. The pages after one it cannot read
  //   (unmapped under us: a short write) go the first way.
  // Runs of consecutive sources are read at once; where that faults, page
  // by page, and a page that faults is not copied: the writes skip it. At
  // most kBouncePages at a time, one pwrite per stretch of them read, so
  // that no more of the scratch area than that stays resident between
  // merges.
  WarmScratch(std::min(kBouncePages, n));
  for (std::size_t at = 0; at < n; at += kBouncePages) {
    const std::size_t m = std::min(kBouncePages, n - at);
    auto from = [&](std::size_t k) { return source_of(at + k); };
    auto offset = [&](std::size_t k) {
      return store_.FrameOffset(first + static_cast<FrameId>(at + k));
    };
    // The end of the run of consecutive sources from k, cut where `skip`.
    auto run_end = [&](std::size_t k, const bool* skip) {
      std::size_t e = k + 1;
      while (e < m && !skip[e] && from(e) == from(e - 1) + kPageSize) ++e;
      return e;
    };
    bool* ok = copied + at;
    bool written[kBouncePages] = {};  // copied straight
    const int way = fills_.Pick();
    const std::int64_t start = MonotonicNanos();
    if (way == 1) {
      // One pwritev for the chunk, a vector per run of sources.
      iovec iov[kBouncePages];
      std::size_t niov = 0;
      for (std::size_t k = 0; k < m;) {
        const std::size_t e = run_end(k, written);
        iov[niov++] = iovec{Ptr(from(k)), (e - k) * kPageSize};
        k = e;
      }
      const ssize_t done =
          PwritevPages(store_.fd(), iov, static_cast<int>(niov), offset(0));
      const std::size_t whole =
          done > 0 ? static_cast<std::size_t>(done) / kPageSize : 0;
      std::fill(written, written + whole, true);
      std::fill(ok, ok + whole, true);
    }
    for (std::size_t k = 0; k < m;) {
      if (written[k]) {
        ++k;
        continue;
      }
      const std::size_t e = run_end(k, written);
      if (GuardedCopy(Ptr(scratch_ + k * kPageSize), Ptr(from(k)),
                      (e - k) * kPageSize)) {
        std::fill(ok + k, ok + e, true);
      } else {
        for (std::size_t i = k; i < e; ++i) {
          ok[i] = GuardedCopy(Ptr(scratch_ + i * kPageSize), Ptr(from(i)),
                              kPageSize);
        }
      }
      k = e;
    }
    for (std::size_t k = 0; k < m;) {
      if (!ok[k] || written[k]) {
        ++k;
        continue;
      }
      std::size_t e = k + 1;
      while (e < m && ok[e] && !written[e]) ++e;
      const std::size_t len = (e - k) * kPageSize;
      const ssize_t done =
          pwrite(store_.fd(), Ptr(scratch_ + k * kPageSize), len, offset(k));
      const std::size_t whole =
          done > 0 ? static_cast<std::size_t>(done) / kPageSize : 0;
      // A short write (the memory cgroup's limit, say): page by page.
      for (std::size_t i = k + whole; i < e; ++i) {
        ok[i] = pwrite(store_.fd(), Ptr(scratch_ + i * kPageSize), kPageSize,
                       offset(i)) == static_cast<ssize_t>(kPageSize);
      }
      k = e;
    }
    fills_.Record(way, MonotonicNanos() - start, m);
  }
}

void LinuxMemory::DropZeroPages(std::span<const Addr> pages,
                                std::span<MergeResult> results) {
  RegisterThread();
  std::size_t n = std::min(pages.size(), results.size());
  // Sparse windows protect the pages between too (writers there wait for
  // the window): at most one page table wide (kPageTableSpan). Runs of
  // zero pages take up to kMaxZeroWindowPages a window, ending where a
  // table does. On the PVM machine the protect, unprotect and discard
  // calls of a sparse window cost about as much for 512 pages as for 128
  // (zero pages scattered: 0.262 -> 0.202 s of merge CPU with 512).
  std::size_t i = 0;
  while (i < n) {
    if (!MayReplace(pages[i])) {
      results[i] = MergeResult::kGone;
      ++i;
      continue;
    }
    // One window over the pages in the first one's page table, when the
    // pages between them are memory we may protect too (scattered zero
    // pages: one protect, one pagemap read and one discard call for all);
    // else over a run of consecutive pages.
    std::size_t j = i + 1;
    while (j < n && pages[j] > pages[j - 1] &&
           pages[j] / kPageTableSpan == pages[i] / kPageTableSpan &&
           MayReplace(pages[j])) {
      ++j;
    }
    const bool sparse = pages[j - 1] - pages[i] != (j - 1 - i) * kPageSize;
    // A run (not sparse) is taken below, up to kMaxZeroWindowPages; a sparse
    // window that could not be protected as a whole (a VMA of the span not
    // registered yet, say) is retried a run at a time.
    if (!sparse || !SpanReplaceable(pages[i], pages[j - 1] + kPageSize) ||
        !DropZeroBatch(&pages[i], j - i, &results[i])) {
      j = i + 1;
      while (j < n && j - i < kMaxZeroWindowPages &&
             pages[j] == pages[j - 1] + kPageSize &&
             pages[j] % kPageTableSpan != 0 && MayReplace(pages[j])) {
        ++j;
      }
      (void)DropZeroBatch(&pages[i], j - i, &results[i]);
    }
    // Pages mapped over with the zero frame are registered before a later
    // window's span may include them.
    if (unflushed_pages_ != 0) FlushMapped();
    i = j;
  }
  FlushMapped();
  CommitMapped();
}

bool LinuxMemory::DropZeroBatch(const Addr* pages, std::size_t n,
                                MergeResult* out) {
  // The window spans pages[0] .. pages[n - 1]; pages between them that are
  // not asked for are protected and checked too, and left as they are.
  const Addr base = pages[0];
  const Addr end = pages[n - 1] + kPageSize;
  const std::size_t span = (end - base) / kPageSize;
  const bool sparse = span != n;
  MergeResult local[kMaxZeroWindowPages];  // per page of the span
  bool asked[kMaxZeroWindowPages] = {};
  for (std::size_t k = 0; k < n; ++k)
    asked[(pages[k] - base) / kPageSize] = true;
  // Pages that cannot be given back (locked, or a private copy in a frame's
  // mapping, where MADV_DONTNEED would bring back the frame's bytes) map
  // the zero frame instead: a frame never written, shared by all of them.
  bool remapped[kMaxZeroWindowPages] = {};
  constexpr std::uint64_t kWindowCost = 2;
  std::uint64_t added = 0;
  // Decided before the window: nothing in it may allocate.
  const bool locked = Overlaps(locked_, base, end);
  if (locked && !LockRoomFor(base, end - base)) {
    std::fill(out, out + n, MergeResult::kFailed);
    return true;
  }
  bool protected_window = false;
  bool retry = false;
  if ((locked || Overlaps(frame_mapped_, base, end)) &&
      zero_frame_ == kNoFrame) {
    zero_frame_ = store_.Allocate(1);
  }
  InProtectedWindow(base, span, kWindowCost, local, [&](ProtectMethod how) {
    protected_window = true;
    // Before the check of the bytes: a read whose direct I/O ended after
    // the check could have changed them (its registration gone by now).
    const bool pinned = PinnedIoIn(base, end - base);
    for (std::size_t k = 0; k < span; ++k) {
      bool zero = false;
      if (k + 1 < span && asked[k + 1])
        PrefetchPage(Ptr(base + (k + 1) * kPageSize));
      if (!asked[k]) {
        local[k] = MergeResult::kDiffers;  // not asked for: only unprotected
      } else if (!GuardedIsZero(Ptr(base + k * kPageSize), kPageSize, &zero)) {
        local[k] = MergeResult::kGone;
      } else {
        local[k] = zero ? MergeResult::kMerged : MergeResult::kDiffers;
      }
    }
    if (!StillProtected(base, end - base, how)) {
      if (sparse) {
        // A page between them carries no protection (a kernel without
        // markers for never-touched pages, or a mapping made since): the
        // pages are retried a run at a time.
        retry = true;
        std::fill(local, local + span, MergeResult::kDiffers);
        UnprotectRest(base, span, local, /*skip_merged=*/false, how);
        return;
      }
      std::fill(local, local + span, MergeResult::kGone);
    }
    if (pinned) {
      // Dropped, a page pinned for direct I/O would lose what the device
      // writes into it.
      std::fill(local, local + span, MergeResult::kFailed);
    }
    const bool may_map =
        zero_frame_ != kNoFrame && !LockViewStale(base, end - base);
    auto map_zero_frame = [&](std::size_t i) {
      const Addr pg = base + i * kPageSize;
      if (!may_map) {
        local[i] = MergeResult::kFailed;
      } else if (const std::uint64_t cost = MappingCost(pg, pg + kPageSize);
                 !BudgetAllows(kWindowCost + added + cost)) {
        local[i] = MergeResult::kNoBudget;
      } else {
        local[i] = MapFrames(pg, kPageSize, zero_frame_, how);
        remapped[i] = local[i] == MergeResult::kMerged;
        if (remapped[i]) added += cost;
      }
    };
    // PROCMAP_QUERY tells anonymous VMAs apart; where it cannot, MADV_FREE
    // does: it refuses file mappings with EINVAL and is harmless on zero
    // anonymous pages.
    const bool all_anon = !locked && AnonymousVmas(base, end - base);
    iovec iov[kMaxZeroWindowPages];
    std::size_t niov = 0;
    std::size_t iov_first[kMaxZeroWindowPages];  // span index of each range
    auto any = [](std::size_t) { return true; };
    ForEachMergedRun(local, span, any, [&](std::size_t k, std::size_t e) {
      for (std::size_t i = k; i < e; ++i) {
        const Addr pg = base + i * kPageSize;
        const bool anon =
            all_anon || (!Overlaps(locked_, pg, pg + kPageSize) &&
                         madvise(Ptr(pg), kPageSize, MADV_FREE) == 0);
        if (!anon) {
          map_zero_frame(i);
        } else if (niov != 0 &&
                   iov_first[niov - 1] + iov[niov - 1].iov_len / kPageSize ==
                       i) {
          iov[niov - 1].iov_len += kPageSize;
        } else {
          iov_first[niov] = i;
          iov[niov++] = iovec{Ptr(pg), kPageSize};
        }
      }
    });
    // MADV_DONTNEED: the pages are freed now and read as the zero page.
    if (!DiscardAtOnce(iov, niov)) {
      for (std::size_t r = 0; r < niov; ++r) {
        if (madvise(iov[r].iov_base, iov[r].iov_len, MADV_DONTNEED) == 0)
          continue;
        const std::size_t last = iov_first[r] + iov[r].iov_len / kPageSize;
        for (std::size_t i = iov_first[r]; i < last; ++i)
          local[i] = MergeResult::kFailed;
      }
    }
    // The pages not asked for keep their protection: cleared here, in one
    // call over the span (a dropped anonymous page keeps no write-protect
    // marker on Linux 6.18, and the call over it costs a few microseconds
    // of the window's ~250). The remapped ones are new VMAs: their
    // writers are woken here (as gone pages), and they are registered at
    // the flush.
    MergeResult rest[kMaxZeroWindowPages];
    for (std::size_t k = 0; k < span; ++k)
      rest[k] = remapped[k] ? MergeResult::kGone : local[k];
    UnprotectRest(base, span, rest, /*skip_merged=*/false, how);
  });
  vmas_used_ += added;
  for (std::size_t k = 0; k < span; ++k) {
    if (remapped[k]) {
      const Addr pg = base + k * kPageSize;
      NoteMapped(pg, pg + kPageSize);
    }
  }
  MergeResult mine[kMaxZeroWindowPages];
  for (std::size_t k = 0; k < n; ++k)
    mine[k] = local[(pages[k] - base) / kPageSize];
  // A failed protection of a sparse span is retried, not reported.
  if (sparse && (!protected_window || retry)) return false;
  CopyOutResults(mine, n, out);
  return true;
}

void LinuxMemory::ShieldOwnMappings(bool shield) {
  store_.ShieldView(shield);
  if (scratch_ != 0) ShieldMapping(Ptr(scratch_), kScratchBytes, shield);
}

// --- unmerging ---

bool LinuxMemory::ReplaceWithAnonymousCopy(Addr start, std::size_t len,
                                           int prot) {
  if (len > kScratchBytes) return false;
  void* scratch = Ptr(scratch_);
  bool ok = CopyIntoScratch(start, len);
  if (ok && prot != kReadWrite) ok = mprotect(scratch, len, prot) == 0;
  // mremap replaces the range atomically: readers never see a hole. Never
  // mmap(NULL) a scratch area instead: it could land in a hole the
  // application just made and is about to MAP_FIXED again, and we would
  // then move the application's new memory away. MREMAP_DONTUNMAP (5.7+)
  // keeps our scratch mapped, empty, for next time.
  // mlockall(MCL_CURRENT) may have locked the scratch area, and an
  // MREMAP_DONTUNMAP move of a locked source leaves locked_vm counting it
  // for good (measured on Linux 6.18): unlock it first (locked memory is
  // locked again by ReapplyVmaFlags).
  if (ok) (void)munlock(scratch, len);
  if (ok) {
    ok = mremap(scratch, len, len,
                MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP,
                Ptr(start)) != MAP_FAILED;
    if (ok) (void)ReapplyVmaFlags(start, len, /*lock=*/true);
  }
  if (!ok) madvise(scratch, len, MADV_DONTNEED);  // drop the copy
  scratch_warm_pages_ = 0;  // its pages moved out or dropped
  if (prot != kReadWrite) mprotect(scratch, len, kReadWrite);
  return ok;
}

void LinuxMemory::WarmScratch(std::size_t npages) {
  // One call faults the pages in, where a copy into them would take a page
  // fault each (on the PVM guest 256 faults cost 2.4-3.5 ms, the call and
  // the copy 1.2-1.6 ms). Pages a copy moved out leave the area empty.
  if (npages <= scratch_warm_pages_) return;
  if (madvise(Ptr(scratch_ + scratch_warm_pages_ * kPageSize),
              (npages - scratch_warm_pages_) * kPageSize,
              MADV_POPULATE_WRITE) == 0) {
    scratch_warm_pages_ = npages;
  }
}

bool LinuxMemory::CopyIntoScratch(Addr src, std::size_t len) {
  const std::size_t n = len / kPageSize;
  std::size_t done = std::min(scratch_warm_pages_, n);  // present pages
  if (done > 0 && !GuardedCopy(Ptr(scratch_), Ptr(src), done * kPageSize))
    return false;
  // The rest of the area has no pages (moved out, or never touched): the
  // kernel fills them from src with UFFDIO_COPY, which needs the area
  // registered for missing pages for the time of the call. It writes each
  // page once, where populating them first zeroes every page and the copy
  // then writes it again through its user address: on the PVM machine
  // 2.1-4.3 against 7.4-11.5 us a page (C probe, 65,536 private pages of a
  // memfd given back 1,024 at a time, mremap included). Missing pages only:
  // registering and unregistering the area costs 2.6 us that way, 14 us
  // with write-protection too (its unregister walks the page tables).
  // Even so a fill of one page does not win it back (kMinKernelFillPages).
  if (n - done >= kMinKernelFillPages) {
    if (protector_->RegisterForFill(scratch_, kScratchBytes)) {
      const std::size_t filled =
          protector_->FillMissingRange(scratch_ + done * kPageSize,
                                       Ptr(src + done * kPageSize),
                                       (n - done) * kPageSize) /
          kPageSize;
      done += filled;
      unmerge_filled_pages_ += filled;
    }
    // Never left registered (a failed registration may have registered
    // part of it): a later fault on a missing page of the area would wait
    // for a fill that never comes.
    (void)protector_->Unregister(scratch_, kScratchBytes);
  }
  scratch_warm_pages_ = std::max(scratch_warm_pages_, done);
  if (done == n) return true;
  // Not filled that way (mprotect protection, or the call failed): the
  // pages are populated, then copied into.
  WarmScratch(n);
  return GuardedCopy(Ptr(scratch_ + done * kPageSize),
                     Ptr(src + done * kPageSize), (n - done) * kPageSize);
}

bool LinuxMemory::RestoreAnonymous(Addr start, std::size_t len, int prot) {
  bool ok = false;
  {
    WindowLock lock(WindowLock::kAfterExits);
    int slot = OpenWindow(start, start + len);
    if (slot < 0) return false;
    ProtectMethod how = ProtectMethod::kNone;
    int err = (prot & PROT_WRITE) ? protector_->Protect(start, len, &how) : 0;
    if (err == 0) {
      // A page written since it was merged is a private copy, which direct
      // I/O may have pinned since (the mapping was not protected then): a
      // copy put in its place would miss what the device writes into it.
      // Under protection no new pin can start (it faults, and waits or
      // fails); one in flight keeps the mapping as it is. (Registered I/O
      // only: an io_uring with O_DIRECT stops merging, not unmerging.)
      ok = StillProtected(start, len, how) &&
           (options_.fail_unmerge_copy == nullptr ||
            options_.fail_unmerge_copy(start, len) == 0) &&
           !RegisteredIoOverlaps(start, start + len) &&
           ReplaceWithAnonymousCopy(start, len, prot);
      if (ok) {
        protector_->Replaced(start, len, how);
      } else {
        protector_->Unprotect(start, len, how);
      }
    }
    CloseWindow(slot);
  }
  if (ok) {
    RemoveInterval(&frame_mapped_, start, start + len);
    RegisterRestored(start, len, prot);
  }
  return ok;
}

void LinuxMemory::RegisterRestored(Addr start, std::size_t len, int prot) {
  // ReplaceWithAnonymousCopy's copy is a new VMA (whole, no split), never
  // registered: writable memory is registered again, and uffd_registered_
  // keeps to what the kernel has, so that its next window is a userfaultfd
  // one (in an mprotect window, a system call writing into it fails).
  if (prot == kReadWrite && RegisterWithProtector(start, len)) {
    AddInterval(&uffd_registered_, start, start + len);
  } else {
    RemoveInterval(&uffd_registered_, start, start + len);
  }
  // A split of anonymous memory that we made, at either end (AnonSplitsKnown).
  anon_splits_made_.push_back(start);
  anon_splits_made_.push_back(start + len);
}

bool LinuxMemory::Unmerge(Addr addr, std::size_t npages) {
  RegisterThread();
  if (npages == 0) return true;
  const Addr end = addr + npages * kPageSize;
  // No frame mapped here (frame_mapped_ misses none we made, see Probe):
  // the memory is anonymous already, and the maps need not be read.
  if (!Overlaps(frame_mapped_, addr, end)) return true;
  std::vector<MapEntry> maps;
  // Our memfd's mappings, and the flags (lock) the restored memory gets.
  // A small range asks the kernel for its own mappings (PROCMAP_QUERY)
  // rather than reading all of them again (0.6 us a mapping: 7 ms a call
  // with 5,000 one-page buffers merged, paid by each MADV_UNMERGEABLE of
  // one of them), while the flags held are what a read now would give
  // (SmapsReadFresh: the plain maps take their flags from the last smaps
  // read too).
  const bool queried = npages <= kQueriedUnmergePages && SmapsReadFresh() &&
                       QueryMappings(addr, end, &maps);
  if (queried) {
    NoteVanishedFrameMappings(addr, end, maps);
  } else {
    maps.clear();
    if (!ReadView(&maps, /*full=*/false).ok()) return false;
    (void)ApplyMaps(maps);  // finds moved frame mappings (strays)
  }
  // Adjacent mappings of our memfd with the same protection (scattered
  // merges map a frame per page, each its own VMA) are given back together,
  // up to kUnmergeChunkPages at a time: one copy and one mremap for all of
  // them, whose single anonymous VMA also gives their VMAs back. A chunk
  // that cannot be (a mapping of it not registered for write-protection,
  // say) goes a mapping at a time.
  bool ok = true;
  auto ours = [&](const MapEntry& e) {
    return e.end > addr && e.start < end && !e.shared && IsOurMemfd(e);
  };
  auto clip = [&](const MapEntry& e) {
    return std::pair{std::max(e.start, addr), std::min(e.end, end)};
  };
  for (std::size_t i = 0; i < maps.size();) {
    if (!ours(maps[i])) {
      ++i;
      continue;
    }
    const int prot = ProtOf(maps[i]);
    std::size_t j = i + 1;  // the group: maps [i, j)
    while (j < maps.size() && ours(maps[j]) && ProtOf(maps[j]) == prot &&
           maps[j].start == maps[j - 1].end) {
      ++j;
    }
    const Addr s = clip(maps[i]).first, t = clip(maps[j - 1]).second;
    for (Addr c = s; c < t; c += kUnmergeChunkPages * kPageSize) {
      const std::size_t len =
          std::min<std::size_t>(kUnmergeChunkPages * kPageSize, t - c);
      if (RestoreAnonymous(c, len, prot)) continue;
      bool alone = false;  // the chunk lies within one mapping
      for (std::size_t k = i; k < j; ++k) {
        auto [ms, mt] = clip(maps[k]);
        ms = std::max(ms, c);
        mt = std::min(mt, c + len);
        if (ms >= mt) continue;
        if (ms == c && mt == c + len) {
          alone = true;
          break;
        }
        if (!RestoreAnonymous(ms, mt - ms, prot)) ok = false;
      }
      if (alone) ok = false;
    }
    i = j;
  }
  return ok;
}

void LinuxMemory::DropFrameMappings(Addr start, Addr end) {
  RegisterThread();
  if (start >= end || !Overlaps(frame_mapped_, start, end)) return;
  // The flags each replacement takes again (dontfork, dontdump) are those
  // of the last view, as Unmerge's own small ranges (SmapsReadFresh).
  // Locked memory anywhere in the range: the call fails there (EINVAL,
  // but MADV_DONTNEED_LOCKED) and stops, so the pages after it stay as
  // they are; left to Unmerge, which keeps every byte.
  std::vector<MapEntry> maps;
  if (Overlaps(locked_, start, end) || !SmapsReadFresh() ||
      !QueryMappings(start, end, &maps)) {
    return;
  }
  WindowLock lock;
  for (const MapEntry& e : maps) {
    if (e.shared || !IsOurMemfd(e)) continue;
    const Addr s = std::max(e.start, start);
    const Addr t = std::min(e.end, end);
    if (s >= t) continue;
    const int prot = ProtOf(e);
    // In place of the frame's pages, as the call would leave anonymous
    // memory: zeros, allocated when touched. ENOMEM (out of mappings)
    // leaves it to Unmerge.
    if (mmap(Ptr(s), t - s, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
             0) == MAP_FAILED) {
      continue;
    }
    (void)ReapplyVmaFlags(s, t - s, /*lock=*/false);
    RemoveInterval(&frame_mapped_, s, t);
    RegisterRestored(s, t - s, prot);
    dropped_frame_pages_ += (t - s) / kPageSize;
  }
}

void LinuxMemory::ReleaseFrame(FrameId frame) {
  if (hold_releases_ || Contains(stray_frames_, frame)) {
    try {
      held_.push_back(frame);
    } catch (const std::bad_alloc&) {
      store_.Keep(frame);
    }
    return;
  }
  store_.Release(frame);
}

void LinuxMemory::NoteCopiedAway(Addr page) {
  // A query a page: a merged page is copied away once (about 0.7 us, with
  // the hash of its new content that follows). Before Linux 6.11, nothing.
  if (hold_releases_ || maps_query_fd_ < 0) return;
  ProcmapQuery q;
  if (!QueryVma(maps_query_fd_, page, &q) || q.vma_start > page) return;
  if (!FileBacked(q)) hold_releases_ = true;
}

void LinuxMemory::FindStrayFrameMappings(const std::vector<MapEntry>& maps) {
  // Our own: what frame_mapped_ held before this read, but the strays of
  // the read before (their addresses are in it too) and the pages the core
  // was told are gone since.
  // (No copy where there are none: with a mapping per merged page, the
  // set is tens of thousands of intervals.)
  std::vector<Interval> trimmed;
  const std::vector<Interval>* ours_ptr = &frame_mapped_;
  if (!stray_mapped_.empty() || !forgotten_frame_mapped_.empty()) {
    trimmed = frame_mapped_;
    for (const std::vector<Interval>* gone :
         {&stray_mapped_, &forgotten_frame_mapped_}) {
      for (const Interval& x : *gone) RemoveInterval(&trimmed, x.start, x.end);
    }
    ours_ptr = &trimmed;
  }
  const std::vector<Interval>& ours = *ours_ptr;
  forgotten_frame_mapped_.clear();
  stray_mapped_.clear();
  stray_frames_.clear();
  AddStrayFrameMappings(maps, ours, /*first_read=*/true);
  // Held frames no mapping covers now go back to the store. /proc/self/maps
  // is not one snapshot: a mapping moved while it was read (from above the
  // reader's place to below it) shows nowhere, and its frames would be
  // freed under it. Before any is freed, a second read confirms: a mapping
  // moved once is in one of the two.
  auto covered = [&](FrameId f) { return Contains(stray_frames_, f); };
  if (!std::all_of(held_.begin(), held_.end(), covered)) {
    std::vector<MapEntry> again;
    const std::string& path = options_.plain_maps_path.empty()
                                  ? options_.maps_path
                                  : options_.plain_maps_path;
    if (!ReadMaps(path, &again).ok()) return;  // held until the next read
    AddStrayFrameMappings(again, ours, /*first_read=*/false);
  }
  std::erase_if(held_, [&](FrameId f) {
    if (covered(f)) return false;
    store_.Release(f);
    return true;
  });
  hold_releases_ = false;
}

void LinuxMemory::AddStrayFrameMappings(const std::vector<MapEntry>& maps,
                                        const std::vector<Interval>& ours,
                                        bool first_read) {
  std::size_t oi = 0;  // the first interval of ours that may meet e
  for (const MapEntry& e : maps) {
    if (e.shared || !IsStoreMemfd(e)) continue;
    if (first_read && options_.stray_walk_misses != nullptr &&
        options_.stray_walk_misses(e)) {
      continue;
    }
    // The parts of e that none of our own mappings explains (maps and ours
    // both ascend: one walk).
    Addr a = e.start;
    while (a < e.end) {
      while (oi < ours.size() && ours[oi].end <= a) ++oi;
      if (oi < ours.size() && ours[oi].start <= a) {
        a = std::min(e.end, ours[oi].end);
        continue;
      }
      const Addr b = std::min(e.end, oi < ours.size() ? ours[oi].start : e.end);
      AddInterval(&stray_mapped_, a, b);
      const std::uint64_t first = (e.offset + (a - e.start)) / kPageSize;
      AddInterval(&stray_frames_, first, first + (b - a) / kPageSize);
      a = b;
    }
  }
}

void LinuxMemory::NoteVanishedFrameMappings(Addr start, Addr end,
                                            const std::vector<MapEntry>& maps) {
  // Only the intervals that meet the range: a small unmerge runs this at
  // every call, with tens of thousands of them.
  auto ends_by = [](const Interval& x, Addr a) { return x.end <= a; };
  std::vector<Interval> expected;
  for (auto it = std::lower_bound(frame_mapped_.begin(), frame_mapped_.end(),
                                  start, ends_by);
       it != frame_mapped_.end() && it->start < end; ++it) {
    AddInterval(&expected, std::max(it->start, start), std::min(it->end, end));
  }
  for (const MapEntry& e : maps) {
    if (!e.shared && IsOurMemfd(e)) RemoveInterval(&expected, e.start, e.end);
  }
  if (!expected.empty()) hold_releases_ = true;
}

bool LinuxMemory::UnknownFrameMappingIn(Addr start, Addr end) const {
  // No frame in use, no frame mapped anywhere.
  if (store_.frames_in_use() == 0) return false;
  std::vector<MapEntry> maps;
  if (!QueryMappings(start, end, &maps)) return false;  // the maps then
  return std::any_of(maps.begin(), maps.end(), [&](const MapEntry& e) {
    if (e.shared || !IsStoreMemfd(e)) return false;
    const Addr a = std::max(e.start, start), b = std::min(e.end, end);
    return a < b && !Covers(frame_mapped_, a, b);
  });
}

bool LinuxMemory::UnmergeForgotten(Addr start, Addr end) {
  RegisterThread();
  // Nothing left unseen since the maps were read, and they showed no stray
  // mapping in the range: every frame mapping there is one the core knows
  // (the common case, and always under the preload, which sees every
  // move). A caller going range by range reads the maps once.
  if (!hold_releases_ && forgotten_frame_mapped_.empty() &&
      !Overlaps(stray_mapped_, start, end) &&
      !UnknownFrameMappingIn(start, end)) {
    return true;
  }
  // The flags the copies take again (lock, dontfork) from a read of smaps
  // now: a moved mapping's address had other memory, or none, at the last.
  std::vector<MapEntry> maps;
  if (!ReadView(&maps, /*full=*/true).ok()) return false;
  (void)ApplyMaps(maps);  // the stray mappings now
  if (!Overlaps(stray_mapped_, start, end)) return true;
  bool ok = true;
  for (const MapEntry& e : maps) {
    if (e.shared || !IsStoreMemfd(e) || e.end <= start || e.start >= end)
      continue;
    // Memory that cannot be read (PROT_NONE) cannot be copied: it keeps
    // its frames, which stay held while it maps them.
    if (!e.read) continue;
    // (RestoreAnonymous leaves stray_mapped_ as it is.)
    ok &= ForEachOverlap(
        stray_mapped_, std::max(e.start, start), std::min(e.end, end),
        [&](Addr a, Addr b) {
          bool restored = true;
          for (Addr c = a; c < b; c += kUnmergeChunkPages * kPageSize) {
            const std::size_t len =
                std::min<std::size_t>(kUnmergeChunkPages * kPageSize, b - c);
            restored &= RestoreAnonymous(c, len, ProtOf(e));
          }
          return restored;
        });
  }
  // The frames only those mappings held go back to the store.
  (void)RefreshMaps(/*full=*/false);
  return ok;
}

void LinuxMemory::FlushReleasedFrames() {
  // Frames held for an unseen departure: the maps now say which no
  // mapping covers (the program unmapped them: the common case), and
  // those are freed with the rest.
  if (hold_releases_ && !held_.empty()) (void)RefreshMaps(/*full=*/false);
  store_.Flush();
}

void LinuxMemory::RecheckHeldFrames() {
  RegisterThread();
  if (held_.empty()) return;
  (void)RefreshMaps(/*full=*/false);  // frees those no mapping covers now
  store_.Flush();
}

MemoryStats LinuxMemory::Stats() const {
  MemoryStats s;
  s.frames_in_use = store_.frames_in_use();
  s.frames_pinned = store_.frames_pinned();
  s.vma_budget = budget_;
  s.vmas_used = vmas_used_;
  s.budget_skips = budget_skips_;
  s.lock_skips = lock_skips_;
  s.locks_lost = locks_lost_;
  s.protect_faults = ProtectFaults();
  s.pinned_io_skips = pinned_io_skips_;
  s.smaps_reads = smaps_reads_;
  s.maps_reads = maps_reads_;
  s.discard_first_pages = discard_first_pages_;
  s.fill_failures = fill_failures_;
  s.unmerge_filled_pages = unmerge_filled_pages_;
  s.dropped_frame_pages = dropped_frame_pages_;
  return s;
}

std::size_t LinuxMemory::ScratchResidentPages() const {
  unsigned char vec[kScratchBytes / kPageSize];
  if (scratch_ == 0 || mincore(Ptr(scratch_), kScratchBytes, vec) != 0)
    return 0;
  return static_cast<std::size_t>(std::count_if(
      vec, vec + sizeof(vec), [](unsigned char v) { return v & 1; }));
}

std::string LinuxMemory::DebugString() const {
  std::string out;
  auto dump = [&](const char* name, const std::vector<Interval>& set) {
    for (const Interval& i : set)
      out += std::string(name) + " " + Hex(i.start) + "-" + Hex(i.end) + "\n";
  };
  dump("touchable", touchable_);
  dump("excluded", excluded_);
  dump("auto_excluded", auto_excluded_);
  dump("frame_mapped", frame_mapped_);
  return out;
}

// --- ranges for the engine ---

Status LinuxMemory::MergeableParts(Addr addr, std::size_t len,
                                   std::vector<Range>* parts, bool advising,
                                   std::vector<Range>* not_writable) {
  parts->clear();
  if (not_writable != nullptr) not_writable->clear();
  // The kernel's madvise(): unaligned start or overflowing length: EINVAL.
  if (addr & (kPageSize - 1)) {
    return Status::Error(EINVAL, "madvise: unaligned address " + Hex(addr));
  }
  std::size_t rounded = RoundUp(len);
  if (len != 0 && rounded == 0) {
    return Status::Error(EINVAL, "madvise: length overflows at " + Hex(addr));
  }
  Addr end = addr + rounded;
  if (end < addr) {
    return Status::Error(EINVAL, "madvise: range wraps at " + Hex(addr));
  }
  if (end == addr) return Status::Ok();
  RegisterThread();
  std::vector<MapEntry> maps;
  const bool queried = QueryMappings(addr, end, &maps);
  if (!queried) {
    Status s = ReadView(&maps, /*full=*/true);
    if (!s.ok()) return s;
    (void)ApplyMaps(maps);
  }
  Addr cursor = addr;
  bool hole = false;
  for (const MapEntry& e : maps) {
    if (e.end <= addr) continue;
    if (e.start >= end) break;
    if (e.start > cursor) hole = true;
    Addr s0 = std::max(e.start, addr), t = std::min(e.end, end);
    if (Eligible(e)) {
      if (!parts->empty() && parts->back().first + parts->back().second == s0) {
        parts->back().second += t - s0;
      } else {
        parts->emplace_back(s0, t - s0);
      }
    } else if (not_writable != nullptr && IsPrivateAnonymous(e) &&
               (!e.read || !e.write || e.exec)) {
      not_writable->emplace_back(s0, t - s0);
    }
    cursor = t;
  }
  if (cursor < end) hole = true;
  if (queried && advising) {
    // Their flags are read before any page of them is touched (Probe).
    for (auto [start, bytes] : *parts) {
      AddInterval(&advised_unread_, start, start + bytes);
      AddInterval(&auto_excluded_, start, start + bytes);
    }
  }
  if (hole) {
    return Status::Error(ENOMEM, "madvise: range " + Hex(addr) + "-" +
                                     Hex(end) + " is not fully mapped");
  }
  return Status::Ok();
}

void LinuxMemory::YieldToUserfaultfd(Addr start, Addr end) {
  RegisterThread();
  if (protection_ != Protection::kUserfaultfd) return;
  ForEachOverlap(uffd_registered_, start, end, [this](Addr from, Addr to) {
    return protector_->Unregister(from, to - from);
  });
  RemoveInterval(&uffd_registered_, start, end);
}

bool LinuxMemory::AdvisableParts(Addr start, Addr end, bool left_out,
                                 std::vector<Range>* parts) {
  parts->clear();
  std::vector<MapEntry> maps;
  if (!QueryMappings(start, end, &maps) &&
      !ReadMappingsOver(options_.plain_maps_path, start, end, &maps)) {
    return false;
  }
  std::vector<Interval> held;
  for (const MapEntry& e : maps) {
    const Addr s = std::max(e.start, start), t = std::min(e.end, end);
    if (s < t && IsPrivateAnonymous(e)) AddInterval(&held, s, t);
  }
  if (!left_out) {
    for (const Interval& i : held)
      parts->emplace_back(i.start, i.end - i.start);
    return true;
  }
  // Left out by this view, or by the view Probe had when it called the
  // pages gone (a view read since may show them eligible again).
  std::vector<Interval> left;
  auto add = [&left](Addr from, Addr to) {
    AddInterval(&left, from, to);
    return true;
  };
  ForEachOverlap(left_out_, start, end, add);
  ForEachOverlap(gone_left_out_, start, end, add);
  RemoveInterval(&gone_left_out_, start, end);
  for (const Interval& i : held) {
    ForEachOverlap(left, i.start, i.end, [parts](Addr from, Addr to) {
      parts->emplace_back(from, to - from);
      return true;
    });
  }
  return true;
}

void LinuxMemory::EligibleParts(Addr start, Addr end, std::vector<Range>* parts,
                                bool unread_too) const {
  parts->clear();
  // The sets are sorted and disjoint: only the intervals that meet
  // [start, end) (one per merged page under scattered merges: tens of
  // thousands in all).
  auto meeting = [&](const std::vector<Interval>& set) {
    auto it =
        std::lower_bound(set.begin(), set.end(), start,
                         [](const Interval& i, Addr a) { return i.end <= a; });
    return std::pair{
        it, std::lower_bound(it, set.end(), end, [](const Interval& i, Addr a) {
          return i.start < a;
        })};
  };
  // Each interval of `set` within [start, end), less the sets in `minus`.
  auto add = [&](const std::vector<Interval>& set,
                 std::initializer_list<const std::vector<Interval>*> minus) {
    const auto [first, last] = meeting(set);
    for (auto i = first; i != last; ++i) {
      const Addr s = std::max(i->start, start), t = std::min(i->end, end);
      if (s >= t) continue;
      std::vector<Interval> merged{{s, t}};
      for (const auto* x : minus) {
        const auto [xf, xl] = meeting(*x);
        for (auto e = xf; e != xl; ++e)
          RemoveInterval(&merged, e->start, e->end);
      }
      for (const Interval& m : merged)
        parts->emplace_back(m.start, m.end - m.start);
    }
  };
  add(touchable_, {&excluded_, &auto_excluded_});
  // Less excluded_ only: deferred memory is in auto_excluded_ for the very
  // flags a read is asked for.
  if (unread_too) add(flags_unread_, {&excluded_});
}

bool LinuxMemory::QueryMappings(Addr start, Addr end,
                                std::vector<MapEntry>* maps) const {
  // Only the real process's maps (tests inject other paths). Before Linux
  // 6.11 the first query fails (ENOTTY).
  if (options_.maps_path != LinuxMemoryOptions::kOwnSmaps ||
      maps_query_fd_ < 0) {
    return false;
  }
  return QueryMappingsOf(maps_query_fd_, start, end, maps);
}

std::vector<LinuxMemory::Range> LinuxMemory::AnonymousRanges() {
  RegisterThread();
  std::vector<Range> out;
  // New mappings are mergeable in this mode, and their flags are only in
  // smaps (ReadView leaves them unmerged until its next smaps read). But
  // where the layout shows none (an idle program: every sweep), the plain
  // maps and the flags known do: a smaps read walks every page table, 4-5
  // ms in each of an idle PostgreSQL's processes, ten times a second. The
  // background scanner's sweep keeps a recent view that showed no new
  // memory, as its full scans do: its full scan had read one moments ago.
  if (view_unknown_ || !RecentViewReusable()) {
    std::vector<MapEntry> maps;
    view_fresh_ = smaps_read_at_ != 0 &&
                  ReadAndApplyView(/*full=*/false, &maps).ok() &&
                  !view_unknown_;
    if (!view_fresh_) {
      maps.clear();
      view_fresh_ = ReadAndApplyView(/*full=*/true, &maps).ok();
    }
    if (!view_fresh_) return out;
  }
  // touchable_ holds the eligible mappings and leaves out the stacks;
  // subtract the exclusions. Interval by interval: page by page, a
  // mapping of a terabyte took seconds.
  for (const Interval& t : touchable_) {
    Addr s = t.start;
    while (s < t.end) {
      if (const Interval* x = Find(excluded_, s)) {
        s = x->end;
        continue;
      }
      if (const Interval* x = Find(auto_excluded_, s)) {
        s = x->end;
        continue;
      }
      // s lies in no exclusion (above): the next ones start after it.
      const Addr e = std::min({t.end, NextIntervalStart(excluded_, s),
                               NextIntervalStart(auto_excluded_, s)});
      if (!out.empty() && out.back().first + out.back().second == s) {
        out.back().second += e - s;
      } else {
        out.emplace_back(s, e - s);
      }
      s = e;
    }
  }
  return out;
}

}  // namespace samepage::backend
