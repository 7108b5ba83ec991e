#include "preload/real.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "backend/own_memory.h"
#include "samepage/engine.h"
#include "samepage/samepage.h"

namespace samepage::preload {

RealFunctions g_real;
__thread int t_inside __attribute__((tls_model("initial-exec"))) = 0;

namespace {

// [lo, hi) of the executable mappings of libsamepage.so, and of the shared
// library that provides malloc where that is not libc (jemalloc, tcmalloc
// preloaded); 0, 0 until FindSamepageText.
struct TextRange {
  std::atomic<std::uintptr_t> lo{0};
  std::atomic<std::uintptr_t> hi{0};
  bool Contains(const void* caller) const {
    const auto pc = reinterpret_cast<std::uintptr_t>(caller);
    return pc >= lo.load(std::memory_order_relaxed) &&
           pc < hi.load(std::memory_order_acquire);
  }
};
TextRange g_samepage_text;
TextRange g_allocator_text;
// The executable's text, where the executable provides malloc itself (an
// allocator linked into it): its allocator's calls cannot be told from
// the rest of the program's there.
TextRange g_program_allocator_text;

template <typename F>
void Resolve(F* slot, const char* name) {
  void* p = dlsym(RTLD_NEXT, name);
  // Stored once; a concurrent early caller sees null and uses the syscall.
  if (p != nullptr) __atomic_store_n(slot, reinterpret_cast<F>(p),
                                     __ATOMIC_RELEASE);
}

template <typename F>
F Load(F const* slot) {
  return __atomic_load_n(slot, __ATOMIC_ACQUIRE);
}

}  // namespace

void ResolveReal() {
  ++t_inside;  // dlsym may open or read (another preload's malloc)
  Resolve(&g_real.open, "open");
  Resolve(&g_real.openat, "openat");
  Resolve(&g_real.read, "read");
  Resolve(&g_real.write, "write");
  Resolve(&g_real.pread, "pread");
  Resolve(&g_real.pwrite, "pwrite");
  Resolve(&g_real.close, "close");
  Resolve(&g_real.ioctl, "ioctl");
  Resolve(&g_real.dup, "dup");
  Resolve(&g_real.dup2, "dup2");
  Resolve(&g_real.dup3, "dup3");
  Resolve(&g_real.fcntl, "fcntl");
  Resolve(&g_real.fcntl64, "fcntl64");
  Resolve(&g_real.madvise, "madvise");
  Resolve(&g_real.process_madvise, "process_madvise");
  Resolve(&g_real.prctl, "prctl");
  Resolve(&g_real.fopen, "fopen");
  Resolve(&g_real.fopen64, "fopen64");
  Resolve(&g_real.fclose, "fclose");
  Resolve(&g_real.fflush, "fflush");
  Resolve(&g_real.fdopen, "fdopen");
  Resolve(&g_real.rewind, "rewind");
  Resolve(&g_real.fseek, "fseek");
  Resolve(&g_real.fseeko, "fseeko");
  Resolve(&g_real.fseeko64, "fseeko64");
  Resolve(&g_real.read_chk, "__read_chk");
  Resolve(&g_real.pread_chk, "__pread64_chk");
  Resolve(&g_real.readv, "readv");
  Resolve(&g_real.preadv, "preadv64");
  Resolve(&g_real.preadv2, "preadv64v2");
  Resolve(&g_real.mmap, "mmap");
  Resolve(&g_real.munmap, "munmap");
  Resolve(&g_real.mremap, "mremap");
  Resolve(&g_real.mprotect, "mprotect");
  Resolve(&g_real.sigaction, "sigaction");
  Resolve(&g_real.signal, "signal");
  Resolve(&g_real.bsd_signal, "bsd_signal");
  Resolve(&g_real.ssignal, "ssignal");
  Resolve(&g_real.sysv_signal, "sysv_signal");
  Resolve(&g_real.sysv_signal_internal, "__sysv_signal");
  Resolve(&g_real.sigset, "sigset");
  Resolve(&g_real.sigignore, "sigignore");
  Resolve(&g_real.siginterrupt, "siginterrupt");
  Resolve(&g_real.sigprocmask, "sigprocmask");
  Resolve(&g_real.pthread_sigmask, "pthread_sigmask");
  --t_inside;
}

void* NextSymbol(const char* name) {
  ++t_inside;  // dlsym may allocate or open
  void* p = dlsym(RTLD_NEXT, name);
  --t_inside;
  return p;
}

long RawSyscall(long n, long a1, long a2, long a3, long a4, long a5, long a6) {
  long ret;
  register long r10 __asm__("r10") = a4;
  register long r8 __asm__("r8") = a5;
  register long r9 __asm__("r9") = a6;
  __asm__ volatile("syscall"
                   : "=a"(ret)
                   : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8),
                     "r"(r9)
                   : "rcx", "r11", "memory");
  return ret;
}

