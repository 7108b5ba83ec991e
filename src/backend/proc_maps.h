// Reading the process's own memory map from /proc/self/maps (or smaps).
//
// Owns: parsing of the maps/smaps text format and the classification of one
// mapping (private anonymous, special, ...). Touches nothing but the file it
// is told to read; the path is injectable so tests can feed fixed text and
// exercise the error paths.
//
// Thread safety: free functions, no shared state.

#ifndef SAMEPAGE_BACKEND_PROC_MAPS_H_
#define SAMEPAGE_BACKEND_PROC_MAPS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/memory.h"
#include "samepage/status.h"

namespace samepage::backend {

// One line of /proc/<pid>/maps, plus its VmFlags when read from smaps.
struct MapEntry {
  Addr start = 0;
  Addr end = 0;
  bool read = false;
  bool write = false;
  bool exec = false;
  bool shared = false;  // 's' in the perms column (MAP_SHARED)
  std::uint64_t offset = 0;
  std::uint32_t dev_major = 0;
  std::uint32_t dev_minor = 0;
  std::uint64_t inode = 0;
  std::string path;      // "" for anonymous, "[heap]", "/memfd:x (deleted)"...
  std::string vm_flags;  // smaps only: "rd wr mr mw me ac", else ""
  bool has_vm_flags = false;
  // Read from maps where smaps was needed to know its VmFlags: must be
  // treated as if it had every flag that forbids merging.
  bool flags_unknown = false;
  // Its flags await a read of smaps that was put off (LinuxMemory::
  // ReadView): left alone meanwhile, as memory excluded from merging.
  bool flags_deferred = false;

  std::size_t size() const { return end - start; }
  bool HasVmFlag(std::string_view flag) const;
};

// Parses maps or smaps text. Lines that are not mapping headers (the smaps
// "Key: value" lines) are skipped except VmFlags and ProtectionKey (a key
// other than 0 adds "pk" to the VmFlags). EINVAL on malformed header.
[[nodiscard]] Status ParseMaps(std::string_view text,
                               std::vector<MapEntry>* entries);

// Reads a whole procfs file (they report size 0, so read until EOF).
[[nodiscard]] Status ReadProcFile(const std::string& path, std::string* text);

// ReadProcFile + ParseMaps.
[[nodiscard]] Status ReadMaps(const std::string& path,
                              std::vector<MapEntry>* entries);

// Counts mappings (header lines) in a maps file; -1 on error.
long CountMappings(const std::string& path);

// [vdso], [vvar], [vvar_vclock], [vsyscall], [uprobes] and other
// kernel-provided mappings that madvise(MADV_MERGEABLE) ignores.
bool IsSpecialMapping(const MapEntry& e);

// Private anonymous memory in the kernel's sense ("[heap]", "[stack]",
// "[anon:name]" and nameless mappings), whatever its protection.
bool IsPrivateAnonymous(const MapEntry& e);

// VmFlags (smaps) that mean we must not replace the mapping, because the
// replacement would lose the property: MADV_WIPEONFORK (wf), hugetlb (ht),
// I/O or PFN maps (io, pf), sealed (sl), droppable (dp), registered with the
// application's userfaultfd (uw, um, ui), a memory protection key other
// than 0 (pk: not a kernel flag, ParseMaps adds it for smaps' ProtectionKey
// line).
// mlock (lo, lf), MADV_DONTFORK (dc) and MADV_DONTDUMP (dd) are not here:
// LinuxMemory applies them again to every mapping it puts in place (QEMU
// marks guest RAM DONTFORK; kernel KSM merges locked memory too).
// `uffd_wp_is_ours`: the VMA's userfaultfd write-protect registration (uw)
// is our own, not the application's.
bool HasUnmergeableVmFlags(const MapEntry& e, bool uffd_wp_is_ours = false);

// The VmFlags text reduced to the flags samepage reads (those above, lo, lf,
// dc, dd), in their order; without uw if `drop_uw`. Mappings that differ only
// in flags samepage does not read (ac / nr of an anonymous page and of a
// frame mapping) get the same text, so the saved flags form few runs.
std::string FlagsReadBySamepage(std::string_view vm_flags, bool drop_uw);

// Of flags that FlagsReadBySamepage kept, those a forked child's copy of
// the mapping still has (not the locks).
std::string FlagsInAForkedChild(std::string_view vm_flags);

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_PROC_MAPS_H_
