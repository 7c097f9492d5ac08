// tests/test_coordinator_lifecycle.cpp: the Coordinator's life cycle in real forked processes:
// copies inherited through fork(), a start() that fails, stop paths, and bad configuration.
//
// Each test runs the Coordinator in a forked worker; the parent gives every worker a generous
// deadline and SIGKILLs it after that, so a hang becomes a failure. Workers report through
// one struct in anonymous shared memory; the parent makes the assertions.
#include <catch2/catch.hpp>

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

#include <workerlock/workerlock.hpp>

#include "fault_injection.hpp"
#include "support.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using std::chrono::milliseconds;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::LogLevel;
using workerlock::Role;
using workerlock::WaitMode;

constexpr int kHung = -2;  // wait_or_kill() had to SIGKILL the process
constexpr int kPrimary = static_cast<int>(Role::primary);
constexpr int kSecondary = static_cast<int>(Role::secondary);

const char* mode_name(WaitMode mode) {
  return mode == WaitMode::polled ? "polled" : "background_thread";
}

double ms_since(std::chrono::steady_clock::time_point began) {
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

CoordinatorOptions options_for(WaitMode mode, LogBook& book) {
  CoordinatorOptions options;
  options.wait = mode;
  options.lock.log = [&book](LogLevel level, std::string_view line) { book.add(level, line); };
  return options;
}

//! Waits until `pid` exits, at most `timeout`; then SIGKILLs it and returns kHung. Returns
//! its exit code (128 + signal when killed). For children the caller reaps itself.
int wait_or_kill(pid_t pid, milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  for (;;) {
    const pid_t got = ::waitpid(pid, &status, WNOHANG);
    if (got == pid) break;
    if (got < 0 && errno != EINTR) return -1;
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return kHung;
    }
    std::this_thread::sleep_for(1ms);
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

//! A worker the test process spawned: waits for it like wait_or_kill(), through `children`
//! so that nothing is reaped twice.
int finish_worker(wltest::Children& children, pid_t pid, milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    siginfo_t info{};
    const int rc = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
    if (rc == 0 && info.si_pid == pid) return children.wait(pid);
    if (rc != 0 && errno != EINTR) return -1;
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      children.wait(pid);
      return kHung;
    }
    std::this_thread::sleep_for(1ms);
  }
}

//! Whether another process could take the lock on `path` right now (then lets it go).
bool lock_is_free(const fs::path& path) {
  workerlock::WorkerLock probe(path, workerlock::Options{}.silent());
  const bool free = probe.try_lock();
  if (free) probe.unlock();
  return free;
}

//! Waits until `flag` reaches `value`, at most `timeout`.
bool wait_for_value(const std::atomic<int>& flag, int value, milliseconds timeout = 10s) {
  return wltest::eventually([&] { return flag.load() == value; }, timeout);
}

//! The README's pattern: a Coordinator with static storage duration, destroyed by exit().
std::optional<Coordinator>& static_coordinator() {
  static std::optional<Coordinator> coordinator;
  return coordinator;
}

