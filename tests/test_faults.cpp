// tests/test_faults.cpp: system-call failures injected with seccomp (EIO, ENOLCK, EMFILE, thread
// creation). Helpers live in tests/support/; every test forks real processes where it needs more
// than one.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
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
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <boost/interprocess/sync/file_lock.hpp>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/barrier_lab.hpp"
#include "support/coordinator_lab.hpp"
#include "support/file_lab.hpp"
#include "support/fixtures.hpp"
#include "support/lifecycle_lab.hpp"

using namespace wltest;
using namespace wltest::file_lab;
using namespace wltest::coordinator_lab;
using namespace wltest::lifecycle_lab;
using namespace wltest::barrier_lab;

TEST_CASE("faults: descriptor exhaustion is reported as EMFILE, and the next try succeeds",
          "[bad-input]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  REQUIRE(write_file(path, ""));

  struct Result {
    Refusal refusal;
    Attempt holder;
    int opened = 0;
    bool primary_after_closing = false;
  };
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Result> r;
    const int code = run_child([&] {
      // UBSan's vptr check probes memory through a pipe, which it cannot create once the
      // descriptors are gone: let it meet the types of the error paths first (it caches them).
      {
        Refusal warm_up;
        attempt_into(warm_up, tmp / "missing" / "primary.lock", quiet(m));
        Attempt warm_up_holder;
        attempt_holder_into(warm_up_holder, tmp.path());
      }
      const rlimit limit{64, 64};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) return 10;
      std::vector<int> fds;
      fds.reserve(64);
      for (;;) {
        const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
          if (errno != EMFILE) return 11;
          break;
        }
        fds.push_back(fd);
        if (fds.size() > 64) return 12;
      }
      r->opened = static_cast<int>(fds.size());
      if (fds.empty()) return 13;  // cannot show the recovery below
      attempt_into(r->refusal, path, quiet(m));
      attempt_holder_into(r->holder, path);
      for (const int fd : fds) ::close(fd);
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      r->primary_after_closing = election.role == Role::primary;
      return 0;
    });
    INFO("descriptors opened to reach the limit: " << r->opened);
    REQUIRE(code == 0);
    check_refused(r->refusal, path, std::errc::too_many_files_open, {"no file descriptor left"});
    check_attempt(r->holder, "lock_holder", path, std::errc::too_many_files_open,
                  "inspect lock file", {"/proc/locks"});
    CHECK(r->primary_after_closing);
  }
}

TEST_CASE(
    "faults: ENOLCK from the kernel's lock call is an error naming the path and the lock "
    "manager, never a primary, and the file is untouched",
    "[bad-input][faults]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  const std::string before = earlier_holders_record;
  REQUIRE(write_file(path, before));
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Refusal> r;
    const int code = run_child([&] {
      if (!fail_lock_calls(m, ENOLCK)) return 20;
      attempt_into(*r, path, quiet(m));
      return 0;
    });
    REQUIRE(code == 0);
    for (const auto* a : {&r->elect, &r->try_lock}) {
      check_attempt(*a, a == &r->elect ? "is_primary_worker" : "WorkerLock::try_lock", path,
                    std::errc::no_lock_available, "lock", {"lock manager"});
    }
    CHECK(read_file(path) == before);
    CHECK_FALSE(workerlock::lock_holder(path).has_value());
  }
}

