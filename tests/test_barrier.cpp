// tests/test_barrier.cpp: StartupBarrier and wait_for_startup(): markers, generations, errors.
// Helpers live in tests/support/; every test forks real processes where it needs more than one.
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/barrier_lab.hpp"
#include "support/coordinator_lab.hpp"
#include "support/fixtures.hpp"

using namespace wltest;
using namespace wltest::coordinator_lab;
using namespace wltest::barrier_lab;

//! EachWaitModeHarness whose plan runs the startup tasks and waits up to 10 s for them.
struct StartupWaiters : EachWaitModeHarness {
  StartupWaiters() { plan = startup_plan(mode, 10s); }

  //! Whether worker `id` has begun wait_for_startup().
  bool waiting(int id) { return h.slot(id).wait_began_ns.load() != 0; }

  //! Starts a plain lock holder, `blocker`, and two workers, `a` and `b`, that it keeps
  //! standby; returns once both have begun wait_for_startup().
  void start_two_waiting_behind_a_blocker() {
    blocker = spawn_blocker(h);
    a = h.spawn(plan);
    b = h.spawn(plan);
    REQUIRE(wltest::eventually([&] { return waiting(a) && waiting(b); }));
  }

  int blocker = -1;
  int a = -1;
  int b = -1;
};

TEST_CASE_METHOD(StartupWaiters,
                 "startup barrier: with secondaries started before and during and after the tasks",
                 "[coordinator][startup]") {
  INFO("mode " << mode_name(mode));

  // Before: a plain lock holder keeps both workers standby while they start waiting.
  start_two_waiting_behind_a_blocker();
  std::this_thread::sleep_for(100ms);
  CHECK(cl.task_runs.load() == 0);
  CHECK(h.slot(a).wait_result.load() == -1);
  CHECK(h.slot(b).wait_result.load() == -1);
  REQUIRE(h.exit_worker(blocker) == 0);
  REQUIRE(wltest::eventually([&] { return cl.task_runs.load() == 1; }, 5s));

  // During: the task of the new primary is blocked.
  const int c = h.spawn(plan);
  REQUIRE(wltest::eventually([&] { return waiting(c); }));
  std::this_thread::sleep_for(150ms);
  for (const int id : {a, b, c}) CHECK(h.slot(id).wait_result.load() == -1);
  CHECK(cl.check.promotions.load() == 0);  // on_promoted runs after the tasks
  CHECK(cl.task_completions.load() == 0);

  cl.let_first_task_finish.store(true);
  REQUIRE(wltest::eventually(
      [&] {
        return h.slot(a).wait_result.load() != -1 && h.slot(b).wait_result.load() != -1 &&
               h.slot(c).wait_result.load() != -1;
      },
      5s));
  const std::int64_t done_ns = cl.task_done_ns.load();
  for (const int id : {a, b, c}) {
    INFO("waiter " << id);
    CHECK(h.slot(id).wait_result.load() == 1);
    CHECK(h.slot(id).wait_returned_ns.load() >= done_ns);
  }
  REQUIRE(wltest::eventually([&] { return cl.check.promotions.load() == 1; }));

  // After: returns true at once.
  const int d = h.spawn(plan);
  REQUIRE(wltest::eventually([&] { return h.slot(d).wait_result.load() != -1; }, 5s));
  CHECK(h.slot(d).wait_result.load() == 1);
  const double after_ms =
      ms_between(h.slot(d).wait_began_ns.load(), h.slot(d).wait_returned_ns.load());
  report(
      fmt::format("startup barrier {}: wait_for_startup() after completion returned in {:.3f} ms",
                  mode_name(mode), after_ms));
  CHECK(after_ms < 1000.0);  // at once, not after the 10 s timeout

  // Nobody runs the tasks again, not even the next primary after a handover.
  const int runner = h.holder_slot();
  REQUIRE(runner >= 0);
  REQUIRE(h.command(runner, Cmd::stop));
  REQUIRE(wltest::eventually([&] { return cl.check.promotions.load() == 2; }, 5s));
  std::this_thread::sleep_for(100ms);
  CHECK(cl.task_runs.load() == 1);
  CHECK(cl.task_completions.load() == 1);
  CHECK(workerlock::StartupBarrier(h.path(), h.generation()).completed());
  CHECK_FALSE(workerlock::StartupBarrier(h.path(), h.generation() + "-next").completed());
  CHECK(cl.check.violations.load() == 0);
  for (const int id : {a, b, c, d}) CHECK(h.exit_worker(id) == 0);
}