//! The tid of this process's only other thread (the coordinator thread), or 0.
pid_t other_thread() {
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
bool thread_in_syscall(pid_t tid, long nr) {
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

TEST_CASE("coordinator lifecycle: a child forked by the primary reads role() secondary",
          "[coordinator][coordinator_lifecycle][threads]") {
  const WaitMode mode = GENERATE(WaitMode::background_thread, WaitMode::polled);
  INFO("mode " << mode_name(mode));
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<ForkReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    ForkReport& r = *report;
    const pid_t me = ::getpid();
    auto& slot = static_coordinator();
    slot.emplace(path, options_for(mode, r.log));
    Coordinator& c = *slot;
    c.on_promoted([&] {
      if (::getpid() != me) r.callbacks_elsewhere.fetch_add(1);
    });
    c.on_demoted([&] {
      if (::getpid() != me) r.callbacks_elsewhere.fetch_add(1);
    });
    c.start();
    r.worker_role.store(static_cast<int>(c.role()));
    // A child of fork(): the atfork handlers ran.
    const pid_t forked = ::fork();
    if (forked == 0) {
      r.fork_role.store(static_cast<int>(c.role()));
      r.fork_running.store(c.running() ? 1 : 0);
      r.fork_fencing.store(static_cast<long long>(c.fencing_token()));
      ::_exit(0);
    }
    r.fork_exit.store(wait_or_kill(forked, 5s));
    // A child of a raw fork system call: no atfork handler ran, so no cached pid was reset.
    const long raw = ::syscall(SYS_fork);
    if (raw == 0) {
      r.raw_role.store(static_cast<int>(c.role()));
      r.raw_running.store(c.running() ? 1 : 0);
      // Must return at once, and leave the parent's hold alone. With a thread, stop() only:
      // ThreadSanitizer, which never saw this fork, would take freeing the Coordinator here
      // for a race with the parent's thread (the destructor's path is the same as after
      // fork(), which the helper test below covers).
      if (mode == WaitMode::polled) {
        slot.reset();
      } else {
        c.stop();
      }
      r.raw_destroyed.store(1);
      ::syscall(SYS_exit_group, 0);
    }
    r.raw_exit.store(raw < 0 ? -1 : wait_or_kill(static_cast<pid_t>(raw), 5s));
    for (int i = 0; i < 5; ++i) {
      c.poll();
      std::this_thread::sleep_for(2ms);
    }
    r.worker_role_after.store(static_cast<int>(c.role()));
    r.phase.store(1);
    if (!wait_for_value(r.phase, 2)) return 3;
    slot.reset();
    return 0;
  });
  REQUIRE(wait_for_value(report->phase, 1));
  report->lock_free_while_held.store(lock_is_free(path) ? 1 : 0);
  report->phase.store(2);
  REQUIRE(finish_worker(children, worker, 20s) == 0);
  ForkReport& r = *report;
  INFO(r.log.contents());
  CHECK(r.worker_role.load() == kPrimary);
  CHECK(r.fork_exit.load() == 0);
  CHECK(r.fork_role.load() == kSecondary);
  CHECK(r.fork_running.load() == 0);
  CHECK(r.fork_fencing.load() == 0);
  CHECK(r.raw_exit.load() == 0);
  CHECK(r.raw_role.load() == kSecondary);
  CHECK(r.raw_running.load() == 0);
  CHECK(r.raw_destroyed.load() == 1);
  CHECK(r.callbacks_elsewhere.load() == 0);
  CHECK(r.worker_role_after.load() == kPrimary);  // the children left the parent's hold alone
  CHECK(r.lock_free_while_held.load() == 0);
}

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

