// tests/test_startup_barrier.cpp: forked-process tests of the startup barrier: hostile markers,
// read errors at promotion, signal storms, size limits and the default generation.
//
// Every risky step runs in a forked child that reports through shared memory; the parent
// kills a child that outlives a generous watchdog and fails, so a hang is a failure.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include <workerlock/workerlock.hpp>

#include "fault_injection.hpp"
#include "support.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using wltest::Children;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::lock_error;
using workerlock::LogLevel;
using workerlock::Role;
using workerlock::StartupBarrier;
using workerlock::WaitMode;

constexpr uid_t nobody = 65534;
constexpr auto kWatchdog = 10s;  // a child still running after this is hung

//! Waits for a child of `children` for at most `timeout`; kills it after that. Returns its
//! exit code, or -1 if it had to be killed (it hung).
int wait_or_kill(Children& children, pid_t pid, std::chrono::milliseconds timeout = kWatchdog) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    siginfo_t info{};
    // WNOWAIT: look without reaping, so Children::wait() reaps it (and forgets the pid).
    if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
        info.si_pid == pid)
      return children.wait(pid);
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      children.wait(pid);
      return -1;
    }
    std::this_thread::sleep_for(1ms);
  }
}

//! The contents of a regular file; "" for anything else (never blocks on a planted FIFO).
std::string slurp(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(fs::symlink_status(path, ec))) return "";
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void spit(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

fs::path marker_of(const fs::path& lock) { return fs::path(lock.native() + ".startup"); }

//! Drops every group and becomes `uid` (gid = uid). Only root can do this.
bool become(uid_t uid) {
  return ::setgroups(0, nullptr) == 0 && ::setgid(uid) == 0 && ::setuid(uid) == 0 &&
         ::geteuid() == uid;
}

//! What one worker child saw, for the parent's assertions.
struct WorkerBoard {
  std::atomic<int> startup_runs{0};
  std::atomic<int> promotions{0};
  std::atomic<int> role_after_start{-1};
  std::atomic<int> errors{0};  // error lines of the log sink
  std::atomic<long> stop_ms{-1};
  std::atomic<int> step{0};  // how far the child got
  char first_error[1024] = {};
};

//! A log sink that counts error lines in `board` and keeps the first.
workerlock::LogSink error_sink(WorkerBoard& board) {
  return [&board](LogLevel level, std::string_view line) {
    if (level != LogLevel::error) return;
    if (board.errors.fetch_add(1) == 0)
      std::snprintf(board.first_error, sizeof board.first_error, "%.*s",
                    static_cast<int>(line.size()), line.data());
  };
}

CoordinatorOptions options_for(WaitMode mode, WorkerBoard& board, std::string generation) {
  CoordinatorOptions options;
  options.wait = mode;
  options.lock.log = error_sink(board);
  options.startup_generation = std::move(generation);
  options.retry_backoff_min = 5ms;
  options.retry_backoff_max = 40ms;
  return options;
}

void count_callbacks(Coordinator& coordinator, WorkerBoard& board) {
  coordinator.on_startup([&board] { board.startup_runs.fetch_add(1); });
  coordinator.on_promoted([&board] { board.promotions.fetch_add(1); });
}

//! Keeps `coordinator` running for `duration`, polling in polled mode.
void run_for(Coordinator& coordinator, WaitMode mode, std::chrono::milliseconds duration) {
  const auto until = std::chrono::steady_clock::now() + duration;
  while (std::chrono::steady_clock::now() < until) {
    if (mode == WaitMode::polled) coordinator.poll();
    std::this_thread::sleep_for(2ms);
  }
}

long stop_and_time(Coordinator& coordinator) {
  const auto before = std::chrono::steady_clock::now();
  coordinator.stop();
  return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::steady_clock::now() - before)
                               .count());
}

//! From now on, in this process, openat() fails with `error` when it opens read-only with
//! O_NOFOLLOW, as the startup marker's read does (and the lock file's read-write open, the
//! temporary file's write-only one and fopen() do not). A seccomp filter: irreversible, so
//! call it in a forked child. Returns false if it could not be installed.
bool fail_read_only_nofollow_opens(int error) {
  return wltest::SyscallFilter()
      .on(SCMP_SYS(openat), SCMP_ACT_ERRNO(error),
          {wltest::low_bits_equal(2, O_RDONLY | O_NOFOLLOW, O_ACCMODE | O_NOFOLLOW)})
      .install(true);
}

