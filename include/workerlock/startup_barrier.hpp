// workerlock/startup_barrier.hpp: StartupBarrier, the marker that one-off startup tasks
// (migrations) finished for this generation of the server, and the wait for it.
#pragma once

#include <fcntl.h>
#include <limits.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include <fmt/format.h>

#include "detail/deadline.hpp"
#include "detail/lock_file.hpp"
#include "detail/posix.hpp"
#include "detail/process_identity.hpp"
#include "error.hpp"
#include "generation_marker.hpp"

namespace workerlock {

namespace detail {

//! The marker's name is the lock file's plus this; complete() writes a temporary file named
//! like the marker plus startup_temporary_suffix first.
inline constexpr std::string_view startup_marker_suffix = ".startup";
//! ".tmp." and 16 hexadecimal digits of getrandom(): an unpredictable name, so nobody can
//! plant a file or a symbolic link there in advance.
inline constexpr std::string_view startup_temporary_suffix = ".tmp.0123456789abcdef";

//! The explanation of why `lock_path` cannot have a startup marker, or nullptr if it can:
//! the marker's temporary file must fit in NAME_MAX, its path in PATH_MAX.
inline const char* startup_marker_name_problem(const std::filesystem::path& lock_path) {
  const auto name_length = lock_path.filename().native().size() + startup_marker_suffix.size() +
                           startup_temporary_suffix.size();
  if (name_length > NAME_MAX)
    return "the lock file name is too long for its startup marker <name>.startup plus the "
           "temporary suffix .tmp.<16 hex digits> (255 bytes at most)";
  const auto path_length =
      lock_path.native().size() + startup_marker_suffix.size() + startup_temporary_suffix.size();
  if (path_length >= PATH_MAX)
    return "the lock file path is too long for its startup marker <path>.startup plus the "
           "temporary suffix .tmp.<16 hex digits> (PATH_MAX)";
  return nullptr;
}

//! 64 unpredictable bits for a temporary name: getrandom(), or, where it cannot answer at
//! once (an early boot without entropy, an old kernel), the clock mixed with the pid. The
//! name is only a second line of defence: the file is created with O_EXCL | O_NOFOLLOW.
inline std::uint64_t temporary_name_bits() noexcept {
  std::uint64_t bits = 0;
  if (::getrandom(&bits, sizeof bits, GRND_NONBLOCK) == static_cast<ssize_t>(sizeof bits))
    return bits;
  struct timespec now {};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  bits = (static_cast<std::uint64_t>(now.tv_nsec) * 0x9E3779B97F4A7C15ULL) ^
         (static_cast<std::uint64_t>(now.tv_sec) << 20) ^ static_cast<std::uint64_t>(::getpid());
  return bits;
}

}  // namespace detail

//! FileBackend's GenerationMarker: a marker file next to the lock, `<lock path>.startup`,
//! holding the generation whose startup tasks completed. The primary calls complete() after its
//! tasks; every worker may wait_for() it. A new generation (by default: a new master process)
//! starts incomplete, so tasks run again after a restart of the whole server but not after a
//! failover.
//!
//! The marker gets the lock file's protections: it is never followed if it is a symbolic
//! link, never opened in a way that can block (a FIFO), must be a regular file of at most
//! max_generation_size + 1 bytes, and in a world-writable sticky directory such as
//! /run/lock or /tmp it must not belong to another ordinary user (who could otherwise
//! write the right generation there and make the primary skip its tasks). A marker that
//! breaks these rules, or cannot be read at all, is an error, never an answer.
class StartupBarrier final : public GenerationMarker {
 public:
  //! The longest generation accepted, in bytes.
  static constexpr std::size_t max_generation_size = detail::max_generation_size;

  //! The default generation: the parent (the pre-fork master) pid and its start time, so
  //! workers respawned by the same master share it and a restarted master does not.
  //! Read it in the worker: in the master itself it names the master's own parent.
  static std::string master_generation() { return detail::master_generation(); }

