#include "backend/write_protect.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#include "core/hash.h"

namespace samepage::backend {
namespace {

constexpr int kMaxWindows = 64;
// A fault that no open window explains is retried this often at most before
// it is treated as the application's own (see RetryUnexplained).
constexpr std::uint32_t kMaxUnexplainedRetries = 1000;

struct WindowSlot {
  std::atomic<std::uint32_t> busy{0};     // claimed by an OpenWindow caller
  std::atomic<std::uint32_t> seq{0};      // odd while open; the futex word
  std::atomic<std::uint32_t> waiters{0};  // threads waiting in the handler
  std::atomic<Addr> start{0};
  std::atomic<Addr> end{0};
  std::atomic<pid_t> owner{0};  // tid of the merging thread
};

// Threads on their way out (NoteThreadExiting): kernel tid (0: free) and
// when they registered. Written under the window lock only.
constexpr int kMaxExiting = 256;
struct ExitingSlot {
  std::atomic<pid_t> tid{0};
  std::atomic<std::int64_t> since{0};
};

// Direct I/O in flight into [start, end) (BeginPinnedIo).
constexpr int kMaxPinnedIo = 256;
struct IoSlot {
  std::atomic<std::uint32_t> busy{0};
  std::atomic<Addr> start{0};
  std::atomic<Addr> end{0};
};

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
static_assert(std::atomic<Addr>::is_always_lock_free);

// A struct sigaction kept as words, so that the handler can copy it while
// another thread replaces it (a seqlock: `seq` is odd during a write).
constexpr std::size_t kActionWords =
    sizeof(struct sigaction) / sizeof(std::uint64_t);
static_assert(sizeof(struct sigaction) % sizeof(std::uint64_t) == 0);

struct ActionCopy {
  std::atomic<std::uint32_t> seq{0};
  std::atomic<std::uint64_t> words[kActionWords];
};

// The program's action for one signal, which the handler chains to. Two
// copies: writers fill the one `version` does not name, then advance
// `version`, so a reader never waits for a write in progress.
struct ChainedAction {
  std::atomic<std::uint32_t> installed{0};  // our handler is in place
  std::atomic<std::uint32_t> version{0};    // copies[version & 1] is current
  ActionCopy copies[2];
};

// Everything the handler and the fork handlers write. It lives in its own
// mapping, excluded from merging, because merge-any mode would otherwise
// write-protect our own .bss while we write to it.
struct ProcessState {
  // Windows hold it exclusively (WindowLock), the rest shared
  // (WindowsClosed). glibc's default kind prefers readers: a reader joins
  // readers even while a writer waits.
  pthread_rwlock_t window_lock = PTHREAD_RWLOCK_INITIALIZER;
  WindowSlot slots[kMaxWindows];
  std::atomic<std::uint64_t> protect_faults{0};
  std::atomic<std::uint64_t> windows_closed{0};
  std::atomic<std::uint64_t> fork_seq{0};
  std::atomic<std::uint64_t> child_gen{0};
  // Writers of `chained` (and the install) hold it: the owner's tid, 0 free.
  std::atomic<pid_t> chain_lock{0};
  ChainedAction chained[2];  // SIGSEGV, SIGBUS
  IoSlot io_slots[kMaxPinnedIo];
  ExitingSlot exiting[kMaxExiting];
  std::atomic<std::uint32_t> exiting_count{0};  // slots with a tid
  std::atomic<std::uint32_t> io_in_flight{0};  // slots claimed + overflow
  std::atomic<std::uint32_t> io_overflow{0};   // I/O with no slot: all busy
  // What libc adds to an action on its way to the kernel (x86-64 glibc:
  // SA_RESTORER and its own restorer), read back from our own action.
  int libc_flags = 0;
  void (*libc_restorer)() = nullptr;
};

constexpr std::size_t kStateSize =
    (sizeof(ProcessState) + kPageSize - 1) & ~(kPageSize - 1);

// Created once (EnsureState), never freed; published with a CAS.
ProcessState* g_state = nullptr;

// Per-thread state touched by the handler. initial-exec: the handler must
// not call __tls_get_addr (it may allocate).
struct GuardState {
  sigjmp_buf buf;
  volatile sig_atomic_t armed;
};
struct UnexplainedFault {
  Addr addr;
  std::uint64_t closed;
  std::uint32_t count;
};
thread_local GuardState tls_guard __attribute__((tls_model("initial-exec")));
thread_local UnexplainedFault tls_unexplained
    __attribute__((tls_model("initial-exec")));

pid_t Gettid() { return static_cast<pid_t>(syscall(SYS_gettid)); }

// The merging thread's tid, asked once per thread (a system call for every
// window was ~1% of a scattered merge). Cleared in a fork()'s child, whose
// thread has a tid of its own; a child made by a raw fork system call
// keeps its parent's, which is only compared with its own windows' owner
// and no live thread of the child can have.
// SetProgramBlockedFaults: bit 0 SIGSEGV, bit 1 SIGBUS.
thread_local unsigned char tls_program_blocked
    __attribute__((tls_model("initial-exec"))) = 0;
bool ProgramBlocked(int sig) {
  return (tls_program_blocked & (sig == SIGSEGV ? 1 : 2)) != 0;
}
thread_local pid_t tls_window_tid __attribute__((tls_model("initial-exec"))) =
    0;

pid_t WindowOwnerTid() {
  if (tls_window_tid == 0) tls_window_tid = Gettid();
  return tls_window_tid;
}

void FutexWait(std::atomic<std::uint32_t>* word, std::uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT_PRIVATE,
          value, nullptr, nullptr, 0);
}

void FutexWakeAll(std::atomic<std::uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE_PRIVATE,
          INT_MAX, nullptr, nullptr, 0);
}