TEST_CASE(
    "coordinator lifecycle: start() on a forked copy throws while the parent runs it and starts "
    "afresh once the parent stopped it",
    "[coordinator][coordinator_lifecycle][threads]") {
  const WaitMode mode = GENERATE(WaitMode::background_thread, WaitMode::polled);
  INFO("mode " << mode_name(mode));
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<CopyStartReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    CopyStartReport& r = *report;
    const pid_t me = ::getpid();
    Coordinator c(path, options_for(mode, r.log));
    c.on_promoted([&] {
      if (::getpid() != me) r.stopped_copy_promoted_in_child.fetch_add(1);
    });
    c.start();
    // The parent runs it: the copy must not start (it would be a second, hidden member).
    pid_t pid = ::fork();
    if (pid == 0) {
      try {
        c.start();
      } catch (const workerlock::lock_error& error) {
        r.running_copy_threw.store(1);
        r.running_copy_code.store(error.code().value());
      }
      r.running_copy_role.store(static_cast<int>(c.role()));
      ::_exit(0);
    }
    r.running_copy_exit.store(wait_or_kill(pid, 5s));
    // Stopped before the fork: the copy is an ordinary Coordinator of the child.
    c.stop();
    pid = ::fork();
    if (pid == 0) {
      c.start();
      for (int i = 0; i < 5; ++i) {
        c.poll();
        std::this_thread::sleep_for(2ms);
      }
      if (mode == WaitMode::background_thread)
        wltest::eventually([&] { return r.stopped_copy_promoted_in_child.load() == 1; }, 5s);
      r.stopped_copy_role.store(static_cast<int>(c.role()));
      c.stop();
      ::_exit(0);
    }
    r.stopped_copy_exit.store(wait_or_kill(pid, 10s));
    r.worker_role_after.store(static_cast<int>(c.role()));
    return 0;
  });
  REQUIRE(finish_worker(children, worker, 20s) == 0);
  CopyStartReport& r = *report;
  INFO(r.log.contents());
  CHECK(r.running_copy_exit.load() == 0);
  CHECK(r.running_copy_threw.load() == 1);
  CHECK(r.running_copy_code.load() == EPERM);
  CHECK(r.running_copy_role.load() == kSecondary);
  CHECK(r.stopped_copy_exit.load() == 0);
  CHECK(r.stopped_copy_role.load() == kPrimary);
  CHECK(r.stopped_copy_promoted_in_child.load() == 1);
  CHECK(r.worker_role_after.load() == kSecondary);
  CHECK(lock_is_free(path));
}

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
[[noreturn]] void helper_body(HelperReport& r, Coordinator& c, bool exit_by_exit) {
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

TEST_CASE(
    "coordinator lifecycle: a helper forked by a worker leaves with exit(0) at once, runs no "
    "callback and keeps the worker's hold",
    "[coordinator][coordinator_lifecycle][threads]") {
  const HelperCase hc =
      GENERATE(HelperCase{"thread primary, forked from the main thread",
                          WaitMode::background_thread, false, false, true},
               HelperCase{"thread primary, forked from on_promoted", WaitMode::background_thread,
                          true, false, false},
               HelperCase{"thread standby, forked from the main thread",
                          WaitMode::background_thread, false, true, true},
               HelperCase{"polled primary, forked from the main thread", WaitMode::polled, false,
                          false, true},
               HelperCase{"polled primary, forked from on_promoted inside start()",
                          WaitMode::polled, true, false, true});
  INFO(hc.name);
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<HelperReport> report;
  wltest::Children children;
  std::optional<workerlock::WorkerLock> holder;
  if (hc.standby) {
    holder.emplace(path, workerlock::Options{}.silent());
    REQUIRE(holder->try_lock());
  }
  const pid_t worker = children.spawn([&]() -> int {
    HelperReport& r = *report;
    const pid_t me = ::getpid();
    auto& slot = static_coordinator();
    slot.emplace(path, options_for(hc.mode, r.log));
    Coordinator& c = *slot;
    const auto fork_helper = [&] {
      const pid_t pid = ::fork();
      if (pid == 0) helper_body(r, c, hc.exit_by_exit);
      r.helper.store(pid);
    };
    c.on_promoted([&] {
      if (::getpid() != me) {
        r.callbacks_in_helper.fetch_add(1);
        return;
      }
      if (r.worker_promoted.fetch_add(1) == 0 && hc.fork_in_callback) fork_helper();
    });
    c.on_demoted([&] {
      if (::getpid() != me) {
        r.callbacks_in_helper.fetch_add(1);
        return;
      }
      r.worker_demoted.fetch_add(1);
    });
    c.start();
    if (!hc.standby && !wait_for_value(r.worker_promoted, 1, 5s)) return 3;
    if (!hc.fork_in_callback) {
      std::this_thread::sleep_for(20ms);  // the thread settles in its sleep or its wait
      fork_helper();
    }
    if (!wltest::eventually([&] { return r.helper.load() > 0; }, 5s)) return 4;
    const auto began = std::chrono::steady_clock::now();
    r.helper_exit.store(wait_or_kill(r.helper.load(), 5s));
    r.helper_ms.store(static_cast<long long>(ms_since(began)));
    for (int i = 0; i < 5; ++i) {
      c.poll();
      std::this_thread::sleep_for(2ms);
    }
    r.worker_role_after.store(static_cast<int>(c.role()));
    r.phase.store(1);
    if (!wait_for_value(r.phase, 2)) return 5;
    if (hc.standby) {  // the parent released: the worker's own wait still works
      for (int i = 0; i < 2500 && r.worker_promoted.load() == 0; ++i) {
        c.poll();
        std::this_thread::sleep_for(2ms);
      }
    }
    slot.reset();
    return 0;
  });
  REQUIRE(wait_for_value(report->phase, 1));
  report->lock_free_after_helper.store(lock_is_free(path) ? 1 : 0);
  if (holder) holder->unlock();
  report->phase.store(2);
  REQUIRE(finish_worker(children, worker, 20s) == 0);
  HelperReport& r = *report;
  INFO(r.log.contents());
  CHECK(r.helper_exit.load() == 0);  // not hung (kHung), not terminated (128 + 6)
  CHECK(r.helper_reached_exit.load() == 1);
  CHECK(r.helper_ms.load() < 3000);
  CHECK(r.helper_role.load() == kSecondary);
  CHECK(r.helper_running.load() == 0);
  CHECK(r.callbacks_in_helper.load() == 0);
  CHECK(r.lock_free_after_helper.load() == 0);  // the worker (or the parent) still holds it
  CHECK(r.worker_role_after.load() == (hc.standby ? kSecondary : kPrimary));
  CHECK(r.worker_promoted.load() == 1);
  CHECK(r.worker_demoted.load() == 1);
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

TEST_CASE(
    "coordinator lifecycle: start() that cannot create its thread throws lock_error, stays "
    "secondary and frees the lock",
    "[coordinator][coordinator_lifecycle][threads]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<StartFailureReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    StartFailureReport& r = *report;
    Coordinator c(path, options_for(WaitMode::background_thread, r.log));
    // glibc's pthread_create() uses clone3, and clone only where clone3 is missing (ENOSYS).
#ifdef SYS_clone3
    if (!wltest::fail_syscall(SYS_clone3, EAGAIN)) return 90;
#endif
    if (!wltest::fail_syscall(SYS_clone, EAGAIN)) return 91;
    r.filtered.store(1);
    try {
      c.start();
    } catch (const workerlock::lock_error& error) {
      r.caught.store(1);
      r.code.store(error.code().value());
      r.path_is_lock_path.store(error.path() == path ? 1 : 0);
      std::strncpy(r.what, error.what(), sizeof r.what - 1);
    } catch (const std::system_error& error) {
      r.caught.store(2);
      r.code.store(error.code().value());
      std::strncpy(r.what, error.what(), sizeof r.what - 1);
    } catch (...) {
      r.caught.store(3);
    }
    r.role_after_throw.store(static_cast<int>(c.role()));
    r.running_after_throw.store(c.running() ? 1 : 0);
    r.phase.store(1);
    if (!wait_for_value(r.phase, 2)) return 3;
    std::error_code ec;
    c.start(ec);
    r.ec_code.store(ec.value());
    r.role_after_ec.store(static_cast<int>(c.role()));
    r.phase.store(3);
    if (!wait_for_value(r.phase, 4)) return 4;
    return 0;
  });
  REQUIRE(wait_for_value(report->phase, 1));
  report->free_after_throw.store(lock_is_free(path) ? 1 : 0);
  report->phase.store(2);
  REQUIRE(wait_for_value(report->phase, 3));
  report->free_after_ec.store(lock_is_free(path) ? 1 : 0);
  report->phase.store(4);
  REQUIRE(finish_worker(children, worker, 20s) == 0);
  StartFailureReport& r = *report;
  INFO("what(): " << r.what);
  INFO(r.log.contents());
  REQUIRE(r.filtered.load() == 1);
  CHECK(r.caught.load() == 1);
  CHECK(r.code.load() == EAGAIN);
  CHECK(r.path_is_lock_path.load() == 1);
  CHECK(std::string(r.what).find(path.native()) != std::string::npos);
  CHECK(r.role_after_throw.load() == kSecondary);
  CHECK(r.running_after_throw.load() == 0);
  CHECK(r.free_after_throw.load() == 1);
  CHECK(r.ec_code.load() == EAGAIN);
  CHECK(r.role_after_ec.load() == kSecondary);
  CHECK(r.free_after_ec.load() == 1);
  CHECK(r.log.errors.load() == 0);  // reported once: thrown (or set in ec), never also logged
}

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