enum class Planted { fifo, symlink, directory, oversized };

const char* name_of(Planted kind) {
  switch (kind) {
    case Planted::fifo:
      return "a FIFO";
    case Planted::symlink:
      return "a symbolic link to a completed marker";
    case Planted::directory:
      return "a directory";
    case Planted::oversized:
      return "a file larger than any generation";
  }
  return "?";
}

//! Puts `kind` at `marker`. The symbolic link points to a file that names `generation`,
//! so following it would wrongly skip the tasks.
void plant(Planted kind, const fs::path& marker, const std::string& generation) {
  switch (kind) {
    case Planted::fifo:
      REQUIRE(::mkfifo(marker.c_str(), 0644) == 0);
      break;
    case Planted::symlink: {
      const fs::path target = marker.parent_path() / "elsewhere";
      spit(target, generation + "\n");
      REQUIRE(::symlink(target.c_str(), marker.c_str()) == 0);
      break;
    }
    case Planted::directory:
      REQUIRE(::mkdir(marker.c_str(), 0755) == 0);
      break;
    case Planted::oversized:
      spit(marker, generation + "\n" + std::string(4096, 'x'));
      break;
  }
}

//! Child body: a Coordinator on `lock` whose marker is hostile. The primary must step down
//! without running any callback, log why, stay out while the marker stays, stop promptly,
//! and, once the marker is gone, be promoted and run the tasks once.
int hostile_marker_worker(WorkerBoard& board, const fs::path& lock, WaitMode mode,
                          const std::string& generation) {
  Coordinator coordinator(lock, options_for(mode, board, generation));
  count_callbacks(coordinator, board);
  coordinator.start();
  board.step.store(1);
  board.role_after_start.store(static_cast<int>(coordinator.role()));
  run_for(coordinator, mode, 150ms);  // several retries, each refused
  board.step.store(2);
  if (board.startup_runs.load() != 0 || board.promotions.load() != 0) return 11;
  // Removed: the next attempt reads "not completed" and runs the tasks.
  std::error_code ignored;
  fs::remove_all(marker_of(lock), ignored);
  const bool promoted = wltest::eventually([&] {
    if (mode == WaitMode::polled) coordinator.poll();
    return board.promotions.load() == 1;
  });
  board.step.store(3);
  board.stop_ms.store(stop_and_time(coordinator));
  if (!promoted) return 12;
  return board.startup_runs.load() == 1 ? 0 : 13;
}

void check_hostile_marker(WaitMode mode) {
  for (const Planted kind :
       {Planted::fifo, Planted::symlink, Planted::directory, Planted::oversized}) {
    INFO("marker: " << name_of(kind)
                    << ", mode: " << (mode == WaitMode::polled ? "polled" : "background_thread"));
    wltest::TempDir dir;
    const fs::path lock = dir / "app.lock";
    const std::string generation = "hostile-marker-test";
    plant(kind, marker_of(lock), generation);
    wltest::Shared<WorkerBoard> board;
    Children children;
    const pid_t worker =
        children.spawn([&] { return hostile_marker_worker(*board, lock, mode, generation); });
    const int code = wait_or_kill(children, worker);
    INFO("exit code " << code << " (-1: hung, killed), step " << board->step.load()
                      << ", first error: " << board->first_error);
    CHECK(code == 0);
    CHECK(board->role_after_start.load() != -1);
    CHECK(board->errors.load() >= 1);
    CHECK_THAT(std::string(board->first_error), Contains(marker_of(lock).native()));
    CHECK_THAT(std::string(board->first_error), Contains("on_startup not run"));
    CHECK(board->startup_runs.load() == 1);  // only once the marker was removed
    CHECK(board->promotions.load() == 1);
    CHECK(board->stop_ms.load() >= 0);
    CHECK(board->stop_ms.load() < 1000);
    CHECK(slurp(marker_of(lock)) == generation + "\n");
    if (kind == Planted::symlink) CHECK(slurp(dir / "elsewhere") == generation + "\n");
  }
}

}  // namespace

