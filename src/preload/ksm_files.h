// The KSM files a program opens, served by samepage: /sys/kernel/mm/ksm/*,
// /proc/self/ksm_stat and ksm_merging_pages (also under /proc/<own pid>/)
// and the 2008 /dev/ksm device.
//
// Each open file is a real descriptor (a memfd, or the /dev/ksm memfd that
// the C API hands out), so that its number never collides with the
// program's own descriptors and poll, fstat, dup and fdopen work. A table
// indexed by descriptor number says which of them are ours:
//  - read/pread at offset 0 refills the memfd with fresh text first, as
//    sysfs regenerates a file when it is read from the start;
//  - write/pwrite hand the bytes to samepage_sysfs_write and return its
//    result: the kernel reports a bad value from write() itself;
//  - stdio writes reach the memfd through libc's internal write, which no
//    interposer sees, so fflush and fclose of a FILE opened for writing hand
//    the bytes written since the last time to samepage_sysfs_write (one
//    write per 4096 bytes, as stdio's buffer would). exit() flushes streams
//    in glibc's _IO_cleanup, after every destructor, through internal calls
//    only: the FILEs are remembered, and the preload's destructor (and
//    fflush(NULL)) flushes those still open through the same path;
//  - rewind/fseek that leave a reading stream at offset 0 refill the memfd,
//    as the next read of sysfs from offset 0 regenerates the text.
// An entry whose descriptor now names another file (closed behind our back,
// dup2'd over) is dropped when next seen.
//
// Thread safety: all functions may be called from any thread; entries are
// atomics, and one descriptor is not used by two threads at once by a
// correct program.

#ifndef SAMEPAGE_PRELOAD_KSM_FILES_H_
#define SAMEPAGE_PRELOAD_KSM_FILES_H_

#include <stdio.h>
#include <sys/types.h>

namespace samepage::preload {

// What a path names, for the open family.
enum class Target { kNone, kSysfs, kSysfsMissing, kKsmStat, kMergingPages,
                    kDevKsm };

// Classifies `path` relative to dirfd (AT_FDCWD or a directory). Relative
// paths cost a getcwd/readlink only when they mention "ksm" or end in a
// sysfs file name. *name_index is the sysfs file for kSysfs.
Target Classify(int dirfd, const char* path, int* name_index);

// open() of a classified KSM path: a descriptor, or -1 with errno.
int OpenKsm(Target target, int name_index, int flags);

// True if fd is one of ours (and still the file we opened).
bool IsOurs(int fd);
bool IsDevKsm(int fd);

// The interposers' bodies for our descriptors. REQUIRES: IsOurs(fd).
ssize_t ReadKsm(int fd, void* buf, size_t n);
ssize_t PreadKsm(int fd, void* buf, size_t n, off_t off);
ssize_t WriteKsm(int fd, const void* buf, size_t n);
int CloseKsm(int fd);
int IoctlDevKsm(int fd, unsigned long request, void* arg);

// newfd now names what oldfd names (dup, dup2, dup3, fcntl F_DUPFD): it
// becomes ours if oldfd is, and stops being ours otherwise. Shells redirect
// `echo 1 > run` this way. /dev/ksm descriptors are not copied (the driver
// knows each by its number).
void NoteDup(int oldfd, int newfd);

// fopen of a KSM path: a FILE over our descriptor, or null with errno.
FILE* FopenKsm(Target target, int name_index, const char* mode);
// fdopen(fd, mode) made fp: remembered if fd is ours. A FILE writing to a
// write-only descriptor collects its bytes in the memfd, as fopen's does.
void NoteFdopen(int fd, FILE* fp, const char* mode);
// fflush/fclose of a FILE: hands its pending writes to samepage first.
// Return 0 or the errno of the failed write; `closing` forgets the entry.
int FlushStdioKsm(FILE* fp, bool closing);
// Every remembered FILE still open for writing: stdio's buffer pushed into
// the memfd (with flush_buffers; fflush(NULL) already did) and the bytes
// handed to samepage, as FlushStdioKsm. 0 or the errno of a failed write.
int FlushOpenStdioKsm(bool flush_buffers);
// After rewind/fseek: a reading stream back at offset 0 gets fresh text.
void RefillIfRewound(FILE* fp);

}  // namespace samepage::preload

#endif  // SAMEPAGE_PRELOAD_KSM_FILES_H_
