// workerlock/coordinator.hpp: Coordinator keeps every secondary a live standby: when the
// primary dies, one standby is promoted at once and on_promoted/on_demoted tell the host.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "backend.hpp"
#include "coordinator_options.hpp"
#include "detail/coordinator_drivers.hpp"
#include "detail/role_machine.hpp"
#include "detail/role_override.hpp"
#include "detail/start_failure.hpp"
#include "detail/stop_signal.hpp"
#include "error.hpp"
#include "file_backend.hpp"
#include "generation_marker.hpp"
#include "role.hpp"

namespace workerlock {

//! Drives one lock file for the life of a worker: start() takes part in the election, and
//! whenever the role changes it calls on_promoted or on_demoted.
//!
//! Callbacks: each runs exactly once per role change, never two at once. In
//! WaitMode::background_thread they run on the coordinator's thread; in WaitMode::polled,
//! on the thread calling start(), poll() or stop(). on_demoted runs BEFORE the lock is
//! released, so the next primary never overlaps with this one. An exception thrown by a
//! callback is logged and swallowed. A callback may call every public member but the
//! destructor: stop() and request_stop() then take effect when the callback returns,
//! start() does nothing (it is running), poll() returns at once.
//!
//! Callbacks run with the signal mask the calling thread had at start() (the coordinator
//! thread itself blocks every signal), so the threads they start inherit the host's mask.
//!
//! Threads: role(), valid_until(), remaining_validity(), fencing_token() and running() may be read
//! from any thread at any time, also while the coordinator thread changes the role; they read
//! atomics (and the backend's, which are atomic too). The other members are called by one
//! thread at a time, or from callbacks as said above.
//!
//! Signal handlers may call request_stop(), role(), valid_until(), remaining_validity(),
//! fencing_token() and running(), and nothing else (these are async-signal-safe; stop() is
//! not).
//!
//! A lease (Redis, PostgreSQL) can run out while this process is paused (SIGSTOP, a long GC
//! pause, a stalled VM): role() and valid_until() compare the lease's local deadline with
//! the monotonic clock, so a woken holder reads secondary at once, before on_demoted had a
//! chance to run. The pattern for a singleton write is therefore to check right before each
//! write, and to pass the fencing token along with it:
//!
//!     if (coordinator.remaining_validity() > expected_write_time)
//!       store.write(data, coordinator.fencing_token());  // the store rejects older tokens
//!
//! Never compute `valid_until() - steady_clock::now()`: valid_until() is time_point::min()
//! when not primary (the subtraction overflows into "lots of time left") and max() for a
//! lock file. remaining_validity() saturates.
//!
//! Whole-server stop: a plain stop() of the primary hands the lock over at once, which a
//! rolling restart needs. When the whole server stops, the signals reach the workers one
//! after another, so the primary's stop() can promote a standby that is itself about to be
//! stopped, and on_promoted then starts work in a dying process. A host that knows that the
//! whole server is stopping calls stop(StopScope::whole_server) or
//! request_stop(StopScope::whole_server) instead (see StopScope).
//!
//! Fork: a copy of the Coordinator inherited through fork() (also a raw syscall(SYS_fork),
//! which runs no atfork handler) is inert in the child: role() is secondary, running() is
//! false, fencing_token() is 0, no callback runs, and stop(), poll(), request_stop() and the
//! destructor return at once without touching the parent's thread, mutexes or hold.
//! start() on such a copy throws, unless the parent had stopped it before the fork.
class Coordinator {
 public:
  using Callback = std::function<void()>;

  //! Coordinates through a lock file at `path` (a FileBackend).
  explicit Coordinator(const std::filesystem::path& path, const CoordinatorOptions& options = {})
      : Coordinator(std::make_unique<FileBackend>(path, options.lock, options.wakeup_signal,
                                                  options.health_check_interval),
                    options) {}

