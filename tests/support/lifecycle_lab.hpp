// tests/support/lifecycle_lab.hpp: helpers for the Coordinator lifecycle tests: forked copies,
// blocked threads, hostile signal setups.
#pragma once

#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>

#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "common.hpp"
#include "fault_injection.hpp"

#include "raw_fork.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::lifecycle_lab {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using std::chrono::milliseconds;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::LogLevel;
using workerlock::Role;
using workerlock::WaitMode;

inline double ms_since(std::chrono::steady_clock::time_point began) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began)
      .count();
}

//! Log lines of one worker, kept in shared memory for the parent.
struct LogBook {
  std::atomic<int> errors{0};
  std::atomic<int> warnings{0};
  std::atomic<std::size_t> used{0};
  char text[4096] = {};

  void add(LogLevel level, std::string_view line) {
    if (level == LogLevel::error) errors.fetch_add(1);
    if (level == LogLevel::warning) warnings.fetch_add(1);
    const std::size_t size = line.size() + 1;
    const std::size_t at = used.fetch_add(size);
    if (at >= sizeof text) return;
    const std::size_t n = std::min(size - 1, sizeof text - at);
    std::memcpy(text + at, line.data(), n);
    if (at + n < sizeof text) text[at + n] = '\n';
  }
  std::string contents() const { return std::string(text, std::min(used.load(), sizeof text)); }
};

inline CoordinatorOptions options_for(WaitMode mode, LogBook& book) {
  CoordinatorOptions options;
  options.wait = mode;
  options.lock.log = [&book](LogLevel level, std::string_view line) { book.add(level, line); };
  return options;
}

//! Whether another process could take the lock on `path` right now (then lets it go).
inline bool lock_is_free(const fs::path& path) {
  workerlock::WorkerLock probe(path, workerlock::Options{}.silent());
  const bool free = probe.try_lock();
  if (free) probe.unlock();
  return free;
}

//! Waits until `flag` reaches `value`, at most `timeout`.
inline bool wait_for_value(const std::atomic<int>& flag, int value, milliseconds timeout = 10s) {
  return wltest::eventually([&] { return flag.load() == value; }, timeout);
}

//! The README's pattern: a Coordinator with static storage duration, destroyed by exit().
inline std::optional<Coordinator>& static_coordinator() {
  static std::optional<Coordinator> coordinator;
  return coordinator;
}

//! The tid of this process's only other thread (the coordinator thread), or 0.
inline pid_t other_thread() {
  const pid_t self = ::getpid();
  std::error_code ec;
  pid_t found = 0;
  for (fs::directory_iterator it("/proc/self/task", ec), end; !ec && it != end; it.increment(ec)) {
    const auto tid = static_cast<pid_t>(std::stol(it->path().filename().string()));
    if (tid != self) found = tid;
  }
  return found;
}

//! Whether thread `tid` of this process is inside system call `nr`.
inline bool thread_in_syscall(pid_t tid, long nr) {
  std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/syscall");
  long current = -1;
  return static_cast<bool>(in >> current) && current == nr;
}

// ----------------------------------------------------------------------------------------
// A copy inherited through fork()
// ----------------------------------------------------------------------------------------

struct ForkReport {
  std::atomic<int> worker_role{-1};
  std::atomic<int> fork_role{-1};
  std::atomic<int> fork_running{-1};
  std::atomic<long long> fork_fencing{-1};
  std::atomic<int> fork_exit{-1};
  std::atomic<int> raw_role{-1};
  std::atomic<int> raw_running{-1};
  std::atomic<int> raw_destroyed{0};
  std::atomic<int> raw_exit{-1};
  std::atomic<int> worker_role_after{-1};
  std::atomic<int> callbacks_elsewhere{0};
  std::atomic<int> phase{0};
  std::atomic<int> lock_free_while_held{-1};
  LogBook log;
};

struct CopyStartReport {
  std::atomic<int> running_copy_threw{0};
  std::atomic<int> running_copy_code{0};
  std::atomic<int> running_copy_role{-1};
  std::atomic<int> running_copy_exit{-100};
  std::atomic<int> stopped_copy_role{-1};
  std::atomic<int> stopped_copy_promoted_in_child{0};
  std::atomic<int> stopped_copy_exit{-100};
  std::atomic<int> worker_role_after{-1};
  LogBook log;
};

//! How the helper of a worker is made and leaves.
struct HelperCase {
  const char* name;
  WaitMode mode;
  bool fork_in_callback;  // from on_promoted (thread mode: the coordinator thread)
  bool standby;           // the worker waits for the lock instead of holding it
  bool exit_by_exit;      // exit(0) runs the static destructor; else reset() and _exit()
};

