// The program's own SIGSEGV and SIGBUS handlers under `samepage run`.
//
// samepage's fault handler (backend/write_protect.h) must stay installed
// once it is: writers that fault inside a merge window wait in it (mprotect
// protection), and guarded reads leave through it when the program unmaps
// a page being read. A program that installs its own handler afterwards
// would replace it. So for SIGSEGV and SIGBUS these calls set and report the
// action samepage's handler chains to (backend::ChainedSigaction), with
// glibc's semantics on top:
//   sigaction                       the action as given
//   signal, bsd_signal, ssignal     BSD: the signal blocked in its handler,
//                                   SA_RESTART unless siginterrupt() said no
//   sysv_signal, __sysv_signal      SA_RESETHAND | SA_NODEFER, no SA_RESTART
//   sigset                          SIG_HOLD blocks; else set, then unblock
//   sigignore                       SIG_IGN
//   siginterrupt                    clears / sets SA_RESTART
// And the signal mask: sigprocmask and pthread_sigmask never block SIGSEGV
// or SIGBUS (nor does a program start with them blocked): a write that
// meets an mprotect window faults, and the kernel kills a thread that
// blocks the fault's signal. What the program asked for is kept
// (backend::SetProgramBlockedFaults): masks it reads back show it, and a
// fault that is not samepage's gets the default action, as a blocked fault
// does. A thread the program creates starts with them unblocked.
// Every other signal, and every call samepage makes itself, goes to libc.
// samepage reaches the kernel's action through glibc's __sigaction, which
// is not interposed.
//
// Thread safety: as the libc calls, and async-signal-safe where they are.

#include <errno.h>
#include <signal.h>
#include <string.h>

#include <atomic>

#include "backend/write_protect.h"
#include "preload/real.h"

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

#ifndef SA_INTERRUPT
#define SA_INTERRUPT 0x20000000  // historical; the kernel drops it
#endif

