#include "backend/frame_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstring>
#include <vector>

#include "backend/own_fds.h"
#include "backend/write_protect.h"

#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif

namespace samepage::backend {

void* MapUnlocked(void* hint, std::size_t len, int prot, int flags, int fd,
                  off_t offset) {
  void* p = mmap(hint, len, PROT_NONE, flags, fd, offset);
  if (p == MAP_FAILED || prot == PROT_NONE) return p;
  (void)munlock(p, len);  // a no-op unless MCL_FUTURE locked it
  if (mprotect(p, len, prot) != 0) {
    munmap(p, len);
    return MAP_FAILED;
  }
  return p;
}

void ShieldMapping(void* p, std::size_t len, bool shield) {
  if (!shield) (void)munlock(p, len);
  (void)mprotect(p, len, shield ? PROT_NONE : PROT_READ | PROT_WRITE);
}

namespace {

bool MeasurePreadBeatsColdView() {
  constexpr std::size_t kPages = 128;  // per way and round
  constexpr std::size_t kRounds = 3;
  constexpr std::size_t kStride = 37;  // coprime with kPages: every page once
  constexpr std::size_t kBytes = 2 * kRounds * kPages * kPageSize;
  int fd = memfd_create("samepage-probe", MFD_CLOEXEC | MFD_NOEXEC_SEAL);
  if (fd < 0 && errno == EINVAL)
    fd = memfd_create("samepage-probe", MFD_CLOEXEC);
  if (fd < 0) return false;
  fd = AdoptOwnFd(fd);
  std::vector<unsigned char> bytes(kPages * kPageSize);
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<unsigned char>(i * 131 + i / kPageSize);
  }
  bool ok = ftruncate(fd, kBytes) == 0;
  for (std::size_t at = 0; ok && at < kBytes; at += bytes.size()) {
    ok = pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(at)) ==
         static_cast<ssize_t>(bytes.size());
  }
  void* view = ok ? MapUnlocked(nullptr, kBytes, PROT_READ, MAP_SHARED, fd, 0)
                  : MAP_FAILED;
  if (view == MAP_FAILED) {
    CloseOwnFd(fd);
    return false;
  }
  const auto* v = static_cast<const unsigned char*>(view);
  alignas(64) unsigned char copy[kPageSize];
  int sink = 0;
  std::int64_t best[2] = {INT64_MAX, INT64_MAX};  // view, pread
  for (std::size_t r = 0; r < kRounds; ++r) {
    for (std::size_t w = 0; w < 2; ++w) {
      const std::size_t way = (r + w) % 2;  // each way first in turn
      const std::size_t base = (2 * r + way) * kPages;
      const std::int64_t start = MonotonicNanos();
      for (std::size_t k = 0; k < kPages; ++k) {
        const std::size_t i = k * kStride % kPages;
        const unsigned char* frame = v + (base + i) * kPageSize;
        if (way == 1) {
          if (pread(fd, copy, kPageSize,
                    static_cast<off_t>((base + i) * kPageSize)) !=
              static_cast<ssize_t>(kPageSize)) {
            ok = false;
          }
          frame = copy;
        }
        sink += std::memcmp(frame, bytes.data() + i * kPageSize, kPageSize);
      }
      best[way] = std::min(best[way], MonotonicNanos() - start);
    }
  }
  munmap(view, kBytes);
  CloseOwnFd(fd);
  return ok && sink == 0 && best[1] < best[0];
}

}  // namespace

bool PreadBeatsColdView() {
  static const bool beats = MeasurePreadBeatsColdView();
  return beats;
}

FrameStore::~FrameStore() {
  // Merged pages keep the file alive through their own mappings.
  Flush();
  for (std::size_t c = 0; c < nchunks_; ++c) {
    munmap(chunks_[c], ChunkFrames(c) * kPageSize);
  }
  if (chunks_ != nullptr) munmap(chunks_, kChunkTableBytes);
  CloseOwnFd(fd_);
}

Status FrameStore::Init() {
  // MFD_NOEXEC_SEAL (6.3+) keeps the kernel from warning about executable
  // memfds; older kernels answer EINVAL.
  fd_ = memfd_create("samepage", MFD_CLOEXEC | MFD_NOEXEC_SEAL);
  if (fd_ < 0 && errno == EINVAL) fd_ = memfd_create("samepage", MFD_CLOEXEC);
  if (fd_ < 0) {
    int err = errno;
    return Status::Error(err, "memfd_create(samepage)");
  }
  fd_ = AdoptOwnFd(fd_);
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    int err = errno;
    return Status::Error(err, "fstat(memfd)");
  }
  dev_ = st.st_dev;
  inode_ = st.st_ino;
  void* table = MapUnlocked(nullptr, kChunkTableBytes, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (table == MAP_FAILED) {
    int err = errno;
    return Status::Error(err, "mmap(frame view chunk table)");
  }
  chunks_ = static_cast<std::byte**>(table);
  seen_fork_seq_ = ForkSequence();
  child_gen_ = ChildGeneration();
  return Status::Ok();
}

bool FrameStore::InForkedChild() const {
  return ChildGeneration() != child_gen_;
}

