// The C library's own versions of the calls the preload interposes, and the
// guard that keeps samepage's own calls away from the interposers.
//
// Real functions are resolved with dlsym(RTLD_NEXT) by the library's
// constructor. Calls that arrive before that (another library's constructor)
// or while dlsym itself is running fall back to the raw system call, so no
// interposer ever calls dlsym on the way through: the pass-through path is
// reentrant and async-signal-safe wherever the libc call is.
//
// Bypass: a call must go straight to libc when it comes from samepage
// itself, because the engine reads /proc/self/smaps and pagemap, drops zero
// pages with madvise and closes its own descriptors through the same
// symbols, possibly while holding its lock. Four tests, any suffices:
//  - the calling thread is inside samepage (Inside, set around every call
//    the interposers make into libsamepage);
//  - the caller's return address lies in libsamepage.so;
//  - the thread is inside an engine (Engine::ThreadInsideEngine): the
//    engine's own threads (the scanner, and the one restarted in a forked
//    child), whose frees may come from code outside libsamepage: a program
//    that exports a static libstdc++ (cc1plus) runs std::string's growth
//    for libsamepage in its own copy;
//  - it lies in the program's allocator where that is not libc (jemalloc,
//    tcmalloc preloaded): it maps, unmaps and madvises from inside malloc
//    and free, where the engine, which allocates, cannot be entered. Its
//    unmaps are then not held back, like glibc's internal ones; its
//    discards go through Engine::DiscardWithoutAllocating (preload.cc).
//
// Thread safety: everything here may be used from any thread.

#ifndef SAMEPAGE_PRELOAD_REAL_H_
#define SAMEPAGE_PRELOAD_REAL_H_

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/types.h>
#include <sys/uio.h>