namespace samepage::preload {
namespace {

bool Chained(int sig) { return sig == SIGSEGV || sig == SIGBUS; }

// siginterrupt() for SIGSEGV and SIGBUS: nonzero when signal() must not set
// SA_RESTART (glibc keeps this for the other signals, in _sigintr).
std::atomic<int> g_interrupt[2];

std::atomic<int>& Interrupt(int sig) {
  return g_interrupt[sig == SIGSEGV ? 0 : 1];
}

// The libc function in `slot`, resolved now if the constructor has not run
// yet; null (errno ENOSYS) if there is none.
template <typename F>
F Real(F const* slot) {
  F f = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
  if (f == nullptr) {
    ResolveReal();
    f = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
  }
  if (f == nullptr) errno = ENOSYS;
  return f;
}

// sigaction() on the chained action of SIGSEGV or SIGBUS.
int Sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
  // Copied first, as glibc does: a bad pointer faults here, before anything
  // changed (and the backend touches only our copies with signals blocked).
  struct sigaction in;
  struct sigaction out;
  if (act != nullptr) in = *act;
  Inside inside;
  const int r = backend::ChainedSigaction(sig, act != nullptr ? &in : nullptr,
                                          old != nullptr ? &out : nullptr);
  if (r == 0 && old != nullptr) *old = out;
  return r;
}

// signal()-style: installs `handler` with `mask_self` and `flags`, returns
// the old handler or SIG_ERR.
sighandler_t SetHandler(int sig, sighandler_t handler, bool mask_self,
                        int flags) {
  if (handler == SIG_ERR) {
    errno = EINVAL;
    return SIG_ERR;
  }
  struct sigaction act;
  struct sigaction old;
  memset(&act, 0, sizeof(act));
  act.sa_handler = handler;
  sigemptyset(&act.sa_mask);
  if (mask_self) sigaddset(&act.sa_mask, sig);
  act.sa_flags = flags;
  if (Sigaction(sig, &act, &old) < 0) return SIG_ERR;
  return old.sa_handler;
}

sighandler_t BsdSignal(int sig, sighandler_t handler) {
  return SetHandler(sig, handler, /*mask_self=*/true,
                    Interrupt(sig).load() ? 0 : SA_RESTART);
}

sighandler_t SysvSignal(int sig, sighandler_t handler) {
  return SetHandler(sig, handler, /*mask_self=*/false,
                    SA_RESETHAND | SA_NODEFER | SA_INTERRUPT);
}

// glibc's sigset(): the disposition and the signal mask, SIG_HOLD if the
// signal was blocked.
sighandler_t Sigset(int sig, sighandler_t disp) {
  sigset_t set;
  sigset_t was;
  sigemptyset(&set);
  sigaddset(&set, sig);
  struct sigaction old;
  if (disp == SIG_HOLD) {
    if (sigprocmask(SIG_BLOCK, &set, &was) < 0) return SIG_ERR;
    if (sigismember(&was, sig)) return SIG_HOLD;
    if (Sigaction(sig, nullptr, &old) < 0) return SIG_ERR;
    return old.sa_handler;
  }
  struct sigaction act;
  memset(&act, 0, sizeof(act));
  act.sa_handler = disp;
  sigemptyset(&act.sa_mask);
  if (Sigaction(sig, &act, &old) < 0) return SIG_ERR;
  if (sigprocmask(SIG_UNBLOCK, &set, &was) < 0) return SIG_ERR;
  return sigismember(&was, sig) ? SIG_HOLD : old.sa_handler;
}

sighandler_t Signal(sighandler_t (*const* real)(int, sighandler_t), int sig,
                    sighandler_t handler, const void* caller) {
  if (Chained(sig) && !Bypass(caller)) return BsdSignal(sig, handler);
  auto f = Real(real);
  return f != nullptr ? f(sig, handler) : SIG_ERR;
}

sighandler_t Sysv(sighandler_t (*const* real)(int, sighandler_t), int sig,
                  sighandler_t handler, const void* caller) {
  if (Chained(sig) && !Bypass(caller)) return SysvSignal(sig, handler);
  auto f = Real(real);
  return f != nullptr ? f(sig, handler) : SIG_ERR;
}

// sigprocmask or pthread_sigmask (`real`), SIGSEGV and SIGBUS left
// unblocked and the program's wish for them kept. Returns what `real`
// returns (-1 and errno, or an error number).
int Mask(int (*const* real)(int, const sigset_t*, sigset_t*), int how,
         const sigset_t* set, sigset_t* old, bool returns_error_number) {
  auto f = Real(real);
  if (f == nullptr) return returns_error_number ? ENOSYS : -1;
  bool segv = false;
  bool bus = false;
  backend::ProgramBlockedFaults(&segv, &bus);
  sigset_t copy;
  const sigset_t* apply = set;
  bool want_segv = segv;
  bool want_bus = bus;
  if (set != nullptr &&
      (how == SIG_BLOCK || how == SIG_UNBLOCK || how == SIG_SETMASK)) {
    copy = *set;  // a bad pointer crashes here, as in glibc's own check
    const bool s = sigismember(&copy, SIGSEGV) == 1;
    const bool b = sigismember(&copy, SIGBUS) == 1;
    if (how == SIG_BLOCK) {
      want_segv = segv || s;
      want_bus = bus || b;
    } else if (how == SIG_UNBLOCK) {
      want_segv = segv && !s;
      want_bus = bus && !b;
    } else {
      want_segv = s;
      want_bus = b;
    }
    if (how != SIG_UNBLOCK) {
      sigdelset(&copy, SIGSEGV);
      sigdelset(&copy, SIGBUS);
    }
    apply = &copy;
  }
  sigset_t prev;
  sigset_t* const was = old != nullptr ? old : &prev;
  const int r = f(how, apply, was);
  if (r != 0) return r;
  // The kernel blocks SIGSEGV or SIGBUS for a thread only while a handler
  // runs whose delivery blocked it (this never does): what the handler
  // asks for them ends with it, as the kernel's sigreturn ends the mask it
  // sets, so it is not kept as the thread's. (A handler that unblocks them
  // first is seen as outside; for SIGSEGV and SIGBUS handlers the fault
  // handler puts the view back when it returns.)
  const bool in_handler_segv = sigismember(was, SIGSEGV) == 1;
  const bool in_handler_bus = sigismember(was, SIGBUS) == 1;
  if (old != nullptr) {
    if (segv) sigaddset(old, SIGSEGV);
    if (bus) sigaddset(old, SIGBUS);
  }
  if (apply != set) {
    backend::SetProgramBlockedFaults(in_handler_segv ? segv : want_segv,
                                     in_handler_bus ? bus : want_bus);
  }
  return 0;
}

}  // namespace