TEST_CASE(
    "startup barrier: a FIFO, a symbolic link, a directory or an oversized file at the marker "
    "is an error, never a hang nor an answer (polled mode)",
    "[startup_barrier]") {
  check_hostile_marker(WaitMode::polled);
}

TEST_CASE(
    "startup barrier: a FIFO, a symbolic link, a directory or an oversized file at the marker "
    "is an error, never a hang nor an answer (thread mode)",
    "[startup_barrier][threads]") {
  check_hostile_marker(WaitMode::background_thread);
}

TEST_CASE("startup barrier: stop() cuts short the backoff after an unreadable marker",
          "[startup_barrier][threads]") {
  wltest::TempDir dir;
  const fs::path lock = dir / "backoff.lock";
  plant(Planted::fifo, marker_of(lock), "backoff-test");
  wltest::Shared<WorkerBoard> board;
  Children children;
  const pid_t worker = children.spawn([&] {
    CoordinatorOptions options = options_for(WaitMode::background_thread, *board, "backoff-test");
    options.retry_backoff_min = 30s;  // the first step-down pauses for 30 s
    options.retry_backoff_max = 30s;
    Coordinator coordinator(lock, options);
    count_callbacks(coordinator, *board);
    coordinator.start();
    if (!wltest::eventually([&] { return board->errors.load() >= 1; })) return 10;
    std::this_thread::sleep_for(50ms);  // well into the pause
    board->stop_ms.store(stop_and_time(coordinator));
    return 0;
  });
  const int code = wait_or_kill(children, worker);
  INFO("exit code " << code << " (-1: hung), first error: " << board->first_error);
  REQUIRE(code == 0);
  CHECK(board->errors.load() == 1);
  CHECK(board->startup_runs.load() == 0);
  CHECK(board->promotions.load() == 0);
  CHECK(board->stop_ms.load() >= 0);
  CHECK(board->stop_ms.load() < 2000);
}

TEST_CASE(
    "startup barrier: completed() reports a refused or unreadable marker as an error with an "
    "explanation and a missing one as not completed",
    "[startup_barrier]") {
  struct Board {
    std::atomic<int> step{0};
    char what[4][512] = {};
    int code[4] = {};
  };
  const std::string generation = "api-test";
  const Planted kinds[] = {Planted::fifo, Planted::symlink, Planted::directory, Planted::oversized};
  const char* explanations[] = {"not a regular file", "symbolic link", "not a regular file",
                                "larger than any generation"};
  wltest::TempDir dir;
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    // Missing: not completed, and no error.
    const fs::path missing_lock = dir / "missing.lock";
    StartupBarrier missing(missing_lock, generation);
    std::error_code ec = std::make_error_code(std::errc::io_error);
    if (missing.completed(ec) || ec) return 10;
    if (missing.completed()) return 11;
    if (missing.wait_for(20ms, ec) || ec) return 12;
    board->step.store(1);
    for (int i = 0; i < 4; ++i) {
      const fs::path lock = dir / fmt::format("kind{}.lock", i);
      plant(kinds[i], marker_of(lock), generation);
      StartupBarrier barrier(lock, generation);
      if (barrier.completed(ec) || !ec) return 20 + i;
      board->code[i] = ec.value();
      try {
        barrier.completed();
        return 30 + i;
      } catch (const lock_error& error) {
        std::snprintf(board->what[i], sizeof board->what[i], "%s", error.what());
        if (error.code() != ec || error.path() != marker_of(lock)) return 40 + i;
      }
      // A bounded wait ends at its deadline and reports the error, too.
      if (barrier.wait_for(30ms, ec) || !ec) return 50 + i;
      try {
        barrier.wait_for(30ms);
        return 60 + i;
      } catch (const lock_error&) {
      }
    }
    board->step.store(2);
    return 0;
  });
  const int code = wait_or_kill(children, child);
  INFO("exit code " << code << " (-1: hung), step " << board->step.load());
  REQUIRE(code == 0);
  for (int i = 0; i < 4; ++i) {
    INFO("marker: " << name_of(kinds[i]) << ": " << board->what[i]);
    CHECK_THAT(std::string(board->what[i]), Contains(explanations[i]));
    CHECK_THAT(std::string(board->what[i]), Contains("read startup marker"));
    CHECK(board->code[i] != 0);
  }
  CHECK(board->code[1] == ELOOP);
  CHECK(board->code[3] == EFBIG);
}

