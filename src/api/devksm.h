// DevKsm: the 2008 /dev/ksm driver (include/samepage/ksm2008.h) over an
// Engine.
//
// The driver hands out three kinds of descriptors: the device (what
// open("/dev/ksm") returned), shared memory areas (KSM_CREATE_SHARED_MEMORY_
// AREA: each owns the regions registered through it) and scanners
// (KSM_CREATE_SCAN). They are real file descriptors of this process, memfds
// named "samepage-ksm*", so that their numbers never collide with the
// application's own descriptors and an LD_PRELOAD layer can route ioctl()
// and close() on them here. Each memfd has its own inode; a descriptor whose
// number now names another file (the application closed ours behind our
// back) is treated as closed.
//
// Mapping onto the madvise-era engine:
//  - KSM_REGISTER_MEMORY_REGION {npages, addr} = Madvise(MADV_MERGEABLE) of
//    that range; KSM_REMOVE_MEMORY_REGION and closing the area undo all of
//    the area's regions with MADV_UNMERGEABLE. As the May 2009 revision of
//    the driver did, npages 0 and ranges overlapping a region already
//    registered (by any area of this process) fail with EPERM; madvise's own
//    errors (EINVAL unaligned, ENOMEM unmapped) pass through.
//  - KSM_SCAN {pages_to_scan, max_pages_to_merge} scans synchronously in the
//    caller with Engine::ScanNow. The merge bound is approximated: the scan
//    goes in chunks no larger than the merges still allowed and stops once
//    pages_sharing has grown by max_pages_to_merge (each scanned page adds at
//    most one). As in the driver, 0 in either field scans nothing. All
//    scanners share the engine's one scan cursor.
//  - KSM_START_STOP_KTHREAD {sleep µs, pages_to_scan, max_pages_to_merge,
//    running} writes the knobs pages_to_scan, sleep_millisecs (µs rounded up
//    to whole ms, as usecs_to_jiffies rounds up) and run (1 if running is
//    nonzero, else 0). The background thread does not bound merges.
//  - KSM_GET_INFO_KTHREAD reports the live knobs, with the µs value last set
//    while sleep_millisecs still matches it, and the last max_pages_to_merge.
// Errors follow the driver: EINVAL for a request the descriptor does not
// know (the driver returned +EINVAL from the area and scanner descriptors, a
// bug; we return -1/EINVAL), EFAULT for an unreadable or unwritable argument.
//
// Thread safety: all methods may be called from any thread. mu_ serialises
// the descriptor table and registration; scans run outside it.

#ifndef SAMEPAGE_API_DEVKSM_H_
#define SAMEPAGE_API_DEVKSM_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "samepage/engine.h"
#include "samepage/status.h"

namespace samepage {

class DevKsm {
 public:
  // REQUIRES: engine outlives this object.
  explicit DevKsm(Engine* engine);
  // Closes every descriptor still open, unregistering their regions.
  ~DevKsm();
  DevKsm(const DevKsm&) = delete;
  DevKsm& operator=(const DevKsm&) = delete;

  // open("/dev/ksm"): a new device descriptor in *fd.
  Status Open(int* fd);
  // ioctl(fd, request, arg); on success *result is what the driver returned
  // (API version, a new descriptor, or 0).
  Status Ioctl(int fd, unsigned long request, void* arg, int* result);
  // close(fd) for a descriptor of ours: EBADF otherwise.
  Status Close(int fd);
  // True if fd is one of our live descriptors.
  bool Owns(int fd);

 private:
  enum class Kind { kDevice, kArea, kScan };
  struct Region {
    std::uintptr_t addr;
    std::size_t npages;
  };
  struct Descriptor {
    Kind kind;
    dev_t dev;  // identity of our memfd, to detect a reused number
    ino_t ino;
    std::vector<Region> regions;  // kArea only
  };

  // Creates a memfd-backed descriptor of `kind`. REQUIRES: mu_ held.
  Status NewDescriptor(Kind kind, int* fd);
  // The live descriptor `fd`, or nullptr (a stale entry is dropped).
  // REQUIRES: mu_ held.
  Descriptor* Find(int fd);
  // Unmarks every region of `d`. REQUIRES: mu_ held.
  void RemoveRegions(Descriptor* d);

  Status DeviceIoctl(unsigned long request, void* arg, int* result);
  Status AreaIoctl(int fd, unsigned long request, void* arg);
  Status Scan(void* arg);

  Engine* const engine_;
  std::mutex mu_;
  std::map<int, Descriptor> descriptors_;  // guarded by mu_
  // What KSM_START_STOP_KTHREAD last set that the knobs cannot hold.
  std::uint32_t sleep_usecs_ = 0;         // guarded by mu_
  std::uint32_t max_pages_to_merge_ = 0;  // guarded by mu_
};

}  // namespace samepage

#endif  // SAMEPAGE_API_DEVKSM_H_
