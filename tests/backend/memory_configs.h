// The configurations the LinuxMemory suites run in: each protection, and
// userfaultfd once more with the two machine-dependent ways of the backend
// (LinuxMemoryOptions::cold_frame_read and frame_fill) forced the other way,
// so that both ways of each are tested whichever one this machine prefers.

#ifndef SAMEPAGE_TESTS_BACKEND_MEMORY_CONFIGS_H_
#define SAMEPAGE_TESTS_BACKEND_MEMORY_CONFIGS_H_

#include <ostream>
#include <string>

#include "backend/linux_memory.h"

namespace samepage::backend {

struct MemoryConfig {
  LinuxMemoryOptions::Protection protection;
  LinuxMemoryOptions::ColdFrameRead cold_frame_read;
  LinuxMemoryOptions::FrameFill frame_fill;
  const char* name;

  void ApplyTo(LinuxMemoryOptions* o) const {
    o->protection = protection;
    o->cold_frame_read = cold_frame_read;
    o->frame_fill = frame_fill;
  }
};

inline const MemoryConfig kMemoryConfigs[] = {
    {LinuxMemoryOptions::Protection::kMprotect,
     LinuxMemoryOptions::ColdFrameRead::kPread,
     LinuxMemoryOptions::FrameFill::kDirect, "Mprotect"},
    {LinuxMemoryOptions::Protection::kUserfaultfd,
     LinuxMemoryOptions::ColdFrameRead::kView,
     LinuxMemoryOptions::FrameFill::kBounce, "Userfaultfd"},
    {LinuxMemoryOptions::Protection::kUserfaultfd,
     LinuxMemoryOptions::ColdFrameRead::kPread,
     LinuxMemoryOptions::FrameFill::kDirect, "UserfaultfdPreadDirect"},
};

inline std::string MemoryConfigName(const MemoryConfig& c) { return c.name; }

// For GoogleTest's messages.
inline void PrintTo(const MemoryConfig& c, std::ostream* os) { *os << c.name; }

}  // namespace samepage::backend

#endif  // SAMEPAGE_TESTS_BACKEND_MEMORY_CONFIGS_H_
