// workerlock/coordinator.hpp: Coordinator keeps every secondary a live standby: when the
// primary dies, one standby is promoted at once and on_promoted/on_demoted tell the host.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
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
#include "detail/deadline.hpp"
#include "detail/futex_word.hpp"
#include "election.hpp"
#include "error.hpp"
#include "file_backend.hpp"
#include "generation_marker.hpp"
#include "interrupter.hpp"
#include "options.hpp"
#include "role.hpp"
#include "startup_barrier.hpp"
#include "worker_lock.hpp"

namespace workerlock {

namespace detail {

//! What went wrong in Coordinator::start() or wait_for_startup(): the throwing call turns
//! it into a lock_error, the error_code twin keeps only `code`.
struct start_failure {
  std::error_code code;
  std::string operation;
  std::string explanation;
  std::exception_ptr thrown;  // a lock_error of the backend, passed on as it is

  //! Returns false, for `return f.set(...)` in a function that reports success.
  bool set(std::error_code ec, const char* op, std::string why = {}) {
    code = ec;
    operation = op;
    explanation = std::move(why);
    return false;
  }

  //! From inside a catch block: the exception being handled, turned into an error. A
  //! lock_error is kept as it is; a std::system_error keeps its code; anything else is EIO
  //! (ENOMEM for std::bad_alloc). Never throws, even when out of memory (then the
  //! explanation is lost).
  void set_from_current_exception(const char* op) noexcept {
    const char* why = "";
    try {
      throw;
    } catch (const lock_error& error) {
      code = error.code();
      thrown = std::current_exception();
      return;
    } catch (const std::system_error& error) {
      code = error.code();
      why = error.what();
    } catch (const std::bad_alloc&) {
      code = std::make_error_code(std::errc::not_enough_memory);
    } catch (const std::exception& error) {
      code = std::make_error_code(std::errc::io_error);
      why = error.what();
    } catch (...) {
      code = std::make_error_code(std::errc::io_error);
      why = "an exception of an unknown type";
    }
    try {
      operation = op;
      explanation = why;
    } catch (...) {
    }
  }
};

}  // namespace detail

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
  //! Throws: lock_error if startup_generation is invalid or the lock file's name leaves no
  //! room for the startup marker's (see StartupBarrier).
  explicit Coordinator(std::unique_ptr<Backend> backend, CoordinatorOptions options = {})
      : backend_(std::move(backend)),
        options_(std::move(options)),
        startup_backoff_(options_.retry_backoff_min) {
    // Checks the generation and the room for the barrier's record now. The default
    // generation is read again by start(), in the worker.
    std::shared_ptr<GenerationMarker> barrier = backend_->startup_barrier(
        options_.startup_generation.empty() ? StartupBarrier::master_generation()
                                            : options_.startup_generation);
    offers_barrier_ = barrier != nullptr;
    if (!options_.startup_generation.empty()) barrier_ = std::move(barrier);
  }

  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  //! Stops (running on_demoted if primary) and joins the thread. Never throws. In a copy
  //! inherited through fork() it returns at once: the thread it names lives in the parent.
  ~Coordinator() {
    if (inherited_across_fork()) return;
    stop();
    if (thread_started_) {  // stop() was asked from the coordinator thread itself
      if (::pthread_equal(thread_, ::pthread_self()) != 0) {
        ::pthread_detach(thread_);
      } else {
        ::pthread_join(thread_, nullptr);
      }
    }
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
  //! Calling start() while running does nothing, nor from a callback; after stop() was
  //! called from a callback or request_stop(), start() (from any thread but a callback)
  //! waits for that stop to finish, then starts afresh.
  //! Throws: lock_error, with path() the lock file's (see Backend::error_path()), or for a
  //! network backend an empty path() and target() its Backend::network_target(), if the
  //! options are invalid (errc::bad_configuration, naming the field), the lock file cannot
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
  //! Safe to call twice, and from a callback. Not async-signal-safe: a signal handler calls
  //! request_stop() instead.
  void stop() noexcept { stop(StopScope::worker); }
  //! As stop(); StopScope::whole_server leaves the note described at StopScope.
  void stop(StopScope scope) noexcept {
    if (inherited_across_fork()) return;
    if (scope == StopScope::whole_server) whole_server_stop_.store(true);
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
    if (!inherited_across_fork()) {
      if (scope == StopScope::whole_server) whole_server_stop_.store(true);
      stop_requested_.store(true);
      wakeups_.bump_and_wake();
      if (running_.load()) interrupter_.interrupt();
    }
    errno = saved;
  }

  //! WaitMode::polled only: one step of the standby machinery. Call it every
  //! recommended_poll_interval from the host's event loop. Never throws and never waits for
  //! another thread: while start() or stop() runs elsewhere it returns at once. Callbacks
  //! (on_startup, on_promoted, on_demoted) run inside it, so it takes as long as they do.
  //! Completes a stop asked by request_stop(). From a callback it returns at once.
  void poll() noexcept {
    if (options_.wait != WaitMode::polled || inherited_across_fork() || on_coordinator_thread())
      return;
    control_guard control(*this, std::try_to_lock);
    if (!control.owns_lock() || !running_) return;
    if (stop_requested_.load()) {
      complete_stop();
      return;
    }
    if (kept_out_) return;
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
        next_attempt_ = detail::deadline_after(backoff_);
        backoff_ = doubled_backoff(backoff_);
      }
    } else if (promotion_deferred_) {
      if (now >= deferred_until_) {
        promotion_deferred_ = false;
        if (still_held_after_deferral()) take_role();
      }
    } else if (now >= next_verify_) {
      check_hold();
    }
    finish_stop_requested_by_callback();
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
  std::chrono::steady_clock::time_point valid_until() const noexcept {
    if (role_.load() != Role::primary || inherited_across_fork())
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
    if (!running_.load() || stop_requested_.load()) return false;
    return !inherited_across_fork();
  }
  const Backend& backend() const noexcept { return *backend_; }
  //! The startup barrier's record of this start() (before the first one, with the default
  //! generation: of the calling process's master), or nullptr when the backend keeps none
  //! (see Backend::startup_barrier()). For FileBackend, a StartupBarrier.
  std::shared_ptr<const GenerationMarker> startup_barrier() const {
    {
      std::lock_guard<std::mutex> guard(barrier_mutex_);
      if (barrier_) return barrier_;
    }
    if (!offers_barrier_) return nullptr;
    return backend_->startup_barrier(StartupBarrier::master_generation());
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
    return coordinator_thread_.load() == me || callback_thread_.load() == me ||
           control_owner_.load() == me;
  }

