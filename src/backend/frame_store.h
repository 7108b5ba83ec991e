// The frame store: merged pages' contents, in one memfd.
//
// Owns one memfd and a MAP_SHARED read-write "frame view" of it, mapped in
// chunks of up to kGrowFrames frames as the file grows, each wherever the
// kernel puts it; the last chunk doubles from kMinChunkFrames (mremap), so
// the view takes address space (RLIMIT_AS, VmSize, and locked_vm under
// mlockall) in proportion to the frames allocated, not for all the store
// could hold. FrameId f is the page at offset f * kPageSize. Merged pages map
// their frame with mmap(MAP_PRIVATE | MAP_FIXED, memfd, offset): the kernel
// copies on write.
//
// Allocation bumps a counter and never reuses an offset: a stale mapping of a
// released frame reads zeros, never another page's data. Release punches a
// hole (memory returned at once) unless a forked child may still map the
// frame: frames allocated before the most recent fork() are pinned, never
// punched. In a forked child every frame is pinned and nothing can be
// allocated (the memfd is shared with the parent, which keeps allocating).
//
// Thread safety: not thread-safe; the owner (LinuxMemory) serialises calls.
// Fork detection uses the process-wide counters of write_protect.h.

#ifndef SAMEPAGE_BACKEND_FRAME_STORE_H_
#define SAMEPAGE_BACKEND_FRAME_STORE_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

#include "core/memory.h"
#include "samepage/status.h"

namespace samepage::backend {

// mmap(hint, len, prot, flags, fd, offset), never locked nor populated by
// an mlockall(MCL_FUTURE) in force: mapped inaccessible (the kernel does
// not populate that), unlocked, then given `prot`. For samepage's own
// mappings, which an application's mlockall must not fill with memory.
void* MapUnlocked(void* hint, std::size_t len, int prot, int flags, int fd,
                  off_t offset);

// Around an application's mlockall: shield=true makes [p, p + len)
// inaccessible, so that MCL_CURRENT locks it without populating it; false
// unlocks it and makes it read-write again.
void ShieldMapping(void* p, std::size_t len, bool shield);

// Whether a page of a memfd that nothing has read through a mapping of
// ours lately costs less to read with pread than through a MAP_SHARED view.
// Where the hypervisor shadows the guest's page tables (a PVM guest) the
// first read through a new page table entry costs about 5 us and pread
// wins by half; with nested paging (a KVM guest) the view costs 0.9 us and
// pread 2.2 (20,000 frames just written, read in random order). Measured
// once per process, on a memfd of its own: 128 pages each way, in a
// scattered order (a fault on the view maps its neighbours too, as for the
// frames of a scattered slice), the cheaper of three rounds. False if the
// probe cannot run.
bool PreadBeatsColdView();

class FrameStore {
 public:
  // Frames one store can hand out in its lifetime (1 TiB of offsets).
  static constexpr std::uint64_t kMaxFrames = std::uint64_t{1} << 28;
  // Frames of one chunk of the view (one mapping) when full, and of a new
  // chunk at first.
  static constexpr std::uint64_t kGrowFrames = 16384;    // 64 MiB
  static constexpr std::uint64_t kMinChunkFrames = 256;  // 1 MiB
  static constexpr std::size_t kMaxChunks = kMaxFrames / kGrowFrames;

  FrameStore() = default;
  ~FrameStore();
  FrameStore(const FrameStore&) = delete;
  FrameStore& operator=(const FrameStore&) = delete;

  // Creates the memfd (the view grows with it). REQUIRES: InitProcessState().
  [[nodiscard]] Status Init();

  // Allocates n consecutive frames (consecutive offsets; their addresses in
  // the view are consecutive only within a chunk); returns the first, or
  // kNoFrame if the store is exhausted, cannot grow (its file or a chunk of
  // the view: ENOSPC, RLIMIT_AS, vm.max_map_count), or this is a forked
  // child.
  FrameId Allocate(std::size_t n);

