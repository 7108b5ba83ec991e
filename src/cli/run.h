// `samepage run [--merge-any] [--set KNOB=VALUE ...] [--protection=MODE]
//  -- PROGRAM [ARGS...]`:
// runs an unmodified program with libsamepage_preload.so, so that its kernel
// KSM calls (madvise, prctl, /sys/kernel/mm/ksm, /proc/self/ksm_*,
// /dev/ksm) are served by samepage inside the program.

#ifndef SAMEPAGE_CLI_RUN_H_
#define SAMEPAGE_CLI_RUN_H_

#include <string>
#include <vector>

namespace samepage {

struct RunOptions {
  bool merge_any = false;            // PR_SET_MEMORY_MERGE before main
  std::vector<std::string> sets;     // KNOB=VALUE, applied in order
  std::string protection;            // auto|userfaultfd|mprotect; "" = auto
  std::vector<std::string> command;  // PROGRAM [ARGS...]
};

// Validates the settings and the protection (a bad one: message on stderr,
// returns 2), finds
// the preload library, sets the environment and execs the program. Returns
// only on failure: 2 bad usage, 127 program not found, 126 not executable,
// 1 preload library missing.
int RunProgram(const RunOptions& options);

}  // namespace samepage

#endif  // SAMEPAGE_CLI_RUN_H_
