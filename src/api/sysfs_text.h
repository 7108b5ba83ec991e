// The text side of /sys/kernel/mm/ksm and /proc/<pid>/ksm_*: parsing what a
// program writes into a knob and formatting what it reads back, exactly as
// Linux 6.x does it (mm/ksm.c *_show/*_store, lib/kstrtox.c, fs/proc/base.c).
//
// Pure functions over plain values (core/knobs.h): no Linux calls, no engine.
// The engine holds the Knobs and Counters and calls these under its own lock;
// it compares the Knobs before and after a successful WriteKnob to act on the
// change (run 1 starts the scanner, run 2 unmerges everything, an advisor_mode
// change resets the advisor).
//
// Every rule here was checked against the real files on Linux 6.18 (root,
// x86-64); sysfs_text.cc keeps the table of inputs and errno values.
//
// Thread safety: all functions are reentrant; callers serialise access to the
// Knobs they pass in.

#ifndef SAMEPAGE_API_SYSFS_TEXT_H_
#define SAMEPAGE_API_SYSFS_TEXT_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "core/knobs.h"
#include "samepage/status.h"

namespace samepage {

// The files of /sys/kernel/mm/ksm in the kernel's order (ksm_attrs[] in
// mm/ksm.c, with CONFIG_NUMA so merge_across_nodes exists).
std::span<const std::string_view> KsmFileNames();
// True for any name in KsmFileNames().
bool IsKsmFile(std::string_view name);
// True for the writable (0644) files; the others are 0444 counters.
bool IsWritableKnob(std::string_view name);

// The most bytes one write() to a sysfs file delivers to its store function:
// kernfs hands over at most PAGE_SIZE bytes and write() returns that count.
inline constexpr std::size_t kSysfsWriteMax = 4096;

// What WriteKnob needs to know about the merging state.
struct KnobContext {
  // Merged pages kept now (stable nodes still mapped). While nonzero, changing
  // max_page_sharing or merge_across_nodes fails with EBUSY.
  std::uint64_t pages_shared = 0;
};

// Applies one write(2) of `text` to the file `name`, as the kernel would:
//  - ENOENT: no such file; EACCES: a read-only counter (open fails, even for
//    root);
//  - only the first kSysfsWriteMax bytes count, and the text ends at the first
//    NUL byte; an empty write succeeds and changes nothing;
//  - numbers are decimal with an optional leading '+' and one optional
//    trailing '\n' (kstrtouint/kstrtoul/kstrtoint base 10): no spaces, no
//    "0x"; "007" is 7;
//  - errno per knob: EINVAL for a bad value or out-of-range number, except
//    max_page_sharing and merge_across_nodes, which return ERANGE for a
//    number too big for their type; EBUSY for changing max_page_sharing or
//    merge_across_nodes while ctx.pages_shared != 0; EINVAL for any write to
//    pages_to_scan while advisor_mode is scan-time.
// Side effects the kernel has too: a change of advisor_mode sets
// pages_to_scan (100 for none, advisor_min_pages_to_scan for scan-time);
// advisor_max_cpu keeps only the low 32 bits of the number written.
// On error *knobs is unchanged.
Status WriteKnob(Knobs* knobs, std::string_view name, std::string_view text,
                 const KnobContext& ctx);

// The text a read of file `name` returns, ending in '\n'; "" if there is no
// such file.
std::string FormatKnob(const Knobs& knobs, const Counters& counters,
                       std::string_view name);

// /proc/<pid>/ksm_stat as Linux 6.18 prints it (six lines, this order).
std::string FormatKsmStat(const SpaceStat& stat);
// /proc/<pid>/ksm_merging_pages: one number and '\n'.
std::string FormatMergingPages(std::uint64_t merging_pages);
std::string FormatMergingPages(const SpaceStat& stat);

// lib/kstrtox.c parsers, base 10, over the text up to its first NUL. Each
// returns 0 or the kernel's errno (EINVAL malformed, ERANGE overflow).
int KstrtoULL(std::string_view text, std::uint64_t* value);
int KstrtoUInt(std::string_view text, std::uint32_t* value);
int KstrtoInt(std::string_view text, std::int32_t* value);
// kstrtobool: looks only at the first one or two characters: y Y t T 1 and
// "on" are true; n N f F 0 and "of" are false (case-insensitive o/n/f).
int KstrtoBool(std::string_view text, bool* value);
// sysfs_streq: equal, or equal but for one trailing '\n' on either side.
bool SysfsStreq(std::string_view a, std::string_view b);

}  // namespace samepage

#endif  // SAMEPAGE_API_SYSFS_TEXT_H_
