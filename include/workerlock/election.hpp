// workerlock/election.hpp: is_primary_worker(), the one call a pre-fork worker's init hook
// makes, and default_lock_path(), where it locks when no path is given.
#pragma once

#include <errno.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/format.h>

#include "detail/lock_handle.hpp"
#include "detail/registry.hpp"
#include "detail/role_override.hpp"
#include "error.hpp"
#include "options.hpp"
#include "role.hpp"
#include "worker_lock.hpp"

namespace workerlock {

//! The result of is_primary_worker(): `auto [role, lock] = workerlock::is_primary_worker();`
//! or `auto election = workerlock::is_primary_worker();`, then `election.role`.
//! Keep `lock` alive for as long as the worker should stay primary: destroying it releases.
//! A secondary's lock holds nothing, and lock.try_lock() retries the election.
//! Reading the role of a temporary (`is_primary_worker().role == Role::primary`) does not
//! compile: the temporary's lock is released at the end of that statement.
struct [[nodiscard]] Election {
  ElectedRole role;
  WorkerLock lock;

  //! Secondary, holding nothing.
  Election() noexcept = default;
  Election(const ElectedRole& elected, WorkerLock held) noexcept
      : role(elected), lock(std::move(held)) {}

  //! Moves the lock; the moved-from Election reads secondary and holds nothing.
  Election(Election&& other) noexcept : role(other.role), lock(std::move(other.lock)) {
    other.role = secondary();
  }
  Election& operator=(Election&& other) noexcept {
    if (this != &other) {
      lock = std::move(other.lock);
      role = other.role;
      other.role = secondary();
    }
    return *this;
  }
  Election(const Election&) = delete;
  Election& operator=(const Election&) = delete;
  ~Election() = default;

 private:
  static const ElectedRole& secondary() noexcept {
    static const ElectedRole none;
    return none;
  }
};

namespace detail {

//! Why a $WORKERLOCK_PATH value is refused, or nullptr when it is a usable path: it must be
//! absolute and hold no control character (a trailing newline from a config template) and
//! no leading or trailing blank (a stray space).
inline const char* refuse_lock_path_setting(std::string_view value) noexcept {
  const bool blank_only = value.find_first_not_of(" \t\n\r\v\f") == std::string_view::npos;
  if (blank_only)
    return "WORKERLOCK_PATH holds only white space; unset it or give an absolute path";
  for (const char c : value) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      return "WORKERLOCK_PATH contains a control character, such as a trailing newline; give a "
             "plain absolute path";
  }
  if (value.front() == ' ' || value.back() == ' ')
    return "WORKERLOCK_PATH begins or ends with a space; give a plain absolute path";
  if (value.front() != '/')
    return "WORKERLOCK_PATH is a relative path, which would name another file after a chdir(); "
           "give an absolute path";
  return nullptr;
}

//! default_lock_path() behind both its forms; `f` names $WORKERLOCK_PATH when it is refused.
inline std::filesystem::path default_lock_path(failure& f) {
  const auto from_env = [](const char* name) -> std::string {
    const char* value = std::getenv(name);
    return value != nullptr ? std::string(value) : std::string();
  };
  if (auto explicit_path = from_env("WORKERLOCK_PATH"); !explicit_path.empty()) {
    if (const char* why = refuse_lock_path_setting(explicit_path)) {
      f.set(errc::bad_configuration, "use the lock path in WORKERLOCK_PATH", why);
    }
    return explicit_path;
  }

  // systemd and the XDG specification set absolute paths only; a relative value is ignored,
  // as the XDG specification says.
  const auto absolute_from_env = [&](const char* name) {
    auto value = from_env(name);
    return !value.empty() && value.front() == '/' ? value : std::string();
  };
  std::string program = program_invocation_short_name;
  if (program.empty()) program = "workerlock";
  if (auto runtime = absolute_from_env("RUNTIME_DIRECTORY"); !runtime.empty()) {
    runtime = runtime.substr(0, runtime.find(':'));  // systemd lists several dirs with ':'
    return std::filesystem::path(runtime) / (program + ".lock");
  }
  if (auto xdg = absolute_from_env("XDG_RUNTIME_DIR"); !xdg.empty())
    return std::filesystem::path(xdg) / (program + ".lock");
  const auto name = fmt::format("{}-{}.lock", program, ::geteuid());
  std::error_code ec;
  if (std::filesystem::is_directory("/run/lock", ec))
    return std::filesystem::path("/run/lock") / name;
  return std::filesystem::path("/tmp") / name;
}

}  // namespace detail

//! Returns the lock path used when none is given, the first that applies of:
//!  1. $WORKERLOCK_PATH, when set and not empty;
//!  2. $RUNTIME_DIRECTORY/<program>.lock (systemd's RuntimeDirectory=, private to the unit);
//!  3. $XDG_RUNTIME_DIR/<program>.lock (private to the user);
//!  4. /run/lock/<program>-<euid>.lock, or /tmp/<program>-<euid>.lock without /run/lock.
//! <program> is the executable's short name, so two deployments of the same program on one
//! host share a lock unless each sets WORKERLOCK_PATH or has its own RuntimeDirectory=.
//! Relative values of $RUNTIME_DIRECTORY and $XDG_RUNTIME_DIR are ignored.
//! Throws: lock_error (errc::bad_configuration, which compares equal to
//! std::errc::invalid_argument; what() names WORKERLOCK_PATH) when $WORKERLOCK_PATH is not a plain
//! absolute path: relative, white space only, with a leading or trailing space, or with a
//! control character such as a trailing newline.
inline std::filesystem::path default_lock_path() {
  detail::failure f;
  auto path = detail::default_lock_path(f);
  f.throw_if_failed(path);
  return path;
}

