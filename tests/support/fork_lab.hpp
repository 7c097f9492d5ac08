// tests/support/fork_lab.hpp: a subreaper that reaps orphaned grandchildren, /proc inspection and
// signal helpers.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "common.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::fork_lab {

using namespace std::chrono_literals;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WorkerLock;

static_assert(std::atomic<int>::is_always_lock_free,
              "shared-memory bookkeeping needs lock-free atomics");
static_assert(std::atomic<bool>::is_always_lock_free,
              "shared-memory bookkeeping needs lock-free atomics");
static_assert(std::atomic<pid_t>::is_always_lock_free,
              "shared-memory bookkeeping needs lock-free atomics");

inline std::string describe(Mechanism mechanism) {
  return "mechanism=" + std::string(workerlock::to_string(mechanism));
}

// ---------------------------------------------------------------------------------------
// Another process's view of the lock.
// ---------------------------------------------------------------------------------------

enum class Probe { acquired, busy, error };

inline std::ostream& operator<<(std::ostream& out, Probe probe) {
  switch (probe) {
    case Probe::acquired:
      return out << "acquired";
    case Probe::busy:
      return out << "busy";
    case Probe::error:
      return out << "error";
  }
  return out << "?";
}

//! Forks a fresh process that tries once to take the lock on `path` with a new handle and
//! exits (releasing it). Tells whether that other process got the lock.
inline Probe probe_from_other_process(const std::filesystem::path& path, Mechanism mechanism) {
  switch (wltest::other_process_try_lock(path, mechanism)) {
    case kAcquired:
      return Probe::acquired;
    case kBusy:
      return Probe::busy;
    default:
      return Probe::error;
  }
}

// ---------------------------------------------------------------------------------------
// Processes: liveness, /proc inspection (reaping: wltest::Children(adopt_orphans)).
// ---------------------------------------------------------------------------------------

//! True while `pid` exists and has not exited (a zombie has exited).
inline bool is_running(pid_t pid) {
  std::ifstream stat_file("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat_file, text)) return false;
  const auto paren = text.rfind(')');
  if (paren == std::string::npos || paren + 2 >= text.size()) return false;
  const char state = text[paren + 2];
  return state != 'Z' && state != 'X' && state != 'x';
}

//! The command line of `pid`, arguments separated by spaces.
inline std::string command_line(pid_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::replace(text.begin(), text.end(), '\0', ' ');
  return text;
}

inline FileId id_of(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino};
}

//! How many descriptors of process `pid` refer to the file `target`, or to `path` by name
//! (a link text naming the path, also "(deleted)" ones); -1 if /proc/<pid>/fd is unreadable.
inline int descriptors_on(pid_t pid, FileId target, const std::filesystem::path& path) {
  const std::string directory = "/proc/" + std::to_string(pid) + "/fd";
  DIR* listing = ::opendir(directory.c_str());
  if (listing == nullptr) return -1;
  int count = 0;
  while (const dirent* entry = ::readdir(listing)) {
    if (entry->d_name[0] == '.') continue;
    const std::string link = directory + "/" + entry->d_name;
    struct stat st {};
    const bool same_file =
        ::stat(link.c_str(), &st) == 0 && st.st_dev == target.dev && st.st_ino == target.ino;
    char text[4096];
    const ssize_t length = ::readlink(link.c_str(), text, sizeof text - 1);
    const bool names_path =
        length > 0 &&
        std::string_view(text, static_cast<std::size_t>(length)).find(path.native()) == 0;
    if (same_file || names_path) ++count;
  }
  ::closedir(listing);
  return count;
}

//! One line of /proc/locks: a lock held ("POSIX", "OFDLCK", "FLOCK") or a blocked waiter.
struct KernelLock {
  std::string kind;
  long pid = 0;
  bool waiter = false;
  unsigned major_number = 0;
  unsigned minor_number = 0;
  unsigned long inode = 0;

  bool on(FileId file) const {
    return inode == file.ino && major_number == major(file.dev) && minor_number == minor(file.dev);
  }
};

//! The kernel's table of locks (and waiters), parsed token by token so that the layout of
//! the waiter lines ("1: -> FLOCK ...") does not matter.
inline std::vector<KernelLock> kernel_locks() {
  std::vector<KernelLock> table;
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    KernelLock entry;
    entry.waiter = line.find("->") != std::string::npos;
    std::istringstream fields(line);
    std::string token;
    std::vector<std::string> tokens;
    while (fields >> token) tokens.push_back(token);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      int used = 0;
      if (std::sscanf(tokens[i].c_str(), "%x:%x:%lu%n", &entry.major_number, &entry.minor_number,
                      &entry.inode, &used) == 3 &&
          static_cast<std::size_t>(used) == tokens[i].size() && i >= 4) {
        entry.pid = std::strtol(tokens[i - 1].c_str(), nullptr, 10);
        entry.kind = tokens[i - 4];
        table.push_back(entry);
        break;
      }
    }
  }
  return table;
}

