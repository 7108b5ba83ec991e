// samepage's own static memory, kept out of merging.
//
// The data and bss of libsamepage and of the preload hold tables and locks
// that samepage writes all the time (a descriptor's slot cleared at each
// close, a mutex taken at each open), mostly zeros. Under merge-any those
// pages were dropped to the zero page at one scan and written again before
// the next, dozens of times a second in an idle process: a merge window, a
// discard and a copy-on-write fault each time, for nothing. Kernel KSM never
// merges ksmd's own memory either. Every LinuxMemory excludes the writable
// segments of its own shared object and of the objects registered here.
// The main program's are never excluded (a program that links samepage
// statically shares them with its own data, which kernel KSM would merge).
//
// Thread safety: any thread; registrations are published once each.

#ifndef SAMEPAGE_BACKEND_OWN_MEMORY_H_
#define SAMEPAGE_BACKEND_OWN_MEMORY_H_

#include <cstdint>
#include <utility>
#include <vector>

namespace samepage::backend {

// A PT_LOAD segment of a loaded object: [start, end), its PF_* flags.
struct LoadSegment {
  std::uintptr_t start = 0;
  std::uintptr_t end = 0;
  unsigned flags = 0;
};

// Up to `max` PT_LOAD segments of the shared object holding `addr` into
// out[]; returns how many there are (may exceed max), 0 if none holds it,
// -1 for the main program. No allocation: the preload's constructor uses
// it before the allocator is known.
int LoadSegmentsOf(const void* addr, LoadSegment* out, int max);
// The same for the main program. No allocation.
int MainProgramSegments(LoadSegment* out, int max);

// Registers the shared object that holds `addr` (the preload registers
// itself from its constructor). At most a few; extra ones are ignored.
void KeepObjectOut(const void* addr);

// [start, end) of the writable PT_LOAD segments (data and bss) of the
// shared object holding `addr`, and of each registered object; none for
// the main program.
std::vector<std::pair<std::uintptr_t, std::uintptr_t>> OwnWritableSegments(
    const void* addr);

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_OWN_MEMORY_H_
