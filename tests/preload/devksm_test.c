/* The 2008 /dev/ksm driver, as a 2008 program used it: its own copy of the
 * driver's ABI (the KSMIO ioctls), no samepage headers. The kernel has had
 * no /dev/ksm since 2.6.32: natively this test skips. */

#define _GNU_SOURCE
#include <stdint.h>
#include <sys/ioctl.h>

#include "ksm_test_util.h"

struct ksm_memory_region {
  uint32_t npages;
  uint32_t pad;
  uint64_t addr;
};
struct ksm_user_scan {
  uint32_t pages_to_scan;
  uint32_t max_pages_to_merge;
};
struct ksm_kthread_info {
  uint32_t sleep;
  uint32_t pages_to_scan;
  uint32_t max_pages_to_merge;
  uint32_t running;
};
#define KSMIO 0xAB
#define KSM_GET_API_VERSION _IO(KSMIO, 0x00)
#define KSM_CREATE_SHARED_MEMORY_AREA _IO(KSMIO, 0x01)
#define KSM_CREATE_SCAN _IO(KSMIO, 0x02)
#define KSM_START_STOP_KTHREAD _IOW(KSMIO, 0x03, struct ksm_kthread_info)
#define KSM_GET_INFO_KTHREAD _IOW(KSMIO, 0x04, struct ksm_kthread_info)
#define KSM_REGISTER_MEMORY_REGION _IOW(KSMIO, 0x20, struct ksm_memory_region)
#define KSM_REMOVE_MEMORY_REGION _IO(KSMIO, 0x21)
#define KSM_SCAN _IOW(KSMIO, 0x40, struct ksm_user_scan)

enum { kPages = 32 };

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  int dev = open("/dev/ksm", O_RDWR | O_CLOEXEC);
  if (dev < 0) {
    printf("SKIP devksm_test: open /dev/ksm: %s (no 2008 driver here)\n",
           strerror(errno));
    return SKIP_CODE;
  }
  CHECK(ioctl(dev, KSM_GET_API_VERSION, 0) == 1);
  CHECK_ERR(ioctl(dev, _IO(KSMIO, 0x7f), 0), EINVAL);
  int sma = ioctl(dev, KSM_CREATE_SHARED_MEMORY_AREA, 0);
  CHECK(sma >= 0 && sma != dev);

  unsigned char* p = mmap(NULL, kPages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  for (size_t i = 0; i < kPages; ++i) fill_class(p, i, 3);
  struct ksm_memory_region bad = {kPages, 0, (uint64_t)(uintptr_t)(p + 1)};
  CHECK_ERR(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &bad), EINVAL);
  struct ksm_memory_region none = {0, 0, (uint64_t)(uintptr_t)p};
  CHECK_ERR(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &none), EPERM);
  struct ksm_memory_region r = {kPages, 0, (uint64_t)(uintptr_t)p};
  CHECK(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &r) == 0);
  CHECK_ERR(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &r), EPERM);

  int scan = ioctl(dev, KSM_CREATE_SCAN, 0);
  CHECK(scan >= 0);
  struct ksm_user_scan us = {100, 100};
  double end = now_seconds() + 20;
  while (merging_pages() < kPages && now_seconds() < end) {
    CHECK(ioctl(scan, KSM_SCAN, &us) == 0);
  }
  printf("merged %lu of %d pages by KSM_SCAN\n", merging_pages(), kPages);
  CHECK(merging_pages() == kPages);
  for (size_t i = 0; i < kPages; ++i) CHECK(holds_class(p, i, 3));
  p[5 * PAGE] = 9;
  CHECK(p[5 * PAGE] == 9 && holds_class(p, 4, 3) && holds_class(p, 6, 3));

  struct ksm_kthread_info info = {20000, 500, 300, 1};
  CHECK(ioctl(dev, KSM_START_STOP_KTHREAD, &info) == 0);
  struct ksm_kthread_info got;
  memset(&got, 0xff, sizeof(got));
  CHECK(ioctl(dev, KSM_GET_INFO_KTHREAD, &got) == 0);
  CHECK(got.sleep == 20000 && got.pages_to_scan == 500 && got.running == 1);
  CHECK(read_ulong(KSM_DIR "run") == 1);
  info.running = 0;
  CHECK(ioctl(dev, KSM_START_STOP_KTHREAD, &info) == 0);
  CHECK(read_ulong(KSM_DIR "run") == 0);

  CHECK(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0);
  CHECK(holds_class(p, 4, 3) && p[5 * PAGE] == 9);
  CHECK(close(scan) == 0);
  CHECK(close(sma) == 0);
  CHECK(close(dev) == 0);
  CHECK_ERR(ioctl(dev, KSM_GET_API_VERSION, 0), EBADF);
  CHECK(munmap(p, kPages * PAGE) == 0);
  printf("PASS devksm_test\n");
  return 0;
}
