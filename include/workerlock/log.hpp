// workerlock/log.hpp: how workerlock reports events: LogLevel, the LogSink a caller gives,
// and the default sink that writes each line to standard error.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <iterator>
#include <string_view>

namespace workerlock {

enum class LogLevel { info, warning, error };

constexpr std::string_view to_string(LogLevel level) noexcept {
  constexpr std::string_view names[] = {"info", "warning", "error"};
  const auto index = static_cast<std::size_t>(level);
  return index < std::size(names) ? names[index] : "unknown";
}

//! Receives one complete line (without the trailing newline) per event. A sink should not
//! throw; if it does, the line is lost and the exception dropped: logging never changes the
//! outcome of a workerlock call, nor escapes one (every std::error_code& twin is noexcept).
using LogSink = std::function<void(LogLevel, std::string_view line)>;

//! The default sink: each line goes to standard error in ONE write(2), so lines from many
//! workers sharing a terminal or a journal never interleave.
inline void stderr_sink(LogLevel /*level*/, std::string_view line) noexcept {
  char buffer[1024];
  const auto size = std::min(line.size(), sizeof buffer - 1);
  std::copy_n(line.data(), size, buffer);
  buffer[size] = '\n';
  [[maybe_unused]] auto written = ::write(STDERR_FILENO, buffer, size + 1);
}

namespace detail {

//! Passes one line to `sink` (none: silent); an exception from the sink loses the line only.
inline void log_line(const LogSink& sink, LogLevel level, std::string_view line) noexcept {
  if (!sink) return;
  try {
    sink(level, line);
  } catch (...) {  // NOLINT(bugprone-empty-catch): documented at LogSink
  }
}

}  // namespace detail

}  // namespace workerlock
