// samepage::Engine — the C++ API: kernel samepage merging inside one process.
//
// An Engine owns the merging state for the calling process: the ranges marked
// mergeable, the stable and unstable indexes, the frame store, and (when run
// is 1) a background scanner thread, the userspace counterpart of ksmd.
// Knobs and counters are read and written by their /sys/kernel/mm/ksm names,
// in the sysfs text format, with the kernel's error codes.
//
// Thread safety: every method may be called from any thread at any time.
// Application threads may write to mergeable memory while the engine merges
// it; no write is ever lost.

#ifndef SAMEPAGE_ENGINE_H_
#define SAMEPAGE_ENGINE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "samepage/status.h"

namespace samepage {

struct EngineOptions {
  // How pages are write-protected before their final compare.
  enum class Protection { kAuto, kUserfaultfd, kMprotect };
  Protection protection = Protection::kAuto;
  // Mappings the engine may create; 0 means derive from
  // /proc/sys/vm/max_map_count minus what the process already uses and a
  // safety margin. Tests set a small value to exhaust it on purpose.
  std::size_t vma_budget = 0;
};

// samepage's own figures, beyond the kernel's counters.
struct EngineStats {
  std::string protection;           // "userfaultfd" or "mprotect"
  bool kernel_faults_wait = false;  // a system call or the kernel writing
                                    // into a page under a merge window
                                    // waits for it (userfaultfd for all
                                    // faults); else it fails (EFAULT)
  std::uint64_t frames_in_use = 0;  // frames holding merged content
  std::uint64_t frames_pinned = 0;  // kept because a forked child may map them
  std::uint64_t vma_budget = 0;     // mappings merging may create
  std::uint64_t vmas_used = 0;      // mappings merging holds now (estimate)
  std::uint64_t budget_skips = 0;   // merges skipped for lack of VMA budget
  std::uint64_t lock_skips = 0;     // locked pages not merged: no room under
                                    // RLIMIT_MEMLOCK to lock them again
  std::uint64_t locks_lost = 0;     // pages left unlocked after a merge or an
                                    // unmerge (a race for RLIMIT_MEMLOCK)
  std::uint64_t merge_failures = 0; // merges refused (content changed, gone)
  std::uint64_t protect_faults = 0; // writes that waited for a merge
  std::uint64_t pinned_io_skips = 0;  // pages not merged (this time): direct
                                      // I/O was in flight into them
  std::uint64_t advised_pages = 0;  // pages marked mergeable
  std::uint64_t kept_out_pages = 0;  // pages the kernel writes for the
                                     // application, kept out of merging
                                     // (Engine::KernelWrites,
                                     // Engine::KernelPins)
};

class Engine {
 public:
  // Creates the process's engine. Fails with a clear status if the kernel
  // offers none of the mechanisms samepage needs (memfd, mprotect).
  static Status Create(const EngineOptions& options,
                       std::unique_ptr<Engine>* engine);
  virtual ~Engine() = default;

  // --- mm/ksm.c per-process ABI ---
  // madvise(addr, len, MADV_MERGEABLE | MADV_UNMERGEABLE) with the kernel's
  // checks: EINVAL unaligned addr or bad advice, ENOMEM a hole in the range.
  // Shared, file-backed, hugetlb and special mappings are silently ignored.
  // Memory whose flags a mapping of ours would lose (wipe-on-fork, sealed,
  // droppable, registered with the application's userfaultfd) is never
  // merged: this call asks the kernel only for the mappings of the range
  // (PROCMAP_QUERY, Linux 6.11; before, it reads smaps), takes such memory
  // with the rest, and the scanner drops it when it reads the flags
  // (smaps), before it touches any newly advised memory.
  virtual Status Madvise(void* addr, std::size_t len, int advice) = 0;
  // prctl(PR_SET_MEMORY_MERGE, on) / PR_GET_MEMORY_MERGE.
  virtual Status SetMergeAny(bool on) = 0;
  virtual bool MergeAny() const = 0;