//! As above, but reports a refused $WORKERLOCK_PATH through `ec` (and a failed allocation
//! as std::errc::not_enough_memory) and then returns an empty path (which every lock call
//! refuses with EINVAL). Never throws.
inline std::filesystem::path default_lock_path(std::error_code& ec) noexcept {
  try {
    detail::failure f;
    auto path = detail::default_lock_path(f);
    ec = f.code;
    return f ? std::filesystem::path() : path;
  } catch (...) {  // only allocation throws in there
    ec = std::make_error_code(std::errc::not_enough_memory);
    return std::filesystem::path();
  }
}

namespace detail {

//! Warns when this process inherited, through fork(), a handle on `path` whose lock the
//! parent held: the master ran the election before forking its workers.
inline void warn_if_elected_before_fork(const std::filesystem::path& path, const Options& options) {
  pid_t parent = 0;
  {
    registry_guard reg;
    const auto* inherited = reg->find_if(
        [&](const lock_state& s) { return s.inherited && s.held_when_forked && s.path == path; });
    if (inherited != nullptr) parent = inherited->forked_from;
  }
  if (parent == 0) return;
  log_line(
      options, LogLevel::warning,
      fmt::format(
          "workerlock: pid={} warning: its parent pid={} won the election on {} before fork(); a "
          "forked child is never primary, and while the parent holds the lock no worker can be. "
          "Call is_primary_worker() in each worker after fork(), not in the master",
          ::getpid(), parent, path.native()));
}

//! The election behind both forms of is_primary_worker(). An error lands in `f` only: it is
//! reported once, by the caller (thrown, or through an error_code), never also logged.
inline Election elect(const std::filesystem::path& requested, const Options& options, failure& f) {
  const pid_t me = ::getpid();
  lock_handle lock(requested, options);
  const auto& path = lock.path();  // absolute, as the handle resolved it
  const auto secondary = [&] {
    return Election(ElectedRole(Role::secondary, me), WorkerLock(std::move(lock)));
  };

  if (kept_out_by_operator(options, f)) {
    lock.keep_out_by_operator();
    log_line(options, LogLevel::info,
             fmt::format("workerlock: pid={} role=secondary path={} (WORKERLOCK_ROLE=secondary)",
                         me, path.native()));
    return secondary();
  }
  if (f) return secondary();

  warn_if_elected_before_fork(path, options);
  const bool won = lock.acquire(wait_mode::try_once, f);
  if (f) return secondary();
  if (options.log) {
    if (won) {
      log_line(options, LogLevel::info,
               fmt::format("workerlock: pid={} role=primary path={} mechanism={}", me,
                           path.native(), options.mechanism));
    } else {
      log_line(options, LogLevel::info,
               fmt::format("workerlock: pid={} role=secondary path={} mechanism={} holder={}", me,
                           path.native(), options.mechanism, lock.recorded_holder_pid()));
    }
  }
  return Election(ElectedRole(won ? Role::primary : Role::secondary, me),
                  WorkerLock(std::move(lock)));
}

}  // namespace detail

//! Runs the election on `path`: exactly one live process holding the lock is primary.
//! Call it in each worker after fork(), from the worker's init hook.
//! Returns: {role, lock}. role == Role::primary in the one winner; everywhere else, and in
//! any process forked from the winner, it reads Role::secondary.
//! Throws: lock_error when the file cannot be opened, created or locked, or when
//! WORKERLOCK_ROLE is "primary" (errc::role_override_refused) or another value than unset,
//! "auto" or "secondary" (errc::bad_configuration).
//! An error never yields primary, and is reported once: thrown, not also logged.
//! Options::log receives the election's info and warning lines; an exception thrown by it
//! is dropped (see LogSink), so logging never changes the outcome.
//! Keep the result: `auto election = workerlock::is_primary_worker();` (see Election).
[[nodiscard]] inline Election is_primary_worker(
    const std::filesystem::path& path = default_lock_path(), const Options& options = {}) {
  detail::failure f;
  auto election = detail::elect(path, options, f);
  f.throw_if_failed(path);
  return election;
}

//! As above, but reports errors through `ec` (a failed allocation as
//! std::errc::not_enough_memory) and then returns Role::secondary. Never throws, whatever
//! Options::log does.
[[nodiscard]] inline Election is_primary_worker(const std::filesystem::path& path,
                                                const Options& options,
                                                std::error_code& ec) noexcept {
  try {
    detail::failure f;
    auto election = detail::elect(path, options, f);
    ec = f.code;
    return election;
  } catch (...) {  // only allocation throws in there
    ec = std::make_error_code(std::errc::not_enough_memory);
    return Election();
  }
}

}  // namespace workerlock