void WriteStderr(const char* msg) {
  ssize_t r = write(STDERR_FILENO, msg, std::strlen(msg));
  (void)r;
}

// If `addr` lies in an open window, waits for it to close and returns true.
bool WaitForWindow(Addr addr) {
  pid_t self = 0;
  for (WindowSlot& slot : g_state->slots) {
    std::uint32_t seq = slot.seq.load();
    if ((seq & 1) == 0) continue;
    Addr start = slot.start.load();
    Addr end = slot.end.load();
    pid_t owner = slot.owner.load();
    if (slot.seq.load() != seq) continue;  // reused meanwhile: not ours
    if (addr < start || addr >= end) continue;
    if (self == 0) self = Gettid();
    if (owner == self) {
      // Waiting would deadlock: the window only closes when we return.
      WriteStderr("samepage: merging thread wrote inside its own window\n");
      return false;
    }
    g_state->protect_faults.fetch_add(1, std::memory_order_relaxed);
    slot.waiters.fetch_add(1);
    while (slot.seq.load() == seq) FutexWait(&slot.seq, seq);
    slot.waiters.fetch_sub(1);
    return true;
  }
  return false;
}

// A write fault that no open window explains may still be ours: the window
// can close between the fault and the handler's look at the registry. Retry
// such a fault; treat it as the application's own when it repeats with no
// window closed in between (or too often).
bool RetryUnexplained(Addr addr) {
  std::uint64_t closed = g_state->windows_closed.load();
  if (closed == 0) return false;  // no window ever existed
  UnexplainedFault& u = tls_unexplained;
  if (u.addr == addr) {
    if (u.closed == closed || ++u.count > kMaxUnexplainedRetries) {
      u.addr = 0;
      u.count = 0;
      return false;
    }
  } else {
    u.addr = addr;
    u.count = 0;
  }
  u.closed = closed;
  return true;
}

// glibc's own name for sigaction(), which the preload does not interpose:
// samepage reaches the kernel's action through it, never through the
// preload's sigaction() (which routes SIGSEGV/SIGBUS back here).
extern "C" int __sigaction(int sig, const struct sigaction* act,
                           struct sigaction* old);

int KernelSigaction(int sig, const struct sigaction* act,
                    struct sigaction* old) {
  return __sigaction(sig, act, old);
}

// The bits of sa_flags that rt_sigaction keeps (the kernel's UAPI_SA_FLAGS on
// x86-64; it clears the rest since 5.11, so a program can probe for them).
constexpr int kSaExposeTagbits = 0x00000800;
constexpr int kSaRestorer = 0x04000000;
constexpr int kKernelFlags = static_cast<int>(
    SA_NOCLDSTOP | SA_NOCLDWAIT | SA_SIGINFO | SA_ONSTACK | SA_RESTART |
    SA_NODEFER | SA_RESETHAND | kSaExposeTagbits | kSaRestorer);
// The kernel's sigset is 64 bits; glibc passes only those to rt_sigaction.
constexpr std::size_t kKernelSigsetBytes = 8;