TEST_CASE("coordinator lifecycle: every public call from a callback returns without deadlock",
          "[coordinator][coordinator_lifecycle][threads]") {
  const WaitMode mode = GENERATE(WaitMode::background_thread, WaitMode::polled);
  INFO("mode " << mode_name(mode));
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<CallbackReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    CallbackReport& r = *report;
    Coordinator c(path, options_for(mode, r.log));
    std::atomic<int> round{0};
    const auto poll_until = [&](auto condition) {
      for (int i = 0; i < 2500 && !condition(); ++i) {
        c.poll();
        std::this_thread::sleep_for(2ms);
      }
      return condition();
    };
    c.on_promoted([&] {
      r.promoted.fetch_add(1);
      if (round.load() == 0) {
        c.start();  // running: nothing to do
        c.poll();
        r.role_in_promoted.store(static_cast<int>(c.role()));
        r.running_in_promoted.store(c.running() ? 1 : 0);
        (void)c.fencing_token();
        (void)c.wait_for_startup(1ms);
        r.calls_returned.fetch_add(1);
      } else if (round.load() == 1) {
        c.stop();   // completes when this callback returns
        c.start();  // still running until then: nothing to do
        c.poll();
        r.calls_returned.fetch_add(1);
      }
    });
    c.on_demoted([&] {
      r.demoted.fetch_add(1);
      c.start();
      c.poll();
      c.stop();
      r.role_in_demoted.store(static_cast<int>(c.role()));
      r.calls_returned.fetch_add(1);
    });
    // Round 0: callbacks call start(), poll() and the getters; stop() runs on_demoted.
    c.start();
    if (!poll_until([&] { return r.promoted.load() == 1; })) return 3;
    c.stop();
    if (r.demoted.load() != 1) return 4;
    // Round 1: on_promoted calls stop(), then start().
    round.store(1);
    c.start();
    if (!poll_until([&] { return r.demoted.load() == 2; })) return 5;
    if (!poll_until([&] { return !c.running(); })) return 6;
    r.running_after_callback_stop.store(c.running() ? 1 : 0);
    // Round 2: start() afresh after the stop a callback asked for.
    round.store(2);
    c.start();
    if (!poll_until([&] { return r.promoted.load() == 3; })) return 7;
    r.restarted_role.store(static_cast<int>(c.role()));
    c.stop();
    return 0;
  });
  const int code = finish_worker(children, worker, 15s);
  CallbackReport& r = *report;
  INFO(r.log.contents());
  REQUIRE(code == 0);  // kHung: a call from a callback deadlocked
  CHECK(r.role_in_promoted.load() == kPrimary);
  CHECK(r.running_in_promoted.load() == 1);
  CHECK(r.role_in_demoted.load() == kPrimary);  // on_demoted runs before the release
  CHECK(r.calls_returned.load() == 5);          // 2 x on_promoted, 3 x on_demoted
  CHECK(r.running_after_callback_stop.load() == 0);
  CHECK(r.restarted_role.load() == kPrimary);
  CHECK(r.promoted.load() == 3);
  CHECK(r.demoted.load() == 3);
  CHECK(lock_is_free(path));
}

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

