// sysfs and procfs text for KSM knobs and counters; see sysfs_text.h.
//
// Measured on Linux 6.18 as root: write(2) of the exact bytes, then a read.
// ok = stored, whole count returned. Columns:
//   U sleep_millisecs, pages_to_scan, stable_node_chains_prune_millisecs
//   R run                 M max_page_sharing      N merge_across_nodes
//   B use_zero_pages, smart_scan
//   L advisor_max_cpu, advisor_{min,max}_pages_to_scan,
//     advisor_target_scan_time (which also rejects "0": EINVAL)
//
//   input           U       R       M       N       B       L
//   ""              ok      ok      ok      ok      ok      ok   (no change)
//   "abc", " 1"     EINVAL  EINVAL  EINVAL  EINVAL  EINVAL  EINVAL
//   "-1", "-0"      EINVAL  EINVAL  EINVAL  EINVAL  EINVAL  EINVAL
//   "3"             ok      EINVAL  ok      EINVAL  EINVAL  ok
//   "1 "            EINVAL  EINVAL  EINVAL  EINVAL  ok=1    EINVAL
//   "0x10"          EINVAL  EINVAL  EINVAL  EINVAL  ok=0    EINVAL
//   "1\n"           ok      ok      EINVAL  ok      ok      ok
//   "+1"            ok      ok      EINVAL  ok      EINVAL  ok
//   "007"           ok=7    EINVAL  ok=7    EINVAL  ok=0    ok=7
//   "1\n\n", "\n"   EINVAL  EINVAL  EINVAL  EINVAL  ok/EINV EINVAL
//   "1\0x"          ok=1    ok=1    EINVAL  ok=1    ok=1    ok=1
//   "4294967296"    EINVAL  EINVAL  ERANGE  EINVAL  EINVAL  ok (a)
//   "99999999999"   EINVAL  EINVAL  ERANGE  EINVAL  EINVAL  ok (a)
//   23 nines       EINVAL  EINVAL  ERANGE  ERANGE  EINVAL  EINVAL
//   (a) advisor_max_cpu keeps the low 32 bits: 99999999999 reads 1215752191.
// B also takes "t" "on" "oN" "yes" "10" as true, "f" "of" "off" "none" false.
// Every read-only counter fails open(O_WRONLY) with EACCES, even for root. A
// 4097-byte write returns 4096 and parses the first 4096 bytes. advisor_mode
// takes "none" / "scan-time" with at most one '\n'. With advisor_mode
// scan-time any non-empty write to pages_to_scan is EINVAL. max_page_sharing
// and merge_across_nodes fail EBUSY for a change while pages_shared != 0 and
// succeed when the value written equals the current one.

#include "api/sysfs_text.h"

#include <array>
#include <cerrno>
#include <string>

namespace samepage {
namespace {

constexpr std::array<std::string_view, 24> kNames = {
    "sleep_millisecs",
    "pages_to_scan",
    "run",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "ksm_zero_pages",
    "full_scans",
    "merge_across_nodes",
    "max_page_sharing",
    "stable_node_chains",
    "stable_node_dups",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "general_profit",
    "smart_scan",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
};

constexpr std::array<std::string_view, 13> kWritable = {
    "sleep_millisecs",
    "pages_to_scan",
    "run",
    "merge_across_nodes",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "smart_scan",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
};

// Mirrors DEFAULT_PAGES_TO_SCAN in mm/ksm.c: what leaving scan-time restores.
constexpr std::uint32_t kDefaultPagesToScan = 100;

// The store functions see a NUL-terminated copy of the write.
std::string_view CutAtNul(std::string_view text) {
  return text.substr(0, text.find('\0'));
}

// _kstrtoull(): digits, one optional '\n', nothing else. No '+' handling.
int ParseULL(std::string_view s, std::uint64_t* value) {
  std::uint64_t result = 0;
  bool overflow = false;
  std::size_t i = 0;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i) {
    const unsigned digit = static_cast<unsigned>(s[i] - '0');
    if (result > (UINT64_MAX - digit) / 10) overflow = true;
    result = result * 10 + digit;
  }
  if (overflow) return ERANGE;  // checked before trailing garbage, as Linux
  if (i == 0) return EINVAL;
  if (i < s.size() && s[i] == '\n') ++i;
  if (i != s.size()) return EINVAL;
  *value = result;
  return 0;
}

Status Invalid(std::string_view name, std::string_view text, int code) {
  return Status::Error(code, "write /sys/kernel/mm/ksm/" + std::string(name) +
                                 ": rejected value \"" + std::string(text) +
                                 "\"");
}

std::string Line(std::uint64_t v) { return std::to_string(v) + "\n"; }
std::string SignedLine(std::int64_t v) { return std::to_string(v) + "\n"; }

}  // namespace

