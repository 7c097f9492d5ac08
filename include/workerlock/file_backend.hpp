// workerlock/file_backend.hpp: FileBackend, the Coordinator's backend on a local lock
// file: a lock handle whose blocking wait a signal can interrupt.
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "backend.hpp"
#include "detail/lock_handle.hpp"
#include "detail/process_identity.hpp"
#include "detail/wakeup_signal.hpp"
#include "error.hpp"
#include "interrupter.hpp"
#include "options.hpp"
#include "startup_barrier.hpp"

namespace workerlock {

//! Holds the primary role through a lock on `path`. A standby sleeps in the kernel's
//! blocking lock call; the Interrupter passed to wait_acquire() wakes it with
//! `wakeup_signal`, whose handler (a no-op, installed without SA_RESTART) prepare()
//! installs. If the host replaces that handler later (SIG_IGN, its own handler,
//! SA_RESTART), an interrupt puts workerlock's back, so a stop still ends the wait, and the
//! waiting thread logs an error naming the signal.
class FileBackend final : public Backend, private Interrupter::Kick {
 public:
  //! wakeup_signal 0 picks SIGRTMIN + 5.
  FileBackend(std::filesystem::path path, Options options = {}, int wakeup_signal = 0,
              std::chrono::milliseconds health_check_interval = std::chrono::milliseconds(1000))
      : lock_(std::move(path), std::move(options)),
        stop_note_(lock_.path().native() + ".stopped"),
        wakeup_signal_(wakeup_signal != 0 ? wakeup_signal : SIGRTMIN + 5),
        health_check_interval_(health_check_interval) {}

  //! Throws: lock_error (errc::bad_configuration) naming the bad argument (a health check interval
  //! that is not positive, an unusable wakeup signal), or (device_or_resource_busy) when the
  //! wakeup signal already has a handler that is not workerlock's.
  void prepare() override {
    constexpr const char* operation = "start the coordinator for";
    const auto invalid = make_error_code(errc::bad_configuration);
    if (health_check_interval_ <= std::chrono::milliseconds::zero())
      throw lock_error(operation, lock_.path(), invalid,
                       fmt::format("health_check_interval is {} ms; it must be positive",
                                   health_check_interval_.count()));
    if (!detail::usable_wakeup_signal(wakeup_signal_))
      throw lock_error(operation, lock_.path(), invalid,
                       fmt::format("wakeup_signal {} cannot be used: choose a signal from SIGRTMIN "
                                   "to SIGRTMAX that the host does not use",
                                   wakeup_signal_));
    detail::warm_record_caches();
    struct sigaction current {};
    if (::sigaction(wakeup_signal_, nullptr, &current) != 0)
      throw lock_error(operation, lock_.path(), {errno, std::system_category()},
                       fmt::format("wakeup_signal {} is invalid", wakeup_signal_));
    const bool plain = (current.sa_flags & SA_SIGINFO) == 0;
    const bool ours = plain && current.sa_handler == &ignore_signal;
    if (ours && (current.sa_flags & SA_RESTART) == 0) return;
    if (!ours && (!plain || (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN)))
      throw lock_error(
          operation, lock_.path(), std::make_error_code(std::errc::device_or_resource_busy),
          fmt::format(
              "signal {} already has a handler; choose another CoordinatorOptions::wakeup_signal",
              wakeup_signal_));
    struct sigaction wakeup {};
    wakeup.sa_handler = &ignore_signal;
    sigemptyset(&wakeup.sa_mask);
    wakeup.sa_flags = 0;  // no SA_RESTART: the blocking lock call must return EINTR
    if (::sigaction(wakeup_signal_, &wakeup, nullptr) != 0)
      throw lock_error(operation, lock_.path(), {errno, std::system_category()});
  }

  bool try_acquire() override {
    detail::failure f;
    const bool held = lock_.acquire(detail::wait_mode::try_once, f);
    f.throw_if_failed(lock_.path());
    return note_hold(held);
  }

