// workerlock/detail/lock_handle.hpp: the library's own move-only handle on one lock file,
// which WorkerLock wraps and the election and FileBackend use directly. Nothing here throws.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iterator>
#include <memory>
#include <string_view>
#include <system_error>

#include "../error.hpp"
#include "../options.hpp"
#include "deadline.hpp"
#include "lock_file.hpp"
#include "posix.hpp"
#include "record.hpp"
#include "registry.hpp"

namespace workerlock::detail {

//! Owns one registered lock_state. Every operation reports errors in a `failure`; the public
//! wording (exceptions, error codes, log lines) is WorkerLock's and its users'.
class lock_handle {
 public:
  //! An empty handle; every lock attempt on it fails with EINVAL.
  lock_handle() noexcept = default;

  //! Remembers `path`, made absolute against the current directory, and `options`; does not
  //! open the file. When the current directory is unknown, every attempt fails saying so.
  lock_handle(std::filesystem::path path, Options options)
      : state_(std::make_unique<lock_state>()) {
    state_->path = make_absolute(std::move(path), unresolved_path_errno_);
    state_->options = std::move(options);
    registry_guard reg;
    reg->link(state_.get());
  }

  lock_handle(lock_handle&& other) noexcept
      : state_(std::move(other.state_)), unresolved_path_errno_(other.unresolved_path_errno_) {}
  lock_handle& operator=(lock_handle&& other) noexcept {
    if (this != &other) {
      dispose();
      state_ = std::move(other.state_);
      unresolved_path_errno_ = other.unresolved_path_errno_;
    }
    return *this;
  }
  lock_handle(const lock_handle&) = delete;
  lock_handle& operator=(const lock_handle&) = delete;
  ~lock_handle() { dispose(); }

  //! One acquisition in `mode`; see detail::acquire().
  bool acquire(wait_mode mode, failure& f) noexcept {
    if (!state_) {
      f.set(EINVAL, "lock", "the handle is empty (default-constructed or moved from)");
      return false;
    }
    if (unresolved_path_errno_ != 0) {
      f.set(unresolved_path_errno_, "lock",
            "the path is relative and the current directory could not be determined when the "
            "handle was made, so it names no file for sure; use an absolute path");
      return false;
    }
    return detail::acquire(*state_, mode, f);
  }

  //! Retries with backoff (50 µs doubling to 5 ms) until `deadline`; every sleep ends at an
  //! absolute time, so a signal that cuts one short never restarts it.
  bool acquire_before(monotonic_clock::time_point deadline, failure& f) noexcept {
    constexpr std::chrono::microseconds longest_pause(5000);
    std::chrono::microseconds pause(50);
    for (;;) {
      if (acquire(wait_mode::try_once, f) || f) return !f;
      const auto now = monotonic_clock::now();
      if (now >= deadline) return false;
      sleep_until(deadline - now > pause ? now + pause : deadline);
      pause = std::min(pause * 2, longest_pause);
    }
  }

  //! Releases the lock if held; the file stays open. See detail::release().
  void release(failure& f) noexcept {
    if (state_) detail::release(*state_, f);
  }

  //! Removes the file while holding its lock, then releases and closes.
  void release_and_remove(failure& f) noexcept {
    if (!state_) {
      f.set(EINVAL, "remove lock file", "the handle is empty (default-constructed or moved from)");
      return;
    }
    detail::release_and_remove(*state_, f);
  }

  //! Closes the file (which releases an OFD or flock lock); the next attempt reopens it.
  void close() noexcept {
    if (state_) close_file(*state_);
  }

  //! Keeps this handle out of every acquisition (WORKERLOCK_ROLE=secondary).
  void keep_out_by_operator() noexcept {
    if (state_) state_->kept_out_by_operator = true;
  }

  //! True while this handle, in this process, holds the lock.
  bool owns_lock() const noexcept {
    return state_ && state_->owned && !state_->copied_from_another_process();
  }

  //! True while this handle holds the lock on the file whose identity is (`dev`, `ino`).
  bool holds_file(dev_t dev, ino_t ino) const noexcept {
    return owns_lock() && state_->dev == dev && state_->ino == ino;
  }

  //! The holder's pid as its record says, read through this handle's descriptor; 0 if
  //! unknown (the file is not open, or holds no record).
  pid_t recorded_holder_pid() const noexcept {
    const int fd = native_handle();
    if (fd < 0) return 0;
    char buffer[max_record_size];
    const auto got = retry_on_eintr([&] { return ::pread(fd, buffer, sizeof buffer, 0); });
    if (got <= 0) return 0;
    try {
      const auto record = parse_record(std::string_view(buffer, static_cast<std::size_t>(got)));
      return record ? record->pid : 0;
    } catch (...) {  // only allocation throws in there: the pid stays unknown
      return 0;
    }
  }

  const std::filesystem::path& path() const noexcept {
    static const std::filesystem::path empty;
    return state_ ? state_->path : empty;
  }
  const Options& options() const noexcept {
    static const Options defaults;
    return state_ ? state_->options : defaults;
  }
  //! The open descriptor; -1 before the first attempt and in a copy of the process.
  int native_handle() const noexcept {
    return state_ && !state_->copied_from_another_process() ? state_->fd : -1;
  }
  //! True if this handle was copied into this process by fork() or a raw clone.
  bool inherited_across_fork() const noexcept {
    return state_ && (state_->inherited || state_->copied_from_another_process());
  }

 private:
  //! `path` made absolute against the current directory; unchanged (and `error` set to the
  //! errno) when the current directory is unknown. An empty path stays empty.
  static std::filesystem::path make_absolute(std::filesystem::path path, int& error) {
    error = 0;
    if (path.empty() || path.is_absolute()) return path;
    std::error_code ec;
    auto directory = std::filesystem::current_path(ec);
    if (ec) {
      error = ec.value();
      return path;
    }
    // "./a.lock" gives "/cwd/a.lock"; nothing else is normalized (a ".." after a symbolic
    // link means what the kernel says it means).
    auto part = path.begin();
    while (part != path.end() && *part == "." && std::next(part) != path.end()) ++part;
    for (; part != path.end(); ++part) directory /= *part;
    return directory;
  }

  void dispose() noexcept {
    if (!state_) return;
    // Closing our only descriptor releases an OFD or flock lock by itself; a POSIX lock's
    // descriptor may be shared with sibling handles, so release it explicitly.
    if (state_->options.mechanism == Mechanism::posix) {
      failure ignored;
      detail::release(*state_, ignored);
    }
    {
      registry_guard reg;  // sibling POSIX handles read `owned` under this mutex
      state_->owned = false;
      close_registered(*reg.operator->(), *state_);
      reg->unlink(state_.get());
    }
    state_.reset();
  }

  std::unique_ptr<lock_state> state_;
  int unresolved_path_errno_ = 0;  // errno of getcwd() when a relative path stayed relative
};

}  // namespace workerlock::detail
