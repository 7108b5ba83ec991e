// Descriptors samepage opens for itself and keeps: the frame store's memfd,
// pagemap, /proc/self/maps, the procfs root (proc_fs.h), the userfaultfd.
//
// A program may close descriptors it never opened (a daemon's loop over
// every number, close_range, closefrom) and then open files that get the
// numbers: samepage would then write frames into the program's file and
// map it as merged memory. So each such descriptor is moved to a high
// number when opened (where a shell's `exec 3>` and low dup2 targets do not
// reach) and registered here; the preload leaves registered descriptors
// open when the program closes them (close returns 0, as if it had) and
// refuses a dup2/dup3 onto one with EBUSY.
//
// Thread safety: lock-free; any thread, signal handlers included.

#ifndef SAMEPAGE_BACKEND_OWN_FDS_H_
#define SAMEPAGE_BACKEND_OWN_FDS_H_

namespace samepage::backend {

// Descriptors the registry holds at most (each engine keeps four or five;
// a forked child keeps its parent's too).
inline constexpr int kMaxOwnFds = 64;

// Moves `fd` (close-on-exec) to a number at or above a high base (512, or
// half of RLIMIT_NOFILE if that is lower; where it cannot, it stays) and
// registers it. Returns the descriptor to use; -1 for -1.
int AdoptOwnFd(int fd);

// Unregisters `fd`, then closes it.
void CloseOwnFd(int fd);

// True if `fd` is one of samepage's own descriptors.
bool IsOwnFd(int fd);

// Up to `max` of them into out[], ascending; returns how many.
int CopyOwnFds(int* out, int max);

// Not descriptors: the numbers by which Linux 6.14 and later let the
// pidfd calls (process_madvise among them) name the calling thread and
// its process without one (PIDFD_SELF_THREAD, PIDFD_SELF_THREAD_GROUP in
// <linux/pidfd.h>). Older kernels answer EBADF.
inline constexpr int kPidfdSelfThread = -10000;
inline constexpr int kPidfdSelfThreadGroup = -10001;

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_OWN_FDS_H_