std::span<const std::string_view> KsmFileNames() { return kNames; }

bool IsKsmFile(std::string_view name) {
  for (std::string_view n : kNames) {
    if (n == name) return true;
  }
  return false;
}

bool IsWritableKnob(std::string_view name) {
  for (std::string_view n : kWritable) {
    if (n == name) return true;
  }
  return false;
}

int KstrtoULL(std::string_view text, std::uint64_t* value) {
  std::string_view s = CutAtNul(text);
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  return ParseULL(s, value);
}

int KstrtoUInt(std::string_view text, std::uint32_t* value) {
  std::uint64_t v = 0;
  if (int err = KstrtoULL(text, &v)) return err;
  if (v > UINT32_MAX) return ERANGE;
  *value = static_cast<std::uint32_t>(v);
  return 0;
}

int KstrtoInt(std::string_view text, std::int32_t* value) {
  std::string_view s = CutAtNul(text);
  std::int64_t v = 0;
  if (!s.empty() && s[0] == '-') {
    std::uint64_t magnitude = 0;
    if (int err = ParseULL(s.substr(1), &magnitude)) return err;
    if (magnitude > static_cast<std::uint64_t>(INT64_MAX) + 1) return ERANGE;
    v = static_cast<std::int64_t>(0 - magnitude);
  } else {
    std::uint64_t u = 0;
    if (int err = KstrtoULL(s, &u)) return err;
    if (u > static_cast<std::uint64_t>(INT64_MAX)) return ERANGE;
    v = static_cast<std::int64_t>(u);
  }
  if (v < INT32_MIN || v > INT32_MAX) return ERANGE;
  *value = static_cast<std::int32_t>(v);
  return 0;
}

int KstrtoBool(std::string_view text, bool* value) {
  std::string_view s = CutAtNul(text);
  const char c0 = s.empty() ? '\0' : s[0];
  const char c1 = s.size() < 2 ? '\0' : s[1];
  switch (c0) {
    case 'y':
    case 'Y':
    case 't':
    case 'T':
    case '1':
      *value = true;
      return 0;
    case 'n':
    case 'N':
    case 'f':
    case 'F':
    case '0':
      *value = false;
      return 0;
    case 'o':
    case 'O':
      if (c1 == 'n' || c1 == 'N') {
        *value = true;
        return 0;
      }
      if (c1 == 'f' || c1 == 'F') {
        *value = false;
        return 0;
      }
      return EINVAL;
    default:
      return EINVAL;
  }
}

bool SysfsStreq(std::string_view a, std::string_view b) {
  a = CutAtNul(a);
  b = CutAtNul(b);
  if (a == b) return true;
  if (a.size() == b.size() + 1 && a.back() == '\n') {
    return a.substr(0, b.size()) == b;
  }
  if (b.size() == a.size() + 1 && b.back() == '\n') {
    return b.substr(0, a.size()) == a;
  }
  return false;
}

