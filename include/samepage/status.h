// samepage::Status: the outcome of a control-path call.
//
// code() is an errno value (0 on success) chosen to match what the kernel's
// KSM interface returns for the same request; message() says which call,
// address and reason, for humans.

#ifndef SAMEPAGE_STATUS_H_
#define SAMEPAGE_STATUS_H_

#include <cstring>
#include <string>
#include <utility>

namespace samepage {

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status Error(int code, std::string message) {
    return Status(code, std::move(message));
  }

  bool ok() const { return code_ == 0; }
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const {
    if (ok()) return "OK";
    return message_ + " (" + std::strerror(code_) + ")";
  }

 private:
  Status(int code, std::string message)
      : code_(code), message_(std::move(message)) {}
  int code_ = 0;
  std::string message_;
};

}  // namespace samepage

#endif  // SAMEPAGE_STATUS_H_
