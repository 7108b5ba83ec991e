// The process-wide engine behind the C API (samepage.h): the options it is
// created with, for code that starts samepage on a program's behalf (the
// preload library, configured by `samepage run`).
//
// Thread safety: any thread; the options are taken once, when the engine
// is created.

#ifndef SAMEPAGE_API_DEFAULT_ENGINE_H_
#define SAMEPAGE_API_DEFAULT_ENGINE_H_

#include <string_view>

#include "samepage/engine.h"

namespace samepage {

// The options the C API's engine will be created with. False if it exists
// already: they then apply to nothing.
[[nodiscard]] bool SetDefaultEngineOptions(const EngineOptions& options);

// "auto", "userfaultfd" or "mprotect" (as `samepage run --protection`).
// False for anything else.
[[nodiscard]] bool ParseProtection(std::string_view text,
                                   EngineOptions::Protection* protection);

}  // namespace samepage

#endif  // SAMEPAGE_API_DEFAULT_ENGINE_H_