void host_handler(int) {}

TEST_CASE(
    "coordinator lifecycle: stop() returns although the host replaced the wakeup signal's "
    "handler after start()",
    "[coordinator][coordinator_lifecycle][threads]") {
  const HostChange change =
      GENERATE(HostChange::ignore, HostChange::restarting_handler, HostChange::default_action);
  INFO("change " << static_cast<int>(change)
                 << " (0 SIG_IGN, 1 a handler with SA_RESTART, 2 SIG_DFL)");
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<SignalReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    SignalReport& r = *report;
    workerlock::WorkerLock other(path, workerlock::Options{}.silent());  // excludes c
    other.lock();
    Coordinator c(path, options_for(WaitMode::background_thread, r.log));
    c.start();
    if (c.role() != Role::secondary) return 3;
    pid_t tid = 0;
    if (!wltest::eventually([&] { return (tid = other_thread()) != 0; }, 5s)) return 4;
    // The coordinator thread sleeps in the kernel's blocking lock call.
    if (!wltest::eventually([&] { return thread_in_syscall(tid, SYS_fcntl); }, 5s)) return 5;
    r.waiting.store(1);
    const int wakeup = SIGRTMIN + 5;
    struct sigaction host {};
    sigemptyset(&host.sa_mask);
    if (change == HostChange::ignore) {
      host.sa_handler = SIG_IGN;
    } else if (change == HostChange::default_action) {
      host.sa_handler = SIG_DFL;
    } else {
      host.sa_handler = &host_handler;
      host.sa_flags = SA_RESTART;
    }
    if (::sigaction(wakeup, &host, nullptr) != 0) return 6;
    const auto began = std::chrono::steady_clock::now();
    c.stop();
    r.stop_ms.store(static_cast<long long>(ms_since(began)));
    other.unlock();
    return 0;
  });
  const int code = finish_worker(children, worker, 15s);
  SignalReport& r = *report;
  const std::string log = r.log.contents();
  INFO(log);
  REQUIRE(code == 0);  // kHung: stop() never returned; 128 + signal: SIG_DFL killed it
  CHECK(r.waiting.load() == 1);
  CHECK(r.stop_ms.load() < 5000);
  CHECK(r.log.errors.load() == 1);
  CHECK(log.find("SIGRTMIN+5") != std::string::npos);
}

// ----------------------------------------------------------------------------------------
// request_stop() from a signal handler
// ----------------------------------------------------------------------------------------

std::atomic<Coordinator*> sigterm_target{nullptr};
std::atomic<int> sigterm_handled{0};