  //! Effects: a barrier on the marker `<lock_path>.startup` for `generation`. Nothing is
  //! read or written yet. `allow_foreign_owner` accepts a marker owned by another user in a
  //! sticky directory, as Options::allow_foreign_owner does for the lock file.
  //! Throws: lock_error (errc::bad_configuration) if the generation is empty, longer than
  //! max_generation_size, or holds a newline or a NUL, or if the lock file's name leaves
  //! no room for the marker's name (ENAMETOOLONG).
  StartupBarrier(const std::filesystem::path& lock_path, std::string generation,
                 bool allow_foreign_owner = false)
      : marker_(lock_path.native() + std::string(detail::startup_marker_suffix)),
        generation_(std::move(generation)),
        allow_foreign_owner_(allow_foreign_owner) {
    check_lock_path(lock_path);
    check_generation(generation_, marker_);
  }

  //! Throws: lock_error (ENAMETOOLONG) if `lock_path` leaves no room for the marker's name.
  static void check_lock_path(const std::filesystem::path& lock_path) {
    if (const char* problem = detail::startup_marker_name_problem(lock_path))
      throw lock_error("set up the startup marker of", lock_path,
                       std::make_error_code(std::errc::filename_too_long), problem);
  }

  //! Throws: lock_error (errc::bad_configuration, equal to std::errc::invalid_argument) naming
  //! `marker` if `generation` is not a valid generation.
  static void check_generation(std::string_view generation, const std::filesystem::path& marker) {
    if (const char* problem = detail::generation_problem(generation))
      throw lock_error("set up the startup marker", marker,
                       make_error_code(errc::bad_configuration), problem);
  }

  const std::filesystem::path& marker_path() const noexcept { return marker_; }
  const std::string& generation() const noexcept { return generation_; }
  //! The marker's path, quoted: "'/run/app/primary.lock.startup'".
  std::string describe() const override { return fmt::format("'{}'", marker_.native()); }

  //! Returns: true when the marker names this generation; false when it names another one
  //! or does not exist.
  //! Throws: lock_error when the marker cannot be read or is refused (see the class).
  bool completed() const override {
    detail::failure f;
    const bool done = query(f);
    f.throw_if_failed(marker_);
    return done;
  }
  //! As completed(); on an error, sets `ec` and returns false. Then "false" is no answer:
  //! do not run the startup tasks because of it.
  bool completed(std::error_code& ec) const noexcept {
    detail::failure f;
    const bool done = query(f);
    ec = f.code;
    return done && !f;
  }

  //! Marks the tasks complete: writes a temporary file with an unpredictable name
  //! (O_EXCL | O_NOFOLLOW) and renames it over the marker, so a reader sees the old marker
  //! or the new one, never half of one.
  //! Throws: lock_error.
  void complete() override {
    detail::failure f;
    write_marker(f);
    f.throw_if_failed(marker_);
  }
  void complete(std::error_code& ec) noexcept {
    detail::failure f;
    write_marker(f);
    ec = f.code;
  }

  //! Waits until completed() or until `timeout` passes, on an absolute deadline, so that
  //! signals cannot prolong it. Polls with backoff from 1 ms to 20 ms: this is a wait for
  //! startup, not a hot path. An error is retried until the deadline.
  //! Returns: whether the tasks completed.
  //! Throws: lock_error when the last read before the deadline failed.
  bool wait_for(std::chrono::milliseconds timeout) const {
    detail::failure f;
    const bool done = wait(timeout, f);
    f.throw_if_failed(marker_);
    return done;
  }
  bool wait_for(std::chrono::milliseconds timeout, std::error_code& ec) const noexcept {
    detail::failure f;
    const bool done = wait(timeout, f);
    ec = f.code;
    return done && !f;
  }