TEST_CASE(
    "startup barrier: a marker that another user planted in a sticky directory is refused, "
    "even when it names the right generation",
    "[startup_barrier][security]") {
  WLTEST_REQUIRE_ROOT("switches a child to uid 65534");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const fs::path sticky = tmp / "sticky";  // a /run/lock look-alike, owned by root
  REQUIRE(::mkdir(sticky.c_str(), 0755) == 0);
  REQUIRE(::chmod(sticky.c_str(), 01777) == 0);
  const fs::path lock = sticky / "app.lock";
  const std::string generation = "forged-generation";

  Children children;
  // uid 65534 forges the marker: it knows the generation (the default one is the master's
  // pid and start time, readable by anyone).
  const pid_t forger = children.spawn([&] {
    if (!become(nobody)) return 10;
    spit(marker_of(lock), generation + "\n");
    return 0;
  });
  REQUIRE(wait_or_kill(children, forger) == 0);
  struct stat planted {};
  REQUIRE(::lstat(marker_of(lock).c_str(), &planted) == 0);
  REQUIRE(planted.st_uid == nobody);

  for (const WaitMode mode : {WaitMode::polled}) {
    wltest::Shared<WorkerBoard> board;
    const pid_t worker = children.spawn([&] {
      Coordinator coordinator(lock, options_for(mode, *board, generation));
      count_callbacks(coordinator, *board);
      coordinator.start();
      board->role_after_start.store(static_cast<int>(coordinator.role()));
      run_for(coordinator, mode, 100ms);
      board->stop_ms.store(stop_and_time(coordinator));
      return 0;
    });
    const int code = wait_or_kill(children, worker);
    INFO("exit code " << code << ", first error: " << board->first_error);
    CHECK(code == 0);
    // Neither skipped silently nor run: the forged marker is an error, and the worker
    // stays out of the primary role while it is there.
    CHECK(board->startup_runs.load() == 0);
    CHECK(board->promotions.load() == 0);
    CHECK(board->role_after_start.load() == static_cast<int>(Role::secondary));
    CHECK_THAT(std::string(board->first_error), Contains("belongs to another user"));
    CHECK_THAT(std::string(board->first_error), Contains(marker_of(lock).native()));
    CHECK(board->stop_ms.load() < 1000);
  }

  // The barrier API says the same; Options::allow_foreign_owner accepts the risk.
  wltest::Shared<std::atomic<int>> api;
  const pid_t reader = children.spawn([&] {
    std::error_code ec;
    if (StartupBarrier(lock, generation).completed(ec) || ec != std::errc::operation_not_permitted)
      return 10;
    if (!StartupBarrier(lock, generation, true).completed(ec) || ec) return 11;
    WorkerBoard board;
    CoordinatorOptions options = options_for(WaitMode::polled, board, generation);
    options.lock.allow_foreign_owner = true;
    Coordinator coordinator(lock, options);
    count_callbacks(coordinator, board);
    coordinator.start();
    api->store(1);
    if (board.promotions.load() != 1 || board.startup_runs.load() != 0) return 12;
    coordinator.stop();
    return 0;
  });
  CHECK(wait_or_kill(children, reader) == 0);
  CHECK(api->load() == 1);
}

