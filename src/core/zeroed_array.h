// samepage::ZeroedArray — a fixed-size array of T whose all-zero bytes are
// T's default value, allocated zeroed by calloc and never written to
// initialise it.
//
// A large calloc is fresh memory the kernel hands out zero-filled on first
// touch: the parts of the array nothing writes take no memory. The core
// keeps one reverse-map item per page of every advised range; with a
// std::vector each item was written at madvise, so a 1 TiB reservation
// advised mergeable (a runtime's heap reservation under merge-any) cost
// 3 GiB of resident memory and 5.7 s before one page was scanned, where the
// kernel allocates its rmap items only for the pages it finds.
//
// Arrays of kMapBytes or more are mapped on their own with MAP_NORESERVE:
// calloc's mapping of 48 GB, the items of a 16 TiB reservation (a
// sanitizer's shadow, a runtime's heap) advised mergeable, is refused on
// a 24 GiB machine by the kernel's overcommit heuristic, though almost
// none of it is ever written; madvise and prctl(PR_SET_MEMORY_MERGE) then
// failed (the program aborted on the std::bad_alloc until 2026-12-07),
// where the kernel's succeed.

#ifndef SAMEPAGE_CORE_ZEROED_ARRAY_H_
#define SAMEPAGE_CORE_ZEROED_ARRAY_H_

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

namespace samepage {

template <typename T>
class ZeroedArray {
  // calloc's bytes are the objects (implicit-lifetime, trivially copyable):
  // nothing to construct or destroy. All-zero must be T{}: the caller
  // checks that for its T.
  static_assert(std::is_trivially_copyable_v<T>);
  static_assert(std::is_trivially_destructible_v<T>);