//! How many blocked waiters /proc/locks lists on the file `target`.
inline int blocked_waiters(FileId target) {
  int count = 0;
  for (const auto& entry : kernel_locks()) count += entry.waiter && entry.on(target) ? 1 : 0;
  return count;
}

//! True when the kernel lists a POSIX lock held (not waited for) by process `pid` on `target`.
inline bool kernel_posix_lock_held_by(pid_t pid, FileId target) {
  for (const auto& entry : kernel_locks()) {
    if (!entry.waiter && entry.kind == "POSIX" && entry.pid == pid && entry.on(target)) return true;
  }
  return false;
}

//! Waits until `count` processes are blocked in the kernel waiting for `target`, or until
//! `watched` (when given) has exited. A POSIX lock() may poll instead of sleeping in
//! F_SETLKW (two handles of one process cannot be told apart by the kernel), and then there
//! is no waiter line to see: for POSIX, give the waiter time and do not insist.
inline bool wait_for_blocked_waiters(FileId target, Mechanism mechanism, int count = 1,
                                     pid_t watched = 0) {
  const auto blocked_or_gone = [&] {
    return blocked_waiters(target) >= count || (watched != 0 && !is_running(watched));
  };
  if (mechanism == Mechanism::posix) {
    wltest::eventually(blocked_or_gone, 500ms);
    std::this_thread::sleep_for(5ms);
    return true;
  }
  return wltest::eventually(blocked_or_gone);
}

//! True once `pid` is stopped (SIGSTOP), per /proc/<pid>/stat.
inline bool is_stopped(pid_t pid) {
  std::ifstream stat_file("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat_file, text)) return false;
  const auto paren = text.rfind(')');
  return paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'T';
}

//! The fstat() identity of the open descriptor equals the stat() of the path it was
//! opened from: the handle holds the file that the path names now.
inline bool holds_the_named_file(const WorkerLock& lock) {
  struct stat by_fd {};
  struct stat by_path {};
  if (lock.native_handle() < 0 || ::fstat(lock.native_handle(), &by_fd) != 0) return false;
  if (::stat(lock.path().c_str(), &by_path) != 0) return false;
  return by_fd.st_dev == by_path.st_dev && by_fd.st_ino == by_path.st_ino && by_fd.st_nlink > 0;
}

//! True when `line` contains `number` as a whole number (not as part of a longer one).
inline bool mentions_number(std::string_view line, long number) {
  const std::string digits = std::to_string(number);
  for (auto at = line.find(digits); at != std::string_view::npos; at = line.find(digits, at + 1)) {
    const bool digit_before = at > 0 && std::isdigit(static_cast<unsigned char>(line[at - 1])) != 0;
    const auto end = at + digits.size();
    const bool digit_after =
        end < line.size() && std::isdigit(static_cast<unsigned char>(line[end])) != 0;
    if (!digit_before && !digit_after) return true;
  }
  return false;
}

//! The first problem any child reports, in shared memory, for the parent's messages.
struct Notes {
  std::atomic<int> count{0};
  char first[512] = {};

  void note(const char* what) {
    if (count.fetch_add(1) == 0)
      std::snprintf(first, sizeof first, "pid %d: %s", static_cast<int>(::getpid()), what);
  }
  void note(const char* what, const std::error_code& ec) {
    const std::string text = std::string(what) + ": " + ec.message();
    note(text.c_str());
  }
  std::string text() const { return count.load() == 0 ? std::string("none") : std::string(first); }
};

//! A critical-section checker shared by all processes: exactly one may be inside.
struct Exclusion {
  std::atomic<int> inside{0};
  std::atomic<int> overlaps{0};
  std::atomic<int> entries{0};

  void enter() {
    if (inside.fetch_add(1) != 0) overlaps.fetch_add(1);
    entries.fetch_add(1);
  }
  void leave() { inside.fetch_sub(1); }
};

//! Waits until killed: what a child does once its part is done.
[[noreturn]] inline void park() {
  for (;;) ::pause();
}

inline std::atomic<int>* g_signal_counter = nullptr;

inline void count_signal(int /*signal_number*/) {
  if (g_signal_counter != nullptr) g_signal_counter->fetch_add(1);
}

}  // namespace wltest::fork_lab