Status WriteKnob(Knobs* knobs, std::string_view name, std::string_view text,
                 const KnobContext& ctx) {
  if (!IsKsmFile(name)) {
    return Status::Error(ENOENT, "open /sys/kernel/mm/ksm/" +
                                     std::string(name) + ": no such file");
  }
  if (!IsWritableKnob(name)) {
    return Status::Error(EACCES, "open /sys/kernel/mm/ksm/" +
                                     std::string(name) +
                                     " for writing: read-only counter");
  }
  // kernfs: at most PAGE_SIZE bytes per write; a zero-length write never
  // reaches the store function.
  if (text.size() > kSysfsWriteMax) text = text.substr(0, kSysfsWriteMax);
  if (text.empty()) return Status::Ok();
  const std::string_view value = CutAtNul(text);

  Knobs k = *knobs;
  int err = 0;
  if (name == "sleep_millisecs" || name == "pages_to_scan" ||
      name == "stable_node_chains_prune_millisecs" || name == "run") {
    if (name == "pages_to_scan" && k.advisor_mode != AdvisorMode::kNone) {
      return Invalid(name, value, EINVAL);  // the advisor owns pages_to_scan
    }
    std::uint32_t v = 0;
    if (KstrtoUInt(value, &v) != 0) return Invalid(name, value, EINVAL);
    if (name == "sleep_millisecs") {
      k.sleep_millisecs = v;
    } else if (name == "pages_to_scan") {
      k.pages_to_scan = v;
    } else if (name == "stable_node_chains_prune_millisecs") {
      k.stable_node_chains_prune_millisecs = v;
    } else {
      if (v > 2) return Invalid(name, value, EINVAL);
      k.run = v;
    }
  } else if (name == "max_page_sharing") {
    std::int32_t v = 0;
    if ((err = KstrtoInt(value, &v)) != 0) return Invalid(name, value, err);
    if (v < 2) return Invalid(name, value, EINVAL);
    const auto knob = static_cast<std::uint32_t>(v);
    if (knob != k.max_page_sharing) {
      if (ctx.pages_shared != 0) {
        return Status::Error(EBUSY,
                             "write /sys/kernel/mm/ksm/max_page_sharing: "
                             "pages are shared; unmerge (run 2) first");
      }
      k.max_page_sharing = knob;
    }
  } else if (name == "merge_across_nodes") {
    std::uint64_t v = 0;
    if ((err = KstrtoULL(value, &v)) != 0) return Invalid(name, value, err);
    if (v > 1) return Invalid(name, value, EINVAL);
    if (v != k.merge_across_nodes) {
      if (ctx.pages_shared != 0) {
        return Status::Error(EBUSY,
                             "write /sys/kernel/mm/ksm/merge_across_nodes: "
                             "pages are shared; unmerge (run 2) first");
      }
      k.merge_across_nodes = static_cast<std::uint32_t>(v);
    }
  } else if (name == "use_zero_pages" || name == "smart_scan") {
    bool v = false;
    if (KstrtoBool(value, &v) != 0) return Invalid(name, value, EINVAL);
    (name == "use_zero_pages" ? k.use_zero_pages : k.smart_scan) = v;
  } else if (name == "advisor_mode") {
    AdvisorMode mode;
    if (SysfsStreq("scan-time", value)) {
      mode = AdvisorMode::kScanTime;
    } else if (SysfsStreq("none", value)) {
      mode = AdvisorMode::kNone;
    } else {
      return Invalid(name, value, EINVAL);
    }
    if (mode != k.advisor_mode) {  // set_advisor_defaults()
      k.advisor_mode = mode;
      k.pages_to_scan =
          mode == AdvisorMode::kNone
              ? kDefaultPagesToScan
              : static_cast<std::uint32_t>(k.advisor_min_pages_to_scan);
    }
  } else {  // the advisor's unsigned long knobs
    std::uint64_t v = 0;
    if (KstrtoULL(value, &v) != 0) return Invalid(name, value, EINVAL);
    if (name == "advisor_max_cpu") {
      // Parsed as unsigned long, stored in an unsigned int.
      k.advisor_max_cpu = static_cast<std::uint32_t>(v);
    } else if (name == "advisor_min_pages_to_scan") {
      k.advisor_min_pages_to_scan = v;
    } else if (name == "advisor_max_pages_to_scan") {
      k.advisor_max_pages_to_scan = v;
    } else {  // advisor_target_scan_time
      if (v < 1) return Invalid(name, value, EINVAL);
      k.advisor_target_scan_time = v;
    }
  }
  *knobs = k;
  return Status::Ok();
}