void stop_on_sigterm(int) {
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

TEST_CASE(
    "coordinator lifecycle: request_stop() from a SIGTERM handler releases the lock without a "
    "hang",
    "[coordinator][coordinator_lifecycle][threads]") {
  const WaitMode mode = GENERATE(WaitMode::background_thread, WaitMode::polled);
  INFO("mode " << mode_name(mode));
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<SigtermReport> report;
  wltest::Children children;
  // Polled: the worker starts as a standby and is promoted inside poll(); there, while
  // poll() holds the Coordinator's state but runs no callback, the log sink receives the
  // "role=primary" line and waits until the SIGTERM handler has run.
  workerlock::WorkerLock holder(path, workerlock::Options{}.silent());
  if (mode == WaitMode::polled) REQUIRE(holder.try_lock());
  const pid_t worker = children.spawn([&]() -> int {
    SigtermReport& r = *report;
    auto options = options_for(mode, r.log);
    if (mode == WaitMode::polled) {
      options.lock.log = [&r](LogLevel level, std::string_view line) {
        r.log.add(level, line);
        if (line.find("role=primary") == std::string_view::npos) return;
        r.phase.store(1);
        const bool handled = wltest::eventually([] { return sigterm_handled.load() == 1; }, 10s);
        r.handled_inside_poll.store(handled ? 1 : 0);
      };
    }
    Coordinator c(path, options);
    c.on_promoted([&] { r.promoted.fetch_add(1); });
    c.on_demoted([&] { r.demoted.fetch_add(1); });
    sigterm_target.store(&c);
    struct sigaction term {};
    term.sa_handler = &stop_on_sigterm;
    sigemptyset(&term.sa_mask);
    if (::sigaction(SIGTERM, &term, nullptr) != 0) return 3;
    c.start();
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    if (mode == WaitMode::background_thread) {
      if (!wait_for_value(r.promoted, 1, 5s)) return 4;
      r.phase.store(1);
      while (sigterm_handled.load() == 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(1ms);  // idle: the handler interrupts this sleep
      if (!wltest::eventually([&] { return r.demoted.load() == 1; }, 30s)) return 5;
    } else {
      while (c.running() && std::chrono::steady_clock::now() < deadline) {
        c.poll();
        std::this_thread::sleep_for(2ms);
      }
    }
    r.running_after.store(c.running() ? 1 : 0);
    r.role_after.store(static_cast<int>(c.role()));
    const auto began = std::chrono::steady_clock::now();
    c.stop();
    r.stop_ms.store(static_cast<long long>(ms_since(began)));
    sigterm_target.store(nullptr);
    return 0;
  });
  if (mode == WaitMode::polled) {
    std::this_thread::sleep_for(20ms);
    holder.unlock();  // the worker's next poll() promotes it
  }
  REQUIRE(wait_for_value(report->phase, 1));
  REQUIRE(::kill(worker, SIGTERM) == 0);
  const bool released = wltest::eventually([&] { return lock_is_free(path); }, 5s);
  const int code = finish_worker(children, worker, 15s);
  SigtermReport& r = *report;
  INFO(r.log.contents());
  REQUIRE(code == 0);  // kHung: the stop hung
  CHECK(released);
  CHECK(r.promoted.load() == 1);
  CHECK(r.demoted.load() == 1);
  if (mode == WaitMode::polled) CHECK(r.handled_inside_poll.load() == 1);
  CHECK(r.running_after.load() == 0);
  CHECK(r.role_after.load() == kSecondary);
  CHECK(r.stop_ms.load() < 3000);
}

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

TEST_CASE("coordinator lifecycle: start() rejects bad options with a lock_error naming the field",
          "[coordinator][coordinator_lifecycle]") {
  const auto with = [](auto change) {
    CoordinatorOptions options;
    options.wait = WaitMode::polled;
    options.lock.log = nullptr;
    change(options);
    return options;
  };
  const OptionCase cases[] = {
      {"health_check_interval", with([](auto& o) { o.health_check_interval = 0ms; })},
      {"health_check_interval", with([](auto& o) { o.health_check_interval = -5ms; })},
      {"retry_backoff_min", with([](auto& o) { o.retry_backoff_min = 0ms; })},
      {"retry_backoff_min", with([](auto& o) { o.retry_backoff_min = -1ms; })},
      {"retry_backoff_max", with([](auto& o) { o.retry_backoff_max = 5ms; })},
      {"retry_backoff_max", with([](auto& o) { o.retry_backoff_max = -1ms; })},
      {"wakeup_signal", with([](auto& o) { o.wakeup_signal = -1; })},
      {"wakeup_signal", with([](auto& o) { o.wakeup_signal = 1000; })},
      {"wakeup_signal", with([](auto& o) { o.wakeup_signal = SIGKILL; })},
      {"wakeup_signal", with([](auto& o) { o.wakeup_signal = SIGSEGV; })},
      {"server_stop_grace", with([](auto& o) { o.server_stop_grace = -1ms; })},
      // Longer than max_server_stop_grace: milliseconds::max() used to overflow the note's
      // date plus the grace and silently turn the deferral off.
      {"server_stop_grace",
       with([](auto& o) { o.server_stop_grace = std::chrono::milliseconds::max(); })},
      {"server_stop_grace",
       with([](auto& o) { o.server_stop_grace = workerlock::max_server_stop_grace + 1ms; })},
  };
  constexpr int n = static_cast<int>(sizeof cases / sizeof cases[0]);
  static_assert(n + 1 <= ValidationReport::kCases);
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<ValidationReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    ValidationReport& r = *report;
    const auto check = [&](int i, Coordinator& c, const char* field) {
      try {
        c.start();
      } catch (const workerlock::lock_error& error) {
        r.threw_lock_error[i].store(1);
        r.code_invalid[i].store(error.code() == std::errc::invalid_argument ? 1 : 0);
        r.names_field[i].store(std::string(error.what()).find(field) != std::string::npos);
        r.path_is_lock_path[i].store(error.path() == path ? 1 : 0);
      } catch (...) {
      }
      r.stayed_secondary[i].store(c.role() == Role::secondary && !c.running());
      std::error_code ec;
      c.start(ec);
      r.ec_invalid[i].store(ec == std::errc::invalid_argument);
      c.stop();
    };
    for (int i = 0; i < n; ++i) {
      Coordinator c(path, cases[i].options);
      check(i, c, cases[i].field);
    }
    // A FileBackend built by the caller checks its own arguments.
    {
      const auto options = with([](auto&) {});
      Coordinator c(std::make_unique<workerlock::FileBackend>(path, options.lock, 0, 0ms), options);
      check(n, c, "health_check_interval");
    }
    r.cases.store(n + 1);
    // Nothing was held: a valid configuration (the longest grace) wins the free lock.
    Coordinator valid(
        path, with([](auto& o) { o.server_stop_grace = workerlock::max_server_stop_grace; }));
    valid.start();
    r.valid_start_role.store(static_cast<int>(valid.role()));
    valid.stop();
    return 0;
  });
  REQUIRE(finish_worker(children, worker, 15s) == 0);
  ValidationReport& r = *report;
  REQUIRE(r.cases.load() == n + 1);
  for (int i = 0; i <= n; ++i) {
    INFO("case " << i << ": " << (i < n ? cases[i].field : "FileBackend health_check_interval"));
    CHECK(r.threw_lock_error[i].load() == 1);
    CHECK(r.code_invalid[i].load() == 1);
    CHECK(r.names_field[i].load() == 1);
    CHECK(r.path_is_lock_path[i].load() == 1);
    CHECK(r.stayed_secondary[i].load() == 1);
    CHECK(r.ec_invalid[i].load() == 1);
  }
  CHECK(r.valid_start_role.load() == kPrimary);
}

