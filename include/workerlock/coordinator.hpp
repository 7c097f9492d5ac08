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
#include "options.hpp"
#include "role.hpp"
#include "startup_barrier.hpp"
#include "worker_lock.hpp"

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

//! Coordinator::start() checks these and throws lock_error (invalid_argument) naming the
//! field of a bad one.
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
//! Signal handlers may call request_stop(), role() and running(), and nothing else
//! (these three are async-signal-safe; stop() is not).
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
  //! Throws: lock_error, with path() the lock file's (see Backend::error_path()), if the
  //! options are invalid (invalid_argument, naming the field), the lock file cannot be
  //! opened or locked, or the coordinator thread cannot be created (its errno, such as
  //! EAGAIN when RLIMIT_NPROC or the cgroup's pids.max is reached), or this object is a copy
  //! of a running Coordinator inherited through fork() (operation_not_permitted). After a
  //! failure nothing is started, nothing is held, and role() is secondary.
  void start() { begin(); }
  void start(std::error_code& ec) {
    ec.clear();
    try {
      begin();
    } catch (const std::system_error& error) {
      ec = error.code();
    }
  }

  //! Leaves the election: a primary runs on_demoted, then releases so another standby is
  //! promoted at once; a waiting standby stops waiting. Returns within milliseconds unless
  //! a callback is still running, whatever the host did to the wakeup signal since start().
  //! Safe to call twice, and from a callback. Not async-signal-safe: a signal handler calls
  //! request_stop() instead.
  void stop() noexcept {
    if (inherited_across_fork()) return;
    if (on_coordinator_thread()) {  // the stop completes once the callback returns
      request_stop();
      return;
    }
    control_guard control(*this);
    if (!running_) return;
    complete_stop();
  }

  //! Asks the Coordinator to stop, without waiting: async-signal-safe (lock-free atomics, a
  //! futex wake, and the backend's interrupt()), so a SIGTERM handler may call it.
  //! In WaitMode::background_thread the coordinator thread then leaves by itself: a primary
  //! runs on_demoted and releases at once (on that thread), a standby stops waiting.
  //! In WaitMode::polled the next poll(), stop(), start() or the destructor completes it
  //! (runs on_demoted and releases). running() is false from now on; stop() or the
  //! destructor still joins the thread. Before start() it has no effect.
  //! One wakeup is sent: in the rare case that it reaches a waiting standby just before its
  //! thread enters the kernel's blocking lock call, that thread (which holds nothing) keeps
  //! waiting until stop() or the destructor, which repeat the wakeup until it leaves.
  void request_stop() noexcept {
    const int saved = errno;
    if (!inherited_across_fork()) {
      stop_requested_.store(true);
      wakeups_.bump_and_wake();
      if (options_.wait == WaitMode::background_thread && running_.load()) backend_->interrupt();
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
    } else if (now >= next_verify_) {
      next_verify_ = detail::deadline_after(backend_->verify_interval());
      if (!verify()) demote_and_reset("the lock was lost");
    }
    finish_stop_requested_by_callback();
  }

  //! Primary only in the process that started the Coordinator (never in a child of fork()),
  //! while it holds the lock. Async-signal-safe.
  Role role() const noexcept {
    if (role_.load() != Role::primary) return Role::secondary;
    return inherited_across_fork() ? Role::secondary : Role::primary;
  }
  //! True from start() until stop() or request_stop(). Async-signal-safe.
  bool running() const noexcept {
    if (!running_.load() || stop_requested_.load()) return false;
    return !inherited_across_fork();
  }
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
  //! The backend's fencing token of the current hold (0 for lock files, and in a child of
  //! fork()).
  std::uint64_t fencing_token() const noexcept {
    const std::uint64_t token = backend_->fencing_token();
    return token != 0 && !inherited_across_fork() ? token : 0;
  }

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
  //! is lost, and FileBackend::interrupt() also undoes a host's change to the signal's
  //! handler. Requires control_mutex_ and stop_requested_.
  void end_thread() noexcept {
    if (!thread_started_) return;
    wakeups_.bump_and_wake();
    while (thread_done_.load() == 0) {
      backend_->interrupt();
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

  //! Formats only when there is a sink; a sink that throws loses its line, nothing else.
  template <typename... Args>
  void log(LogLevel level, fmt::format_string<Args...> format, Args&&... args) const noexcept {
    if (!options_.lock.log) return;
    try {
      options_.lock.log(level, fmt::format(format, std::forward<Args>(args)...));
    } catch (...) {
    }
  }

  [[noreturn]] void fail(const char* operation, std::error_code code,
                         const std::string& explanation) const {
    throw lock_error(operation, backend_->error_path(), code, explanation);
  }

  //! Throws: lock_error (invalid_argument) naming the first bad field.
  void check_options() const {
    constexpr const char* operation = "start the coordinator for";
    const auto invalid = std::make_error_code(std::errc::invalid_argument);
    const auto& o = options_;
    if (o.health_check_interval <= std::chrono::milliseconds::zero())
      fail(operation, invalid,
           fmt::format("CoordinatorOptions::health_check_interval is {} ms; it must be positive",
                       o.health_check_interval.count()));
    if (o.retry_backoff_min <= std::chrono::milliseconds::zero())
      fail(operation, invalid,
           fmt::format("CoordinatorOptions::retry_backoff_min is {} ms; it must be positive",
                       o.retry_backoff_min.count()));
    if (o.retry_backoff_max < o.retry_backoff_min)
      fail(operation, invalid,
           fmt::format("CoordinatorOptions::retry_backoff_max ({} ms) is less than "
                       "CoordinatorOptions::retry_backoff_min ({} ms)",
                       o.retry_backoff_max.count(), o.retry_backoff_min.count()));
    if (o.wakeup_signal != 0 && !detail::usable_wakeup_signal(o.wakeup_signal))
      fail(operation, invalid,
           fmt::format("CoordinatorOptions::wakeup_signal {} cannot be used: 0 picks SIGRTMIN+5, "
                       "or choose a signal from SIGRTMIN to SIGRTMAX that the host does not use",
                       o.wakeup_signal));
  }

  void begin() {
    if (inherited_across_fork() && running_.load())
      fail("start the coordinator for", std::make_error_code(std::errc::operation_not_permitted),
           fmt::format("this Coordinator was started in pid {}, and a copy inherited through "
                       "fork() never takes part in the election: construct a new Coordinator in "
                       "this process",
                       started_in_.load()));
    if (on_coordinator_thread()) return;  // a callback: running, by definition
    control_guard control(*this);
    if (inherited_across_fork()) {
      // A copy of a Coordinator the parent had stopped: nothing of it runs here.
      thread_started_ = false;
      coordinator_thread_.store(std::thread::id());
      callback_thread_.store(std::thread::id());
    } else if (running_) {
      if (!stop_requested_.load()) return;
      // A callback or request_stop() asked to stop: complete that stop (the thread runs
      // on_demoted first), then start afresh.
      complete_stop();
    }
    check_options();
    // Formatted once, while no thread runs, so that log lines need no allocation.
    description_ = backend_->describe();
    read_default_startup_generation();
    stop_requested_.store(false);
    thread_done_.store_and_wake(0);
    role_.store(Role::secondary);
    detail::failure f;
    kept_out_ = detail::kept_out_by_operator(options_.lock, f);
    if (f) fail(f.operation, f.code, f.explanation);
    started_in_.store(::getpid());
    if (kept_out_) {
      running_ = true;
      log(LogLevel::info,
          "workerlock: pid={} role=secondary {} (WORKERLOCK_ROLE=secondary; not a standby)",
          ::getpid(), description_);
      return;
    }
    bool held = false;
    try {
      backend_->clear_interrupt();
      backend_->prepare();
      held = backend_->try_acquire();
    } catch (const lock_error&) {
      backend_->reset();
      throw;
    } catch (const std::bad_alloc&) {
      backend_->reset();
      throw;
    } catch (const std::system_error& error) {
      backend_->reset();
      fail("start the coordinator for", error.code(), error.what());
    } catch (const std::exception& error) {
      backend_->reset();
      fail("start the coordinator for", std::make_error_code(std::errc::io_error), error.what());
    }
    if (held) role_.store(Role::primary);  // on_promoted follows, here or on the thread
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
      return;
    }
    // The thread blocks every signal (the backend unblocks the one it needs), so the
    // host's signals are delivered to its own threads.
    sigset_t all;
    sigset_t previous;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &previous);
    promote_on_thread_start_ = held;
    const int rc = ::pthread_create(&thread_, nullptr, &thread_main, this);
    ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    if (rc != 0) {
      running_ = false;
      backend_->reset();
      role_.store(Role::secondary);
      const std::error_code code(rc, std::system_category());
      log(LogLevel::error, "workerlock: pid={} role=secondary {} (cannot create a thread: {})",
          ::getpid(), description_, code.message());
      fail("start the coordinator thread for", code,
           "pthread_create failed: the process, its user (RLIMIT_NPROC) or its cgroup "
           "(pids.max) may have reached its limit of threads, or memory ran out");
    }
    thread_started_ = true;
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
          got = backend_->wait_acquire();
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
        sleep_unless_stopped(backend_->verify_interval());
        if (stop_requested_.load()) break;
        if (!verify()) demote_and_reset("the lock was lost");
      }
    }
    finish();
    coordinator_thread_.store(std::thread::id());
    thread_done_.store_and_wake(1);
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
      log(LogLevel::warning, "workerlock: pid={} cannot verify the hold on {}: {}", ::getpid(),
          description_, error.what());
      return false;
    }
  }

  //! Sleeps for `duration` (saturated: milliseconds::max() is forever) or until a stop is
  //! asked, whichever comes first.
  void sleep_unless_stopped(std::chrono::milliseconds duration) noexcept {
    const auto deadline = detail::deadline_after(duration);
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

  void invoke(const Callback& callback, const char* name) noexcept {
    if (!callback) return;
    const auto outer = callback_thread_.exchange(std::this_thread::get_id());
    try {
      callback();
    } catch (const std::exception& error) {
      log(LogLevel::error, "workerlock: pid={} {} threw: {}", ::getpid(), name, error.what());
    } catch (...) {
      log(LogLevel::error, "workerlock: pid={} {} threw a non-standard exception", ::getpid(),
          name);
    }
    callback_thread_.store(outer);
  }

  void promote() noexcept {
    role_.store(Role::primary);
    log(LogLevel::info, "workerlock: pid={} role=primary {}", ::getpid(), description_);
    bool completed = false;
    if (startup_ && barrier_ && !read_startup_marker(completed)) return;  // stepped down
    if (startup_ && barrier_ && !completed) {
      bool finished = true;
      const auto outer = callback_thread_.exchange(std::this_thread::get_id());
      try {
        startup_();
      } catch (const std::exception& error) {
        finished = false;
        log(LogLevel::error, "workerlock: pid={} on_startup threw: {}", ::getpid(), error.what());
      } catch (...) {
        finished = false;
        log(LogLevel::error, "workerlock: pid={} on_startup threw", ::getpid());
      }
      callback_thread_.store(outer);
      std::error_code ec;
      if (finished) barrier_->complete(ec);
      if (ec) {
        log(LogLevel::error, "workerlock: pid={} cannot mark startup complete in {}: {}",
            ::getpid(), barrier_->marker_path().native(), ec.message());
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
    startup_backoff_ = doubled_backoff(startup_backoff_);
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
      next_attempt_ = detail::deadline_after(pause);
    } else {
      sleep_unless_stopped(pause);
    }
  }

  //! on_demoted first, then release: the successor never overlaps with us.
  void demote(const char* reason) noexcept {
    invoke(demoted_, "on_demoted");
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
  std::filesystem::path startup_marker_base_;  // empty: the backend offers no marker
  std::optional<StartupBarrier> barrier_;      // written by begin() under barrier_mutex_
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
  std::atomic<pid_t> started_in_{0};  // the process that last started it; 0 before

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
  std::chrono::milliseconds startup_backoff_;  // after an unreadable startup marker
};

}  // namespace workerlock