ProcessState* EnsureState() {
  ProcessState* state = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE);
  if (state != nullptr) return state;
  void* p = mmap(nullptr, kStateSize, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  ProcessState* fresh = new (p) ProcessState();
  if (__atomic_compare_exchange_n(&g_state, &state, fresh, false,
                                  __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    return fresh;
  }
  munmap(p, kStateSize);  // another thread was first
  return state;
}

ChainedAction& Chained(ProcessState* state, int sig) {
  return state->chained[sig == SIGSEGV ? 0 : 1];
}

// Serialises the writers of the chained actions and the install. Every
// signal is blocked while it is held, so a handler never interrupts the
// holder on its own thread; a holder that no longer exists (this process
// was forked while another thread held it) is replaced. Keeps errno.
class ChainLock {
 public:
  explicit ChainLock(ProcessState* state) : state_(state) {
    const int saved_errno = errno;
    const pid_t self = Gettid();
    for (;;) {
      pid_t owner = 0;
      if (state_->chain_lock.compare_exchange_strong(owner, self)) break;
      if (syscall(SYS_tgkill, getpid(), owner, 0) != 0 && errno == ESRCH) {
        if (state_->chain_lock.compare_exchange_strong(owner, self)) break;
        continue;
      }
      sched_yield();  // the holder only copies a few words: let it run
    }
    errno = saved_errno;
  }
  ~ChainLock() { state_->chain_lock.store(0); }
  ChainLock(const ChainLock&) = delete;
  ChainLock& operator=(const ChainLock&) = delete;

 private:
  ProcessState* state_;
  AllSignalsBlocked blocked_;  // from before the lock is taken to after
};

// Copies the current chained action out; returns its version. Lock-free:
// retries only if two writes completed meanwhile.
std::uint32_t ReadAction(const ChainedAction& c, struct sigaction* out) {
  for (;;) {
    const std::uint32_t version = c.version.load(std::memory_order_acquire);
    const ActionCopy& copy = c.copies[version & 1];
    const std::uint32_t seq = copy.seq.load(std::memory_order_acquire);
    if (seq & 1) continue;  // rewritten since `version` was read
    std::uint64_t words[kActionWords];
    for (std::size_t i = 0; i < kActionWords; ++i) {
      words[i] = copy.words[i].load(std::memory_order_relaxed);
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    if (copy.seq.load(std::memory_order_relaxed) != seq) continue;
    std::memcpy(out, words, sizeof(*out));
    return version;
  }
}

// REQUIRES: ChainLock held.
void WriteAction(ChainedAction* c, const struct sigaction& act) {
  const std::uint32_t version = c->version.load(std::memory_order_relaxed) + 1;
  ActionCopy& copy = c->copies[version & 1];
  std::uint64_t words[kActionWords];
  std::memcpy(words, &act, sizeof(act));
  copy.seq.fetch_add(1, std::memory_order_relaxed);  // odd: writing
  std::atomic_thread_fence(std::memory_order_release);
  for (std::size_t i = 0; i < kActionWords; ++i) {
    copy.words[i].store(words[i], std::memory_order_relaxed);
  }
  copy.seq.fetch_add(1, std::memory_order_release);  // even: done
  c->version.store(version, std::memory_order_release);
}

// `act` as the kernel stores it when libc hands it over: the flags it keeps
// plus libc's, libc's restorer, 64 signals of mask without SIGKILL/SIGSTOP.
struct sigaction KernelForm(const ProcessState& state,
                            const struct sigaction& act) {
  struct sigaction k;
  std::memset(&k, 0, sizeof(k));
  k.sa_sigaction = act.sa_sigaction;  // the handler, whichever kind
  std::memcpy(&k.sa_mask, &act.sa_mask, kKernelSigsetBytes);
  sigdelset(&k.sa_mask, SIGKILL);
  sigdelset(&k.sa_mask, SIGSTOP);
  k.sa_flags = (act.sa_flags & kKernelFlags) | state.libc_flags;
  k.sa_restorer = state.libc_restorer;
  return k;
}

// Hands a fault that is not ours to the program's action, as the kernel
// would have delivered it.
void Chain(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  ChainedAction& chained = Chained(g_state, sig);
  struct sigaction act;
  const std::uint32_t version = ReadAction(chained, &act);
  const bool sent = info->si_code <= 0;  // by kill(), tgkill(), sigqueue()
  if (act.sa_handler == SIG_IGN && sent) return;  // the kernel discards it
  // Sent while the program blocks it: it would wait, pending, in the
  // kernel; here it is dropped (rare: a SIGSEGV sent by kill()).
  if (sent && ProgramBlocked(sig)) return;
  // A fault the program blocked: the kernel gives it the default action.
  if (act.sa_handler == SIG_DFL || act.sa_handler == SIG_IGN ||
      ProgramBlocked(sig)) {
    // A fault cannot be ignored. Returning re-executes the faulting
    // instruction, which now gets the default action (a core dump), with
    // the right address in the dump.
    struct sigaction dfl;
    std::memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    KernelSigaction(sig, &dfl, nullptr);
    if (sent) raise(sig);  // no re-fault
    return;
  }
  if (act.sa_flags & SA_RESETHAND) {
    // As the kernel: back to SIG_DFL before the handler runs, unless the
    // program installed another action meanwhile.
    ChainLock lock(g_state);
    if (chained.version.load() == version) {
      struct sigaction reset = act;
      reset.sa_handler = SIG_DFL;
      WriteAction(&chained, reset);
    }
  }
  // Blocked for the handler's run; the kernel restores the mask when our
  // handler returns (or the program's siglongjmp does, as without us).
  sigset_t block = act.sa_mask;
  if (!(act.sa_flags & SA_NODEFER)) sigaddset(&block, sig);
  pthread_sigmask(SIG_BLOCK, &block, nullptr);
  // The mask the handler sets ends with it, as the kernel's sigreturn
  // ends it; so does the program's view of SIGSEGV and SIGBUS, which the
  // kernel's mask does not hold. V8's trap handler unblocks SIGSEGV, then
  // sets back the mask it saved, SIGSEGV blocked by the delivery: kept,
  // that view gave node's next WebAssembly trap the default action.
  const unsigned char view = tls_program_blocked;
  errno = saved_errno;
  if (act.sa_flags & SA_SIGINFO) {
    act.sa_sigaction(sig, info, context);
  } else {
    act.sa_handler(sig);
  }
  tls_program_blocked = view;
}

void FaultHandler(int sig, siginfo_t* info, void* context) {
  int saved_errno = errno;
  if (tls_guard.armed) {
    tls_guard.armed = 0;
    siglongjmp(tls_guard.buf, 1);
  }
  if (sig == SIGSEGV && info->si_code == SEGV_ACCERR) {
    Addr addr = reinterpret_cast<Addr>(info->si_addr);
    if (WaitForWindow(addr) || RetryUnexplained(addr)) {
      errno = saved_errno;
      return;
    }
  }
  errno = saved_errno;
  Chain(sig, info, context);
}

// Set once pthread_atfork took the handlers below (RawFork*).
std::atomic<bool> g_fork_handlers{false};

constexpr std::uint64_t kForkStarted = std::uint64_t{1} << 32;

void ForkPrepare() {
  pthread_rwlock_rdlock(&g_state->window_lock);
  g_state->fork_seq.fetch_add(kForkStarted + 1);
}

void ForkParent() {
  g_state->fork_seq.fetch_sub(1);
  pthread_rwlock_unlock(&g_state->window_lock);
}

void ForkChild() {
  tls_window_tid = 0;
  // Other threads' forks and discards in progress are not the child's: it
  // has one thread, and a lock no thread of it holds.
  g_state->fork_seq.store(g_state->fork_seq.load() & ~(kForkStarted - 1));
  g_state->child_gen.fetch_add(1);
  // The parent's direct I/O in flight is not the child's: its other threads
  // are gone, and fork copied the pinned pages for the child rather than
  // share them. Left registered, they would hold merges back for good.
  for (IoSlot& slot : g_state->io_slots) slot.busy.store(0);
  g_state->io_overflow.store(0);
  g_state->io_in_flight.store(0);
  // Nor are its exiting threads: the child has none of them.
  for (ExitingSlot& slot : g_state->exiting) slot.tid.store(0);
  g_state->exiting_count.store(0);
  // This thread's own hold (ForkPrepare's) is given back first, as the
  // thread that took it: a runtime that tracks the locks each thread holds
  // (ThreadSanitizer) would otherwise see it held still, and report a
  // lock-order cycle or abort at the next lock. The parent's other
  // threads' holds go with the init.
  pthread_rwlock_unlock(&g_state->window_lock);
  pthread_rwlock_init(&g_state->window_lock, nullptr);
}

Status g_init_status;

void InitOnce() {
  ProcessState* state = EnsureState();
  if (state == nullptr) {
    int err = errno;
    g_init_status = Status::Error(err, "mmap(process state)");
    return;
  }

  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = FaultHandler;
  // SA_NODEFER: guarded reads siglongjmp out without restoring the mask, and
  // a fault inside a chained handler must not be blocked. SA_ONSTACK: use the
  // thread's alternate stack if it has one (stack overflows reach the
  // application's handler).
  sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  {
    ChainLock lock(state);
    for (int sig : {SIGSEGV, SIGBUS}) {
      ChainedAction& chained = Chained(state, sig);
      // The program's action is chained before ours is installed, so the
      // handler has it from its first fault on.
      struct sigaction prev;
      if (KernelSigaction(sig, nullptr, &prev) != 0) {
        int err = errno;
        g_init_status = Status::Error(err, "sigaction(SIGSEGV/SIGBUS)");
        return;
      }
      WriteAction(&chained, prev);
      if (KernelSigaction(sig, &sa, &prev) != 0) {
        int err = errno;
        g_init_status = Status::Error(err, "sigaction(SIGSEGV/SIGBUS)");
        return;
      }
      WriteAction(&chained, prev);  // the same, unless a raw syscall raced
      chained.installed.store(1);
    }
    struct sigaction ours;
    if (KernelSigaction(SIGSEGV, nullptr, &ours) == 0) {
      state->libc_flags = ours.sa_flags & ~sa.sa_flags;
      state->libc_restorer = ours.sa_restorer;
    }
  }
  int err = pthread_atfork(ForkPrepare, ForkParent, ForkChild);
  if (err != 0) {
    g_init_status = Status::Error(err, "pthread_atfork");
    return;
  }
  g_fork_handlers.store(true, std::memory_order_release);
}

template <typename F>
__attribute__((noinline)) bool RunGuarded(F&& f) {
  GuardState& g = tls_guard;
  // savemask 0: no sigprocmask syscall; SA_NODEFER keeps SIGSEGV unblocked.
  if (sigsetjmp(g.buf, 0) != 0) return false;
  g.armed = 1;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  f();
  std::atomic_signal_fence(std::memory_order_seq_cst);
  g.armed = 0;
  return true;
}

}  // namespace

Status InitProcessState() {
  static std::once_flag once;
  std::call_once(once, InitOnce);
  return g_init_status;
}

std::pair<Addr, std::size_t> ProcessStateRange() {
  return {reinterpret_cast<Addr>(g_state), kStateSize};
}

void SetProgramBlockedFaults(bool segv, bool bus) {
  tls_program_blocked =
      static_cast<unsigned char>((segv ? 1 : 0) | (bus ? 2 : 0));
}

void ProgramBlockedFaults(bool* segv, bool* bus) {
  *segv = (tls_program_blocked & 1) != 0;
  *bus = (tls_program_blocked & 2) != 0;
}

int ChainedSigaction(int sig, const struct sigaction* act,
                     struct sigaction* old) {
  ProcessState* state = EnsureState();
  if (state == nullptr) return KernelSigaction(sig, act, old);
  ChainedAction& chained = Chained(state, sig);
  ChainLock lock(state);
  if (!chained.installed.load()) return KernelSigaction(sig, act, old);
  if (old != nullptr) ReadAction(chained, old);
  if (act != nullptr) WriteAction(&chained, KernelForm(*state, *act));
  return 0;
}

AllSignalsBlocked::AllSignalsBlocked() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &was_);
}
AllSignalsBlocked::~AllSignalsBlocked() {
  pthread_sigmask(SIG_SETMASK, &was_, nullptr);
}

