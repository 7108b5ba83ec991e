#include "backend/proc_maps.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <memory>

#include "backend/own_fds.h"
#include "backend/proc_fs.h"

namespace samepage::backend {
namespace {

bool IsHex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
         (c >= 'A' && c <= 'F');
}

// Parses a hex number at s[*pos], advancing *pos. False if none.
bool ParseHex(std::string_view s, std::size_t* pos, std::uint64_t* value) {
  std::size_t p = *pos;
  const char* begin = s.data() + p;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(begin, end, *value, 16);
  if (ec != std::errc() || ptr == begin) return false;
  *pos = p + static_cast<std::size_t>(ptr - begin);
  return true;
}

bool ParseDec(std::string_view s, std::size_t* pos, std::uint64_t* value) {
  const char* begin = s.data() + *pos;
  auto [ptr, ec] = std::from_chars(begin, s.data() + s.size(), *value, 10);
  if (ec != std::errc() || ptr == begin) return false;
  *pos += static_cast<std::size_t>(ptr - begin);
  return true;
}

bool Expect(std::string_view s, std::size_t* pos, char c) {
  if (*pos >= s.size() || s[*pos] != c) return false;
  ++*pos;
  return true;
}

void SkipSpaces(std::string_view s, std::size_t* pos) {
  while (*pos < s.size() && s[*pos] == ' ') ++*pos;
}

// A mapping header starts "hex-hex ".
bool LooksLikeHeader(std::string_view line) {
  std::size_t i = 0;
  while (i < line.size() && IsHex(line[i])) ++i;
  return i > 0 && i < line.size() && line[i] == '-';
}

bool ParseHeader(std::string_view line, MapEntry* e) {
  std::size_t pos = 0;
  std::uint64_t v = 0;
  if (!ParseHex(line, &pos, &v)) return false;
  e->start = v;
  if (!Expect(line, &pos, '-') || !ParseHex(line, &pos, &v)) return false;
  e->end = v;
  if (e->end < e->start) return false;
  if (!Expect(line, &pos, ' ') || pos + 4 > line.size()) return false;
  std::string_view perms = line.substr(pos, 4);
  e->read = perms[0] == 'r';
  e->write = perms[1] == 'w';
  e->exec = perms[2] == 'x';
  if (perms[3] != 's' && perms[3] != 'p') return false;
  e->shared = perms[3] == 's';
  pos += 4;
  if (!Expect(line, &pos, ' ') || !ParseHex(line, &pos, &e->offset))
    return false;
  if (!Expect(line, &pos, ' ') || !ParseHex(line, &pos, &v)) return false;
  e->dev_major = static_cast<std::uint32_t>(v);
  if (!Expect(line, &pos, ':') || !ParseHex(line, &pos, &v)) return false;
  e->dev_minor = static_cast<std::uint32_t>(v);
  if (!Expect(line, &pos, ' ') || !ParseDec(line, &pos, &e->inode))
    return false;
  SkipSpaces(line, &pos);
  e->path.assign(line.substr(pos));
  return true;
}

}  // namespace

bool MapEntry::HasVmFlag(std::string_view flag) const {
  std::size_t pos = 0;
  while (pos < vm_flags.size()) {
    std::size_t end = vm_flags.find(' ', pos);
    if (end == std::string::npos) end = vm_flags.size();
    if (std::string_view(vm_flags).substr(pos, end - pos) == flag) return true;
    pos = end + 1;
  }
  return false;
}

Status ParseMaps(std::string_view text, std::vector<MapEntry>* entries) {
  entries->clear();
  std::size_t pos = 0;
  int line_no = 0;
  std::uint64_t protection_key = 0;  // of the last header's mapping
  while (pos < text.size()) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) continue;
    if (LooksLikeHeader(line)) {
      MapEntry e;
      if (!ParseHeader(line, &e)) {
        return Status::Error(EINVAL, "maps: malformed line " +
                                         std::to_string(line_no) + ": " +
                                         std::string(line));
      }
      entries->push_back(std::move(e));
      protection_key = 0;
    } else if (line.starts_with("VmFlags:") && !entries->empty()) {
      std::string_view flags = line.substr(8);
      while (!flags.empty() && flags.front() == ' ') flags.remove_prefix(1);
      while (!flags.empty() && flags.back() == ' ') flags.remove_suffix(1);
      entries->back().vm_flags.assign(flags);
      entries->back().has_vm_flags = true;
      if (protection_key != 0) entries->back().vm_flags += " pk";
    } else if (line.starts_with("ProtectionKey:") && !entries->empty()) {
      // Before VmFlags in smaps; "pk" stands for a key other than 0.
      std::size_t at = 14;
      SkipSpaces(line, &at);
      if (!ParseDec(line, &at, &protection_key)) protection_key = 0;
      MapEntry& last = entries->back();
      if (protection_key != 0 && last.has_vm_flags && !last.HasVmFlag("pk"))
        last.vm_flags += " pk";
    }
  }
  return Status::Ok();
}

