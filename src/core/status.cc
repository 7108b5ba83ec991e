#include "samepage/status.h"

#include <cstring>

namespace samepage {

std::string Status::ToString() const {
  if (ok()) return "OK";
  return message_ + " (" + std::strerror(code_) + ")";
}

}  // namespace samepage