std::int64_t MonotonicNanos() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Whether this thread holds the window lock alone (WindowLock): a call it
// then makes from inside another allocator (the engine allocating while it
// changes a mapping) takes WindowsClosed, which must not wait for the
// thread itself. (glibc's rdlock returns EDEADLK to the writer, and the
// unlock that followed released the writer's lock.)
static thread_local int tls_window_lock_held
    __attribute__((tls_model("initial-exec"))) = 0;

WindowLock::WindowLock() {
  pthread_rwlock_wrlock(&g_state->window_lock);
  ++tls_window_lock_held;
}
WindowLock::WindowLock(AfterExits) {
  const std::int64_t until = MonotonicNanos() + kExitingWaitNs;
  pthread_rwlock_wrlock(&g_state->window_lock);
  while (ThreadsExiting() && MonotonicNanos() < until) {
    pthread_rwlock_unlock(&g_state->window_lock);
    usleep(100);
    pthread_rwlock_wrlock(&g_state->window_lock);
  }
  ++tls_window_lock_held;
}
WindowLock::~WindowLock() {
  --tls_window_lock_held;
  pthread_rwlock_unlock(&g_state->window_lock);
}

WindowsClosed::WindowsClosed() : taken_(tls_window_lock_held == 0) {
  if (taken_) pthread_rwlock_rdlock(&g_state->window_lock);
}
WindowsClosed::~WindowsClosed() {
  if (taken_) pthread_rwlock_unlock(&g_state->window_lock);
}

