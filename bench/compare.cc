// samepage_compare: the same workloads merged by kernel KSM and by samepage,
// alternating, several times; prints time to converge, merger CPU, pages
// saved, copy-on-write latency and metadata per page, with samepage/kernel
// ratios (median and spread) from the same run.
//
// Kernel side: madvise(MADV_MERGEABLE) and /sys/kernel/mm/ksm, measuring
// ksmd's CPU time; every knob it changes is restored and run is left at 0
// with everything unmerged. Skipped with a message when that interface is
// missing or read-only. samepage side: the engine in this process, measuring
// its scanner thread ("samepage-ksmd").

#include <CLI/CLI.hpp>
#include <dirent.h>
#include <fmt/core.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <random>
#include <string>
#include <vector>

#include "samepage/engine.h"

namespace {

constexpr std::size_t kPage = 4096;
constexpr const char* kSysfs = "/sys/kernel/mm/ksm/";
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// --- workloads --------------------------------------------------------------

struct Workload {
  std::string name;
  std::size_t pages;
  bool zero_pages = false;    // use_zero_pages=1
  bool unique = false;        // nothing to merge: measure a full scan
  std::function<void(unsigned char*, std::size_t)> fill;
  std::size_t expect_saved;   // pages_sharing (+ ksm_zero_pages) at the end
};

void FillKey(unsigned char* page, std::uint64_t key) {
  std::memset(page, 0x5a, kPage);
  std::memcpy(page, &key, sizeof(key));
}

std::vector<Workload> Workloads(double scale) {
  auto n = [scale](std::size_t pages) {
    return std::max<std::size_t>(64, std::size_t(pages * scale) & ~std::size_t(1));
  };
  std::vector<Workload> w;
  {
    const std::size_t p = n(25600);
    w.push_back({"identical", p, false, false,
                 [](unsigned char* m, std::size_t p) { std::memset(m, '*', p * kPage); },
                 p - (p + 255) / 256});
  }
  {
    const std::size_t p = n(100000);
    w.push_back({"pairs in runs", p, false, false,
                 [](unsigned char* m, std::size_t p) {
                   for (std::size_t i = 0; i < p; ++i) FillKey(m + i * kPage, i % (p / 2));
                 },
                 p / 2});
  }
  {
    const std::size_t p = n(40000);
    w.push_back({"pairs scattered", p, false, false,
                 [](unsigned char* m, std::size_t p) {
                   std::vector<std::uint64_t> key(p);
                   for (std::size_t i = 0; i < p / 2; ++i) key[2 * i] = key[2 * i + 1] = i;
                   std::shuffle(key.begin(), key.end(), std::mt19937_64(1));
                   for (std::size_t i = 0; i < p; ++i) FillKey(m + i * kPage, key[i]);
                 },
                 p / 2});
  }
  {
    const std::size_t p = n(100000);
    w.push_back({"zero pages", p, true, false,
                 [](unsigned char* m, std::size_t p) { std::memset(m, 0, p * kPage); },
                 p});
  }
  {
    const std::size_t p = n(100000);
    w.push_back({"unique pages", p, false, true,
                 [](unsigned char* m, std::size_t p) {
                   for (std::size_t i = 0; i < p; ++i) FillKey(m + i * kPage, i + 1);
                 },
                 0});
  }
  return w;
}

// --- CPU time of a thread found by name ------------------------------------

// utime + stime of the task whose comm is `comm`, in seconds; searches
// /proc/<pid>/task/* (pid 0: every process). Reading only; nothing is signalled.
std::optional<double> TaskCpu(pid_t pid, const std::string& comm) {
  const long hz = sysconf(_SC_CLK_TCK);
  auto read_stat = [&](const std::string& dir) -> std::optional<double> {
    std::ifstream c(dir + "/comm");
    std::string name;
    if (!std::getline(c, name) || name != comm) return std::nullopt;
    std::ifstream s(dir + "/stat");
    std::string line;
    std::getline(s, line);
    const auto close = line.rfind(')');
    if (close == std::string::npos) return std::nullopt;
    std::istringstream rest(line.substr(close + 2));
    std::string field;
    unsigned long long utime = 0, stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {
      if (i == 14) utime = std::stoull(field);
      if (i == 15) stime = std::stoull(field);
    }
    return double(utime + stime) / double(hz);
  };
  auto scan_tasks = [&](const std::string& proc) -> std::optional<double> {
    DIR* d = opendir((proc + "/task").c_str());
    if (d == nullptr) return std::nullopt;
    std::optional<double> found;
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      if ((found = read_stat(proc + "/task/" + e->d_name))) break;
    }
    closedir(d);
    return found;
  };
  if (pid != 0) return scan_tasks("/proc/" + std::to_string(pid));
  DIR* d = opendir("/proc");
  std::optional<double> found;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    if ((found = read_stat(std::string("/proc/") + e->d_name))) break;
  }
  closedir(d);
  return found;
}

