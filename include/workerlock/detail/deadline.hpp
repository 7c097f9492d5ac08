// workerlock/detail/deadline.hpp: absolute deadlines on the monotonic clock, and the one
// sleep that waits for them, so a signal storm can never restart an interval.
#pragma once

#include <time.h>

#include <cerrno>
#include <chrono>
#include <type_traits>

namespace workerlock::detail {

//! std::chrono::steady_clock is CLOCK_MONOTONIC on Linux; sleep_until() relies on that.
using monotonic_clock = std::chrono::steady_clock;

//! now + timeout, saturated: hours::max() and other huge timeouts mean "never" instead of
//! overflowing into the past; a negative timeout means "now".
template <typename Rep, typename Period>
monotonic_clock::time_point deadline_after(
    const std::chrono::duration<Rep, Period>& timeout) noexcept {
  const auto now = monotonic_clock::now();
  if (!(timeout > std::chrono::duration<Rep, Period>::zero())) return now;  // NaN too
  using exact = std::chrono::duration<long double>;
  const auto room = monotonic_clock::time_point::max() - now;
  if (std::chrono::duration_cast<exact>(timeout) >= std::chrono::duration_cast<exact>(room))
    return monotonic_clock::time_point::max();
  return now + std::chrono::ceil<monotonic_clock::duration>(timeout);
}

//! The same deadline on the monotonic clock, for a deadline given on any clock, saturated:
//! the arithmetic is done in long double seconds, so a coarse Duration (hours) near its
//! max() never overflows on its way to the clock's nanoseconds.
template <typename Clock, typename Duration>
monotonic_clock::time_point to_monotonic(
    const std::chrono::time_point<Clock, Duration>& deadline) noexcept {
  using exact = std::chrono::duration<long double>;
  const auto since_epoch = [](const auto& t) {
    return std::chrono::duration_cast<exact>(t.time_since_epoch());
  };
  if constexpr (std::is_same_v<Clock, monotonic_clock>) {
    if (since_epoch(deadline) != since_epoch(deadline)) return monotonic_clock::now();  // NaN
    if (since_epoch(deadline) >= since_epoch(monotonic_clock::time_point::max()))
      return monotonic_clock::time_point::max();
    if (since_epoch(deadline) <= since_epoch(monotonic_clock::time_point::min()))
      return monotonic_clock::time_point::min();
    return std::chrono::time_point_cast<monotonic_clock::duration>(deadline);
  } else {
    return deadline_after(since_epoch(deadline) - since_epoch(Clock::now()));
  }
}

//! The same instant as a timespec on CLOCK_MONOTONIC, for the kernel's absolute waits.
inline struct timespec to_timespec(monotonic_clock::time_point at) noexcept {
  const auto since_epoch = at.time_since_epoch();
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
  struct timespec result {};
  result.tv_sec = static_cast<time_t>(seconds.count());
  result.tv_nsec = static_cast<long>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - seconds).count());
  return result;
}

//! Sleeps until `until` on CLOCK_MONOTONIC with an absolute deadline, so each EINTR resumes
//! the same wait instead of restarting it. Returns early only when `interruptible` and a
//! signal handler ran (then false; true once the deadline is reached).
inline bool sleep_until(monotonic_clock::time_point until, bool interruptible = false) noexcept {
  const struct timespec at = to_timespec(until);
  for (;;) {
    const int rc = ::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr);
    if (rc == 0) return true;
    if (rc != EINTR || interruptible) return false;
  }
}

}  // namespace workerlock::detail