Status ReadProcFile(const std::string& path, std::string* text) {
  text->clear();
  // Ours while open (own_fds.h): a program closing every descriptor must
  // not have us read its file at this number instead.
  int fd = AdoptOwnFd(OpenProc(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd < 0) {
    int err = errno;
    return Status::Error(err, "open(" + path + ")");
  }
  // Read into a buffer sized as the last read of this thread needed
  // (smaps with tens of thousands of mappings runs to tens of MB, and
  // growing through small reads copied it over and over), then copied
  // out. Not a string resized for the read: that zero-fills its room
  // first, and the pages of the room left unread stayed zero, so that
  // under merge-any the scanner dropped them at one scan and its next
  // read wrote them again (64 KiB dropped and faulted back at each full
  // scan of an idle process). `new char[]` leaves them untouched.
  thread_local std::size_t size_hint = 65536;
  std::size_t room = size_hint;
  std::unique_ptr<char[]> buf(new char[room]);
  std::size_t used = 0;
  for (;;) {
    if (room - used < 65536) {
      const std::size_t bigger = room + std::max<std::size_t>(room, 65536);
      std::unique_ptr<char[]> grown(new char[bigger]);
      std::memcpy(grown.get(), buf.get(), used);
      buf = std::move(grown);
      room = bigger;
    }
    // At most 1 MiB per call: sysctl files allocate a kernel buffer of the
    // requested size and fail with ENOMEM for large ones.
    ssize_t n =
        read(fd, buf.get() + used, std::min<std::size_t>(room - used, 1 << 20));
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      CloseOwnFd(fd);
      return Status::Error(err, "read(" + path + ")");
    }
    if (n == 0) break;
    used += static_cast<std::size_t>(n);
  }
  CloseOwnFd(fd);
  text->assign(buf.get(), used);
  size_hint = std::max<std::size_t>(65536, used + used / 8 + 65536);
  return Status::Ok();
}

Status ReadMaps(const std::string& path, std::vector<MapEntry>* entries) {
  std::string text;
  Status s = ReadProcFile(path, &text);
  if (!s.ok()) return s;
  return ParseMaps(text, entries);
}

long CountMappings(const std::string& path) {
  std::string text;
  if (!ReadProcFile(path, &text).ok()) return -1;
  long n = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    if (LooksLikeHeader(std::string_view(text).substr(pos, nl - pos))) ++n;
    pos = nl + 1;
  }
  return n;
}

bool IsSpecialMapping(const MapEntry& e) {
  if (e.path.empty() || e.path.front() != '[') return false;
  // Named anonymous memory (prctl PR_SET_VMA_ANON_NAME) is ordinary memory.
  if (e.path.starts_with("[anon:") || e.path.starts_with("[anon_shmem:"))
    return false;
  return e.path != "[heap]" && e.path != "[stack]";
}

bool IsPrivateAnonymous(const MapEntry& e) {
  if (e.shared || e.inode != 0) return false;
  if (e.path.empty() || e.path == "[heap]" || e.path == "[stack]") return true;
  return e.path.starts_with("[anon:");
}

namespace {
constexpr std::string_view kUnmergeableFlags[] = {"pk", "wf", "ht", "io", "pf",
                                                  "sl", "um", "ui", "dp"};
// Flags LinuxMemory applies again to the mappings it puts in place.
constexpr std::string_view kReappliedFlags[] = {"lo", "lf", "dc",
                                                "dd", "hg", "nh"};
}  // namespace

bool HasUnmergeableVmFlags(const MapEntry& e, bool uffd_wp_is_ours) {
  for (std::string_view f : kUnmergeableFlags) {
    if (e.HasVmFlag(f)) return true;
  }
  return !uffd_wp_is_ours && e.HasVmFlag("uw");
}

namespace {
// The flags of `vm_flags` (space-separated) that `keep` accepts, in order.
template <typename Keep>
std::string KeptFlags(std::string_view vm_flags, const Keep& keep) {
  std::string out;
  std::size_t pos = 0;
  while (pos < vm_flags.size()) {
    std::size_t end = vm_flags.find(' ', pos);
    if (end == std::string_view::npos) end = vm_flags.size();
    const std::string_view f = vm_flags.substr(pos, end - pos);
    if (!f.empty() && keep(f)) {
      if (!out.empty()) out += ' ';
      out += f;
    }
    pos = end + 1;
  }
  return out;
}
}  // namespace

std::string FlagsReadBySamepage(std::string_view vm_flags, bool drop_uw) {
  return KeptFlags(vm_flags, [&](std::string_view f) {
    if (f == "uw") return !drop_uw;
    return std::find(std::begin(kUnmergeableFlags), std::end(kUnmergeableFlags),
                     f) != std::end(kUnmergeableFlags) ||
           std::find(std::begin(kReappliedFlags), std::end(kReappliedFlags),
                     f) != std::end(kReappliedFlags);
  });
}

std::string FlagsInAForkedChild(std::string_view vm_flags) {
  // fork() clears VM_LOCKED and VM_LOCKONFAULT in the child, and copies no
  // MADV_DONTFORK mapping.
  return KeptFlags(vm_flags, [](std::string_view f) {
    return f != "lo" && f != "lf" && f != "dc";
  });
}

}  // namespace samepage::backend
