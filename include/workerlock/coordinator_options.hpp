// workerlock/coordinator_options.hpp: CoordinatorOptions, WaitMode and StopScope: how a
// Coordinator waits, retries and stops.
#pragma once

#include <chrono>
#include <string>

#include <fmt/format.h>

#include "detail/start_failure.hpp"
#include "detail/wakeup_signal.hpp"
#include "error.hpp"
#include "options.hpp"

namespace workerlock {

//! How a standby waits for the lock.
enum class WaitMode {
  //! A background thread sleeps in the kernel's blocking lock call (F_OFD_SETLKW, flock,
  //! F_SETLKW): no CPU while idle, promoted within about a millisecond of the holder's death.
  background_thread,
  //! No thread: the host calls Coordinator::poll() from its own event-loop timer every
  //! recommended_poll_interval; promotion happens on the first poll() after the holder dies.
  polled,
};

//! The poll() interval recommended for WaitMode::polled: failover then takes at most this
//! long (plus the timer's own slack), at the cost of one failed lock syscall per interval.
inline constexpr std::chrono::milliseconds recommended_poll_interval{50};

//! The longest CoordinatorOptions::server_stop_grace start() accepts: longer would leave a
//! server without a primary for longer than any stop takes.
inline constexpr std::chrono::milliseconds max_server_stop_grace = std::chrono::hours(1);

//! What a stop() or request_stop() is part of.
enum class StopScope {
  //! This worker alone stops (a rolling restart, a worker recycled after N requests): the
  //! primary hands over to a standby at once.
  worker,
  //! The whole server stops (every worker was, or is about to be, told to stop): the primary
  //! runs on_demoted and releases as usual, but first leaves a note, so that a standby
  //! promoted within CoordinatorOptions::server_stop_grace holds the lock without running
  //! on_startup or on_promoted until the grace has passed. A standby stopped during the grace
  //! releases without running any callback; one that is not stopped is promoted normally
  //! once the grace has passed, after checking that it still holds the lock. A mistaken
  //! whole_server stop therefore costs at most the grace without a primary, never more: a
  //! deferred standby that is itself stopped with whole_server keeps the original note (it
  //! never was the primary), so stopping every worker with whole_server, even in a rolling
  //! restart, does not extend it. During the deferral the worker holds the lock but reads
  //! secondary (role(), valid_until()), while lock_holder() and /proc/locks name it as the
  //! holder. Only FileBackend keeps such a note so far (the file `<lock path>.stopped`,
  //! dated on the monotonic clock and ignored after a reboot); on a backend that keeps none
  //! (Redis, PostgreSQL), it is a plain stop.
  whole_server,
};

//! Coordinator::start() checks these and throws lock_error (workerlock::errc::bad_configuration,
//! which compares equal to std::errc::invalid_argument) naming the field of a bad one.
struct CoordinatorOptions {
  //! Mechanism, log sink and the other lock options.
  Options lock{};
  WaitMode wait = WaitMode::background_thread;
  //! How often the primary checks that the path still names the file it holds (someone may
  //! have deleted or replaced it, which would let a second process lock a new file).
  //! Must be positive.
  std::chrono::milliseconds health_check_interval{1000};
  //! Backoff between retries after errors (EIO, ENOLCK, a vanished directory): it starts at
  //! retry_backoff_min and doubles up to retry_backoff_max. min must be positive, and max at
  //! least min.
  std::chrono::milliseconds retry_backoff_min{10};
  std::chrono::milliseconds retry_backoff_max{2000};
  //! The signal stop() sends to interrupt the waiting thread's blocking lock call. 0 picks
  //! SIGRTMIN + 5. Its handler is installed by workerlock, without SA_RESTART. Otherwise a
  //! signal number other than SIGKILL, SIGSTOP and the fault signals (SIGSEGV, SIGBUS, SIGFPE,
  //! SIGILL, SIGTRAP, SIGSYS, SIGABRT); leave it to workerlock after start(): a host that
  //! replaces its handler gets an error logged, and workerlock's handler back, at stop().
  int wakeup_signal = 0;
  //! The generation of the startup barrier; empty: StartupBarrier::master_generation(), read
  //! anew by each start() in the worker (never in the process that built the Coordinator).
  //! At most StartupBarrier::max_generation_size bytes, without a newline or a NUL.
  std::string startup_generation;
  //! After a stop(StopScope::whole_server) of the primary, how long a standby that takes
  //! the lock waits before it runs on_startup and on_promoted (see StopScope). Zero turns the
  //! note off; must not be negative nor longer than max_server_stop_grace.
  std::chrono::milliseconds server_stop_grace{1000};
};

namespace detail {

//! Sets `f` to errc::bad_configuration naming the first bad field of `o`; false if there is
//! one. Coordinator::start() checks this first.
inline bool check_coordinator_options(const CoordinatorOptions& o, start_failure& f) {
  constexpr const char* operation = "start the coordinator for";
  const auto invalid = make_error_code(errc::bad_configuration);
  if (o.health_check_interval <= std::chrono::milliseconds::zero())
    return f.set(invalid, operation,
                 fmt::format("CoordinatorOptions::health_check_interval is {} ms; it must be "
                             "positive",
                             o.health_check_interval.count()));
  if (o.retry_backoff_min <= std::chrono::milliseconds::zero())
    return f.set(invalid, operation,
                 fmt::format("CoordinatorOptions::retry_backoff_min is {} ms; it must be positive",
                             o.retry_backoff_min.count()));
  if (o.retry_backoff_max < o.retry_backoff_min)
    return f.set(invalid, operation,
                 fmt::format("CoordinatorOptions::retry_backoff_max ({} ms) is less than "
                             "CoordinatorOptions::retry_backoff_min ({} ms)",
                             o.retry_backoff_max.count(), o.retry_backoff_min.count()));
  if (o.server_stop_grace < std::chrono::milliseconds::zero())
    return f.set(invalid, operation,
                 fmt::format("CoordinatorOptions::server_stop_grace is {} ms; it must not be "
                             "negative",
                             o.server_stop_grace.count()));
  if (o.server_stop_grace > max_server_stop_grace)
    return f.set(invalid, operation,
                 fmt::format("CoordinatorOptions::server_stop_grace is {} ms; it must not be "
                             "longer than {} ms (max_server_stop_grace)",
                             o.server_stop_grace.count(), max_server_stop_grace.count()));
  if (o.wakeup_signal != 0 && !usable_wakeup_signal(o.wakeup_signal))
    return f.set(invalid, operation,
                 fmt::format("CoordinatorOptions::wakeup_signal {} cannot be used: 0 picks "
                             "SIGRTMIN+5, or choose a signal from SIGRTMIN to SIGRTMAX that the "
                             "host does not use",
                             o.wakeup_signal));
  return true;
}

}  // namespace detail

}  // namespace workerlock