// Windows this thread has open: an allocation then may wait for malloc's
// lock, held by a writer that faulted in the window and waits for it to
// close (debug builds check it: the wrappers at the end of this file).
static thread_local int tls_windows_open
    __attribute__((tls_model("initial-exec"))) = 0;

int OpenWindow(Addr start, Addr end) {
  const pid_t self = WindowOwnerTid();
  for (int i = 0; i < kMaxWindows; ++i) {
    WindowSlot& slot = g_state->slots[i];
    std::uint32_t expected = 0;
    if (!slot.busy.compare_exchange_strong(expected, 1)) continue;
    slot.start.store(start);
    slot.end.store(end);
    slot.owner.store(self);
    slot.seq.fetch_add(1);  // odd: open
    ++tls_windows_open;
    return i;
  }
  return -1;
}

void CloseWindow(int slot_index) {
  WindowSlot& slot = g_state->slots[slot_index];
  // Count first: a handler that finds the slot closed also sees the count
  // change (RetryUnexplained relies on it).
  g_state->windows_closed.fetch_add(1);
  slot.seq.fetch_add(1);  // even: closed
  // seq_cst pairs with the waiter's waiters++ then seq load.
  if (slot.waiters.load() != 0) FutexWakeAll(&slot.seq);
  slot.busy.store(0);
  --tls_windows_open;
}