struct HugeIntervalReport {
  std::atomic<int> role{-1};
  std::atomic<long long> cpu_us{-1};
  std::atomic<long long> stop_ms{-1};
  std::atomic<int> demoted{0};
  LogBook log;
};

long long process_cpu_us() {
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return (static_cast<long long>(usage.ru_utime.tv_sec) + usage.ru_stime.tv_sec) * 1000000 +
         usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
}

TEST_CASE("coordinator lifecycle: a huge health_check_interval is a long sleep, not a busy loop",
          "[coordinator][coordinator_lifecycle][threads]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<HugeIntervalReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    HugeIntervalReport& r = *report;
    auto options = options_for(WaitMode::background_thread, r.log);
    options.health_check_interval = milliseconds::max();
    options.retry_backoff_min = milliseconds::max();
    options.retry_backoff_max = milliseconds::max();
    Coordinator c(path, options);
    c.on_demoted([&] { r.demoted.fetch_add(1); });
    c.start();
    r.role.store(static_cast<int>(c.role()));
    std::this_thread::sleep_for(50ms);  // the thread runs on_promoted and goes to sleep
    const long long before = process_cpu_us();
    std::this_thread::sleep_for(500ms);
    r.cpu_us.store(process_cpu_us() - before);
    const auto began = std::chrono::steady_clock::now();
    c.stop();
    r.stop_ms.store(static_cast<long long>(ms_since(began)));
    return 0;
  });
  REQUIRE(finish_worker(children, worker, 15s) == 0);
  HugeIntervalReport& r = *report;
  INFO(r.log.contents());
  CHECK(r.role.load() == kPrimary);
  CHECK(r.cpu_us.load() < 100000);  // a busy loop burns most of the 500 ms
  CHECK(r.stop_ms.load() < 3000);
  CHECK(r.demoted.load() == 1);
  CHECK(lock_is_free(path));
}