TEST_CASE(
    "startup barrier: complete() writes through an unpredictable exclusive temporary name, "
    "whatever is planted at a predictable one",
    "[startup_barrier][security]") {
  wltest::TempDir dir;
  const fs::path lock = dir / "app.lock";
  const fs::path victim = dir / "victim";
  spit(victim, "precious\n");
  struct Board {
    char created[8][256] = {};
    std::atomic<int> count{0};
    char planted[256] = {};
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    const int watch = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (watch < 0 || ::inotify_add_watch(watch, dir.path().c_str(), IN_CREATE) < 0) return 10;
    // The attacker knows this worker's pid: it plants a symbolic link at every name a
    // pid-based scheme could use.
    const std::string predictable = fmt::format("{}.{}.tmp", marker_of(lock).native(), ::getpid());
    std::snprintf(board->planted, sizeof board->planted, "%s",
                  fs::path(predictable).filename().c_str());
    if (::symlink(victim.c_str(), predictable.c_str()) != 0) return 11;
    for (int i = 0; i < 3; ++i) {
      StartupBarrier(lock, fmt::format("generation-{}", i)).complete();
      if (!StartupBarrier(lock, fmt::format("generation-{}", i)).completed()) return 12;
    }
    alignas(struct inotify_event) char events[8192];
    const auto got = ::read(watch, events, sizeof events);
    if (got <= 0) return 13;
    for (char* at = events; at < events + got;) {
      const auto* event = reinterpret_cast<const struct inotify_event*>(at);
      const int index = board->count.fetch_add(1);
      if (event->len > 0 && index < 8)
        std::snprintf(board->created[index], sizeof board->created[index], "%s", event->name);
      at += sizeof(struct inotify_event) + event->len;
    }
    ::close(watch);
    return 0;
  });
  const int code = wait_or_kill(children, child);
  INFO("exit code " << code);
  REQUIRE(code == 0);
  std::set<std::string> temporaries;
  for (int i = 0; i < std::min(board->count.load(), 8); ++i) {
    const std::string name = board->created[i];
    if (name == board->planted) continue;  // the planted link itself
    INFO("created: " << name);
    CHECK(name.rfind("app.lock.startup.tmp.", 0) == 0);
    CHECK(name.size() == std::string("app.lock.startup.tmp.").size() + 16);
    temporaries.insert(name);
  }
  CHECK(temporaries.size() == 3);  // a new name each time
  CHECK(slurp(victim) == "precious\n");
  CHECK(fs::is_symlink(dir / board->planted));
  CHECK(slurp(marker_of(lock)) == "generation-2\n");
  // Nothing left behind but the lock's marker, the planted link and the victim.
  int entries = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    INFO("entry: " << entry.path());
    ++entries;
  }
  CHECK(entries == 3);
}

TEST_CASE(
    "startup barrier: wait_for_startup() under a 50 microsecond signal storm ends at its "
    "deadline",
    "[startup_barrier]") {
  wltest::TempDir dir;
  const fs::path lock = dir / "storm.lock";
  struct Board {
    std::atomic<long> barrier_ms{-1};
    std::atomic<long> coordinator_ms{-1};
    std::atomic<int> results{-1};
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    struct sigaction action {};
    action.sa_handler = [](int) {};
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: every sleep is interrupted
    if (::sigaction(SIGALRM, &action, nullptr) != 0) return 10;
    struct itimerval storm {};
    storm.it_interval.tv_usec = 50;
    storm.it_value.tv_usec = 50;
    if (::setitimer(ITIMER_REAL, &storm, nullptr) != 0) return 11;
    const auto time_ms = [](auto&& wait) {
      const auto before = std::chrono::steady_clock::now();
      const bool result = wait();
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now() - before)
                          .count();
      return std::make_pair(result, static_cast<long>(ms));
    };
    const auto [barrier_done, barrier_ms] =
        time_ms([&] { return StartupBarrier(lock, "storm").wait_for(300ms); });
    board->barrier_ms.store(barrier_ms);
    CoordinatorOptions options;
    options.lock.log = nullptr;
    options.startup_generation = "storm";
    Coordinator coordinator(lock, options);  // not started: no thread, a plain waiter
    const auto [coordinator_done, coordinator_ms] =
        time_ms([&] { return coordinator.wait_for_startup(300ms); });
    board->coordinator_ms.store(coordinator_ms);
    board->results.store((barrier_done ? 1 : 0) + (coordinator_done ? 2 : 0));
    return 0;
  });
  const int code = wait_or_kill(children, child);
  INFO("exit code " << code << " (-1: still waiting after 10 s, killed)");
  REQUIRE(code == 0);
  CHECK(board->results.load() == 0);  // nobody completed: both report false
  CHECK(board->barrier_ms.load() >= 299);
  CHECK(board->barrier_ms.load() < 5000);
  CHECK(board->coordinator_ms.load() >= 299);
  CHECK(board->coordinator_ms.load() < 5000);
}

