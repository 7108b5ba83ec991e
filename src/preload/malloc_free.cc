// free and realloc of glibc's mmapped blocks, held back during merge windows.
//
// glibc's free() unmaps a block it got from mmap with an internal munmap,
// and realloc() moves one with an internal mremap: the munmap/mremap
// interposers (mappings.cc) never see them. Under merge-any such a block is
// merged like any memory; freed and allocated again at the same address
// while the scanner is inside a merge window over it, the new block's page
// was replaced by a frame holding the old content (tests/preload/
// malloc_test.c lost a write in about one run in ten). Here free and
// realloc of a block that glibc mapped for itself go through
// Engine::ChangeMapping like a public munmap/mremap: they never run while a
// window is open over the block, and the engine forgets (free) or unmerges
// (realloc) it first.
//
// Only when glibc's malloc is the program's allocator (another allocator's
// pointers have no glibc chunk header): then everything else goes straight
// to glibc's free/realloc at the cost of two comparisons. Which allocator
// it is comes from the loaded objects (real.cc, OtherAllocatorsMalloc), not
// from &malloc: in a non-PIE executable (Debian's python3) that is the
// program's PLT slot, and glibc's own malloc was taken for another one.
// Arena memory (small blocks) is not covered: glibc trims arenas with an
// internal madvise(MADV_DONTNEED) (docs/limitations.md item 5).

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

#include <atomic>

#include "preload/real.h"
#include "samepage/engine.h"

#define SAMEPAGE_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" void __libc_free(void* p);
extern "C" void* __libc_realloc(void* p, size_t size);

namespace samepage::preload {
namespace {

// 1 where glibc's malloc is the program's allocator, 0 where another
// library's is (NoteAllocator, from the preload's constructor); -1 before,
// when free and realloc go to the next definition, whichever it is.
std::atomic<int> g_glibc_allocator{-1};
// The next free and realloc (another allocator's, or glibc's), resolved by
// ResolveNextAllocator before anything in the constructor can free.
std::atomic<void (*)(void*)> g_next_free{nullptr};
std::atomic<void* (*)(void*, size_t)> g_next_realloc{nullptr};
// dlsym may free (its error state): a free that arrives while this thread
// resolves is dropped (leaked) rather than recursing into dlsym.
__thread bool t_resolving __attribute__((tls_model("initial-exec"))) = false;

template <typename F>
F Next(std::atomic<F>* slot, const char* name) {
  F f = slot->load(std::memory_order_acquire);
  if (f != nullptr || t_resolving) return f;
  t_resolving = true;
  f = reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
  t_resolving = false;
  if (f != nullptr) slot->store(f, std::memory_order_release);
  return f;
}

bool GlibcAllocator() {
  return g_glibc_allocator.load(std::memory_order_relaxed) == 1;
}

// glibc's chunk header (malloc/malloc.c): the word before the user pointer
// is the chunk size with IS_MMAPPED = 0x2; for an mmapped chunk the word
// before that is the chunk's offset from the start of its mapping.
bool MmappedBlock(void* mem, void** map, size_t* len) {
  const size_t* header = static_cast<const size_t*>(mem);
  const size_t size = header[-1];
  if (!(size & 2)) return false;
  const size_t offset = header[-2];
  *map = static_cast<char*>(mem) - 2 * sizeof(size_t) - offset;
  *len = offset + (size & ~static_cast<size_t>(7));
  return true;
}

struct ReallocCall {
  void* old;
  size_t size;
  void* result;
};

}  // namespace

void ResolveNextAllocator() {
  (void)Next(&g_next_free, "free");
  (void)Next(&g_next_realloc, "realloc");
}

void NoteAllocator(bool glibc) {
  g_glibc_allocator.store(glibc ? 1 : 0, std::memory_order_relaxed);
}

}  // namespace samepage::preload

using namespace samepage::preload;

SAMEPAGE_EXPORT void free(void* p) noexcept {
  if (p == nullptr) return;
  if (!GlibcAllocator()) {
    if (auto next = Next(&g_next_free, "free")) next(p);
    return;
  }
  void* map = nullptr;
  size_t len = 0;
  // Bypass last: it may ask libsamepage (ThreadInsideEngine), and most
  // blocks are not mapped ones.
  if (!MmappedBlock(p, &map, &len) || !MaybeAdvised(map, len) ||
      Bypass(__builtin_return_address(0))) {
    __libc_free(p);
    return;
  }
  Inside inside;
  (void)samepage::Engine::ChangeMapping(
      map, len, samepage::Engine::MappingChange::kUnmap,
      [](void* arg) {
        __libc_free(arg);
        return true;
      },
      p);
}

SAMEPAGE_EXPORT void* realloc(void* p, size_t size) noexcept {
  if (!GlibcAllocator()) {
    auto next = Next(&g_next_realloc, "realloc");
    if (next != nullptr) return next(p, size);
    errno = ENOMEM;
    return nullptr;
  }
  void* map = nullptr;
  size_t len = 0;
  if (p == nullptr || !MmappedBlock(p, &map, &len) || !MaybeAdvised(map, len) ||
      Bypass(__builtin_return_address(0))) {
    return __libc_realloc(p, size);
  }
  // kMove: unmerged and unadvised first (the block may stay in place, or be
  // moved or copied); merge-any finds it again at its new address.
  ReallocCall c{p, size, nullptr};
  Inside inside;
  (void)samepage::Engine::ChangeMapping(
      map, len, samepage::Engine::MappingChange::kMove,
      [](void* arg) {
        auto* c = static_cast<ReallocCall*>(arg);
        c->result = __libc_realloc(c->old, c->size);
        return c->result != nullptr || c->size == 0;
      },
      &c);
  return c.result;
}