  //! Coordinates through any Backend, such as a network lease.
  //! Throws: lock_error if startup_generation is invalid or the backend's startup barrier
  //! has no room for it (for FileBackend: the lock file's name leaves no room for the
  //! marker's, see StartupBarrier).
  explicit Coordinator(std::unique_ptr<Backend> backend, CoordinatorOptions options = {})
      : backend_(std::move(backend)),
        options_(std::move(options)),
        machine_(*backend_, options_, stop_),
        driver_(detail::make_driver(options_.wait, machine_, *backend_, stop_, running_)) {}

  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  //! Stops (running on_demoted if primary) and joins the thread. Never throws. In a copy
  //! inherited through fork() it returns at once: the thread it names lives in the parent.
  ~Coordinator() {
    if (inherited_across_fork()) return;
    stop();
    driver_->release_thread();  // stop() was asked from the coordinator thread itself
  }

  //! Set the callbacks before start().
  Coordinator& on_promoted(Callback callback) {
    machine_.promoted = std::move(callback);
    return *this;
  }
  Coordinator& on_demoted(Callback callback) {
    machine_.demoted = std::move(callback);
    return *this;
  }
  //! One-off startup tasks (migrations): run by a newly promoted primary, before
  //! on_promoted, unless a primary already completed them in this generation. If the
  //! primary dies mid-task, the next primary runs them again. Needs a backend that keeps a
  //! startup barrier (Backend::startup_barrier(); FileBackend does): start() refuses it
  //! otherwise, rather than running the tasks on every promotion.
  Coordinator& on_startup(Callback tasks) {
    machine_.startup = std::move(tasks);
    return *this;
  }

  //! Takes part in the election and returns at once: role() is primary now (on_promoted
  //! has run, or is about to on the coordinator thread), or this worker is a standby.
  //! Calling start() while running does nothing, nor from a callback; after stop() was
  //! called from a callback or request_stop(), start() (from any thread but a callback)
  //! waits for that stop to finish, then starts afresh.
  //! Throws: lock_error, with path() the lock file's (see Backend::error_path()), or for a
  //! network backend an empty path() and target() its Backend::network_target(), if the
  //! options are invalid (errc::bad_configuration, naming the field; also on_startup on a
  //! backend without a startup barrier, naming the backend), the lock file cannot
  //! be opened or locked, or the coordinator thread cannot be created (its errno, such as
  //! EAGAIN when RLIMIT_NPROC or the cgroup's pids.max is reached), or this object is a copy
  //! of a running Coordinator inherited through fork() (operation_not_permitted). A
  //! lock_error thrown by the backend itself is passed on as it is. After a failure nothing
  //! is started, nothing is held, and role() is secondary. The error is reported once:
  //! thrown (or set in `ec`), never also logged.
  void start() {
    detail::start_failure f;
    if (!begin(f)) raise(f);
  }
  //! As start(), with the error in `ec` instead; never throws, even if the log sink does.
  void start(std::error_code& ec) noexcept {
    detail::start_failure f;
    begin(f);
    ec = f.code;
  }

  //! Leaves the election: a primary runs on_demoted, then releases so another standby is
  //! promoted at once; a waiting standby stops waiting. Returns within milliseconds unless
  //! a callback is still running, whatever the host did to the wakeup signal since start().
  //! One exception: a PostgreSQL backend looking up its server's name (libpq's resolver is
  //! not interruptible) finishes that lookup first. Safe to call twice, and from a callback. Not
  //! async-signal-safe: a signal handler calls request_stop() instead.
  void stop() noexcept { stop(StopScope::worker); }
  //! As stop(); StopScope::whole_server leaves the note described at StopScope.
  void stop(StopScope scope) noexcept {
    if (inherited_across_fork()) return;
    if (scope == StopScope::whole_server) stop_.whole_server.store(true);
    if (on_coordinator_thread()) {  // the stop completes once the callback returns
      request_stop(scope);
      return;
    }
    control_guard control(*this);
    if (!running_) return;
    complete_stop();
  }

