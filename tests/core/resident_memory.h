// This process's memory (resident, virtual), for tests that check what a
// structure leaves untouched.

#ifndef SAMEPAGE_TESTS_CORE_RESIDENT_MEMORY_H_
#define SAMEPAGE_TESTS_CORE_RESIDENT_MEMORY_H_

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace samepage {

// A "Vm...:" line of /proc/self/status (field with its colon, "VmRSS:"),
// in KiB; -1 if it cannot be read.
inline long StatusKiB(const char* field) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return -1;
  const std::size_t n = std::strlen(field);
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, field, n) == 0)
      kib = std::strtol(line + n, nullptr, 10);
  }
  std::fclose(f);
  return kib;
}

// VmRSS in KiB; -1 if /proc/self/status cannot be read.
inline long ResidentKiB() { return StatusKiB("VmRSS:"); }

}  // namespace samepage

#endif  // SAMEPAGE_TESTS_CORE_RESIDENT_MEMORY_H_
