// workerlock/worker_lock.hpp: WorkerLock, a move-only RAII handle on one advisory lock file.
// It is Lockable, so std::unique_lock and std::scoped_lock work with it.
#pragma once

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iterator>
#include <memory>
#include <system_error>

#include <fmt/format.h>

#include "detail/deadline.hpp"
#include "detail/dependent_false.hpp"
#include "detail/lock_handle.hpp"
#include "error.hpp"
#include "options.hpp"

// The message of every refused question to a temporary WorkerLock (static_assert needs a
// string literal).
#define WORKERLOCK_DETAIL_TEMPORARY_LOCK_MESSAGE                                           \
  "this asks a temporary WorkerLock (such as is_primary_worker(...).lock), whose lock is " \
  "released at the end of the statement; keep it alive: auto election = "                  \
  "workerlock::is_primary_worker(...);"

namespace workerlock {

//! A handle on the advisory lock of one file. Constructing it touches nothing; the file is
//! opened (and created 0644, never truncated) on the first lock attempt, and stays open so
//! that re-locking costs only the lock syscall. The destructor releases the lock and closes.
//! Every acquisition checks that the path still names the open file (it may have been
//! removed, renamed or replaced meanwhile) and otherwise retries on the file it names now.
//!
//! Contents: the holder record is written only into a file that is empty or already holds
//! a record. Any other file (a configuration file named by mistake, another tool's pidfile)
//! is locked all the same but never written, truncated or removed; each acquisition of it
//! logs a warning naming the path through Options::log.
//!
//! Descriptors: the lock file never gets descriptor 0, 1 or 2, even when the process starts
//! with a standard stream closed.
//!
//! Fork: a child of fork() never holds or prolongs the parent's lock; its copy of the handle
//! is closed by a pthread_atfork handler and reports owns_lock() == false. A copy made
//! without atfork handlers (syscall(SYS_fork), clone() without CLONE_VM) is recognised by
//! its pid: there the handle owns nothing either, and unlock(), unlock_and_remove(), the
//! destructor and every lock attempt only close its inherited descriptor, never release
//! the original's lock nor remove the file.
//! Threads: one handle must not be used by two threads at once (like std::unique_lock);
//! distinct handles on the same file exclude each other, even with Mechanism::posix.
class WorkerLock {
 public:
  //! An empty handle; every lock attempt on it fails with EINVAL.
  WorkerLock() noexcept = default;

  //! Effects: remembers `path` and `options`; does not open the file. A relative path is
  //! made absolute here, against the current directory (symbolic links are not resolved),
  //! so a later chdir() of the process changes nothing: path() returns the absolute path.
  //! If the current directory cannot be determined (it was removed, say), every lock
  //! attempt fails with a lock_error that says so.
  explicit WorkerLock(std::filesystem::path path, Options options = {})
      : handle_(std::move(path), std::move(options)) {}

  //! Wraps a handle the library's own parts (the election) have already used.
  explicit WorkerLock(detail::lock_handle handle) noexcept : handle_(std::move(handle)) {}

  WorkerLock(WorkerLock&&) noexcept = default;
  WorkerLock& operator=(WorkerLock&&) noexcept = default;
  WorkerLock(const WorkerLock&) = delete;
  WorkerLock& operator=(const WorkerLock&) = delete;

  //! Releases the lock if held and closes the file. Never throws.
  ~WorkerLock() = default;

  //! Blocks until the lock is held. Restarts after signals (EINTR).
  //! With Mechanism::posix, a wait the kernel refuses as a deadlock (EDEADLK: the holder's
  //! process itself waits for a POSIX lock this process holds, as with two Coordinators per
  //! process) is no error: it polls, every millisecond at most, until the lock is free.
  //! Throws: lock_error on any error other than waiting.
  void lock() {
    detail::failure f;
    handle_.acquire(detail::wait_mode::block, f);
    f.throw_if_failed(path());
  }
  void lock(std::error_code& ec) noexcept {
    detail::failure f;
    handle_.acquire(detail::wait_mode::block, f);
    ec = f.code;
  }

  //! Returns: true if the lock is now held by this handle (also when it already was),
  //! false if another handle or process holds it. Contention is not an error.
  //! Throws: lock_error when the file cannot be opened, locked or recorded; then the
  //! handle holds nothing.
  [[nodiscard]] bool try_lock() {
    detail::failure f;
    const bool held = handle_.acquire(detail::wait_mode::try_once, f);
    f.throw_if_failed(path());
    return held;
  }
  [[nodiscard]] bool try_lock(std::error_code& ec) noexcept {
    detail::failure f;
    const bool held = handle_.acquire(detail::wait_mode::try_once, f);
    ec = f.code;
    return held;
  }

