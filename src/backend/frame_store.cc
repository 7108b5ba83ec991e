#include "backend/frame_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

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

FrameStore::~FrameStore() {
  // Merged pages keep the file alive through their own mappings.
  for (std::size_t c = 0; c < nchunks_; ++c) {
    munmap(chunks_[c], kGrowFrames * kPageSize);
  }
  if (chunks_ != nullptr) munmap(chunks_, kChunkTableBytes);
  if (fd_ >= 0) close(fd_);
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

bool FrameStore::Grow(std::uint64_t frames) {
  std::uint64_t target = (frames + kGrowFrames - 1) / kGrowFrames * kGrowFrames;
  if (target > kMaxFrames) target = kMaxFrames;
  if (target < frames) return false;
  if (target > file_frames_) {
    if (ftruncate(fd_, static_cast<off_t>(target * kPageSize)) != 0) {
      return false;
    }
    file_frames_ = target;
  }
  constexpr std::size_t kChunkBytes = kGrowFrames * kPageSize;
  while (nchunks_ * kGrowFrames < target) {
    // Right after the last chunk if that is free (the kernel then joins the
    // two into one mapping); anywhere otherwise.
    void* hint = nchunks_ == 0 ? nullptr : chunks_[nchunks_ - 1] + kChunkBytes;
    const off_t offset = static_cast<off_t>(nchunks_ * kChunkBytes);
    void* p = MapUnlocked(hint, kChunkBytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                          fd_, offset);
    if (p == MAP_FAILED) return false;
    chunks_[nchunks_++] = static_cast<std::byte*>(p);
  }
  return true;
}

bool FrameStore::RemapChunk(std::size_t c) {
  if (c >= nchunks_) return false;
  constexpr std::size_t kChunkBytes = kGrowFrames * kPageSize;
  // The old address is the program's now: never unmapped here.
  void* p = MapUnlocked(nullptr, kChunkBytes, PROT_READ | PROT_WRITE,
                        MAP_SHARED, fd_, static_cast<off_t>(c * kChunkBytes));
  if (p == MAP_FAILED) return false;
  chunks_[c] = static_cast<std::byte*>(p);
  return true;
}

void FrameStore::ShieldView(bool shield) {
  if (chunks_ == nullptr) return;
  constexpr std::size_t kChunkBytes = kGrowFrames * kPageSize;
  const int prot = shield ? PROT_NONE : PROT_READ | PROT_WRITE;
  // The table last when shielding, first when not: it lists the chunks.
  if (!shield) {
    (void)munlock(chunks_, kChunkTableBytes);
    (void)mprotect(chunks_, kChunkTableBytes, prot);
  }
  for (std::size_t c = 0; c < nchunks_; ++c) {
    if (!shield) (void)munlock(chunks_[c], kChunkBytes);
    (void)mprotect(chunks_[c], kChunkBytes, prot);
  }
  if (shield) (void)mprotect(chunks_, kChunkTableBytes, prot);
}

FrameId FrameStore::Allocate(std::size_t n) {
  if (n == 0 || InForkedChild()) return kNoFrame;
  if (next_ + n > kMaxFrames || next_ + n >= kNoFrame) return kNoFrame;
  if (next_ + n > nchunks_ * kGrowFrames && !Grow(next_ + n)) {
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
  if (seq & 1) {  // fork in progress
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
  // PUNCH_HOLE|KEEP_SIZE: frees the page now; offsets keep their meaning.
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                FrameOffset(frame), kPageSize) == 0) {
    ++punched_;
  }
}

}  // namespace samepage::backend