  //! Asks the Coordinator to stop, without waiting: async-signal-safe (lock-free atomics, a
  //! futex wake, and Interrupter::interrupt()), so a SIGTERM handler may call it.
  //! In WaitMode::background_thread the coordinator thread then leaves by itself: a primary
  //! runs on_demoted and releases at once (on that thread), a standby stops waiting.
  //! In WaitMode::polled the next poll(), stop(), start() or the destructor completes it
  //! (runs on_demoted and releases). running() is false from now on; stop() or the
  //! destructor still joins the thread. Before start() it has no effect.
  //! One wakeup is sent: in the rare case that it reaches a waiting standby just before its
  //! thread enters the kernel's blocking lock call, that thread (which holds nothing) keeps
  //! waiting until stop() or the destructor, which repeat the wakeup until it leaves.
  void request_stop() noexcept { request_stop(StopScope::worker); }
  //! As request_stop(); StopScope::whole_server leaves the note described at StopScope.
  //! Async-signal-safe: the note is written later, by the thread that completes the stop.
  void request_stop(StopScope scope) noexcept {
    const int saved = errno;
    if (!inherited_across_fork()) stop_.request(scope == StopScope::whole_server);
    errno = saved;
  }

  //! WaitMode::polled only: one step of the standby machinery. Call it every
  //! recommended_poll_interval from the host's event loop. Never throws and never waits for
  //! another thread: while start() or stop() runs elsewhere it returns at once. Callbacks
  //! (on_startup, on_promoted, on_demoted) run inside it, so it takes as long as they do.
  //! Completes a stop asked by request_stop(). From a callback it returns at once.
  void poll() noexcept {
    if (inherited_across_fork() || on_coordinator_thread()) return;
    control_guard control(*this, std::try_to_lock);
    if (!control.owns_lock() || !running_) return;
    driver_->poll(kept_out_);
  }

  //! Primary only in the process that started the Coordinator (never in a child of fork()),
  //! while it holds the lock and, for a lease, before the lease's local deadline (see
  //! valid_until()): a lease that ran out reads secondary at once, before on_demoted runs.
  //! Safe from any thread, and async-signal-safe.
  Role role() const noexcept {
    const auto until = valid_until();
    if (until == std::chrono::steady_clock::time_point::max()) return Role::primary;
    return until > std::chrono::steady_clock::now() ? Role::primary : Role::secondary;
  }
  //! While primary: the local steady_clock instant until which this process may act as the
  //! primary (the backend's Backend::valid_until(): time_point::max() for a lock file, the
  //! lease's deadline for Redis and PostgreSQL). time_point::min() when not primary in this
  //! process. A host checks "still valid for the next N ms" with
  //! `remaining_validity() > N` before a write; never compute `valid_until() - now`, which
  //! overflows while not primary. Safe from any thread, and async-signal-safe.
  //! While primary: the local steady_clock instant until which this process may act as the
  //! primary (the backend's Backend::valid_until(): time_point::max() for a lock file, the
  //! lease's deadline for Redis and PostgreSQL). time_point::min() when not primary in this
  //! process. A host checks "still valid for the next N ms" with
  //! `remaining_validity() > N` before a write; never compute `valid_until() - now`, which
  //! overflows while not primary. Safe from any thread, and async-signal-safe.
  std::chrono::steady_clock::time_point valid_until() const noexcept {
    if (machine_.role() != Role::primary || inherited_across_fork())
      return std::chrono::steady_clock::time_point::min();
    return backend_->valid_until();
  }
  //! How long this process may still act as the primary, saturated: zero when not primary
  //! (or once a lease ran out), nanoseconds::max() for a lock file's hold, else the time
  //! left on the lease. Safe from any thread, and async-signal-safe.
  std::chrono::nanoseconds remaining_validity() const noexcept {
    const auto until = valid_until();
    if (until == std::chrono::steady_clock::time_point::max())
      return std::chrono::nanoseconds::max();
    const auto now = std::chrono::steady_clock::now();
    if (until <= now) return std::chrono::nanoseconds::zero();
    return std::chrono::duration_cast<std::chrono::nanoseconds>(until - now);
  }
  //! True from start() until stop() or request_stop(). Async-signal-safe.
  bool running() const noexcept {
    if (!running_.load() || stop_.requested.load()) return false;
    return !inherited_across_fork();
  }
  const Backend& backend() const noexcept { return *backend_; }
  //! The startup barrier's record of this start() (before the first one, with the default
  //! generation: of the calling process's master), or nullptr when the backend keeps none
  //! (see Backend::startup_barrier()). For FileBackend, a StartupBarrier.
  std::shared_ptr<const GenerationMarker> startup_barrier() const {
    return machine_.startup_barrier();
  }
  //! The backend's fencing token of the current hold (0 for lock files, and in a child of
  //! fork()). Safe from any thread, and async-signal-safe.
  std::uint64_t fencing_token() const noexcept {
    const std::uint64_t token = backend_->fencing_token();
    return token != 0 && !inherited_across_fork() ? token : 0;
  }

