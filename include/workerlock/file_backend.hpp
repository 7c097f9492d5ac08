// workerlock/file_backend.hpp: FileBackend, the Coordinator's backend on a local lock
// file: a WorkerLock whose blocking wait a signal can interrupt.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "backend.hpp"
#include "detail/lock_file.hpp"
#include "error.hpp"
#include "options.hpp"
#include "worker_lock.hpp"

namespace workerlock {

//! Holds the primary role through a WorkerLock on `path`. A standby sleeps in the kernel's
//! blocking lock call; interrupt() wakes it with `wakeup_signal`, whose handler (a no-op,
//! installed without SA_RESTART) prepare() installs.
class FileBackend final : public Backend {
 public:
  //! wakeup_signal 0 picks SIGRTMIN + 5.
  FileBackend(std::filesystem::path path, Options options = {}, int wakeup_signal = 0,
              std::chrono::milliseconds health_check_interval = std::chrono::milliseconds(1000))
      : lock_(std::move(path), std::move(options)),
        wakeup_signal_(wakeup_signal != 0 ? wakeup_signal : SIGRTMIN + 5),
        health_check_interval_(health_check_interval) {}

  void prepare() override {
    detail::warm_record_caches();
    struct sigaction current {};
    if (::sigaction(wakeup_signal_, nullptr, &current) != 0)
      throw lock_error("start the coordinator for", lock_.path(), {errno, std::system_category()},
                       "the wakeup signal is invalid");
    const bool plain = (current.sa_flags & SA_SIGINFO) == 0;
    if (plain && current.sa_handler == &ignore_signal) return;
    if (!plain || (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN))
      throw lock_error(
          "start the coordinator for", lock_.path(),
          std::make_error_code(std::errc::device_or_resource_busy),
          fmt::format(
              "signal {} already has a handler; choose another CoordinatorOptions::wakeup_signal",
              wakeup_signal_));
    struct sigaction wakeup {};
    wakeup.sa_handler = &ignore_signal;
    sigemptyset(&wakeup.sa_mask);
    wakeup.sa_flags = 0;  // no SA_RESTART: the blocking lock call must return EINTR
    if (::sigaction(wakeup_signal_, &wakeup, nullptr) != 0)
      throw lock_error("start the coordinator for", lock_.path(), {errno, std::system_category()});
  }

  bool try_acquire() override { return lock_.try_lock(); }

  //! Unblocks the wakeup signal only for the duration of the blocking call, so that the
  //! signal never interrupts the host's own system calls (in callbacks, say).
  bool wait_acquire() override {
    sigset_t wakeup;
    sigemptyset(&wakeup);
    sigaddset(&wakeup, wakeup_signal_);
    waiter_.store(::pthread_self());
    waiting_.store(true);
    ::pthread_sigmask(SIG_UNBLOCK, &wakeup, nullptr);
    detail::failure f;
    bool held = false;
    if (!interrupted_.load()) {
      held = detail::worker_lock_access::acquire(lock_, detail::wait_mode::block_interruptibly, f);
    }
    ::pthread_sigmask(SIG_BLOCK, &wakeup, nullptr);
    waiting_.store(false);
    f.throw_if_failed(lock_.path());
    return held;
  }

  //! A signal sent just before the waiter enters the kernel is lost; callers repeat it
  //! until the wait returns (Coordinator::stop() does, every millisecond).
  void interrupt() noexcept override {
    interrupted_.store(true);
    if (waiting_.load()) ::pthread_kill(waiter_.load(), wakeup_signal_);
  }
  void clear_interrupt() noexcept override { interrupted_.store(false); }

  //! The path must still name the file we hold: a removed or replaced file would let a
  //! second process lock a new one. Errors other than ENOENT keep the role.
  bool verify_held() override {
    const auto* s = detail::worker_lock_access::state(lock_);
    if (s == nullptr || !s->owned) return false;
    struct stat st {};
    if (::lstat(lock_.path().c_str(), &st) != 0) return errno != ENOENT;
    return st.st_dev == s->dev && st.st_ino == s->ino;
  }
  std::chrono::milliseconds verify_interval() const noexcept override {
    return health_check_interval_;
  }

  void release() noexcept override {
    std::error_code ignored;
    lock_.unlock(ignored);
  }
  void reset() noexcept override {
    release();
    if (auto* s = detail::worker_lock_access::state(lock_)) detail::close_file(*s);
  }

  bool held() const noexcept override { return lock_.owns_lock(); }
  std::string describe() const override { return fmt::format("path={}", lock_.path().native()); }
  std::filesystem::path startup_marker_base() const override { return lock_.path(); }

  const WorkerLock& lock() const noexcept { return lock_; }
  int wakeup_signal() const noexcept { return wakeup_signal_; }

 private:
  static void ignore_signal(int) noexcept {}

  WorkerLock lock_;
  int wakeup_signal_;
  std::chrono::milliseconds health_check_interval_;
  std::atomic<bool> interrupted_{false};
  std::atomic<bool> waiting_{false};
  std::atomic<pthread_t> waiter_{};
};

}  // namespace workerlock
