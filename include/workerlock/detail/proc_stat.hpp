// workerlock/detail/proc_stat.hpp: a process's start time, from /proc/PID/stat, to tell a
// record's writer from a later process that reused its pid.
#pragma once

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

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

//! The first 4 KiB of a small /proc file; empty if it cannot be read.
inline std::string read_proc_file(const char* path) {
  std::string text;
  if (std::FILE* file = std::fopen(path, "re")) {
    char buffer[4096];
    const auto got = std::fread(buffer, 1, sizeof buffer, file);
    std::fclose(file);
    text.assign(buffer, got);
  }
  return text;
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
