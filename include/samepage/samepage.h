/*
 * samepage C API: the kernel's KSM interfaces, served in userspace.
 *
 * Each call mirrors one kernel entry point and behaves like it, down to the
 * errno: it returns -1 (or 0 where noted) and sets errno on failure.
 *   madvise(MADV_MERGEABLE/MADV_UNMERGEABLE)  -> samepage_madvise
 *   prctl(PR_SET/GET_MEMORY_MERGE)             -> samepage_prctl
 *   /sys/kernel/mm/ksm/<name>                  -> samepage_sysfs_read/write
 *   /proc/self/ksm_stat, ksm_merging_pages     -> samepage_ksm_stat, ...
 *   the 2008 /dev/ksm ioctls (ksm2008.h)       -> samepage_devksm_*
 * They all act on one process-wide engine, created on first use with default
 * options; if it cannot be created every call fails with the errno of that
 * failure. Merging is confined to the calling process.
 *
 * Thread safety: every function may be called from any thread.
 * Usable from C99 and C++.
 */

#ifndef SAMEPAGE_SAMEPAGE_H_
#define SAMEPAGE_SAMEPAGE_H_

#include <stddef.h>
#include <sys/types.h>

#include "samepage/ksm2008.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The kernel's values, for programs built against older headers. */
#define SAMEPAGE_MADV_MERGEABLE 12
#define SAMEPAGE_MADV_UNMERGEABLE 13
#define SAMEPAGE_PR_SET_MEMORY_MERGE 67
#define SAMEPAGE_PR_GET_MEMORY_MERGE 68

/* madvise(addr, len, advice) for advice MADV_MERGEABLE or MADV_UNMERGEABLE:
 * EINVAL any other advice, addr not page-aligned or addr + len overflowing;
 * ENOMEM part of the range not mapped (the mapped parts are still marked).
 * len 0 succeeds. Shared, file-backed, hugetlb and special mappings are
 * accepted and left alone, as the kernel does. Returns 0. */
int samepage_madvise(void *addr, size_t len, int advice);

/* prctl(option, arg2, arg3, arg4, arg5) for
 *   PR_SET_MEMORY_MERGE: arg2 nonzero merges every private anonymous mapping
 *     of the process, now and later; 0 stops that. arg3..arg5 must be 0.
 *     Returns 0.
 *   PR_GET_MEMORY_MERGE: arg2..arg5 must be 0; returns 1 or 0.
 * EINVAL for a nonzero unused argument or any other option. */
int samepage_prctl(int option, unsigned long arg2, unsigned long arg3,
                   unsigned long arg4, unsigned long arg5);

/* read() of /sys/kernel/mm/ksm/<name> from offset 0. name is the bare file
 * name ("pages_sharing"). Copies up to size bytes of the text (which ends in
 * '\n') and returns their number; if room is left a '\0' follows, not
 * counted. ENOENT unknown name, EFAULT name or buf NULL. */
ssize_t samepage_sysfs_read(const char *name, char *buf, size_t size);

/* write() of len bytes to /sys/kernel/mm/ksm/<name>, with the kernel's
 * parsing and errors (EINVAL bad value, ERANGE, EBUSY, EACCES for read-only
 * counters, ENOENT unknown name). The value ends at the first '\0'; at most
 * 4096 bytes are taken. Returns the number of bytes taken: len, or 4096. */
ssize_t samepage_sysfs_write(const char *name, const char *buf, size_t len);

/* read() of /proc/self/ksm_stat and /proc/self/ksm_merging_pages, as for
 * samepage_sysfs_read. EFAULT buf NULL with size > 0. */
ssize_t samepage_ksm_stat(char *buf, size_t size);
ssize_t samepage_ksm_merging_pages(char *buf, size_t size);

/* Scans up to `pages` pages now, in the calling thread, merging what it can
 * (whatever `run` is). Returns the number of pages scanned; 0 with errno set
 * if the engine cannot be created. */
size_t samepage_scan(size_t pages);

/* The 2008 /dev/ksm driver (ksm2008.h). samepage_devksm_open() stands for
 * open("/dev/ksm"); the descriptors it and the KSM_CREATE_* ioctls return are
 * real, unique file descriptors of this process (memfds named "samepage-ksm")
 * that only these functions understand; close them with
 * samepage_devksm_close(). ioctl returns what the driver returned: the API
 * version, a new descriptor, or 0; EBADF not a samepage descriptor, EINVAL
 * unknown request for that descriptor, EFAULT bad argument pointer, and for
 * KSM_REGISTER_MEMORY_REGION: EPERM npages 0 or overlapping a registered
 * region, EINVAL addr not page-aligned, ENOMEM part of the range unmapped. */
int samepage_devksm_open(void);
int samepage_devksm_ioctl(int fd, unsigned long request, void *arg);
int samepage_devksm_close(int fd);
/* 1 if fd is a live samepage /dev/ksm descriptor, else 0. */
int samepage_devksm_owns(int fd);

#ifdef __cplusplus
}
#endif

#endif /* SAMEPAGE_SAMEPAGE_H_ */