  //! Waits until a primary completed the on_startup tasks of this generation, or until
  //! `timeout`; returns whether they completed. Workers started after completion return
  //! at once. Waiters keep waiting across a failover in the middle of the tasks. The wait
  //! ends at an absolute deadline, however many signals arrive.
  //! Throws: lock_error if the record could not be read until the deadline (see
  //! wait_for_generation()).
  bool wait_for_startup(std::chrono::milliseconds timeout) const {
    detail::start_failure f;
    const bool done = await_startup(timeout, f);
    if (f.code) raise(f);
    return done;
  }
  //! As above, with the error in `ec` instead; never throws.
  bool wait_for_startup(std::chrono::milliseconds timeout, std::error_code& ec) const noexcept {
    detail::start_failure f;
    const bool done = await_startup(timeout, f);
    ec = f.code;
    return done && !f.code;
  }

 private:
  //! Holds control_mutex_ and notes which thread does, so that a call made on that thread
  //! while it holds it (from a callback of start() or poll(), or from a signal handler
  //! that interrupted them) is recognized instead of deadlocking.
  class control_guard {
   public:
    explicit control_guard(Coordinator& c) noexcept : c_(c), lock_(c.control_mutex_) { own(); }
    control_guard(Coordinator& c, std::try_to_lock_t) noexcept
        : c_(c), lock_(c.control_mutex_, std::try_to_lock) {
      if (lock_.owns_lock()) own();
    }
    ~control_guard() {
      if (lock_.owns_lock()) c_.control_owner_.store(std::thread::id());
    }
    control_guard(const control_guard&) = delete;
    control_guard& operator=(const control_guard&) = delete;
    bool owns_lock() const noexcept { return lock_.owns_lock(); }

   private:
    void own() noexcept { c_.control_owner_.store(std::this_thread::get_id()); }
    Coordinator& c_;
    std::unique_lock<std::mutex> lock_;
  };

  //! True in a process other than the one that started this Coordinator: a copy made by
  //! fork() or syscall(SYS_fork). Asks the kernel each time (getpid() is not cached).
  bool inherited_across_fork() const noexcept {
    const pid_t started_in = started_in_.load();
    return started_in != 0 && started_in != ::getpid();
  }

  //! True on the coordinator thread (thread mode), inside a callback (both modes), and on
  //! the thread inside start(), stop() or poll(): there stop() only asks, and the stop
  //! completes once the callback (or that call) returns.
  bool on_coordinator_thread() const noexcept {
    const auto me = std::this_thread::get_id();
    return machine_.coordinator_thread.load() == me || machine_.callback_thread.load() == me ||
           control_owner_.load() == me;
  }

  //! Completes a stop: the driver finishes the role machine (on_demoted, release) and
  //! stops. Requires control_mutex_ and running_.
  void complete_stop() noexcept {
    stop_.requested.store(true);
    driver_->finish();
    running_ = false;
  }

  //! Throws the lock_error that `f` describes: the backend's own (or its barrier's) as it
  //! was thrown, else one naming the network target or the lock file's path.
  [[noreturn]] void raise(const detail::start_failure& f) const {
    if (f.thrown) std::rethrow_exception(f.thrown);
    if (auto target = backend_->network_target(); !target.empty())
      throw lock_error(f.operation, lock_error::network_target{std::move(target)}, f.code,
                       f.explanation);
    throw lock_error(f.operation, backend_->error_path(), f.code, f.explanation);
  }