void UnblockFaultsAtStart() {
  auto f = Real(&g_real.pthread_sigmask);
  sigset_t now;
  if (f == nullptr || f(SIG_BLOCK, nullptr, &now) != 0) return;
  const bool segv = sigismember(&now, SIGSEGV) == 1;
  const bool bus = sigismember(&now, SIGBUS) == 1;
  if (!segv && !bus) return;
  sigset_t faults;
  sigemptyset(&faults);
  sigaddset(&faults, SIGSEGV);
  sigaddset(&faults, SIGBUS);
  if (f(SIG_UNBLOCK, &faults, nullptr) == 0)
    backend::SetProgramBlockedFaults(segv, bus);
}

}  // namespace samepage::preload

using namespace samepage::preload;

SAMEPAGE_EXPORT int sigprocmask(int how, const sigset_t* set,
                                sigset_t* old) noexcept {
  if (Bypass(__builtin_return_address(0))) {
    auto f = Real(&g_real.sigprocmask);
    return f != nullptr ? f(how, set, old) : -1;
  }
  return Mask(&g_real.sigprocmask, how, set, old,
              /*returns_error_number=*/false);
}

SAMEPAGE_EXPORT int pthread_sigmask(int how, const sigset_t* set,
                                    sigset_t* old) noexcept {
  if (Bypass(__builtin_return_address(0))) {
    auto f = Real(&g_real.pthread_sigmask);
    return f != nullptr ? f(how, set, old) : ENOSYS;
  }
  return Mask(&g_real.pthread_sigmask, how, set, old,
              /*returns_error_number=*/true);
}

SAMEPAGE_EXPORT int sigaction(int sig, const struct sigaction* act,
                              struct sigaction* old) noexcept {
  if (Chained(sig) && !Bypass(__builtin_return_address(0))) {
    return Sigaction(sig, act, old);
  }
  auto f = Real(&g_real.sigaction);
  return f != nullptr ? f(sig, act, old) : -1;
}

SAMEPAGE_EXPORT sighandler_t signal(int sig, sighandler_t handler) noexcept {
  return Signal(&g_real.signal, sig, handler, __builtin_return_address(0));
}

SAMEPAGE_EXPORT sighandler_t bsd_signal(int sig,
                                        sighandler_t handler) noexcept {
  return Signal(&g_real.bsd_signal, sig, handler, __builtin_return_address(0));
}

SAMEPAGE_EXPORT sighandler_t ssignal(int sig, sighandler_t handler) noexcept {
  return Signal(&g_real.ssignal, sig, handler, __builtin_return_address(0));
}

SAMEPAGE_EXPORT sighandler_t sysv_signal(int sig,
                                         sighandler_t handler) noexcept {
  return Sysv(&g_real.sysv_signal, sig, handler, __builtin_return_address(0));
}

SAMEPAGE_EXPORT sighandler_t __sysv_signal(int sig,
                                           sighandler_t handler) noexcept {
  return Sysv(&g_real.sysv_signal_internal, sig, handler,
              __builtin_return_address(0));
}

SAMEPAGE_EXPORT sighandler_t sigset(int sig, sighandler_t disp) noexcept {
  if (Chained(sig) && !Bypass(__builtin_return_address(0))) {
    return Sigset(sig, disp);
  }
  auto f = Real(&g_real.sigset);
  return f != nullptr ? f(sig, disp) : SIG_ERR;
}

SAMEPAGE_EXPORT int sigignore(int sig) noexcept {
  if (Chained(sig) && !Bypass(__builtin_return_address(0))) {
    struct sigaction act;
    memset(&act, 0, sizeof(act));
    act.sa_handler = SIG_IGN;
    sigemptyset(&act.sa_mask);
    return Sigaction(sig, &act, nullptr);
  }
  auto f = Real(&g_real.sigignore);
  return f != nullptr ? f(sig) : -1;
}

SAMEPAGE_EXPORT int siginterrupt(int sig, int interrupt) noexcept {
  if (Chained(sig) && !Bypass(__builtin_return_address(0))) {
    struct sigaction act;
    if (Sigaction(sig, nullptr, &act) < 0) return -1;
    Interrupt(sig).store(interrupt != 0 ? 1 : 0);
    if (interrupt != 0) {
      act.sa_flags &= ~SA_RESTART;
    } else {
      act.sa_flags |= SA_RESTART;
    }
    return Sigaction(sig, &act, nullptr) < 0 ? -1 : 0;
  }
  auto f = Real(&g_real.siginterrupt);
  return f != nullptr ? f(sig, interrupt) : -1;
}
