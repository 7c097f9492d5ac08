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
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "election.hpp"
#include "error.hpp"
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
  //! The generation of the startup barrier; empty: StartupBarrier::master_generation().
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

  explicit Coordinator(std::filesystem::path path, CoordinatorOptions options = {})
      : path_(std::move(path)),
        options_(std::move(options)),
        barrier_(path_, options_.startup_generation.empty() ? StartupBarrier::master_generation()
                                                            : options_.startup_generation) {}

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
  //! Calling start() while running does nothing.
  //! Throws: lock_error if the lock file cannot be opened or locked; nothing is started.
  void start() {
    detail::failure f;
    begin(f);
    f.throw_if_failed(path_);
  }
  void start(std::error_code& ec) {
    detail::failure f;
    begin(f);
    ec = f.code;
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
      if (lock_.owns_lock()) demote("stopped");
    } else {
      {
        std::lock_guard<std::mutex> guard(wait_mutex_);
        wake_.notify_all();
      }
      // A signal sent just before the thread enters its blocking call is lost; repeat.
      while (!thread_done_.load()) {
        ::pthread_kill(thread_handle_.load(), wakeup_signal());
        std::unique_lock<std::mutex> guard(wait_mutex_);
        wake_.wait_for(guard, std::chrono::milliseconds(1), [&] { return thread_done_.load(); });
      }
      thread_.join();
    }
    running_ = false;
  }

  //! WaitMode::polled only: one step of the standby machinery. Call it every
  //! recommended_poll_interval from the host's event loop. Never throws, never blocks.
  void poll() noexcept {
    if (options_.wait != WaitMode::polled || !running_ || stop_requested_.load() || kept_out_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!lock_.owns_lock()) {
      if (now < next_attempt_) return;
      detail::failure f;
      if (detail::worker_lock_access::acquire(lock_, detail::wait_mode::try_once, f)) {
        backoff_ = options_.retry_backoff_min;
        promote();
      } else if (f) {
        report_retry(f);
        next_attempt_ = now + backoff_;
        backoff_ = std::min(backoff_ * 2, options_.retry_backoff_max);
      }
    } else if (now - last_health_check_ >= options_.health_check_interval) {
      last_health_check_ = now;
      if (!still_holds_named_file()) demote_and_close("the lock file was removed or replaced");
    }
  }

  Role role() const noexcept { return role_.load(); }
  bool running() const noexcept { return running_ && !stop_requested_.load(); }
  const std::filesystem::path& path() const noexcept { return path_; }
  const StartupBarrier& startup_barrier() const noexcept { return barrier_; }

  //! Waits until a primary completed the on_startup tasks of this generation, or until
  //! `timeout`; returns whether they completed. Workers started after completion return
  //! at once. Waiters keep waiting across a failover in the middle of the tasks.
  bool wait_for_startup(std::chrono::milliseconds timeout) const { return barrier_.wait_for(timeout); }

 private:
  static void ignore_signal(int) noexcept {}

  int wakeup_signal() const noexcept { return options_.wakeup_signal != 0 ? options_.wakeup_signal : SIGRTMIN + 5; }

  bool on_coordinator_thread() const noexcept { return coordinator_thread_.load() == std::this_thread::get_id(); }

  void log(LogLevel level, std::string_view line) const {
    if (options_.lock.log) options_.lock.log(level, line);
  }

  //! Installs the no-op handler that makes a blocking lock call return EINTR.
  bool install_wakeup_handler(detail::failure& f) const noexcept {
    struct sigaction current {};
    if (::sigaction(wakeup_signal(), nullptr, &current) != 0) {
      f.set(errno, "start the coordinator for", "the wakeup signal is invalid");
      return false;
    }
    const bool ours = (current.sa_flags & SA_SIGINFO) == 0 && current.sa_handler == &ignore_signal;
    const bool unused = (current.sa_flags & SA_SIGINFO) == 0 &&
                        (current.sa_handler == SIG_DFL || current.sa_handler == SIG_IGN);
    if (ours) return true;
    if (!unused) {
      f.set(EBUSY, "start the coordinator for",
            "the wakeup signal already has a handler; choose another CoordinatorOptions::wakeup_signal");
      return false;
    }
    struct sigaction wakeup {};
    wakeup.sa_handler = &ignore_signal;
    sigemptyset(&wakeup.sa_mask);
    wakeup.sa_flags = 0;  // no SA_RESTART: the blocking lock call must return EINTR
    if (::sigaction(wakeup_signal(), &wakeup, nullptr) != 0) {
      f.set(errno, "start the coordinator for");
      return false;
    }
    return true;
  }

  void begin(detail::failure& f) {
    std::lock_guard<std::mutex> control(control_mutex_);
    if (running_) return;
    if (thread_.joinable()) thread_.join();  // a run that a callback stopped
    stop_requested_.store(false);
    thread_done_.store(false);
    role_.store(Role::secondary);
    lock_ = WorkerLock(path_, options_.lock);
    kept_out_ = detail::kept_out_by_operator(options_.lock, f);
    if (f) return;
    if (kept_out_) {
      running_ = true;
      log(LogLevel::info, fmt::format("workerlock: pid={} role=secondary path={} (WORKERLOCK_ROLE=secondary; not a "
                                      "standby)",
                                      ::getpid(), path_.native()));
      return;
    }
    if (options_.wait == WaitMode::background_thread && !install_wakeup_handler(f)) return;
    const bool held = detail::worker_lock_access::acquire(lock_, detail::wait_mode::try_once, f);
    if (f) {
      lock_ = WorkerLock();
      return;
    }
    running_ = true;
    backoff_ = options_.retry_backoff_min;
    last_health_check_ = std::chrono::steady_clock::now();
    next_attempt_ = last_health_check_;
    if (!held) {
      log(LogLevel::info, fmt::format("workerlock: pid={} role=secondary path={} (standby)", ::getpid(), path_.native()));
    }
    if (options_.wait == WaitMode::polled) {
      if (held) promote();
      return;
    }
    // The thread blocks every signal but the wakeup one, so host signals go elsewhere.
    sigset_t all;
    sigset_t previous;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &previous);
    thread_ = std::thread([this, held] { run(held); });
    ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }

  void run(bool held) noexcept {
    thread_handle_.store(::pthread_self());
    coordinator_thread_.store(std::this_thread::get_id());
    sigset_t wakeup;
    sigemptyset(&wakeup);
    sigaddset(&wakeup, wakeup_signal());
    ::pthread_sigmask(SIG_UNBLOCK, &wakeup, nullptr);
    thread_ready_.store(true);

    if (held) promote();
    while (!stop_requested_.load()) {
      if (!lock_.owns_lock()) {
        detail::failure f;
        const bool got = detail::worker_lock_access::acquire(lock_, detail::wait_mode::block_interruptibly, f);
        if (stop_requested_.load()) break;
        if (got) {
          backoff_ = options_.retry_backoff_min;
          promote();
        } else if (f) {
          report_retry(f);
          sleep_unless_stopped(backoff_);
          backoff_ = std::min(backoff_ * 2, options_.retry_backoff_max);
        }
      } else {
        sleep_unless_stopped(options_.health_check_interval);
        if (stop_requested_.load()) break;
        if (!still_holds_named_file()) demote_and_close("the lock file was removed or replaced");
      }
    }
    if (lock_.owns_lock()) demote("stopped");
    coordinator_thread_.store(std::thread::id());
    std::lock_guard<std::mutex> guard(wait_mutex_);
    thread_done_.store(true);
    wake_.notify_all();
  }

  void sleep_unless_stopped(std::chrono::milliseconds duration) {
    std::unique_lock<std::mutex> guard(wait_mutex_);
    wake_.wait_for(guard, duration, [&] { return stop_requested_.load(); });
  }

  void report_retry(const detail::failure& f) const {
    log(LogLevel::warning,
        fmt::format("workerlock: pid={} standby: {}; retrying in {} ms", ::getpid(),
                    lock_error(f.operation, path_, f.code, f.explanation).what(), backoff_.count()));
  }

  bool still_holds_named_file() const noexcept {
    const auto* s = detail::worker_lock_access::state(lock_);
    struct stat st {};
    if (::lstat(path_.c_str(), &st) != 0) return errno != ENOENT;  // other errors: keep going
    return st.st_dev == s->dev && st.st_ino == s->ino;
  }

  void invoke(const Callback& callback, const char* name) noexcept {
    if (!callback) return;
    try {
      callback();
    } catch (const std::exception& error) {
      log(LogLevel::error, fmt::format("workerlock: pid={} {} threw: {}", ::getpid(), name, error.what()));
    } catch (...) {
      log(LogLevel::error, fmt::format("workerlock: pid={} {} threw a non-standard exception", ::getpid(), name));
    }
  }

  void promote() noexcept {
    role_.store(Role::primary);
    log(LogLevel::info, fmt::format("workerlock: pid={} role=primary path={}", ::getpid(), path_.native()));
    if (startup_ && !barrier_.completed()) {
      bool finished = true;
      try {
        startup_();
      } catch (const std::exception& error) {
        finished = false;
        log(LogLevel::error, fmt::format("workerlock: pid={} on_startup threw: {}", ::getpid(), error.what()));
      } catch (...) {
        finished = false;
        log(LogLevel::error, fmt::format("workerlock: pid={} on_startup threw", ::getpid()));
      }
      std::error_code ec;
      if (finished) barrier_.complete(ec);
      if (ec) {
        log(LogLevel::error, fmt::format("workerlock: pid={} cannot mark startup complete in {}: {}", ::getpid(),
                                         barrier_.marker_path().native(), ec.message()));
      }
    }
    invoke(promoted_, "on_promoted");
  }

  //! on_demoted first, then release: the successor never overlaps with us.
  void demote(const char* reason) noexcept {
    invoke(demoted_, "on_demoted");
    std::error_code ignored;
    lock_.unlock(ignored);
    role_.store(Role::secondary);
    log(LogLevel::info,
        fmt::format("workerlock: pid={} role=secondary path={} ({})", ::getpid(), path_.native(), reason));
  }

  void demote_and_close(const char* reason) noexcept {
    log(LogLevel::warning, fmt::format("workerlock: pid={} {}: {}; stepping down", ::getpid(), path_.native(), reason));
    demote(reason);
    if (auto* s = detail::worker_lock_access::state(lock_)) detail::close_file(*s);
  }

  std::filesystem::path path_;
  CoordinatorOptions options_;
  StartupBarrier barrier_;
  Callback promoted_;
  Callback demoted_;
  Callback startup_;

  std::mutex control_mutex_;  // serializes start() and stop()
  bool running_ = false;
  bool kept_out_ = false;
  WorkerLock lock_;
  std::atomic<Role> role_{Role::secondary};
  std::atomic<bool> stop_requested_{false};

  std::thread thread_;
  std::atomic<pthread_t> thread_handle_{};
  std::atomic<std::thread::id> coordinator_thread_{};
  std::atomic<bool> thread_ready_{false};
  std::atomic<bool> thread_done_{false};
  std::mutex wait_mutex_;
  std::condition_variable wake_;

  // Polled mode and retry state; touched only by the thread driving the lock.
  std::chrono::milliseconds backoff_{10};
  std::chrono::steady_clock::time_point next_attempt_{};
  std::chrono::steady_clock::time_point last_health_check_{};
};

}  // namespace workerlock
