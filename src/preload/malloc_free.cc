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
//
// Blocks from the heap or an arena: a free that leaves 64 KiB or more of
// free memory in one piece (glibc's FASTBIN_CONSOLIDATION_THRESHOLD) may
// trim, the main heap with an internal brk, an arena with an internal
// madvise(MADV_DONTNEED) or munmap. Trimmed, then grown again at the same
// addresses by the next malloc, heap memory under a merge window was
// replaced by the frame (calloc returned the old block's bytes: tests/
// preload/heap_trim_test.c, most runs of 4 s). Such frees and reallocs,
// malloc_trim and the aligned allocations (which free the room around the
// block) run outside merge windows (Engine::OutsideWindows); the engines
// need not know more, since a window checks the pages it replaces. At
// thread exit glibc frees the thread's malloc cache with internal calls,
// which may trim too: a thread that ever freed keeps windows closed from
// its thread-specific data destructors until it is gone
// (Engine::ThreadExiting).

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <type_traits>

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

// A thread that has freed holds blocks in its malloc cache (tcache), which
// glibc frees at thread exit with internal calls (tcache_thread_shutdown
// calls __libc_free) that may trim the heap: the thread's first free sets
// this key, whose destructor runs before that (start_thread runs the
// thread-specific data destructors first) and keeps merge windows closed
// until the thread is gone (Engine::ThreadExiting).
pthread_key_t g_exit_key;
std::atomic<bool> g_exit_key_made{false};
__thread bool t_exit_key_set __attribute__((tls_model("initial-exec"))) = false;

void ThreadExits(void*) {
  // The main thread's pthread_exit leaves the process running with its
  // tid still in use (the group leader stays until the last thread): not
  // waited for. Nor anything once samepage stepped aside (a seccomp filter
  // may refuse the calls this makes).
  if (Retired() || !MaybeAdvised(nullptr, SIZE_MAX) || gettid() == getpid())
    return;
  Inside inside;
  samepage::Engine::ThreadExiting();
}

// On a thread's first free once the key is made (cheap after: one
// thread-local load).
void NoteFreeingThread() {
  if (!g_exit_key_made.load(std::memory_order_acquire)) return;
  t_exit_key_set = true;
  // A key below PTHREAD_KEY_2NDLEVEL_SIZE (32, as made at start) takes no
  // allocation to set.
  (void)pthread_setspecific(g_exit_key, reinterpret_cast<void*>(1));
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

// Whether free(mem), or a realloc that frees it, may trim memory: the
// block and its neighbours (a free one before it, whatever follows it:
// the top chunk, a free chunk, a block in use) reach glibc's 64 KiB
// consolidation threshold, past which free trims the heap or arena. An
// over-estimate is harmless (the free waits for a window), a miss is not.
// A header that is not a sane chunk's is left to glibc to report. *from:
// the lowest address a trim could reach (the top chunk lies above).
bool MayTrim(void* mem, const void** from) {
  constexpr size_t kConsolidation = 64 * 1024;
  constexpr size_t kPrevInUse = 1;
  const size_t* header = static_cast<const size_t*>(mem);
  const size_t size = header[-1] & ~static_cast<size_t>(7);
  if (size < 4 * sizeof(size_t) || size % (2 * sizeof(size_t)) != 0 ||
      reinterpret_cast<uintptr_t>(mem) > UINTPTR_MAX - size) {
    return false;
  }
  size_t total = size;
  size_t before = 2 * sizeof(size_t);  // the chunk's header
  if (!(header[-1] & kPrevInUse)) {
    total += header[-2];
    before += header[-2];
  }
  if (before > reinterpret_cast<uintptr_t>(mem)) return false;
  *from = static_cast<const char*>(mem) - before;
  if (total >= kConsolidation) return true;
  // The next chunk's size word: the last word of this chunk's span.
  const size_t next =
      *reinterpret_cast<const size_t*>(static_cast<const char*>(mem) + size -
                                       sizeof(size_t)) &
      ~static_cast<size_t>(7);
  return total + next >= kConsolidation;
}

// Whether free(mem) or realloc(mem, ...) from `caller` must run outside
// merge windows: it may trim memory samepage may be merging.
bool TrimMayMeetWindows(void* mem, const void* caller) {
  const void* from = nullptr;
  return MaybeAdvised(nullptr, SIZE_MAX) && MayTrim(mem, &from) &&
         MaybeAdvised(from, SIZE_MAX) && !Bypass(caller);
}

bool RunFree(void* mem) {
  __libc_free(mem);
  return true;
}

struct ReallocCall {
  void* old;
  size_t size;
  void* result;
};

bool RunRealloc(void* arg) {
  auto* c = static_cast<ReallocCall*>(arg);
  c->result = __libc_realloc(c->old, c->size);
  return c->result != nullptr || c->size == 0;
}

// The next posix_memalign, aligned_alloc, memalign, valloc and pvalloc.
std::atomic<int (*)(void**, size_t, size_t)> g_next_posix_memalign{nullptr};
std::atomic<void* (*)(size_t, size_t)> g_next_aligned_alloc{nullptr};
std::atomic<void* (*)(size_t, size_t)> g_next_memalign{nullptr};
std::atomic<void* (*)(size_t)> g_next_valloc{nullptr};
std::atomic<void* (*)(size_t)> g_next_pvalloc{nullptr};

// Runs call() outside merge windows where glibc's malloc may trim memory
// samepage may merge: glibc gives back the room before and after an
// aligned block with an internal free, which may trim as free does.
template <typename Call>
void MayTrimInside(const void* caller, Call&& call) {
  if (!GlibcAllocator() || !MaybeAdvised(nullptr, SIZE_MAX) || Bypass(caller)) {
    call();
    return;
  }
  Inside inside;
  (void)samepage::Engine::OutsideWindows(
      [](void* arg) {
        (*static_cast<std::remove_reference_t<Call>*>(arg))();
        return true;
      },
      &call);
}

// aligned_alloc, memalign, valloc and pvalloc: the next one, run by
// MayTrimInside.
template <typename... A>
void* Allocate(std::atomic<void* (*)(A...)>* slot, const char* name,
               const void* caller, A... args) {
  auto next = Next(slot, name);
  if (next == nullptr) {
    errno = ENOMEM;
    return nullptr;
  }
  void* r = nullptr;
  MayTrimInside(caller, [&] { r = next(args...); });
  return r;
}

}  // namespace

