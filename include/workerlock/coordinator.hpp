// workerlock/coordinator.hpp: Coordinator keeps every secondary a live standby: when the
// primary dies, one standby is promoted at once and on_promoted/on_demoted tell the host.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "backend.hpp"
#include "election.hpp"
#include "error.hpp"
#include "file_backend.hpp"
#include "options.hpp"
#include "role.hpp"
#include "startup_barrier.hpp"
#include "worker_lock.hpp"

namespace workerlock {

//! How a standby waits for the lock.
enum class WaitMode {
  //! A background thread sleeps in the kernel's blocking lock call (F_OFD_SETLKW, flock,
  //! F_SETLKW): no CPU while idle, promoted tens of microseconds after the holder dies.
  background_thread,
  //! No thread: the host calls Coordinator::poll() from its own event-loop timer every
  //! recommended_poll_interval; promotion happens on the first poll() after the holder dies.
  polled,
};

//! The poll() interval recommended for WaitMode::polled: failover then takes at most this
//! long (plus the timer's own slack), at the cost of one failed lock syscall per interval.
inline constexpr std::chrono::milliseconds recommended_poll_interval{50};

struct CoordinatorOptions {
  //! Mechanism, log sink and the other lock options.
  Options lock{};
  WaitMode wait = WaitMode::background_thread;
  //! How often the primary checks that the path still names the file it holds (someone may
  //! have deleted or replaced it, which would let a second process lock a new file).
  std::chrono::milliseconds health_check_interval{1000};
  //! Backoff between retries after errors (EIO, ENOLCK, a vanished directory).
  std::chrono::milliseconds retry_backoff_min{10};
  std::chrono::milliseconds retry_backoff_max{2000};
  //! The signal stop() sends to interrupt the waiting thread's blocking lock call. 0 picks
  //! SIGRTMIN + 5. Its handler is installed by workerlock, without SA_RESTART.
  int wakeup_signal = 0;
  //! The generation of the startup barrier; empty: StartupBarrier::master_generation(), read
  //! anew by each start() in the worker (never in the process that built the Coordinator).
  //! At most StartupBarrier::max_generation_size bytes, without a newline or a NUL.
  std::string startup_generation;
};

//! Drives one lock file for the life of a worker: start() takes part in the election, and
//! whenever the role changes it calls on_promoted or on_demoted.
//!
//! Callbacks: each runs exactly once per role change, never two at once. In
//! WaitMode::background_thread they run on the coordinator's thread; in WaitMode::polled,
//! on the thread calling start(), poll() or stop(). on_demoted runs BEFORE the lock is
//! released, so the next primary never overlaps with this one. An exception thrown by a
//! callback is logged and swallowed. A callback may call stop() (it then takes effect when
//! the callback returns) but must not destroy the Coordinator.
class Coordinator {
 public:
  using Callback = std::function<void()>;

  //! Coordinates through a lock file at `path` (a FileBackend).
  explicit Coordinator(const std::filesystem::path& path, const CoordinatorOptions& options = {})
      : Coordinator(std::make_unique<FileBackend>(path, options.lock, options.wakeup_signal,
                                                  options.health_check_interval),
                    options) {}

  //! Coordinates through any Backend, such as a network lease.
  //! Throws: lock_error if startup_generation is invalid or the lock file's name leaves no
  //! room for the startup marker's (see StartupBarrier).
  explicit Coordinator(std::unique_ptr<Backend> backend, CoordinatorOptions options = {})
      : backend_(std::move(backend)),
        options_(std::move(options)),
        startup_marker_base_(backend_->startup_marker_base()),
        startup_backoff_(options_.retry_backoff_min) {
    if (startup_marker_base_.empty()) return;
    StartupBarrier::check_lock_path(startup_marker_base_);
    // The default generation is read by start(), in the worker.
    if (!options_.startup_generation.empty())
      barrier_.emplace(startup_marker_base_, options_.startup_generation,
                       options_.lock.allow_foreign_owner);
  }

  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  //! Stops (running on_demoted if primary) and joins the thread. Never throws.
  ~Coordinator() {
    stop();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  }

