// workerlock/detail/process_identity.hpp: who a process is: pid, /proc/PID/stat (state,
// start time), pid namespace, boot id, host name and pidfd, each read and parsed here only.
#pragma once

#include <fcntl.h>
extern "C" {  // glibc 2.36's <sys/pidfd.h> lacks __BEGIN_DECLS: pidfd_open() would not link
#include <sys/pidfd.h>
}
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "posix.hpp"

namespace workerlock::detail {

//! Opens a /proc file read-only, never at 0, 1 or 2: a transient descriptor there could be
//! replaced under us by another thread's dup2() or freopen() of a standard stream, and our
//! close() would then close that stream. Returns -1 with errno on failure.
inline int open_proc_file(const char* path, int extra_flags = 0) noexcept {
  const int fd =
      retry_on_eintr([&] { return ::open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | extra_flags); });
  return keep_off_standard_streams(fd);
}

//! The first 4 KiB of a small /proc file; empty if it cannot be read.
inline std::string read_proc_file(const char* path) {
  std::string text;
  const int fd = open_proc_file(path);
  if (fd < 0) return text;
  char buffer[4096];
  std::size_t size = 0;
  while (size < sizeof buffer) {
    const ssize_t got =
        retry_on_eintr([&] { return ::read(fd, buffer + size, sizeof buffer - size); });
    if (got <= 0) break;
    size += static_cast<std::size_t>(got);
  }
  ::close(fd);
  text.assign(buffer, size);
  return text;
}

//! The fields of a /proc/PID/stat line that the library uses.
struct proc_stat_fields {
  char state = 0;          // field 3: R, S, D, Z (zombie), X (dead), ...
  std::string start_time;  // field 22: clock ticks since boot, as the kernel wrote it
};

//! Parses a /proc/PID/stat line. Fields are counted after the command name (field 2), which
//! may hold spaces and ')' and ends at the last ')'.
inline std::optional<proc_stat_fields> parse_proc_stat(std::string_view stat_line) {
  const auto close = stat_line.rfind(')');
  if (close == std::string_view::npos) return std::nullopt;
  proc_stat_fields fields;
  std::size_t begin = close + 1;  // the space before field 3
  for (int field = 3; field <= 22; ++field) {
    if (begin >= stat_line.size() || stat_line[begin] != ' ') return std::nullopt;
    ++begin;
    const auto end = std::min(stat_line.find(' ', begin), stat_line.size());
    if (end == begin) return std::nullopt;
    if (field == 3) fields.state = stat_line[begin];
    if (field == 22) {
      fields.start_time = std::string(stat_line.substr(begin, end - begin));
      return fields;
    }
    begin = end;
  }
  return std::nullopt;
}

//! Field 22 of a /proc/PID/stat line (starttime, in clock ticks since boot).
inline std::optional<std::string> proc_stat_start_time(std::string_view stat_line) {
  auto fields = parse_proc_stat(stat_line);
  if (!fields) return std::nullopt;
  return std::move(fields->start_time);
}

//! /proc/PID/stat of process `pid`, parsed; nullopt if it cannot be read.
inline std::optional<proc_stat_fields> read_proc_stat(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  return parse_proc_stat(read_proc_file(path));
}

//! True only when `pid` provably runs no code any more: no such process, or a zombie.
//! A process we cannot see (another user's: EPERM) or whose stat we cannot read is alive.
inline bool process_is_gone(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  const auto fields = read_proc_stat(pid);
  return fields && (fields->state == 'Z' || fields->state == 'X' || fields->state == 'x');
}