TEST_CASE_METHOD(StartupWaiters, "startup barrier: when the primary is SIGKILLed mid-task",
                 "[coordinator][startup]") {
  INFO("mode " << mode_name(mode));

  start_two_waiting_behind_a_blocker();
  REQUIRE(h.exit_worker(blocker) == 0);
  REQUIRE(wltest::eventually([&] { return cl.task_runs.load() == 1; }, 5s));
  const int c = h.spawn(plan);
  REQUIRE(wltest::eventually([&] { return waiting(c); }));
  std::this_thread::sleep_for(100ms);

  const pid_t first_runner = cl.task_runner[0].load();
  int victim = -1;
  for (const int id : {a, b}) {
    if (h.pid(id) == first_runner) victim = id;
  }
  REQUIRE(victim >= 0);
  for (const int id : {a, b, c}) CHECK(h.slot(id).wait_result.load() == -1);
  cl.check.killed.store(first_runner);
  REQUIRE(::kill(first_runner, SIGKILL) == 0);
  REQUIRE(h.wait_exit(victim) == 128 + SIGKILL);

  REQUIRE(wltest::eventually([&] { return cl.task_completions.load() == 1; }, 5s));
  std::vector<int> survivors;
  for (const int id : {a, b, c})
    if (id != victim) survivors.push_back(id);
  REQUIRE(wltest::eventually(
      [&] {
        return std::all_of(survivors.begin(), survivors.end(),
                           [&](int id) { return h.slot(id).wait_result.load() != -1; });
      },
      5s));
  for (const int id : survivors) {
    INFO("waiter " << id);
    CHECK(h.slot(id).wait_result.load() == 1);
    CHECK(h.slot(id).wait_returned_ns.load() >= cl.task_done_ns.load());
  }
  REQUIRE(wltest::eventually([&] { return cl.check.promotions.load() == 1; }, 5s));
  std::this_thread::sleep_for(100ms);
  CHECK(cl.task_runs.load() == 2);
  CHECK(cl.task_completions.load() == 1);
  CHECK(cl.task_runner[1].load() != first_runner);
  CHECK(cl.check.holder.load() == cl.task_runner[1].load());
  CHECK(cl.check.violations.load() == 0);
  for (const int id : survivors) CHECK(h.exit_worker(id) == 0);
}

TEST_CASE_METHOD(
    EachWaitModeHarness,
    "startup barrier: wait_for_startup() returns false after about the timeout if no primary "
    "completes",
    "[coordinator][startup]") {
  INFO("mode " << mode_name(mode));
  const int stuck = h.spawn(startup_plan(mode, 0ms));  // primary, its task never finishes
  REQUIRE(wltest::eventually([&] { return cl.task_runs.load() == 1; }, 5s));
  const int waiter = h.spawn(startup_plan(mode, 300ms));
  REQUIRE(wltest::eventually([&] { return h.slot(waiter).wait_result.load() != -1; }, 10s));
  CHECK(h.slot(waiter).wait_result.load() == 0);
  const double waited_ms =
      ms_between(h.slot(waiter).wait_began_ns.load(), h.slot(waiter).wait_returned_ns.load());
  report(fmt::format("startup barrier {}: wait_for_startup(300 ms) returned false after {:.1f} ms",
                     mode_name(mode), waited_ms));
  CHECK(waited_ms >= 295.0);
  CHECK(waited_ms < 3000.0);  // the 300 ms timeout, not the stuck primary (never)
  CHECK(cl.task_runs.load() == 1);
  CHECK(cl.task_completions.load() == 0);
  cl.let_first_task_finish.store(true);
  REQUIRE(wltest::eventually([&] { return cl.task_completions.load() == 1; }, 5s));
  CHECK(h.exit_worker(waiter) == 0);
  CHECK(h.exit_worker(stuck) == 0);
}