  // --- /sys/kernel/mm/ksm ---
  // Reads a knob or counter by its sysfs file name; text ends in '\n'.
  virtual Status ReadKnob(std::string_view name, std::string* text) = 0;
  // Writes a knob as `echo VALUE > name` would. EINVAL bad value, EBUSY
  // changing max_page_sharing while pages are shared, EACCES counters.
  virtual Status WriteKnob(std::string_view name, std::string_view text) = 0;
  // The sysfs file names, in the kernel's order.
  virtual std::vector<std::string> KnobNames() const = 0;

  // --- /proc/self/ksm_stat and /proc/self/ksm_merging_pages ---
  virtual std::string KsmStatText() = 0;
  virtual std::string KsmMergingPagesText() = 0;

  // --- synchronous scanning in the caller (the 2008 KSM_SCAN) ---
  // Scans up to `pages` pages now, merging what it can; returns pages
  // scanned. Works whatever `run` is.
  virtual std::size_t ScanNow(std::size_t pages) = 0;
  // Scans until `count` more full scans have completed (or nothing is
  // mergeable). Convenience for tests and tools.
  virtual void RunFullScans(int count) = 0;

  virtual EngineStats Stats() = 0;


  // What a call passed to ChangeMapping does to [addr, addr + len).
  enum class MappingChange {
    kUnmap,           // munmap, mmap MAP_FIXED over it: the old memory is gone
    kMove,            // mremap away, mseal: the contents stay
    kReprotect,       // mprotect, pkey_mprotect to a protection (or key)
                      // samepage does not merge: as kMove, and the advice
                      // waits for Reprotected
    kDiscard,         // MADV_REMOVE, process_madvise: dropped in place
    kDiscardToZero,   // madvise(MADV_DONTNEED(_LOCKED), MADV_FREE) of an
                      // aligned range: dropped, reads back zeros (FREE: may)
    kFlags,           // mlock, munlock: the memory stays, its VMA flags change
    kAnonymousFlags,  // madvise(MADV_WIPEONFORK): a flag the kernel gives
                      // private anonymous memory only
    kUserfaultfd,     // ioctl(UFFDIO_REGISTER) of the application's own
                      // userfaultfd: as kAnonymousFlags, and samepage's
                      // own registration leaves the range first
  };

  // For the LD_PRELOAD layer: `change(arg)` (the real munmap, mremap,
  // mmap MAP_FIXED, mprotect or discarding madvise) changes
  // [addr, addr + len). It runs with every engine's lock and the process's
  // window lock held, so no merge is in flight anywhere and none starts
  // until the engines know of the change. kUnmap: the engines stop tracking
  // the range once change() has succeeded, without touching it (a new
  // mapping there is not merged unless advised again). kMove: the range is
  // first unmerged and unadvised (ordinary anonymous memory again, with the
  // permissions it had), and advised again if change() fails; if part of it
  // cannot be unmerged (ENOMEM), change() is not run, the range stays as it
  // was and false is returned (the caller fails with ENOMEM). kDiscard: the
  // range is unmerged first, so dropped pages read back zeros as anonymous
  // memory does, and stays mergeable. kDiscardToZero: the same, but the
  // merged pages are not copied back first, only replaced by fresh
  // anonymous memory (the range must be exactly what the kernel drops: a
  // page-aligned address; locked memory is unmerged as for kDiscard).
  // kReprotect: as kMove, and once change() has succeeded the advised
  // parts wait, advice suspended, until Reprotected() is called over them
  // (the kernel keeps VM_MERGEABLE through an mprotect); a kMove leaves
  // the suspended parts to Moved().
  // kFlags: nothing is unmerged; once
  // change() has succeeded the engines read the maps again, so merges
  // re-apply the new lock state. kAnonymousFlags: unmerged first as for
  // kDiscard (merged pages are mappings of frames, which the kernel
  // refuses the flag with EINVAL), and the maps read again as for kFlags
  // (a VMA with the flag is not merged again). kUserfaultfd: as
  // kAnonymousFlags, and the engines' own userfaultfd registration (for
  // write-protection, over all the memory they may merge) leaves the range
  // before change() runs: a VMA takes one userfaultfd, and the kernel
  // would refuse the application's with EBUSY. Returns what change()
  // returned.
  // *advised (if not null) is set, before change() runs, to whether any
  // engine tracked part of the range. Cheap when no engine exists.
  // On a thread inside an engine (ThreadInsideEngine), change(arg) runs at
  // once and nothing else happens: that is an engine's own memory.
  static bool ChangeMapping(void* addr, std::size_t len, MappingChange kind,
                            bool (*change)(void* arg), void* arg,
                            bool* advised = nullptr);