std::size_t FrameStore::ChunkFrames(std::size_t c) const {
  return c + 1 == nchunks_ ? last_chunk_frames_ : kGrowFrames;
}

std::uint64_t FrameStore::MappedFrames() const {
  return nchunks_ == 0 ? 0 : (nchunks_ - 1) * kGrowFrames + last_chunk_frames_;
}

bool FrameStore::Grow(std::uint64_t frames) {
  if (frames > kMaxFrames) return false;
  while (MappedFrames() < frames) {
    const bool fresh = nchunks_ == 0 || last_chunk_frames_ == kGrowFrames;
    const std::size_t c = fresh ? nchunks_ : nchunks_ - 1;
    const std::uint64_t base = std::uint64_t{c} * kGrowFrames;
    // The chunk doubles from kMinChunkFrames, or grows at once to what is
    // needed, up to kGrowFrames: address space in proportion to the frames.
    const std::size_t have = fresh ? 0 : last_chunk_frames_;
    std::uint64_t want = std::max<std::uint64_t>(
        {kMinChunkFrames, 2 * have, std::bit_ceil(frames - base)});
    want = std::min<std::uint64_t>(want, kGrowFrames);
    if ((base + want) * kPageSize > file_bytes_) {
      const std::uint64_t bytes = (base + want) * kPageSize;
      if (ftruncate(fd_, static_cast<off_t>(bytes)) != 0) return false;
      file_bytes_ = bytes;
    }
    void* p;
    if (fresh) {
      p = MapUnlocked(nullptr, want * kPageSize, PROT_READ | PROT_WRITE,
                      MAP_SHARED, fd_, static_cast<off_t>(base * kPageSize));
    } else {
      // Moved if it cannot grow in place: no one holds view addresses
      // across calls into the store.
      p = mremap(chunks_[c], have * kPageSize, want * kPageSize,
                 MREMAP_MAYMOVE);
    }
    if (p == MAP_FAILED) return false;
    chunks_[c] = static_cast<std::byte*>(p);
    if (fresh) ++nchunks_;
    last_chunk_frames_ = want;
  }
  return true;
}

bool FrameStore::RemapChunk(std::size_t c) {
  if (c >= nchunks_) return false;
  // The old address is the program's now: never unmapped here.
  void* p = MapUnlocked(nullptr, ChunkFrames(c) * kPageSize,
                        PROT_READ | PROT_WRITE, MAP_SHARED, fd_,
                        static_cast<off_t>(c * kGrowFrames * kPageSize));
  if (p == MAP_FAILED) return false;
  chunks_[c] = static_cast<std::byte*>(p);
  return true;
}

void FrameStore::ShieldView(bool shield) {
  if (chunks_ == nullptr) return;
  // The table last when shielding, first when not: it lists the chunks.
  if (!shield) ShieldMapping(chunks_, kChunkTableBytes, false);
  for (std::size_t c = 0; c < nchunks_; ++c) {
    ShieldMapping(chunks_[c], ChunkFrames(c) * kPageSize, shield);
  }
  if (shield) ShieldMapping(chunks_, kChunkTableBytes, true);
}

FrameId FrameStore::Allocate(std::size_t n) {
  if (n == 0 || InForkedChild()) return kNoFrame;
  if (next_ + n > kMaxFrames || next_ + n >= kNoFrame) return kNoFrame;
  if (next_ + n > MappedFrames() && !Grow(next_ + n)) {
    return kNoFrame;
  }
  FrameId first = static_cast<FrameId>(next_);
  next_ += n;
  in_use_ += n;
  return first;
}

void FrameStore::Release(FrameId frame) {
  if (frame >= next_) return;
  if (in_use_ > 0) --in_use_;
  if (InForkedChild()) {  // the parent owns these frames
    ++pinned_;
    return;
  }
  // The core released the frame after seeing no page of ours map it, so a
  // fork that starts from here on cannot give a child a mapping of it; a
  // fork that started earlier is visible in the sequence.
  std::uint64_t seq = ForkSequence();
  if (ForkInProgress(seq)) {
    ++pinned_;
    return;
  }
  if (seq != seen_fork_seq_) {
    pin_limit_ = next_;
    seen_fork_seq_ = seq;
  }
  if (frame < pin_limit_) {
    ++pinned_;
    return;
  }
  // No page of ours maps the frame now, so neither can a child forked before
  // the punch: it may wait.
  if (npending_ == kPendingPunches) Flush();
  pending_[npending_++] = frame;
}

void FrameStore::Flush() {
  // A forked child's copy of the list is the parent's to punch.
  if (InForkedChild()) npending_ = 0;
  std::sort(pending_, pending_ + npending_);
  for (std::size_t i = 0; i < npending_;) {
    std::size_t j = i + 1;
    while (j < npending_ && pending_[j] == pending_[j - 1] + 1) ++j;
    // PUNCH_HOLE|KEEP_SIZE: frees the pages now; offsets keep their meaning.
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  FrameOffset(pending_[i]),
                  static_cast<off_t>((j - i) * kPageSize)) == 0) {
      punched_ += j - i;
    }
    i = j;
  }
  npending_ = 0;
}

}  // namespace samepage::backend
