#include "backend/own_memory.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>

namespace samepage::backend {
namespace {

constexpr int kMaxObjects = 4;
std::atomic<const void*> g_objects[kMaxObjects];

using Segments = std::vector<std::pair<std::uintptr_t, std::uintptr_t>>;

// Appends the writable segments of the object holding `addr`, unless it
// is the main program.
void AddSegmentsOf(const void* addr, Segments* out) {
  LoadSegment segments[16];
  const int n = LoadSegmentsOf(addr, segments, 16);
  for (int k = 0; k < n && k < 16; ++k) {
    if (segments[k].flags & PF_W)
      out->emplace_back(segments[k].start, segments[k].end);
  }
}

// Up to `max` PT_LOAD segments of the object `i` into out[]; returns how
// many there are.
int CopyLoadSegments(const struct dl_phdr_info* i, LoadSegment* out, int max) {
  int found = 0;
  for (int k = 0; k < i->dlpi_phnum; ++k) {
    const ElfW(Phdr)& ph = i->dlpi_phdr[k];
    if (ph.p_type != PT_LOAD) continue;
    if (found < max) {
      const std::uintptr_t a = i->dlpi_addr + ph.p_vaddr;
      out[found] = LoadSegment{a, a + ph.p_memsz, ph.p_flags};
    }
    ++found;
  }
  return found;
}
}  // namespace

int MainProgramSegments(LoadSegment* out, int max) {
  struct Query {
    LoadSegment* out;
    int max;
    int found;
  } q{out, max, 0};
  // The main program comes first.
  dl_iterate_phdr(
      [](struct dl_phdr_info* i, size_t, void* data) -> int {
        auto* q = static_cast<Query*>(data);
        q->found = CopyLoadSegments(i, q->out, q->max);
        return 1;
      },
      &q);
  return q.found;
}

int LoadSegmentsOf(const void* addr, LoadSegment* out, int max) {
  Dl_info info;
  if (addr == nullptr || dladdr(addr, &info) == 0) return 0;
  struct Query {
    std::uintptr_t base;
    LoadSegment* out;
    int max;
    int found;
  } q{reinterpret_cast<std::uintptr_t>(info.dli_fbase), out, max, 0};
  dl_iterate_phdr(
      [](struct dl_phdr_info* i, size_t, void* data) -> int {
        auto* q = static_cast<Query*>(data);
        bool mine = false;
        for (int k = 0; k < i->dlpi_phnum; ++k) {
          const ElfW(Phdr)& ph = i->dlpi_phdr[k];
          if (ph.p_type != PT_LOAD) continue;
          const std::uintptr_t a = i->dlpi_addr + ph.p_vaddr;
          if (a <= q->base && q->base < a + ph.p_memsz) mine = true;
        }
        if (!mine && i->dlpi_addr != q->base) return 0;
        // The main program is listed with an empty name.
        if (i->dlpi_name == nullptr || i->dlpi_name[0] == '\0') {
          q->found = -1;
          return 1;
        }
        q->found = CopyLoadSegments(i, q->out, q->max);
        return 1;
      },
      &q);
  return q.found;
}

void KeepObjectOut(const void* addr) {
  for (auto& slot : g_objects) {
    const void* empty = nullptr;
    if (slot.compare_exchange_strong(empty, addr) || empty == addr) return;
  }
}

Segments OwnWritableSegments(const void* addr) {
  Segments out;
  AddSegmentsOf(addr, &out);
  for (const auto& slot : g_objects) {
    if (const void* a = slot.load()) AddSegmentsOf(a, &out);
  }
  return out;
}

}  // namespace samepage::backend