  //! Set the callbacks before start().
  Coordinator& on_promoted(Callback callback) {
    promoted_ = std::move(callback);
    return *this;
  }
  Coordinator& on_demoted(Callback callback) {
    demoted_ = std::move(callback);
    return *this;
  }
  //! One-off startup tasks (migrations): run by a newly promoted primary, before
  //! on_promoted, unless a primary already completed them in this generation. If the
  //! primary dies mid-task, the next primary runs them again.
  Coordinator& on_startup(Callback tasks) {
    startup_ = std::move(tasks);
    return *this;
  }

  //! Takes part in the election and returns at once: role() is primary now (on_promoted
  //! has run, or is about to on the coordinator thread), or this worker is a standby.
  //! Calling start() while running does nothing; after a callback called stop(), start()
  //! (from any thread but a callback) waits for that stop to finish, then starts afresh.
  //! Throws: lock_error if the lock file cannot be opened or locked; nothing is started.
  void start() {
    detail::failure f;
    begin(f);
    if (f) throw lock_error(f.operation, backend_->describe(), f.code, f.explanation);
  }
  void start(std::error_code& ec) {
    ec.clear();
    try {
      start();
    } catch (const std::system_error& error) {
      ec = error.code();
    }
  }

  //! Leaves the election: a primary runs on_demoted, then releases so another standby is
  //! promoted at once; a waiting standby stops waiting. Returns within milliseconds unless
  //! a callback is still running. Safe to call twice, and from a callback.
  void stop() noexcept {
    if (on_coordinator_thread()) {
      stop_requested_.store(true);  // the thread's loop ends once the callback returns
      return;
    }
    std::lock_guard<std::mutex> control(control_mutex_);
    if (!running_) return;
    stop_requested_.store(true);
    if (options_.wait == WaitMode::polled) {
      finish();
    } else {
      {
        std::lock_guard<std::mutex> guard(wait_mutex_);
        wake_.notify_all();
      }
      // A signal sent just before the thread enters its blocking call is lost; repeat.
      while (!thread_done_.load()) {
        backend_->interrupt();
        std::unique_lock<std::mutex> guard(wait_mutex_);
        wake_.wait_for(guard, std::chrono::milliseconds(1), [&] { return thread_done_.load(); });
      }
      if (thread_.joinable()) thread_.join();  // kept out of the election: no thread
    }
    running_ = false;
  }

  //! WaitMode::polled only: one step of the standby machinery. Call it every
  //! recommended_poll_interval from the host's event loop. Never throws and never waits for
  //! another thread: while start() or stop() runs elsewhere it returns at once. Callbacks
  //! (on_startup, on_promoted, on_demoted) run inside it, so it takes as long as they do.
  void poll() noexcept {
    if (options_.wait != WaitMode::polled) return;
    std::unique_lock<std::mutex> control(control_mutex_, std::try_to_lock);
    if (!control || !running_ || stop_requested_.load() || kept_out_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!backend_->held()) {
      if (now < next_attempt_) return;
      try {
        if (backend_->try_acquire()) {
          backoff_ = options_.retry_backoff_min;
          promote();
        }
      } catch (const std::exception& error) {
        report_retry(error);
        backend_->reset();
        next_attempt_ = now + backoff_;
        backoff_ = std::min(backoff_ * 2, options_.retry_backoff_max);
      }
    } else if (now - last_verified_ >= backend_->verify_interval()) {
      last_verified_ = now;
      if (!verify()) demote_and_reset("the lock was lost");
    }
    finish_stop_requested_by_callback();
  }