long DirectSyscall6(long n, long a1, long a2, long a3, long a4, long a5,
                    long a6) {
  const long r = RawSyscall(n, a1, a2, a3, a4, a5, a6);
  if (r < 0 && r > -4096) {
    errno = static_cast<int>(-r);
    return -1;
  }
  return r;
}

long DirectSyscall(long n, ...) {
  long a[6];
  va_list ap;
  va_start(ap, n);
  SyscallArgs(ap, a);
  va_end(ap);
  return DirectSyscall6(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int RealOpenat(int dirfd, const char* path, int flags, mode_t mode) {
  if (auto f = Load(&g_real.openat)) return f(dirfd, path, flags, mode);
  return static_cast<int>(DirectSyscall(SYS_openat, dirfd, path, flags, mode));
}

ssize_t RealRead(int fd, void* buf, size_t n) {
  if (auto f = Load(&g_real.read)) return f(fd, buf, n);
  return DirectSyscall(SYS_read, fd, buf, n);
}

ssize_t RealWrite(int fd, const void* buf, size_t n) {
  if (auto f = Load(&g_real.write)) return f(fd, buf, n);
  return DirectSyscall(SYS_write, fd, buf, n);
}

ssize_t RealPread(int fd, void* buf, size_t n, off_t off) {
  if (auto f = Load(&g_real.pread)) return f(fd, buf, n, off);
  return DirectSyscall(SYS_pread64, fd, buf, n, off);
}

ssize_t RealPwrite(int fd, const void* buf, size_t n, off_t off) {
  if (auto f = Load(&g_real.pwrite)) return f(fd, buf, n, off);
  return DirectSyscall(SYS_pwrite64, fd, buf, n, off);
}

int RealClose(int fd) {
  if (auto f = Load(&g_real.close)) return f(fd);
  return static_cast<int>(DirectSyscall(SYS_close, fd));
}

int RealMadvise(void* addr, size_t len, int advice) {
  if (auto f = Load(&g_real.madvise)) return f(addr, len, advice);
  return static_cast<int>(DirectSyscall(SYS_madvise, addr, len, advice));
}

void* RealMmap(void* addr, size_t len, int prot, int flags, int fd,
               off_t off) {
  if (auto f = Load(&g_real.mmap)) return f(addr, len, prot, flags, fd, off);
  return reinterpret_cast<void*>(
      DirectSyscall(SYS_mmap, addr, len, prot, flags, fd, off));
}

int RealMunmap(void* addr, size_t len) {
  if (auto f = Load(&g_real.munmap)) return f(addr, len);
  return static_cast<int>(DirectSyscall(SYS_munmap, addr, len));
}

void* RealMremap(void* old, size_t old_len, size_t new_len, int flags,
                 void* new_addr) {
  if (auto f = Load(&g_real.mremap)) {
    return f(old, old_len, new_len, flags, new_addr);
  }
  return reinterpret_cast<void*>(
      DirectSyscall(SYS_mremap, old, old_len, new_len, flags, new_addr));
}

int RealMprotect(void* addr, size_t len, int prot) {
  if (auto f = Load(&g_real.mprotect)) return f(addr, len, prot);
  return static_cast<int>(DirectSyscall(SYS_mprotect, addr, len, prot));
}

namespace {

constexpr int kMaxSegments = 16;

// Records the span of the executable ones among segments[0..n) (n may
// count more than were stored, or be -1); false if there are none.
bool RecordText(const backend::LoadSegment* segments, int n, TextRange* range) {
  std::uintptr_t lo = UINTPTR_MAX;
  std::uintptr_t hi = 0;
  for (int k = 0; k < n && k < kMaxSegments; ++k) {
    if (!(segments[k].flags & PF_X)) continue;
    lo = std::min(lo, segments[k].start);
    hi = std::max(hi, segments[k].end);
  }
  if (lo >= hi) return false;
  range->lo.store(lo, std::memory_order_relaxed);
  range->hi.store(hi, std::memory_order_release);
  return true;
}

// Records the executable mappings of the shared object that holds `symbol`;
// false if none, or if it is the main program (whose text is the
// application's own code: never bypassed).
bool FindText(const void* symbol, TextRange* range) {
  backend::LoadSegment segments[kMaxSegments];
  return RecordText(
      segments, backend::LoadSegmentsOf(symbol, segments, kMaxSegments), range);
}

// The malloc of the first loaded shared object that defines one itself,
// other than libc; null if none. (dlsym(RTLD_DEFAULT) may answer with the
// PLT slot of a non-PIE executable, the canonical address of a function it
// calls.)
void* OtherAllocatorsMalloc() {
  struct Names {
    const char* name[128];
    int n;
  } names{{}, 0};
  dl_iterate_phdr(
      [](struct dl_phdr_info* i, size_t, void* data) -> int {
        auto* ns = static_cast<Names*>(data);
        if (ns->n < 128 && i->dlpi_name != nullptr && i->dlpi_name[0] != '\0')
          ns->name[ns->n++] = i->dlpi_name;
        return 0;
      },
      &names);
  for (int k = 0; k < names.n; ++k) {
    if (std::strstr(names.name[k], "/libc.so") != nullptr) continue;
    void* h = dlopen(names.name[k], RTLD_NOLOAD | RTLD_LAZY);
    if (h == nullptr) continue;
    void* m = dlsym(h, "malloc");  // it, then its dependencies
    Dl_info info;
    const bool own = m != nullptr && dladdr(m, &info) != 0 &&
                     info.dli_fname != nullptr &&
                     std::strcmp(info.dli_fname, names.name[k]) == 0;
    dlclose(h);
    if (own) return m;
  }
  return nullptr;
}

// Records the executable mappings of the main program if it defines
// malloc itself (a definition in its dynamic symbol table: an allocator
// linked into the executable, which replaces glibc's for every object).
// dlsym answers a non-PIE program's PLT slot for a malloc it only calls;
// that symbol is undefined (SHN_UNDEF).
bool FindProgramAllocatorText(TextRange* range) {
  void* const m = dlsym(RTLD_DEFAULT, "malloc");
  Dl_info info;
  void* entry = nullptr;
  if (m == nullptr || dladdr1(m, &info, &entry, RTLD_DL_SYMENT) == 0 ||
      entry == nullptr ||
      static_cast<const ElfW(Sym)*>(entry)->st_shndx == SHN_UNDEF) {
    return false;
  }
  backend::LoadSegment segments[kMaxSegments];
  if (backend::LoadSegmentsOf(m, segments, kMaxSegments) != -1)
    return false;  // not the main program's
  return RecordText(
      segments, backend::MainProgramSegments(segments, kMaxSegments), range);
}

}  // namespace

void FindSamepageText() {
  (void)FindText(reinterpret_cast<void*>(&samepage_madvise), &g_samepage_text);
  if (!FindProgramAllocatorText(&g_program_allocator_text))
    (void)FindText(OtherAllocatorsMalloc(), &g_allocator_text);
}

bool OtherAllocator() {
  return g_allocator_text.hi.load(std::memory_order_acquire) != 0 ||
         g_program_allocator_text.hi.load(std::memory_order_acquire) != 0;
}

bool FromAllocator(const void* caller) {
  return g_allocator_text.Contains(caller);
}

bool MayBeInsideAllocator(const void* caller) {
  return g_allocator_text.Contains(caller) ||
         g_program_allocator_text.Contains(caller);
}

namespace {
std::atomic<bool> g_retired{false};
}  // namespace

void Retire() { g_retired.store(true, std::memory_order_release); }

bool Retired() { return g_retired.load(std::memory_order_acquire); }

bool Bypass(const void* caller) {
  if (t_inside > 0 || Retired()) return true;
  return g_samepage_text.Contains(caller) || FromAllocator(caller) ||
         samepage::Engine::ThreadInsideEngine();
}

}  // namespace samepage::preload
