// This process's resident memory, for tests that check what a structure
// leaves untouched.

#ifndef SAMEPAGE_TESTS_CORE_RESIDENT_MEMORY_H_
#define SAMEPAGE_TESTS_CORE_RESIDENT_MEMORY_H_

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace samepage {

// VmRSS in KiB; -1 if /proc/self/status cannot be read.
inline long ResidentKiB() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, "VmRSS:", 6) == 0)
      kib = std::strtol(line + 6, nullptr, 10);
  }
  std::fclose(f);
  return kib;
}

}  // namespace samepage

#endif  // SAMEPAGE_TESTS_CORE_RESIDENT_MEMORY_H_
