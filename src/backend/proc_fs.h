// Opening files under /proc after the process has left it behind.
//
// A daemon that chroots into a directory without /proc (sshd's privilege
// separation, vsftpd, named, QEMU's -run-with chroot=) or unmounts it in a
// new mount namespace still has its memory merged by kernel KSM. samepage
// reads the process's maps, smaps, pagemap and status files for that, so it
// keeps a descriptor of the procfs root taken while /proc was reachable
// (at library load under `samepage run`, at an engine's start otherwise)
// and opens "/proc/..." paths relative to it. "self" is resolved at each
// open, so the descriptor serves a forked child as well as its parent.
//
// Thread safety: any thread; the root descriptor is published once.

#ifndef SAMEPAGE_BACKEND_PROC_FS_H_
#define SAMEPAGE_BACKEND_PROC_FS_H_

#include <sys/types.h>

namespace samepage::backend {

// The procfs root descriptor (O_PATH, close-on-exec, one of samepage's own
// descriptors, see own_fds.h); opened on first use and kept. -1 if /proc
// is not reachable and never was.
int ProcRootFd();

// Where to resolve `path`: for a path starting with "/proc/" and a kept
// root, the root and the rest of the path (*rel); otherwise AT_FDCWD and
// the path itself. For the *at(2) calls.
int ProcAt(const char* path, const char** rel);

// open(path, flags) through ProcAt; errno as openat(2) sets it.
int OpenProc(const char* path, int flags);

// readlink(2) of a "/proc/..." path, the same way.
ssize_t ReadlinkProc(const char* path, char* buf, size_t size);

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_PROC_FS_H_
