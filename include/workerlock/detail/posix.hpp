// workerlock/detail/posix.hpp: the thin syscall layer: EINTR retries, errno capture and the
// three lock primitives behind one interface. Nothing here throws.
#pragma once

#if !defined(__linux__)
#error "workerlock is Linux only: it relies on OFD locks, /proc, statx, eventfd and pidfds"
#endif

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

#include "../options.hpp"

namespace workerlock::detail {

//! Calls f() again while it fails with EINTR. Never use it for close(): Linux releases the
//! descriptor even when close() reports EINTR, and a retry could close someone else's.
template <typename F>
auto retry_on_eintr(F f) noexcept -> decltype(f()) {
  decltype(f()) result;
  do {
    result = f();
  } while (result == -1 && errno == EINTR);
  return result;
}

//! close() that keeps errno intact, for cleanup on error paths.
inline void close_keep_errno(int fd) noexcept {
  if (fd < 0) return;
  const int saved = errno;
  ::close(fd);
  errno = saved;
}

//! Every descriptor the library keeps must stay off 0, 1 and 2: a daemon started with a
//! standard stream closed would otherwise get its lock file there, and a later
//! freopen(stdin) or a log write to stderr would drop the lock or corrupt the file.
//! Takes ownership of `fd`: returns it, or a close-on-exec duplicate at 3 or above (the
//! original closed). Returns -1 with errno (and `fd` closed) when no duplicate can be made.
inline int keep_off_standard_streams(int fd) noexcept {
  if (fd < 0 || fd > STDERR_FILENO) return fd;
  const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
  close_keep_errno(fd);
  return moved;
}

//! EWOULDBLOCK/EAGAIN/EACCES from a non-blocking attempt mean "someone else holds it".
constexpr bool is_contention(int errno_value) noexcept {
  return errno_value == EWOULDBLOCK || errno_value == EAGAIN || errno_value == EACCES;
}

inline struct flock whole_file(short type) noexcept {
  struct flock range {};
  range.l_type = type;
  range.l_whence = SEEK_SET;
  range.l_start = 0;
  range.l_len = 0;  // to the end of the file, however it grows
  range.l_pid = 0;  // required by F_OFD_*
  return range;
}

//! One lock attempt. Returns 0 when acquired, else -1 with errno set
//! (a contention errno when `blocking` is false and someone else holds it).
//! A blocking wait is NOT restarted on EINTR: callers decide, so a wait can be cancelled.
inline int acquire_once(int fd, Mechanism mechanism, bool blocking) noexcept {
  switch (mechanism) {
    case Mechanism::flock:
      return ::flock(fd, LOCK_EX | (blocking ? 0 : LOCK_NB));
    case Mechanism::posix: {
      auto range = whole_file(F_WRLCK);
      return ::fcntl(fd, blocking ? F_SETLKW : F_SETLK, &range);
    }
    case Mechanism::ofd: {
      auto range = whole_file(F_WRLCK);
      return ::fcntl(fd, blocking ? F_OFD_SETLKW : F_OFD_SETLK, &range);
    }
  }
  errno = EINVAL;
  return -1;
}

//! Releases the lock held through fd. Returns 0 or -1 with errno.
inline int release_once(int fd, Mechanism mechanism) noexcept {
  switch (mechanism) {
    case Mechanism::flock:
      return retry_on_eintr([&] { return ::flock(fd, LOCK_UN); });
    case Mechanism::posix: {
      auto range = whole_file(F_UNLCK);
      return retry_on_eintr([&] { return ::fcntl(fd, F_SETLK, &range); });
    }
    case Mechanism::ofd: {
      auto range = whole_file(F_UNLCK);
      return retry_on_eintr([&] { return ::fcntl(fd, F_OFD_SETLK, &range); });
    }
  }
  errno = EINVAL;
  return -1;
}

}  // namespace workerlock::detail
