// The samepage command line: `samepage demo` (the main job) and `samepage
// version`. Later subcommands (run, stat, estimate) hang off the same parser.

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include "cli/demo.h"

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

  app.add_subcommand("version", "print the version")->callback([] {
    fmt::print("samepage 0.1.0\n");
  });

  CLI11_PARSE(app, argc, argv);
  if (demo_cmd->parsed()) return samepage::RunDemo(demo);
  return 0;
}
