// tests/support/clock.hpp: the monotonic clock of the tests: timestamps that forked children
// store in shared memory, and the differences the parent reports in milliseconds.
#pragma once

#include <time.h>

#include <chrono>
#include <cstdint>

namespace wltest {

//! CLOCK_MONOTONIC in nanoseconds: the same in every process, so a child's stamp can be
//! compared with the parent's.
inline std::int64_t mono_ns() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

//! CLOCK_MONOTONIC in milliseconds.
inline std::int64_t now_ms() { return mono_ns() / 1000000; }

//! The milliseconds from one mono_ns() stamp to a later one.
inline double ms_between(std::int64_t from_ns, std::int64_t to_ns) {
  return static_cast<double>(to_ns - from_ns) / 1e6;
}

//! A steady_clock duration in (fractional) milliseconds.
inline double to_ms(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

//! How many seconds lie between two wall-clock times, in either order.
inline double seconds_apart(std::chrono::system_clock::time_point a,
                            std::chrono::system_clock::time_point b) {
  return std::chrono::duration<double>(a > b ? a - b : b - a).count();
}

}  // namespace wltest