  // For the LD_PRELOAD layer: true on a thread that runs inside an engine,
  // an engine's scanner thread or one holding an engine's lock for a call.
  // What such a thread frees, unmaps or remaps is the engine's own memory,
  // and the interposers must pass its calls straight to the C library
  // (they would wait for the lock it holds). Not every such call comes
  // from libsamepage's code: a program that exports libstdc++'s members
  // (linked in statically, as cc1plus) runs std::string's growth, and so
  // its frees, in the program's copy.
  static bool ThreadInsideEngine();

  // For the LD_PRELOAD layer: a discarding madvise made from inside the
  // program's allocator (jemalloc, tcmalloc), where ChangeMapping cannot
  // run: it allocates, which would enter that allocator again from inside
  // itself. Runs `change(arg)` with the process's window lock held, so no
  // merge is in flight; then, if `zero_fill` (MADV_DONTNEED), writes zeros
  // into every page of the range that maps one of samepage's frames, which
  // the discard would otherwise have brought back: dropped memory reads
  // back zeros, as anonymous memory does (those pages become private
  // copies; the engines see them as written at their next visit).
  // Allocates nothing. False (change() not run) where the kernel cannot
  // say which mappings are frames (PROCMAP_QUERY, Linux 6.11): use
  // ChangeMapping then. Otherwise *result is what change() returned.
  static bool DiscardWithoutAllocating(void* addr, std::size_t len,
                                       bool zero_fill,
                                       bool (*change)(void* arg), void* arg,
                                       bool* result);

  // For the LD_PRELOAD layer: runs `change(arg)` with no merge window open
  // anywhere in the process, and none opening until it returns; returns
  // what change() returned. For calls that may unmap or discard memory the
  // engines track at addresses nobody can name beforehand: glibc's free,
  // realloc, malloc_trim and aligned allocations shrink the heap with an
  // internal brk and trim arenas with an internal madvise(MADV_DONTNEED).
  // Between a window's check that its pages are still there and the mapping of
  // a frame over them, such a trim followed by the heap's growth at the same
  // addresses would have the frame replace the program's new memory. Nothing
  // else happens: pages that change() unmaps are found gone at their next visit
  // (a window checks every page it replaces), those it discards read their
  // frame again (malloc hands them out as garbage, calloc clears them).
  // Allocates nothing; never call it inside an engine.
  static bool OutsideWindows(bool (*change)(void* arg), void* arg);

  // For the LD_PRELOAD layer: an munmap, a replacing mmap, an mremap or an
  // mprotect made from inside the program's allocator (mimalloc unmaps its
  // segments; an allocator may map over memory it reserved). Runs
  // `change(arg)` with no merge window open anywhere in the process, as
  // OutsideWindows, but alongside other such calls and fork(), whose
  // handlers take the allocator's locks the caller may hold (the discards'
  // lock, DiscardWithoutAllocating). Without it, such an unmap and a new
  // mapping at the same address, made between a window's check of its
  // pages and its mapping of a frame, had the program's new memory replaced
  // by the frame. The engines learn of the change as of any unmap they do
  // not see: a page gone, or written, at its next visit. Allocates nothing;
  // returns what change() returned.
  static bool AllocatorChange(bool (*change)(void* arg), void* arg);

  // For the LD_PRELOAD layer: the calling thread is about to exit (a
  // thread-specific data destructor). glibc then frees the thread's malloc
  // cache with internal calls, which may trim the heap as free does, and
  // drops the unused part of its stack: from now until the thread is gone
  // (at most 5 s: a thread stuck in its exit does not stop merging for
  // good) no merge window opens anywhere in the process; merges due
  // meanwhile are tried again later, and giving merged memory back waits
  // (at most 100 ms). Waits for the windows open now. Allocates nothing. A
  // no-op on a thread inside an engine or where no engine was ever made.
  static void ThreadExiting();