TEST_CASE(
    "startup barrier: EMFILE while reading the marker at promotion never re-runs completed "
    "tasks",
    "[startup_barrier][faults]") {
  wltest::TempDir dir;
  const fs::path lock = dir / "emfile.lock";
  const std::string generation = "emfile-test";
  StartupBarrier(lock, generation).complete();  // a primary completed the tasks earlier
  wltest::Shared<WorkerBoard> board;
  wltest::Shared<WorkerBoard> successor;
  Children children;
  // The kernel fails the marker's open with EMFILE (only read-only O_NOFOLLOW opens, which
  // only the marker's read uses): the worker must step down, not take it for "not completed".
  const pid_t faulty = children.spawn([&]() -> int {
    Coordinator coordinator(lock, options_for(WaitMode::polled, *board, generation));
    count_callbacks(coordinator, *board);
    if (!fail_read_only_nofollow_opens(EMFILE)) return 10;
    board->step.store(1);
    coordinator.start();
    board->step.store(2);
    board->role_after_start.store(static_cast<int>(coordinator.role()));
    run_for(coordinator, WaitMode::polled, 100ms);  // retries, each still EMFILE
    board->stop_ms.store(stop_and_time(coordinator));
    return coordinator.role() == Role::secondary ? 0 : 11;
  });
  const int code = wait_or_kill(children, faulty);
  INFO("exit code " << code << " (-1: hung), step " << board->step.load()
                    << ", first error: " << board->first_error);
  CHECK(code == 0);
  CHECK(board->startup_runs.load() == 0);  // the tasks had completed: never again
  CHECK(board->promotions.load() == 0);
  CHECK(board->role_after_start.load() != -1);
  CHECK(board->errors.load() >= 2);  // it retried, and said so each time
  CHECK_THAT(std::string(board->first_error), Contains(marker_of(lock).native()));
  CHECK_THAT(std::string(board->first_error), Contains("read startup marker"));
  CHECK_THAT(std::string(board->first_error), Contains("EMFILE"));
  CHECK(board->stop_ms.load() >= 0);
  CHECK(board->stop_ms.load() < 1000);
  CHECK(slurp(marker_of(lock)) == generation + "\n");

  // Without the fault, the next worker reads the marker and skips the tasks.
  const pid_t next = children.spawn([&]() -> int {
    Coordinator coordinator(lock, options_for(WaitMode::polled, *successor, generation));
    count_callbacks(coordinator, *successor);
    coordinator.start();
    coordinator.stop();
    return 0;
  });
  CHECK(wait_or_kill(children, next) == 0);
  CHECK(successor->promotions.load() == 1);
  CHECK(successor->startup_runs.load() == 0);
  CHECK(successor->errors.load() == 0);
}

TEST_CASE(
    "startup barrier: the default generation is read by start() in the worker, so a new master "
    "runs the tasks again even with a Coordinator built in the master",
    "[startup_barrier]") {
  wltest::TempDir dir;
  const fs::path lock = dir / "masters.lock";
  struct Board {
    std::atomic<int> startup_runs{0};
    std::atomic<int> promotions{0};
    std::atomic<int> completed_waits{0};
  };
  wltest::Shared<Board> board;
  Children children;
  // A master builds its Coordinator (a global, say), then forks two workers, one after the
  // other, each of which starts the copy it inherited.
  const auto master = [&] {
    return children.spawn([&] {
      CoordinatorOptions options;
      options.wait = WaitMode::polled;
      options.lock.log = nullptr;
      Coordinator coordinator(lock, options);
      coordinator.on_startup([&] { board->startup_runs.fetch_add(1); });
      coordinator.on_promoted([&] { board->promotions.fetch_add(1); });
      Children workers;
      for (int i = 0; i < 2; ++i) {
        const pid_t worker = workers.spawn([&] {
          coordinator.start();
          if (coordinator.role() != Role::primary) return 20;
          if (coordinator.wait_for_startup(5s)) board->completed_waits.fetch_add(1);
          coordinator.stop();
          return 0;
        });
        if (wait_or_kill(workers, worker) != 0) return 10 + i;
      }
      return 0;
    });
  };
  CHECK(wait_or_kill(children, master()) == 0);
  CHECK(board->startup_runs.load() == 1);  // the second worker of the master skipped them
  CHECK(wait_or_kill(children, master()) == 0);
  CHECK(board->startup_runs.load() == 2);  // a restarted server runs them again
  CHECK(board->promotions.load() == 4);
  CHECK(board->completed_waits.load() == 4);
}

