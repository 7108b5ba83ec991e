// Two ways to do the same work, whichever is cheaper on this machine.
//
// Some choices of the backend go one way on one kind of machine and the
// other way on another: where the hypervisor shadows the guest's page
// tables (a PVM guest), the first touch of a page through a new page table
// entry costs about 5 us, and reading a frame with pread, or copying an
// application page into our own buffer before a pwrite, is cheaper; with
// nested paging (a KVM guest) that touch costs a fraction of it, and the
// detour costs more than it saves (docs/performance.md). CheaperOf times
// both ways on the work itself and keeps using the one cheaper per unit of
// work, trying the other one every kExploreEvery-th time so that a change
// of conditions is seen. That suits work whose cost stays with it (copying
// pages into frames); not work that makes later work cheaper (a fault on
// the frame view maps the frames next to it too, which later reads find
// mapped), which a probe measures instead (PreadBeatsColdView).
//
// No allocation, no system call (the caller times the work): usable inside
// a write-protect window. Thread-compatible.

#ifndef SAMEPAGE_BACKEND_CHEAPER_OF_H_
#define SAMEPAGE_BACKEND_CHEAPER_OF_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace samepage::backend {

class CheaperOf {
 public:
  static constexpr std::uint32_t kWarmup = 4;         // samples of each first
  static constexpr std::uint32_t kExploreEvery = 16;  // then 1 in 16: the other
  // A sample at most this many times the running cost: one interrupted by
  // the host or the scheduler does not turn the choice for long.
  static constexpr double kMaxJump = 4;

  // forced: 0 or 1 always picks that way (tests, a configured choice);
  // anything else measures.
  explicit CheaperOf(int forced = -1)
      : forced_(forced == 0 || forced == 1 ? forced : -1) {}

  // The way to use next: 0 or 1.
  int Pick() {
    if (forced_ >= 0) return forced_;
    if (samples_[0] < kWarmup || samples_[1] < kWarmup) {
      return samples_[1] < samples_[0] ? 1 : 0;
    }
    const int best = cost_[1] < cost_[0] ? 1 : 0;
    return ++picks_ % kExploreEvery == 0 ? 1 - best : best;
  }

  // `way` did `units` of work in `ns` nanoseconds.
  void Record(int way, std::int64_t ns, std::size_t units) {
    if ((way != 0 && way != 1) || units == 0 || ns < 0) return;
    double c = static_cast<double>(ns) / static_cast<double>(units);
    if (samples_[way] == 0) {
      cost_[way] = c;
    } else {
      c = std::min(c, kMaxJump * cost_[way]);
      cost_[way] += (c - cost_[way]) / 8;
    }
    if (samples_[way] != UINT32_MAX) ++samples_[way];
  }

  // The running cost per unit of `way` (0 before its first sample).
  double Cost(int way) const { return cost_[way == 1 ? 1 : 0]; }

 private:
  int forced_;
  double cost_[2] = {0, 0};  // ns per unit, a moving average
  std::uint32_t samples_[2] = {0, 0};
  std::uint32_t picks_ = 0;
};

}  // namespace samepage::backend

#endif  // SAMEPAGE_BACKEND_CHEAPER_OF_H_