  //! Unblocks the wakeup signal only for the duration of the blocking call, so that the
  //! signal never interrupts the host's own system calls (in callbacks, say). While it
  //! waits, `interrupter`'s interrupt() sends the wakeup signal to this thread (see kick()).
  bool wait_acquire(Interrupter& interrupter) override {
    sigset_t wakeup;
    sigemptyset(&wakeup);
    sigaddset(&wakeup, wakeup_signal_);
    waiter_ = ::pthread_self();
    detail::failure f;
    bool held = false;
    {
      // The scope ends only once no interrupt() is still about to signal this thread, so
      // it never signals a thread that left (or was joined).
      Interrupter::KickScope kick(interrupter, *this);
      ::pthread_sigmask(SIG_UNBLOCK, &wakeup, nullptr);
      if (!interrupter.interrupted()) {
        held = lock_.acquire(detail::wait_mode::block_interruptibly, f);
      }
      ::pthread_sigmask(SIG_BLOCK, &wakeup, nullptr);
    }
    // A wakeup sent just as the wait ended is pending now: drain it, so that it cannot
    // interrupt a system call of the host's callbacks, which run with the wakeup signal
    // unblocked (the host's own mask).
    const struct timespec no_wait {};
    while (::sigtimedwait(&wakeup, nullptr, &no_wait) == wakeup_signal_) {
    }
    report_replaced_handler();
    f.throw_if_failed(lock_.path());
    return note_hold(held);
  }

  //! The path must still name the file we hold: a removed or replaced file would let a
  //! second process lock a new one. Returns false when it names nothing (ENOENT) or another
  //! file. Throws: lock_error when it cannot be looked at (EACCES, EIO...): the
  //! lock is still ours, and a lock file does not expire (valid_until() is max()), so the
  //! Coordinator keeps the role and looks again.
  bool verify_held() override {
    if (!lock_.owns_lock()) return false;
    struct stat st {};
    if (::lstat(lock_.path().c_str(), &st) != 0) {
      const int e = errno;
      if (e == ENOENT) return false;
      throw lock_error("check the lock file", lock_.path(), {e, std::system_category()},
                       "its path cannot be looked at; the lock is kept");
    }
    return lock_.holds_file(st.st_dev, st.st_ino);
  }
  std::chrono::milliseconds verify_interval() const noexcept override {
    return health_check_interval_;
  }

  void release() noexcept override {
    held_in_.store(0);
    detail::failure ignored;
    lock_.release(ignored);
  }
  void reset() noexcept override {
    release();
    lock_.close();
  }

  bool held() const noexcept override { return lock_.owns_lock(); }
  //! time_point::max() while this process holds the lock (a lock file does not expire),
  //! else time_point::min(). Safe from any thread, and async-signal-safe (one atomic).
  std::chrono::steady_clock::time_point valid_until() const noexcept override {
    return held_in_.load() == ::getpid() ? std::chrono::steady_clock::time_point::max()
                                         : std::chrono::steady_clock::time_point::min();
  }

  //! Writes the note `<path>.stopped`: the monotonic clock's nanoseconds and this boot's id
  //! (/proc/sys/kernel/random/boot_id). CLOCK_MONOTONIC counts from the boot, so a note
  //! means something only to a reader in the same boot; a reader in another time namespace
  //! (a container with a CLOCK_MONOTONIC offset) reads a shifted date, which the
  //! Coordinator's `noted <= now` check and the grace keep bounded. A note that cannot be
  //! written (a read-only directory, a name too long, a file of another owner, a FIFO with
  //! no reader) is lost: then a warning naming the path and the reason goes to the log sink.
  void note_server_stopping() noexcept override {
    char line[note_size + 1];
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now().time_since_epoch())
                        .count();
    char boot[boot_id_size + 1];
    read_boot_id(boot);
    const int size =
        std::snprintf(line, sizeof line, "%020lld\n%s\n", static_cast<long long>(ns), boot);
    // O_NONBLOCK: a FIFO planted at the path fails with ENXIO instead of blocking forever.
    const int fd = detail::retry_on_eintr([&] {
      return ::open(stop_note_.c_str(),
                    O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0644);
    });
    if (fd < 0) return report_lost_note(errno, nullptr);
    // Written in place at a fixed length: no truncation, and the lock orders it before the
    // next holder's read.
    if (!trusted_note(fd)) {
      report_lost_note(0, "it is not a regular file with one link owned by this user");
    } else if (size != note_size) {
      report_lost_note(0, "the note does not fit its fixed size");
    } else {
      const ssize_t written = detail::retry_on_eintr(
          [&] { return ::pwrite(fd, line, static_cast<std::size_t>(size), 0); });
      if (written != static_cast<ssize_t>(size))
        report_lost_note(written < 0 ? errno : 0, "the write failed");
    }
    ::close(fd);
  }

