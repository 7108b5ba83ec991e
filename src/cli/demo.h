// `samepage demo`: builds a workload in this process's memory, merges it with
// samepage, and shows before/after figures from the kernel's own accounting.

#ifndef SAMEPAGE_CLI_DEMO_H_
#define SAMEPAGE_CLI_DEMO_H_

#include <cstddef>

namespace samepage {

struct DemoOptions {
  std::size_t mib = 256;         // total workload size
  bool use_zero_pages = true;    // drop zero pages without a frame
  bool progress = true;          // live progress line on stderr
  double timeout_seconds = 120;  // give up (and fail) after this long
};

// Returns the process exit code: 0 when the data is intact and memory was
// saved, 1 otherwise.
int RunDemo(const DemoOptions& options);

}  // namespace samepage

#endif  // SAMEPAGE_CLI_DEMO_H_
