// workerlock/detail/coordinator_drivers.hpp: the role machine's two drivers: a thread that
// sleeps in the backend's wait (WaitMode::background_thread), and poll() (WaitMode::polled).
#pragma once

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <system_error>
#include <thread>

#include "../backend.hpp"
#include "../coordinator_options.hpp"
#include "deadline.hpp"
#include "futex_word.hpp"
#include "role_machine.hpp"
#include "start_failure.hpp"
#include "stop_signal.hpp"

namespace workerlock::detail {

//! Steps the role machine: when, on which thread, and through which attempt of the backend.
//! Called by the Coordinator under its control mutex (poll(), launch(), finish()).
class coordinator_driver {
 public:
  virtual ~coordinator_driver() = default;

  //! Begins driving after start()'s first attempt (`held`). Returns false with `f` set when
  //! it cannot; then nothing runs.
  virtual bool launch(bool held, start_failure& f) noexcept = 0;
  //! Coordinator::poll(), if this driver steps there: one step (none while `kept_out`, the
  //! worker kept out of the election by the operator).
  virtual void poll(bool kept_out) noexcept { static_cast<void>(kept_out); }
  //! Completes a requested stop: the machine finishes (on_demoted, release) and nothing
  //! runs any more.
  virtual void finish() noexcept = 0;
  //! Before a start() in a copy of the process: forgets the parent's thread.
  virtual void forget_inherited() noexcept {}
  //! From the Coordinator's destructor, after finish(): lets go of the driver's thread.
  virtual void release_thread() noexcept {}
};

//! WaitMode::polled: the host's poll() steps the machine when the next step is due, through
//! the backend's try_acquire(). A stop asked meanwhile (from a callback, or request_stop())
//! completes in the next poll(), or as start() returns; `running` turns false then.
class poll_driver final : public coordinator_driver {
 public:
  poll_driver(role_machine& machine, Backend& backend, stop_signal& stop,
              std::atomic<bool>& running) noexcept
      : machine_(machine), backend_(backend), stop_(stop), running_(running) {}

  bool launch(bool held, start_failure&) noexcept override {
    if (held) machine_.acquired();
    finish_stop_asked_by_callback();
    return true;
  }

  //! A requested stop is completed first (on_demoted, release).
  void poll(bool kept_out) noexcept override {
    const auto next = machine_.next_step();
    if (!kept_out && !stop_.requested.load() && std::chrono::steady_clock::now() >= next.not_before)
      machine_.run(next.what, [this] { return backend_.try_acquire(); });
    finish_stop_asked_by_callback();
  }

  void finish() noexcept override { machine_.finish(); }

 private:
  void finish_stop_asked_by_callback() noexcept {
    if (!stop_.requested.load() || !running_.load()) return;
    machine_.finish();
    running_.store(false);
  }

  role_machine& machine_;
  Backend& backend_;
  stop_signal& stop_;
  std::atomic<bool>& running_;
};

//! WaitMode::background_thread: a plain pthread (a copy inherited through fork() is then a
//! handle to forget; a std::thread's would terminate the child when destroyed) that sleeps
//! in the backend's wait_acquire() and between steps, and leaves on a stop request.
class thread_driver final : public coordinator_driver {
 public:
  thread_driver(role_machine& machine, Backend& backend, stop_signal& stop) noexcept
      : machine_(machine), backend_(backend), stop_(stop) {}

  //! The thread blocks every signal (the backend unblocks the one it needs, and callbacks
  //! run with the host's mask), so the host's signals are delivered to its own threads.
  bool launch(bool held, start_failure& f) noexcept override {
    thread_done_.store_and_wake(0);
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
    promote_first_ = held;
    const int rc = ::pthread_create(&thread_, nullptr, &thread_main, this);
    ::pthread_sigmask(SIG_SETMASK, &machine_.host_mask(), nullptr);
    if (rc != 0)
      return f.set(std::error_code(rc, std::system_category()), "start the coordinator thread for",
                   "pthread_create failed: the process, its user (RLIMIT_NPROC) or its cgroup "
                   "(pids.max) may have reached its limit of threads, or memory ran out");
    started_ = true;
    return true;
  }

  //! Waits until the thread has left, interrupting the backend's wait every millisecond: a
  //! signal sent just before the thread enters its blocking call is lost, and FileBackend's
  //! kick also undoes a host's change to the signal's handler. The thread finishes the
  //! machine itself.
  void finish() noexcept override {
    if (!started_) return;
    stop_.wakeups.bump_and_wake();
    while (thread_done_.load() == 0) {
      stop_.interrupter.interrupt();
      thread_done_.wait_while(0, deadline_after(std::chrono::milliseconds(1)));
    }
    ::pthread_join(thread_, nullptr);
    started_ = false;
  }

  void forget_inherited() noexcept override {
    started_ = false;
    machine_.coordinator_thread.store(std::thread::id());
  }

  //! A stop asked on the thread itself (the destructor run from a callback) cannot join it:
  //! it is detached instead.
  void release_thread() noexcept override {
    if (!started_) return;
    if (::pthread_equal(thread_, ::pthread_self()) != 0) {
      ::pthread_detach(thread_);
    } else {
      ::pthread_join(thread_, nullptr);
    }
    started_ = false;
  }

 private:
  static void* thread_main(void* self) noexcept {
    static_cast<thread_driver*>(self)->run();
    return nullptr;
  }

  void run() noexcept {
    machine_.coordinator_thread.store(std::this_thread::get_id());
    if (promote_first_) machine_.acquired();
    while (!stop_.requested.load()) {
      const auto next = machine_.next_step();
      stop_.sleep_until(next.not_before);
      if (stop_.requested.load()) break;
      machine_.run(next.what, [this] { return backend_.wait_acquire(stop_.interrupter); });
    }
    machine_.finish();
    machine_.coordinator_thread.store(std::thread::id());
    thread_done_.store_and_wake(1);
  }

  role_machine& machine_;
  Backend& backend_;
  stop_signal& stop_;
  pthread_t thread_{};
  bool started_ = false;        // created and not yet joined; under the control mutex
  bool promote_first_ = false;  // start() won the lock; set before the thread runs
  futex_word thread_done_;      // 1 once the thread left its loop
};

//! The driver `mode` asks for.
inline std::unique_ptr<coordinator_driver> make_driver(WaitMode mode, role_machine& machine,
                                                       Backend& backend, stop_signal& stop,
                                                       std::atomic<bool>& running) {
  if (mode == WaitMode::polled)
    return std::make_unique<poll_driver>(machine, backend, stop, running);
  return std::make_unique<thread_driver>(machine, backend, stop);
}

}  // namespace workerlock::detail
