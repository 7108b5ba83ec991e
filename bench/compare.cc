// samepage_compare: the same workload program (bench/workload.c, kernel KSM
// ABI only) run natively against kernel KSM and under `samepage run`,
// alternating, several times; prints a markdown table of medians with the
// samepage/kernel ratios, their spread over the repetitions, and the targets
// of issue 4, met or not.
//
// It owns no KSM state itself: each run is a child process that sets the
// knobs, measures, unmerges and restores them. The driver only checks, after
// every native child, that the kernel's knobs are back as they were (and puts
// them back if a child died without doing so). Children are waited for by
// pid with a deadline; a child past it gets SIGTERM (the workload restores the
// knobs on it), then SIGKILL. Nothing is ever signalled by name.
//
// Exit: 0, or 1 if a run failed, timed out, saved nothing where pages should
// merge, or found a page with the wrong contents.

#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr const char* kSysfs = "/sys/kernel/mm/ksm/";

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// --- children ----------------------------------------------------------------

struct ChildResult {
  int status = -1;  // exit code; -1 if killed or not started
  bool timed_out = false;
  std::string out;  // its stdout
};

bool Exited(pid_t pid, int* wstatus) {
  return waitpid(pid, wstatus, WNOHANG) == pid;
}

// Waits up to `seconds` for `pid` to exit; true (and *wstatus) once it has.
bool WaitFor(pid_t pid, double seconds, int* wstatus) {
  const auto t0 = Clock::now();
  while (!Exited(pid, wstatus)) {
    if (Since(t0) > seconds) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Runs argv with stdout captured (stderr passes through) and a deadline.
ChildResult RunChild(const std::vector<std::string>& args, double deadline_s) {
  ChildResult r;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return r;
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return r;
  }
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    std::vector<char*> argv;
    for (const std::string& a : args)
      argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  const auto t0 = Clock::now();
  char buf[4096];
  for (;;) {
    const double left = deadline_s - Since(t0);
    if (left <= 0) {
      r.timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    const int n = poll(&p, 1, static_cast<int>(std::min(left, 1.0) * 1000) + 1);
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    const ssize_t got = read(fds[0], buf, sizeof(buf));
    if (got <= 0) break;  // EOF: the child closed stdout (exited)
    r.out.append(buf, static_cast<std::size_t>(got));
  }
  close(fds[0]);
  int ws = 0;
  const double left = std::max(1.0, deadline_s - Since(t0));
  if (r.timed_out || !WaitFor(pid, left, &ws)) {
    r.timed_out = true;
    fmt::print(stderr, "compare: pid {} past its deadline: SIGTERM\n", pid);
    kill(pid, SIGTERM);
    if (!WaitFor(pid, 15, &ws)) {
      fmt::print(stderr, "compare: pid {} still there: SIGKILL\n", pid);
      kill(pid, SIGKILL);
      waitpid(pid, &ws, 0);
    }
    return r;
  }
  r.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
  return r;
}

// --- kernel KSM's global state -----------------------------------------------

std::string ReadSysfs(const std::string& name) {
  std::ifstream f(kSysfs + name);
  std::string v;
  std::getline(f, v);
  return v;
}

bool WriteSysfs(const std::string& name, const std::string& value) {
  std::ofstream f(kSysfs + name);
  f << value;
  f.flush();
  return static_cast<bool>(f);
}

bool KernelWritable(std::string* why) {
  const int fd =
      open((std::string(kSysfs) + "run").c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    *why = fmt::format("{}run: {}", kSysfs, std::strerror(errno));
    return false;
  }
  close(fd);
  return true;
}

// The knobs a workload changes, as found before the first native run. After
// each native run they must read the same with nothing merged; if not (a
// child killed before it could restore), they are written back here.
class KernelState {
 public:
  KernelState() {
    for (const char* k : kKnobs) saved_[k] = ReadSysfs(k);
    idle_at_start_ = saved_["run"] == "0" && ReadSysfs("pages_shared") == "0";
  }

  // Another process (e.g. a native test of another tree) may be using kernel
  // KSM: if it was idle when we started, wait (bounded) until it is again.
  void WaitIdle() const {
    if (!idle_at_start_) return;
    const auto t0 = Clock::now();
    bool said = false;
    while (ReadSysfs("run") != "0" || ReadSysfs("pages_shared") != "0") {
      if (!said && Since(t0) > 1) {
        fmt::print(stderr,
                   "compare: kernel KSM in use (run={}, pages_shared={}); "
                   "waiting for it to be idle\n",
                   ReadSysfs("run"), ReadSysfs("pages_shared"));
        said = true;
      }
      if (Since(t0) > 120) {
        fmt::print(stderr, "compare: kernel KSM busy for 2 min; going on\n");
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }

  // True if the knobs read as saved and nothing is shared; otherwise
  // restores them (unmerge first: max_page_sharing is EBUSY while shared).
  bool CheckOrRestore() {
    bool same = ReadSysfs("pages_shared") == "0";
    for (const auto& [k, v] : saved_) same = same && Current(k) == v;
    if (same) return true;
    fmt::print(stderr, "compare: kernel KSM knobs not as found; restoring\n");
    WriteSysfs("run", "2");
    for (const auto& [k, v] : saved_) {
      if (k != "run" && Current(k) != v) WriteSysfs(k, v);
    }
    WriteSysfs("run", saved_["run"] == "1" ? "1" : "0");
    return false;
  }

 private:
  static constexpr const char* kKnobs[] = {"run",
                                           "pages_to_scan",
                                           "sleep_millisecs",
                                           "use_zero_pages",
                                           "max_page_sharing",
                                           "smart_scan",
                                           "advisor_mode"};

  static std::string Current(const std::string& k) { return ReadSysfs(k); }

  std::map<std::string, std::string> saved_;
  bool idle_at_start_ = false;
};

// --- results -----------------------------------------------------------------

struct Spec {
  std::string id, title;
  long pages = 0;  // at scale 1
};

struct Run {
  std::map<std::string, std::string> kv;  // the workload's result line
  bool failed = false;
  std::string why;

  double Num(const std::string& k) const {
    const auto it = kv.find(k);
    return it == kv.end() ? 0.0 : std::strtod(it->second.c_str(), nullptr);
  }
  std::string Str(const std::string& k) const {
    const auto it = kv.find(k);
    return it == kv.end() ? "" : it->second;
  }
};

Run Parse(const ChildResult& c) {
  Run r;
  std::istringstream lines(c.out);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("samepage-bench ", 0) != 0) continue;
    std::istringstream words(line);
    std::string word;
    while (words >> word) {
      const auto eq = word.find('=');
      if (eq != std::string::npos)
        r.kv[word.substr(0, eq)] = word.substr(eq + 1);
    }
  }
  if (c.timed_out) {
    r.failed = true;
    r.why = "killed at its deadline";
  } else if (r.kv.empty()) {
    r.failed = true;
    r.why = fmt::format("no result line (exit status {})", c.status);
  } else if (r.Str("contents") != "ok") {
    r.failed = true;
    r.why = "WRONG CONTENTS";
  } else if (c.status != 0) {
    r.failed = true;
    r.why = fmt::format("exit status {}", c.status);
  } else if (r.Num("expect") > 0 && r.Num("saved") <= 0) {
    r.failed = true;
    r.why = "nothing saved";
  } else if (r.Str("status") == "timeout") {
    r.failed = true;
    r.why = "did not converge before --timeout";
  }
  return r;
}

// The 1-minute load average: figures from a busy machine are not comparable.
std::string LoadAverage() {
  std::ifstream f("/proc/loadavg");
  std::string one;
  f >> one;
  return one.empty() ? "?" : one;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

double Ratio(double a, double b) { return b > 0 ? a / b : 0.0; }

std::string Thousands(double v) {
  std::string s = fmt::format("{:.0f}", v);
  for (int i = static_cast<int>(s.size()) - 3; i > (s[0] == '-' ? 1 : 0);
       i -= 3) {
    s.insert(static_cast<std::size_t>(i), ",");
  }
  return s;
}

// Seconds with three significant-ish digits.
std::string Secs(double s) {
  return s >= 10 ? fmt::format("{:.1f} s", s) : fmt::format("{:.3f} s", s);
}

// All runs of one workload, by merger.
struct Rows {
  std::vector<Run> kernel, samepage;
};

// Median of `key` over the runs that printed a result line.
double Med(const std::vector<Run>& runs, const std::string& key) {
  std::vector<double> v;
  for (const Run& r : runs) {
    if (!r.kv.empty()) v.push_back(r.Num(key));
  }
  return Median(v);
}

bool AnyResult(const std::vector<Run>& runs) {
  return std::any_of(runs.begin(), runs.end(),
                     [](const Run& r) { return !r.kv.empty(); });
}

// "median (min–max)" of samepage/kernel over repetitions paired in order.
std::string RatioCell(const Rows& rows, const std::string& key,
                      double* median) {
  const double k = Med(rows.kernel, key), s = Med(rows.samepage, key);
  *median = Ratio(s, k);
  std::vector<double> each;
  for (std::size_t i = 0; i < rows.kernel.size() && i < rows.samepage.size();
       ++i) {
    const double r = Ratio(rows.samepage[i].Num(key), rows.kernel[i].Num(key));
    if (r > 0) each.push_back(r);
  }
  if (*median <= 0) return "—";
  if (each.size() < 2) return fmt::format("**{:.2f}×**", *median);
  return fmt::format("**{:.2f}×** ({:.2f}–{:.2f})", *median,
                     *std::min_element(each.begin(), each.end()),
                     *std::max_element(each.begin(), each.end()));
}

std::string StatusNote(const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    if (r.Str("status") != "converged") return " (" + r.Str("status") + ")";
  }
  return "";
}

// Issue 4's CPU target per workload (median samepage/kernel).
std::optional<double> CpuTarget(const std::string& id) {
  if (id == "pairs-runs" || id == "zero") return 0.25;
  if (id == "unique") return 0.33;
  if (id == "identical") return 0.75;
  if (id == "pairs-scattered" || id == "pairs-scattered-100k") return 1.0;
  return std::nullopt;
}

std::string Check(double value, bool met, const std::string& target) {
  return fmt::format("{} {} {}", value > 0 ? fmt::format("{:.2f}", value) : "—",
                     target, met ? "✓" : "✗");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "samepage vs kernel KSM: one workload program, run natively and "
      "under `samepage run`, alternating"};
  double scale = 1.0, timeout = 60;
  int reps = 3;
  std::string only;
  std::string samepage = SAMEPAGE_CLI_PATH;
  std::string workload = SAMEPAGE_WORKLOAD_PATH;
  app.add_option("--scale", scale,
                 "workload size factor (1 = the issue's sizes)")
      ->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "alternating repetitions")
      ->check(CLI::Range(1, 50));
  app.add_option("--timeout", timeout, "seconds a run may take to converge")
      ->check(CLI::PositiveNumber);
  app.add_option("--only", only, "comma-separated workload ids (see --list)");
  long pages_to_scan = 0, sleep_ms = -1;
  app.add_option("--pages-to-scan", pages_to_scan,
                 "pages_to_scan for both mergers (default min(N, 30000))")
      ->check(CLI::PositiveNumber);
  app.add_option("--sleep-ms", sleep_ms,
                 "sleep_millisecs for both mergers (default 0)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--samepage", samepage, "the samepage executable");
  app.add_option("--workload", workload, "the samepage_workload executable");
  bool list = false;
  app.add_flag("--list", list, "list the workloads and exit");
  CLI11_PARSE(app, argc, argv);

  // The workloads, from the program itself.
  const ChildResult listed = RunChild({workload, "--list"}, 30);
  std::vector<Spec> specs;
  {
    std::istringstream lines(listed.out);
    std::string line;
    while (std::getline(lines, line)) {
      const auto t1 = line.find('\t'), t2 = line.find('\t', t1 + 1);
      if (t1 == std::string::npos || t2 == std::string::npos) continue;
      specs.push_back({line.substr(0, t1), line.substr(t2 + 1),
                       std::stol(line.substr(t1 + 1, t2 - t1 - 1))});
    }
  }
  if (specs.empty()) {
    fmt::print(stderr, "compare: no workloads from {} --list\n", workload);
    return 1;
  }
  if (list) {
    for (const Spec& s : specs)
      fmt::print("{:<22} {:>8}  {}\n", s.id, s.pages, s.title);
    return 0;
  }
  std::vector<std::string> wanted;
  {
    std::istringstream ids(only);
    std::string id;
    while (std::getline(ids, id, ',')) {
      if (id.empty()) continue;
      if (std::none_of(specs.begin(), specs.end(),
                       [&](const Spec& s) { return s.id == id; })) {
        fmt::print(stderr, "compare: no workload '{}' (see --list)\n", id);
        return 2;
      }
      wanted.push_back(id);
    }
  }

  std::string why;
  const bool kernel = KernelWritable(&why);
  if (!kernel) {
    fmt::print("Kernel KSM side skipped ({}): samepage only.\n\n", why);
  }
  std::optional<KernelState> state;
  if (kernel) state.emplace();
  const std::string load_start = LoadAverage();

  const double deadline = 2 * timeout + 60;  // past the workload's own bounds
  auto run_one = [&](const Spec& s, bool native) {
    std::vector<std::string> args;
    if (!native) args = {samepage, "run", "--"};
    args.insert(args.end(), {workload, "--workload", s.id, "--scale",
                             fmt::format("{}", scale), "--timeout",
                             fmt::format("{}", timeout), "--merger",
                             native ? "kernel" : "samepage"});
    if (pages_to_scan > 0) {
      args.insert(args.end(), {"--pages-to-scan", fmt::format("{}", pages_to_scan)});
    }
    if (sleep_ms >= 0) args.insert(args.end(), {"--sleep-ms", fmt::format("{}", sleep_ms)});
    if (native) state->WaitIdle();
    Run r = Parse(RunChild(args, deadline));
    if (native && !state->CheckOrRestore() && !r.failed) {
      r.failed = true;
      r.why = "left kernel KSM knobs changed";
    }
    fmt::print("  {:<9} {}\n", native ? "kernel" : "samepage",
               r.kv.empty()
                   ? "-"
                   : fmt::format("status={} converge_s={} cpu_s={} saved={}",
                                 r.Str("status"), r.Str("converge_s"),
                                 r.Str("cpu_s"), r.Str("saved")));
    if (r.failed)
      fmt::print("  FAILED: {} ({})\n", r.why, native ? "kernel" : "samepage");
    std::fflush(stdout);
    return r;
  };

  std::map<std::string, Rows> all;
  bool ok = true;
  for (const Spec& s : specs) {
    if (!wanted.empty() &&
        std::find(wanted.begin(), wanted.end(), s.id) == wanted.end()) {
      continue;
    }
    fmt::print("{} ({}):\n", s.id, s.title);
    Rows& rows = all[s.id];
    for (int rep = 0; rep < reps; ++rep) {
      // Alternate which merger goes first, so neither always runs on a
      // machine just warmed (or disturbed) by the other.
      const bool kernel_first = rep % 2 == 0;
      for (int turn = 0; turn < 2; ++turn) {
        const bool native = (turn == 0) == kernel_first;
        if (native && !kernel) continue;
        Run r = run_one(s, native);
        ok &= !r.failed;
        (native ? rows.kernel : rows.samepage).push_back(std::move(r));
      }
    }
  }

  // --- the table ---------------------------------------------------------
  std::string knobs;
  if (pages_to_scan > 0) knobs += fmt::format(" --pages-to-scan {}", pages_to_scan);
  if (sleep_ms >= 0) knobs += fmt::format(" --sleep-ms {}", sleep_ms);
  fmt::print(
      "\nsamepage_compare --scale {} --reps {}{}: medians of {}; ratios are "
      "samepage / kernel (min–max over the repetitions). Load average {} at "
      "the start, {} at the end.\n\n",
      scale, reps, knobs, reps, load_start, LoadAverage());
  fmt::print(
      "| workload | pages | kernel time / CPU | samepage time / CPU | time "
      "ratio | "
      "CPU ratio | saved k / s | COW µs k / s (mean) | meta B/page k / s | "
      "VMAs k / s "
      "| unmerge k / s |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n");
  struct Verdicts {
    double time = 0, cpu = 0, cow = 0;
  };
  std::map<std::string, Verdicts> ratios;
  for (const Spec& s : specs) {
    if (!all.count(s.id)) continue;
    const Rows& rows = all[s.id];
    auto side = [&](const std::vector<Run>& runs) -> std::string {
      if (!AnyResult(runs)) return "—";
      return fmt::format("{} / {}{}", Secs(Med(runs, "converge_s")),
                         Secs(Med(runs, "cpu_s")), StatusNote(runs));
    };
    auto pair = [&](const std::string& key, const std::string& fmt_spec) {
      auto one = [&](const std::vector<Run>& runs) -> std::string {
        if (!AnyResult(runs)) return "—";
        const double v = Med(runs, key);
        return fmt_spec == "n" ? Thousands(v) : fmt::format("{:.1f}", v);
      };
      return one(rows.kernel) + " / " + one(rows.samepage);
    };
    Verdicts& v = ratios[s.id];
    std::string saved = pair("saved", "n");
    const double skipped = Med(rows.samepage, "skipped");
    if (skipped > 0)
      saved += fmt::format(" ({} not merged)", Thousands(skipped));
    const bool cow = Med(rows.samepage, "cow_pages") > 0 ||
                     Med(rows.kernel, "cow_pages") > 0;
    const std::string pages =
        Thousands(!AnyResult(rows.samepage) ? Med(rows.kernel, "pages")
                                            : Med(rows.samepage, "pages"));
    const bool both = AnyResult(rows.kernel) && AnyResult(rows.samepage);
    // VMAs added while merged, and (samepage) still there after run=2.
    std::string vmas = pair("vmas", "n");
    const double left = Med(rows.samepage, "vmas_unmerged");
    if (left > 0) vmas += fmt::format(" ({} after unmerge)", Thousands(left));
    auto unmerge = [&](const std::vector<Run>& runs) -> std::string {
      return AnyResult(runs) ? Secs(Med(runs, "unmerge_s")) : "—";
    };
    // Copy-on-write: the median write of each run (the latency), and in
    // brackets the mean, which a host's interruptions move.
    const std::string cow_cell =
        cow ? pair("cow_p50_us", "f") + " (" + pair("cow_us", "f") + ")" : "—";
    fmt::print("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
               s.title, pages, side(rows.kernel), side(rows.samepage),
               both ? RatioCell(rows, "converge_s", &v.time) : "—",
               both ? RatioCell(rows, "cpu_s", &v.cpu) : "—", saved, cow_cell,
               pair("meta_per_page", "f"), vmas,
               unmerge(rows.kernel) + " / " + unmerge(rows.samepage));
    if (cow && both) {
      v.cow = Ratio(Med(rows.samepage, "cow_p50_us"),
                    Med(rows.kernel, "cow_p50_us"));
    }
  }

  // --- the targets (issue 4) ----------------------------------------------
  if (kernel) {
    fmt::print(
        "\nTargets (issue 4), from the medians above:\n\n"
        "| workload | CPU ratio | time ratio ≤ 0.5 | saved ≥ kernel | "
        "meta ≤ 32 B/page | COW ratio ≤ 1.2 |\n|---|---|---|---|---|---|\n");
    for (const Spec& s : specs) {
      if (!all.count(s.id)) continue;
      const Rows& rows = all[s.id];
      if (!AnyResult(rows.kernel) || !AnyResult(rows.samepage)) continue;
      const Verdicts& v = ratios[s.id];
      const std::optional<double> cpu_target = CpuTarget(s.id);
      const double ks = Med(rows.kernel, "saved"),
                   ss = Med(rows.samepage, "saved");
      const double meta = Med(rows.samepage, "meta_per_page");
      std::string time = Check(v.time, v.time > 0 && v.time <= 0.5, "≤ 0.5");
      if (s.id == "1gib") {
        const double t = Med(rows.samepage, "converge_s");
        time +=
            fmt::format("; samepage {:.2f} s < 1 s {}", t, t < 1 ? "✓" : "✗");
      }
      fmt::print("| {} | {} | {} | {} | {} | {} |\n", s.id,
                 cpu_target ? Check(v.cpu, v.cpu > 0 && v.cpu <= *cpu_target,
                                    fmt::format("≤ {:.2f}", *cpu_target))
                            : "—",
                 time,
                 ks > 0 || ss > 0
                     ? fmt::format("{} / {} {}", Thousands(ks), Thousands(ss),
                                   ss >= ks ? "✓" : "✗")
                     : "—",
                 fmt::format("{:.1f} {}", meta, meta <= 32 ? "✓" : "✗"),
                 v.cow > 0 ? Check(v.cow, v.cow <= 1.2, "≤ 1.2") : "—");
    }
  }
  fmt::print("\n{}\n", ok ? "Every run completed with its contents intact."
                          : "SOME RUNS FAILED (see FAILED above).");
  return ok ? 0 : 1;
}
