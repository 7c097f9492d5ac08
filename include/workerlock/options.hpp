// workerlock/options.hpp: the knobs of a lock: Mechanism, where it logs, and Options.
// Every field has a safe default; `Options{}` is what is_primary_worker() uses.
#pragma once

#include <cstddef>
#include <iterator>
#include <string_view>

#include <fmt/format.h>

#include "detail/enum_formatter.hpp"
#include "log.hpp"

namespace workerlock {

//! Which kernel lock backs a WorkerLock. The README's "Mechanisms" table compares them.
enum class Mechanism {
  //! Linux open-file-description locks (F_OFD_SETLK). Owned by the open file, so closing
  //! some other descriptor of the file does not release it. The default.
  ofd,
  //! Classic POSIX record locks (F_SETLK). Owned by the process; interoperates with
  //! boost::interprocess::file_lock. Released when the process closes ANY descriptor of
  //! the file, so workerlock shares one descriptor between handles on the same file.
  posix,
  //! BSD flock(2). Owned by the open file; interoperates with flock(1) and Python filelock.
  flock,
};

inline constexpr Mechanism default_mechanism = Mechanism::ofd;

constexpr std::string_view to_string(Mechanism m) noexcept {
  constexpr std::string_view names[] = {"ofd", "posix", "flock"};
  const auto index = static_cast<std::size_t>(m);
  return index < std::size(names) ? names[index] : "unknown";
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

//! Passes one line to the sink of `options`; see log_line(const LogSink&, ...).
inline void log_line(const Options& options, LogLevel level, std::string_view line) noexcept {
  log_line(options.log, level, line);
}

}  // namespace detail

}  // namespace workerlock

template <>
struct fmt::formatter<workerlock::Mechanism>
    : workerlock::detail::enum_formatter<workerlock::Mechanism> {};