  //! The engine of both wait_for_startup(): `f` set on an error.
  bool await_startup(std::chrono::milliseconds timeout, detail::start_failure& f) const noexcept {
    try {
      const auto barrier = startup_barrier();
      return barrier && wait_for_generation(*barrier, timeout);
    } catch (...) {
      f.set_from_current_exception("wait for the startup of");
    }
    return false;
  }

  //! The engine of both start(): returns true once started, or sets `f` and leaves
  //! nothing started, nothing held and role() secondary.
  bool begin(detail::start_failure& f) noexcept {
    try {
      return begin_or_fail(f);
    } catch (...) {
      // Only allocations, the host's log sink and the backend's startup barrier throw in
      // begin_or_fail() before anything was started; what the backend throws later is
      // caught there.
      f.set_from_current_exception("start the coordinator for");
    }
    return false;
  }

  bool begin_or_fail(detail::start_failure& f) {
    constexpr const char* operation = "start the coordinator for";
    if (inherited_across_fork() && running_.load())
      return f.set(std::make_error_code(std::errc::operation_not_permitted), operation,
                   fmt::format("this Coordinator was started in pid {}, and a copy inherited "
                               "through fork() never takes part in the election: construct a "
                               "new Coordinator in this process",
                               started_in_.load()));
    if (on_coordinator_thread()) return true;  // a callback: running, by definition
    control_guard control(*this);
    if (inherited_across_fork()) {
      // A copy of a Coordinator the parent had stopped: nothing of it runs here.
      driver_->forget_inherited();
      machine_.callback_thread.store(std::thread::id());
    } else if (running_) {
      if (!stop_.requested.load()) return true;
      // A callback or request_stop() asked to stop: complete that stop (the thread runs
      // on_demoted first), then start afresh.
      complete_stop();
    }
    if (!detail::check_coordinator_options(options_, f)) return false;
    machine_.prepare_start();
    if (machine_.startup && !machine_.offers_barrier())
      return f.set(make_error_code(errc::bad_configuration), operation,
                   fmt::format("on_startup is set, but the backend ({}) keeps no startup barrier, "
                               "so the tasks could not run once per generation: run them "
                               "elsewhere, or use a backend that keeps one",
                               machine_.description()));
    stop_.reset();
    {
      detail::failure kept;
      kept_out_ = detail::kept_out_by_operator(options_.lock, kept);
      if (kept) return f.set(kept.code, kept.operation, kept.explanation);
    }
    started_in_.store(::getpid());
    if (kept_out_) {
      running_ = true;
      machine_.log(LogLevel::info,
                   "workerlock: pid={} role=secondary {} (WORKERLOCK_ROLE=secondary; not a "
                   "standby)",
                   ::getpid(), machine_.description());
      return true;
    }
    bool held = false;
    try {
      backend_->prepare();
      held = backend_->try_acquire();
    } catch (...) {
      backend_->reset();
      f.set_from_current_exception(operation);
      return false;
    }
    machine_.started(held);
    running_ = true;
    if (driver_->launch(held, f)) return true;
    running_ = false;
    backend_->reset();
    machine_.abandon_start();
    return false;
  }

  std::unique_ptr<Backend> backend_;
  CoordinatorOptions options_;
  detail::stop_signal stop_;
  detail::role_machine machine_;      // drives backend_; reads options_ and stop_
  std::atomic<bool> running_{false};  // written under control_mutex_; running() reads it
  std::unique_ptr<detail::coordinator_driver> driver_;  // the thread, or poll()

  std::mutex control_mutex_;                      // serializes start(), stop() and poll()
  std::atomic<std::thread::id> control_owner_{};  // the thread holding control_mutex_
  bool kept_out_ = false;
  std::atomic<pid_t> started_in_{0};  // the process that last started it; 0 before
};

}  // namespace workerlock
