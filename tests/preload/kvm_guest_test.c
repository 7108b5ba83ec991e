/* A minimal KVM monitor whose guest writes into mergeable guest RAM while
 * KSM scans it at full speed (docs/limitations.md, item 4). Kernel ABI
 * only: runs natively against kernel KSM and under `samepage run`.
 *
 *   kvm_guest_test merges    guest RAM merges and stays merged while the
 *                            guest runs (kernel KSM; samepage where kernel
 *                            faults wait for a merge window)
 *   kvm_guest_test kept-out  registering guest RAM with KVM unmerges it and
 *                            it is never merged again (samepage where kernel
 *                            faults cannot wait: mprotect protection, or
 *                            userfaultfd for user faults only)
 *
 * Either way the guest never sees its RAM as MMIO (KVM_EXIT_MMIO inside
 * RAM: a guest write KVM could not make), its counter advances by one per
 * exit, and no byte of RAM is lost. Guest RAM: 16 MiB of 'x'. The real-mode
 * guest increments a counter byte at 0x2000 and reads and writes back one
 * byte of each page 0x3000-0xf000, with an OUT after each step; the monitor
 * writes a byte into one of 1000 other pages now and then. Exit 77 without
 * a usable /dev/kvm or writable KSM knobs. */

#define _GNU_SOURCE
#include <linux/kvm.h>
#include <stdint.h>
#include <sys/ioctl.h>

#include "ksm_test_util.h"

#define MEM (16ul << 20)
#define PAGES (MEM / PAGE)
#define RUN_SECONDS 3.0
#define HOST_PAGES 1000
#define HOST_BASE 0x10000ul

int main(int argc, char** argv) {
  if (argc != 2 ||
      (strcmp(argv[1], "merges") != 0 && strcmp(argv[1], "kept-out") != 0)) {
    fprintf(stderr, "usage: %s merges|kept-out\n", argv[0]);
    return 2;
  }
  const int kept_out = strcmp(argv[1], "kept-out") == 0;
  const int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    printf("SKIP kvm_guest_test: /dev/kvm: %s\n", strerror(errno));
    return SKIP_CODE;
  }
  const int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) {
    printf("SKIP kvm_guest_test: KVM_CREATE_VM: %s\n", strerror(errno));
    return SKIP_CODE;
  }
  ksm_setup_or_skip("kvm_guest_test");
  scan_at_full_speed();

  uint8_t* mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(mem != MAP_FAILED);
  memset(mem, 'x', MEM);
  /* start: mov bx,0x3000; l: inc byte [0x2000]; mov al,[bx]; mov [bx],al;
   * out 0x10,al; add bx,0x1000; jnz l; jmp start */
  static const uint8_t code[] = {0xbb, 0x00, 0x30, 0xfe, 0x06, 0x00, 0x20,
                                 0x8a, 0x07, 0x88, 0x07, 0xe6, 0x10, 0x81,
                                 0xc3, 0x00, 0x10, 0x75, 0xf0, 0xeb, 0xeb};
  memset(mem, 0, 0x3000);
  memcpy(mem + 0x1000, code, sizeof(code));
  CHECK(madvise(mem, MEM, MADV_MERGEABLE) == 0);

  /* Merged before the guest exists. */
  const double until = now_seconds() + 60;
  while (merging_pages() < PAGES / 2 && now_seconds() < until) sleep_ms(20);
  const unsigned long before = merging_pages();
  printf("merging pages before KVM_SET_USER_MEMORY_REGION: %lu\n", before);
  CHECK(before >= PAGES / 2);

  struct kvm_userspace_memory_region slot = {0, 0, 0, MEM, (uint64_t)mem};
  CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot) == 0);
  if (kept_out) {
    const unsigned long after = merging_pages();
    printf("merging pages after it: %lu\n", after);
    CHECK(after == 0);
  }

  const int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  CHECK(vcpu >= 0);
  const int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  CHECK(size > 0);
  struct kvm_run* run =
      mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  CHECK(run != MAP_FAILED);
  struct kvm_sregs sregs;
  CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0);
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  sregs.ds.base = 0;
  sregs.ds.selector = 0;
  CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0);
  struct kvm_regs regs = {0};
  regs.rip = 0x1000;
  regs.rflags = 2;
  CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0);

  unsigned long exits = 0, ram_mmio = 0, host_writes = 0, min_merging = PAGES;
  unsigned prev = 0;
  const double end = now_seconds() + RUN_SECONDS;
  while (now_seconds() < end) {
    CHECK(ioctl(vcpu, KVM_RUN, 0) == 0);
    if (run->exit_reason == KVM_EXIT_MMIO && run->mmio.phys_addr < MEM) {
      /* Completed as QEMU would, through the monitor's mapping, so that the
       * run goes on and the count is the test's answer. */
      if (ram_mmio++ < 5) {
        fprintf(stderr, "guest RAM accessed as MMIO at %#llx (write %d)\n",
                (unsigned long long)run->mmio.phys_addr, run->mmio.is_write);
      }
      if (run->mmio.is_write) {
        memcpy(mem + run->mmio.phys_addr, run->mmio.data, run->mmio.len);
      } else {
        memcpy(run->mmio.data, mem + run->mmio.phys_addr, run->mmio.len);
      }
      continue;
    }
    if (run->exit_reason != KVM_EXIT_IO) {
      fprintf(stderr, "unexpected exit %u after %lu exits\n", run->exit_reason,
              exits);
      return 1;
    }
    ++exits;
    const unsigned now = mem[0x2000];
    if (exits > 1 && now != ((prev + 1) & 0xff)) {
      fprintf(stderr, "guest counter %u after %u: a guest write was lost\n",
              now, prev);
      return 1;
    }
    prev = now;
    if ((exits & 0x3ff) == 0) {
      mem[HOST_BASE + (host_writes++ % HOST_PAGES) * PAGE] = 'y';
      const unsigned long m = merging_pages();
      if (m < min_merging) min_merging = m;
    }
  }
  const unsigned long final_merging = merging_pages();
  printf(
      "guest steps %lu, RAM accessed as MMIO %lu, host writes %lu, "
      "merging pages min %lu final %lu\n",
      exits, ram_mmio, host_writes, min_merging, final_merging);
  CHECK(exits > 1000);
  CHECK(ram_mmio == 0);
  if (kept_out) {
    CHECK(min_merging == 0 && final_merging == 0);
  } else {
    /* All but the pages the guest and the monitor write stay merged. */
    CHECK(final_merging >= PAGES / 2);
  }

  /* Every byte as the guest and the monitor left it. */
  for (unsigned long p = 3; p < PAGES; ++p) {
    const uint8_t* page = mem + p * PAGE;
    const int host = p * PAGE >= HOST_BASE &&
                     p < HOST_BASE / PAGE + HOST_PAGES &&
                     p - HOST_BASE / PAGE < host_writes;
    if (page[0] != (host ? 'y' : 'x')) {
      fprintf(stderr, "page %#lx byte 0 is %#x\n", p * PAGE, page[0]);
      return 1;
    }
    for (int b = 1; b < PAGE; ++b) {
      if (page[b] != 'x') {
        fprintf(stderr, "page %#lx byte %d is %#x\n", p * PAGE, b, page[b]);
        return 1;
      }
    }
  }
  printf("OK\n");
  return 0;
}
