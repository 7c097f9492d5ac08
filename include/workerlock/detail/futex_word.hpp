// workerlock/detail/futex_word.hpp: a word threads sleep on until it changes (a Linux futex),
// woken async-signal-safely, with nothing to destroy in a child of fork().
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>

#include "deadline.hpp"

namespace workerlock::detail {

//! A 32-bit word that threads sleep on until it changes: a Linux futex. Waking is
//! async-signal-safe, and there is nothing to destroy, so a copy inherited through fork()
//! never blocks the child's exit (a std::condition_variable's destructor waits for its
//! waiters, and in a child those never existed).
class futex_word {
 public:
  std::uint32_t load() const noexcept { return word_.load(); }

  //! Stores `value` and wakes every sleeper. Async-signal-safe.
  void store_and_wake(std::uint32_t value) noexcept {
    word_.store(value);
    wake();
  }
  //! Adds one and wakes every sleeper. Async-signal-safe.
  void bump_and_wake() noexcept {
    word_.fetch_add(1);
    wake();
  }

  //! Sleeps while the word equals `seen`, until `deadline` at the latest (CLOCK_MONOTONIC,
  //! time_point::max() for never). May return early; callers re-check their condition.
  void wait_while(std::uint32_t seen, monotonic_clock::time_point deadline) noexcept {
    const int saved = errno;
    const bool forever = deadline == monotonic_clock::time_point::max();
    const struct timespec at = to_timespec(deadline);
    ::syscall(SYS_futex, address(), FUTEX_WAIT_BITSET_PRIVATE, seen, forever ? nullptr : &at,
              nullptr, FUTEX_BITSET_MATCH_ANY);
    errno = saved;
  }

 private:
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                std::atomic<std::uint32_t>::is_always_lock_free);

  void wake() noexcept {
    const int saved = errno;
    ::syscall(SYS_futex, address(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    errno = saved;
  }
  std::uint32_t* address() noexcept { return reinterpret_cast<std::uint32_t*>(&word_); }

  std::atomic<std::uint32_t> word_{0};
};

}  // namespace workerlock::detail
