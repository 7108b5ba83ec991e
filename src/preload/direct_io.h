// Direct I/O reads into memory samepage may merge.
//
// An O_DIRECT read pins the pages of its buffer and the device writes into
// the pinned pages, not through the page tables: a page merged (replaced
// by a frame mapping) or dropped while the read is in flight keeps its old
// contents in the program's view, and the data read is lost. Kernel KSM
// sees the pin in the page's reference count; user space cannot. So the
// preload remembers which descriptors are O_DIRECT (open family, fcntl
// F_SETFL, dup family, close) and registers the buffer of every read on
// them for the duration of the call (backend::BeginPinnedIo), which merges
// check once the pages are write-protected.
//
// libaio's reads are registered from submission to completion
// (libaio.cc). Not covered (docs/limitations.md): descriptors inherited
// over exec or received over a socket, io_uring, POSIX AIO, long-term
// pins (io_uring fixed buffers, RDMA, VFIO), another process writing with
// process_vm_writev.
//
// Thread safety: everything here may be used from any thread; the
// descriptor marks are atomic.

#ifndef SAMEPAGE_PRELOAD_DIRECT_IO_H_
#define SAMEPAGE_PRELOAD_DIRECT_IO_H_

#include <stddef.h>
#include <sys/uio.h>

namespace samepage::preload {

// fd has these file status flags now: open/openat returned it (fd < 0:
// nothing), or fcntl(fd, F_SETFL, flags) succeeded.
void NoteFileFlags(int fd, int flags);
// newfd is now a copy of oldfd (dup family, F_DUPFD).
void NoteDirectDup(int oldfd, int newfd);
// fd is about to be closed.
void NoteDirectClosed(int fd);

// True if reads on fd may be direct I/O.
bool IsDirect(int fd);
// True if some descriptor below 65536 is marked O_DIRECT.
bool AnyDirect();

// io_uring.cc: the process has set up an io_uring; and what follows once
// it also reads with O_DIRECT (every page counts as pinned).
bool RingSeen();
void SuspendForPinningIo();

// Copies n bytes of the caller's memory without faulting on a bad pointer
// (the system call then answers EFAULT itself). False if it cannot.
// backend::CopyFromUser, which also works where a sandbox forbids
// process_vm_readv.
bool CopyFromUser(void* to, const void* from, size_t n);

// Calls fn(base, len) for each of the caller's n vectors whose length is
// not 0, the array copied with CopyFromUser a chunk at a time. False where
// part of the array cannot be read (fn has seen the vectors before it).
template <typename F>
bool ForEachVector(const struct iovec* iov, size_t n, const F& fn) {
  struct iovec chunk[64];
  for (size_t i = 0; i < n; i += 64) {
    const size_t k = n - i < 64 ? n - i : 64;
    if (!CopyFromUser(chunk, iov + i, k * sizeof(struct iovec))) return false;
    for (size_t j = 0; j < k; ++j) {
      if (chunk[j].iov_len != 0) fn(chunk[j].iov_base, chunk[j].iov_len);
    }
  }
  return true;
}

// Registers the buffers of a read for its duration, if fd is direct.
class DirectRead {
 public:
  DirectRead(int fd, const void* buf, size_t n);
  DirectRead(int fd, const struct iovec* iov, int iovcnt);
  ~DirectRead();
  DirectRead(const DirectRead&) = delete;
  DirectRead& operator=(const DirectRead&) = delete;

  // The registrations themselves, for reads that outlive a call (libaio):
  // a token for backend::EndPinnedIo (kNoPinnedIo where nothing is read).
  static int RegisterRange(const void* buf, size_t n);
  static int RegisterVectors(const struct iovec* iov, int iovcnt);

 private:
  int token_;
};

}  // namespace samepage::preload

#endif  // SAMEPAGE_PRELOAD_DIRECT_IO_H_