  Role role() const noexcept { return role_.load(); }
  bool running() const noexcept { return running_ && !stop_requested_.load(); }
  const Backend& backend() const noexcept { return *backend_; }
  //! The startup barrier of this start() (before the first one, with the default
  //! generation: of the calling process's master), or nullopt when the backend offers no
  //! place for its marker.
  std::optional<StartupBarrier> startup_barrier() const {
    {
      std::lock_guard<std::mutex> guard(barrier_mutex_);
      if (barrier_) return barrier_;
    }
    if (startup_marker_base_.empty()) return std::nullopt;
    return StartupBarrier(startup_marker_base_, StartupBarrier::master_generation(),
                          options_.lock.allow_foreign_owner);
  }
  //! The backend's fencing token of the current hold (0 for lock files).
  std::uint64_t fencing_token() const noexcept { return backend_->fencing_token(); }

  //! Waits until a primary completed the on_startup tasks of this generation, or until
  //! `timeout`; returns whether they completed. Workers started after completion return
  //! at once. Waiters keep waiting across a failover in the middle of the tasks. The wait
  //! ends at an absolute deadline, however many signals arrive.
  //! Throws: lock_error if the marker could not be read until the deadline (see
  //! StartupBarrier::wait_for()).
  bool wait_for_startup(std::chrono::milliseconds timeout) const {
    const auto barrier = startup_barrier();
    return barrier && barrier->wait_for(timeout);
  }
  bool wait_for_startup(std::chrono::milliseconds timeout, std::error_code& ec) const noexcept {
    ec.clear();
    try {
      const auto barrier = startup_barrier();
      return barrier && barrier->wait_for(timeout, ec);
    } catch (const std::system_error& error) {
      ec = error.code();
    } catch (const std::bad_alloc&) {
      ec = std::make_error_code(std::errc::not_enough_memory);
    }
    return false;
  }

 private:
  //! True on the coordinator thread (thread mode) and inside a callback (both modes): there
  //! stop() only asks, and the stop completes once the callback has returned.
  bool on_coordinator_thread() const noexcept {
    const auto me = std::this_thread::get_id();
    return coordinator_thread_.load() == me || callback_thread_.load() == me;
  }

  //! Polled mode: completes a stop() that a callback asked for. Requires control_mutex_.
  void finish_stop_requested_by_callback() noexcept {
    if (options_.wait != WaitMode::polled || !stop_requested_.load() || !running_) return;
    finish();
    running_ = false;
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

  void begin(detail::failure& f) {
    std::lock_guard<std::mutex> control(control_mutex_);
    if (running_) {
      if (!stop_requested_.load() || on_coordinator_thread()) return;
      // A callback asked to stop: that thread is ending (it runs on_demoted first); wait
      // for it, then start afresh.
      if (thread_.joinable()) thread_.join();
      running_ = false;
    }
    if (thread_.joinable()) thread_.join();
    // Formatted once, while no thread runs, so that log lines need no allocation.
    description_ = backend_->describe();
    read_default_startup_generation();
    stop_requested_.store(false);
    thread_done_.store(false);
    role_.store(Role::secondary);
    kept_out_ = detail::kept_out_by_operator(options_.lock, f);
    if (f) return;
    if (kept_out_) {
      running_ = true;
      thread_done_.store(true);  // no thread to wait for in stop()
      log(LogLevel::info,
          "workerlock: pid={} role=secondary {} (WORKERLOCK_ROLE=secondary; not a standby)",
          detail::current_pid(), description_);
      return;
    }
    backend_->clear_interrupt();
    backend_->prepare();
    const bool held = backend_->try_acquire();
    if (held) role_.store(Role::primary);  // on_promoted follows, here or on the thread
    running_ = true;
    backoff_ = options_.retry_backoff_min;
    last_verified_ = std::chrono::steady_clock::now();
    next_attempt_ = last_verified_;
    if (!held)
      log(LogLevel::info, "workerlock: pid={} role=secondary {} (standby)", detail::current_pid(),
          description_);
    if (options_.wait == WaitMode::polled) {
      if (held) promote();
      finish_stop_requested_by_callback();
      return;
    }
    // The thread blocks every signal (the backend unblocks the one it needs), so the
    // host's signals are delivered to its own threads.
    sigset_t all;
    sigset_t previous;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &previous);
    try {
      thread_ = std::thread([this, held] { run(held); });
    } catch (...) {
      ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
      running_ = false;
      backend_->release();
      throw;
    }
    ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }

