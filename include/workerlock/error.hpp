// workerlock/error.hpp: lock_error, the one exception type of workerlock, and workerlock::errc,
// the library's own error conditions. Every throwing call has a std::error_code& twin.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

namespace workerlock {

//! Conditions that are workerlock's own rather than the OS's. Each compares equal to the
//! std::errc that is natural for it (`ec == std::errc::operation_not_permitted` still works),
//! and to itself (`ec == workerlock::errc::foreign_owner`).
enum class errc {
  //! WORKERLOCK_ROLE=primary (or another value than unset, auto, secondary) was refused.
  role_override_refused = 1,
  //! WORKERLOCK_ROLE=secondary keeps this worker out of the election.
  kept_out_by_operator,
  //! The file, marker or lease belongs to someone else: workerlock will not write or remove it.
  foreign_owner,
  //! The call needs a handle that holds the lock, and this one does not.
  not_held,
  //! A lease (Redis, PostgreSQL) ran out or could not be renewed in time.
  lease_lost,
  //! An option, a path setting or an argument is invalid; the message names it.
  bad_configuration,
};

namespace detail {

class errc_category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "workerlock"; }

  std::string message(int value) const override {
    const auto* entry = find(value);
    return entry != nullptr ? entry->message : "unknown workerlock error";
  }

  std::error_condition default_error_condition(int value) const noexcept override {
    const auto* entry = find(value);
    if (entry == nullptr) return std::error_condition(value, *this);
    return std::make_error_condition(entry->natural);
  }

  bool equivalent(const std::error_code& code, int value) const noexcept override {
    return code.category() == *this && code.value() == value;
  }

 private:
  //! Each condition once: its message, and the std::errc it compares equal to.
  struct entry {
    errc code;
    const char* message;
    std::errc natural;
  };
  static const entry* find(int value) noexcept {
    static constexpr entry entries[] = {
        {errc::role_override_refused, "role override refused", std::errc::operation_not_permitted},
        {errc::kept_out_by_operator, "kept out of the election by the operator",
         std::errc::operation_not_permitted},
        {errc::foreign_owner, "owned by someone else", std::errc::operation_not_permitted},
        {errc::not_held, "the lock is not held by this handle", std::errc::operation_not_permitted},
        {errc::lease_lost, "lease lost", std::errc::timed_out},
        {errc::bad_configuration, "bad configuration", std::errc::invalid_argument},
    };
    for (const auto& e : entries)
      if (static_cast<int>(e.code) == value) return &e;
    return nullptr;
  }
};

}  // namespace detail

//! The category of workerlock::errc codes; name() is "workerlock".
inline const std::error_category& error_category() noexcept {
  static const detail::errc_category category;
  return category;
}

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

//! Thrown by every throwing call of workerlock.
//! what() names the operation, the path (or network target) and the reason, for example
//! `workerlock: cannot open lock file '/run/app/primary.lock' (the parent directory does not
//! exist ...): No such file or directory`.
class lock_error : public std::system_error {
 public:
  //! An error about a lock file (or its startup marker) at `path`.
  lock_error(std::string_view operation, const std::filesystem::path& path, std::error_code ec,
             std::string_view explanation = {})
      : std::system_error(ec, compose(operation, path.native(), explanation)),
        operation_(operation),
        path_(path) {}

  //! Names a network target (a Redis key, a PostgreSQL lock) instead of a path.
  struct network_target {
    std::string description;  //!< such as "redis 127.0.0.1:6379 key=app:primary"
  };

  //! An error about a network lease: path() is empty, target() names the server and key.
  lock_error(std::string_view operation, network_target target, std::error_code ec,
             std::string_view explanation = {})
      : std::system_error(ec, compose(operation, target.description, explanation)),
        operation_(operation),
        target_(std::move(target.description)) {}

  //! The operation that failed, such as "open lock file" or "lock".
  const std::string& operation() const noexcept { return operation_; }
  //! The lock file's path: absolute when it came through a WorkerLock, which resolves a
  //! relative path once, at construction; for a refused $WORKERLOCK_PATH, its value. Empty
  //! for errors about a network lease (see target()).
  const std::filesystem::path& path() const noexcept { return path_; }
  //! For errors about a network lease, the server and key (never a password); else empty.
  const std::string& target() const noexcept { return target_; }

 private:
  static std::string compose(std::string_view operation, std::string_view where,
                             std::string_view explanation) {
    if (explanation.empty()) return fmt::format("workerlock: cannot {} '{}'", operation, where);
    return fmt::format("workerlock: cannot {} '{}' ({})", operation, where, explanation);
  }

  std::string operation_;
  std::filesystem::path path_;
  std::string target_;
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
    set(std::error_code(errno_value, std::system_category()), op, why);
  }
  void set(errc condition, const char* op, const char* why = "") noexcept {
    set(make_error_code(condition), op, why);
  }
  void set(std::error_code ec, const char* op, const char* why = "") noexcept {
    code = ec;
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

template <>
struct std::is_error_code_enum<workerlock::errc> : std::true_type {};