TEST_CASE(
    "startup barrier: a generation or a lock file name too long for the marker is refused at "
    "construction and the longest allowed ones work",
    "[startup_barrier]") {
  wltest::TempDir dir;
  struct Board {
    std::atomic<int> startup_runs{0};
    char what[6][512] = {};
  };
  wltest::Shared<Board> board;
  Children children;
  const std::string longest_generation(StartupBarrier::max_generation_size, 'g');
  // NAME_MAX 255 = name + ".startup" (8) + ".tmp." and 16 hex digits (21).
  const fs::path longest_lock = dir / std::string(226, 'n');
  const fs::path too_long_lock = dir / std::string(227, 'n');
  const fs::path lock = dir / "limits.lock";

  // Refusals, each a lock_error naming the field.
  const pid_t refuser = children.spawn([&] {
    const auto refused = [&](int index, auto&& construct) {
      try {
        construct();
      } catch (const lock_error& error) {
        std::snprintf(board->what[index], sizeof board->what[index], "%s", error.what());
        return true;
      }
      return false;
    };
    CoordinatorOptions options;
    options.lock.log = nullptr;
    options.startup_generation = longest_generation + "g";
    if (!refused(0, [&] { Coordinator c(lock, options); })) return 10;
    if (!refused(1, [&] { StartupBarrier b(lock, longest_generation + "g"); })) return 11;
    options.startup_generation = "two\nlines";
    if (!refused(2, [&] { Coordinator c(lock, options); })) return 12;
    options.startup_generation = std::string("nul\0byte", 8);
    if (!refused(3, [&] { Coordinator c(lock, options); })) return 13;
    options.startup_generation.clear();
    if (!refused(4, [&] { Coordinator c(too_long_lock, options); })) return 14;
    if (!refused(5, [&] { StartupBarrier b(too_long_lock, "g"); })) return 15;
    return 0;
  });
  REQUIRE(wait_or_kill(children, refuser) == 0);
  CHECK_THAT(std::string(board->what[0]), Contains("startup_generation is longer than 256 bytes"));
  CHECK_THAT(std::string(board->what[1]), Contains("startup_generation is longer than 256 bytes"));
  CHECK_THAT(std::string(board->what[2]), Contains("newline"));
  CHECK_THAT(std::string(board->what[3]), Contains("NUL"));
  CHECK_THAT(std::string(board->what[4]), Contains("too long for its startup marker"));
  CHECK_THAT(std::string(board->what[5]), Contains("too long for its startup marker"));

  // The longest generation on the longest lock name: the first primary runs the tasks,
  // its successor (another process) finds them complete.
  for (int i = 0; i < 2; ++i) {
    const pid_t worker = children.spawn([&] {
      CoordinatorOptions options;
      options.wait = WaitMode::polled;
      options.lock.log = nullptr;
      options.startup_generation = longest_generation;
      Coordinator coordinator(longest_lock, options);
      coordinator.on_startup([&] { board->startup_runs.fetch_add(1); });
      coordinator.start();
      if (coordinator.role() != Role::primary) return 20;
      if (!coordinator.wait_for_startup(5s)) return 21;
      coordinator.stop();
      return 0;
    });
    CHECK(wait_or_kill(children, worker) == 0);
  }
  CHECK(board->startup_runs.load() == 1);
  CHECK(slurp(marker_of(longest_lock)) == longest_generation + "\n");
}