std::string FormatKnob(const Knobs& k, const Counters& c,
                       std::string_view name) {
  if (name == "sleep_millisecs") return Line(k.sleep_millisecs);
  if (name == "pages_to_scan") return Line(k.pages_to_scan);
  if (name == "run") return Line(k.run);
  if (name == "pages_scanned") return Line(c.pages_scanned);
  if (name == "pages_shared") return Line(c.pages_shared);
  if (name == "pages_sharing") return Line(c.pages_sharing);
  if (name == "pages_unshared") return Line(c.pages_unshared);
  if (name == "pages_volatile") {
    // "%ld", and the kernel conceals a transiently negative value as 0.
    const auto v = static_cast<std::int64_t>(c.pages_volatile);
    return SignedLine(v < 0 ? 0 : v);
  }
  if (name == "pages_skipped") return Line(c.pages_skipped);
  if (name == "ksm_zero_pages") {
    return SignedLine(static_cast<std::int64_t>(c.ksm_zero_pages));
  }
  if (name == "full_scans") return Line(c.full_scans);
  if (name == "merge_across_nodes") return Line(k.merge_across_nodes);
  if (name == "max_page_sharing") return Line(k.max_page_sharing);
  if (name == "stable_node_chains") return Line(c.stable_node_chains);
  if (name == "stable_node_dups") return Line(c.stable_node_dups);
  if (name == "stable_node_chains_prune_millisecs") {
    return Line(k.stable_node_chains_prune_millisecs);
  }
  if (name == "use_zero_pages") return Line(k.use_zero_pages ? 1 : 0);
  if (name == "general_profit") return SignedLine(c.general_profit);
  if (name == "smart_scan") return Line(k.smart_scan ? 1 : 0);
  if (name == "advisor_mode") {
    return k.advisor_mode == AdvisorMode::kScanTime ? "none [scan-time]\n"
                                                    : "[none] scan-time\n";
  }
  if (name == "advisor_max_cpu") {
    return Line(static_cast<std::uint32_t>(k.advisor_max_cpu));
  }
  if (name == "advisor_min_pages_to_scan") {
    return Line(k.advisor_min_pages_to_scan);
  }
  if (name == "advisor_max_pages_to_scan") {
    return Line(k.advisor_max_pages_to_scan);
  }
  if (name == "advisor_target_scan_time") {
    return Line(k.advisor_target_scan_time);
  }
  return "";
}

std::string FormatKsmStat(const SpaceStat& s) {
  // fs/proc/base.c proc_pid_ksm_stat(), Linux 6.18.
  std::string out;
  out += "ksm_rmap_items " + std::to_string(s.rmap_items) + "\n";
  out += "ksm_zero_pages " +
         std::to_string(static_cast<std::int64_t>(s.zero_pages)) + "\n";
  out += "ksm_merging_pages " + std::to_string(s.merging_pages) + "\n";
  out += "ksm_process_profit " + std::to_string(s.process_profit) + "\n";
  out += std::string("ksm_merge_any: ") + (s.merge_any ? "yes" : "no") + "\n";
  out += std::string("ksm_mergeable: ") + (s.mergeable ? "yes" : "no") + "\n";
  return out;
}

std::string FormatMergingPages(std::uint64_t merging_pages) {
  return Line(merging_pages);
}

std::string FormatMergingPages(const SpaceStat& stat) {
  return FormatMergingPages(stat.merging_pages);
}

}  // namespace samepage
