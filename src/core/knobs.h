// The control knobs and counters of /sys/kernel/mm/ksm, as plain values.
//
// Field names are the sysfs file names. Defaults are the kernel's (6.x).
// Parsing and formatting of the sysfs text lives in src/api/sysfs_text.*;
// this file only holds the values and the range rules the kernel enforces.

#ifndef SAMEPAGE_CORE_KNOBS_H_
#define SAMEPAGE_CORE_KNOBS_H_

#include <cstdint>

namespace samepage {

enum class AdvisorMode : std::uint8_t { kNone, kScanTime };

struct Knobs {
  std::uint32_t run = 0;  // 0 stop, 1 merge, 2 stop and unmerge everything
  std::uint32_t pages_to_scan = 100;
  std::uint32_t sleep_millisecs = 20;
  std::uint32_t max_page_sharing = 256;  // >= 2
  std::uint32_t merge_across_nodes = 1;  // accepted, no NUMA effect here
  bool use_zero_pages = false;
  bool smart_scan = true;
  std::uint32_t stable_node_chains_prune_millisecs = 2000;
  AdvisorMode advisor_mode = AdvisorMode::kNone;
  std::uint64_t advisor_max_cpu = 70;  // percent
  std::uint64_t advisor_min_pages_to_scan = 500;
  std::uint64_t advisor_max_pages_to_scan = 30000;
  std::uint64_t advisor_target_scan_time = 200;  // seconds
};

struct Counters {
  std::uint64_t pages_shared = 0;    // stable nodes (merged pages kept)
  std::uint64_t pages_sharing = 0;   // further mappings of them (pages saved)
  std::uint64_t pages_unshared = 0;  // unstable-index entries, this scan's
                                     // and the last's not yet revisited
  std::uint64_t pages_volatile = 0;  // rmap items in none of the above
  std::uint64_t pages_scanned = 0;
  std::uint64_t pages_skipped = 0;   // smart scan
  std::uint64_t full_scans = 0;
  std::uint64_t stable_node_chains = 0;
  std::uint64_t stable_node_dups = 0;
  std::uint64_t ksm_zero_pages = 0;
  std::int64_t general_profit = 0;  // bytes
  std::uint64_t rmap_items = 0;     // pages being tracked
};

// Per-space figures, as /proc/<pid>/ksm_stat shows them.
struct SpaceStat {
  std::uint64_t rmap_items = 0;
  std::uint64_t zero_pages = 0;
  std::uint64_t merging_pages = 0;
  std::int64_t process_profit = 0;
  bool merge_any = false;
  bool mergeable = false;
};

// Size the kernel charges per rmap item in general_profit and
// ksm_process_profit (sizeof(struct ksm_rmap_item) on x86-64).
inline constexpr std::int64_t kKernelRmapItemSize = 64;

}  // namespace samepage

#endif  // SAMEPAGE_CORE_KNOBS_H_
