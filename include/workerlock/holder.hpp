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
#include <string_view>
#include <system_error>
#include <vector>

#include "detail/posix.hpp"
#include "detail/proc_locks.hpp"
#include "detail/process_identity.hpp"
#include "detail/record.hpp"
#include "detail/registry.hpp"
#include "error.hpp"
#include "options.hpp"

namespace workerlock {

//! Who holds a lock, as far as can be told.
struct Holder {
  //! Why `pid` is empty.
  enum class PidUnknown {
    //! `pid` is set: nothing is unknown.
    pid_known,
    //! An OFD lock held by a process that wrote no holder record, or only a stale one (the
    //! kernel keeps no pid for OFD locks: F_OFD_GETLK and /proc/locks say -1).
    ofd_lock_without_record,
    //! The holder lives in another pid namespace, whose pids mean other processes here:
    //! outside the caller's (the host, seen from a container: the kernel says 0), or, for
    //! an OFD lock, one named only by its record. `pid_in_own_namespace`, `pid_namespace`
    //! and `host` say who it is, if it wrote a record.
    other_pid_namespace,
  };

  //! The holder's pid as the caller's pid namespace numbers it (precisely: as the procfs
  //! mounted at /proc does), the number kill(2), waitpid() and /proc/PID take; nullopt
  //! when the holder cannot be named that way, and then `pid_unknown` says why. Never 0 or
  //! negative. From the kernel (/proc/locks) for POSIX and flock locks of a visible process;
  //! from the holder record when it names a process of the caller's namespace that the
  //! kernel does not contradict.
  std::optional<pid_t> pid;
  //! Why `pid` is empty; pid_known when it is not.
  PidUnknown pid_unknown = PidUnknown::pid_known;
  //! The kind of lock: the one named in the holder record, or else what the kernel shows
  //! (on NFS, where flock is emulated with POSIX locks, the kernel shows posix).
  Mechanism mechanism = default_mechanism;
  //! True when the fields below come from a holder record written by workerlock.
  bool recorded = false;
  //! From the holder record: the holder's pid in its own pid namespace (`pid_namespace` on
  //! `host`), which equals `pid` when that namespace is the caller's. Meaningless to kill(2)
  //! in any other namespace.
  std::optional<pid_t> pid_in_own_namespace;
  //! From the holder record: when the holder acquired the lock.
  std::optional<std::chrono::system_clock::time_point> acquired;
  //! From the holder record: host name and pid-namespace inode of the holder.
  std::string host;
  std::uint64_t pid_namespace = 0;
};

//! A name for the reason, such as "ofd_lock_without_record".
constexpr std::string_view to_string(Holder::PidUnknown reason) noexcept {
  switch (reason) {
    case Holder::PidUnknown::pid_known:
      return "pid_known";
    case Holder::PidUnknown::ofd_lock_without_record:
      return "ofd_lock_without_record";
    case Holder::PidUnknown::other_pid_namespace:
      return "other_pid_namespace";
  }
  return "unknown";
}

namespace detail {

//! The mechanism a holder record names, if it names one.
inline std::optional<Mechanism> mechanism_named(std::string_view name) noexcept {
  for (const Mechanism m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock})
    if (name == to_string(m)) return m;
  return std::nullopt;
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
    auto probe = whole_file(F_WRLCK);
    if (::fcntl(fd, F_OFD_GETLK, &probe) == 0) look.conflict = probe;
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
    if (line.kind == Mechanism::posix && line.pid == self) posix_by_self = true;