  // Frees the frame's memory (hole punch) unless it is pinned (see above).
  // The punch waits for Flush, or for kPendingPunches more releases: one
  // punch per run of consecutive frames costs a quarter of one per frame
  // (docs/performance.md, unmerging).
  void Release(FrameId frame);
  // Releases the frame without ever freeing it (counted pinned): it may be
  // mapped where samepage cannot tell.
  void Keep(FrameId frame) {
    if (frame >= next_) return;
    if (in_use_ > 0) --in_use_;
    ++pinned_;
  }
  // Punches the holes of the frames released since the last call.
  void Flush();
  static constexpr std::size_t kPendingPunches = 1024;

  bool IsAllocated(FrameId frame) const { return frame < next_; }
  // The frame's page in the view. REQUIRES: IsAllocated(frame).
  std::byte* FrameAddress(FrameId frame) const {
    return chunks_[ChunkOf(frame)] + frame % kGrowFrames * kPageSize;
  }
  off_t FrameOffset(FrameId frame) const {
    return static_cast<off_t>(std::size_t{frame} * kPageSize);
  }

  int fd() const { return fd_; }
  dev_t dev() const { return dev_; }
  ino_t inode() const { return inode_; }
  // Around an application's mlockall: shield=true makes the view and its
  // chunk table inaccessible, so that MCL_CURRENT locks them without
  // populating them (every offset of a chunk would get a page); false
  // unlocks them and makes them accessible again. Nothing may read the view
  // in between.
  void ShieldView(bool shield);

  // Maps chunk `c` of the view again, at a new address: the program mapped
  // over the old one (see LinuxMemory::ViewIntact). False if it cannot.
  bool RemapChunk(std::size_t c);
  std::size_t ChunkOf(FrameId frame) const { return frame / kGrowFrames; }
  // Frames chunk c maps: all but the last are full.
  std::size_t ChunkFrames(std::size_t c) const;

  // The table of the view's chunks: memory of our own, written while merge
  // windows are open (a chunk is mapped inside one), so it must be excluded
  // from merging. The chunks themselves are MAP_SHARED, never merged.
  Addr chunk_table_start() const { return reinterpret_cast<Addr>(chunks_); }
  std::size_t chunk_table_size() const { return kChunkTableBytes; }
  std::size_t view_chunks() const { return nchunks_; }

  std::uint64_t frames_allocated() const { return next_; }
  std::uint64_t frames_in_use() const { return in_use_; }
  std::uint64_t frames_pinned() const { return pinned_; }
  std::uint64_t frames_punched() const { return punched_; }

 private:
  bool Grow(std::uint64_t frames);
  std::uint64_t MappedFrames() const;  // of all chunks
  bool InForkedChild() const;

  int fd_ = -1;
  dev_t dev_ = 0;
  ino_t inode_ = 0;
  static constexpr std::size_t kChunkTableBytes = kMaxChunks * sizeof(void*);
  // chunks_[c] views frames [c * kGrowFrames, (c + 1) * kGrowFrames), for c
  // below nchunks_. A mapping of its own (128 KiB of address space, a page
  // of memory per 512 chunks), not the heap: it is written inside windows.
  std::byte** chunks_ = nullptr;
  std::size_t nchunks_ = 0;
  std::uint64_t next_ = 0;         // next frame to allocate (bump)
  std::size_t last_chunk_frames_ = 0;  // mapped of chunks_[nchunks_ - 1]
  std::uint64_t file_bytes_ = 0;       // the file's size
  std::uint64_t in_use_ = 0;
  std::uint64_t pinned_ = 0;
  std::uint64_t punched_ = 0;
  // Released frames whose holes are not punched yet. An array of this
  // object's own: Release runs inside merge windows, which must not write
  // the heap.
  FrameId pending_[kPendingPunches] = {};
  std::size_t npending_ = 0;
  // Frames below pin_limit_ may be mapped by a child. Updated at the first
  // Release after each fork, to next_ then (a superset of what existed at
  // the fork: conservative).
  std::uint64_t pin_limit_ = 0;
  std::uint64_t seen_fork_seq_ = 0;
  std::uint64_t child_gen_ = 0;  // ChildGeneration() at Init
};

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_FRAME_STORE_H_
