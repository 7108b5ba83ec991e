#include "cli/run.h"

#include <elf.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <limits.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "api/default_engine.h"
#include "api/sysfs_text.h"
#include "core/knobs.h"

namespace samepage {
namespace {

#ifndef SAMEPAGE_PRELOAD_NAME
#define SAMEPAGE_PRELOAD_NAME "libsamepage_preload.so"
#endif
#ifndef SAMEPAGE_BIN_TO_LIBDIR
#define SAMEPAGE_BIN_TO_LIBDIR "../lib"
#endif
#ifndef SAMEPAGE_FULL_LIBDIR
#define SAMEPAGE_FULL_LIBDIR "/usr/local/lib"
#endif

// The directory of the running executable, from /proc/self/exe.
std::string ExeDir() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  std::string path(buf, static_cast<std::size_t>(n));
  const std::size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

// The preload library: next to the executable (build tree), at the installed
// libdir relative to bin/, then at the absolute installed libdir.
std::string FindPreload() {
  const std::string dir = ExeDir();
  std::vector<std::string> candidates;
  if (!dir.empty()) {
    candidates.push_back(dir + "/" SAMEPAGE_PRELOAD_NAME);
    candidates.push_back(dir + "/" SAMEPAGE_BIN_TO_LIBDIR
                         "/" SAMEPAGE_PRELOAD_NAME);
  }
  candidates.push_back(SAMEPAGE_FULL_LIBDIR "/" SAMEPAGE_PRELOAD_NAME);
  for (const std::string& c : candidates) {
    char real[PATH_MAX];
    if (access(c.c_str(), R_OK) == 0 && realpath(c.c_str(), real) != nullptr) {
      return real;
    }
  }
  return "";
}

// The file execvp would run for `name`: a name with a slash as it is, else
// the first executable one along PATH ("" where there is none: execvp
// then reports it).
std::string ResolveProgram(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* path = getenv("PATH");
  std::string_view dirs =
      path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    const std::size_t colon = dirs.find(':');
    const std::string_view dir = dirs.substr(0, colon);
    const std::string file =
        (dir.empty() ? std::string(".") : std::string(dir)) + "/" + name;
    if (access(file.c_str(), X_OK) == 0) return file;
    if (colon == std::string_view::npos) return "";
    dirs.remove_prefix(colon + 1);
  }
}

// Why LD_PRELOAD cannot reach the ELF program at `path` ("" if it can, or
// if it is not an ELF file: a script's interpreter is what runs). Only a
// dynamically linked program (one with a PT_INTERP header) of our own ELF
// class loads the preload; any other would talk to kernel KSM itself.
std::string WhyUnreachable(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  Elf64_Ehdr eh;
  std::string why;
  const bool elf = pread(fd, &eh, sizeof(eh), 0) == sizeof(eh) &&
                   std::memcmp(eh.e_ident, ELFMAG, SELFMAG) == 0;
  if (!elf) {
    // not ours to judge
  } else if (eh.e_ident[EI_CLASS] != ELFCLASS64) {
    why = "is a 32-bit program, and samepage's preload library is 64-bit";
  } else if (eh.e_phentsize == sizeof(Elf64_Phdr) && eh.e_phnum > 0) {
    std::vector<Elf64_Phdr> ph(eh.e_phnum);
    const auto bytes = static_cast<ssize_t>(ph.size() * sizeof(Elf64_Phdr));
    if (pread(fd, ph.data(), static_cast<std::size_t>(bytes),
              static_cast<off_t>(eh.e_phoff)) == bytes) {
      bool interp = false;
      for (const Elf64_Phdr& h : ph) interp |= h.p_type == PT_INTERP;
      if (!interp) why = "is statically linked: no dynamic loader runs it";
    }
  }
  close(fd);
  return why;
}

// Checks every KNOB=VALUE as the kernel would take it, in order, on a
// default set of knobs (as a fresh engine has). On success *joined is the
// SAMEPAGE_SET value; on failure the problem is printed and false returned.
bool ValidateSettings(const std::vector<std::string>& sets, bool* sets_run,
                      std::string* joined) {
  Knobs knobs;
  *sets_run = false;
  for (const std::string& s : sets) {
    const std::size_t eq = s.find('=');
    if (eq == std::string::npos || eq == 0) {
      fmt::print(stderr, "samepage run: --set {}: expected KNOB=VALUE\n", s);
      return false;
    }
    const std::string name = s.substr(0, eq);
    const std::string value = s.substr(eq + 1);
    if (!IsKsmFile(name)) {
      fmt::print(stderr,
                 "samepage run: --set {}: no such file in /sys/kernel/mm/ksm\n",
                 s);
      return false;
    }
    if (!IsWritableKnob(name)) {
      fmt::print(stderr, "samepage run: --set {}: {} is a read-only counter\n",
                 s, name);
      return false;
    }
    if (value.find(',') != std::string::npos) {
      fmt::print(stderr, "samepage run: --set {}: ',' is not allowed\n", s);
      return false;
    }
    const Status st = WriteKnob(&knobs, name, value, KnobContext{});
    if (!st.ok()) {
      fmt::print(stderr, "samepage run: --set {}: {} ({})\n", s,
                 std::strerror(st.code()), st.message());
      return false;
    }
    if (name == "run") *sets_run = true;
    if (!joined->empty()) *joined += ',';
    *joined += s;
  }
  return true;
}

}  // namespace

