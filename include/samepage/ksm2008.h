/*
 * The 2008 /dev/ksm ABI ("Kernel Shared Memory"), for samepage_devksm_*().
 *
 * Source: Izik Eidus, "[PATCH 3/4] add ksm kernel shared memory driver",
 * linux-kernel / linux-mm, 11 Nov 2008, Message-Id
 * <1226409701-14831-4-git-send-email-ieidus@redhat.com>, include/linux/ksm.h
 * (misc device "ksm", minor 233). It is the latest posting of the series that
 * has all eight ioctls: the January 2008 RFC (kvm-devel) passed KSM_SCAN's page
 * count as the ioctl argument itself, and the March 2009 repost dropped
 * KSM_CREATE_SCAN and KSM_SCAN and changed struct ksm_kthread_info to
 * {sleep, pages_to_scan, flags, pad, reserved_bits}, which changes the numbers
 * of KSM_START_STOP_KTHREAD (0x02) and KSM_GET_INFO_KTHREAD (0x03).
 *
 * Names, numbers and layouts below are those of the 11 Nov 2008 header; the
 * request numbers embed the struct sizes, so binaries built against that
 * header issue exactly these values. KSM_GET_INFO_KTHREAD is _IOW although it
 * copies data out: that is how the original defined it.
 *
 * Usable from C99 and C++.
 */

#ifndef SAMEPAGE_KSM2008_H_
#define SAMEPAGE_KSM2008_H_

#include <stdint.h>
#include <sys/ioctl.h>

#define KSM_API_VERSION 1

/* for KSM_REGISTER_MEMORY_REGION */
struct ksm_memory_region {
  uint32_t npages; /* number of pages to share */
  uint32_t pad;
  uint64_t addr; /* the beginning of the virtual address */
};

/* for KSM_SCAN */
struct ksm_user_scan {
  uint32_t pages_to_scan;
  uint32_t max_pages_to_merge;
};

/* for KSM_START_STOP_KTHREAD and KSM_GET_INFO_KTHREAD */
struct ksm_kthread_info {
  uint32_t sleep;         /* microseconds to sleep between batches */
  uint32_t pages_to_scan; /* pages to scan per batch */
  uint32_t max_pages_to_merge;
  uint32_t running; /* nonzero: the scanner thread runs */
};

#define KSMIO 0xAB

/* ioctls for /dev/ksm */
#define KSM_GET_API_VERSION _IO(KSMIO, 0x00)
#define KSM_CREATE_SHARED_MEMORY_AREA _IO(KSMIO, 0x01) /* return SMA fd */
#define KSM_CREATE_SCAN _IO(KSMIO, 0x02)               /* return SCAN fd */
#define KSM_START_STOP_KTHREAD _IOW(KSMIO, 0x03, struct ksm_kthread_info)
#define KSM_GET_INFO_KTHREAD _IOW(KSMIO, 0x04, struct ksm_kthread_info)

/* ioctls for SMA fds */
#define KSM_REGISTER_MEMORY_REGION _IOW(KSMIO, 0x20, struct ksm_memory_region)
#define KSM_REMOVE_MEMORY_REGION _IO(KSMIO, 0x21)

/* ioctls for SCAN fds */
#define KSM_SCAN _IOW(KSMIO, 0x40, struct ksm_user_scan)

#endif /* SAMEPAGE_KSM2008_H_ */
