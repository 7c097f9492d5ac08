// workerlock/detail/role_machine.hpp: the Coordinator's role machine: promote, defer, run the
// startup tasks, verify, demote; its drivers (a thread, poll()) only say when to step.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "../backend.hpp"
#include "../coordinator_options.hpp"
#include "../generation_marker.hpp"
#include "../options.hpp"
#include "../role.hpp"
#include "deadline.hpp"
#include "stop_signal.hpp"

namespace workerlock::detail {

//! The role of one Coordinator and every change of it, with the callbacks. A driver asks
//! next_step() what to do and not before when, sleeps (the thread) or returns (poll())
//! until then, and calls the matching member. Driven by one thread at a time; role() and
//! the thread ids are atomics, read from any thread.
class role_machine {
 public:
  using Callback = std::function<void()>;
  using time_point = std::chrono::steady_clock::time_point;

  enum class step {
    acquire,       //!< no hold: try_acquire() or wait_acquire(), then acquired()
    end_deferral,  //!< a hold deferred after a whole-server stop: end_deferral()
    check_hold,    //!< the primary's periodic verify_held(): check_hold()
  };
  struct planned_step {
    step what;
    time_point not_before;
  };

  role_machine(Backend& backend, const CoordinatorOptions& options, stop_signal& stop)
      : backend_(backend), options_(options), stop_(stop) {
    // Checks the generation and the room for the barrier's record now. The default
    // generation is read again at each start(), in the worker.
    std::shared_ptr<GenerationMarker> barrier = backend_.startup_barrier(
        options_.startup_generation.empty() ? master_generation() : options_.startup_generation);
    offers_barrier_ = barrier != nullptr;
    if (!options_.startup_generation.empty()) barrier_ = std::move(barrier);
  }

  Callback promoted, demoted, startup;  // set before start()

  Role role() const noexcept { return role_.load(); }
  bool offers_barrier() const noexcept { return offers_barrier_; }
  const std::string& description() const noexcept { return description_; }

  //! The coordinator thread (WaitMode::background_thread), which blocks every signal:
  //! callbacks run there with the host's mask. Set by that thread, read from any.
  std::atomic<std::thread::id> coordinator_thread{};
  //! The thread inside a callback, if any.
  std::atomic<std::thread::id> callback_thread{};

  //! This start()'s record of the startup barrier (before the first start() with the
  //! default generation: the calling process's master's), or nullptr without one.
  std::shared_ptr<const GenerationMarker> startup_barrier() const {
    {
      std::lock_guard<std::mutex> guard(barrier_mutex_);
      if (barrier_) return barrier_;
    }
    if (!offers_barrier_) return nullptr;
    return backend_.startup_barrier(master_generation());
  }

  //! Before start()'s first attempt, with no driver running: secondary, nothing scheduled,
  //! the backend described once (log lines then need no allocation) and, with the default
  //! generation, the generation read anew in this worker: a Coordinator built in the master
  //! must not take the master's parent (pid 1 under systemd) for the master.
  void prepare_start() {
    description_ = backend_.describe();
    if (offers_barrier_ && options_.startup_generation.empty()) {
      std::shared_ptr<GenerationMarker> fresh = backend_.startup_barrier(master_generation());
      std::lock_guard<std::mutex> guard(barrier_mutex_);
      barrier_ = std::move(fresh);
    }
    deferred_ = false;
    role_.store(Role::secondary);
  }

  //! After start()'s first attempt: `held` reads primary at once unless it will be
  //! deferred (acquired() follows, on the driver). Notes the host's signal mask.
  void started(bool held) noexcept {
    ::pthread_sigmask(SIG_SETMASK, nullptr, &host_mask_);
    if (held && server_stop_deferral() <= std::chrono::steady_clock::now())
      role_.store(Role::primary);
    backoff_ = options_.retry_backoff_min;
    next_attempt_ = std::chrono::steady_clock::now();
    if (!held)
      log(LogLevel::info, "workerlock: pid={} role=secondary {} (standby)", ::getpid(),
          description_);
  }
  //! A start() that failed after started(): nothing runs, nothing is held (the caller
  //! reset the backend), and the role reads secondary.
  void abandon_start() noexcept { role_.store(Role::secondary); }

