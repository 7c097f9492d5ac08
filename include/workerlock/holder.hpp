// workerlock/holder.hpp: lock_holder(), who holds a lock file right now, asked without
// disturbing any lock, including a POSIX lock held by the calling process itself.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <system_error>

#include "detail/posix.hpp"
#include "detail/proc_locks.hpp"
#include "detail/proc_stat.hpp"
#include "detail/record.hpp"
#include "detail/registry.hpp"
#include "error.hpp"

namespace workerlock {

//! Who holds a lock, as far as can be told.
struct Holder {
  //! The holder's pid. From its holder record when there is one that matches the kernel's
  //! view; this pid is in the holder's own pid namespace (see pid_namespace and host).
  //! From the kernel otherwise: 0 if the holder is in another pid namespace, -1 for an OFD
  //! lock of a program that wrote no record.
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

//! Reads the record through a descriptor this process already has open on the file, or
//! through a fresh read-only descriptor when that cannot release a lock of ours.
inline std::optional<record_fields> read_record(const std::filesystem::path& path, dev_t dev,
                                                ino_t ino, bool posix_held_by_this_process) {
  char buffer[max_record_size];
  ssize_t got = -1;
  // The registry mutex is held throughout: no other thread of this process can open the
  // file, and so take a POSIX lock on it, until the private descriptor below is closed.
  registry_guard reg;
  const auto* open_here =
      reg->find_if([&](const lock_state& t) { return t.fd >= 0 && t.dev == dev && t.ino == ino; });
  if (open_here != nullptr) {
    got = retry_on_eintr([&] { return ::pread(open_here->fd, buffer, sizeof buffer, 0); });
  } else {
    if (posix_held_by_this_process) return std::nullopt;  // held outside workerlock: never open
    const int fd = retry_on_eintr([&] {
      return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
    });
    if (fd < 0) return std::nullopt;
    got = retry_on_eintr([&] { return ::pread(fd, buffer, sizeof buffer, 0); });
    ::close(fd);
  }
  if (got <= 0) return std::nullopt;
  return parse_record(std::string_view(buffer, static_cast<std::size_t>(got)));
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
  kernel_lock_owner kernel;
  if (!read_kernel_lock_owner(st.st_dev, st.st_ino, current_pid(), kernel)) {
    f.set(errno != 0 ? errno : EIO, operation, "/proc/locks cannot be read");
    return std::nullopt;
  }
  if (kernel.kind == kernel_lock_kind::none) return std::nullopt;

  Holder holder;
  holder.pid = kernel.pid;
  holder.mechanism = std::string(kernel_kind_name(kernel.kind));
  const auto record = read_record(path, st.st_dev, st.st_ino, kernel.posix_by_self);
  if (!record) return holder;
  // The kernel knows the pid for POSIX and flock locks in our namespace; a record naming
  // someone else is a leftover of an earlier holder, for example one that used flock(1).
  const bool same_namespace = record->pid_namespace == current_identity().pid_namespace;
  if (same_namespace && kernel.pid > 0 && kernel.pid != record->pid) return holder;
  // An OFD lock shows no pid (-1): a record naming a process that no longer exists, or one
  // that started after the record was written (its pid was reused), is a leftover of a dead
  // holder, and the lock belongs to a program that wrote no record.
  if (same_namespace && kernel.pid < 0 &&
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

//! Returns: who holds the lock on `path`, or nullopt if nobody does (or the file does not
//! exist). Reads /proc/locks and the holder record; never locks, truncates or writes, and
//! never closes a descriptor that would drop a POSIX lock of the calling process.
//! The answer can be stale the moment it returns.
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