int RunProgram(const RunOptions& options) {
  if (options.command.empty()) {
    fmt::print(stderr,
               "samepage run: no program given "
               "(samepage run [--merge-any] [--set K=V] "
               "[--protection=MODE] -- PROGRAM)\n");
    return 2;
  }
  bool sets_run = false;
  std::string settings;
  if (!ValidateSettings(options.sets, &sets_run, &settings)) return 2;
  EngineOptions::Protection protection;
  if (!options.protection.empty() &&
      !ParseProtection(options.protection, &protection)) {
    fmt::print(stderr,
               "samepage run: --protection {}: expected auto, userfaultfd "
               "or mprotect\n",
               options.protection);
    return 2;
  }
  // Programs that only mark memory mergeable are merged: run=1 unless the
  // user says otherwise. It goes last so that it starts a tuned scanner.
  if (!sets_run) settings += settings.empty() ? "run=1" : ",run=1";

  const std::string preload = FindPreload();
  if (preload.empty()) {
    const std::string dir = ExeDir();
    if (dir.empty()) {
      // Where this executable lies comes from /proc/self/exe.
      fmt::print(stderr,
                 "samepage run: cannot find {}: /proc/self/exe is not "
                 "readable (is /proc mounted?), and it is not in {}\n",
                 SAMEPAGE_PRELOAD_NAME, SAMEPAGE_FULL_LIBDIR);
    } else {
      fmt::print(stderr, "samepage run: cannot find {} next to {} or in {}\n",
                 SAMEPAGE_PRELOAD_NAME, dir, SAMEPAGE_FULL_LIBDIR);
    }
    return 1;
  }
  std::string ld = preload;
  if (const char* old = getenv("LD_PRELOAD"); old != nullptr && *old != '\0') {
    ld += ':';
    ld += old;
  }
  setenv("LD_PRELOAD", ld.c_str(), 1);
  setenv("SAMEPAGE_SET", settings.c_str(), 1);
  // Read by the preload before it creates its engine.
  if (!options.protection.empty()) {
    setenv("SAMEPAGE_PROTECTION", options.protection.c_str(), 1);
  } else {
    unsetenv("SAMEPAGE_PROTECTION");
  }
  if (options.merge_any) {
    setenv("SAMEPAGE_MERGE_ANY", "1", 1);
  } else {
    unsetenv("SAMEPAGE_MERGE_ANY");
  }

  // Refused rather than run without samepage: its madvise and its writes to
  // /sys/kernel/mm/ksm would reach kernel KSM, which `samepage run` is there
  // to stand in for (and which a root user's writes change for everyone).
  const std::string program = ResolveProgram(options.command[0]);
  if (const std::string why = program.empty() ? "" : WhyUnreachable(program);
      !why.empty()) {
    fmt::print(stderr,
               "samepage run: {} {}, so LD_PRELOAD cannot bring samepage "
               "into it (its KSM calls would go to the kernel's KSM); not "
               "run\n",
               options.command[0], why);
    return 126;
  }
  std::vector<char*> argv;
  for (const std::string& a : options.command) {
    argv.push_back(const_cast<char*>(a.c_str()));
  }
  argv.push_back(nullptr);
  execvp(argv[0], argv.data());
  const int err = errno;
  fmt::print(stderr, "samepage run: {}: {}\n", options.command[0],
             std::strerror(err));
  return err == ENOENT ? 127 : 126;
}

}  // namespace samepage