TEST_CASE(
    "faults: EIO writing the holder record is reported, the lock is let go at once and "
    "the file keeps its old content",
    "[bad-input][faults]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  const std::string before = earlier_holders_record;
  REQUIRE(write_file(path, before));
  struct Result {
    Refusal refusal;
    Handshake hs;
  };
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    REQUIRE(write_file(path, before));  // the previous round's `other` wrote its record
    wltest::Shared<Result> r;
    Child child([&] {
      if (!wltest::fail_syscall(SCMP_SYS(pwrite64), EIO)) return 20;
      attempt_into(r->refusal, path, quiet(m));
      r->hs.state = 1;
      wait_for_release(r->hs);  // alive: a lock it kept would still be held
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return r->hs.state.load() != 0; }, std::chrono::seconds(10)));
    check_attempt(r->refusal.elect, "is_primary_worker", path, std::errc::io_error,
                  "write holder record to", {});
    check_attempt(r->refusal.try_lock, "WorkerLock::try_lock", path, std::errc::io_error,
                  "write holder record to", {});
    // The failing worker still runs, and holds nothing: anybody else can be primary.
    CHECK_FALSE(workerlock::lock_holder(path).has_value());
    CHECK(read_file(path) == before);
    {
      WorkerLock other(path, quiet(m));
      CHECK(other.try_lock());
    }
    r->hs.release = true;
    CHECK(child.wait() == 0);
  }
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "faults: a worker whose holder record cannot be written (EIO) logs it, retries with "
    "backoff, is never promoted, and keeps nobody else out",
    "[coordinator]") {
  INFO("mode " << mode_name(mode));
  wltest::TempDir dir;
  const auto path = dir / "eio.lock";
  wltest::Shared<TroubleBoard> board;
  Children children;

  // The primary: a plain lock, held until told.
  const pid_t primary = spawn_plain_primary(children, *board, path);

  // A standby whose disk then starts failing: from the moment start() has returned, every
  // pwrite() of its process fails with EIO (a seccomp filter: the kernel refuses the real
  // call, and the library's own error path runs). Then the primary leaves.
  const auto options = quick_retry_options(mode);
  const pid_t faulty = children.spawn([&] {
    return trouble_worker(*board, path, options,
                          [] { return wltest::fail_syscall(SCMP_SYS(pwrite64), EIO); });
  });
  REQUIRE(wltest::eventually([&] { return board->role.load() == kSecondary; }, 5s));
  board->holder_release.store(true);
  REQUIRE(children.wait(primary, 10s) == 0);
  REQUIRE(wltest::eventually([&] { return board->warnings.load() >= 3; }, 5s));
  const std::string warning = board->first_warning;
  INFO("first warning: " << warning);
  CHECK(warning.find(path.string()) != std::string::npos);
  CHECK(warning.find("write holder record") != std::string::npos);
  CHECK(warning.find("Input/output error") != std::string::npos);
  CHECK(warning.find("retrying in") != std::string::npos);
  CHECK(board->promotions.load() == 0);
  CHECK(board->role.load() == kSecondary);

  // Between its attempts it holds nothing: another worker becomes primary (here the test
  // process itself, which can write its record), and the faulty one keeps trying, quietly
  // waiting while the lock is held.
  workerlock::WorkerLock healthy(path, workerlock::Options{}.silent());
  REQUIRE(wltest::eventually([&] { return healthy.try_lock(); }, 2s));
  CHECK(workerlock::lock_holder(path).value_or(workerlock::Holder{}).pid == ::getpid());
  std::this_thread::sleep_for(200ms);
  CHECK(board->promotions.load() == 0);
  healthy.unlock();
  const int warnings_before = board->warnings.load();
  REQUIRE(wltest::eventually([&] { return board->warnings.load() > warnings_before; }, 5s));
  CHECK(board->promotions.load() == 0);
  board->exit.store(true);
  CHECK(children.wait(faulty, 10s) == 0);
  CHECK(board->demotions.load() == 0);
}

TEST_CASE(
    "faults: start() that cannot create its thread throws lock_error, stays "
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
  REQUIRE(children.wait(worker, 20s) == 0);
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

TEST_CASE(
    "faults: EMFILE while reading the marker at promotion never re-runs completed "
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
  const int code = children.wait(faulty, kWatchdog);
  INFO("exit code " << code << " (-2: hung, killed), step " << board->step.load()
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
  CHECK(board->stop_ms.load() < 3000);  // stop() returned, not hung
  CHECK(slurp(marker_of(lock)) == generation + "\n");

  // Without the fault, the next worker reads the marker and skips the tasks.
  const pid_t next = children.spawn([&]() -> int {
    Coordinator coordinator(lock, options_for(WaitMode::polled, *successor, generation));
    count_callbacks(coordinator, *successor);
    coordinator.start();
    coordinator.stop();
    return 0;
  });
  CHECK(children.wait(next, kWatchdog) == 0);
  CHECK(successor->promotions.load() == 1);
  CHECK(successor->startup_runs.load() == 0);
  CHECK(successor->errors.load() == 0);
}
