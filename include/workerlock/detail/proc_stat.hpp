// workerlock/detail/proc_stat.hpp: small /proc readers: a process's start time (to tell a
// record's writer from a later process that reused its pid) and its pid in its own namespace.
#pragma once

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "posix.hpp"

namespace workerlock::detail {

//! Field 22 of a /proc/PID/stat line (starttime, in clock ticks since boot). Fields are
//! counted after the command name (field 2), which may hold spaces and ends at the last ')'.
inline std::optional<std::string> proc_stat_start_time(std::string_view stat_line) {
  const auto close = stat_line.rfind(')');
  if (close == std::string_view::npos) return std::nullopt;
  std::size_t begin = close + 1;  // the space before field 3
  for (int field = 3; field <= 22; ++field) {
    if (begin >= stat_line.size() || stat_line[begin] != ' ') return std::nullopt;
    ++begin;
    const auto end = std::min(stat_line.find(' ', begin), stat_line.size());
    if (field == 22) {
      if (end == begin) return std::nullopt;
      return std::string(stat_line.substr(begin, end - begin));
    }
    begin = end;
  }
  return std::nullopt;
}

//! Opens a /proc file read-only, never at 0, 1 or 2: a transient descriptor there could be
//! replaced under us by another thread's dup2() or freopen() of a standard stream, and our
//! close() would then close that stream. Returns -1 with errno on failure.
inline int open_proc_file(const char* path, int extra_flags = 0) noexcept {
  const int fd =
      retry_on_eintr([&] { return ::open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | extra_flags); });
  return keep_off_standard_streams(fd);
}

//! The first 4 KiB of a small /proc file; empty if it cannot be read.
inline std::string read_proc_file(const char* path) {
  std::string text;
  const int fd = open_proc_file(path);
  if (fd < 0) return text;
  char buffer[4096];
  std::size_t size = 0;
  while (size < sizeof buffer) {
    const ssize_t got =
        retry_on_eintr([&] { return ::read(fd, buffer + size, sizeof buffer - size); });
    if (got <= 0) break;
    size += static_cast<std::size_t>(got);
  }
  ::close(fd);
  text.assign(buffer, size);
  return text;
}

//! Process `pid` (as the procfs at /proc numbers it) in its own, innermost pid namespace:
//! the last number of the NSpid line of /proc/PID/status; nullopt if unknown.
inline std::optional<pid_t> pid_in_own_namespace(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/status", static_cast<int>(pid));
  const std::string status = read_proc_file(path);
  const auto at = status.find("\nNSpid:");
  if (at == std::string::npos) return std::nullopt;
  const auto end = std::min(status.find('\n', at + 1), status.size());
  const auto last = status.find_last_of(" \t", end - 1);
  if (last == std::string::npos || last < at || last + 1 >= end) return std::nullopt;
  const std::string number = status.substr(last + 1, end - last - 1);
  char* stop = nullptr;
  const long value = std::strtol(number.c_str(), &stop, 10);
  if (*stop != '\0' || value <= 0) return std::nullopt;
  return static_cast<pid_t>(value);
}

//! When process `pid` started, on the wall clock (to the clock tick); nullopt if unknown.
//! The kernel counts starttime on CLOCK_BOOTTIME; the wall clock's offset from it is taken
//! now, so a clock step since the process started shifts the answer by that step.
inline std::optional<std::chrono::system_clock::time_point> process_start_time(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  const auto ticks = proc_stat_start_time(read_proc_file(path));
  const long hz = ::sysconf(_SC_CLK_TCK);
  struct timespec boot {};
  if (!ticks || hz <= 0 || ::clock_gettime(CLOCK_BOOTTIME, &boot) != 0) return std::nullopt;
  const auto now = std::chrono::system_clock::now();
  const auto since_boot =
      std::chrono::seconds(boot.tv_sec) + std::chrono::nanoseconds(boot.tv_nsec);
  const auto started_since_boot = std::chrono::microseconds(
      static_cast<long long>(std::strtoull(ticks->c_str(), nullptr, 10) * 1000000ULL /
                             static_cast<unsigned long long>(hz)));
  return now - std::chrono::duration_cast<std::chrono::system_clock::duration>(since_boot -
                                                                               started_since_boot);
}

}  // namespace workerlock::detail
