// workerlock/options.hpp: the knobs of a lock: Mechanism, the log sink, and Options.
// Every field has a safe default; `Options{}` is what is_primary_worker() uses.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace workerlock {

//! Which kernel lock backs a WorkerLock. The README's "Mechanisms" table compares them.
enum class Mechanism {
  //! Linux open-file-description locks (F_OFD_SETLK). Owned by the open file, so closing
  //! some other descriptor of the file does not release it. The default on Linux.
  ofd,
  //! Classic POSIX record locks (F_SETLK). Owned by the process; interoperates with
  //! boost::interprocess::file_lock. Released when the process closes ANY descriptor of
  //! the file, so workerlock shares one descriptor between handles on the same file.
  posix,
  //! BSD flock(2). Owned by the open file; interoperates with flock(1) and Python filelock.
  flock,
};

#ifdef F_OFD_SETLK
inline constexpr Mechanism default_mechanism = Mechanism::ofd;
#else
inline constexpr Mechanism default_mechanism = Mechanism::posix;
#endif

constexpr std::string_view to_string(Mechanism m) noexcept {
  switch (m) {
    case Mechanism::ofd:
      return "ofd";
    case Mechanism::posix:
      return "posix";
    case Mechanism::flock:
      return "flock";
  }
  return "unknown";
}

enum class LogLevel { info, warning, error };

constexpr std::string_view to_string(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::info:
      return "info";
    case LogLevel::warning:
      return "warning";
    case LogLevel::error:
      return "error";
  }
  return "unknown";
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

struct Options {
  //! The kernel lock to use; see Mechanism.
  Mechanism mechanism = default_mechanism;

  //! After acquiring, write the holder record (pid, acquisition time, host, pid namespace)
  //! into the lock file in place, so `cat` and lock_holder() can tell who holds it.
  bool write_holder_record = true;

  //! A lock file owned by another ordinary user inside a world-writable sticky directory
  //! such as /tmp lets that user hold the lock forever; opening one is refused unless
  //! this is set.
  bool allow_foreign_owner = false;

  //! Honour the operator override WORKERLOCK_ROLE=secondary in is_primary_worker().
  bool honour_role_override = true;

  //! Where election lines and warnings go. An empty sink is silent.
  LogSink log = stderr_sink;

  //! The same options with logging switched off.
  Options silent() const {
    Options copy = *this;
    copy.log = nullptr;
    return copy;
  }

  //! The same options with another mechanism.
  Options with(Mechanism m) const {
    Options copy = *this;
    copy.mechanism = m;
    return copy;
  }
};

namespace detail {

//! False, but only once T is known: a static_assert on it fires only where the template
//! around it is used (the rvalue overloads that refuse to read a temporary Election).
template <typename T>
inline constexpr bool dependent_false = false;

//! Passes one line to the sink of `options`; an exception from the sink loses the line only.
inline void log_line(const Options& options, LogLevel level, std::string_view line) noexcept {
  if (!options.log) return;
  try {
    options.log(level, line);
  } catch (...) {  // NOLINT(bugprone-empty-catch): documented at LogSink
  }
}

}  // namespace detail

}  // namespace workerlock

template <>
struct fmt::formatter<workerlock::Mechanism> : fmt::formatter<std::string_view> {
  template <typename FormatContext>
  auto format(workerlock::Mechanism m, FormatContext& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(workerlock::to_string(m), ctx);
  }
};
