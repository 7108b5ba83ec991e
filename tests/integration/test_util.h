// Helpers for tests on real memory through the public API.

#ifndef SAMEPAGE_TESTS_INTEGRATION_TEST_UTIL_H_
#define SAMEPAGE_TESTS_INTEGRATION_TEST_UTIL_H_

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>

#include "samepage/engine.h"

namespace samepage::testing {

inline constexpr std::size_t kPage = 4096;

// Built with AddressSanitizer or ThreadSanitizer: their runtimes make
// mlock() a no-op and map memory of their own (shadow, allocator) while a
// test runs, so checks of locked memory and of the process's memory
// figures cannot hold there (docs/design.md, "Sanitizer builds").
inline constexpr bool kUnderSanitizer =
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    true;
#else
    false;
#endif

// Built with ThreadSanitizer, whose runtime ends a child forked from a
// process with threads as soon as the child starts a thread of its own.
inline constexpr bool kUnderThreadSanitizer =
#if defined(__SANITIZE_THREAD__)
    true;
#else
    false;
#endif

// The page at p: `key` in its first 8 bytes, 0x5a after (distinct keys
// give distinct pages, beyond the 256 of a fill byte).
inline void FillKeyAt(unsigned char* p, std::uint64_t key) {
  std::memset(p, 0x5a, kPage);
  std::memcpy(p, &key, sizeof(key));
}
// True if the page at p is as FillKeyAt(p, key) left it.
inline bool HoldsKeyAt(const unsigned char* p, std::uint64_t key) {
  std::uint64_t k;
  std::memcpy(&k, p, sizeof(k));
  if (k != key) return false;
  for (std::size_t b = sizeof(k); b < kPage; ++b) {
    if (p[b] != 0x5a) return false;
  }
  return true;
}

// An anonymous private mapping, unmapped on destruction.
class Mapping {
 public:
  explicit Mapping(std::size_t pages, int flags = MAP_PRIVATE | MAP_ANONYMOUS)
      : pages_(pages) {
    void* p = mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
      ADD_FAILURE() << "mmap: " << std::strerror(errno);
      p = nullptr;
    }
    base_ = static_cast<unsigned char*>(p);
  }
  ~Mapping() {
    if (base_ != nullptr) munmap(base_, pages_ * kPage);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  unsigned char* page(std::size_t i) const { return base_ + i * kPage; }
  // The pages from `pages` on are no longer this mapping's (the test moved
  // or unmapped them): the destructor leaves that range alone, since
  // other memory may have been mapped there since.
  void Shrink(std::size_t pages) { pages_ = std::min(pages_, pages); }
  void* data() const { return base_; }
  std::size_t bytes() const { return pages_ * kPage; }
  std::size_t pages() const { return pages_; }
  void Fill(std::size_t i, unsigned char v) { std::memset(page(i), v, kPage); }
  void FillAll(unsigned char v) { std::memset(base_, v, bytes()); }
  // Page i: FillKeyAt.
  void FillKey(std::size_t i, std::uint64_t key) { FillKeyAt(page(i), key); }
  bool HoldsKey(std::size_t i, std::uint64_t key) const {
    return HoldsKeyAt(page(i), key);
  }
  // True if page i is kPage copies of v.
  bool Holds(std::size_t i, unsigned char v) const {
    for (std::size_t k = 0; k < kPage; ++k) {
      if (page(i)[k] != v) return false;
    }
    return true;
  }

 private:
  std::size_t pages_;
  unsigned char* base_ = nullptr;
};

inline std::unique_ptr<Engine> NewEngine(EngineOptions options = {}) {
  std::unique_ptr<Engine> e;
  Status st = Engine::Create(options, &e);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return e;
}

inline std::int64_t Counter(Engine& e, const char* name) {
  std::string text;
  Status st = e.ReadKnob(name, &text);
  EXPECT_TRUE(st.ok()) << name << ": " << st.ToString();
  return st.ok() ? std::stoll(text) : -1;
}

inline void Set(Engine& e, const char* name, const char* value) {
  Status st = e.WriteKnob(name, value);
  ASSERT_TRUE(st.ok()) << name << "=" << value << ": " << st.ToString();
}

// A field of /proc/self/smaps_rollup, in KiB (Pss counts a page mapped k
// times as 1/k per mapping, so merged pages count once).
inline long RollupKib(const std::string& field) {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string key, rest;
  long value = -1;
  while (in >> key) {
    if (key == field + ":") {
      in >> value;
      return value;
    }
    std::getline(in, rest);
  }
  return -1;
}

// True if the page at addr maps a file/shared page (/proc/self/pagemap bit
// 61): for samepage, a frame. The page is read first, since a freshly merged
// page has no page-table entry until it is touched.
inline bool MapsSharedFrame(const void* addr) {
  (void)*static_cast<const volatile unsigned char*>(addr);
  const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::uint64_t entry = 0;
  const off_t off = off_t(reinterpret_cast<std::uintptr_t>(addr) / kPage * 8);
  const bool ok = pread(fd, &entry, sizeof(entry), off) == sizeof(entry);
  close(fd);
  return ok && (entry >> 63 & 1) && (entry >> 61 & 1);
}

}  // namespace samepage::testing

#endif  // SAMEPAGE_TESTS_INTEGRATION_TEST_UTIL_H_
