// Write-protection windows, the process-wide fault handler, guarded reads.
//
// Owns the process-wide state every LinuxMemory shares: the SIGSEGV/SIGBUS
// handler (installed once, chaining to whatever was installed before), the
// registry of open write-protect windows, the fork lock, and the fork
// counters the frame store uses to pin frames a child may map. That state
// lives in its own anonymous mapping (ProcessStateRange), which callers must
// exclude from merging: it is written while windows are open.
//
// A window is an address range [start, end) whose pages the merging thread
// has write-protected (mprotect PROT_READ, or userfaultfd write-protect) while
// it compares and remaps them. A thread that write-faults inside an open
// window waits in the handler until the window closes, then returns so that
// the write retries against the new mapping: no write is lost. The merging
// thread itself must never write inside its own windows (the handler
// detects this and crashes rather than deadlocks).
//
// Guarded reads (GuardedHash, GuardedCompare, ...) run with a thread-local
// sigjmp_buf armed: a fault on the read (the application unmapped the page
// concurrently) makes them return false instead of crashing.
//
// Faults that are neither go to the program's own action (the chained
// action): what was installed before samepage, or what the program installed
// since through ChainedSigaction (the preload routes sigaction() and signal()
// there). It is called as the kernel would have called it: its sa_mask and
// the signal itself (unless SA_NODEFER) blocked, SA_RESETHAND honoured.
//
// Thread safety: every function may be called from any thread. The handler
// is async-signal-safe: no allocation, no locks, only atomics and futex.

#ifndef SAMEPAGE_BACKEND_WRITE_PROTECT_H_
#define SAMEPAGE_BACKEND_WRITE_PROTECT_H_

#include <signal.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "core/hash.h"
#include "core/memory.h"
#include "samepage/status.h"

namespace samepage::backend {

// Installs the fault handler and the fork handlers, once per process.
// Later calls return the first call's outcome.
[[nodiscard]] Status InitProcessState();

// The mapping holding the process-wide state: exclude it from merging.
std::pair<Addr, std::size_t> ProcessStateRange();

// sigaction(sig, act, old) for SIGSEGV or SIGBUS, as the program sees it.
// Once InitProcessState has installed the handler, the handler stays: `act`
// replaces the chained action (stored as rt_sigaction would store it) and
// `old` receives the chained one. Before that, this is the real sigaction(),
// run under the lock the install takes, so an action set while the handler
// is being installed becomes the chained one instead of replacing it.
// Returns what sigaction() returns. Async-signal-safe, as sigaction() is.
// REQUIRES: sig is SIGSEGV or SIGBUS; act and old (each may be null) are
// the caller's own memory: they are touched with every signal blocked.
int ChainedSigaction(int sig, const struct sigaction* act,
                     struct sigaction* old);

// Whether the program asked to block SIGSEGV / SIGBUS in the calling
// thread. The preload keeps both unblocked for samepage's handler (a write
// that meets an mprotect window faults, and the kernel kills a thread that
// blocks the fault's signal) and keeps the program's view here: masks it
// reads back show it, and a fault that is not samepage's gets the kernel's
// treatment of a blocked fault, the default action. Async-signal-safe.
void SetProgramBlockedFaults(bool segv, bool bus);
void ProgramBlockedFaults(bool* segv, bool* bus);

// While alive, the calling thread blocks every signal; the mask it had comes
// back after. A thread started meanwhile is born with them all blocked: one
// of samepage's own (the scanner, the stat writer) takes none of the
// program's signals. Async-signal-safe.
class AllSignalsBlocked {
 public:
  AllSignalsBlocked();
  ~AllSignalsBlocked();
  AllSignalsBlocked(const AllSignalsBlocked&) = delete;
  AllSignalsBlocked& operator=(const AllSignalsBlocked&) = delete;

