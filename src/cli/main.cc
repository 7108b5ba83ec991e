// The samepage command line: `samepage demo` (the main job), `samepage run`
// (an unmodified program under samepage) and `samepage version`. Later
// subcommands (stat, estimate) hang off the same parser.

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <string>
#include <string_view>
#include <vector>

#include "cli/demo.h"
#include "cli/run.h"

int main(int argc, char** argv) {
  CLI::App app{"samepage: kernel samepage merging, in userspace"};
  app.require_subcommand(1);

  samepage::DemoOptions demo;
  CLI::App* demo_cmd = app.add_subcommand(
      "demo", "merge a built-in workload in memory and show what was saved");
  demo_cmd->add_option("--mib", demo.mib, "workload size in MiB")
      ->check(CLI::Range(4, 1 << 16));
  demo_cmd->add_flag("!--no-zero-pages", demo.use_zero_pages,
                     "merge zero pages like any other (use_zero_pages=0)");
  demo_cmd->add_flag("!--no-progress", demo.progress, "no live progress line");
  demo_cmd->add_option("--timeout", demo.timeout_seconds,
                       "seconds before giving up");

  samepage::RunOptions run;
  CLI::App* run_cmd = app.add_subcommand(
      "run", "run PROGRAM with samepage serving its kernel KSM calls");
  run_cmd->footer(
      "usage: samepage run [--merge-any] [--set KNOB=VALUE ...] "
      "[--protection=MODE] -- PROGRAM [ARGS...]");
  run_cmd->add_flag("--merge-any", run.merge_any,
                    "prctl(PR_SET_MEMORY_MERGE, 1) before the program starts");
  run_cmd->add_option("--set", run.sets,
                      "write KNOB=VALUE to /sys/kernel/mm/ksm/KNOB first "
                      "(repeatable; run=1 unless given)")
      ->expected(1)
      ->take_all();
  run_cmd->add_option("--protection", run.protection,
                      "how pages are write-protected while they are merged: "
                      "auto (userfaultfd if the kernel allows it), "
                      "userfaultfd or mprotect");
  // Everything from PROGRAM on belongs to the program, options included.
  run_cmd->prefix_command();

  app.add_subcommand("version", "print the version")->callback([] {
    fmt::print("samepage 0.1.0\n");
  });

  // `run ... -- PROGRAM ARGS`: what follows "--" is the program's, untouched
  // by the parser (CLI11 would take it as the parent's positionals).
  if (argc > 1 && std::string_view(argv[1]) == "run") {
    for (int i = 2; i < argc; ++i) {
      if (std::string_view(argv[i]) != "--") continue;
      run.command.assign(argv + i + 1, argv + argc);
      argc = i;
      break;
    }
  }
  CLI11_PARSE(app, argc, argv);
  if (demo_cmd->parsed()) return samepage::RunDemo(demo);
  if (run_cmd->parsed()) {
    std::vector<std::string> rest = run_cmd->remaining();
    if (!rest.empty() && !run.command.empty()) {
      fmt::print(stderr, "samepage run: unexpected {} before --\n", rest[0]);
      return 2;
    }
    if (run.command.empty()) run.command = std::move(rest);
    return samepage::RunProgram(run);
  }
  return 0;
}