void NoteThreadExiting() {
  if (g_state == nullptr) return;
  const int saved_errno = errno;
  const auto tid = static_cast<pid_t>(syscall(SYS_gettid));
  // All slots taken (256 threads exiting at once): they free up as those
  // threads go.
  for (int attempt = 0; attempt < 2000; ++attempt) {
    {
      WindowLock lock;
      (void)ThreadsExiting();  // frees the slots of threads gone
      for (ExitingSlot& slot : g_state->exiting) {
        if (slot.tid.load() != 0) continue;
        slot.since.store(MonotonicNanos());
        slot.tid.store(tid);
        g_state->exiting_count.fetch_add(1);
        errno = saved_errno;
        return;
      }
    }
    usleep(100);
  }
  errno = saved_errno;
}

int OpenMergeWindow(Addr start, Addr end) {
  return ThreadsExiting() ? -1 : OpenWindow(start, end);
}

bool ThreadsExiting() {
  if (g_state->exiting_count.load() == 0) return false;
  const int saved_errno = errno;
  const pid_t pid = getpid();
  const std::int64_t now = MonotonicNanos();
  bool any = false;
  for (ExitingSlot& slot : g_state->exiting) {
    const pid_t tid = slot.tid.load();
    if (tid == 0) continue;
    // Signal 0 only asks whether the thread still exists.
    const bool gone = syscall(SYS_tgkill, pid, tid, 0) != 0 && errno == ESRCH;
    if (gone || now - slot.since.load() > kExitingGiveUpNs) {
      slot.tid.store(0);
      g_state->exiting_count.fetch_sub(1);
      continue;
    }
    any = true;
  }
  errno = saved_errno;
  return any;
}

// Not in the process state: it may be set before any engine exists.
static std::atomic<bool> g_pinning_io_in_use{false};

void NotePinningIoInUse() { g_pinning_io_in_use.store(true); }

bool PinningIoInUse() { return g_pinning_io_in_use.load(); }

int BeginPinnedIo(Addr start, Addr end) {
  if (g_state == nullptr) return kNoPinnedIo;
  for (int i = 0; i < kMaxPinnedIo; ++i) {
    IoSlot& slot = g_state->io_slots[i];
    std::uint32_t expected = 0;
    if (!slot.busy.compare_exchange_strong(expected, 1)) continue;
    slot.start.store(start);
    slot.end.store(end);
    g_state->io_in_flight.fetch_add(1);
    return i;
  }
  g_state->io_overflow.fetch_add(1);
  g_state->io_in_flight.fetch_add(1);
  return kPinnedIoOverflow;
}

void EndPinnedIo(int token) {
  if (token == kNoPinnedIo) return;
  g_state->io_in_flight.fetch_sub(1);
  if (token == kPinnedIoOverflow) {
    g_state->io_overflow.fetch_sub(1);
  } else {
    g_state->io_slots[token].busy.store(0);
  }
}

namespace {

// The registered reads overlapping [start, end). REQUIRES: a seq_cst fence
// just before (see PinnedIoOverlaps).
bool RegisteredIoOverlapsFenced(Addr start, Addr end) {
  if (g_state->io_in_flight.load() == 0) return false;
  if (g_state->io_overflow.load() != 0) return true;
  for (const IoSlot& slot : g_state->io_slots) {
    if (slot.busy.load() == 0) continue;
    if (slot.start.load() < end && start < slot.end.load()) return true;
  }
  return false;
}

}  // namespace