 private:
  sigset_t was_;
};

// Held around every window, alone: fork() waits for it (pthread_atfork
// prepare takes WindowsClosed), so no child is ever born with pages
// write-protected by a window it cannot close. RAII, not reentrant.
class WindowLock {
 public:
  WindowLock();
  // Taken once no thread is exiting (ThreadsExiting), for a window that
  // must not fail (giving merged memory back): it waits for them, the lock
  // not held meanwhile, at most kExitingWaitNs (its caller holds the
  // engines' locks, which the exiting thread's own later destructors may
  // want; a heap trim inside such a window leaves anonymous memory above
  // the break, never a frame).
  enum AfterExits { kAfterExits };
  explicit WindowLock(AfterExits);
  ~WindowLock();
  WindowLock(const WindowLock&) = delete;
  WindowLock& operator=(const WindowLock&) = delete;
};

// Held by a change that needs only that no window be open while it runs:
// fork() (its prepare handler to its parent handler) and a discard from
// inside another allocator (Engine::DiscardWithoutAllocating). Any number
// hold it at once, and a holder never waits for a window that waits for
// another holder (readers first): fork's prepare handlers run ours before
// an allocator's (registered earlier), which take locks that a thread
// discarding from inside the allocator holds, and with one lock for all,
// such a fork deadlocked (jemalloc with background threads, every run of
// preload.fork_allocator_test.samepage_jemalloc). RAII.
class WindowsClosed {
 public:
  WindowsClosed();
  ~WindowsClosed();
  WindowsClosed(const WindowsClosed&) = delete;
  WindowsClosed& operator=(const WindowsClosed&) = delete;