struct HelperReport {
  std::atomic<int> worker_promoted{0};
  std::atomic<int> worker_demoted{0};
  std::atomic<int> callbacks_in_helper{0};
  std::atomic<pid_t> helper{0};
  std::atomic<int> helper_role{-1};
  std::atomic<int> helper_running{-1};
  std::atomic<int> helper_reached_exit{0};
  std::atomic<int> helper_exit{-100};
  std::atomic<long long> helper_ms{-1};
  std::atomic<int> worker_role_after{-1};
  std::atomic<int> phase{0};
  std::atomic<int> lock_free_after_helper{-1};
  LogBook log;
};

//! The helper: checks what it sees, calls what a helper's code might, then leaves.
[[noreturn]] inline void helper_body(HelperReport& r, Coordinator& c, bool exit_by_exit) {
  r.helper_role.store(static_cast<int>(c.role()));
  r.helper_running.store(c.running() ? 1 : 0);
  c.poll();
  c.stop();
  r.helper_reached_exit.store(1);
  if (exit_by_exit) std::exit(0);
  // Forked from the coordinator thread: the worker's main stack does not exist here, and a
  // leak checker running at exit() would report what only it referenced.
  static_coordinator().reset();
  ::_exit(0);
}

// ----------------------------------------------------------------------------------------
// A start() that fails
// ----------------------------------------------------------------------------------------

struct StartFailureReport {
  std::atomic<int> filtered{0};
  std::atomic<int> caught{0};  // 1 lock_error, 2 another std::system_error, 3 anything else
  std::atomic<int> code{0};
  std::atomic<int> path_is_lock_path{0};
  std::atomic<int> role_after_throw{-1};
  std::atomic<int> running_after_throw{-1};
  std::atomic<int> ec_code{0};
  std::atomic<int> role_after_ec{-1};
  std::atomic<int> phase{0};
  std::atomic<int> free_after_throw{-1};
  std::atomic<int> free_after_ec{-1};
  char what[512] = {};
  LogBook log;
};

// ----------------------------------------------------------------------------------------
// Calls from callbacks
// ----------------------------------------------------------------------------------------

struct CallbackReport {
  std::atomic<int> promoted{0};
  std::atomic<int> demoted{0};
  std::atomic<int> role_in_promoted{-1};
  std::atomic<int> running_in_promoted{-1};
  std::atomic<int> role_in_demoted{-1};
  std::atomic<int> calls_returned{0};
  std::atomic<int> running_after_callback_stop{-1};
  std::atomic<int> restarted_role{-1};
  LogBook log;
};

// ----------------------------------------------------------------------------------------
// The host takes the wakeup signal
// ----------------------------------------------------------------------------------------

enum class HostChange { ignore, restarting_handler, default_action };

struct SignalReport {
  std::atomic<int> waiting{0};
  std::atomic<long long> stop_ms{-1};
  std::atomic<int> phase{0};
  LogBook log;
};

inline void host_handler(int) {}

// ----------------------------------------------------------------------------------------
// request_stop() from a signal handler
// ----------------------------------------------------------------------------------------

inline std::atomic<Coordinator*> sigterm_target{nullptr};
inline std::atomic<int> sigterm_handled{0};

inline void stop_on_sigterm(int) {
  if (Coordinator* c = sigterm_target.load()) c->request_stop();
  sigterm_handled.store(1);
}

struct SigtermReport {
  std::atomic<int> phase{0};  // 1 ready for SIGTERM
  std::atomic<int> promoted{0};
  std::atomic<int> demoted{0};
  std::atomic<int> handled_inside_poll{-1};
  std::atomic<int> running_after{-1};
  std::atomic<int> role_after{-1};
  std::atomic<long long> stop_ms{-1};
  LogBook log;
};

// ----------------------------------------------------------------------------------------
// Bad configuration, and the path errors name
// ----------------------------------------------------------------------------------------

struct OptionCase {
  const char* field;
  CoordinatorOptions options;
};

struct ValidationReport {
  static constexpr int kCases = 16;
  std::atomic<int> threw_lock_error[kCases] = {};
  std::atomic<int> code_invalid[kCases] = {};
  std::atomic<int> names_field[kCases] = {};
  std::atomic<int> path_is_lock_path[kCases] = {};
  std::atomic<int> stayed_secondary[kCases] = {};
  std::atomic<int> ec_invalid[kCases] = {};
  std::atomic<int> cases{0};
  std::atomic<int> valid_start_role{-1};
};

struct HugeIntervalReport {
  std::atomic<int> role{-1};
  std::atomic<long long> cpu_us{-1};
  std::atomic<long long> stop_ms{-1};
  std::atomic<int> demoted{0};
  LogBook log;
};

inline long long process_cpu_us() {
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return (static_cast<long long>(usage.ru_utime.tv_sec) + usage.ru_stime.tv_sec) * 1000000 +
         usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
}

struct PathReport {
  std::atomic<int> threw{0};
  std::atomic<int> path_is_lock_path{0};
  std::atomic<int> code_is_eperm{0};
  std::atomic<int> role{-1};
  char reported_path[256] = {};
};

}  // namespace wltest::lifecycle_lab
