// seccomp filters the program installs (prctl(PR_SET_SECCOMP), and the
// seccomp system call through syscall(), as libseccomp makes it).
//
// samepage makes system calls of its own inside the program: its scanner
// thread, and the interposers on the program's behalf (an munmap of
// merged memory gives it back with mremap). A filter that refuses one of
// them would make samepage fail there, and one that kills on it
// (SECCOMP_RET_KILL_PROCESS, as sandboxes do) would kill the program:
// until 2026-12-06 a program that sandboxed itself after merging died of
// samepage's next mmap (tests/preload/seccomp_test.c). Before the
// program's filter goes in, it is run here on the calls samepage makes,
// with the arguments it passes, by libpcap's BPF interpreter (the
// kernel's classic BPF, which seccomp uses). If it lets them all through
// (a filter that refuses only what samepage never calls, as QEMU's
// -sandbox does), nothing changes. Otherwise every merged page is given
// back and every engine stops while nothing is filtered yet, and from
// then on every call in this process goes straight to the C library
// (Retire, real.h), with a line on stderr. A filter the kernel would
// reject (it fails validation) passes as it is.
//
// Thread safety: as the libc calls.

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
// After sys/types.h, whose u_int and u_char it uses.
#include <pcap/bpf.h>

#include <cstdint>

#include "backend/write_protect.h"
#include "preload/memory_calls.h"
#include "preload/real.h"
#include "samepage/engine.h"