// --- the two mergers behind one interface ----------------------------------

class Merger {
 public:
  virtual ~Merger() = default;
  virtual std::string Name() const = 0;
  virtual bool Advise(void* p, std::size_t len) = 0;
  virtual void Set(const std::string& knob, const std::string& value) = 0;
  virtual long Get(const std::string& counter) = 0;
  virtual double CpuSeconds() = 0;
  virtual void Finish(void* p, std::size_t len) = 0;  // unmerge, stop
};

class KernelMerger : public Merger {
 public:
  static bool Available(std::string* why) {
    std::ofstream f(std::string(kSysfs) + "run");
    if (!f) {
      *why = "/sys/kernel/mm/ksm/run is missing or not writable";
      return false;
    }
    return true;
  }
  KernelMerger() {
    for (const char* k : {"run", "pages_to_scan", "sleep_millisecs",
                          "use_zero_pages", "max_page_sharing", "smart_scan"}) {
      saved_[k] = Read(k);
    }
  }
  ~KernelMerger() override {
    Write("run", "2");
    Write("run", "0");
    for (const auto& [k, v] : saved_) {
      if (k != "run") Write(k, v);
    }
    Write("run", saved_["run"] == "1" ? "1" : "0");
  }
  std::string Name() const override { return "kernel"; }
  bool Advise(void* p, std::size_t len) override {
    return madvise(p, len, MADV_MERGEABLE) == 0;
  }
  void Set(const std::string& k, const std::string& v) override { Write(k, v); }
  long Get(const std::string& c) override { return std::stol(Read(c)); }
  double CpuSeconds() override { return TaskCpu(0, "ksmd").value_or(0); }
  void Finish(void* p, std::size_t len) override {
    Write("run", "2");
    madvise(p, len, MADV_UNMERGEABLE);
    Write("run", "0");
  }

 private:
  static std::string Read(const std::string& k) {
    std::ifstream f(std::string(kSysfs) + k);
    std::string v;
    std::getline(f, v);
    return v;
  }
  static void Write(const std::string& k, const std::string& v) {
    std::ofstream f(std::string(kSysfs) + k);
    f << v;
  }
  std::map<std::string, std::string> saved_;
};

class SamepageMerger : public Merger {
 public:
  SamepageMerger() {
    const samepage::Status s = samepage::Engine::Create({}, &engine_);
    if (!s.ok()) {
      fmt::print(stderr, "samepage: Engine::Create: {}\n", s.ToString());
      std::exit(2);
    }
  }
  std::string Name() const override { return "samepage"; }
  bool Advise(void* p, std::size_t len) override {
    return engine_->Madvise(p, len, MADV_MERGEABLE).ok();
  }
  void Set(const std::string& k, const std::string& v) override {
    (void)engine_->WriteKnob(k, v);
  }
  long Get(const std::string& c) override {
    std::string t;
    (void)engine_->ReadKnob(c, &t);
    return std::stol(t);
  }
  double CpuSeconds() override {
    return TaskCpu(getpid(), "samepage-ksmd").value_or(0);
  }
  void Finish(void*, std::size_t) override { (void)engine_->WriteKnob("run", "2"); }
  samepage::Engine& engine() { return *engine_; }

 private:
  std::unique_ptr<samepage::Engine> engine_;
};

// --- one measurement ---------------------------------------------------------

struct Result {
  double converge_s = -1;  // wall time until expect_saved (or 2 full scans)
  double cpu_s = 0;        // merger CPU over that time
  long saved = 0;
  double cow_us = 0;       // first write to a merged page
  double meta_bytes = -1;  // metadata per tracked page (samepage only)
  bool timed_out = false;
};

