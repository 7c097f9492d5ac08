// workerlock/holder.hpp: lock_holder(), who holds a lock file right now, asked without
// disturbing any lock, including a POSIX lock held by the calling process itself.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "detail/posix.hpp"
#include "detail/proc_locks.hpp"
#include "detail/proc_stat.hpp"
#include "detail/record.hpp"
#include "detail/registry.hpp"
#include "error.hpp"

namespace workerlock {

//! Who holds a lock, as far as can be told.
struct Holder {
  //! The holder's pid.
  //! - From its holder record (recorded is true) when the record agrees with the kernel:
  //!   then the pid in the holder's own pid namespace, named by pid_namespace and host.
  //!   Where the kernel shows the holder's pid (POSIX and flock locks of a visible process),
  //!   the record counts only if it names that process (in its own namespace).
  //! - Otherwise as the kernel shows it: for POSIX and flock locks the pid as numbered by
  //!   the procfs mounted at /proc (normally the caller's pid namespace); 0 for a POSIX lock
  //!   whose owner is not visible in the caller's pid namespace (a parent or sibling
  //!   namespace: the host, seen from a container); -1 for an OFD lock (the kernel keeps no
  //!   pid for those).
  pid_t pid = 0;
  //! When the holder acquired the lock, if it wrote a holder record.
  std::optional<std::chrono::system_clock::time_point> acquired;
  //! Host name and pid-namespace inode of the holder, if it wrote a holder record.
  std::string host;
  std::uint64_t pid_namespace = 0;
  //! The mechanism named in the record ("ofd", "posix", "flock"), or what the kernel shows.
  std::string mechanism;
  //! True when pid and acquired come from a holder record written by workerlock.
  bool recorded = false;
};

namespace detail {

inline std::string_view kernel_kind_name(kernel_lock_kind kind) noexcept {
  switch (kind) {
    case kernel_lock_kind::posix:
      return "posix";
    case kernel_lock_kind::ofd:
      return "ofd";
    case kernel_lock_kind::flock:
      return "flock";
    case kernel_lock_kind::none:
      break;
  }
  return "";
}

//! What a look at the file through a descriptor showed.
struct file_look {
  bool looked = false;  // a descriptor on the file was available
  //! The first POSIX or OFD lock that a write lock through this descriptor would conflict
  //! with (F_OFD_GETLK): F_UNLCK if none. l_pid is -1 for an OFD lock, 0 for a POSIX lock
  //! whose owner is not visible in the caller's pid namespace. flock locks are not shown.
  struct flock conflict {};
  //! The descriptor used is this process's own lock handle, and it holds the lock (a lock
  //! that F_OFD_GETLK through that very descriptor does not show).
  bool held_through_it = false;
  std::optional<record_fields> record;
};

//! Looks at the file through a descriptor this process already has open on it, or through a
//! fresh read-only descriptor when `may_open` (closing that one must not drop a POSIX lock
//! of this process). Asks F_OFD_GETLK, and reads the holder record if the file is locked
//! (`locked_as_far_as_known`, or F_OFD_GETLK says so). Never takes a lock.
inline file_look look_at_file(const std::filesystem::path& path, dev_t dev, ino_t ino,
                              bool may_open, bool locked_as_far_as_known) {
  file_look look;
  look.conflict.l_type = F_UNLCK;
  char buffer[max_record_size];
  ssize_t got = -1;
  const auto examine = [&](int fd) {
    look.looked = true;
#ifdef F_OFD_GETLK
    auto probe = whole_file(F_WRLCK);
    if (::fcntl(fd, F_OFD_GETLK, &probe) == 0) look.conflict = probe;
#endif
    if (locked_as_far_as_known || look.conflict.l_type != F_UNLCK || look.held_through_it)
      got = retry_on_eintr([&] { return ::pread(fd, buffer, sizeof buffer, 0); });
  };
  {
    // The registry mutex is held throughout: no other thread of this process can open the
    // file, and so take a POSIX lock on it, until the private descriptor below is closed.
    registry_guard reg;
    const auto* open_here = reg->find_if(
        [&](const lock_state& t) { return t.fd >= 0 && t.dev == dev && t.ino == ino; });
    if (open_here != nullptr) {
      look.held_through_it = open_here->owned;
      examine(open_here->fd);
    } else if (may_open) {
      const int fd = keep_off_standard_streams(retry_on_eintr([&] {
        return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
      }));
      if (fd >= 0) {
        struct stat opened {};
        if (::fstat(fd, &opened) == 0 && opened.st_dev == dev && opened.st_ino == ino)
          examine(fd);  // else the path now names another file: not the one asked about
        ::close(fd);
      }
    }
  }
  if (got > 0) look.record = parse_record(std::string_view(buffer, static_cast<std::size_t>(got)));
  return look;
}

//! The device /proc/locks prints for the file at `path` (its superblock's), found through
//! the file's mount id in /proc/self/mountinfo; nullopt if unknown or if `path` no longer
//! names the file (dev, ino). On btrfs this differs from st_dev; elsewhere it equals it.
inline std::optional<dev_t> superblock_device_of(const std::filesystem::path& path, dev_t dev,
                                                 ino_t ino) {
#ifdef STATX_MNT_ID
  struct statx sx {};
  if (::statx(AT_FDCWD, path.c_str(), AT_SYMLINK_NOFOLLOW, STATX_INO | STATX_MNT_ID, &sx) != 0 ||
      (sx.stx_mask & STATX_MNT_ID) == 0 || sx.stx_ino != ino ||
      makedev(sx.stx_dev_major, sx.stx_dev_minor) != dev)
    return std::nullopt;
  return superblock_device(sx.stx_mnt_id);
#else
  (void)path;
  (void)dev;
  (void)ino;
  return std::nullopt;
#endif
}

//! The kernel's holders of the lock on the file (dev, ino) at `path`, from /proc/locks.
//! /proc/locks prints the superblock's device: when no line has the file's st_dev, lines
//! with its superblock's device are taken (btrfs subvolumes). Inode numbers repeat across
//! subvolumes, so such a line is dropped when its process is visible and has no descriptor
//! on this very file; `ambiguous` is set when lines were matched that way.
inline bool kernel_holders(const std::filesystem::path& path, dev_t dev, ino_t ino,
                           std::vector<kernel_lock_line>& holders, bool& ambiguous) {
  std::vector<kernel_lock_line> lines;
  ambiguous = false;
  if (!read_kernel_lock_lines(ino, lines)) return false;
  for (const auto& line : lines)
    if (line.device == dev) holders.push_back(line);
  if (!holders.empty() || lines.empty()) return true;
  const auto superblock = superblock_device_of(path, dev, ino);
  if (!superblock || *superblock == dev) return true;
  for (const auto& line : lines) {
    if (line.device != *superblock) continue;
    if (line.pid > 0 && process_has_file_open(line.pid, dev, ino) == open_file_answer::no)
      continue;  // a lock on another subvolume's inode of that number
    holders.push_back(line);
    ambiguous = true;
  }
  return true;
}

inline bool process_exists(pid_t pid) noexcept {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

//! True when process `pid` certainly started after `when`: it cannot have written a record
//! dated then. Two seconds of slack absorb clock adjustments; unknown counts as false.
inline bool started_after(pid_t pid, std::chrono::system_clock::time_point when) {
  const auto started = process_start_time(pid);
  return started && *started > when + std::chrono::seconds(2);
}

inline std::optional<Holder> find_holder(const std::filesystem::path& path, failure& f) {
  constexpr const char* operation = "inspect lock file";
  if (path.empty()) {
    f.set(EINVAL, operation, "the path is empty");
    return std::nullopt;
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::nullopt;  // no file, so nobody holds it
    f.set(errno, operation);
    return std::nullopt;
  }
  if (S_ISLNK(st.st_mode)) {
    f.set(ELOOP, operation, "the path is a symbolic link, and workerlock never follows one");
    return std::nullopt;
  }
  if (!S_ISREG(st.st_mode)) {
    f.set(EINVAL, operation, "the path is not a regular file");
    return std::nullopt;
  }
  std::vector<kernel_lock_line> holders;
  bool ambiguous = false;
  if (!kernel_holders(path, st.st_dev, st.st_ino, holders, ambiguous)) {
    f.set(errno != 0 ? errno : EIO, operation, "/proc/locks cannot be read");
    return std::nullopt;
  }
  // Opening and closing the file would drop a POSIX lock of this process on it. /proc/locks
  // shows such a lock with our pid as its procfs numbers us; if we are not visible there,
  // we cannot tell, and never open it.
  const pid_t self = pid_in_proc();
  bool posix_by_self = self <= 0;
  for (const auto& line : holders)
    if (line.kind == kernel_lock_kind::posix && line.pid == self) posix_by_self = true;

  const auto look = look_at_file(path, st.st_dev, st.st_ino, !posix_by_self, !holders.empty());
  if (ambiguous && look.looked && look.conflict.l_type == F_UNLCK && !look.held_through_it) {
    // OFD lines matched by superblock alone: no POSIX or OFD lock is on this very file.
    holders.erase(std::remove_if(holders.begin(), holders.end(),
                                 [](const kernel_lock_line& line) {
                                   return line.kind == kernel_lock_kind::ofd;
                                 }),
                  holders.end());
  }
  Holder holder;
  if (!holders.empty()) {
    holder.pid = holders.front().pid;
    holder.mechanism = std::string(kernel_kind_name(holders.front().kind));
  } else if (look.conflict.l_type != F_UNLCK) {
    // /proc/locks hides a POSIX lock whose owner is not visible in the pid namespace of
    // the procfs at /proc; F_OFD_GETLK still shows it, with pid 0.
    holder.pid = look.conflict.l_pid;
    holder.mechanism = look.conflict.l_pid < 0 ? "ofd" : "posix";
  } else {
    return std::nullopt;
  }
  const auto& record = look.record;
  if (!record) return holder;
  // The kernel knows the pid for POSIX and flock locks in our namespace; a record naming
  // someone else is a leftover of an earlier holder, for example one that used flock(1).
  const bool same_namespace = record->pid_namespace == current_identity().pid_namespace;
  if (same_namespace && holder.pid > 0 && holder.pid != record->pid) return holder;
  // A holder in another pid namespace that we can see: its pid there must be the record's.
  if (!same_namespace && holder.pid > 0) {
    const auto own = pid_in_own_namespace(holder.pid);
    if (own && *own != record->pid) return holder;
  }
  // An OFD lock shows no pid (-1): a record naming a process that no longer exists, or one
  // that started after the record was written (its pid was reused), is a leftover of a dead
  // holder, and the lock belongs to a program that wrote no record.
  if (same_namespace && holder.pid < 0 &&
      (!process_exists(record->pid) || started_after(record->pid, record->acquired)))
    return holder;
  holder.pid = record->pid;
  holder.acquired = record->acquired;
  holder.host = record->host;
  holder.pid_namespace = record->pid_namespace;
  if (!record->mechanism.empty()) holder.mechanism = record->mechanism;
  holder.recorded = true;
  return holder;
}

}  // namespace detail

//! Returns: who holds the lock on `path`, or nullopt if nobody does as far as the kernel
//! shows (or the file does not exist). Reads /proc/locks, asks F_OFD_GETLK through a
//! read-only descriptor and reads the holder record; never locks, truncates or writes, and
//! never closes a descriptor that would drop a POSIX lock of the calling process.
//! The answer can be stale the moment it returns.
//! Across pid namespaces (containers sharing the lock file): a holder in a child namespace
//! is seen with its pid as the caller numbers it (or its record's, see Holder::pid). An OFD
//! lock is always seen. A POSIX lock whose owner is not visible in the caller's pid
//! namespace (the host, seen from a container) is hidden from /proc/locks but seen by
//! F_OFD_GETLK: the Holder comes from its record, else has pid 0. A flock lock whose owner
//! is not visible in the pid namespace of the procfs at /proc cannot be seen at all
//! (/proc/locks hides it, F_OFD_GETLK ignores flock): lock_holder() then returns nullopt.
//! On btrfs, whose stat() device differs from the one /proc/locks prints, the file is
//! matched through its mount's superblock device (/proc/self/mountinfo).
//! Throws: lock_error if the path cannot be inspected.
inline std::optional<Holder> lock_holder(const std::filesystem::path& path) {
  detail::failure f;
  auto holder = detail::find_holder(path, f);
  f.throw_if_failed(path);
  return holder;
}

inline std::optional<Holder> lock_holder(const std::filesystem::path& path, std::error_code& ec) {
  detail::failure f;
  auto holder = detail::find_holder(path, f);
  ec = f.code;
  return holder;
}

}  // namespace workerlock