namespace samepage::preload {
namespace {

#if defined(__x86_64__)
constexpr std::uint32_t kArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr std::uint32_t kArch = AUDIT_ARCH_AARCH64;
#else
#error "the architecture's AUDIT_ARCH_ value is needed here"
#endif

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

// The ioctls on /proc/self/maps and pagemap (include/uapi/linux/fs.h,
// Linux 6.11 and 6.7): struct procmap_query is 104 bytes, struct
// pm_scan_arg 96.
constexpr std::uint64_t kProcmapQuery = _IOWR('f', 17, char[104]);
constexpr std::uint64_t kPagemapScan = _IOWR('f', 16, char[96]);

// A system call samepage makes, with the arguments a filter may look at
// (the others 0). Several entries for one call where samepage passes
// different flags.
struct Call {
  long nr;
  std::uint64_t a[6];
};

constexpr std::uint64_t kRw = PROT_READ | PROT_WRITE;
constexpr std::uint64_t kPrivAnon = MAP_PRIVATE | MAP_ANONYMOUS;
constexpr std::uint64_t kNoFd = ~std::uint64_t{0};  // -1
constexpr std::uint64_t kThreadFlags =
    CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
    CLONE_SYSVSEM | CLONE_SETTLS | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID;

const Call kCalls[] = {
    // Files: /proc/self/{maps,smaps,pagemap,mem}, the frame store's memfd.
    {SYS_openat, {0, 0, O_RDONLY | O_CLOEXEC}},
    {SYS_openat, {0, 0, O_RDWR | O_CLOEXEC}},
    {SYS_read},
    {SYS_write},
    {SYS_close},
    {SYS_pread64},
    {SYS_pwrite64},
    {SYS_preadv},
    {SYS_preadv2},
    {SYS_readv},
    {SYS_lseek},
    {SYS_fstat},
    {SYS_newfstatat},
    {SYS_readlink},
    {SYS_readlinkat},
    {SYS_fcntl, {0, F_DUPFD_CLOEXEC}},
    {SYS_fcntl, {0, F_GETFL}},
    {SYS_fcntl, {0, F_SETFL}},
    {SYS_dup},
    {SYS_dup3, {0, 0, O_CLOEXEC}},
    {SYS_close_range},
    {SYS_memfd_create, {0, MFD_CLOEXEC}},
    {SYS_ftruncate},
    {SYS_fallocate, {0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE}},
    // Memory.
    {SYS_mmap, {0, 0, kRw, kPrivAnon, kNoFd}},
    {SYS_mmap, {0, 0, kRw, kPrivAnon | MAP_FIXED, kNoFd}},
    {SYS_mmap, {0, 0, kRw, kPrivAnon | MAP_FIXED_NOREPLACE, kNoFd}},
    {SYS_mmap, {0, 0, PROT_NONE, kPrivAnon | MAP_NORESERVE, kNoFd}},
    {SYS_mmap, {0, 0, PROT_READ, MAP_PRIVATE | MAP_FIXED}},
    {SYS_mmap, {0, 0, kRw, MAP_PRIVATE | MAP_FIXED}},
    {SYS_mmap, {0, 0, PROT_READ, MAP_PRIVATE | MAP_FIXED | MAP_LOCKED}},
    {SYS_mmap, {0, 0, kRw, kPrivAnon | MAP_STACK, kNoFd}},  // threads
    {SYS_mmap, {0, 0, kRw, MAP_SHARED}},
    {SYS_mmap, {0, 0, PROT_NONE, MAP_SHARED}},
    {SYS_munmap},
    {SYS_mremap, {0, 0, 0, MREMAP_MAYMOVE}},
    {SYS_mremap, {0, 0, 0, MREMAP_MAYMOVE | MREMAP_FIXED}},
    {SYS_mremap, {0, 0, 0, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP}},
    {SYS_mprotect, {0, 0, PROT_NONE}},
    {SYS_mprotect, {0, 0, PROT_READ}},
    {SYS_mprotect, {0, 0, kRw}},
    {SYS_madvise, {0, 0, MADV_DONTNEED}},
    {SYS_madvise, {0, 0, MADV_DONTNEED_LOCKED}},
    {SYS_madvise, {0, 0, MADV_FREE}},
    {SYS_madvise, {0, 0, MADV_POPULATE_READ}},
    {SYS_madvise, {0, 0, MADV_POPULATE_WRITE}},
    {SYS_madvise, {0, 0, MADV_DONTFORK}},
    {SYS_madvise, {0, 0, MADV_DONTDUMP}},
    {SYS_process_madvise},
    {SYS_pidfd_open},
    {SYS_mlock},
    {SYS_mlock2, {0, 0, MLOCK_ONFAULT}},
    {SYS_munlock},
    {SYS_mincore},
    {SYS_msync, {0, 0, MS_ASYNC}},
    {SYS_brk},
    // userfaultfd and the ioctls of /proc.
    {SYS_userfaultfd, {O_CLOEXEC | O_NONBLOCK}},
    {SYS_ioctl, {0, UFFDIO_API}},
    {SYS_ioctl, {0, UFFDIO_REGISTER}},
    {SYS_ioctl, {0, UFFDIO_UNREGISTER}},
    {SYS_ioctl, {0, UFFDIO_WRITEPROTECT}},
    {SYS_ioctl, {0, UFFDIO_CONTINUE}},
    {SYS_ioctl, {0, UFFDIO_COPY}},
    {SYS_ioctl, {0, UFFDIO_WAKE}},
    {SYS_ioctl, {0, kProcmapQuery}},
    {SYS_ioctl, {0, kPagemapScan}},
    {SYS_poll},
    {SYS_ppoll},
    // Threads, signals, time.
    {SYS_clone, {kThreadFlags}},
    {SYS_clone3},
    {SYS_set_robust_list},
    {SYS_rseq},
    {SYS_futex},
    {SYS_rt_sigprocmask},
    {SYS_rt_sigaction},
    {SYS_rt_sigreturn},  // from samepage's SIGSEGV/SIGBUS handler
    {SYS_restart_syscall},
    {SYS_sigaltstack},
    {SYS_tgkill},
    {SYS_getpid},
    {SYS_gettid},
    {SYS_sched_yield},
    {SYS_nanosleep},
    {SYS_clock_nanosleep},
    {SYS_clock_gettime},
    {SYS_prctl, {PR_SET_NAME}},
    {SYS_prlimit64},
    {SYS_getrandom},
    {SYS_exit},
};

// What the filter does with `c`: its return value (SECCOMP_RET_*).
std::uint32_t Run(const struct sock_fprog& prog, const Call& c) {
  struct seccomp_data data {};
  data.nr = static_cast<int>(c.nr);
  data.arch = kArch;
  for (int i = 0; i < 6; ++i) data.args[i] = c.a[i];
  // libpcap loads words in network byte order, seccomp in the host's:
  // each 32-bit word is stored as libpcap will read it.
  unsigned char bytes[sizeof(data)];
  memcpy(bytes, &data, sizeof(data));
  for (std::size_t off = 0; off < sizeof(bytes); off += 4) {
    std::uint32_t w;
    memcpy(&w, bytes + off, 4);
    w = __builtin_bswap32(w);
    memcpy(bytes + off, &w, 4);
  }
  return bpf_filter(reinterpret_cast<const struct bpf_insn*>(prog.filter),
                    bytes, sizeof(bytes), sizeof(bytes));
}

// True if the filter lets every call of samepage's through (allowed, or
// only logged). A filter that fails validation is the kernel's to refuse.
bool LetsSamepageThrough(const struct sock_fprog* prog) {
  struct sock_fprog copy;
  if (!backend::CopyFromUser(&copy, prog, sizeof(copy)) || copy.len == 0 ||
      copy.filter == nullptr) {
    return true;
  }
  // The program itself, read safely (a bad pointer is the kernel's EFAULT).
  static struct sock_filter insns[BPF_MAXINSNS];
  if (copy.len > BPF_MAXINSNS ||
      !backend::CopyFromUser(insns, copy.filter, copy.len * sizeof(insns[0]))) {
    return true;
  }
  copy.filter = insns;
  if (!bpf_validate(reinterpret_cast<const struct bpf_insn*>(insns),
                    copy.len)) {
    return true;
  }
  for (const Call& c : kCalls) {
    const std::uint32_t action = Run(copy, c) & SECCOMP_RET_ACTION_FULL;
    // An error from clone3 is glibc's cue to make threads with clone
    // (QEMU's sandbox answers it ENOSYS), which is on the list too.
    const bool fallback = c.nr == SYS_clone3 && action == SECCOMP_RET_ERRNO;
    if (action != SECCOMP_RET_ALLOW && action != SECCOMP_RET_LOG && !fallback) {
      return false;
    }
  }
  return true;
}

void StepAside(const char* why) {
  const int saved = errno;
  {
    Inside inside;
    samepage::Engine::StopAll();
  }
  Retire();
  char line[256];
  const int n = snprintf(
      line, sizeof(line),
      "samepage: process %d installs a seccomp filter that %s: its merged "
      "pages were given back, and it merges no more\n",
      static_cast<int>(getpid()), why);
  if (n > 0) RealWrite(2, line, static_cast<size_t>(n));
  errno = saved;
}

}  // namespace

void BeforeSeccomp(bool strict, const void* prog) {
  if (Retired()) return;
  // The filter is held in a static buffer while it is read.
  static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&mu);
  if (strict) {
    StepAside("allows only read, write and exit (strict mode)");
  } else if (!LetsSamepageThrough(
                 static_cast<const struct sock_fprog*>(prog))) {
    StepAside("would refuse system calls samepage makes");
  }
  pthread_mutex_unlock(&mu);
}

}  // namespace samepage::preload
