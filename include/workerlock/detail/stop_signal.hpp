// workerlock/detail/stop_signal.hpp: how a stop request reaches the Coordinator's role
// machine and drivers: two flags, a futex word to sleep on, and the backend's Interrupter.
#pragma once

#include <atomic>
#include <chrono>

#include "../interrupter.hpp"
#include "deadline.hpp"
#include "futex_word.hpp"

namespace workerlock::detail {

//! A stop request, seen by whoever drives the role machine. request() is async-signal-safe,
//! so Coordinator::request_stop() may run it from a signal handler.
struct stop_signal {
  std::atomic<bool> requested{false};
  std::atomic<bool> whole_server{false};  // the stop asked is StopScope::whole_server
  futex_word wakeups;                     // bumped by every request; sleepers wait on it
  Interrupter interrupter;                // ends the backend's wait_acquire()

  //! Asks to stop: wakes every sleep_until() and ends the backend's wait. The scope is
  //! stored before the request, so a racing reset() never separates the two.
  //! Async-signal-safe.
  void request(bool whole_server_stop) noexcept {
    if (whole_server_stop) whole_server.store(true);
    requested.store(true);
    wakeups.bump_and_wake();
    interrupter.interrupt();
  }

  //! Before a start: no request, no scope. The interrupter is cleared last: a request racing
  //! this keeps `requested`, which every driver checks before it waits.
  void reset() noexcept {
    whole_server.store(false);
    requested.store(false);
    interrupter.clear();
  }

  //! Sleeps until `deadline` (time_point::max(): forever) or a request, whichever comes
  //! first.
  void sleep_until(monotonic_clock::time_point deadline) noexcept {
    for (;;) {
      const auto seen = wakeups.load();
      if (requested.load() || monotonic_clock::now() >= deadline) return;
      wakeups.wait_while(seen, deadline);
    }
  }
};

}  // namespace workerlock::detail