//! Process `pid` (as the procfs at /proc numbers it) in its own, innermost pid namespace:
//! the last number of the NSpid line of /proc/PID/status; nullopt if unknown.
inline std::optional<pid_t> pid_in_own_namespace(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/status", static_cast<int>(pid));
  const std::string status = read_proc_file(path);
  const auto at = status.find("\nNSpid:");
  if (at == std::string::npos) return std::nullopt;
  const auto end = std::min(status.find('\n', at + 1), status.size());
  const auto last = status.find_last_of(" \t", end - 1);
  if (last == std::string::npos || last < at || last + 1 >= end) return std::nullopt;
  const std::string number = status.substr(last + 1, end - last - 1);
  char* stop = nullptr;
  const long value = std::strtol(number.c_str(), &stop, 10);
  if (*stop != '\0' || value <= 0) return std::nullopt;
  return static_cast<pid_t>(value);
}

//! When process `pid` started, on the wall clock (to the clock tick); nullopt if unknown.
//! The kernel counts starttime on CLOCK_BOOTTIME; the wall clock's offset from it is taken
//! now, so a clock step since the process started shifts the answer by that step.
inline std::optional<std::chrono::system_clock::time_point> process_start_time(pid_t pid) {
  const auto fields = read_proc_stat(pid);
  const long hz = ::sysconf(_SC_CLK_TCK);
  struct timespec boot {};
  if (!fields || hz <= 0 || ::clock_gettime(CLOCK_BOOTTIME, &boot) != 0) return std::nullopt;
  const auto now = std::chrono::system_clock::now();
  const auto since_boot =
      std::chrono::seconds(boot.tv_sec) + std::chrono::nanoseconds(boot.tv_nsec);
  const auto started_since_boot = std::chrono::microseconds(
      static_cast<long long>(std::strtoull(fields->start_time.c_str(), nullptr, 10) * 1000000ULL /
                             static_cast<unsigned long long>(hz)));
  return now - std::chrono::duration_cast<std::chrono::system_clock::duration>(since_boot -
                                                                               started_since_boot);
}

//! This kernel's boot id (/proc/sys/kernel/random/boot_id), read once; empty if unreadable
//! or if it holds a ':' (tokens use ':' as their separator).
inline const std::string& boot_id() {
  static const std::string id = [] {
    std::string text = read_proc_file("/proc/sys/kernel/random/boot_id");
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text.find(':') == std::string::npos ? text : std::string();
  }();
  return id;
}

//! Host name and pid-namespace inode of this process.
struct process_identity {
  char host[65] = {};
  std::uint64_t pid_namespace = 0;
};

//! This process's host name and pid namespace, looked up once per process: the cache is
//! keyed by getpid(), so a copy of the process (fork or raw clone) looks them up again.
//! Lock-free, so that a fork() in the middle of a lookup leaves nothing locked in the child:
//! one thread fills the cache (claiming it with -pid), and a thread that finds it being
//! filled looks them up itself.
inline process_identity current_identity() noexcept {
  static std::atomic<pid_t> cached_for{0};
  static process_identity cached;  // written once per process, before cached_for says so
  const pid_t me = ::getpid();
  if (cached_for.load(std::memory_order_acquire) == me) return cached;
  process_identity fresh;
  struct utsname names {};
  if (::uname(&names) == 0) std::snprintf(fresh.host, sizeof fresh.host, "%s", names.nodename);
  struct stat ns {};
  if (::stat("/proc/self/ns/pid", &ns) == 0) fresh.pid_namespace = ns.st_ino;
  pid_t seen = cached_for.load(std::memory_order_acquire);
  if (seen != me && seen != -me &&
      cached_for.compare_exchange_strong(seen, -me, std::memory_order_acq_rel)) {
    cached = fresh;
    cached_for.store(me, std::memory_order_release);
  }
  return fresh;
}

//! A close-on-exec pidfd for process `pid`, at 3 or above (glibc's pidfd_open()); -1 with
//! errno on failure (ESRCH: no such process; ENOSYS: a kernel before 5.3).
inline int open_pidfd(pid_t pid) noexcept {
  // pidfd_open() always sets close-on-exec on the descriptor it returns.
  return keep_off_standard_streams(::pidfd_open(pid, 0));
}

}  // namespace workerlock::detail
