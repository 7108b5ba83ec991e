// Merges two identical pages through the installed library: exit 0 on success.
#include <samepage/engine.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstring>
#include <string>

int main() {
  std::unique_ptr<samepage::Engine> engine;
  samepage::Status st = samepage::Engine::Create({}, &engine);
  if (!st.ok()) {
    std::fprintf(stderr, "Create: %s\n", st.ToString().c_str());
    return 1;
  }
  void* p = mmap(nullptr, 2 * 4096, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  std::memset(p, 'z', 2 * 4096);
  if (!engine->Madvise(p, 2 * 4096, MADV_MERGEABLE).ok()) return 2;
  engine->RunFullScans(2);
  std::string sharing;
  if (!engine->ReadKnob("pages_sharing", &sharing).ok()) return 3;
  std::printf("pages_sharing %s", sharing.c_str());
  return sharing == "1\n" ? 0 : 4;
}
