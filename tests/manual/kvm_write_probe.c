// Manual probe (not built by CMake): a minimal KVM monitor whose guest writes
// into guest RAM that samepage is merging (docs/limitations.md, item 4).
//   gcc -O2 -o /tmp/kvm_write_probe tests/manual/kvm_write_probe.c
//   ./build/samepage run --set pages_to_scan=10000 --set sleep_millisecs=0
//     -- /tmp/kvm_write_probe 5
// Guest RAM is 64 MiB of 'x', MADV_MERGEABLE. The real-mode guest increments
// a counter byte at 0x2000 and reads and writes back one byte of each page
// 0x3000-0xf000, with an OUT after each step; the monitor checks the counter
// advances by one per exit. An MMIO exit inside RAM is completed through the
// monitor's mapping, as QEMU does, and counted: each one is a guest write
// KVM could not make because the page was write-protected by a merge window
// where kernel faults cannot wait. Exit 77 without /dev/kvm.
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#define MEM (64ul << 20)
int main(int argc, char** argv) {
  int secs = argc > 1 ? atoi(argv[1]) : 5;
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    perror("/dev/kvm");
    return 77;
  }
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) {
    perror("KVM_CREATE_VM");
    return 1;
  }
  uint8_t* mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  memset(mem, 'x', MEM);
  if (madvise(mem, MEM, MADV_MERGEABLE)) perror("madvise");
  // start: mov bx,0x3000; l: inc byte [0x2000]; mov al,[bx]; mov [bx],al;
  // out 0x10,al; add bx,0x1000; jnz l; jmp start
  const uint8_t code[] = {0xbb, 0x00, 0x30, 0xfe, 0x06, 0x00, 0x20,
                          0x8a, 0x07, 0x88, 0x07, 0xe6, 0x10, 0x81,
                          0xc3, 0x00, 0x10, 0x75, 0xf0, 0xeb, 0xeb};
  memset(mem, 0, 0x3000);
  memcpy(mem + 0x1000, code, sizeof code);
  struct kvm_userspace_memory_region r = {0, 0, 0, MEM, (uint64_t)mem};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) {
    perror("SET_USER_MEMORY_REGION");
    return 1;
  }
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  int sz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run* run =
      vcpu < 0 || sz <= 0
          ? MAP_FAILED
          : mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) {
    perror("KVM_CREATE_VCPU / kvm_run");
    return 1;
  }
  struct kvm_sregs s;
  ioctl(vcpu, KVM_GET_SREGS, &s);
  s.cs.base = 0;
  s.cs.selector = 0;
  s.ds.base = 0;
  s.ds.selector = 0;
  ioctl(vcpu, KVM_SET_SREGS, &s);
  struct kvm_regs g = {0};
  g.rip = 0x1000;
  g.rflags = 2;
  ioctl(vcpu, KVM_SET_REGS, &g);
  time_t end = time(NULL) + secs;
  unsigned long exits = 0, mmio_exits = 0;
  unsigned prev = 0, host_writes = 0;
  while (time(NULL) < end) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) {
      perror("KVM_RUN");
      printf("exits %lu mmio exits %lu\n", exits, mmio_exits);
      return 1;
    }
    if (run->exit_reason == KVM_EXIT_MMIO && run->mmio.phys_addr < MEM) {
      // What QEMU does: an access to RAM through the MMIO path is done by
      // the monitor itself, through its own mapping.
      if (mmio_exits++ < 5)
        printf("mmio exit at %#llx write %d\n",
               (unsigned long long)run->mmio.phys_addr, run->mmio.is_write);
      if (run->mmio.is_write)
        memcpy(mem + run->mmio.phys_addr, run->mmio.data, run->mmio.len);
      else
        memcpy(run->mmio.data, mem + run->mmio.phys_addr, run->mmio.len);
      continue;
    }
    if (run->exit_reason != KVM_EXIT_IO) {
      printf("unexpected exit %d (exits %lu)\n", run->exit_reason, exits);
      return 1;
    }
    exits++;
    // The guest's counter byte must advance by one each exit.
    unsigned now = mem[0x2000];
    if (exits > 1 && now != ((prev + 1) & 0xff)) {
      printf("counter %u after %u\n", now, prev);
      return 1;
    }
    prev = now;
    // The host writes to pages too, now and then (a merged page gets COW).
    if ((exits & 0xfff) == 0) {
      mem[0x10000 + (host_writes++ % 1000) * 4096] = 'y';
    }
  }
  FILE* f = fopen("/proc/self/ksm_stat", "r");
  char line[256];
  while (f && fgets(line, sizeof line, f)) fputs(line, stdout);
  printf("OK exits %lu mmio exits %lu\n", exits, mmio_exits);
  return 0;
}
