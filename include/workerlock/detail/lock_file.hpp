// workerlock/detail/lock_file.hpp: open, lock, verify, record and release one lock file.
// The noexcept engine behind WorkerLock; errors land in a detail::failure.
#pragma once

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string_view>

#include <fmt/format.h>

#include "../error.hpp"
#include "deadline.hpp"
#include "explain_errno.hpp"
#include "posix.hpp"
#include "record.hpp"
#include "registry.hpp"

namespace workerlock::detail {

//! stat() of the directory containing `path`, without allocating. Returns 0 or -1/errno.
inline int stat_parent_directory(const char* path, struct stat& directory) noexcept {
  char parent[PATH_MAX];
  const auto length = std::strlen(path);
  if (length >= sizeof parent) {
    errno = ENAMETOOLONG;
    return -1;
  }
  std::memcpy(parent, path, length + 1);
  char* slash = std::strrchr(parent, '/');
  if (slash == nullptr) {
    std::strcpy(parent, ".");
  } else if (slash == parent) {
    parent[1] = '\0';
  } else {
    *slash = '\0';
  }
  return ::stat(parent, &directory);
}

//! True when the file belongs to an ordinary user other than us and other than the owner
//! of its world-writable sticky directory: the /tmp denial of service, where that user
//! can hold the lock forever.
inline bool foreign_owner_in_sticky_directory(const char* path, uid_t owner) noexcept {
  if (owner == 0 || owner == ::geteuid()) return false;
  struct stat directory {};
  if (stat_parent_directory(path, directory) != 0) return false;
  if (owner == directory.st_uid) return false;
  return (directory.st_mode & S_ISVTX) != 0 && (directory.st_mode & S_IWOTH) != 0;
}

inline bool parent_directory_exists(const char* path) noexcept {
  struct stat directory {};
  return stat_parent_directory(path, directory) == 0 && S_ISDIR(directory.st_mode);
}

//! Opens (creating if needed) the lock file of `s`. Requires the registry mutex, so that no
//! fork() can copy the descriptor before it is registered.
inline bool open_registered(registry& reg, lock_state& s, failure& f) noexcept {
  constexpr const char* operation = "open lock file";
  if (s.path.empty()) {
    f.set(EINVAL, operation, "the path is empty");
    return false;
  }
  const char* path = s.path.c_str();
  if (s.path.native().back() == '/') {
    f.set(EISDIR, operation,
          "the path ends with '/', so it names a directory; a lock file must be a regular file "
          "(drop the trailing slash)");
    return false;
  }

  // A POSIX lock dies when the process closes ANY descriptor of the file. So POSIX handles
  // on one file share one descriptor, and a handle of another mechanism may not open a file
  // that a POSIX handle of this process has open (its close would drop that lock), nor the
  // other way round. Only when this process has another open handle does this cost a stat.
  const bool posix = s.options.mechanism == Mechanism::posix;
  const bool others_open = reg.find_if([&](const lock_state& t) {
    return &t != &s && t.fd >= 0 && (posix || t.options.mechanism == Mechanism::posix);
  }) != nullptr;
  struct stat named {};
  if (others_open && ::lstat(path, &named) == 0) {
    const auto* same_file = reg.find_if([&](const lock_state& t) {
      return &t != &s && t.fd >= 0 && t.dev == named.st_dev && t.ino == named.st_ino &&
             (posix || t.options.mechanism == Mechanism::posix);
    });
    if (same_file != nullptr && posix && same_file->options.mechanism == Mechanism::posix) {
      s.fd = same_file->fd;
      s.dev = same_file->dev;
      s.ino = same_file->ino;
      return true;
    }
    if (same_file != nullptr) {
      f.set(EBUSY, operation,
            "another handle of this process has the file open with a different mechanism, and one "
            "of them is Mechanism::posix, whose lock any close() of the file would drop");
      return false;
    }
  }

  constexpr int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY;
  int fd = -1;
  for (int attempt = 0; attempt < 100; ++attempt) {
    fd = retry_on_eintr([&] { return ::open(path, flags); });
    if (fd >= 0 || errno != ENOENT) break;
    // Nothing truncates: O_EXCL creates a new empty file or fails if one appeared meanwhile.
    fd = retry_on_eintr([&] { return ::open(path, flags | O_CREAT | O_EXCL, 0644); });
    if (fd >= 0 || errno != EEXIST) break;
  }
  // Never on 0, 1 or 2: a log write to stderr would land in the file, and freopen(stdin)
  // would close it and drop the lock.
  fd = keep_off_standard_streams(fd);
  if (fd < 0) {
    const int e = errno;
    f.set(e, operation, explain_open_failure(path, e));
    if (e == ENOENT && parent_directory_exists(path))
      f.explanation = "the file system refuses to create the file here";
    return false;
  }
  // Type and owner are checked before locking: a refused file is never locked, not even
  // for a moment, and a foreign holder is reported, not mistaken for plain contention.
  // statx asks only for what is used: no timestamps (reading them can make the next write
  // record a fine-grained timestamp, which costs on Linux >= 6.13).
  struct statx file {};
  if (::statx(fd, "", AT_EMPTY_PATH | AT_STATX_SYNC_AS_STAT,
              STATX_TYPE | STATX_MODE | STATX_UID | STATX_INO, &file) != 0) {
    f.set(errno, operation);
    close_keep_errno(fd);
    return false;
  }
  if (!S_ISREG(file.stx_mode)) {
    close_keep_errno(fd);
    f.set(EINVAL, operation, explain_file_type(file.stx_mode));
    return false;
  }
  if (!s.options.allow_foreign_owner && foreign_owner_in_sticky_directory(path, file.stx_uid)) {
    close_keep_errno(fd);
    f.set(EPERM, operation,
          "the file belongs to another user in a world-writable sticky directory such as /tmp, "
          "so that user could hold the lock forever; use a private directory such as /run/<app>");
    return false;
  }
  s.fd = fd;
  s.dev = makedev(file.stx_dev_major, file.stx_dev_minor);
  s.ino = file.stx_ino;
  return true;
}

//! Closes the descriptor unless another POSIX handle of this process shares it. Requires
//! the registry mutex.
inline void close_registered(registry& reg, lock_state& s) noexcept {
  if (s.fd < 0) return;
  const bool shared =
      s.options.mechanism == Mechanism::posix &&
      reg.find_if([&](const lock_state& t) { return &t != &s && t.fd == s.fd; }) != nullptr;
  if (!shared) ::close(s.fd);  // never retried: the descriptor is gone even on EINTR
  s.fd = -1;
}

inline void close_file(lock_state& s) noexcept {
  registry_guard reg;
  close_registered(*reg.operator->(), s);
}

enum class inspection { ours, replaced, failed };

//! After the kernel granted the lock: does the path still name the file we locked? A holder
//! may have removed it (unlock_and_remove) while we waited on the old inode, or someone
//! renamed it, or linked it elsewhere and removed the name, while our descriptor stayed
//! open. So every grant compares the path with the open file, as FreeBSD's flopen() does;
//! a link count would not do, since a renamed file keeps its links. Sets `size` for
//! write_holder_record().
inline inspection inspect_locked_file(lock_state& s, off_t& size, failure& f) noexcept {
  constexpr const char* operation = "verify lock file";
  // statx of the path without timestamps, as in open_registered(): an lstat() here would
  // make the pwrite() of the record that follows pay for a fine-grained mtime.
  struct statx named {};
  if (::statx(AT_FDCWD, s.path.c_str(), AT_SYMLINK_NOFOLLOW | AT_STATX_SYNC_AS_STAT,
              STATX_INO | STATX_SIZE, &named) != 0) {
    if (errno == ENOENT) return inspection::replaced;
    f.set(errno, operation);
    return inspection::failed;
  }
  if (makedev(named.stx_dev_major, named.stx_dev_minor) != s.dev || named.stx_ino != s.ino)
    return inspection::replaced;
  size = static_cast<off_t>(named.stx_size);
  return inspection::ours;
}

enum class contents { record, foreign, failed };

//! Is the locked file recognisably a workerlock lock file, one that a record may overwrite:
//! empty, or starting with a holder record? Anything else (a configuration file that
//! $WORKERLOCK_PATH named by mistake, another tool's pidfile, garbage) is never written.
//! One pread() of at most a record's size, only when the file is not empty.
inline contents inspect_contents(const lock_state& s, off_t size, failure& f) noexcept {
  if (size == 0) return contents::record;
  char buffer[max_record_size + 1];
  const auto got = retry_on_eintr([&] { return ::pread(s.fd, buffer, sizeof buffer, 0); });
  if (got < 0) {
    f.set(errno, "read lock file");
    return contents::failed;
  }
  if (got == 0) return contents::record;  // emptied since the stat
  try {
    const auto text = std::string_view(buffer, static_cast<std::size_t>(got));
    return parse_record(text) ? contents::record : contents::foreign;
  } catch (...) {  // parse_record allocates
    f.set(ENOMEM, "read lock file");
    return contents::failed;
  }
}

//! The warning for a lock file whose bytes are not ours: it is locked and left untouched.
inline void warn_foreign_contents(const lock_state& s, off_t size) noexcept {
  if (!s.options.log) return;
  try {
    s.options.log(LogLevel::warning,
                  fmt::format("workerlock: pid={} warning: {} is not a workerlock lock file (its "
                              "{} bytes are no holder record); it is locked but left untouched "
                              "and no holder record is written; point the lock path at a file of "
                              "its own",
                              ::getpid(), s.path.native(), size));
  } catch (...) {  // a log sink that throws must not break the election
  }
}

//! Writes the holder record in place; shrinks the file only if an older record was longer.
inline bool write_holder_record(lock_state& s, off_t size, failure& f) noexcept {
  char buffer[max_record_size];
  const auto length =
      format_record(buffer, ::getpid(), std::chrono::system_clock::now(), s.options.mechanism);
  const auto written = retry_on_eintr([&] { return ::pwrite(s.fd, buffer, length, 0); });
  if (written != static_cast<ssize_t>(length)) {
    f.set(written < 0 ? errno : EIO, "write holder record to");
    return false;
  }
  if (size > static_cast<off_t>(length) &&
      retry_on_eintr([&] { return ::ftruncate(s.fd, static_cast<off_t>(length)); }) != 0) {
    f.set(errno, "write holder record to");
    return false;
  }
  return true;
}

//! POSIX locks do not exclude each other inside one process, so handles of this process on
//! the same file exclude each other here. Requires the registry mutex.
inline bool held_by_sibling_handle(registry& reg, const lock_state& s) noexcept {
  return reg.find_if([&](const lock_state& t) {
    return &t != &s && t.fd == s.fd && t.options.mechanism == Mechanism::posix && t.owned;
  }) != nullptr;
}

//! In a copy of the process made without the atfork handlers (syscall(SYS_fork), clone()),
//! disowns the states inherited from the original before `s` is used: their descriptors are
//! closed, never unlocked, so the original keeps its lock (see registry::adopt()).
inline void adopt_if_copied(const lock_state& s) noexcept {
  if (s.copied_from_another_process()) {
    registry_guard adopting;
  }
}

//! Drops the kernel lock; if even that fails, closes the descriptor, which always releases.
//! POSIX handles update `owned` under the registry mutex, where sibling handles look.
//! In a copy of the process that inherited `s`, releases nothing (see adopt_if_copied()).
inline bool release(lock_state& s, failure& f) noexcept {
  adopt_if_copied(s);
  if (!s.owned) return true;
  if (s.options.mechanism == Mechanism::posix) {
    registry_guard reg;
    s.owned = false;
    if (release_once(s.fd, s.options.mechanism) != 0) {
      f.set(errno, "unlock");
      close_registered(*reg.operator->(), s);
    }
  } else {
    s.owned = false;
    if (release_once(s.fd, s.options.mechanism) != 0) {
      f.set(errno, "unlock");
      close_file(s);
    }
  }
  return !f;
}

enum class wait_mode { try_once, block, block_interruptibly };

//! Sleeps `pause` for lock_posix(); false (errno EINTR) when a signal cut it short in
//! wait_mode::block_interruptibly.
inline bool pause_posix_wait(std::chrono::microseconds pause, wait_mode mode) noexcept {
  if (sleep_until(monotonic_clock::now() + pause, mode == wait_mode::block_interruptibly))
    return true;
  errno = EINTR;
  return false;
}

//! POSIX locks belong to the process, so the kernel cannot tell two handles of one process
//! apart: ownership is decided under the registry mutex. Returns 0 when this handle holds
//! the lock, else -1 with errno (EWOULDBLOCK on contention, EINTR when interrupted).
//!
//! The kernel fails a blocking wait with EDEADLK when the holder's process itself waits for
//! a POSIX lock this process holds, as when two processes each hold one lock file and wait
//! for the other's through a second handle (two Coordinators). Nothing is wrong: each wait
//! is on another thread or for another purpose. Such a wait polls instead, every
//! millisecond at most, and blocks in the kernel again once the cycle is gone.
inline int lock_posix(lock_state& s, wait_mode mode) noexcept {
  using std::chrono::microseconds;
  constexpr microseconds sibling_pause_max(2000);
  constexpr microseconds deadlock_pause_max(1000);
  auto pause = microseconds(50);
  for (;;) {
    bool sibling_holds = false;
    {
      registry_guard reg;
      sibling_holds = held_by_sibling_handle(*reg.operator->(), s);
      if (!sibling_holds && mode == wait_mode::try_once) {
        const int rc = retry_on_eintr([&] { return acquire_once(s.fd, Mechanism::posix, false); });
        if (rc == 0) s.owned = true;
        return rc;
      }
    }
    if (sibling_holds) {
      if (mode == wait_mode::try_once) {
        errno = EWOULDBLOCK;
        return -1;
      }
      // Another handle of this process holds it; the kernel would grant it to us at once.
      if (!pause_posix_wait(pause, mode)) return -1;
      pause = std::min(pause * 2, sibling_pause_max);
      continue;
    }
    if (acquire_once(s.fd, Mechanism::posix, true) != 0) {
      if (errno == EINTR && mode == wait_mode::block) continue;
      if (errno != EDEADLK) return -1;
      if (!pause_posix_wait(std::min(pause, deadlock_pause_max), mode)) return -1;
      pause = std::min(pause * 2, deadlock_pause_max);
      continue;
    }
    registry_guard reg;
    if (!held_by_sibling_handle(*reg.operator->(), s)) {
      // Between the grant and this mutex a sibling may have taken the lock and let it go,
      // dropping the process's lock with it: ask the kernel again, without waiting.
      const int rc = retry_on_eintr([&] { return acquire_once(s.fd, Mechanism::posix, false); });
      if (rc == 0) {
        s.owned = true;
        return 0;
      }
      if (!is_contention(errno)) return -1;
    }
    // A sibling handle took it while we slept in the kernel (the process holds it for that
    // sibling, not for us), or another process did since: wait again.
  }
}

//! One acquisition: open if needed, lock, verify the path, write the record.
//! Returns true when held; false with `f` empty on contention (or EINTR when interruptible).
//! A try gives up after max_replacements files in a row were removed under it; a blocking
//! wait goes on, since each replacement means another holder came and went.
inline bool acquire(lock_state& s, wait_mode mode, failure& f) noexcept {
  constexpr int max_replacements = 64;
  adopt_if_copied(s);
  if (s.kept_out_by_operator) {
    if (mode != wait_mode::try_once)
      f.set(errc::kept_out_by_operator, "lock",
            "this worker is kept out of the election by WORKERLOCK_ROLE=secondary");
    return false;
  }
  for (int attempt = 0; attempt < max_replacements;) {
    if (s.owned) return true;
    if (s.fd < 0) {
      registry_guard reg;
      if (!open_registered(*reg.operator->(), s, f)) return false;
    }

    int rc = 0;
    if (s.options.mechanism == Mechanism::posix) {
      rc = lock_posix(s, mode);
      if (rc != 0 && errno == EINTR) return false;  // only when interruptible
    } else if (mode == wait_mode::try_once) {
      rc = retry_on_eintr([&] { return acquire_once(s.fd, s.options.mechanism, false); });
    } else {
      rc = acquire_once(s.fd, s.options.mechanism, true);
      if (rc != 0 && errno == EINTR) {
        if (mode == wait_mode::block_interruptibly) return false;
        continue;
      }
    }
    if (rc != 0) {
      if (mode == wait_mode::try_once && is_contention(errno)) return false;
      const int e = errno;
      f.set(e, "lock", explain_lock_errno(e));
      return false;
    }

    // For POSIX handles lock_posix() has set it, under the registry mutex.
    if (s.options.mechanism != Mechanism::posix) s.owned = true;
    off_t size = 0;
    if (inspect_locked_file(s, size, f) == inspection::ours) {
      if (!s.options.write_holder_record) return true;
      switch (inspect_contents(s, size, f)) {
        case contents::record:
          if (write_holder_record(s, size, f)) return true;
          break;
        case contents::foreign:
          warn_foreign_contents(s, size);
          return true;
        case contents::failed:
          break;
      }
    }
    // Replaced under our feet, or an error: let go of this inode and, if replaced, retry.
    failure ignored;
    release(s, ignored);
    close_file(s);
    if (f) return false;
    if (mode == wait_mode::try_once) ++attempt;
  }
  f.set(EAGAIN, "lock", "the lock file kept being removed or replaced while locking");
  return false;
}

//! Removes the file while still holding the lock, and only if the path still names it;
//! waiters on the old inode then notice (inspect_locked_file) and retry on a fresh file.
inline bool release_and_remove(lock_state& s, failure& f) noexcept {
  adopt_if_copied(s);
  if (!s.owned) {
    f.set(errc::not_held, "remove lock file", "this handle does not hold the lock");
    return false;
  }
  struct stat st {};
  if (::lstat(s.path.c_str(), &st) == 0 && st.st_dev == s.dev && st.st_ino == s.ino) {
    // A file that is not recognisably ours (a configuration file, say) is never removed.
    const auto found = inspect_contents(s, st.st_size, f);
    if (found == contents::foreign) {
      f.set(errc::foreign_owner, "remove lock file",
            "the file is not a workerlock lock file (it holds no holder record), so it was left "
            "in place; the lock was released");
    } else if (found == contents::record && ::unlink(s.path.c_str()) != 0 && errno != ENOENT) {
      f.set(errno, "remove lock file");
    }
  }
  failure release_failure;
  release(s, release_failure);
  close_file(s);
  if (!f && release_failure) f = release_failure;
  return !f;
}

}  // namespace workerlock::detail