void ResolveNextAllocator() {
  (void)Next(&g_next_free, "free");
  (void)Next(&g_next_realloc, "realloc");
  (void)Next(&g_next_posix_memalign, "posix_memalign");
  (void)Next(&g_next_aligned_alloc, "aligned_alloc");
  (void)Next(&g_next_memalign, "memalign");
  (void)Next(&g_next_valloc, "valloc");
  (void)Next(&g_next_pvalloc, "pvalloc");
}

void NoteAllocator(bool glibc) {
  g_glibc_allocator.store(glibc ? 1 : 0, std::memory_order_relaxed);
  if (glibc && pthread_key_create(&g_exit_key, ThreadExits) == 0)
    g_exit_key_made.store(true, std::memory_order_release);
}

}  // namespace samepage::preload

using namespace samepage::preload;

SAMEPAGE_EXPORT void free(void* p) noexcept {
  if (p == nullptr) return;
  if (!GlibcAllocator()) {
    if (auto next = Next(&g_next_free, "free")) next(p);
    return;
  }
  if (!t_exit_key_set) NoteFreeingThread();
  void* map = nullptr;
  size_t len = 0;
  // Bypass last: it may ask libsamepage (ThreadInsideEngine), and most
  // blocks are not mapped ones.
  if (!MmappedBlock(p, &map, &len)) {
    if (TrimMayMeetWindows(p, __builtin_return_address(0))) {
      Inside inside;
      (void)samepage::Engine::OutsideWindows(RunFree, p);
    } else {
      __libc_free(p);
    }
    return;
  }
  if (!MaybeAdvised(map, len) || Bypass(__builtin_return_address(0))) {
    __libc_free(p);
    return;
  }
  Inside inside;
  (void)samepage::Engine::ChangeMapping(
      map, len, samepage::Engine::MappingChange::kUnmap, RunFree, p);
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
  if (p == nullptr) return __libc_realloc(p, size);
  if (!MmappedBlock(p, &map, &len)) {
    // Shrunk, the rest is freed; moved, the old block is: either may trim.
    if (!TrimMayMeetWindows(p, __builtin_return_address(0)))
      return __libc_realloc(p, size);
    ReallocCall c{p, size, nullptr};
    Inside inside;
    (void)samepage::Engine::OutsideWindows(RunRealloc, &c);
    return c.result;
  }
  if (!MaybeAdvised(map, len) || Bypass(__builtin_return_address(0))) {
    return __libc_realloc(p, size);
  }
  // kMove: unmerged and unadvised first (the block may stay in place, or be
  // moved or copied); merge-any finds it again at its new address.
  ReallocCall c{p, size, nullptr};
  Inside inside;
  (void)samepage::Engine::ChangeMapping(
      map, len, samepage::Engine::MappingChange::kMove, RunRealloc, &c);
  return c.result;
}

// malloc_trim trims the heap and every arena (brk, madvise MADV_DONTNEED).
SAMEPAGE_EXPORT int malloc_trim(size_t pad) noexcept {
  static std::atomic<int (*)(size_t)> next_trim{nullptr};
  auto next = Next(&next_trim, "malloc_trim");
  if (next == nullptr) return 0;
  int r = 0;
  MayTrimInside(__builtin_return_address(0), [&] { r = next(pad); });
  return r;
}

SAMEPAGE_EXPORT int posix_memalign(void** out, size_t align,
                                   size_t size) noexcept {
  auto next = Next(&g_next_posix_memalign, "posix_memalign");
  if (next == nullptr) return ENOMEM;
  int r = ENOMEM;
  MayTrimInside(__builtin_return_address(0),
                [&] { r = next(out, align, size); });
  return r;
}

SAMEPAGE_EXPORT void* aligned_alloc(size_t align, size_t size) noexcept {
  return Allocate(&g_next_aligned_alloc, "aligned_alloc",
                  __builtin_return_address(0), align, size);
}

SAMEPAGE_EXPORT void* memalign(size_t align, size_t size) noexcept {
  return Allocate(&g_next_memalign, "memalign", __builtin_return_address(0),
                  align, size);
}

SAMEPAGE_EXPORT void* valloc(size_t size) noexcept {
  return Allocate(&g_next_valloc, "valloc", __builtin_return_address(0), size);
}

SAMEPAGE_EXPORT void* pvalloc(size_t size) noexcept {
  return Allocate(&g_next_pvalloc, "pvalloc", __builtin_return_address(0),
                  size);
}