  //! The signal mask of start()'s caller, which the coordinator thread's callbacks get.
  const sigset_t& host_mask() const noexcept { return host_mask_; }

  //! What the driver does next, and not before when.
  planned_step next_step() const noexcept {
    if (!backend_.held()) return {step::acquire, next_attempt_};
    if (deferred_) return {step::end_deferral, deferred_until_};
    return {step::check_hold, next_verify_};
  }

  //! Runs `what`; step::acquire through `attempt` (see acquire()).
  template <typename Attempt>
  void run(step what, Attempt&& attempt) noexcept {
    switch (what) {
      case step::acquire:
        return acquire(std::forward<Attempt>(attempt));
      case step::end_deferral:
        return end_deferral();
      case step::check_hold:
        return check_hold();
    }
  }

  //! step::acquire through `attempt` (the backend's try_acquire() or wait_acquire()): a hold
  //! is promoted unless a stop came meanwhile (then finish() releases it without callbacks);
  //! an error is logged and retried after the backoff.
  template <typename Attempt>
  void acquire(Attempt&& attempt) noexcept {
    bool got = false;
    try {
      got = attempt();
    } catch (const std::exception& error) {
      log(LogLevel::warning, "workerlock: pid={} standby: {}; retrying in {} ms", ::getpid(),
          error.what(), backoff_.count());
      backend_.reset();
      next_attempt_ = deadline_after(backoff_);
      backoff_ = doubled_backoff(backoff_);
      return;
    }
    if (!got || stop_.requested.load()) return;
    backoff_ = options_.retry_backoff_min;
    acquired();
  }

  //! A new hold. Takes the primary role, unless the previous primary noted a whole-server
  //! stop less than server_stop_grace ago: then this worker holds the lock without running
  //! callbacks until the grace has passed (step::end_deferral), and a stop during the grace
  //! releases it without callbacks (see finish()).
  void acquired() noexcept {
    const auto until = server_stop_deferral();
    const auto now = std::chrono::steady_clock::now();
    if (until <= now) return take_role();
    role_.store(Role::secondary);
    log(LogLevel::info,
        "workerlock: pid={} holds {} but defers on_promoted by {} ms: the previous primary "
        "stopped with the whole server",
        ::getpid(), description_,
        std::chrono::ceil<std::chrono::milliseconds>(until - now).count());
    deferred_ = true;
    deferred_until_ = until;
  }

  //! step::end_deferral: takes the role if this worker still holds the lock (the file may
  //! have been replaced or deleted meanwhile); if not, releases it without callbacks
  //! (on_promoted never ran), so that the standby machinery takes the lock anew.
  void end_deferral() noexcept {
    deferred_ = false;
    if (verify() != proof::lost) return take_role();
    log(LogLevel::warning,
        "workerlock: pid={} {}: the lock was lost during the deferral after a whole-server "
        "stop; releasing without callbacks",
        ::getpid(), description_);
    backend_.release();
    backend_.reset();
  }

  //! step::check_hold under the Backend error contract: schedules the next check (sooner,
  //! with backoff, while the hold cannot be proven, at valid_until() at the latest), or
  //! steps down.
  void check_hold() noexcept {
    switch (verify()) {
      case proof::held:
        verify_backoff_ = options_.retry_backoff_min;
        next_verify_ = deadline_after(backend_.verify_interval());
        return;
      case proof::unknown:
        next_verify_ =
            std::min(deadline_after(std::min(verify_backoff_, backend_.verify_interval())),
                     backend_.valid_until());
        verify_backoff_ = doubled_backoff(verify_backoff_);
        return;
      case proof::lost:
        log(LogLevel::warning, "workerlock: pid={} {}: the lock was lost; stepping down",
            ::getpid(), description_);
        demote("the lock was lost");
        backend_.reset();
        return;
    }
  }