  void run(bool held) noexcept {
    coordinator_thread_.store(std::this_thread::get_id());
    if (held) promote();
    while (!stop_requested_.load()) {
      if (!backend_->held()) {
        bool got = false;
        try {
          got = backend_->wait_acquire();
        } catch (const std::exception& error) {
          report_retry(error);
          backend_->reset();
          sleep_unless_stopped(backoff_);
          backoff_ = std::min(backoff_ * 2, options_.retry_backoff_max);
          continue;
        }
        if (stop_requested_.load()) break;
        if (got) {
          backoff_ = options_.retry_backoff_min;
          promote();
        }
      } else {
        sleep_unless_stopped(backend_->verify_interval());
        if (stop_requested_.load()) break;
        if (!verify()) demote_and_reset("the lock was lost");
      }
    }
    finish();
    coordinator_thread_.store(std::thread::id());
    std::lock_guard<std::mutex> guard(wait_mutex_);
    thread_done_.store(true);
    wake_.notify_all();
  }

  //! Leaving: a promoted primary runs on_demoted; a hold won just as stop() came in is
  //! released without callbacks, since on_promoted never ran for it.
  void finish() noexcept {
    if (role_.load() == Role::primary) {
      demote("stopped");
    } else {
      backend_->release();
    }
  }

  bool verify() noexcept {
    try {
      return backend_->verify_held();
    } catch (const std::exception& error) {
      log(LogLevel::warning, "workerlock: pid={} cannot verify the hold on {}: {}",
          detail::current_pid(), description_, error.what());
      return false;
    }
  }

  void sleep_unless_stopped(std::chrono::milliseconds duration) {
    std::unique_lock<std::mutex> guard(wait_mutex_);
    wake_.wait_for(guard, duration, [&] { return stop_requested_.load(); });
  }

  void report_retry(const std::exception& error) const {
    log(LogLevel::warning, "workerlock: pid={} standby: {}; retrying in {} ms",
        detail::current_pid(), error.what(), backoff_.count());
  }

  void invoke(const Callback& callback, const char* name) noexcept {
    if (!callback) return;
    const auto outer = callback_thread_.exchange(std::this_thread::get_id());
    try {
      callback();
    } catch (const std::exception& error) {
      log(LogLevel::error, "workerlock: pid={} {} threw: {}", detail::current_pid(), name,
          error.what());
    } catch (...) {
      log(LogLevel::error, "workerlock: pid={} {} threw a non-standard exception",
          detail::current_pid(), name);
    }
    callback_thread_.store(outer);
  }

  void promote() noexcept {
    role_.store(Role::primary);
    log(LogLevel::info, "workerlock: pid={} role=primary {}", detail::current_pid(), description_);
    bool completed = false;
    if (startup_ && barrier_ && !read_startup_marker(completed)) return;  // stepped down
    if (startup_ && barrier_ && !completed) {
      bool finished = true;
      const auto outer = callback_thread_.exchange(std::this_thread::get_id());
      try {
        startup_();
      } catch (const std::exception& error) {
        finished = false;
        log(LogLevel::error, "workerlock: pid={} on_startup threw: {}", detail::current_pid(),
            error.what());
      } catch (...) {
        finished = false;
        log(LogLevel::error, "workerlock: pid={} on_startup threw", detail::current_pid());
      }
      callback_thread_.store(outer);
      std::error_code ec;
      if (finished) barrier_->complete(ec);
      if (ec) {
        log(LogLevel::error, "workerlock: pid={} cannot mark startup complete in {}: {}",
            detail::current_pid(), barrier_->marker_path().native(), ec.message());
      }
    } else if (startup_ && !barrier_) {
      invoke(startup_, "on_startup");
    }
    invoke(promoted_, "on_promoted");
  }

