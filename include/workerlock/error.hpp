// workerlock/error.hpp: lock_error, the one exception type of workerlock.
// Every throwing call has a twin taking std::error_code&, as in std::filesystem.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include <fmt/format.h>

namespace workerlock {

//! Thrown by every throwing call of workerlock.
//! what() names the operation, the path and the OS reason, for example
//! `workerlock: cannot open lock file '/run/app/primary.lock' (the parent directory does not
//! exist ...): No such file or directory`.
class lock_error : public std::system_error {
 public:
  lock_error(std::string_view operation, const std::filesystem::path& path, std::error_code ec,
             std::string_view explanation = {})
      : std::system_error(ec, compose(operation, path, explanation)),
        operation_(operation),
        path_(path) {}

  //! The operation that failed, such as "open lock file" or "lock".
  const std::string& operation() const noexcept { return operation_; }
  //! The lock file's path: absolute when it came through a WorkerLock, which resolves a
  //! relative path once, at construction; for a refused $WORKERLOCK_PATH, its value.
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  static std::string compose(std::string_view operation, const std::filesystem::path& path,
                             std::string_view explanation) {
    if (explanation.empty())
      return fmt::format("workerlock: cannot {} '{}'", operation, path.native());
    return fmt::format("workerlock: cannot {} '{}' ({})", operation, path.native(), explanation);
  }

  std::string operation_;
  std::filesystem::path path_;
};

namespace detail {

// What went wrong inside a noexcept implementation function; the public throwing wrapper
// turns it into a lock_error, the error_code twin keeps only `code`.
struct failure {
  std::error_code code;
  const char* operation = "";
  const char* explanation = "";

  explicit operator bool() const noexcept { return static_cast<bool>(code); }

  void set(int errno_value, const char* op, const char* why = "") noexcept {
    code = std::error_code(errno_value, std::system_category());
    operation = op;
    explanation = why;
  }

  [[noreturn]] void raise(const std::filesystem::path& path) const {
    throw lock_error(operation, path, code, explanation);
  }

  void throw_if_failed(const std::filesystem::path& path) const {
    if (code) raise(path);
  }
};

}  // namespace detail
}  // namespace workerlock
