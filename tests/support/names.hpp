// tests/support/names.hpp: how the tests print mechanisms, wait modes and roles, and the
// roles as the integers children store in shared memory.
#pragma once

#include <string>

#include <workerlock/workerlock.hpp>

namespace wltest {

//! "ofd", "posix" or "flock".
inline std::string name_of(workerlock::Mechanism m) {
  return std::string(workerlock::to_string(m));
}

//! "polled" or "background_thread".
inline const char* mode_name(workerlock::WaitMode mode) {
  return mode == workerlock::WaitMode::polled ? "polled" : "background_thread";
}

//! Role::primary and Role::secondary as stored in a std::atomic<int>.
inline constexpr int kPrimary = static_cast<int>(workerlock::Role::primary);
inline constexpr int kSecondary = static_cast<int>(workerlock::Role::secondary);

}  // namespace wltest