bool PinnedIoOverlaps(Addr start, Addr end) {
  // Pairs with BeginPinnedIo's stores, which precede the I/O's system call:
  // what this misses started after the caller's write-protection, so its
  // pages fault (and wait, or fail) instead of being pinned.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (g_pinning_io_in_use.load()) return true;
  return RegisteredIoOverlapsFenced(start, end);
}

bool RegisteredIoOverlaps(Addr start, Addr end) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return RegisteredIoOverlapsFenced(start, end);
}

std::uint64_t ProtectFaults() {
  return g_state ? g_state->protect_faults.load(std::memory_order_relaxed) : 0;
}

void RawForkPrepare() {
  if (g_fork_handlers.load(std::memory_order_acquire)) ForkPrepare();
}
void RawForkParent() {
  if (g_fork_handlers.load(std::memory_order_acquire)) ForkParent();
}
void RawForkChild() {
  if (g_fork_handlers.load(std::memory_order_acquire)) ForkChild();
}

std::uint64_t ForkSequence() { return g_state ? g_state->fork_seq.load() : 0; }

std::uint64_t ChildGeneration() {
  return g_state ? g_state->child_gen.load() : 0;
}

std::uint32_t WindowWaiters(int slot) {
  return g_state->slots[slot].waiters.load();
}

std::pair<Addr, std::size_t> CurrentThreadTlsRange() {
  // x86-64 (TLS variant II): static TLS sits just below the thread pointer,
  // the TCB (struct pthread, ~2.3 KiB) just above it. Cover what we write:
  // errno, our thread_locals, and the TCB.
  Addr tp = reinterpret_cast<Addr>(pthread_self());
  Addr addrs[] = {tp, reinterpret_cast<Addr>(&tls_guard),
                  reinterpret_cast<Addr>(&tls_unexplained),
                  reinterpret_cast<Addr>(&errno)};
  Addr lo = tp, hi = tp + 4096;
  for (Addr a : addrs) {
    if (a < lo) lo = a;
    if (a + 512 > hi) hi = a + 512;
  }
  lo &= ~(kPageSize - 1);
  hi = (hi + kPageSize - 1) & ~(kPageSize - 1);
  return {lo, hi - lo};
}

// Under AddressSanitizer, application pages may be heap memory with poisoned
// redzones (merge-any scans the heap): reading them is legitimate here, so
// sanitizer builds first copy them with an uninstrumented loop.
#if defined(__SANITIZE_ADDRESS__)
__attribute__((no_sanitize_address)) void RawCopy(void* dst, const void* src,
                                                  std::size_t n) {
  // Byte by byte: any length, any alignment (sanitizer builds only).
  auto* d = static_cast<unsigned char*>(dst);
  auto* s = static_cast<const volatile unsigned char*>(src);
  for (std::size_t i = 0; i < n; ++i) d[i] = s[i];
}
alignas(64) thread_local unsigned char tls_copy[2][kPageSize];
const void* Readable(const void* p, std::size_t n, int slot) {
  if (n > kPageSize) return p;
  RawCopy(tls_copy[slot], p, n);
  return tls_copy[slot];
}
#else
const void* Readable(const void* p, std::size_t, int) { return p; }
#endif

namespace {

// Whether n bytes from p are all zero: an OR of 32-byte vectors, four
// independent chains per 128 bytes, a test every 512 bytes (so a page
// that is not zero is passed by after its first 512 bytes, as a rule).
// The plain word loop was not vectorised at -O2 and cost more than
// hashing the page.
bool ZeroBytes(const void* p, std::size_t n) {
  using V = std::uint64_t __attribute__((vector_size(32), aligned(8)));
  const std::byte* b = static_cast<const std::byte*>(p);
  const std::size_t vec_bytes = n & ~std::size_t{511};
  V acc0{}, acc1{}, acc2{}, acc3{};
  std::size_t i = 0;
  for (; i < vec_bytes; i += 512) {
    for (std::size_t k = i; k < i + 512; k += 128) {
      V v0, v1, v2, v3;
      std::memcpy(&v0, b + k, 32);
      std::memcpy(&v1, b + k + 32, 32);
      std::memcpy(&v2, b + k + 64, 32);
      std::memcpy(&v3, b + k + 96, 32);
      acc0 |= v0;
      acc1 |= v1;
      acc2 |= v2;
      acc3 |= v3;
    }
    const V all = acc0 | acc1 | acc2 | acc3;
    if ((all[0] | all[1] | all[2] | all[3]) != 0) return false;
  }
  std::uint64_t acc = 0;
  for (; i < n; ++i) acc |= std::to_integer<std::uint64_t>(b[i]);
  return acc == 0;
}

// The hash of the readable page at p. A page of zeros has the zero page's
// hash (zero_hash): known, and the check reads the page faster than XXH3
// does (free memory is mostly zeros). Any other page is passed by after
// its first bytes, which XXH3 then finds in the cache.
std::uint64_t HashReadable(const void* p, std::uint64_t zero_hash) {
  return ZeroBytes(p, kPageSize) ? zero_hash : HashPage(p);
}

}  // namespace