  //! With the default generation, reads it anew at each start(), in this worker: a
  //! Coordinator built in the master (a global, say) must not take the master's parent
  //! (pid 1 under systemd) for the master. Requires control_mutex_ and no running thread.
  void read_default_startup_generation() {
    if (startup_marker_base_.empty() || !options_.startup_generation.empty()) return;
    StartupBarrier fresh(startup_marker_base_, StartupBarrier::master_generation(),
                         options_.lock.allow_foreign_owner);
    std::lock_guard<std::mutex> guard(barrier_mutex_);
    barrier_ = std::move(fresh);
  }

  //! Whether a primary completed the startup tasks in this generation. An unreadable marker
  //! is no answer, and running the tasks on it could run them twice: then this worker
  //! steps down instead, and the result is false.
  bool read_startup_marker(bool& completed) noexcept {
    detail::failure f;
    completed = barrier_->query(f);
    if (f) {
      step_down_for_unreadable_marker(f);
      return false;
    }
    startup_backoff_ = options_.retry_backoff_min;
    return true;
  }

  //! Releases the lock without callbacks (on_promoted never ran) and lets the standby
  //! machinery try again after a backoff: another standby, or this one once the marker
  //! can be read. The pause ends at once on stop().
  void step_down_for_unreadable_marker(const detail::failure& f) noexcept {
    const auto pause = startup_backoff_;
    startup_backoff_ = std::min(startup_backoff_ * 2, options_.retry_backoff_max);
    const bool explained = f.explanation != nullptr && *f.explanation != '\0';
    log(LogLevel::error,
        "workerlock: pid={} cannot {} '{}'{}{}{}: {}; on_startup not run, stepping down and "
        "retrying in {} ms",
        ::getpid(), f.operation, barrier_->marker_path().native(), explained ? " (" : "",
        explained ? f.explanation : "", explained ? ")" : "", f.code.message(), pause.count());
    backend_->release();
    role_.store(Role::secondary);
    log(LogLevel::info, "workerlock: pid={} role=secondary {} (the startup marker cannot be read)",
        ::getpid(), description_);
    if (options_.wait == WaitMode::polled) {
      next_attempt_ = std::chrono::steady_clock::now() + pause;
    } else {
      sleep_unless_stopped(pause);
    }
  }

  //! on_demoted first, then release: the successor never overlaps with us.
  void demote(const char* reason) noexcept {
    invoke(demoted_, "on_demoted");
    backend_->release();
    role_.store(Role::secondary);
    log(LogLevel::info, "workerlock: pid={} role=secondary {} ({})", detail::current_pid(),
        description_, reason);
  }

  void demote_and_reset(const char* reason) noexcept {
    log(LogLevel::warning, "workerlock: pid={} {}: {}; stepping down", detail::current_pid(),
        description_, reason);
    demote(reason);
    backend_->reset();
  }

  std::unique_ptr<Backend> backend_;
  std::string description_;
  CoordinatorOptions options_;
  std::filesystem::path startup_marker_base_;  // empty: the backend offers no marker
  std::optional<StartupBarrier> barrier_;      // written by begin() under barrier_mutex_
  mutable std::mutex barrier_mutex_;
  Callback promoted_;
  Callback demoted_;
  Callback startup_;

  std::mutex control_mutex_;          // serializes start() and stop()
  std::atomic<bool> running_{false};  // written under control_mutex_; running() reads it
  bool kept_out_ = false;
  std::atomic<Role> role_{Role::secondary};
  std::atomic<bool> stop_requested_{false};

  std::thread thread_;
  std::atomic<std::thread::id> coordinator_thread_{};
  std::atomic<std::thread::id> callback_thread_{};
  std::atomic<bool> thread_done_{false};
  std::mutex wait_mutex_;
  std::condition_variable wake_;

  // Retry state; touched only by the thread driving the backend.
  std::chrono::milliseconds backoff_{10};
  std::chrono::steady_clock::time_point next_attempt_{};
  std::chrono::steady_clock::time_point last_verified_{};
  std::chrono::milliseconds startup_backoff_;  // after an unreadable startup marker
};

}  // namespace workerlock