namespace samepage::preload {

struct RealFunctions {
  int (*open)(const char*, int, ...) = nullptr;
  int (*openat)(int, const char*, int, ...) = nullptr;
  ssize_t (*read)(int, void*, size_t) = nullptr;
  ssize_t (*write)(int, const void*, size_t) = nullptr;
  ssize_t (*pread)(int, void*, size_t, off_t) = nullptr;
  ssize_t (*pwrite)(int, const void*, size_t, off_t) = nullptr;
  int (*close)(int) = nullptr;
  int (*ioctl)(int, unsigned long, ...) = nullptr;
  int (*dup)(int) = nullptr;
  int (*dup2)(int, int) = nullptr;
  int (*dup3)(int, int, int) = nullptr;
  int (*fcntl)(int, int, ...) = nullptr;
  int (*fcntl64)(int, int, ...) = nullptr;
  int (*madvise)(void*, size_t, int) = nullptr;
  ssize_t (*process_madvise)(int, const struct iovec*, size_t, int,
                             unsigned int) = nullptr;
  int (*prctl)(int, ...) = nullptr;
  FILE* (*fopen)(const char*, const char*) = nullptr;
  FILE* (*fopen64)(const char*, const char*) = nullptr;
  int (*fclose)(FILE*) = nullptr;
  int (*fflush)(FILE*) = nullptr;
  FILE* (*fdopen)(int, const char*) = nullptr;
  void (*rewind)(FILE*) = nullptr;
  int (*fseek)(FILE*, long, int) = nullptr;
  int (*fseeko)(FILE*, off_t, int) = nullptr;
  int (*fseeko64)(FILE*, off_t, int) = nullptr;
  ssize_t (*read_chk)(int, void*, size_t, size_t) = nullptr;
  ssize_t (*pread_chk)(int, void*, size_t, off_t, size_t) = nullptr;
  ssize_t (*readv)(int, const struct iovec*, int) = nullptr;
  ssize_t (*preadv)(int, const struct iovec*, int, off_t) = nullptr;
  ssize_t (*preadv2)(int, const struct iovec*, int, off_t, int) = nullptr;
  void* (*mmap)(void*, size_t, int, int, int, off_t) = nullptr;
  int (*munmap)(void*, size_t) = nullptr;
  void* (*mremap)(void*, size_t, size_t, int, ...) = nullptr;
  int (*mprotect)(void*, size_t, int) = nullptr;
  int (*sigaction)(int, const struct sigaction*, struct sigaction*) = nullptr;
  sighandler_t (*signal)(int, sighandler_t) = nullptr;
  sighandler_t (*bsd_signal)(int, sighandler_t) = nullptr;
  sighandler_t (*ssignal)(int, sighandler_t) = nullptr;
  sighandler_t (*sysv_signal)(int, sighandler_t) = nullptr;
  sighandler_t (*sysv_signal_internal)(int, sighandler_t) = nullptr;
  sighandler_t (*sigset)(int, sighandler_t) = nullptr;
  int (*sigignore)(int) = nullptr;
  int (*siginterrupt)(int, int) = nullptr;
  int (*sigprocmask)(int, const sigset_t*, sigset_t*) = nullptr;
  int (*pthread_sigmask)(int, const sigset_t*, sigset_t*) = nullptr;
};

// Filled by ResolveReal(); null members mean "use the raw system call".
extern RealFunctions g_real;
// A system call made directly (x86-64), never through the preload's own
// syscall(), which sends the memory calls to the interposers: the kernel's
// value as it is (-errno on failure) ...
long RawSyscall(long n, long a1, long a2, long a3, long a4, long a5, long a6);
// ... or as glibc's syscall() returns it (-1 and errno on failure).
long DirectSyscall(long n, ...);
// The six arguments of a variadic system call, read as glibc's syscall()
// reads them: all six, whatever was passed.
inline void SyscallArgs(va_list ap, long a[6]) {
  for (int i = 0; i < 6; ++i) a[i] = va_arg(ap, long);
}
long DirectSyscall6(long n, long a1, long a2, long a3, long a4, long a5,
                    long a6);

void ResolveReal();

// Pass-through helpers: the libc function, or the system call before it is
// known. errno as libc sets it.
int RealOpenat(int dirfd, const char* path, int flags, mode_t mode);
ssize_t RealRead(int fd, void* buf, size_t n);
ssize_t RealWrite(int fd, const void* buf, size_t n);
ssize_t RealPread(int fd, void* buf, size_t n, off_t off);
ssize_t RealPwrite(int fd, const void* buf, size_t n, off_t off);
int RealClose(int fd);
int RealMadvise(void* addr, size_t len, int advice);
void* RealMmap(void* addr, size_t len, int prot, int flags, int fd, off_t off);
int RealMunmap(void* addr, size_t len);
void* RealMremap(void* old, size_t old_len, size_t new_len, int flags,
                 void* new_addr);
int RealMprotect(void* addr, size_t len, int prot);

// The next definition of `name` after the preload's (another library's,
// dlsym RTLD_NEXT), looked up at its first use and kept in *slot: for
// interposed functions of libraries that may be loaded after us (liburing,
// glibc's POSIX AIO).
void* NextSymbol(const char* name);
template <typename F>
F NextSymbol(F* slot, const char* name) {
  F f = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
  if (f == nullptr) {
    f = reinterpret_cast<F>(NextSymbol(name));
    __atomic_store_n(slot, f, __ATOMIC_RELEASE);
  }
  return f;
}

// Nonzero while this thread is inside a call into samepage.
extern __thread int t_inside __attribute__((tls_model("initial-exec")));

class Inside {
 public:
  Inside() { ++t_inside; }
  ~Inside() { --t_inside; }
  Inside(const Inside&) = delete;
  Inside& operator=(const Inside&) = delete;
};

// Records where libsamepage.so and, where it is not libc, the program's
// allocator are mapped (done by the constructor): Bypass and FromAllocator
// read them.
void FindSamepageText();
// True if a call with this return address must bypass the interposers
// (and every call, once Retired).
bool Bypass(const void* caller);
// samepage steps aside in this process for good (seccomp.cc): every
// interposer passes its call straight on from then on.
void Retire();
bool Retired();
// True if the return address lies in the program's allocator (one that is
// not libc's).
bool FromAllocator(const void* caller);
// True if the return address lies in the program's allocator, or in an
// executable that provides malloc itself, whose allocator's code cannot be
// told from the rest of the program's: its calls that unmap, replace,
// move, reprotect or discard memory then take the allocator's way, which
// never enters the engines (they allocate: from inside that malloc they
// waited for its lock, held by the same thread, for good).
bool MayBeInsideAllocator(const void* caller);
// True once FindSamepageText found an allocator other than glibc's.
bool OtherAllocator();

// Defined in malloc_free.cc, called by the preload's constructor: the next
// free and realloc, resolved before anything there can free; then which
// allocator the program has.
void ResolveNextAllocator();
void NoteAllocator(bool glibc);

// Defined in signals.cc, called by the preload's constructor: a program
// started with SIGSEGV or SIGBUS blocked gets them unblocked, its wish kept
// (see sigprocmask there).
void UnblockFaultsAtStart();

// Defined in preload.cc. Applies the settings `samepage run` passed in the
// environment, once, before the first call into samepage.
void EnsureStarted();
// Something may be merged from now on: MADV_DONTNEED and friends, munmap,
// mremap, mmap MAP_FIXED and mprotect must ask the engine first. The range
// form widens a lock-free bounding box of what was ever advised; the other
// covers the whole address space (merge-any, /dev/ksm regions).
void NoteAdvised();
void NoteAdvisedRange(const void* addr, size_t len);
// False if [addr, addr + len) certainly holds nothing samepage was asked to
// merge: the fast path of every interposer that changes mappings.
bool MaybeAdvised(const void* addr, size_t len);

}  // namespace samepage::preload

#endif  // SAMEPAGE_PRELOAD_REAL_H_