bool GuardedHash(const void* page, std::uint64_t* hash) {
  std::uint64_t h = 0;
  const std::uint64_t zero_hash = ZeroPageHash();  // made outside the guard
  if (!RunGuarded(
          [&] { h = HashReadable(Readable(page, kPageSize, 0), zero_hash); })) {
    return false;
  }
  *hash = h;
  return true;
}

bool GuardedHashFirstVisit(const void* page, const void* next,
                           std::uint64_t* hash, bool* guessed) {
  std::uint64_t h = 0;
  bool g = false;
  const std::uint64_t zero_hash = ZeroPageHash();  // made outside the guard
  if (!RunGuarded([&] {
        const void* p = Readable(page, kPageSize, 0);
        if (SampledLinesZero(p)) {
          // Pages of zeros come in runs (free memory): the next one is
          // likely sampled too.
          PrefetchSampledLines(next);
          g = true;
          h = zero_hash;
          return;
        }
        PrefetchPage(next);
        h = HashReadable(p, zero_hash);
      })) {
    return false;
  }
  *hash = h;
  *guessed = g;
  return true;
}

bool GuardedEqual(const void* a, const void* b, std::size_t n, bool* equal) {
  int r = 1;
  if (!RunGuarded([&] {
        r = std::memcmp(Readable(a, n, 0), Readable(b, n, 1), n);
      })) {
    return false;
  }
  *equal = r == 0;
  return true;
}

bool GuardedIsZero(const void* p, std::size_t n, bool* zero) {
  bool z = false;
  if (!RunGuarded([&] { z = ZeroBytes(Readable(p, n, 0), n); })) {
    return false;
  }
  *zero = z;
  return true;
}

bool GuardedCopy(void* dst, const void* src, std::size_t n) {
  return RunGuarded([&] {
#if defined(__SANITIZE_ADDRESS__)
    RawCopy(dst, src, n);  // src may be poisoned heap: see Readable()
#else
    std::memcpy(dst, src, n);
#endif
  });
}

bool CopyFromUser(void* dst, const void* src, std::size_t n) {
  if (n == 0) return true;
  if (src == nullptr) return false;
  if (g_state != nullptr && g_init_status.ok()) return GuardedCopy(dst, src, n);
  iovec local{dst, n};
  iovec remote{const_cast<void*>(src), n};
  const ssize_t r = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
  if (r == static_cast<ssize_t>(n)) return true;
  if (r < 0 && (errno == ENOSYS || errno == EPERM)) {
    std::memcpy(dst, src, n);
    return true;
  }
  return false;
}

}  // namespace samepage::backend

#ifndef NDEBUG
// Debug builds: samepage's own calls of operator new and delete and of free
// (renamed to these by the linker's --wrap, CMakeLists.txt; the program's
// are left alone) abort on a thread with a window open. Nothing inside a
// window may allocate: a thread of the program that holds malloc's lock
// may be writing into the window's pages, waiting for it to close
// (ClassifyProtectError did, until 2026-12-07). Nor free: a free may trim
// the heap under the window, whose frame then lands above the break.
namespace {
void CheckNoWindowOpen(const char* what) {
  if (samepage::backend::tls_windows_open > 0) {
    samepage::backend::WriteStderr("samepage: ");
    samepage::backend::WriteStderr(what);
    samepage::backend::WriteStderr(" inside a merge window\n");
    std::abort();
  }
}
}  // namespace
extern "C" void* __real__Znwm(std::size_t size);
extern "C" void* __wrap__Znwm(std::size_t size) {
  CheckNoWindowOpen("allocation");
  return __real__Znwm(size);
}
extern "C" void __real__ZdlPv(void* p);
extern "C" void __wrap__ZdlPv(void* p) {
  if (p != nullptr) CheckNoWindowOpen("delete");
  __real__ZdlPv(p);
}
extern "C" void __real__ZdlPvm(void* p, std::size_t size);
extern "C" void __wrap__ZdlPvm(void* p, std::size_t size) {
  if (p != nullptr) CheckNoWindowOpen("delete");
  __real__ZdlPvm(p, size);
}
extern "C" void __real_free(void* p);
extern "C" void __wrap_free(void* p) {
  if (p != nullptr) CheckNoWindowOpen("free");
  __real_free(p);
}
#endif