TEST_CASE(
    "coordinator lifecycle: in polled mode huge intervals and backoffs are long waits, never "
    "an overflow into a check or retry on every poll()",
    "[coordinator][coordinator_lifecycle]") {
  // health_check_interval = milliseconds::max(): a deleted lock file is never looked at, so
  // the primary stays primary while poll() runs (an overflowed comparison checked it on every
  // poll() and stepped down). retry_backoff = milliseconds::max() after an unreadable startup
  // marker: one error line, not one per poll() (an overflowed deadline lay in the past).
  const int scenario = GENERATE(0, 1);
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  if (scenario == 1) REQUIRE(::mkfifo((path.string() + ".startup").c_str(), 0600) == 0);
  wltest::Shared<HugeIntervalReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    HugeIntervalReport& r = *report;
    auto options = options_for(WaitMode::polled, r.log);
    options.health_check_interval = milliseconds::max();
    options.retry_backoff_min = milliseconds::max();
    options.retry_backoff_max = milliseconds::max();
    options.startup_generation = "generation-1";
    Coordinator c(path, options);
    c.on_startup([] {}).on_demoted([&] { r.demoted.fetch_add(1); });
    c.start();
    if (scenario == 0) fs::remove(path);
    const auto until = std::chrono::steady_clock::now() + 300ms;
    while (std::chrono::steady_clock::now() < until) {
      c.poll();
      std::this_thread::sleep_for(2ms);
    }
    r.role.store(static_cast<int>(c.role()));
    c.stop();
    return 0;
  });
  REQUIRE(finish_worker(children, worker, 15s) == 0);
  HugeIntervalReport& r = *report;
  INFO("scenario " << scenario << "\n" << r.log.contents());
  if (scenario == 0) {
    CHECK(r.role.load() == kPrimary);
    CHECK(r.log.warnings.load() == 0);
    CHECK(r.demoted.load() == 1);  // by stop()
  } else {
    CHECK(r.role.load() == kSecondary);
    CHECK(r.log.errors.load() == 1);
    CHECK(r.demoted.load() == 0);
  }
}

struct PathReport {
  std::atomic<int> threw{0};
  std::atomic<int> path_is_lock_path{0};
  std::atomic<int> code_is_eperm{0};
  std::atomic<int> role{-1};
  char reported_path[256] = {};
};

TEST_CASE("coordinator lifecycle: lock_error::path() of a failed start() is the lock file's path",
          "[coordinator][coordinator_lifecycle]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<PathReport> report;
  wltest::Children children;
  const pid_t worker = children.spawn([&]() -> int {
    PathReport& r = *report;
    ::setenv("WORKERLOCK_ROLE", "primary", 1);  // refused: forcing primary is an error
    CoordinatorOptions options;
    options.wait = WaitMode::polled;
    options.lock.log = nullptr;
    Coordinator c(path, options);
    try {
      c.start();
    } catch (const workerlock::lock_error& error) {
      r.threw.store(1);
      r.path_is_lock_path.store(error.path() == path ? 1 : 0);
      r.code_is_eperm.store(error.code().value() == EPERM ? 1 : 0);
      std::strncpy(r.reported_path, error.path().c_str(), sizeof r.reported_path - 1);
    }
    r.role.store(static_cast<int>(c.role()));
    return 0;
  });
  REQUIRE(finish_worker(children, worker, 15s) == 0);
  PathReport& r = *report;
  INFO("lock_error::path(): " << r.reported_path);
  CHECK(r.threw.load() == 1);
  CHECK(r.path_is_lock_path.load() == 1);
  CHECK(r.code_is_eperm.load() == 1);
  CHECK(r.role.load() == kSecondary);
  CHECK(lock_is_free(path));
}

}  // namespace