  //! Reads `<path>.stopped`, ignoring one that is not a regular file with one link owned by
  //! this user (or by anyone, with Options::allow_foreign_owner), and one written in another
  //! boot.
  std::optional<std::chrono::steady_clock::time_point> server_stop_noted() const noexcept override {
    const int fd = detail::retry_on_eintr([&] {
      return ::open(stop_note_.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    });
    if (fd < 0) return std::nullopt;
    char line[note_size + 1] = {};
    ssize_t n = -1;
    if (trusted_note(fd))
      n = detail::retry_on_eintr([&] { return ::pread(fd, line, note_size, 0); });
    ::close(fd);
    if (n != note_size || line[20] != '\n' || line[note_size - 1] != '\n') return std::nullopt;
    char boot[boot_id_size + 1];
    read_boot_id(boot);
    if (std::memcmp(line + 21, boot, boot_id_size) != 0) return std::nullopt;  // another boot
    long long ns = 0;
    for (int i = 0; i < 20; ++i) {
      if (line[i] < '0' || line[i] > '9' || ns > (LLONG_MAX - 9) / 10) return std::nullopt;
      ns = ns * 10 + (line[i] - '0');
    }
    return std::chrono::steady_clock::time_point(
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::nanoseconds(ns)));
  }
  std::string describe() const override { return fmt::format("path={}", lock_.path().native()); }
  //! The lock file's path.
  std::filesystem::path error_path() const override { return lock_.path(); }
  //! The marker file `<path>.startup` (see StartupBarrier).
  std::unique_ptr<GenerationMarker> startup_barrier(const std::string& generation) const override {
    // The marker's name check also covers the whole-server note `<path>.stopped`.
    static_assert(std::string_view(".stopped").size() <= detail::startup_marker_suffix.size());
    return std::make_unique<StartupBarrier>(lock_.path(), generation,
                                            lock_.options().allow_foreign_owner);
  }

  const detail::lock_handle& lock() const noexcept { return lock_; }
  int wakeup_signal() const noexcept { return wakeup_signal_; }

 private:
  static void ignore_signal(int) noexcept {}

  //! Interrupter::Kick: the interrupt of a wait_acquire() in progress. If the host replaced
  //! workerlock's handler of the wakeup signal (which would leave the wait uninterrupted, or
  //! kill the process under SIG_DFL), it is put back first. Async-signal-safe: sigaction()
  //! and pthread_kill() only.
  void kick() noexcept override {
    reinstall_handler_if_replaced();
    ::pthread_kill(waiter_, wakeup_signal_);
  }

  //! The note: 20 digits of nanoseconds, a newline, the 36 characters of the boot id, a
  //! newline.
  static constexpr int boot_id_size = 36;
  static constexpr int note_size = 20 + 1 + boot_id_size + 1;

  //! A note is a regular file with one link, owned by this user (or by anyone with
  //! allow_foreign_owner).
  bool trusted_note(int fd) const noexcept {
    struct stat st {};
    return ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 &&
           (st.st_uid == ::geteuid() || lock_.options().allow_foreign_owner);
  }

