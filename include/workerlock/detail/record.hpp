// workerlock/detail/record.hpp: the holder record a primary writes into its lock file, and
// its parser. Line 1 is the bare pid (pidfile style), then key=value lines.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/compile.h>
#include <fmt/format.h>

#include "../options.hpp"
#include "process_identity.hpp"

namespace workerlock::detail {

// Example:
//   4242
//   acquired=2026-11-28T00:45:12.123456Z
//   host=web-1
//   pidns=4026531836
//   mechanism=ofd
inline constexpr std::size_t max_record_size = 512;

struct record_fields {
  pid_t pid = 0;
  std::chrono::system_clock::time_point acquired{};
  std::string host;
  std::uint64_t pid_namespace = 0;
  std::string mechanism;
};

//! Looks up, once per process, what a record needs from the system: the host name, the pid
//! namespace and the C library's time zone data (gmtime_r loads it on first use: about ten
//! system calls). A standby calls it before it waits, so its first record after a failover
//! costs only the write.
inline void warm_record_caches() noexcept {
  (void)current_identity();
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
}

//! "YYYY-MM-DDTHH:MM:SS" of `seconds` (UTC), formatted once per second and thread: the
//! record is written on every acquisition, and zero-padded date fields are its main cost.
inline std::string_view utc_seconds_text(std::time_t seconds) noexcept {
  struct cache {
    std::time_t seconds = -1;
    char text[32] = {};
    std::size_t size = 0;
  };
  thread_local cache last;
  if (last.seconds != seconds) {
    std::tm utc{};
    ::gmtime_r(&seconds, &utc);
    const auto result = fmt::format_to_n(
        last.text, sizeof last.text, FMT_COMPILE("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}"),
        utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec);
    last.size = std::min(result.size, sizeof last.text);
    last.seconds = seconds;
  }
  return std::string_view(last.text, last.size);
}

//! Formats the record into `out` (at least max_record_size bytes); returns its length.
inline std::size_t format_record(char* out, pid_t pid, std::chrono::system_clock::time_point now,
                                 Mechanism mechanism) noexcept {
  const auto identity = current_identity();
  const auto since_epoch =
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch());
  const std::time_t seconds = static_cast<std::time_t>(since_epoch.count() / 1000000);
  const auto micros = static_cast<long>(since_epoch.count() % 1000000);
  // Bounded: the host name is at most 64 bytes, so the record always fits max_record_size.
  const char* end = fmt::format_to(
      out, FMT_COMPILE("{}\nacquired={}.{:06}Z\nhost={}\npidns={}\nmechanism={}\n"), pid,
      utc_seconds_text(seconds), micros, static_cast<const char*>(identity.host),
      identity.pid_namespace, to_string(mechanism));
  return static_cast<std::size_t>(end - out);
}

inline std::optional<std::chrono::system_clock::time_point> parse_utc(std::string_view text) {
  std::tm utc{};
  long micros = 0;
  char zone = 0;
  const std::string copy(text);
  if (std::sscanf(copy.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d.%6ld%c", &utc.tm_year, &utc.tm_mon,
                  &utc.tm_mday, &utc.tm_hour, &utc.tm_min, &utc.tm_sec, &micros, &zone) != 8 ||
      zone != 'Z')
    return std::nullopt;
  utc.tm_year -= 1900;
  utc.tm_mon -= 1;
  const std::time_t seconds = ::timegm(&utc);
  if (seconds == static_cast<std::time_t>(-1)) return std::nullopt;
  return std::chrono::system_clock::time_point(std::chrono::seconds(seconds) +
                                               std::chrono::microseconds(micros));
}

//! Parses a record; anything that is not a record written by workerlock (empty, garbage, a
//! pidfile of another program) yields nullopt rather than a guess.
inline std::optional<record_fields> parse_record(std::string_view text) {
  record_fields fields;
  bool have_pid = false;
  bool have_time = false;
  std::size_t line_number = 0;
  while (!text.empty()) {
    const auto end = text.find('\n');
    if (end == std::string_view::npos) break;  // a record always ends with a newline
    const auto line = text.substr(0, end);
    text.remove_prefix(end + 1);
    if (line_number++ == 0) {
      long value = 0;
      const std::string copy(line);
      char trailing = 0;
      // A pid is a positive int: a larger number would wrap (4294967296 to 0) when narrowed.
      if (std::sscanf(copy.c_str(), "%ld%c", &value, &trailing) != 1 || value <= 0 ||
          value > std::numeric_limits<pid_t>::max())
        return std::nullopt;
      fields.pid = static_cast<pid_t>(value);
      have_pid = true;
      continue;
    }
    const auto eq = line.find('=');
    if (eq == std::string_view::npos) return std::nullopt;
    const auto key = line.substr(0, eq);
    const auto value = line.substr(eq + 1);
    if (key == "acquired") {
      auto when = parse_utc(value);
      if (!when) return std::nullopt;
      fields.acquired = *when;
      have_time = true;
    } else if (key == "host") {
      fields.host = std::string(value);
    } else if (key == "pidns") {
      fields.pid_namespace = std::strtoull(std::string(value).c_str(), nullptr, 10);
    } else if (key == "mechanism") {
      fields.mechanism = std::string(value);
      break;  // the last line; bytes after it are the tail of an older, longer record
    }
  }
  if (!have_pid || !have_time) return std::nullopt;
  return fields;
}

}  // namespace workerlock::detail