 private:
  //! The implementation of completed(): false with `f` set on an error.
  bool query(detail::failure& f) const noexcept {
    constexpr const char* operation = "read startup marker";
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    const int opened = detail::retry_on_eintr([&] {
      return ::open(marker_.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
    });
    if (opened < 0 && errno == ENOENT) return false;  // nobody completed anything yet
    const int fd = detail::keep_off_standard_streams(opened);
    if (fd < 0) {
      const int e = errno;
      f.set(e, operation,
            e == ELOOP ? "the startup marker is a symbolic link, and workerlock never follows "
                         "one (O_NOFOLLOW)"
                       : detail::explain_open_errno(e));
      return false;
    }
    const bool done = read_marker(fd, f);
    ::close(fd);
    return done;
  }

  bool read_marker(int fd, detail::failure& f) const noexcept {
    constexpr const char* operation = "read startup marker";
    struct stat file {};
    if (::fstat(fd, &file) != 0) {
      f.set(errno, operation);
      return false;
    }
    if (!S_ISREG(file.st_mode)) {
      f.set(EINVAL, operation,
            "the startup marker is not a regular file (a FIFO, a directory or a device "
            "planted there?); remove it");
      return false;
    }
    if (!allow_foreign_owner_ &&
        detail::foreign_owner_in_sticky_directory(marker_.c_str(), file.st_uid)) {
      f.set(EPERM, operation,
            "the startup marker belongs to another user in a world-writable sticky directory "
            "such as /tmp, so that user could make the primary skip its startup tasks; use a "
            "private directory such as /run/<app>");
      return false;
    }
    constexpr const char* oversized = "the startup marker is larger than any generation";
    if (file.st_size > static_cast<off_t>(max_generation_size + 1)) {
      f.set(EFBIG, operation, oversized);
      return false;
    }
    char buffer[max_generation_size + 2];
    std::size_t got = 0;
    while (got < sizeof buffer) {
      const auto n =
          detail::retry_on_eintr([&] { return ::read(fd, buffer + got, sizeof buffer - got); });
      if (n < 0) {
        f.set(errno, operation);
        return false;
      }
      if (n == 0) break;
      got += static_cast<std::size_t>(n);
    }
    if (got > max_generation_size + 1) {  // it grew since fstat()
      f.set(EFBIG, operation, oversized);
      return false;
    }
    std::string_view text(buffer, got);
    if (!text.empty() && text.back() == '\n') text.remove_suffix(1);
    return text == generation_;
  }

  void write_marker(detail::failure& f) const noexcept {
    constexpr const char* operation = "mark startup complete in";
    char temporary[PATH_MAX];
    int fd = -1;
    for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
      const int length =
          std::snprintf(temporary, sizeof temporary, "%s.tmp.%016llx", marker_.c_str(),
                        static_cast<unsigned long long>(detail::temporary_name_bits()));
      if (length < 0 || static_cast<std::size_t>(length) >= sizeof temporary) {
        f.set(ENAMETOOLONG, operation, "the startup marker's path is too long");
        return;
      }
      fd = detail::retry_on_eintr([&] {
        return ::open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY,
                      0644);
      });
      if (fd < 0 && errno != EEXIST) break;  // EEXIST: a name taken; draw another
    }
    const bool created = fd >= 0;
    fd = detail::keep_off_standard_streams(fd);
    if (fd < 0) {
      const int e = errno;
      if (created) ::unlink(temporary);
      f.set(e, operation, detail::explain_open_errno(e));
      return;
    }
    char line[max_generation_size + 1];
    const auto size = std::min(generation_.size(), max_generation_size);
    std::copy_n(generation_.data(), size, line);
    line[size] = '\n';
    std::size_t written = 0;
    while (written < size + 1) {
      const auto n =
          detail::retry_on_eintr([&] { return ::write(fd, line + written, size + 1 - written); });
      if (n <= 0) {
        f.set(n < 0 ? errno : EIO, operation);
        break;
      }
      written += static_cast<std::size_t>(n);
    }
    if (::close(fd) != 0 && !f) f.set(errno, operation);
    if (!f && ::rename(temporary, marker_.c_str()) != 0) f.set(errno, operation);
    if (f) ::unlink(temporary);
  }

  bool wait(std::chrono::milliseconds timeout, detail::failure& f) const noexcept {
    return detail::poll_until_done(timeout, [&]() noexcept {
      f = detail::failure{};
      return query(f);
    });
  }

  std::filesystem::path marker_;
  std::string generation_;
  bool allow_foreign_owner_ = false;
};

}  // namespace workerlock