  //! Completes a stop: a polled Coordinator leaves here (on_demoted, release); the thread is
  //! asked to leave and joined. Requires control_mutex_ and running_.
  void complete_stop() noexcept {
    stop_requested_.store(true);
    if (options_.wait == WaitMode::polled) {
      finish();
    } else {
      end_thread();
    }
    running_ = false;
  }

  //! Wakes the coordinator thread and waits until it has left, interrupting the backend's
  //! wait every millisecond: a signal sent just before the thread enters its blocking call
  //! is lost, and FileBackend's kick also undoes a host's change to the signal's handler.
  //! Requires control_mutex_ and stop_requested_.
  void end_thread() noexcept {
    if (!thread_started_) return;
    wakeups_.bump_and_wake();
    while (thread_done_.load() == 0) {
      interrupter_.interrupt();
      thread_done_.wait_while(0, detail::deadline_after(std::chrono::milliseconds(1)));
    }
    ::pthread_join(thread_, nullptr);
    thread_started_ = false;
  }

  //! Polled mode: completes a stop() that a callback asked for. Requires control_mutex_.
  void finish_stop_requested_by_callback() noexcept {
    if (options_.wait != WaitMode::polled || !stop_requested_.load() || !running_) return;
    finish();
    running_ = false;
  }

  //! An error's what() for a log line, without the "workerlock: " that starts the line.
  static std::string_view reason(const std::exception& error) noexcept {
    std::string_view text = error.what();
    constexpr std::string_view prefix = "workerlock: ";
    if (text.substr(0, prefix.size()) == prefix) text.remove_prefix(prefix.size());
    return text;
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

  //! Throws the lock_error that `f` describes: the backend's own as it was thrown, else one
  //! naming the network target or the lock file's path.
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

  //! Sets `f` to errc::bad_configuration naming the first bad field; false if there is one.
  bool check_options(detail::start_failure& f) const {
    constexpr const char* operation = "start the coordinator for";
    const auto invalid = make_error_code(errc::bad_configuration);
    const auto& o = options_;
    if (o.health_check_interval <= std::chrono::milliseconds::zero())
      return f.set(invalid, operation,
                   fmt::format("CoordinatorOptions::health_check_interval is {} ms; it must be "
                               "positive",
                               o.health_check_interval.count()));
    if (o.retry_backoff_min <= std::chrono::milliseconds::zero())
      return f.set(
          invalid, operation,
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
    if (o.wakeup_signal != 0 && !detail::usable_wakeup_signal(o.wakeup_signal))
      return f.set(invalid, operation,
                   fmt::format("CoordinatorOptions::wakeup_signal {} cannot be used: 0 picks "
                               "SIGRTMIN+5, or choose a signal from SIGRTMIN to SIGRTMAX that the "
                               "host does not use",
                               o.wakeup_signal));
    return true;
  }

  //! The engine of both start(): returns true once started, or sets `f` and leaves
  //! nothing started, nothing held and role() secondary.
  bool begin(detail::start_failure& f) noexcept {
    try {
      return begin_or_fail(f);
    } catch (...) {
      // Only allocations and the host's log sink throw in begin_or_fail(), before anything
      // was started; what the backend throws is caught there.
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
      thread_started_ = false;
      coordinator_thread_.store(std::thread::id());
      callback_thread_.store(std::thread::id());
    } else if (running_) {
      if (!stop_requested_.load()) return true;
      // A callback or request_stop() asked to stop: complete that stop (the thread runs
      // on_demoted first), then start afresh.
      complete_stop();
    }
    if (!check_options(f)) return false;
    // Formatted once, while no thread runs, so that log lines need no allocation.
    description_ = backend_->describe();
    if (startup_ && !offers_barrier_)
      return f.set(make_error_code(errc::bad_configuration), operation,
                   fmt::format("on_startup is set, but the backend ({}) keeps no startup barrier, "
                               "so the tasks could not run once per generation: run them "
                               "elsewhere, or use a backend that keeps one",
                               description_));
    read_default_startup_generation();
    // The scope first: a request_stop(whole_server) from a signal handler racing this start()
    // sets it before stop_requested_, so it keeps its scope.
    whole_server_stop_.store(false);
    stop_requested_.store(false);
    promotion_deferred_ = false;
    thread_done_.store_and_wake(0);
    role_.store(Role::secondary);
    {
      detail::failure kept;
      kept_out_ = detail::kept_out_by_operator(options_.lock, kept);
      if (kept) return f.set(kept.code, kept.operation, kept.explanation);
    }
    started_in_.store(::getpid());
    if (kept_out_) {
      running_ = true;
      log(LogLevel::info,
          "workerlock: pid={} role=secondary {} (WORKERLOCK_ROLE=secondary; not a standby)",
          ::getpid(), description_);
      return true;
    }
    bool held = false;
    try {
      interrupter_.clear();
      backend_->prepare();
      held = backend_->try_acquire();
    } catch (...) {
      backend_->reset();
      f.set_from_current_exception(operation);
      return false;
    }
    // The host's signal mask, for the callbacks (the coordinator thread blocks every signal).
    ::pthread_sigmask(SIG_SETMASK, nullptr, &host_mask_);
    if (held && server_stop_deferral() <= std::chrono::steady_clock::now())
      role_.store(Role::primary);  // on_promoted follows, here or on the thread
    running_ = true;
    backoff_ = options_.retry_backoff_min;
    next_attempt_ = std::chrono::steady_clock::now();
    next_verify_ = detail::deadline_after(backend_->verify_interval());
    if (!held)
      log(LogLevel::info, "workerlock: pid={} role=secondary {} (standby)", ::getpid(),
          description_);
    if (options_.wait == WaitMode::polled) {
      if (held) promote();
      finish_stop_requested_by_callback();
      return true;
    }
    // The thread blocks every signal (the backend unblocks the one it needs, and callbacks
    // run with host_mask_), so the host's signals are delivered to its own threads.
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
    promote_on_thread_start_ = held;
    const int rc = ::pthread_create(&thread_, nullptr, &thread_main, this);
    ::pthread_sigmask(SIG_SETMASK, &host_mask_, nullptr);
    if (rc != 0) {
      running_ = false;
      backend_->reset();
      role_.store(Role::secondary);
      return f.set(std::error_code(rc, std::system_category()), "start the coordinator thread for",
                   "pthread_create failed: the process, its user (RLIMIT_NPROC) or its cgroup "
                   "(pids.max) may have reached its limit of threads, or memory ran out");
    }
    thread_started_ = true;
    return true;
  }

  static void* thread_main(void* self) noexcept {
    static_cast<Coordinator*>(self)->run();
    return nullptr;
  }

  void run() noexcept {
    coordinator_thread_.store(std::this_thread::get_id());
    if (promote_on_thread_start_) promote();
    while (!stop_requested_.load()) {
      if (!backend_->held()) {
        bool got = false;
        try {
          got = backend_->wait_acquire(interrupter_);
        } catch (const std::exception& error) {
          report_retry(error);
          backend_->reset();
          sleep_unless_stopped(backoff_);
          backoff_ = doubled_backoff(backoff_);
          continue;
        }
        if (stop_requested_.load()) break;
        if (got) {
          backoff_ = options_.retry_backoff_min;
          promote();
        }
      } else {
        sleep_until_unless_stopped(next_verify_);
        if (stop_requested_.load()) break;
        check_hold();
      }
    }
    finish();
    coordinator_thread_.store(std::thread::id());
    thread_done_.store_and_wake(1);
  }

  //! Leaving: a promoted primary runs on_demoted; a hold won just as stop() came in, or
  //! deferred after a whole-server stop, is released without callbacks, since on_promoted
  //! never ran for it. A whole-server stop leaves its note before the release.
  void finish() noexcept {
    const bool note =
        whole_server_stop_.load() && options_.server_stop_grace > std::chrono::milliseconds::zero();
    if (role_.load() == Role::primary) {
      demote(note ? "stopped with the whole server" : "stopped", note);
    } else {
      // A hold never promoted: a deferred one keeps the note it deferred on (rewriting it
      // would extend the time without a primary at each stop); a hold won just as the stop
      // came, with no current note, leaves one.
      if (note && backend_->held() && server_stop_deferral() <= std::chrono::steady_clock::now())
        backend_->note_server_stopping();
      backend_->release();
    }
    promotion_deferred_ = false;
  }

  //! verify_held() under the Backend error contract: `unknown` when it cannot tell and
  //! the hold is still valid (before valid_until()), `lost` once that passed.
  enum class proof { held, unknown, lost };
  proof verify() noexcept {
    try {
      return backend_->verify_held() ? proof::held : proof::lost;
    } catch (const std::exception& error) {
      const bool valid = std::chrono::steady_clock::now() < backend_->valid_until();
      log(LogLevel::warning, "workerlock: pid={} cannot verify the hold on {}: {}; {}", ::getpid(),
          description_, error.what(),
          valid ? "keeping it while it is valid, and checking again" : "it is no longer valid");
      return valid ? proof::unknown : proof::lost;
    }
  }

  //! The primary's periodic check: schedules the next one (sooner, with backoff, while the
  //! hold cannot be proven, at valid_until() at the latest), or steps down.
  void check_hold() noexcept {
    switch (verify()) {
      case proof::held:
        verify_backoff_ = options_.retry_backoff_min;
        next_verify_ = detail::deadline_after(backend_->verify_interval());
        return;
      case proof::unknown:
        next_verify_ =
            std::min(detail::deadline_after(std::min(verify_backoff_, backend_->verify_interval())),
                     backend_->valid_until());
        verify_backoff_ = doubled_backoff(verify_backoff_);
        return;
      case proof::lost:
        demote_and_reset("the lock was lost");
        return;
    }
  }

  //! Sleeps for `duration` (saturated: milliseconds::max() is forever) or until a stop is
  //! asked, whichever comes first.
  void sleep_unless_stopped(std::chrono::milliseconds duration) noexcept {
    sleep_until_unless_stopped(detail::deadline_after(duration));
  }
  void sleep_until_unless_stopped(std::chrono::steady_clock::time_point deadline) noexcept {
    for (;;) {
      const auto seen = wakeups_.load();
      if (stop_requested_.load() || detail::monotonic_clock::now() >= deadline) return;
      wakeups_.wait_while(seen, deadline);
    }
  }

  //! `backoff` doubled, up to retry_backoff_max, without overflowing.
  std::chrono::milliseconds doubled_backoff(std::chrono::milliseconds backoff) const noexcept {
    return backoff > options_.retry_backoff_max / 2
               ? options_.retry_backoff_max
               : std::min(backoff * 2, options_.retry_backoff_max);
  }

  void report_retry(const std::exception& error) const {
    log(LogLevel::warning, "workerlock: pid={} standby: {}; retrying in {} ms", ::getpid(),
        error.what(), backoff_.count());
  }

  //! Runs `callback` with the host's signal mask (on the coordinator thread, which
  //! otherwise blocks every signal), so that the threads it starts inherit that mask. The
  //! wakeup signal cannot interrupt it: FileBackend sends it only during its wait, and
  //! drains a late one before returning. An exception is logged and swallowed.
  //! Returns: whether the callback returned normally.
  bool invoke(const Callback& callback, const char* name) noexcept {
    if (!callback) return true;
    const auto outer = callback_thread_.exchange(std::this_thread::get_id());
    const bool on_thread = options_.wait == WaitMode::background_thread &&
                           coordinator_thread_.load() == std::this_thread::get_id();
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
    callback_thread_.store(outer);
    return returned;
  }

  //! A new hold. Takes the primary role, unless the previous primary noted a whole-server
  //! stop less than server_stop_grace ago: then this worker holds the lock without running
  //! callbacks until the grace has passed (polled: a later poll() takes the role), and a
  //! stop during the grace releases it without callbacks (see finish()).
  void promote() noexcept {
    const auto until = server_stop_deferral();
    const auto now = std::chrono::steady_clock::now();
    if (until > now) {
      role_.store(Role::secondary);
      log(LogLevel::info,
          "workerlock: pid={} holds {} but defers on_promoted by {} ms: the previous primary "
          "stopped with the whole server",
          ::getpid(), description_,
          std::chrono::ceil<std::chrono::milliseconds>(until - now).count());
      if (options_.wait == WaitMode::polled) {
        promotion_deferred_ = true;
        deferred_until_ = until;
        return;
      }
      sleep_until_unless_stopped(until);
      if (stop_requested_.load()) return;  // finish() releases without callbacks
      if (!still_held_after_deferral()) return;
    }
    take_role();
  }

  //! After a deferral: whether this worker still holds the lock (the file may have been
  //! replaced or deleted meanwhile). If not, releases it without callbacks (on_promoted
  //! never ran) so that the standby machinery takes the lock anew.
  bool still_held_after_deferral() noexcept {
    if (verify() != proof::lost) return true;
    log(LogLevel::warning,
        "workerlock: pid={} {}: the lock was lost during the deferral after a whole-server "
        "stop; releasing without callbacks",
        ::getpid(), description_);
    backend_->release();
    backend_->reset();
    return false;
  }

  //! Until when a new hold defers its promotion: the note of a whole-server stop plus
  //! server_stop_grace; time_point::min() when there is no recent note. A note dated in the
  //! future (another boot's clock) is ignored.
  std::chrono::steady_clock::time_point server_stop_deferral() const noexcept {
    const auto none = std::chrono::steady_clock::time_point::min();
    if (options_.server_stop_grace <= std::chrono::milliseconds::zero()) return none;
    const auto noted = backend_->server_stop_noted();
    if (!noted || *noted > std::chrono::steady_clock::now()) return none;
    // Saturated: check_options() bounds the grace, but the note's date is anyone's.
    const auto room = std::chrono::steady_clock::time_point::max() - *noted;
    if (std::chrono::duration_cast<std::chrono::nanoseconds>(options_.server_stop_grace) >= room)
      return std::chrono::steady_clock::time_point::max();
    return *noted + options_.server_stop_grace;
  }

  void take_role() noexcept {
    role_.store(Role::primary);
    next_verify_ = detail::deadline_after(backend_->verify_interval());
    verify_backoff_ = options_.retry_backoff_min;
    log(LogLevel::info, "workerlock: pid={} role=primary {}", ::getpid(), description_);
    bool completed = false;
    const bool tasks = startup_ && barrier_;  // start() refuses on_startup without a barrier
    if (tasks && !read_startup_marker(completed)) return;  // stepped down
    if (tasks && !completed && invoke(startup_, "on_startup")) {
      try {
        barrier_->complete();
      } catch (const std::exception& error) {
        log(LogLevel::error, "workerlock: pid={} on_startup completed, but {}", ::getpid(),
            reason(error));
      }
    }
    invoke(promoted_, "on_promoted");
  }

  //! With the default generation, reads it anew at each start(), in this worker: a
  //! Coordinator built in the master (a global, say) must not take the master's parent
  //! (pid 1 under systemd) for the master. Requires control_mutex_ and no running thread.
  void read_default_startup_generation() {
    if (!offers_barrier_ || !options_.startup_generation.empty()) return;
    std::shared_ptr<GenerationMarker> fresh =
        backend_->startup_barrier(StartupBarrier::master_generation());
    std::lock_guard<std::mutex> guard(barrier_mutex_);
    barrier_ = std::move(fresh);
  }

  //! Whether a primary completed the startup tasks in this generation. An unreadable marker
  //! is no answer, and running the tasks on it could run them twice: then this worker
  //! steps down instead, and the result is false.
  bool read_startup_marker(bool& completed) noexcept {
    try {
      completed = barrier_->completed();
    } catch (const std::exception& error) {
      step_down_for_unreadable_marker(error);
      return false;
    }
    startup_backoff_ = options_.retry_backoff_min;
    return true;
  }

  //! Releases the lock without callbacks (on_promoted never ran) and lets the standby
  //! machinery try again after a backoff: another standby, or this one once the marker
  //! can be read. The pause ends at once on stop().
  void step_down_for_unreadable_marker(const std::exception& error) noexcept {
    const auto pause = startup_backoff_;
    startup_backoff_ = doubled_backoff(startup_backoff_);
    log(LogLevel::error,
        "workerlock: pid={} {}; on_startup not run, stepping down and retrying in {} ms",
        ::getpid(), reason(error), pause.count());
    backend_->release();
    role_.store(Role::secondary);
    log(LogLevel::info, "workerlock: pid={} role=secondary {} (the startup marker cannot be read)",
        ::getpid(), description_);
    if (options_.wait == WaitMode::polled) {
      next_attempt_ = detail::deadline_after(pause);
    } else {
      sleep_unless_stopped(pause);
    }
  }

  //! on_demoted first, then release: the successor never overlaps with us.
  //! `note`: leave the note of a whole-server stop before releasing.
  void demote(const char* reason, bool note = false) noexcept {
    invoke(demoted_, "on_demoted");
    if (note) backend_->note_server_stopping();
    backend_->release();
    role_.store(Role::secondary);
    log(LogLevel::info, "workerlock: pid={} role=secondary {} ({})", ::getpid(), description_,
        reason);
  }

  void demote_and_reset(const char* reason) noexcept {
    log(LogLevel::warning, "workerlock: pid={} {}: {}; stepping down", ::getpid(), description_,
        reason);
    demote(reason);
    backend_->reset();
  }

  std::unique_ptr<Backend> backend_;
  std::string description_;
  CoordinatorOptions options_;
  Interrupter interrupter_;      // ends the backend's wait; interrupted by request_stop()
  bool offers_barrier_ = false;  // the backend keeps a startup barrier's record
  // This start()'s record (written by begin() under barrier_mutex_); null before the first
  // start() with the default generation, or when the backend keeps none.
  std::shared_ptr<GenerationMarker> barrier_;
  mutable std::mutex barrier_mutex_;
  Callback promoted_;
  Callback demoted_;
  Callback startup_;

  std::mutex control_mutex_;                      // serializes start(), stop() and poll()
  std::atomic<std::thread::id> control_owner_{};  // the thread holding control_mutex_
  std::atomic<bool> running_{false};  // written under control_mutex_; running() reads it
  bool kept_out_ = false;
  std::atomic<Role> role_{Role::secondary};
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> whole_server_stop_{false};  // the stop asked is StopScope::whole_server
  std::atomic<pid_t> started_in_{0};            // the process that last started it; 0 before

  // The coordinator thread: a plain pthread, so that a copy inherited through fork() is a
  // handle to forget (a std::thread's would terminate the child when destroyed).
  pthread_t thread_{};
  bool thread_started_ = false;           // created and not yet joined; under control_mutex_
  bool promote_on_thread_start_ = false;  // start() won the lock; set before the thread runs
  std::atomic<std::thread::id> coordinator_thread_{};
  std::atomic<std::thread::id> callback_thread_{};
  detail::futex_word thread_done_;  // 1 once the thread left its loop
  detail::futex_word wakeups_;      // bumped by every stop request; the thread sleeps on it

  // Retry state; touched only by the thread driving the backend.
  std::chrono::milliseconds backoff_{10};
  std::chrono::steady_clock::time_point next_attempt_{};
  std::chrono::steady_clock::time_point next_verify_{};
  std::chrono::milliseconds startup_backoff_;     // after an unreadable startup marker
  std::chrono::milliseconds verify_backoff_{10};  // after a verify_held() that could not tell
  bool promotion_deferred_ = false;  // polled: held, waiting for deferred_until_ (see promote())
  std::chrono::steady_clock::time_point deferred_until_{};
  sigset_t host_mask_{};  // the signal mask of start()'s caller, for callbacks on the thread
};

}  // namespace workerlock