  const auto look = look_at_file(path, st.st_dev, st.st_ino, !posix_by_self, !holders.empty());
  if (ambiguous && look.looked && look.conflict.l_type == F_UNLCK && !look.held_through_it) {
    // OFD lines matched by superblock alone: no POSIX or OFD lock is on this very file.
    holders.erase(
        std::remove_if(holders.begin(), holders.end(),
                       [](const kernel_lock_line& line) { return line.kind == Mechanism::ofd; }),
        holders.end());
  }
  Holder holder;
  pid_t kernel_pid = 0;  // as the kernel shows it: -1 for OFD, 0 outside our namespace
  if (!holders.empty()) {
    kernel_pid = holders.front().pid;
    holder.mechanism = holders.front().kind;
  } else if (look.conflict.l_type != F_UNLCK) {
    // /proc/locks hides a POSIX lock whose owner is not visible in the pid namespace of
    // the procfs at /proc; F_OFD_GETLK still shows it, with pid 0.
    kernel_pid = look.conflict.l_pid;
    holder.mechanism = look.conflict.l_pid < 0 ? Mechanism::ofd : Mechanism::posix;
  } else {
    return std::nullopt;
  }
  if (kernel_pid > 0) {
    holder.pid = kernel_pid;
  } else {
    holder.pid_unknown = kernel_pid < 0 ? Holder::PidUnknown::ofd_lock_without_record
                                        : Holder::PidUnknown::other_pid_namespace;
  }
  const auto& record = look.record;
  if (!record) return holder;
  // The kernel knows the pid for POSIX and flock locks in our namespace; a record naming
  // someone else is a leftover of an earlier holder, for example one that used flock(1).
  const bool same_namespace = record->pid_namespace == current_identity().pid_namespace;
  // The kernel says 0 for a holder not visible in our namespace: a record claiming ours is
  // not the holder's (a record's pid is never 0, so it cannot match that 0).
  if (same_namespace && (kernel_pid == 0 || (kernel_pid > 0 && kernel_pid != record->pid)))
    return holder;
  // A holder in another pid namespace that we can see: its pid there must be the record's.
  if (!same_namespace && kernel_pid > 0) {
    const auto own = pid_in_own_namespace(kernel_pid);
    if (own && *own != record->pid) return holder;
  }
  // An OFD lock shows no pid (-1): a record naming a process that no longer exists, or one
  // that started after the record was written (its pid was reused), is a leftover of a dead
  // holder, and the lock belongs to a program that wrote no record.
  if (same_namespace && kernel_pid < 0 &&
      (!process_exists(record->pid) || started_after(record->pid, record->acquired)))
    return holder;
  if (same_namespace) {
    holder.pid = record->pid;
    holder.pid_unknown = Holder::PidUnknown::pid_known;
  } else if (!holder.pid) {
    // The record's pid counts in the holder's namespace only, never in ours.
    holder.pid_unknown = Holder::PidUnknown::other_pid_namespace;
  }
  holder.pid_in_own_namespace = record->pid;
  holder.acquired = record->acquired;
  holder.host = record->host;
  holder.pid_namespace = record->pid_namespace;
  if (const auto named = mechanism_named(record->mechanism)) holder.mechanism = *named;
  holder.recorded = true;
  return holder;
}

}  // namespace detail

//! Returns: who holds the lock on `path`, or nullopt if nobody does as far as the kernel
//! shows (or the file does not exist). Reads /proc/locks, asks F_OFD_GETLK through a
//! read-only descriptor and reads the holder record; never locks, truncates or writes, and
//! never closes a descriptor that would drop a POSIX lock of the calling process.
//! The answer can be stale the moment it returns.
//! Holder::pid is only ever a pid of the caller's namespace, so `if (holder->pid)
//! kill(*holder->pid, SIGTERM)` signals the holder and nobody else (unless it exited and its
//! pid was reused meanwhile, as with any pid).
//! Across pid namespaces (containers sharing the lock file): a holder in a child namespace
//! is seen with its pid as the caller numbers it (its record's pid there is in
//! Holder::pid_in_own_namespace). An OFD lock is always seen. A POSIX lock whose owner is
//! not visible in the caller's pid namespace (the host, seen from a container) is hidden
//! from /proc/locks but seen by F_OFD_GETLK: pid is nullopt (other_pid_namespace), and the
//! record, if any, says who it is. A flock lock whose owner
//! is not visible in the pid namespace of the procfs at /proc cannot be seen at all
//! (/proc/locks hides it, F_OFD_GETLK ignores flock): lock_holder() then returns nullopt.
//! On btrfs, whose stat() device differs from the one /proc/locks prints, the file is
//! matched through its mount's superblock device (/proc/self/mountinfo).
//! Throws: lock_error if the path cannot be inspected.
[[nodiscard]] inline std::optional<Holder> lock_holder(const std::filesystem::path& path) {
  detail::failure f;
  auto holder = detail::find_holder(path, f);
  f.throw_if_failed(path);
  return holder;
}

[[nodiscard]] inline std::optional<Holder> lock_holder(const std::filesystem::path& path,
                                                       std::error_code& ec) {
  detail::failure f;
  auto holder = detail::find_holder(path, f);
  ec = f.code;
  return holder;
}

}  // namespace workerlock