TEST_CASE(
    "startup barrier: the default startup generation is the master's pid and start time, stable "
    "while the master's memory changes",
    "[coordinator][startup]") {
  wltest::Shared<GenerationBoard> board;
  wltest::TempDir dir;
  const auto path = dir / "generation.lock";
  const std::string expected = fmt::format("master={}:{}", ::getpid(), own_start_time());
  REQUIRE(expected != fmt::format("master={}:0", ::getpid()));

  // A worker with the default generation runs the startup tasks once and completes them.
  Children children;
  const auto worker = [&](int index) {
    return children.spawn([&, index] {
      const auto generation = workerlock::StartupBarrier::master_generation();
      std::snprintf(board->generation[index], sizeof board->generation[index], "%s",
                    generation.c_str());
      CoordinatorOptions options;
      options.lock.log = nullptr;
      Coordinator coordinator(path, options);
      coordinator.on_startup([&] { board->startup_runs.fetch_add(1); });
      coordinator.on_promoted([&] { board->primaries.fetch_add(1); });
      coordinator.start();
      if (coordinator.role() != Role::primary) return 2;
      return coordinator.wait_for_startup(5s) ? 0 : 3;
    });
  };
  REQUIRE(children.wait(worker(0), 10s) == 0);
  // The master grows by 512 MiB of address space (its vsize, field 23, changes) between the
  // first worker and its replacement: the generation must not.
  void* grown = ::mmap(nullptr, 512u << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(grown != MAP_FAILED);
  const int replacement = children.wait(worker(1), 10s);
  ::munmap(grown, 512u << 20);
  REQUIRE(replacement == 0);

  CHECK(std::string(board->generation[0]) == expected);
  CHECK(std::string(board->generation[1]) == expected);
  CHECK(board->primaries.load() == 2);
  CHECK(board->startup_runs.load() == 1);  // the replacement found the tasks complete
}

TEST_CASE("startup barrier: /proc/PID/stat start time survives spaces and parentheses in the name",
          "[coordinator][startup]") {
  using workerlock::detail::proc_stat_start_time;
  std::string line = "4242 (a b) c)) S";
  for (int field = 4; field <= 21; ++field) line += fmt::format(" {}", field * 10);
  line += " 987654 123456789 33";  // 22 starttime, 23 vsize, 24 rss
  CHECK(proc_stat_start_time(line) == std::optional<std::string>("987654"));
  CHECK_FALSE(proc_stat_start_time("4242 (name) S 1 2").has_value());
  CHECK_FALSE(proc_stat_start_time("no parenthesis").has_value());
}

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
  const int code = children.wait(worker, kWatchdog);
  INFO("exit code " << code << " (-2: hung, killed), first error: " << board->first_error);
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
  const int code = children.wait(child, kWatchdog);
  INFO("exit code " << code << " (-2: hung, killed), step " << board->step.load());
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
  REQUIRE(children.wait(forger, kWatchdog) == 0);
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
    const int code = children.wait(worker, kWatchdog);
    INFO("exit code " << code << ", first error: " << board->first_error);
    CHECK(code == 0);
    // Neither skipped silently nor run: the forged marker is an error, and the worker
    // stays out of the primary role while it is there.
    CHECK(board->startup_runs.load() == 0);
    CHECK(board->promotions.load() == 0);
    CHECK(board->role_after_start.load() == static_cast<int>(Role::secondary));
    CHECK_THAT(std::string(board->first_error), Contains("belongs to another user"));
    CHECK_THAT(std::string(board->first_error), Contains(marker_of(lock).native()));
    CHECK(board->stop_ms.load() < 3000);  // stop() returned, not hung
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
  CHECK(children.wait(reader, kWatchdog) == 0);
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
  const int code = children.wait(child, kWatchdog);
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
  const int code = children.wait(child, kWatchdog);
  INFO("exit code " << code << " (-2: still waiting after 10 s, killed)");
  REQUIRE(code == 0);
  CHECK(board->results.load() == 0);  // nobody completed: both report false
  CHECK(board->barrier_ms.load() >= 299);
  CHECK(board->barrier_ms.load() < 5000);
  CHECK(board->coordinator_ms.load() >= 299);
  CHECK(board->coordinator_ms.load() < 5000);
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
        if (workers.wait(worker, kWatchdog) != 0) return 10 + i;
      }
      return 0;
    });
  };
  CHECK(children.wait(master(), kWatchdog) == 0);
  CHECK(board->startup_runs.load() == 1);  // the second worker of the master skipped them
  CHECK(children.wait(master(), kWatchdog) == 0);
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
  REQUIRE(children.wait(refuser, kWatchdog) == 0);
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
    CHECK(children.wait(worker, kWatchdog) == 0);
  }
  CHECK(board->startup_runs.load() == 1);
  CHECK(slurp(marker_of(longest_lock)) == longest_generation + "\n");
}