  // For the LD_PRELOAD layer: the kernel is about to write into
  // [addr, addr + len) for the application outside the system calls it
  // makes, through the page tables, faulting pages in for writing as a
  // system call would: a KVM vCPU into guest RAM (KVM_SET_USER_MEMORY_REGION),
  // vhost into a virtual machine's memory table. Such a write into a page
  // under a merge window fails where kernel faults cannot wait for the
  // window (mprotect protection, or userfaultfd with UFFD_USER_MODE_ONLY):
  // KVM then hands the guest's write to the monitor as an MMIO exit, vhost
  // gets EFAULT. So every engine whose protection is one of those, now and
  // created later in this process, unmerges the range and never merges it
  // again (it stays advised; its pages are counted in kept_out_pages).
  // Where kernel faults wait, nothing changes: the range merges as before.
  // The range is remembered as page-aligned and stays kept out for the
  // life of the process (also after the memory is unmapped). Returns the
  // pages newly kept out by the engines existing now, summed over them (0
  // where they kept it out already, or where kernel faults wait).
  // REQUIRES: not called from a thread that holds an engine's lock.
  static std::size_t KernelWrites(void* addr, std::size_t len);

  // For the LD_PRELOAD layer: the kernel is about to pin [addr, addr + len)
  // for as long as a registration lasts and write into the pages directly
  // (io_uring's registered buffers): a page replaced by a merge would never
  // see those writes. Like KernelWrites, but under every protection: every
  // engine, now and created later, unmerges the range and never merges it
  // again. Call it before the registration reaches the kernel.
  // REQUIRES: not called from a thread that holds an engine's lock.
  static std::size_t KernelPins(void* addr, std::size_t len);

  // For the LD_PRELOAD layer: the application changed mapping flags
  // (madvise, mlock ...) perhaps without changing the layout of its
  // mappings. Engines otherwise notice such a change within 2 seconds (they
  // read /proc/self/smaps at most that often while the layout stays the
  // same). Cheap; async-signal-safe.
  static void VmaFlagsChanged();

  // For the LD_PRELOAD layer: [addr, addr + len) was made readable and
  // writable again (mprotect, pkey_mprotect with the default key). Advice
  // a kReprotect change suspended there is taken up again: merging goes on
  // there, as under kernel KSM, whose VM_MERGEABLE an mprotect keeps.
  // REQUIRES: not called from a thread that holds an engine's lock.
  static void Reprotected(void* addr, std::size_t len);

  // For the LD_PRELOAD layer: mremap moved [from, from + from_len) to
  // [to, to + to_len) (the source kept, empty, with MREMAP_DONTUNMAP):
  // advice suspended there (kReprotect) moves with it, as VM_MERGEABLE
  // does. True if any did. REQUIRES: not called from a thread that holds
  // an engine's lock.
  static bool Moved(void* from, std::size_t from_len, void* to,
                    std::size_t to_len, bool source_kept);

  // For the LD_PRELOAD layer, before a seccomp filter that would refuse
  // samepage's system calls goes in: every engine gives its merged pages
  // back and stops, as `run` set to 2 does.
  static void StopAll();

  // For the LD_PRELOAD layer: around a fork that bypasses fork() and its
  // pthread_atfork handlers (a clone or fork system call made directly,
  // or glibc's clone(), without CLONE_VM), samepage's handlers, as fork()
  // would run them: no merge window is open across it, and every frame
  // that exists then is pinned, so that the parent never frees one the
  // child maps. AfterRawFork(true) in the child, first thing (no scanner
  // starts there until its first call into samepage); AfterRawFork(false)
  // in the parent, whether the call succeeded or not. errno is kept.
  static void BeforeRawFork();
  static void AfterRawFork(bool in_child);
};

}  // namespace samepage

#endif  // SAMEPAGE_ENGINE_H_