Result Measure(Merger& m, const Workload& w, double timeout_s) {
  Result r;
  const std::size_t bytes = w.pages * kPage;
  auto* mem = static_cast<unsigned char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  w.fill(mem, w.pages);
  m.Set("run", "0");
  m.Set("pages_to_scan", std::to_string(std::min<std::size_t>(w.pages, 30000)));
  m.Set("sleep_millisecs", "0");
  m.Set("use_zero_pages", w.zero_pages ? "1" : "0");
  m.Set("max_page_sharing", "256");
  const std::size_t heap_before = mallinfo2().uordblks;
  if (!m.Advise(mem, bytes)) {
    fmt::print(stderr, "{}: madvise failed: {}\n", m.Name(), std::strerror(errno));
    munmap(mem, bytes);
    return r;
  }
  const long scans0 = m.Get("full_scans");
  const double cpu0 = m.CpuSeconds();
  const auto t0 = Clock::now();
  m.Set("run", "1");
  for (;;) {
    const long saved = m.Get("pages_sharing") + m.Get("ksm_zero_pages");
    const bool done = w.unique ? m.Get("full_scans") >= scans0 + 3
                               : saved >= long(w.expect_saved);
    if (done || Seconds(Clock::now() - t0) > timeout_s) {
      r.timed_out = !done;
      r.saved = saved;
      break;
    }
    usleep(200);
  }
  r.converge_s = Seconds(Clock::now() - t0);
  r.cpu_s = m.CpuSeconds() - cpu0;
  m.Set("run", "0");
  if (w.unique) {
    // Per full scan: the last of three (the first two record checksums).
    r.converge_s /= 3;
    r.cpu_s /= 3;
  }
  r.meta_bytes = m.Name() == "samepage"
                     ? double(mallinfo2().uordblks - heap_before) / double(w.pages)
                     : 64.0;  // sizeof(struct ksm_rmap_item)
  if (!w.unique && !w.zero_pages) {
    // Copy-on-write: first write to up to 2000 merged pages.
    const std::size_t n = std::min<std::size_t>(2000, w.pages);
    const auto c0 = Clock::now();
    for (std::size_t i = 0; i < n; ++i) mem[i * kPage + 100] ^= 1;
    r.cow_us = Seconds(Clock::now() - c0) * 1e6 / double(n);
  }
  m.Finish(mem, bytes);
  munmap(mem, bytes);
  return r;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"samepage vs kernel KSM, same workloads, same knobs"};
  double scale = 1.0;
  int reps = 3;
  double timeout = 60;
  std::string only;
  app.add_option("--scale", scale, "workload size factor (1 = the issue's sizes)");
  app.add_option("--reps", reps, "alternating repetitions")->check(CLI::Range(1, 50));
  app.add_option("--timeout", timeout, "seconds per run before giving up");
  app.add_option("--only", only, "run only the workload with this name");
  CLI11_PARSE(app, argc, argv);

  std::string why;
  const bool kernel = KernelMerger::Available(&why);
  if (!kernel) fmt::print("kernel KSM side skipped: {}\n", why);

  fmt::print("{:<16} {:>8} {:<9} {:>10} {:>10} {:>9} {:>8} {:>9} {:>6}\n",
             "workload", "pages", "merger", "converge", "cpu", "cpu/page", "saved",
             "cow", "meta");
  bool ok = true;
  for (const Workload& w : Workloads(scale)) {
    if (!only.empty() && w.name != only) continue;
    std::map<std::string, std::vector<Result>> results;
    for (int rep = 0; rep < reps; ++rep) {
      {
        SamepageMerger s;
        results["samepage"].push_back(Measure(s, w, timeout));
      }
      if (kernel) {
        KernelMerger k;
        results["kernel"].push_back(Measure(k, w, timeout));
      }
    }
    std::map<std::string, Result> med;
    for (auto& [name, rs] : results) {
      auto pick = [&](auto f) {
        std::vector<double> v;
        for (const Result& r : rs) v.push_back(f(r));
        return Median(v);
      };
      Result m;
      m.converge_s = pick([](const Result& r) { return r.converge_s; });
      m.cpu_s = pick([](const Result& r) { return r.cpu_s; });
      m.saved = long(pick([](const Result& r) { return double(r.saved); }));
      m.cow_us = pick([](const Result& r) { return r.cow_us; });
      m.meta_bytes = pick([](const Result& r) { return r.meta_bytes; });
      for (const Result& r : rs) m.timed_out |= r.timed_out;
      med[name] = m;
      fmt::print("{:<16} {:>8} {:<9} {:>9.3f}s {:>9.3f}s {:>7.2f}us {:>8} {:>7.2f}us {:>5.0f}B{}\n",
                 w.name, w.pages, name, m.converge_s, m.cpu_s,
                 m.cpu_s * 1e6 / double(w.pages), m.saved, m.cow_us, m.meta_bytes,
                 m.timed_out ? "  TIMED OUT" : "");
      if (name == "samepage" && (m.timed_out || m.saved < long(w.expect_saved))) {
        ok = false;
      }
    }
    if (med.count("kernel") && med.count("samepage")) {
      const Result& s = med["samepage"];
      const Result& k = med["kernel"];
      auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
      // Spread: the ratio's min and max over the repetitions.
      std::vector<double> cr;
      for (int i = 0; i < reps; ++i) {
        cr.push_back(ratio(results["samepage"][i].cpu_s, results["kernel"][i].cpu_s));
      }
      fmt::print("{:<16} {:>8} {:<9} {:>9.2f}x {:>9.2f}x (cpu ratio spread {:.2f}-{:.2f})"
                 " saved {:.2f}x cow {:.2f}x\n",
                 w.name, "", "ratio", ratio(s.converge_s, k.converge_s),
                 ratio(s.cpu_s, k.cpu_s), *std::min_element(cr.begin(), cr.end()),
                 *std::max_element(cr.begin(), cr.end()),
                 ratio(double(s.saved), double(k.saved)), ratio(s.cow_us, k.cow_us));
    }
  }
  fmt::print("{}\n", ok ? "samepage converged on every workload"
                        : "samepage did NOT converge on every workload");
  return ok ? 0 : 1;
}