  //! Leaving: a promoted primary runs on_demoted; a hold won just as the stop came in, or
  //! deferred after a whole-server stop, is released without callbacks, since on_promoted
  //! never ran for it. A whole-server stop leaves its note before the release.
  void finish() noexcept {
    const bool note =
        stop_.whole_server.load() && options_.server_stop_grace > std::chrono::milliseconds::zero();
    if (role_.load() == Role::primary) {
      demote(note ? "stopped with the whole server" : "stopped", note);
    } else {
      // A deferred hold keeps the note it deferred on (rewriting it would extend the time
      // without a primary at each stop); a hold won just as the stop came, with no current
      // note, leaves one.
      if (note && backend_.held() && server_stop_deferral() <= std::chrono::steady_clock::now())
        backend_.note_server_stopping();
      backend_.release();
    }
    deferred_ = false;
  }

  //! Formats only when there is a sink; a sink that throws loses its line, nothing else.
  template <typename... Args>
  void log(LogLevel level, fmt::format_string<Args...> format, Args&&... args) const noexcept {
    if (!options_.lock.log) return;
    try {
      options_.lock.log(level, fmt::format(format, std::forward<Args>(args)...));
    } catch (...) {
    }
  }

 private:
  //! verify_held()'s answer: `unknown` when it cannot tell and the hold is still valid
  //! (before valid_until()), `lost` once that passed.
  enum class proof { held, unknown, lost };
  proof verify() noexcept {
    try {
      return backend_.verify_held() ? proof::held : proof::lost;
    } catch (const std::exception& error) {
      const bool valid = std::chrono::steady_clock::now() < backend_.valid_until();
      log(LogLevel::warning, "workerlock: pid={} cannot verify the hold on {}: {}; {}", ::getpid(),
          description_, error.what(),
          valid ? "keeping it while it is valid, and checking again" : "it is no longer valid");
      return valid ? proof::unknown : proof::lost;
    }
  }

  void take_role() noexcept {
    role_.store(Role::primary);
    next_verify_ = deadline_after(backend_.verify_interval());
    verify_backoff_ = options_.retry_backoff_min;
    log(LogLevel::info, "workerlock: pid={} role=primary {}", ::getpid(), description_);
    bool completed = false;
    const bool tasks = startup && barrier_;  // start() refuses on_startup without a barrier
    if (tasks && !read_startup_marker(completed)) return;  // stepped down
    if (tasks && !completed && invoke(startup, "on_startup")) {
      try {
        barrier_->complete();
      } catch (const std::exception& error) {
        log(LogLevel::error, "workerlock: pid={} on_startup completed, but {}", ::getpid(),
            reason(error));
      }
    }
    invoke(promoted, "on_promoted");
  }

  //! Whether a primary completed the startup tasks in this generation. An unreadable
  //! record is no answer, and running the tasks on it could run them twice: then this
  //! worker releases without callbacks (on_promoted never ran) and the standby machinery
  //! tries again after a backoff (another standby, or this one once the record can be
  //! read); the result is false.
  bool read_startup_marker(bool& completed) noexcept {
    try {
      completed = barrier_->completed();
      startup_backoff_ = options_.retry_backoff_min;
      return true;
    } catch (const std::exception& error) {
      const auto pause = startup_backoff_;
      startup_backoff_ = doubled_backoff(startup_backoff_);
      log(LogLevel::error,
          "workerlock: pid={} {}; on_startup not run, stepping down and retrying in {} ms",
          ::getpid(), reason(error), pause.count());
      backend_.release();
      role_.store(Role::secondary);
      log(LogLevel::info,
          "workerlock: pid={} role=secondary {} (the startup marker cannot be read)", ::getpid(),
          description_);
      next_attempt_ = deadline_after(pause);
      return false;
    }
  }

  //! on_demoted first, then release: the successor never overlaps with us.
  //! `note`: leave the note of a whole-server stop before releasing.
  void demote(const char* why, bool note = false) noexcept {
    invoke(demoted, "on_demoted");
    if (note) backend_.note_server_stopping();
    backend_.release();
    role_.store(Role::secondary);
    log(LogLevel::info, "workerlock: pid={} role=secondary {} ({})", ::getpid(), description_, why);
  }

