#include "backend/write_protect.h"

#include <linux/futex.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
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

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
static_assert(std::atomic<Addr>::is_always_lock_free);

// Everything the handler and the fork handlers write. It lives in its own
// mapping, excluded from merging, because merge-any mode would otherwise
// write-protect our own .bss while we write to it.
struct ProcessState {
  pthread_mutex_t window_mutex = PTHREAD_MUTEX_INITIALIZER;
  WindowSlot slots[kMaxWindows];
  std::atomic<std::uint64_t> protect_faults{0};
  std::atomic<std::uint64_t> windows_closed{0};
  std::atomic<std::uint64_t> fork_seq{0};
  std::atomic<std::uint64_t> child_gen{0};
  struct sigaction prev_segv;
  struct sigaction prev_bus;
};

ProcessState* g_state = nullptr;  // written once, before the handler exists
std::size_t g_state_size = 0;

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

void Chain(int sig, siginfo_t* info, void* context) {
  const struct sigaction& prev =
      sig == SIGSEGV ? g_state->prev_segv : g_state->prev_bus;
  if (prev.sa_flags & SA_SIGINFO) {
    prev.sa_sigaction(sig, info, context);
    return;
  }
  if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
    // Returning re-executes the faulting instruction, which now gets the
    // default action (a core dump), with the right address in the dump.
    struct sigaction dfl;
    std::memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    if (info->si_code <= 0) raise(sig);  // sent by kill(): no re-fault
    return;
  }
  prev.sa_handler(sig);
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

void ForkPrepare() {
  pthread_mutex_lock(&g_state->window_mutex);
  g_state->fork_seq.fetch_add(1);
}

void ForkParent() {
  g_state->fork_seq.fetch_add(1);
  pthread_mutex_unlock(&g_state->window_mutex);
}

void ForkChild() {
  g_state->fork_seq.fetch_add(1);
  g_state->child_gen.fetch_add(1);
  pthread_mutex_unlock(&g_state->window_mutex);
}

Status g_init_status;

void InitOnce() {
  std::size_t size = (sizeof(ProcessState) + kPageSize - 1) & ~(kPageSize - 1);
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    g_init_status = Status::Error(err, "mmap(process state)");
    return;
  }
  ProcessState* state = new (p) ProcessState();
  g_state = state;
  g_state_size = size;

  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = FaultHandler;
  // SA_NODEFER: guarded reads siglongjmp out without restoring the mask, and
  // a fault inside a chained handler must not be blocked. SA_ONSTACK: use the
  // thread's alternate stack if it has one (stack overflows reach the
  // application's handler).
  sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGSEGV, &sa, &state->prev_segv) != 0 ||
      sigaction(SIGBUS, &sa, &state->prev_bus) != 0) {
    int err = errno;
    g_init_status = Status::Error(err, "sigaction(SIGSEGV/SIGBUS)");
    return;
  }
  int err = pthread_atfork(ForkPrepare, ForkParent, ForkChild);
  if (err != 0) {
    g_init_status = Status::Error(err, "pthread_atfork");
    return;
  }
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
  return {reinterpret_cast<Addr>(g_state), g_state_size};
}

WindowLock::WindowLock() { pthread_mutex_lock(&g_state->window_mutex); }
WindowLock::~WindowLock() { pthread_mutex_unlock(&g_state->window_mutex); }

int OpenWindow(Addr start, Addr end) {
  pid_t self = Gettid();
  for (int i = 0; i < kMaxWindows; ++i) {
    WindowSlot& slot = g_state->slots[i];
    std::uint32_t expected = 0;
    if (!slot.busy.compare_exchange_strong(expected, 1)) continue;
    slot.start.store(start);
    slot.end.store(end);
    slot.owner.store(self);
    slot.seq.fetch_add(1);  // odd: open
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
}

std::uint64_t ProtectFaults() {
  return g_state ? g_state->protect_faults.load(std::memory_order_relaxed) : 0;
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
  auto* d = static_cast<std::uint64_t*>(dst);
  auto* s = static_cast<const volatile std::uint64_t*>(src);
  for (std::size_t i = 0; i < n / sizeof(std::uint64_t); ++i) d[i] = s[i];
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

bool GuardedHash(const void* page, std::uint64_t* hash) {
  std::uint64_t h = 0;
  if (!RunGuarded([&] { h = HashPage(Readable(page, kPageSize, 0)); })) {
    return false;
  }
  *hash = h;
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
  if (!RunGuarded([&] {
        p = Readable(p, n, 0);
        // Word-wise OR: branch-free inner loop, vectorised by the compiler.
        const std::uint64_t* w = static_cast<const std::uint64_t*>(p);
        std::size_t words = n / sizeof(std::uint64_t);
        std::uint64_t acc = 0;
        for (std::size_t i = 0; i < words; i += 64) {
          std::size_t lim = i + 64 < words ? i + 64 : words;
          for (std::size_t k = i; k < lim; ++k) acc |= w[k];
          if (acc != 0) break;
        }
        z = acc == 0;
      })) {
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

}  // namespace samepage::backend
