// workerlock/detail/wakeup_signal.hpp: which signals may wake FileBackend's blocking lock
// call (CoordinatorOptions::wakeup_signal), and their names for log lines.
#pragma once

#include <signal.h>

#include <string>

#include <fmt/format.h>

namespace workerlock::detail {

//! Whether `signal` may serve as the coordinator's wakeup signal: a signal number of this
//! system other than SIGKILL and SIGSTOP (which take no handler) and the signals the kernel
//! sends for faults (a no-op handler there would turn a crash into an endless loop).
inline bool usable_wakeup_signal(int signal) noexcept {
  if (signal <= 0 || signal > SIGRTMAX) return false;
  switch (signal) {
    case SIGKILL:
    case SIGSTOP:
    case SIGSEGV:
    case SIGBUS:
    case SIGFPE:
    case SIGILL:
    case SIGTRAP:
    case SIGSYS:
    case SIGABRT:
      return false;
    default:
      return true;
  }
}

//! "SIGRTMIN+5 (signal 39)", "SIGUSR1 (signal 10)": a signal named for log lines.
inline std::string signal_name(int signal) {
  if (signal >= SIGRTMIN && signal <= SIGRTMAX)
    return fmt::format("SIGRTMIN+{} (signal {})", signal - SIGRTMIN, signal);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  if (const char* abbreviation = ::sigabbrev_np(signal); abbreviation != nullptr)
    return fmt::format("SIG{} (signal {})", abbreviation, signal);
#endif
  return fmt::format("signal {}", signal);
}

}  // namespace workerlock::detail