  //! Until when a new hold defers its promotion: the note of a whole-server stop plus
  //! server_stop_grace; time_point::min() when there is no recent note. A note dated in the
  //! future (another boot's clock) is ignored.
  time_point server_stop_deferral() const noexcept {
    const auto none = time_point::min();
    if (options_.server_stop_grace <= std::chrono::milliseconds::zero()) return none;
    const auto noted = backend_.server_stop_noted();
    if (!noted || *noted > std::chrono::steady_clock::now()) return none;
    // Saturated: start() bounds the grace, but the note's date is anyone's.
    const auto room = time_point::max() - *noted;
    if (std::chrono::duration_cast<std::chrono::nanoseconds>(options_.server_stop_grace) >= room)
      return time_point::max();
    return *noted + options_.server_stop_grace;
  }

  //! Runs `callback` with the host's signal mask (on the coordinator thread, which
  //! otherwise blocks every signal), so that the threads it starts inherit that mask. The
  //! wakeup signal cannot interrupt it: FileBackend sends it only during its wait, and
  //! drains a late one before returning. An exception is logged and swallowed.
  //! Returns: whether the callback returned normally.
  bool invoke(const Callback& callback, const char* name) noexcept {
    if (!callback) return true;
    const auto outer = callback_thread.exchange(std::this_thread::get_id());
    const bool on_thread = coordinator_thread.load() == std::this_thread::get_id();
    sigset_t own;
    if (on_thread) ::pthread_sigmask(SIG_SETMASK, &host_mask_, &own);
    bool returned = false;
    try {
      callback();
      returned = true;
    } catch (const std::exception& error) {
      log(LogLevel::error, "workerlock: pid={} {} threw: {}", ::getpid(), name, error.what());
    } catch (...) {
      log(LogLevel::error, "workerlock: pid={} {} threw a non-standard exception", ::getpid(),
          name);
    }
    if (on_thread) ::pthread_sigmask(SIG_SETMASK, &own, nullptr);
    callback_thread.store(outer);
    return returned;
  }

  //! `backoff` doubled, up to retry_backoff_max, without overflowing.
  std::chrono::milliseconds doubled_backoff(std::chrono::milliseconds backoff) const noexcept {
    return backoff > options_.retry_backoff_max / 2
               ? options_.retry_backoff_max
               : std::min(backoff * 2, options_.retry_backoff_max);
  }

  //! An error's what() for a log line, without the "workerlock: " that starts the line.
  static std::string_view reason(const std::exception& error) noexcept {
    std::string_view text = error.what();
    constexpr std::string_view prefix = "workerlock: ";
    if (text.substr(0, prefix.size()) == prefix) text.remove_prefix(prefix.size());
    return text;
  }

  Backend& backend_;
  const CoordinatorOptions& options_;
  stop_signal& stop_;
  std::string description_;
  std::atomic<Role> role_{Role::secondary};
  bool offers_barrier_ = false;  // the backend keeps a startup barrier's record
  // This start()'s record, written by prepare_start() under barrier_mutex_; null before the
  // first start() with the default generation, or when the backend keeps none.
  std::shared_ptr<GenerationMarker> barrier_;
  mutable std::mutex barrier_mutex_;
  sigset_t host_mask_{};  // the signal mask of start()'s caller, for callbacks on the thread

  // Touched only by the thread driving the machine.
  std::chrono::milliseconds backoff_{options_.retry_backoff_min};          // after acquire errors
  std::chrono::milliseconds startup_backoff_{options_.retry_backoff_min};  // unreadable record
  std::chrono::milliseconds verify_backoff_{options_.retry_backoff_min};   // unprovable hold
  time_point next_attempt_{};
  time_point next_verify_{};
  bool deferred_ = false;  // held, promotion deferred until deferred_until_ (see acquired())
  time_point deferred_until_{};
};

}  // namespace workerlock::detail