 public:
  ZeroedArray() = default;
  // n values of T{}. Throws std::bad_alloc as a vector would.
  explicit ZeroedArray(std::size_t n) : size_(n) { Allocate(n); }
  ZeroedArray(const ZeroedArray&) = delete;
  ZeroedArray& operator=(const ZeroedArray&) = delete;
  ZeroedArray(ZeroedArray&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        dropped_(std::exchange(o.dropped_, 0)),
        mapped_bytes_(std::exchange(o.mapped_bytes_, 0)) {}
  ZeroedArray& operator=(ZeroedArray&& o) noexcept {
    if (this != &o) {
      Free();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      dropped_ = std::exchange(o.dropped_, 0);
      mapped_bytes_ = std::exchange(o.mapped_bytes_, 0);
    }
    return *this;
  }

  // Arrays this large or larger are mapped on their own (see the top).
  static constexpr std::size_t kMapBytes = std::size_t{64} << 20;
  ~ZeroedArray() { Free(); }

  std::size_t size() const { return size_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }

  // A new array holding elements [from, size()) of this one. Only groups
  // of elements that are not all zero are written, so the copy of a sparse
  // tail stays sparse. may_hold(first, count) may say that elements
  // [first, first + count) are all zero without reading them (memory never
  // written costs a page fault a page to read); it must never say so of
  // an element that is not.
  ZeroedArray Tail(std::size_t from) const { return Tail(from, AnyMayHold); }
  template <typename MayHold>
  ZeroedArray Tail(std::size_t from, MayHold&& may_hold) const {
    return Copy(from, from < size_ ? size_ - from : 0, may_hold);
  }
  // A new array holding elements [0, count) of this one, copied as Tail's.
  template <typename MayHold>
  ZeroedArray Head(std::size_t count, MayHold&& may_hold) const {
    return Copy(0, std::min(count, size_), may_hold);
  }

  // Calls f(index, element) for every element that is not all zero bytes,
  // in order, passing over groups of zeros a memcmp at a time, and over
  // those may_hold (as for Tail) says are zero without reading them.
  template <typename F>
  void ForEachNonZero(F&& f) {
    VisitNonZero(data_, size_, f, AnyMayHold);
  }
  template <typename F>
  void ForEachNonZero(F&& f) const {
    VisitNonZero(static_cast<const T*>(data_), size_, f, AnyMayHold);
  }
  template <typename F, typename MayHold>
  void ForEachNonZero(F&& f, MayHold&& may_hold) {
    VisitNonZero(data_, size_, f, may_hold);
  }

  // ForEachNonZero over elements [first, last) only (indexes, to f and to
  // may_hold, are the array's own).
  template <typename F, typename MayHold>
  void ForEachNonZeroIn(std::size_t first, std::size_t last, F&& f,
                        MayHold&& may_hold) {
    last = std::min(last, size_);
    if (first >= last) return;
    auto at = [&](std::size_t i, T& e) { f(first + i, e); };
    auto held = [&](std::size_t i, std::size_t n) {
      return may_hold(first + i, n);
    };
    VisitNonZero(data_ + first, last - first, at, held);
  }

  // Whether count elements from first are all zero bytes.
  static bool AllZero(const T* first, std::size_t count) {
    static constexpr unsigned char kZeros[4096] = {};
    const auto* b = reinterpret_cast<const unsigned char*>(first);
    for (std::size_t left = count * sizeof(T); left > 0;) {
      const std::size_t k = std::min(left, sizeof(kZeros));
      if (std::memcmp(b, kZeros, k) != 0) return false;
      b += k;
      left -= k;
    }
    return true;
  }

  // Keeps the first `keep` elements (keep <= size()).
  void Truncate(std::size_t keep) {
    if (keep >= size_) return;
    if (keep == 0) {
      Free();
      data_ = nullptr;
      dropped_ = 0;
      mapped_bytes_ = 0;
    } else if (mapped_bytes_ != 0) {
      // The whole pages past the kept elements go back.
      const std::size_t len = PageRound((dropped_ + keep) * sizeof(T));
      if (len < mapped_bytes_) {
        auto* block = reinterpret_cast<unsigned char*>(data_ - dropped_);
        if (munmap(block + len, mapped_bytes_ - len) == 0) mapped_bytes_ = len;
      }
    } else if (void* p = std::realloc(data_ - dropped_,
                                      (dropped_ + keep) * sizeof(T))) {
      data_ = static_cast<T*>(p) + dropped_;  // else the larger block is kept
    }
    size_ = keep;
  }

  // Keeps elements [count, size()) (count <= size()) without copying them:
  // the block still holds the dropped ones until they outnumber the kept,
  // then the kept move to a block of their own (copied as Tail's), so a
  // range cut off a page at a time from its front costs a copy of each
  // element about once, not once per cut.
  template <typename MayHold>
  void DropHead(std::size_t count, MayHold&& may_hold) {
    if (count == 0) return;
    if (count >= size_) {
      Truncate(0);
      return;
    }
    if (dropped_ + count > size_ - count) {
      *this = Tail(count, may_hold);
      return;
    }
    data_ += count;
    dropped_ += count;
    size_ -= count;
  }

 private:
  void Free() {
    if (data_ == nullptr) return;
    if (mapped_bytes_ != 0) {
      munmap(data_ - dropped_, mapped_bytes_);
    } else {
      std::free(data_ - dropped_);
    }
  }

  static std::size_t PageRound(std::size_t bytes) {
    static const std::size_t page =
        static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    return (bytes + page - 1) / page * page;
  }

  // Elements [from, from + n) as a new array; groups may_hold says are
  // zero, or that are, are left as calloc made them.
  template <typename MayHold>
  ZeroedArray Copy(std::size_t from, std::size_t n, MayHold& may_hold) const {
    ZeroedArray out(n);
    for (std::size_t i = 0; i < n; i += kGroup) {
      const std::size_t k = std::min(kGroup, n - i);
      if (may_hold(from + i, k) && !AllZero(data_ + from + i, k)) {
        std::memcpy(static_cast<void*>(out.data_ + i), data_ + from + i,
                    k * sizeof(T));
      }
    }
    return out;
  }

  // Sets data_ (and mapped_bytes_) to n zeroed elements; nullptr for none.
  void Allocate(std::size_t n) {
    if (n == 0) return;
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_alloc();
    if (n * sizeof(T) >= kMapBytes) {
      const std::size_t len = PageRound(n * sizeof(T));
      void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      data_ = static_cast<T*>(p);
      mapped_bytes_ = len;
      return;
    }
    void* p = std::calloc(n, sizeof(T));
    if (p == nullptr) throw std::bad_alloc();
    data_ = static_cast<T*>(p);
  }

  static constexpr std::size_t kGroup = 1024;  // elements tested at once
  static bool AnyMayHold(std::size_t, std::size_t) { return true; }

  template <typename P, typename F, typename MayHold>
  static void VisitNonZero(P data, std::size_t size, F& f, MayHold& may_hold) {
    for (std::size_t g = 0; g < size; g += kGroup) {
      const std::size_t end = std::min(size, g + kGroup);
      if (!may_hold(g, end - g) || AllZero(data + g, end - g)) continue;
      for (std::size_t i = g; i < end; ++i) {
        if (!AllZero(data + i, 1)) f(i, data[i]);
      }
    }
  }

  T* data_ = nullptr;  // element 0; the block starts dropped_ before it
  std::size_t size_ = 0;
  std::size_t dropped_ = 0;  // elements DropHead left at the block's start
  std::size_t mapped_bytes_ = 0;  // the block's length if mapped, else 0
};

}  // namespace samepage

#endif  // SAMEPAGE_CORE_ZEROED_ARRAY_H_