  //! Retries try_lock() with backoff (50 µs doubling to 5 ms) until `timeout` has passed.
  //! The deadline is absolute on the monotonic clock, so signals never stretch the wait, and
  //! a huge timeout such as hours::max() means "no time limit".
  //! Returns: as try_lock(); false once the deadline has passed.
  template <typename Rep, typename Period>
  [[nodiscard]] bool try_lock_for(const std::chrono::duration<Rep, Period>& timeout) {
    return try_lock_until(detail::deadline_after(timeout));
  }
  template <typename Rep, typename Period>
  [[nodiscard]] bool try_lock_for(const std::chrono::duration<Rep, Period>& timeout,
                                  std::error_code& ec) noexcept {
    return try_lock_until(detail::deadline_after(timeout), ec);
  }

  //! As try_lock_for(), until `deadline`. A deadline on another clock than steady_clock
  //! (system_clock, say) is converted once, on entry; time_point::max() means no limit.
  template <typename Clock, typename Duration>
  [[nodiscard]] bool try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    detail::failure f;
    const bool held = handle_.acquire_before(detail::to_monotonic(deadline), f);
    f.throw_if_failed(path());
    return held;
  }
  template <typename Clock, typename Duration>
  [[nodiscard]] bool try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline,
                                    std::error_code& ec) noexcept {
    detail::failure f;
    const bool held = handle_.acquire_before(detail::to_monotonic(deadline), f);
    ec = f.code;
    return held;
  }

  //! Releases the lock if this handle holds it; otherwise does nothing, so a second
  //! unlock() is harmless. The file stays open for the next lock().
  //! Never throws (BasicLockable; std::unique_lock calls it from its destructor): should
  //! the kernel refuse to unlock (the descriptor was closed or replaced behind the handle's
  //! back), the descriptor is closed, which frees the lock, and a warning goes to
  //! Options::log. unlock(ec) reports that failure instead, and logs nothing.
  void unlock() noexcept {
    detail::failure f;
    handle_.release(f);
    if (f) {
      try {
        detail::log_line(handle_.options(), LogLevel::warning,
                         fmt::format("workerlock: pid={} warning: {}; the descriptor was closed, "
                                     "which frees the lock",
                                     ::getpid(), lock_error(f.operation, path(), f.code).what()));
      } catch (...) {  // NOLINT(bugprone-empty-catch): formatting allocates; the line is lost
      }
    }
  }
  void unlock(std::error_code& ec) noexcept {
    detail::failure f;
    handle_.release(f);
    ec = f.code;
  }

  //! Removes the lock file, then releases, all while the path still names the locked file,
  //! so processes waiting on the old file retry on a new one and never hold two locks.
  //! Requires: owns_lock(). Closes the file.
  //! Throws: lock_error with errc::not_held when this handle does not hold the lock, and
  //! with errc::foreign_owner after releasing, without removing, when the file is not a
  //! workerlock lock file (not empty and holding no holder record). Both compare equal to
  //! std::errc::operation_not_permitted.
  void unlock_and_remove() {
    detail::failure f;
    handle_.release_and_remove(f);
    f.throw_if_failed(path());
  }
  void unlock_and_remove(std::error_code& ec) noexcept {
    detail::failure f;
    handle_.release_and_remove(f);
    ec = f.code;
  }

  //! True while this handle, in this process, holds the lock. Asking a temporary handle
  //! (is_primary_worker(...).lock.owns_lock()) does not compile: its lock is released at
  //! the end of the statement.
  bool owns_lock() const& noexcept { return handle_.owns_lock(); }
  template <typename T = void>
  bool owns_lock() const&& noexcept {
    static_assert(detail::dependent_false<T>, WORKERLOCK_DETAIL_TEMPORARY_LOCK_MESSAGE);
    return false;
  }
  explicit operator bool() const& noexcept { return owns_lock(); }
  template <typename T = void>
  explicit operator bool() const&& noexcept {
    static_assert(detail::dependent_false<T>, WORKERLOCK_DETAIL_TEMPORARY_LOCK_MESSAGE);
    return false;
  }

  const std::filesystem::path& path() const noexcept { return handle_.path(); }
  const Options& options() const noexcept { return handle_.options(); }
  Mechanism mechanism() const noexcept { return options().mechanism; }

  //! The open descriptor, or -1 before the first attempt. Closing it breaks the handle, and
  //! a dup() of it would keep an OFD or flock lock alive after the handle is destroyed.
  //! In a copy of the process that inherited the handle, -1.
  int native_handle() const noexcept { return handle_.native_handle(); }

  //! True if this handle was copied into this process by fork() or a raw clone (there it
  //! owns nothing, and its inherited descriptor is closed or will be on its next use).
  bool inherited_across_fork() const noexcept { return handle_.inherited_across_fork(); }

 private:
  detail::lock_handle handle_;
};

}  // namespace workerlock