 private:
  // False on a thread that holds WindowLock: no window opens meanwhile
  // anyway, and waiting would wait for the thread itself.
  bool taken_;
};

// Registers an open window over [start, end). Returns its slot, or -1 if
// every slot is busy. REQUIRES: InitProcessState() succeeded.
int OpenWindow(Addr start, Addr end);
// Closes the window and wakes the threads waiting on it.
void CloseWindow(int slot);

// A thread on its way out may still give memory back with calls nobody
// sees: glibc frees an exiting thread's malloc cache (tcache) with internal
// calls, which can trim the heap (brk) or an arena (MADV_DONTNEED) under a
// merge window. The thread calls this first (Engine::ThreadExiting): it
// waits for the window lock, so for any window open, and registers; until
// it is gone (or kExitingGiveUpNs have passed: a thread stuck in its exit
// does not stop merging for good) no merge window opens (ThreadsExiting).
// (A bound of 100 ms, the first one, a thread preempted under load
// between its destructors and its end can outlast.)
// A no-op before InitProcessState.
inline constexpr std::int64_t kExitingGiveUpNs = 5'000'000'000;
inline constexpr std::int64_t kExitingWaitNs = 100'000'000;
void NoteThreadExiting();
// REQUIRES: the window lock. True while a thread registered with
// NoteThreadExiting may still be running; forgets those gone, and those
// registered more than kExitingGiveUpNs ago.
bool ThreadsExiting();
// A window that merges (replaces pages with frames): as OpenWindow, but -1
// while a thread exits (ThreadsExiting); its merges are tried again later.
// REQUIRES: the window lock.
int OpenMergeWindow(Addr start, Addr end);

// Direct I/O (O_DIRECT reads) pins the pages it reads into for its whole
// duration, and the device writes to the pinned pages, not through the
// page tables: a page replaced meanwhile would lose the data, so it must
// not be merged or dropped while such I/O is in flight. Kernel KSM tells
// from the page's reference count; nothing shows it to user space. So the
// caller of such I/O (the preload) registers the buffer first:
// BeginPinnedIo before the system call, EndPinnedIo after it; merges
// check PinnedIoOverlaps after write-protecting (a pin taken later faults
// on the protection). Async-signal-safe, lock-free; a no-op before
// InitProcessState (no engine: nothing merges).
inline constexpr int kNoPinnedIo = -1;
inline constexpr int kPinnedIoOverflow = -2;
int BeginPinnedIo(Addr start, Addr end);
void EndPinnedIo(int token);
// True if I/O registered with BeginPinnedIo may be in flight over part of
// [start, end), or NotePinningIoInUse was called. REQUIRES:
// InitProcessState() succeeded.
bool PinnedIoOverlaps(Addr start, Addr end);
// The same for registered I/O only, NotePinningIoInUse aside: for giving
// merged pages back (an unmerge), which must go on where an interface
// that cannot be seen (io_uring) stopped merging.
bool RegisteredIoOverlaps(Addr start, Addr end);

// The process uses an interface that pins pages for I/O where samepage
// cannot see which (an io_uring): from now on every page counts as pinned,
// so nothing more is merged or dropped (merges already made stay; a pin of
// a merged page copies it first). For the life of the process, forked
// children included (they share the ring). Async-signal-safe; may be
// called before InitProcessState.
void NotePinningIoInUse();
bool PinningIoInUse();

// CLOCK_MONOTONIC in nanoseconds. Async-signal-safe.
std::int64_t MonotonicNanos();

// Writes that waited on a window, since process start.
std::uint64_t ProtectFaults();
// Forks started since process start (high 32 bits) and forks in progress
// (low 32: the prepare handler ran, the parent handler not yet): changes
// at both ends of every fork.
std::uint64_t ForkSequence();
inline bool ForkInProgress(std::uint64_t fork_sequence) {
  return (fork_sequence & 0xffff'ffffu) != 0;
}
// The handlers InitProcessState gives pthread_atfork, for a fork that does
// not go through fork() and so runs none (a clone or fork system call made
// directly): the window lock is taken for it and the fork counted, so that
// frames a child may map are pinned. No-ops before InitProcessState
// succeeded.
void RawForkPrepare();
void RawForkParent();
void RawForkChild();
// Incremented in every forked child: differs from the value seen at start in
// a process that was forked after that.
std::uint64_t ChildGeneration();

// Asks the CPU to load the page at p into its L2 cache (never faults: an
// address that is not mapped is passed by). Each page read starts a
// hardware prefetcher's stream over again (they do not cross a page): a
// scan of pages in address order that asks for the next page while it
// reads one checked zero pages 30% faster on an Intel Xeon KVM guest
// (C probe, 100,000 cold pages: 450-475 against 300-340 ns a page).
// PREFETCHT1, not T0: 64 requests for L1 at once fill its line buffers,
// and the scanner waited in this loop for them (17% of its samples on
// pairs in runs); into L2 they leave the buffers to the page being read.
// 512 MiB hashed in address order (BM_LinuxMemory_Hash/131072, four
// alternating runs): 41-51 ms against 48-59 with T0, 52-66 without.
inline void PrefetchPage(const void* p) {
  const auto* b = static_cast<const char*>(p);
  for (std::size_t off = 0; off < kPageSize; off += 64)
    __builtin_prefetch(b + off, /*rw=*/0, /*locality=*/2);
}

// PrefetchPage for the lines SampledLinesZero reads.
inline void PrefetchSampledLines(const void* p) {
  const auto* b = static_cast<const char*>(p);
  for (std::size_t l = 0; l < kZeroSampleLines; ++l)
    __builtin_prefetch(b + l * kZeroSampleStride, /*rw=*/0, /*locality=*/2);
}

// Guarded reads of application memory. False if the read faulted.
[[nodiscard]] bool GuardedHash(const void* page, std::uint64_t* hash);
// GuardedHash for a page's first visit (Memory::HashFirstVisit): a page
// whose sampled lines are all zero is taken for zeros, unread beyond them
// (*guessed). `next` (the page likely read next) is prefetched: its
// sampled lines after a page taken for zeros, all of it after any other.
[[nodiscard]] bool GuardedHashFirstVisit(const void* page, const void* next,
                                         std::uint64_t* hash, bool* guessed);
[[nodiscard]] bool GuardedEqual(const void* a, const void* b, std::size_t n,
                                bool* equal);
[[nodiscard]] bool GuardedIsZero(const void* p, std::size_t n, bool* zero);
// dst must be memory we own (never inside a window).
[[nodiscard]] bool GuardedCopy(void* dst, const void* src, std::size_t n);

// copy_from_user() for arguments of calls samepage interposes: false where
// src (n bytes) is not readable, so the caller can answer EFAULT as the
// kernel would rather than crash. A guarded read once InitProcessState has
// run (no system call); before, process_vm_readv on ourselves; where a
// sandbox denies that (seccomp: EPERM, ENOSYS), a plain copy.
[[nodiscard]] bool CopyFromUser(void* dst, const void* src, std::size_t n);

// The calling thread's static TLS and thread control block (the handler and
// guarded reads write there; for the main thread it is not on the stack).
std::pair<Addr, std::size_t> CurrentThreadTlsRange();

// Number of threads in the fault handler waiting on window `slot` (tests).
std::uint32_t WindowWaiters(int slot);

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_WRITE_PROTECT_H_
