// Tests for the /sys/kernel/mm/ksm and /proc/<pid>/ksm_* text layer.
//
// kKernelWrites was measured on Linux 6.18 (x86-64, root): each input was
// written with one write(2) to the real /sys/kernel/mm/ksm file, starting
// from the kernel defaults, the errno (0 = accepted) and the file's text
// afterwards recorded, and the original value restored. WriteKnob must
// reproduce every row.

#include "api/sysfs_text.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <string>
#include <string_view>
#include <vector>

namespace samepage {
namespace {

using namespace std::string_view_literals;

struct KernelWrite {
  std::string_view knob;
  std::string_view input;
  int error;                            // 0: accepted
  std::string_view after;               // the knob's text after the write
  std::string_view pages_to_scan = {};  // if set: pages_to_scan's text after
};

// clang-format off
const KernelWrite kKernelWrites[] = {
    {"sleep_millisecs", ""sv, 0, "20\n"},
    {"sleep_millisecs", "abc"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "-1"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "3"sv, 0, "3\n"},
    {"sleep_millisecs", " 1"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "1 "sv, EINVAL, "20\n"},
    {"sleep_millisecs", "0x10"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "99999999999"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "1\n"sv, 0, "1\n"},
    {"sleep_millisecs", "0"sv, 0, "0\n"},
    {"sleep_millisecs", "1"sv, 0, "1\n"},
    {"sleep_millisecs", "2"sv, 0, "2\n"},
    {"sleep_millisecs", "+1"sv, 0, "1\n"},
    {"sleep_millisecs", "1\n\n"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "\n"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "4294967295"sv, 0, "4294967295\n"},
    {"sleep_millisecs", "4294967296"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "2147483647"sv, 0, "2147483647\n"},
    {"sleep_millisecs", "2147483648"sv, 0, "2147483648\n"},
    {"sleep_millisecs", "-0"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "1\0x"sv, 0, "1\n"},
    {"sleep_millisecs", "t"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "f"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "on"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "off"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "of"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "oN"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "yes"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "10"sv, 0, "10\n"},
    {"sleep_millisecs", "n"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "none"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "scan-time"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "scan-time\n"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "none\n"sv, EINVAL, "20\n"},
    {"sleep_millisecs", " none"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "none "sv, EINVAL, "20\n"},
    {"sleep_millisecs", "01"sv, 0, "1\n"},
    {"sleep_millisecs", "007"sv, 0, "7\n"},
    {"pages_to_scan", ""sv, 0, "100\n"},
    {"pages_to_scan", "abc"sv, EINVAL, "100\n"},
    {"pages_to_scan", "-1"sv, EINVAL, "100\n"},
    {"pages_to_scan", "3"sv, 0, "3\n"},
    {"pages_to_scan", " 1"sv, EINVAL, "100\n"},
    {"pages_to_scan", "1 "sv, EINVAL, "100\n"},
    {"pages_to_scan", "0x10"sv, EINVAL, "100\n"},
    {"pages_to_scan", "99999999999"sv, EINVAL, "100\n"},
    {"pages_to_scan", "1\n"sv, 0, "1\n"},
    {"pages_to_scan", "0"sv, 0, "0\n"},
    {"pages_to_scan", "1"sv, 0, "1\n"},
    {"pages_to_scan", "2"sv, 0, "2\n"},
    {"pages_to_scan", "+1"sv, 0, "1\n"},
    {"pages_to_scan", "1\n\n"sv, EINVAL, "100\n"},
    {"pages_to_scan", "\n"sv, EINVAL, "100\n"},
    {"pages_to_scan", "4294967295"sv, 0, "4294967295\n"},
    {"pages_to_scan", "4294967296"sv, EINVAL, "100\n"},
    {"pages_to_scan", "2147483647"sv, 0, "2147483647\n"},
    {"pages_to_scan", "2147483648"sv, 0, "2147483648\n"},
    {"pages_to_scan", "-0"sv, EINVAL, "100\n"},
    {"pages_to_scan", "1\0x"sv, 0, "1\n"},
    {"pages_to_scan", "t"sv, EINVAL, "100\n"},
    {"pages_to_scan", "f"sv, EINVAL, "100\n"},
    {"pages_to_scan", "on"sv, EINVAL, "100\n"},
    {"pages_to_scan", "off"sv, EINVAL, "100\n"},
    {"pages_to_scan", "of"sv, EINVAL, "100\n"},
    {"pages_to_scan", "oN"sv, EINVAL, "100\n"},
    {"pages_to_scan", "yes"sv, EINVAL, "100\n"},
    {"pages_to_scan", "10"sv, 0, "10\n"},
    {"pages_to_scan", "n"sv, EINVAL, "100\n"},
    {"pages_to_scan", "none"sv, EINVAL, "100\n"},
    {"pages_to_scan", "scan-time"sv, EINVAL, "100\n"},
    {"pages_to_scan", "scan-time\n"sv, EINVAL, "100\n"},
    {"pages_to_scan", "none\n"sv, EINVAL, "100\n"},
    {"pages_to_scan", " none"sv, EINVAL, "100\n"},
    {"pages_to_scan", "none "sv, EINVAL, "100\n"},
    {"pages_to_scan", "01"sv, 0, "1\n"},
    {"pages_to_scan", "007"sv, 0, "7\n"},
    {"run", ""sv, 0, "0\n"},
    {"run", "abc"sv, EINVAL, "0\n"},
    {"run", "-1"sv, EINVAL, "0\n"},
    {"run", "3"sv, EINVAL, "0\n"},
    {"run", " 1"sv, EINVAL, "0\n"},
    {"run", "1 "sv, EINVAL, "0\n"},
    {"run", "0x10"sv, EINVAL, "0\n"},
    {"run", "99999999999"sv, EINVAL, "0\n"},
    {"run", "1\n"sv, 0, "1\n"},
    {"run", "0"sv, 0, "0\n"},
    {"run", "1"sv, 0, "1\n"},
    {"run", "2"sv, 0, "2\n"},
    {"run", "+1"sv, 0, "1\n"},
    {"run", "1\n\n"sv, EINVAL, "0\n"},
    {"run", "\n"sv, EINVAL, "0\n"},
    {"run", "4294967295"sv, EINVAL, "0\n"},
    {"run", "4294967296"sv, EINVAL, "0\n"},
    {"run", "2147483647"sv, EINVAL, "0\n"},
    {"run", "2147483648"sv, EINVAL, "0\n"},
    {"run", "-0"sv, EINVAL, "0\n"},
    {"run", "1\0x"sv, 0, "1\n"},
    {"run", "t"sv, EINVAL, "0\n"},
    {"run", "f"sv, EINVAL, "0\n"},
    {"run", "on"sv, EINVAL, "0\n"},
    {"run", "off"sv, EINVAL, "0\n"},
    {"run", "of"sv, EINVAL, "0\n"},
    {"run", "oN"sv, EINVAL, "0\n"},
    {"run", "yes"sv, EINVAL, "0\n"},
    {"run", "10"sv, EINVAL, "0\n"},
    {"run", "n"sv, EINVAL, "0\n"},
    {"run", "none"sv, EINVAL, "0\n"},
    {"run", "scan-time"sv, EINVAL, "0\n"},
    {"run", "scan-time\n"sv, EINVAL, "0\n"},
    {"run", "none\n"sv, EINVAL, "0\n"},
    {"run", " none"sv, EINVAL, "0\n"},
    {"run", "none "sv, EINVAL, "0\n"},
    {"run", "01"sv, 0, "1\n"},
    {"run", "007"sv, EINVAL, "0\n"},
    {"merge_across_nodes", ""sv, 0, "1\n"},
    {"merge_across_nodes", "abc"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "-1"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "3"sv, EINVAL, "1\n"},
    {"merge_across_nodes", " 1"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "1 "sv, EINVAL, "1\n"},
    {"merge_across_nodes", "0x10"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "99999999999"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "1\n"sv, 0, "1\n"},
    {"merge_across_nodes", "0"sv, 0, "0\n"},
    {"merge_across_nodes", "1"sv, 0, "1\n"},
    {"merge_across_nodes", "2"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "+1"sv, 0, "1\n"},
    {"merge_across_nodes", "1\n\n"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "\n"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "4294967295"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "4294967296"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "2147483647"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "2147483648"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "-0"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "1\0x"sv, 0, "1\n"},
    {"merge_across_nodes", "t"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "f"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "on"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "off"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "of"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "oN"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "yes"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "10"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "n"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "none"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "scan-time"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "scan-time\n"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "none\n"sv, EINVAL, "1\n"},
    {"merge_across_nodes", " none"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "none "sv, EINVAL, "1\n"},
    {"merge_across_nodes", "01"sv, 0, "1\n"},
    {"merge_across_nodes", "007"sv, EINVAL, "1\n"},
    {"max_page_sharing", ""sv, 0, "256\n"},
    {"max_page_sharing", "abc"sv, EINVAL, "256\n"},
    {"max_page_sharing", "-1"sv, EINVAL, "256\n"},
    {"max_page_sharing", "3"sv, 0, "3\n"},
    {"max_page_sharing", " 1"sv, EINVAL, "256\n"},
    {"max_page_sharing", "1 "sv, EINVAL, "256\n"},
    {"max_page_sharing", "0x10"sv, EINVAL, "256\n"},
    {"max_page_sharing", "99999999999"sv, ERANGE, "256\n"},
    {"max_page_sharing", "1\n"sv, EINVAL, "256\n"},
    {"max_page_sharing", "0"sv, EINVAL, "256\n"},
    {"max_page_sharing", "1"sv, EINVAL, "256\n"},
    {"max_page_sharing", "2"sv, 0, "2\n"},
    {"max_page_sharing", "+1"sv, EINVAL, "256\n"},
    {"max_page_sharing", "1\n\n"sv, EINVAL, "256\n"},
    {"max_page_sharing", "\n"sv, EINVAL, "256\n"},
    {"max_page_sharing", "4294967295"sv, ERANGE, "256\n"},
    {"max_page_sharing", "4294967296"sv, ERANGE, "256\n"},
    {"max_page_sharing", "2147483647"sv, 0, "2147483647\n"},
    {"max_page_sharing", "2147483648"sv, ERANGE, "256\n"},
    {"max_page_sharing", "-0"sv, EINVAL, "256\n"},
    {"max_page_sharing", "1\0x"sv, EINVAL, "256\n"},
    {"max_page_sharing", "t"sv, EINVAL, "256\n"},
    {"max_page_sharing", "f"sv, EINVAL, "256\n"},
    {"max_page_sharing", "on"sv, EINVAL, "256\n"},
    {"max_page_sharing", "off"sv, EINVAL, "256\n"},
    {"max_page_sharing", "of"sv, EINVAL, "256\n"},
    {"max_page_sharing", "oN"sv, EINVAL, "256\n"},
    {"max_page_sharing", "yes"sv, EINVAL, "256\n"},
    {"max_page_sharing", "10"sv, 0, "10\n"},
    {"max_page_sharing", "n"sv, EINVAL, "256\n"},
    {"max_page_sharing", "none"sv, EINVAL, "256\n"},
    {"max_page_sharing", "scan-time"sv, EINVAL, "256\n"},
    {"max_page_sharing", "scan-time\n"sv, EINVAL, "256\n"},
    {"max_page_sharing", "none\n"sv, EINVAL, "256\n"},
    {"max_page_sharing", " none"sv, EINVAL, "256\n"},
    {"max_page_sharing", "none "sv, EINVAL, "256\n"},
    {"max_page_sharing", "01"sv, EINVAL, "256\n"},
    {"max_page_sharing", "007"sv, 0, "7\n"},
    {"stable_node_chains_prune_millisecs", ""sv, 0, "2000\n"},
    {"stable_node_chains_prune_millisecs", "abc"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "-1"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "3"sv, 0, "3\n"},
    {"stable_node_chains_prune_millisecs", " 1"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "1 "sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "0x10"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "99999999999"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "1\n"sv, 0, "1\n"},
    {"stable_node_chains_prune_millisecs", "0"sv, 0, "0\n"},
    {"stable_node_chains_prune_millisecs", "1"sv, 0, "1\n"},
    {"stable_node_chains_prune_millisecs", "2"sv, 0, "2\n"},
    {"stable_node_chains_prune_millisecs", "+1"sv, 0, "1\n"},
    {"stable_node_chains_prune_millisecs", "1\n\n"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "\n"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "4294967295"sv, 0, "4294967295\n"},
    {"stable_node_chains_prune_millisecs", "4294967296"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "2147483647"sv, 0, "2147483647\n"},
    {"stable_node_chains_prune_millisecs", "2147483648"sv, 0, "2147483648\n"},
    {"stable_node_chains_prune_millisecs", "-0"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "1\0x"sv, 0, "1\n"},
    {"stable_node_chains_prune_millisecs", "t"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "f"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "on"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "off"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "of"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "oN"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "yes"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "10"sv, 0, "10\n"},
    {"stable_node_chains_prune_millisecs", "n"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "none"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "scan-time"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "scan-time\n"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "none\n"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", " none"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "none "sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "01"sv, 0, "1\n"},
    {"stable_node_chains_prune_millisecs", "007"sv, 0, "7\n"},
    {"use_zero_pages", ""sv, 0, "0\n"},
    {"use_zero_pages", "abc"sv, EINVAL, "0\n"},
    {"use_zero_pages", "-1"sv, EINVAL, "0\n"},
    {"use_zero_pages", "3"sv, EINVAL, "0\n"},
    {"use_zero_pages", " 1"sv, EINVAL, "0\n"},
    {"use_zero_pages", "1 "sv, 0, "1\n"},
    {"use_zero_pages", "0x10"sv, 0, "0\n"},
    {"use_zero_pages", "99999999999"sv, EINVAL, "0\n"},
    {"use_zero_pages", "1\n"sv, 0, "1\n"},
    {"use_zero_pages", "0"sv, 0, "0\n"},
    {"use_zero_pages", "1"sv, 0, "1\n"},
    {"use_zero_pages", "2"sv, EINVAL, "0\n"},
    {"use_zero_pages", "+1"sv, EINVAL, "0\n"},
    {"use_zero_pages", "1\n\n"sv, 0, "1\n"},
    {"use_zero_pages", "\n"sv, EINVAL, "0\n"},
    {"use_zero_pages", "4294967295"sv, EINVAL, "0\n"},
    {"use_zero_pages", "4294967296"sv, EINVAL, "0\n"},
    {"use_zero_pages", "2147483647"sv, EINVAL, "0\n"},
    {"use_zero_pages", "2147483648"sv, EINVAL, "0\n"},
    {"use_zero_pages", "-0"sv, EINVAL, "0\n"},
    {"use_zero_pages", "1\0x"sv, 0, "1\n"},
    {"use_zero_pages", "t"sv, 0, "1\n"},
    {"use_zero_pages", "f"sv, 0, "0\n"},
    {"use_zero_pages", "on"sv, 0, "1\n"},
    {"use_zero_pages", "off"sv, 0, "0\n"},
    {"use_zero_pages", "of"sv, 0, "0\n"},
    {"use_zero_pages", "oN"sv, 0, "1\n"},
    {"use_zero_pages", "yes"sv, 0, "1\n"},
    {"use_zero_pages", "10"sv, 0, "1\n"},
    {"use_zero_pages", "n"sv, 0, "0\n"},
    {"use_zero_pages", "none"sv, 0, "0\n"},
    {"use_zero_pages", "scan-time"sv, EINVAL, "0\n"},
    {"use_zero_pages", "scan-time\n"sv, EINVAL, "0\n"},
    {"use_zero_pages", "none\n"sv, 0, "0\n"},
    {"use_zero_pages", " none"sv, EINVAL, "0\n"},
    {"use_zero_pages", "none "sv, 0, "0\n"},
    {"use_zero_pages", "01"sv, 0, "0\n"},
    {"use_zero_pages", "007"sv, 0, "0\n"},
    {"smart_scan", ""sv, 0, "1\n"},
    {"smart_scan", "abc"sv, EINVAL, "1\n"},
    {"smart_scan", "-1"sv, EINVAL, "1\n"},
    {"smart_scan", "3"sv, EINVAL, "1\n"},
    {"smart_scan", " 1"sv, EINVAL, "1\n"},
    {"smart_scan", "1 "sv, 0, "1\n"},
    {"smart_scan", "0x10"sv, 0, "0\n"},
    {"smart_scan", "99999999999"sv, EINVAL, "1\n"},
    {"smart_scan", "1\n"sv, 0, "1\n"},
    {"smart_scan", "0"sv, 0, "0\n"},
    {"smart_scan", "1"sv, 0, "1\n"},
    {"smart_scan", "2"sv, EINVAL, "1\n"},
    {"smart_scan", "+1"sv, EINVAL, "1\n"},
    {"smart_scan", "1\n\n"sv, 0, "1\n"},
    {"smart_scan", "\n"sv, EINVAL, "1\n"},
    {"smart_scan", "4294967295"sv, EINVAL, "1\n"},
    {"smart_scan", "4294967296"sv, EINVAL, "1\n"},
    {"smart_scan", "2147483647"sv, EINVAL, "1\n"},
    {"smart_scan", "2147483648"sv, EINVAL, "1\n"},
    {"smart_scan", "-0"sv, EINVAL, "1\n"},
    {"smart_scan", "1\0x"sv, 0, "1\n"},
    {"smart_scan", "t"sv, 0, "1\n"},
    {"smart_scan", "f"sv, 0, "0\n"},
    {"smart_scan", "on"sv, 0, "1\n"},
    {"smart_scan", "off"sv, 0, "0\n"},
    {"smart_scan", "of"sv, 0, "0\n"},
    {"smart_scan", "oN"sv, 0, "1\n"},
    {"smart_scan", "yes"sv, 0, "1\n"},
    {"smart_scan", "10"sv, 0, "1\n"},
    {"smart_scan", "n"sv, 0, "0\n"},
    {"smart_scan", "none"sv, 0, "0\n"},
    {"smart_scan", "scan-time"sv, EINVAL, "1\n"},
    {"smart_scan", "scan-time\n"sv, EINVAL, "1\n"},
    {"smart_scan", "none\n"sv, 0, "0\n"},
    {"smart_scan", " none"sv, EINVAL, "1\n"},
    {"smart_scan", "none "sv, 0, "0\n"},
    {"smart_scan", "01"sv, 0, "0\n"},
    {"smart_scan", "007"sv, 0, "0\n"},
    {"advisor_mode", ""sv, 0, "[none] scan-time\n"},
    {"advisor_mode", "abc"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "-1"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "3"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", " 1"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "1 "sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "0x10"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "99999999999"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "1\n"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "0"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "1"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "2"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "+1"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "1\n\n"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "\n"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "4294967295"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "4294967296"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "2147483647"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "2147483648"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "-0"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "1\0x"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "t"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "f"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "on"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "off"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "of"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "oN"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "yes"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "10"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "n"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "none"sv, 0, "[none] scan-time\n"},
    {"advisor_mode", "scan-time"sv, 0, "none [scan-time]\n", "500\n"},
    {"advisor_mode", "scan-time\n"sv, 0, "none [scan-time]\n", "500\n"},
    {"advisor_mode", "none\n"sv, 0, "[none] scan-time\n"},
    {"advisor_mode", " none"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "none "sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "01"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "007"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_max_cpu", ""sv, 0, "70\n"},
    {"advisor_max_cpu", "abc"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "-1"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "3"sv, 0, "3\n"},
    {"advisor_max_cpu", " 1"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "1 "sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "0x10"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "99999999999"sv, 0, "1215752191\n"},
    {"advisor_max_cpu", "1\n"sv, 0, "1\n"},
    {"advisor_max_cpu", "0"sv, 0, "0\n"},
    {"advisor_max_cpu", "1"sv, 0, "1\n"},
    {"advisor_max_cpu", "2"sv, 0, "2\n"},
    {"advisor_max_cpu", "+1"sv, 0, "1\n"},
    {"advisor_max_cpu", "1\n\n"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "\n"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "4294967295"sv, 0, "4294967295\n"},
    {"advisor_max_cpu", "4294967296"sv, 0, "0\n"},
    {"advisor_max_cpu", "2147483647"sv, 0, "2147483647\n"},
    {"advisor_max_cpu", "2147483648"sv, 0, "2147483648\n"},
    {"advisor_max_cpu", "-0"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "1\0x"sv, 0, "1\n"},
    {"advisor_max_cpu", "t"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "f"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "on"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "off"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "of"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "oN"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "yes"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "10"sv, 0, "10\n"},
    {"advisor_max_cpu", "n"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "none"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "scan-time"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "scan-time\n"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "none\n"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", " none"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "none "sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "01"sv, 0, "1\n"},
    {"advisor_max_cpu", "007"sv, 0, "7\n"},
    {"advisor_min_pages_to_scan", ""sv, 0, "500\n"},
    {"advisor_min_pages_to_scan", "abc"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "-1"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "3"sv, 0, "3\n"},
    {"advisor_min_pages_to_scan", " 1"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "1 "sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "0x10"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "99999999999"sv, 0, "99999999999\n"},
    {"advisor_min_pages_to_scan", "1\n"sv, 0, "1\n"},
    {"advisor_min_pages_to_scan", "0"sv, 0, "0\n"},
    {"advisor_min_pages_to_scan", "1"sv, 0, "1\n"},
    {"advisor_min_pages_to_scan", "2"sv, 0, "2\n"},
    {"advisor_min_pages_to_scan", "+1"sv, 0, "1\n"},
    {"advisor_min_pages_to_scan", "1\n\n"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "\n"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "4294967295"sv, 0, "4294967295\n"},
    {"advisor_min_pages_to_scan", "4294967296"sv, 0, "4294967296\n"},
    {"advisor_min_pages_to_scan", "2147483647"sv, 0, "2147483647\n"},
    {"advisor_min_pages_to_scan", "2147483648"sv, 0, "2147483648\n"},
    {"advisor_min_pages_to_scan", "-0"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "1\0x"sv, 0, "1\n"},
    {"advisor_min_pages_to_scan", "t"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "f"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "on"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "off"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "of"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "oN"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "yes"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "10"sv, 0, "10\n"},
    {"advisor_min_pages_to_scan", "n"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "none"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "scan-time"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "scan-time\n"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "none\n"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", " none"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "none "sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "01"sv, 0, "1\n"},
    {"advisor_min_pages_to_scan", "007"sv, 0, "7\n"},
    {"advisor_max_pages_to_scan", ""sv, 0, "30000\n"},
    {"advisor_max_pages_to_scan", "abc"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "-1"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "3"sv, 0, "3\n"},
    {"advisor_max_pages_to_scan", " 1"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "1 "sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "0x10"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "99999999999"sv, 0, "99999999999\n"},
    {"advisor_max_pages_to_scan", "1\n"sv, 0, "1\n"},
    {"advisor_max_pages_to_scan", "0"sv, 0, "0\n"},
    {"advisor_max_pages_to_scan", "1"sv, 0, "1\n"},
    {"advisor_max_pages_to_scan", "2"sv, 0, "2\n"},
    {"advisor_max_pages_to_scan", "+1"sv, 0, "1\n"},
    {"advisor_max_pages_to_scan", "1\n\n"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "\n"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "4294967295"sv, 0, "4294967295\n"},
    {"advisor_max_pages_to_scan", "4294967296"sv, 0, "4294967296\n"},
    {"advisor_max_pages_to_scan", "2147483647"sv, 0, "2147483647\n"},
    {"advisor_max_pages_to_scan", "2147483648"sv, 0, "2147483648\n"},
    {"advisor_max_pages_to_scan", "-0"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "1\0x"sv, 0, "1\n"},
    {"advisor_max_pages_to_scan", "t"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "f"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "on"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "off"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "of"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "oN"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "yes"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "10"sv, 0, "10\n"},
    {"advisor_max_pages_to_scan", "n"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "none"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "scan-time"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "scan-time\n"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "none\n"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", " none"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "none "sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "01"sv, 0, "1\n"},
    {"advisor_max_pages_to_scan", "007"sv, 0, "7\n"},
    {"advisor_target_scan_time", ""sv, 0, "200\n"},
    {"advisor_target_scan_time", "abc"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "-1"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "3"sv, 0, "3\n"},
    {"advisor_target_scan_time", " 1"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "1 "sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "0x10"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "99999999999"sv, 0, "99999999999\n"},
    {"advisor_target_scan_time", "1\n"sv, 0, "1\n"},
    {"advisor_target_scan_time", "0"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "1"sv, 0, "1\n"},
    {"advisor_target_scan_time", "2"sv, 0, "2\n"},
    {"advisor_target_scan_time", "+1"sv, 0, "1\n"},
    {"advisor_target_scan_time", "1\n\n"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "\n"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "4294967295"sv, 0, "4294967295\n"},
    {"advisor_target_scan_time", "4294967296"sv, 0, "4294967296\n"},
    {"advisor_target_scan_time", "2147483647"sv, 0, "2147483647\n"},
    {"advisor_target_scan_time", "2147483648"sv, 0, "2147483648\n"},
    {"advisor_target_scan_time", "-0"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "1\0x"sv, 0, "1\n"},
    {"advisor_target_scan_time", "t"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "f"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "on"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "off"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "of"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "oN"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "yes"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "10"sv, 0, "10\n"},
    {"advisor_target_scan_time", "n"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "none"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "scan-time"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "scan-time\n"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "none\n"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", " none"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "none "sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "01"sv, 0, "1\n"},
    {"advisor_target_scan_time", "007"sv, 0, "7\n"},
    {"max_page_sharing", "99999999999999999999999"sv, ERANGE, "256\n"},
    {"max_page_sharing", "18446744073709551615"sv, ERANGE, "256\n"},
    {"max_page_sharing", "18446744073709551616"sv, ERANGE, "256\n"},
    {"merge_across_nodes", "99999999999999999999999"sv, ERANGE, "1\n"},
    {"merge_across_nodes", "18446744073709551615"sv, EINVAL, "1\n"},
    {"merge_across_nodes", "18446744073709551616"sv, ERANGE, "1\n"},
    {"sleep_millisecs", "99999999999999999999999"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "18446744073709551615"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "18446744073709551616"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "o"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "O"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "Of"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "T"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "F"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "Y"sv, EINVAL, "20\n"},
    {"sleep_millisecs", "N"sv, EINVAL, "20\n"},
    {"pages_to_scan", "99999999999999999999999"sv, EINVAL, "100\n"},
    {"pages_to_scan", "18446744073709551615"sv, EINVAL, "100\n"},
    {"pages_to_scan", "18446744073709551616"sv, EINVAL, "100\n"},
    {"pages_to_scan", "o"sv, EINVAL, "100\n"},
    {"pages_to_scan", "O"sv, EINVAL, "100\n"},
    {"pages_to_scan", "Of"sv, EINVAL, "100\n"},
    {"pages_to_scan", "T"sv, EINVAL, "100\n"},
    {"pages_to_scan", "F"sv, EINVAL, "100\n"},
    {"pages_to_scan", "Y"sv, EINVAL, "100\n"},
    {"pages_to_scan", "N"sv, EINVAL, "100\n"},
    {"run", "99999999999999999999999"sv, EINVAL, "0\n"},
    {"run", "18446744073709551615"sv, EINVAL, "0\n"},
    {"run", "18446744073709551616"sv, EINVAL, "0\n"},
    {"run", "o"sv, EINVAL, "0\n"},
    {"run", "O"sv, EINVAL, "0\n"},
    {"run", "Of"sv, EINVAL, "0\n"},
    {"run", "T"sv, EINVAL, "0\n"},
    {"run", "F"sv, EINVAL, "0\n"},
    {"run", "Y"sv, EINVAL, "0\n"},
    {"run", "N"sv, EINVAL, "0\n"},
    {"stable_node_chains_prune_millisecs", "99999999999999999999999"sv,
     EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "18446744073709551615"sv,
     EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "18446744073709551616"sv,
     EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "o"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "O"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "Of"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "T"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "F"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "Y"sv, EINVAL, "2000\n"},
    {"stable_node_chains_prune_millisecs", "N"sv, EINVAL, "2000\n"},
    {"use_zero_pages", "99999999999999999999999"sv, EINVAL, "0\n"},
    {"use_zero_pages", "18446744073709551615"sv, 0, "1\n"},
    {"use_zero_pages", "18446744073709551616"sv, 0, "1\n"},
    {"use_zero_pages", "o"sv, EINVAL, "0\n"},
    {"use_zero_pages", "O"sv, EINVAL, "0\n"},
    {"use_zero_pages", "Of"sv, 0, "0\n"},
    {"use_zero_pages", "T"sv, 0, "1\n"},
    {"use_zero_pages", "F"sv, 0, "0\n"},
    {"use_zero_pages", "Y"sv, 0, "1\n"},
    {"use_zero_pages", "N"sv, 0, "0\n"},
    {"smart_scan", "99999999999999999999999"sv, EINVAL, "1\n"},
    {"smart_scan", "18446744073709551615"sv, 0, "1\n"},
    {"smart_scan", "18446744073709551616"sv, 0, "1\n"},
    {"smart_scan", "o"sv, EINVAL, "1\n"},
    {"smart_scan", "O"sv, EINVAL, "1\n"},
    {"smart_scan", "Of"sv, 0, "0\n"},
    {"smart_scan", "T"sv, 0, "1\n"},
    {"smart_scan", "F"sv, 0, "0\n"},
    {"smart_scan", "Y"sv, 0, "1\n"},
    {"smart_scan", "N"sv, 0, "0\n"},
    {"advisor_max_cpu", "99999999999999999999999"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "18446744073709551615"sv, 0, "4294967295\n"},
    {"advisor_max_cpu", "18446744073709551616"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "o"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "O"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "Of"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "T"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "F"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "Y"sv, EINVAL, "70\n"},
    {"advisor_max_cpu", "N"sv, EINVAL, "70\n"},
    {"advisor_min_pages_to_scan", "99999999999999999999999"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "18446744073709551615"sv,
     0, "18446744073709551615\n"},
    {"advisor_min_pages_to_scan", "18446744073709551616"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "o"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "O"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "Of"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "T"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "F"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "Y"sv, EINVAL, "500\n"},
    {"advisor_min_pages_to_scan", "N"sv, EINVAL, "500\n"},
    {"advisor_max_pages_to_scan", "99999999999999999999999"sv,
     EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "18446744073709551615"sv,
     0, "18446744073709551615\n"},
    {"advisor_max_pages_to_scan", "18446744073709551616"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "o"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "O"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "Of"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "T"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "F"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "Y"sv, EINVAL, "30000\n"},
    {"advisor_max_pages_to_scan", "N"sv, EINVAL, "30000\n"},
    {"advisor_target_scan_time", "99999999999999999999999"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "18446744073709551615"sv,
     0, "18446744073709551615\n"},
    {"advisor_target_scan_time", "18446744073709551616"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "o"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "O"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "Of"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "T"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "F"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "Y"sv, EINVAL, "200\n"},
    {"advisor_target_scan_time", "N"sv, EINVAL, "200\n"},
    {"advisor_mode", "99999999999999999999999"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "18446744073709551615"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "18446744073709551616"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "o"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "O"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "Of"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "T"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "F"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "Y"sv, EINVAL, "[none] scan-time\n"},
    {"advisor_mode", "N"sv, EINVAL, "[none] scan-time\n"},
};
// clang-format on

const char* const kCounters[] = {
    "pages_scanned",    "pages_shared",   "pages_sharing",
    "pages_unshared",   "pages_volatile", "pages_skipped",
    "ksm_zero_pages",   "full_scans",     "stable_node_chains",
    "stable_node_dups", "general_profit",
};

// Every field of Knobs, as the sysfs text of every file.
std::string AllText(const Knobs& k) {
  std::string out;
  for (std::string_view name : KsmFileNames()) {
    out += std::string(name) + "=" + FormatKnob(k, Counters{}, name);
  }
  return out;
}

TEST(KsmFileNamesTest, KernelOrderAndModes) {
  const std::vector<std::string_view> expected = {
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
  const auto names = KsmFileNames();
  EXPECT_EQ(std::vector<std::string_view>(names.begin(), names.end()),
            expected);
  int writable = 0;
  for (std::string_view name : names) {
    EXPECT_TRUE(IsKsmFile(name));
    writable += IsWritableKnob(name) ? 1 : 0;
  }
  EXPECT_EQ(writable, 13);
  for (const char* counter : kCounters) {
    EXPECT_TRUE(IsKsmFile(counter)) << counter;
    EXPECT_FALSE(IsWritableKnob(counter)) << counter;
  }
  EXPECT_FALSE(IsKsmFile("ksm"));
  EXPECT_FALSE(IsKsmFile("run\n"));
  EXPECT_FALSE(IsKsmFile(""));
}

TEST(WriteKnobTest, MatchesEveryMeasuredKernelWrite) {
  for (const KernelWrite& w : kKernelWrites) {
    SCOPED_TRACE(std::string(w.knob) + " <- \"" + std::string(w.input) + "\"");
    Knobs knobs;
    const std::string before = AllText(knobs);
    const Status s = WriteKnob(&knobs, w.knob, w.input, KnobContext{});
    EXPECT_EQ(s.code(), w.error) << s.message();
    EXPECT_EQ(FormatKnob(knobs, Counters{}, w.knob), w.after);
    if (!w.pages_to_scan.empty()) {
      EXPECT_EQ(FormatKnob(knobs, Counters{}, "pages_to_scan"),
                w.pages_to_scan);
    }
    if (!s.ok()) {
      EXPECT_EQ(AllText(knobs), before) << "changed on error";
    }
  }
}

TEST(WriteKnobTest, ValidValuesOfEveryKnob) {
  struct Valid {
    const char* knob;
    const char* input;
    const char* after;
  };
  const Valid valid[] = {
      {"sleep_millisecs", "0", "0\n"},
      {"sleep_millisecs", "4294967295\n", "4294967295\n"},
      {"pages_to_scan", "0", "0\n"},
      {"pages_to_scan", "10000", "10000\n"},
      {"run", "0", "0\n"},
      {"run", "1\n", "1\n"},
      {"run", "2", "2\n"},
      {"merge_across_nodes", "0", "0\n"},
      {"merge_across_nodes", "1", "1\n"},
      {"max_page_sharing", "2", "2\n"},
      {"max_page_sharing", "2147483647", "2147483647\n"},
      {"stable_node_chains_prune_millisecs", "0", "0\n"},
      {"use_zero_pages", "1", "1\n"},
      {"use_zero_pages", "y", "1\n"},
      {"use_zero_pages", "on", "1\n"},
      {"smart_scan", "0", "0\n"},
      {"smart_scan", "N", "0\n"},
      {"smart_scan", "off", "0\n"},
      {"advisor_mode", "scan-time", "none [scan-time]\n"},
      {"advisor_mode", "none\n", "[none] scan-time\n"},
      {"advisor_max_cpu", "100", "100\n"},
      {"advisor_min_pages_to_scan", "0", "0\n"},
      {"advisor_max_pages_to_scan", "18446744073709551615",
       "18446744073709551615\n"},
      {"advisor_target_scan_time", "1", "1\n"},
  };
  for (const Valid& v : valid) {
    SCOPED_TRACE(std::string(v.knob) + " <- " + v.input);
    Knobs knobs;
    ASSERT_TRUE(WriteKnob(&knobs, v.knob, v.input, KnobContext{}).ok());
    EXPECT_EQ(FormatKnob(knobs, Counters{}, v.knob), v.after);
  }
}

TEST(WriteKnobTest, UnknownFileIsEnoent) {
  Knobs knobs;
  EXPECT_EQ(WriteKnob(&knobs, "nonexistent", "1", {}).code(), ENOENT);
  EXPECT_EQ(WriteKnob(&knobs, "", "1", {}).code(), ENOENT);
  EXPECT_EQ(WriteKnob(&knobs, "/sys/kernel/mm/ksm/run", "1", {}).code(),
            ENOENT);
}

TEST(WriteKnobTest, CountersAreEaccesWhateverTheInput) {
  for (const char* counter : kCounters) {
    for (std::string_view input : {""sv, "0"sv, "1\n"sv, "abc"sv}) {
      Knobs knobs;
      EXPECT_EQ(WriteKnob(&knobs, counter, input, {}).code(), EACCES)
          << counter;
    }
  }
}

TEST(WriteKnobTest, OnlyTheFirstPageOfAWriteCounts) {
  Knobs knobs;
  std::string text(4095, '0');
  text += '7';  // 4096 bytes: all parsed
  ASSERT_TRUE(WriteKnob(&knobs, "sleep_millisecs", text, {}).ok());
  EXPECT_EQ(knobs.sleep_millisecs, 7u);
  text = std::string(4096, '0') + "7";  // 4097 bytes: the '7' is not seen
  ASSERT_TRUE(WriteKnob(&knobs, "sleep_millisecs", text, {}).ok());
  EXPECT_EQ(knobs.sleep_millisecs, 0u);
}

TEST(WriteKnobTest, MaxPageSharingBusyWhilePagesShared) {
  const KnobContext busy{.pages_shared = 4};
  Knobs knobs;
  EXPECT_TRUE(WriteKnob(&knobs, "max_page_sharing", "256", busy).ok());
  EXPECT_TRUE(WriteKnob(&knobs, "max_page_sharing", "256\n", busy).ok());
  EXPECT_EQ(WriteKnob(&knobs, "max_page_sharing", "100", busy).code(), EBUSY);
  // Bad values are rejected before the busy check.
  EXPECT_EQ(WriteKnob(&knobs, "max_page_sharing", "1", busy).code(), EINVAL);
  EXPECT_EQ(WriteKnob(&knobs, "max_page_sharing", "abc", busy).code(), EINVAL);
  EXPECT_EQ(WriteKnob(&knobs, "max_page_sharing", "4294967296", busy).code(),
            ERANGE);
  EXPECT_EQ(knobs.max_page_sharing, 256u);
  EXPECT_TRUE(WriteKnob(&knobs, "max_page_sharing", "100", {}).ok());
  EXPECT_EQ(knobs.max_page_sharing, 100u);
}

TEST(WriteKnobTest, MergeAcrossNodesBusyWhilePagesShared) {
  const KnobContext busy{.pages_shared = 1};
  Knobs knobs;
  EXPECT_TRUE(WriteKnob(&knobs, "merge_across_nodes", "1", busy).ok());
  EXPECT_EQ(WriteKnob(&knobs, "merge_across_nodes", "0", busy).code(), EBUSY);
  EXPECT_EQ(WriteKnob(&knobs, "merge_across_nodes", "2", busy).code(), EINVAL);
  EXPECT_EQ(knobs.merge_across_nodes, 1u);
  EXPECT_TRUE(WriteKnob(&knobs, "merge_across_nodes", "0", {}).ok());
  EXPECT_EQ(knobs.merge_across_nodes, 0u);
}

TEST(WriteKnobTest, AdvisorModeOwnsPagesToScan) {
  Knobs knobs;
  ASSERT_TRUE(WriteKnob(&knobs, "pages_to_scan", "77", {}).ok());
  // Writing the current mode changes nothing.
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_mode", "none", {}).ok());
  EXPECT_EQ(knobs.pages_to_scan, 77u);
  // Entering scan-time starts from advisor_min_pages_to_scan, truncated to
  // the unsigned int pages_to_scan is (measured: 4294967297 gives 1).
  ASSERT_TRUE(
      WriteKnob(&knobs, "advisor_min_pages_to_scan", "4294967297", {}).ok());
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_mode", "scan-time", {}).ok());
  EXPECT_EQ(knobs.advisor_mode, AdvisorMode::kScanTime);
  EXPECT_EQ(knobs.pages_to_scan, 1u);
  EXPECT_EQ(FormatKnob(knobs, {}, "advisor_mode"), "none [scan-time]\n");
  // While the advisor runs, pages_to_scan refuses every non-empty write.
  EXPECT_EQ(WriteKnob(&knobs, "pages_to_scan", "100", {}).code(), EINVAL);
  EXPECT_EQ(WriteKnob(&knobs, "pages_to_scan", "abc", {}).code(), EINVAL);
  EXPECT_TRUE(WriteKnob(&knobs, "pages_to_scan", "", {}).ok());
  // Same mode again: no reset; a new minimum is not applied until re-entry.
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_mode", "scan-time\n", {}).ok());
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_min_pages_to_scan", "600", {}).ok());
  EXPECT_EQ(knobs.pages_to_scan, 1u);
  // Leaving the advisor restores the kernel default, not the old value.
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_mode", "none", {}).ok());
  EXPECT_EQ(knobs.pages_to_scan, 100u);
  EXPECT_TRUE(WriteKnob(&knobs, "pages_to_scan", "100", {}).ok());
}

TEST(WriteKnobTest, AdvisorModeRejectsNearMisses) {
  for (std::string_view bad :
       {"scan-time "sv, "Scan-time"sv, "none\n\n"sv, "none\r"sv, " none"sv,
        "scan"sv, "0"sv, "\n"sv}) {
    Knobs knobs;
    EXPECT_EQ(WriteKnob(&knobs, "advisor_mode", bad, {}).code(), EINVAL) << bad;
    EXPECT_EQ(knobs.advisor_mode, AdvisorMode::kNone);
  }
  Knobs knobs;
  EXPECT_TRUE(WriteKnob(&knobs, "advisor_mode", "scan-time\0junk"sv, {}).ok());
  EXPECT_EQ(knobs.advisor_mode, AdvisorMode::kScanTime);
}

TEST(WriteKnobTest, AdvisorMaxCpuKeepsLow32Bits) {
  Knobs knobs;
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_max_cpu", "99999999999", {}).ok());
  EXPECT_EQ(FormatKnob(knobs, {}, "advisor_max_cpu"), "1215752191\n");
  ASSERT_TRUE(WriteKnob(&knobs, "advisor_max_cpu", "4294967296", {}).ok());
  EXPECT_EQ(FormatKnob(knobs, {}, "advisor_max_cpu"), "0\n");
}

TEST(KstrtoxTest, Unsigned) {
  std::uint64_t u = 0;
  EXPECT_EQ(KstrtoULL("18446744073709551615", &u), 0);
  EXPECT_EQ(u, UINT64_MAX);
  EXPECT_EQ(KstrtoULL("18446744073709551616", &u), ERANGE);
  EXPECT_EQ(KstrtoULL("99999999999999999999x", &u), ERANGE);  // before junk
  EXPECT_EQ(KstrtoULL("+7\n", &u), 0);
  EXPECT_EQ(u, 7u);
  EXPECT_EQ(KstrtoULL("++7", &u), EINVAL);
  EXPECT_EQ(KstrtoULL("", &u), EINVAL);
  EXPECT_EQ(KstrtoULL("\n", &u), EINVAL);
  EXPECT_EQ(KstrtoULL("0x10", &u), EINVAL);
  EXPECT_EQ(KstrtoULL("12\0"
                      "34"sv,
                      &u),
            0);
  EXPECT_EQ(u, 12u);
  std::uint32_t v = 0;
  EXPECT_EQ(KstrtoUInt("4294967295", &v), 0);
  EXPECT_EQ(v, UINT32_MAX);
  EXPECT_EQ(KstrtoUInt("4294967296", &v), ERANGE);
}

TEST(KstrtoxTest, Signed) {
  std::int32_t v = 0;
  EXPECT_EQ(KstrtoInt("-2147483648", &v), 0);
  EXPECT_EQ(v, INT32_MIN);
  EXPECT_EQ(KstrtoInt("2147483647\n", &v), 0);
  EXPECT_EQ(v, INT32_MAX);
  EXPECT_EQ(KstrtoInt("2147483648", &v), ERANGE);
  EXPECT_EQ(KstrtoInt("-2147483649", &v), ERANGE);
  EXPECT_EQ(KstrtoInt("-0", &v), 0);
  EXPECT_EQ(v, 0);
  EXPECT_EQ(KstrtoInt("+5", &v), 0);
  EXPECT_EQ(v, 5);
  EXPECT_EQ(KstrtoInt("-+5", &v), EINVAL);
  EXPECT_EQ(KstrtoInt("--5", &v), EINVAL);
  EXPECT_EQ(KstrtoInt("-", &v), EINVAL);
}

TEST(KstrtoxTest, Bool) {
  for (std::string_view t : {"y"sv, "Y"sv, "t"sv, "T"sv, "1"sv, "on"sv, "ON"sv,
                             "oN"sv, "yes"sv, "10"sv, "1 "sv}) {
    bool b = false;
    EXPECT_EQ(KstrtoBool(t, &b), 0) << t;
    EXPECT_TRUE(b) << t;
  }
  for (std::string_view f :
       {"n"sv, "N"sv, "f"sv, "F"sv, "0"sv, "of"sv, "OFF"sv, "no"sv, "0x10"sv}) {
    bool b = true;
    EXPECT_EQ(KstrtoBool(f, &b), 0) << f;
    EXPECT_FALSE(b) << f;
  }
  for (std::string_view bad :
       {""sv, "o"sv, "ox"sv, " 1"sv, "2"sv, "-1"sv, "+1"sv, "\n"sv,
        "\0"
        "1"sv}) {
    bool b = false;
    EXPECT_EQ(KstrtoBool(bad, &b), EINVAL) << bad;
  }
}

TEST(KstrtoxTest, SysfsStreq) {
  EXPECT_TRUE(SysfsStreq("none", "none"));
  EXPECT_TRUE(SysfsStreq("none", "none\n"));
  EXPECT_TRUE(SysfsStreq("none\n", "none"));
  EXPECT_FALSE(SysfsStreq("none", "none\n\n"));
  EXPECT_FALSE(SysfsStreq("none", "non"));
  EXPECT_FALSE(SysfsStreq("none", "none "));
  EXPECT_TRUE(SysfsStreq("none", "none\0x"sv));
}

TEST(FormatKnobTest, KernelDefaults) {
  // /sys/kernel/mm/ksm on a freshly booted Linux 6.18.
  const Knobs k;
  const Counters c;
  EXPECT_EQ(FormatKnob(k, c, "sleep_millisecs"), "20\n");
  EXPECT_EQ(FormatKnob(k, c, "pages_to_scan"), "100\n");
  EXPECT_EQ(FormatKnob(k, c, "run"), "0\n");
  EXPECT_EQ(FormatKnob(k, c, "merge_across_nodes"), "1\n");
  EXPECT_EQ(FormatKnob(k, c, "max_page_sharing"), "256\n");
  EXPECT_EQ(FormatKnob(k, c, "stable_node_chains_prune_millisecs"), "2000\n");
  EXPECT_EQ(FormatKnob(k, c, "use_zero_pages"), "0\n");
  EXPECT_EQ(FormatKnob(k, c, "smart_scan"), "1\n");
  EXPECT_EQ(FormatKnob(k, c, "advisor_mode"), "[none] scan-time\n");
  EXPECT_EQ(FormatKnob(k, c, "advisor_max_cpu"), "70\n");
  EXPECT_EQ(FormatKnob(k, c, "advisor_min_pages_to_scan"), "500\n");
  EXPECT_EQ(FormatKnob(k, c, "advisor_max_pages_to_scan"), "30000\n");
  EXPECT_EQ(FormatKnob(k, c, "advisor_target_scan_time"), "200\n");
  for (const char* counter : kCounters) {
    EXPECT_EQ(FormatKnob(k, c, counter), "0\n") << counter;
  }
  EXPECT_EQ(FormatKnob(k, c, "nonexistent"), "");
}

TEST(FormatKnobTest, Counters) {
  // The figures of the kernel after merging 64 pages of 4 contents:
  // 4 shared, 60 sharing, 64 rmap items, general_profit 241664.
  Counters c;
  c.pages_shared = 4;
  c.pages_sharing = 60;
  c.pages_unshared = 3;
  c.pages_volatile = 2;
  c.pages_scanned = 128;
  c.pages_skipped = 5;
  c.full_scans = 2;
  c.stable_node_chains = 6;
  c.stable_node_dups = 7;
  c.ksm_zero_pages = 8;
  c.general_profit = 241664;
  const Knobs k;
  EXPECT_EQ(FormatKnob(k, c, "pages_shared"), "4\n");
  EXPECT_EQ(FormatKnob(k, c, "pages_sharing"), "60\n");
  EXPECT_EQ(FormatKnob(k, c, "pages_unshared"), "3\n");
  EXPECT_EQ(FormatKnob(k, c, "pages_volatile"), "2\n");
  EXPECT_EQ(FormatKnob(k, c, "pages_scanned"), "128\n");
  EXPECT_EQ(FormatKnob(k, c, "pages_skipped"), "5\n");
  EXPECT_EQ(FormatKnob(k, c, "full_scans"), "2\n");
  EXPECT_EQ(FormatKnob(k, c, "stable_node_chains"), "6\n");
  EXPECT_EQ(FormatKnob(k, c, "stable_node_dups"), "7\n");
  EXPECT_EQ(FormatKnob(k, c, "ksm_zero_pages"), "8\n");
  EXPECT_EQ(FormatKnob(k, c, "general_profit"), "241664\n");
  // general_profit is signed: tracking costs memory before merging saves any.
  c.general_profit = -4096;
  EXPECT_EQ(FormatKnob(k, c, "general_profit"), "-4096\n");
  // pages_volatile is never shown negative.
  c.pages_volatile = static_cast<std::uint64_t>(-3);
  EXPECT_EQ(FormatKnob(k, c, "pages_volatile"), "0\n");
}

TEST(FormatKsmStatTest, ExactLinux618Format) {
  SpaceStat s;
  EXPECT_EQ(FormatKsmStat(s),
            "ksm_rmap_items 0\n"
            "ksm_zero_pages 0\n"
            "ksm_merging_pages 0\n"
            "ksm_process_profit 0\n"
            "ksm_merge_any: no\n"
            "ksm_mergeable: no\n");
  // A process of the kernel after merging 64 pages (measured).
  s.rmap_items = 64;
  s.merging_pages = 64;
  s.process_profit = 258048;
  s.mergeable = true;
  EXPECT_EQ(FormatKsmStat(s),
            "ksm_rmap_items 64\n"
            "ksm_zero_pages 0\n"
            "ksm_merging_pages 64\n"
            "ksm_process_profit 258048\n"
            "ksm_merge_any: no\n"
            "ksm_mergeable: yes\n");
  s.merge_any = true;
  s.zero_pages = 3;
  s.process_profit = -4096;
  EXPECT_NE(FormatKsmStat(s).find("ksm_zero_pages 3\n"), std::string::npos);
  EXPECT_NE(FormatKsmStat(s).find("ksm_process_profit -4096\n"),
            std::string::npos);
  EXPECT_NE(FormatKsmStat(s).find("ksm_merge_any: yes\n"), std::string::npos);
}

TEST(FormatKsmStatTest, MergingPages) {
  EXPECT_EQ(FormatMergingPages(0), "0\n");
  SpaceStat s;
  s.merging_pages = 64;
  EXPECT_EQ(FormatMergingPages(s), "64\n");
}

}  // namespace
}  // namespace samepage