  //! This boot's id into `boot` (boot_id_size characters and a NUL); all '-' where it
  //! cannot be read (no /proc), so such readers only trust each other's notes.
  static void read_boot_id(char (&boot)[boot_id_size + 1]) noexcept {
    std::memset(boot, '-', boot_id_size);
    boot[boot_id_size] = '\0';
    try {
      const std::string& id = detail::boot_id();
      if (id.size() == boot_id_size) std::memcpy(boot, id.data(), boot_id_size);
    } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory reading it: no boot id
    }
  }

  //! Logs a whole-server note that could not be written: `error` (an errno, or 0) and `why`.
  void report_lost_note(int error, const char* why) const noexcept {
    if (!lock_.options().log) return;
    try {
      const std::string reason =
          why != nullptr && error != 0
              ? fmt::format("{}: {}", why, std::generic_category().message(error))
          : why != nullptr ? std::string(why)
                           : std::generic_category().message(error);
      lock_.options().log(
          LogLevel::warning,
          fmt::format("workerlock: pid={} cannot write the whole-server stop note {} ({}); the "
                      "next holder will be promoted at once",
                      ::getpid(), stop_note_, reason));
    } catch (...) {
    }
  }

  bool note_hold(bool held) noexcept {
    if (held) held_in_.store(::getpid());
    return held;
  }

  //! How the host had replaced workerlock's handler; 0 while it has not.
  enum replacement : int { none = 0, ignored, defaulted, restarting, foreign };

  //! Async-signal-safe; records what it found for report_replaced_handler().
  void reinstall_handler_if_replaced() noexcept {
    const int saved = errno;
    struct sigaction current {};
    if (::sigaction(wakeup_signal_, nullptr, &current) == 0) {
      const bool plain = (current.sa_flags & SA_SIGINFO) == 0;
      replacement found = none;
      if (!plain) {
        found = foreign;
      } else if (current.sa_handler == SIG_IGN) {
        found = ignored;
      } else if (current.sa_handler == SIG_DFL) {
        found = defaulted;
      } else if (current.sa_handler != &ignore_signal) {
        found = foreign;
      } else if ((current.sa_flags & SA_RESTART) != 0) {
        found = restarting;
      }
      if (found != none) {
        struct sigaction wakeup {};
        wakeup.sa_handler = &ignore_signal;
        sigemptyset(&wakeup.sa_mask);
        wakeup.sa_flags = 0;
        ::sigaction(wakeup_signal_, &wakeup, nullptr);
        int expected = none;
        replaced_.compare_exchange_strong(expected, found);
      }
    }
    errno = saved;
  }

  //! Logs, on the waiting thread, a replacement that interrupt() undid.
  void report_replaced_handler() const noexcept {
    const int found = replaced_.exchange(none);
    if (found == none || !lock_.options().log) return;
    const char* what = found == ignored      ? "set to SIG_IGN"
                       : found == defaulted  ? "reset to SIG_DFL"
                       : found == restarting ? "installed with SA_RESTART"
                                             : "replaced by another handler";
    try {
      lock_.options().log(
          LogLevel::error,
          fmt::format("workerlock: pid={} the handler of the coordinator's wakeup signal {} for "
                      "path={} was {} after start(), so stop() could not interrupt the wait; "
                      "workerlock reinstalled its own. Leave that signal to workerlock, or choose "
                      "another with CoordinatorOptions::wakeup_signal",
                      ::getpid(), detail::signal_name(wakeup_signal_), lock_.path().native(),
                      what));
    } catch (...) {
    }
  }

  detail::lock_handle lock_;
  std::string stop_note_;  // <path>.stopped: the note of a whole-server stop
  int wakeup_signal_;
  std::chrono::milliseconds health_check_interval_;
  pthread_t waiter_{};  // the thread in wait_acquire(); published by its Interrupter::KickScope
  std::atomic<pid_t> held_in_{0};  // the process holding the lock through this backend
  mutable std::atomic<int> replaced_{none};
};

}  // namespace workerlock
