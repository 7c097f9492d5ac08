// tests/test_fork.cpp: fork safety: forked, exec'd, raw-forked and signalled copies of holders and
// Coordinators. Helpers live in tests/support/; every test forks real processes where it needs more
// than one.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
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

#include "support/contract_lab.hpp"
#include "support/fixtures.hpp"
#include "support/fork_lab.hpp"
#include "support/lifecycle_lab.hpp"

using namespace wltest;
using namespace wltest::contract_lab;
using namespace wltest::lifecycle_lab;
using namespace wltest::fork_lab;

TEST_CASE_METHOD(wltest::EachMechanism,
                 "fork: a copy made by syscall(SYS_fork) reads secondary and cannot release or "
                 "remove the original's lock",
                 "[contract][raw_fork]") {
  const std::string operation = GENERATE(as<std::string>{}, "read", "unlock", "unlock(ec)",
                                         "unlock_and_remove", "unlock_and_remove(ec)", "destroy",
                                         "move-assign", "try_lock", "try_lock_for", "lock_for ec");
  INFO("mechanism=" << workerlock::to_string(mechanism) << " operation=" << operation);
  std::optional<workerlock::Election> election;
  election.emplace(workerlock::is_primary_worker(path, quiet(mechanism)));
  REQUIRE(election->role == Role::primary);
  REQUIRE(election->lock.owns_lock());
  const pid_t parent = ::getpid();

  const pid_t copy = wltest::raw_fork();
  REQUIRE(copy >= 0);
  if (copy == 0) {
    wltest::tsan_ignore_this_copy();
    // The first failure is the exit code, but the operation runs all the same, so that the
    // parent's checks show what it did to the original's lock.
    int failed = 0;
    const auto fail = [&](int code) {
      if (failed == 0) failed = code;
    };
    if (::getpid() == parent) wltest::copy_exit(9);
    auto& e = *election;
    if (e.role != Role::secondary) fail(10);  // the cached pid read primary here
    if (e.role.get() != Role::secondary) fail(11);
    if (!e.role.inherited_across_fork()) fail(12);
    if (e.lock.owns_lock()) fail(13);
    if (!e.lock.inherited_across_fork()) fail(14);
    std::error_code ec;
    if (operation == "unlock") {
      e.lock.unlock();
    } else if (operation == "unlock(ec)") {
      e.lock.unlock(ec);
      if (ec) fail(20);
    } else if (operation == "unlock_and_remove") {
      try {
        e.lock.unlock_and_remove();
        fail(21);  // it held nothing here: an error is due
      } catch (const workerlock::lock_error& error) {
        if (error.code() != workerlock::errc::not_held) fail(22);
      }
    } else if (operation == "unlock_and_remove(ec)") {
      e.lock.unlock_and_remove(ec);
      if (ec != workerlock::errc::not_held) fail(23);
    } else if (operation == "destroy") {
      election.reset();
    } else if (operation == "move-assign") {
      WorkerLock other(path, quiet(mechanism));
      other = std::move(e.lock);
      if (other.owns_lock()) fail(24);
    } else if (operation == "try_lock") {
      // A fresh attempt from this process: the original holds the lock, so it fails.
      if (e.lock.try_lock()) fail(25);
    } else if (operation == "try_lock_for") {
      if (e.lock.try_lock_for(20ms)) fail(26);
    } else if (operation == "lock_for ec") {
      if (e.lock.try_lock_for(20ms, ec) || ec) fail(27);
    }
    if (election && election->lock.owns_lock()) fail(28);
    election.reset();
    wltest::copy_exit(failed);
  }
  const int code = wltest::wait_or_kill(copy, 60s);
  CHECK(code == 0);
  // The original still holds its lock, on the file still at the path.
  CHECK(election->role == Role::primary);
  CHECK(election->lock.owns_lock());
  CHECK(std::filesystem::exists(path));
  CHECK(other_process_try_lock(path, mechanism) == kBusy);
  CHECK(workerlock::lock_holder(path).has_value());
  election.reset();
  CHECK(other_process_try_lock(path, mechanism) == kAcquired);
}

TEST_CASE(
    "fork: a raw copy made while another thread holds the registry mutex does not "
    "hang when it destroys its inherited Election",
    "[contract][raw_fork]") {
  const auto mechanism = GENERATE(Mechanism::ofd, Mechanism::posix);
  INFO("mechanism=" << workerlock::to_string(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "mutex.lock";
  std::optional<workerlock::Election> election;
  election.emplace(workerlock::is_primary_worker(path, quiet(mechanism)));
  REQUIRE(election->role == Role::primary);

  std::atomic<bool> holding{false};
  std::atomic<bool> let_go{false};
  std::thread holder([&] {
    workerlock::detail::registry_guard held;  // as any workerlock call on another thread does
    holding.store(true);
    while (!let_go.load()) std::this_thread::sleep_for(1ms);
  });
  REQUIRE(wltest::eventually([&] { return holding.load(); }, 30s));
  const pid_t copy = wltest::raw_fork();
  if (copy == 0) {
    wltest::tsan_ignore_this_copy();
    election.reset();  // takes the registry mutex, copied locked by a thread absent here
    WorkerLock fresh(path, quiet(mechanism));
    std::error_code ec;
    const bool took = fresh.try_lock(ec);
    wltest::copy_exit(ec ? 2 : took ? 3 : 0);  // the original still holds it
  }
  const int code = wltest::wait_or_kill(copy, 60s);
  let_go.store(true);
  holder.join();
  CHECK(code == 0);  // -2: it hung on the mutex and was killed
  CHECK(election->lock.owns_lock());
  CHECK(other_process_try_lock(path, mechanism) == kBusy);
}

TEST_CASE_METHOD(wltest::EachWaitMode, "fork: a child forked by the primary reads role() secondary",
                 "[coordinator][coordinator_lifecycle][threads]") {
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
  REQUIRE(children.wait(worker, 20s) == 0);
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

TEST_CASE_METHOD(wltest::EachWaitMode,
                 "fork: start() on a forked copy throws while the parent runs it and starts "
                 "afresh once the parent stopped it",
                 "[coordinator][coordinator_lifecycle][threads]") {
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
  REQUIRE(children.wait(worker, 20s) == 0);
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

TEST_CASE(
    "fork: a helper forked by a worker leaves with exit(0) at once, runs no "
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
  REQUIRE(children.wait(worker, 20s) == 0);
  HelperReport& r = *report;
  INFO(r.log.contents());
  CHECK(r.helper_exit.load() == 0);  // not hung (kTimedOut), not terminated (128 + 6)
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

TEST_CASE_METHOD(
    wltest::EachMechanismReaped,
    "fork: a helper forked without exec by the primary is secondary and does not keep the "
    "lock alive",
    "[fork]") {
  INFO(describe(mechanism));
  REQUIRE(reaper.is_subreaper());

  struct Book {
    std::atomic<int> primary_won{-1};
    std::atomic<int> primary_fds{-1};
    std::atomic<pid_t> helper{0};
    std::atomic<int> helper_owns{-1};
    std::atomic<int> helper_lock_inherited{-1};
    std::atomic<int> helper_role_secondary{-1};
    std::atomic<int> helper_role_compares_primary{-1};
    std::atomic<int> helper_role_inherited{-1};
    std::atomic<pid_t> helper_role_elected_in{0};
    std::atomic<int> helper_native_handle{-2};
    std::atomic<int> helper_fds{-1};
    std::atomic<bool> helper_ready{false};
  };
  wltest::Shared<Book> book;

  const pid_t primary = reaper.watch(wltest::fork_child([&] {
    auto election = workerlock::is_primary_worker(path, quiet(mechanism));
    book->primary_won = election.role == Role::primary && election.lock.owns_lock() ? 1 : 0;
    const FileId lock_file = id_of(path);
    book->primary_fds = descriptors_on(::getpid(), lock_file, path);
    book->helper = wltest::fork_child([&] {
      // The helper: a child of the primary that never execs.
      book->helper_owns = election.lock.owns_lock() ? 1 : 0;
      book->helper_lock_inherited = election.lock.inherited_across_fork() ? 1 : 0;
      book->helper_role_secondary = election.role.get() == Role::secondary ? 1 : 0;
      book->helper_role_compares_primary = election.role == Role::primary ? 1 : 0;
      book->helper_role_inherited = election.role.inherited_across_fork() ? 1 : 0;
      book->helper_role_elected_in = election.role.elected_in();
      book->helper_native_handle = election.lock.native_handle();
      book->helper_fds = descriptors_on(::getpid(), lock_file, path);
      book->helper_ready = true;
      // Lives until killed, but no longer than 30 s, should the test fail before it knows
      // the helper's pid (a grandchild is never left behind for good).
      const auto deadline = std::chrono::steady_clock::now() + 30s;
      while (std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
      return 0;
    });
    park();
    return 0;
  }));

  // The primary stores the helper's pid after fork() returns, maybe after the helper is ready.
  REQUIRE(wltest::eventually([&] { return book->helper_ready.load() && book->helper.load() > 0; }));
  const pid_t helper = reaper.watch(book->helper.load());
  REQUIRE(book->primary_won == 1);
  CHECK(book->primary_fds == 1);
  CHECK(book->helper_owns == 0);
  CHECK(book->helper_lock_inherited == 1);
  CHECK(book->helper_role_secondary == 1);
  CHECK(book->helper_role_compares_primary == 0);
  CHECK(book->helper_role_inherited == 1);
  CHECK(book->helper_role_elected_in == primary);
  CHECK(book->helper_native_handle == -1);
  CHECK(book->helper_fds == 0);  // the inherited descriptor was closed in the helper

  // While the primary lives, nobody else gets the lock.
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK(reaper.kill_and_reap(primary) == 128 + SIGKILL);
  REQUIRE(is_running(helper));
  // The primary is gone and its helper still lives: the lock is free at once.
  WorkerLock successor(path, quiet(mechanism));
  CHECK(successor.try_lock());
  CHECK(is_running(helper));
  CHECK(reaper.kill_and_reap(helper) == 128 + SIGKILL);
}

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "fork: children the primary fork-execs or posix_spawns never hold the lock",
                 "[fork]") {
  INFO(describe(mechanism));
  REQUIRE(reaper.is_subreaper());

  struct Book {
    std::atomic<int> primary_won{-1};
    std::atomic<pid_t> forked_sleep{0};
    std::atomic<pid_t> spawned_sleep{0};
    std::atomic<int> spawn_error{-1};
    std::atomic<bool> ready{false};
  };
  wltest::Shared<Book> book;

  const pid_t primary = reaper.watch(wltest::fork_child([&] {
    auto election = workerlock::is_primary_worker(path, quiet(mechanism));
    book->primary_won = election.role == Role::primary ? 1 : 0;
    char program[] = "/bin/sleep";
    char seconds[] = "30";
    char* argv[] = {program, seconds, nullptr};
    book->forked_sleep = wltest::fork_child([&] {
      ::execv(program, argv);
      return 127;
    });
    pid_t spawned = 0;
    // posix_spawn runs no pthread_atfork handler: only O_CLOEXEC keeps the fd out.
    book->spawn_error = ::posix_spawn(&spawned, program, nullptr, nullptr, argv, environ);
    book->spawned_sleep = spawned;
    book->ready = true;
    park();
    return 0;
  }));

  REQUIRE(wltest::eventually([&] { return book->ready.load(); }));
  REQUIRE(book->primary_won == 1);
  REQUIRE(book->spawn_error == 0);
  const pid_t forked_sleep = reaper.watch(book->forked_sleep.load());
  const pid_t spawned_sleep = reaper.watch(book->spawned_sleep.load());
  REQUIRE(forked_sleep > 0);
  REQUIRE(spawned_sleep > 0);
  const FileId lock_file = id_of(path);
  REQUIRE(lock_file.ino != 0);

  for (const pid_t sleeper : {forked_sleep, spawned_sleep}) {
    INFO("sleep pid " << sleeper);
    REQUIRE(
        wltest::eventually([&] { return command_line(sleeper).rfind("/bin/sleep 30", 0) == 0; }));
    CHECK(descriptors_on(sleeper, lock_file, path) == 0);
  }
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK(reaper.kill_and_reap(primary) == 128 + SIGKILL);
  REQUIRE(is_running(forked_sleep));
  REQUIRE(is_running(spawned_sleep));
  WorkerLock successor(path, quiet(mechanism));
  CHECK(successor.try_lock());
  CHECK(is_running(forked_sleep));
  CHECK(is_running(spawned_sleep));
  CHECK(reaper.kill_and_reap(forked_sleep) == 128 + SIGKILL);
  CHECK(reaper.kill_and_reap(spawned_sleep) == 128 + SIGKILL);
}

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "fork: an election won in the master before fork makes no child primary",
                 "[fork]") {
  INFO(describe(mechanism));
  constexpr int children = 4;

  struct Book {
    std::atomic<int> inherited_role_primary[children]{};
    std::atomic<int> inherited_role_secondary[children]{};
    std::atomic<int> inherited_owns[children]{};
    std::atomic<int> inherited_flagged[children]{};
    std::atomic<int> own_election_primary[children]{};
    std::atomic<int> own_election_owns[children]{};
    std::atomic<int> warned[children]{};
    std::atomic<int> first_round_done{0};
    wltest::StartLine master_released;
    std::atomic<int> second_round_winners{0};
    std::atomic<int> second_round_done{0};
    Notes notes;
  };
  wltest::Shared<Book> book;

  const pid_t master_pid = ::getpid();
  std::optional<workerlock::Election> master;
  master.emplace(workerlock::is_primary_worker(path, quiet(mechanism)));
  REQUIRE(master->role == Role::primary);
  REQUIRE(master->lock.owns_lock());

  std::vector<pid_t> pids;
  for (int i = 0; i < children; ++i) {
    pids.push_back(reaper.watch(wltest::fork_child([&, i] {
      // What the child inherited from the master.
      book->inherited_role_primary[i] = master->role == Role::primary ? 1 : 0;
      book->inherited_role_secondary[i] = master->role.get() == Role::secondary ? 1 : 0;
      book->inherited_owns[i] = master->lock.owns_lock() ? 1 : 0;
      book->inherited_flagged[i] = master->lock.inherited_across_fork() ? 1 : 0;

      // The child runs its own election while the master holds the lock.
      std::vector<std::pair<LogLevel, std::string>> lines;
      Options options = Options{}.with(mechanism);
      options.log = [&lines](LogLevel level, std::string_view line) {
        lines.emplace_back(level, std::string(line));
      };
      {
        auto mine = workerlock::is_primary_worker(path, options);
        book->own_election_primary[i] = mine.role == Role::primary ? 1 : 0;
        book->own_election_owns[i] = mine.lock.owns_lock() ? 1 : 0;
      }
      for (const auto& [level, line] : lines) {
        if (level == LogLevel::warning && mentions_number(line, master_pid) &&
            line.find("fork") != std::string::npos)
          book->warned[i] = 1;
      }
      book->first_round_done.fetch_add(1);

      // Once the master has released, exactly one child may win; the winner holds the lock
      // until every child has tried.
      book->master_released.arrive_and_wait();
      std::error_code ec;
      auto second = workerlock::is_primary_worker(path, options.silent(), ec);
      if (ec) book->notes.note("second election", ec);
      if (second.role == Role::primary) {
        book->second_round_winners.fetch_add(1);
        if (!second.lock.owns_lock()) book->notes.note("primary without the lock");
      }
      book->second_round_done.fetch_add(1);
      if (!wltest::eventually([&] { return book->second_round_done.load() == children; }, 20s))
        book->notes.note("timed out waiting for the other children");
      return 0;
    })));
  }

  REQUIRE(wltest::eventually([&] { return book->first_round_done.load() == children; }, 20s));
  for (int i = 0; i < children; ++i) {
    INFO("child " << i);
    CHECK(book->inherited_role_primary[i] == 0);
    CHECK(book->inherited_role_secondary[i] == 1);
    CHECK(book->inherited_owns[i] == 0);
    CHECK(book->inherited_flagged[i] == 1);
    CHECK(book->own_election_primary[i] == 0);
    CHECK(book->own_election_owns[i] == 0);
    CHECK(book->warned[i] == 1);
  }
  // The children's forks and elections did not take the master's lock away.
  CHECK(master->role == Role::primary);
  CHECK(master->lock.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // The master lets go by destroying its election, which closes its descriptor: if any
  // child still shared the master's open file, no child could win below.
  master.reset();
  REQUIRE(book->master_released.release_when(children));
  for (const pid_t pid : pids) CHECK(reaper.wait(pid, 30s) == 0);
  INFO("first problem reported by a child: " << book->notes.text());
  CHECK(book->notes.count == 0);
  CHECK(book->second_round_done == children);
  CHECK(book->second_round_winners == 1);
}

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "fork: concurrent unlock_and_remove cycles never let two processes hold the lock",
                 "[fork]") {
  INFO(describe(mechanism));
  constexpr int removers = 8;
  constexpr int iterations = 300;
  constexpr int cyclers = 2;

  struct Book {
    Exclusion exclusion;
    std::atomic<int> not_the_named_file{0};
    std::atomic<int> remover_cycles{0};
    std::atomic<int> removers_done{0};
    std::atomic<int> cycler_hits{0};
    std::atomic<int> cycler_misses{0};
    wltest::StartLine start;
    Notes notes;
  };
  wltest::Shared<Book> book;

  const auto critical_section = [&](const WorkerLock& lock) {
    book->exclusion.enter();
    if (!holds_the_named_file(lock)) book->not_the_named_file.fetch_add(1);
    std::this_thread::yield();
    book->exclusion.leave();
  };

  std::vector<pid_t> pids;
  for (int i = 0; i < removers; ++i) {
    pids.push_back(reaper.watch(wltest::fork_child([&] {
      WorkerLock lock(path, quiet(mechanism));
      book->start.arrive_and_wait();
      int result = 0;
      for (int n = 0; n < iterations; ++n) {
        try {
          lock.lock();
          if (!lock.owns_lock()) throw std::runtime_error("lock() returned without the lock");
          critical_section(lock);
          lock.unlock_and_remove();
          if (lock.owns_lock()) throw std::runtime_error("unlock_and_remove() left the lock held");
        } catch (const std::exception& e) {
          book->notes.note(e.what());
          result = 1;
          break;
        }
        book->remover_cycles.fetch_add(1);
      }
      book->removers_done.fetch_add(1);
      return result;
    })));
  }
  for (int i = 0; i < cyclers; ++i) {
    pids.push_back(reaper.watch(wltest::fork_child([&] {
      WorkerLock lock(path, quiet(mechanism));
      book->start.arrive_and_wait();
      while (book->removers_done.load() < removers) {
        std::error_code ec;
        if (lock.try_lock(ec)) {
          critical_section(lock);
          lock.unlock(ec);
          if (ec) {
            book->notes.note("unlock()", ec);
            return 1;
          }
          book->cycler_hits.fetch_add(1);
        } else if (ec) {
          book->notes.note("try_lock()", ec);
          return 1;
        } else {
          book->cycler_misses.fetch_add(1);
        }
        std::this_thread::sleep_for(20us);
      }
      return 0;
    })));
  }
  REQUIRE(book->start.release_when(removers + cyclers));
  int failures = 0;
  for (const pid_t pid : pids) failures += reaper.wait(pid, 60s) != 0 ? 1 : 0;

  INFO("first problem reported by a child: " << book->notes.text());
  INFO("cycler hits " << book->cycler_hits << ", misses " << book->cycler_misses);
  CHECK(failures == 0);
  CHECK(book->notes.count == 0);
  CHECK(book->exclusion.overlaps == 0);
  CHECK(book->not_the_named_file == 0);
  CHECK(book->remover_cycles == removers * iterations);
  CHECK(book->exclusion.entries == removers * iterations + book->cycler_hits);
}

TEST_CASE_METHOD(
    wltest::EachMechanismReaped,
    "fork: a handle that waited on the removed file ends up holding the file the path names "
    "now",
    "[fork]") {
  // Whether the waiter had already locked (and so verified) the old file once before.
  const bool verified_before = GENERATE(false, true);
  INFO(describe(mechanism) << " verified_before=" << verified_before);

  struct Book {
    std::atomic<int> warmed_up{0};
    std::atomic<bool> parent_holds{false};
    std::atomic<ino_t> waited_on{0};
    std::atomic<bool> waiting{false};
    std::atomic<bool> removed{false};
    std::atomic<int> acquired{0};
    std::atomic<int> acquired_before_removal{0};
    std::atomic<int> holds_named_file{-1};
    std::atomic<bool> finish{false};
  };
  wltest::Shared<Book> book;

  const pid_t waiter = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    if (verified_before) {
      if (!lock.try_lock()) return 3;
      lock.unlock();
    }
    book->warmed_up = 1;
    while (!book->parent_holds.load()) std::this_thread::sleep_for(100us);
    if (lock.try_lock()) return 4;  // opens the old file, and must find it held
    struct stat old_file {};
    if (::fstat(lock.native_handle(), &old_file) != 0) return 5;
    book->waited_on = old_file.st_ino;
    book->waiting = true;
    lock.lock();
    book->acquired_before_removal = book->removed.load() ? 0 : 1;
    book->holds_named_file = holds_the_named_file(lock) ? 1 : 0;
    book->acquired = 1;
    while (!book->finish.load()) std::this_thread::sleep_for(100us);
    return lock.owns_lock() ? 0 : 6;
  }));

  REQUIRE(wltest::eventually([&] { return book->warmed_up.load() == 1; }));
  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  const FileId old_file = id_of(path);
  book->parent_holds = true;
  REQUIRE(wltest::eventually([&] { return book->waiting.load(); }));
  CHECK(book->waited_on == old_file.ino);
  REQUIRE(wait_for_blocked_waiters(old_file, mechanism));
  CHECK(book->acquired == 0);

  book->removed = true;
  holder.unlock_and_remove();
  CHECK_FALSE(holder.owns_lock());
  REQUIRE(wltest::eventually([&] { return book->acquired.load() == 1; }));
  CHECK(book->acquired_before_removal == 0);
  CHECK(book->holds_named_file == 1);
  // Nobody else can take the file the path names now: there is exactly one holder.
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  CHECK_FALSE(holder.try_lock());
  book->finish = true;
  CHECK(reaper.wait(waiter, 30s) == 0);
}

TEST_CASE_METHOD(
    wltest::EachMechanismReaped,
    "fork: a preempted waiter in lock keeps waiting however often the file is removed and "
    "recreated",
    "[fork]") {
  INFO(describe(mechanism));
  // The primary cycles lock() / unlock_and_remove() while one worker waits in lock() but
  // is never scheduled at the right moment (here: stopped, as a preempted process is). Each
  // time the worker wakes up on the removed file, the path already names a new file that
  // the primary holds, so the worker must simply wait again, for as long as it takes.
  constexpr int rounds = 80;

  struct Book {
    std::atomic<bool> waiting{false};
    std::atomic<int> acquired{0};
    std::atomic<int> holds_named_file{-1};
    std::atomic<bool> released{false};
    std::atomic<int> acquired_before_release{0};
    Notes notes;
  };
  wltest::Shared<Book> book;

  WorkerLock primary(path, quiet(mechanism));
  REQUIRE(primary.try_lock());
  const pid_t waiter = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    book->waiting = true;
    try {
      lock.lock();
    } catch (const std::exception& e) {
      book->notes.note(e.what());
      return 1;
    }
    if (!book->released.load()) book->acquired_before_release = 1;
    book->holds_named_file = holds_the_named_file(lock) ? 1 : 0;
    book->acquired = 1;
    return lock.owns_lock() ? 0 : 2;
  }));
  REQUIRE(wltest::eventually([&] { return book->waiting.load(); }));

  int completed = 0;
  for (int round = 0; round < rounds; ++round) {
    const FileId current = id_of(path);
    wait_for_blocked_waiters(current, mechanism, 1, waiter);
    if (!is_running(waiter)) break;
    REQUIRE(::kill(waiter, SIGSTOP) == 0);
    REQUIRE(wltest::eventually([&] { return is_stopped(waiter) || !is_running(waiter); }));
    primary.unlock_and_remove();
    REQUIRE(primary.try_lock());  // creates the file anew and takes it first
    REQUIRE(::kill(waiter, SIGCONT) == 0);
    ++completed;
  }
  // The waiter must still be waiting: neither given up nor holding.
  wait_for_blocked_waiters(id_of(path), mechanism, 1, waiter);
  INFO("rounds completed " << completed << "; waiter's problem: " << book->notes.text());
  CHECK(completed == rounds);
  CHECK(is_running(waiter));
  CHECK(book->acquired == 0);

  book->released = true;
  primary.unlock();
  CHECK(reaper.wait(waiter, 30s) == 0);
  CHECK(book->acquired == 1);
  CHECK(book->acquired_before_release == 0);
  CHECK(book->holds_named_file == 1);
}

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "fork: lock keeps waiting through SIGUSR1 with and without SA_RESTART", "[fork]") {
  const bool sa_restart = GENERATE(false, true);
  INFO(describe(mechanism) << " SA_RESTART=" << sa_restart);
  constexpr int signals = 5;

  struct Book {
    std::atomic<int> handled{0};
    std::atomic<int> handler_installed{0};
    std::atomic<bool> waiting{false};
    std::atomic<bool> returned{false};
    std::atomic<bool> released{false};
    std::atomic<int> returned_before_release{-1};
    std::atomic<int> owns_after{-1};
  };
  wltest::Shared<Book> book;

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  const FileId lock_file = id_of(path);

  const pid_t waiter = reaper.watch(wltest::fork_child([&] {
    g_signal_counter = &book->handled;
    struct sigaction action {};
    action.sa_handler = count_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = sa_restart ? SA_RESTART : 0;
    book->handler_installed = ::sigaction(SIGUSR1, &action, nullptr) == 0 ? 1 : 0;
    WorkerLock lock(path, quiet(mechanism));
    book->waiting = true;
    lock.lock();  // an exception ends the child with exit code 99
    book->returned_before_release = book->released.load() ? 0 : 1;
    book->owns_after = lock.owns_lock() ? 1 : 0;
    book->returned = true;
    return 0;
  }));

  REQUIRE(wltest::eventually([&] { return book->waiting.load(); }));
  REQUIRE(book->handler_installed == 1);
  REQUIRE(wait_for_blocked_waiters(lock_file, mechanism));
  for (int n = 0; n < signals; ++n) {
    INFO("signal " << n);
    const int before = book->handled.load();
    REQUIRE(::kill(waiter, SIGUSR1) == 0);
    REQUIRE(wltest::eventually([&] { return book->handled.load() > before; }));
    // lock() went back to waiting: it is blocked in the kernel again (or polling, for posix).
    CHECK(wait_for_blocked_waiters(lock_file, mechanism));
    CHECK_FALSE(book->returned);
    REQUIRE(is_running(waiter));
  }
  CHECK(book->handled == signals);
  CHECK(holder.owns_lock());

  book->released = true;
  holder.unlock();
  CHECK(reaper.wait(waiter, 30s) == 0);  // 99 if lock() threw
  CHECK(book->returned);
  CHECK(book->returned_before_release == 0);
  CHECK(book->owns_after == 1);
}

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "fork: a SIGKILLed waiter disturbs neither the holder nor the other waiters",
                 "[fork]") {
  INFO(describe(mechanism));

  struct Book {
    std::atomic<int> waiting{0};
    std::atomic<int> acquired{0};
    std::atomic<bool> released{false};
    std::atomic<int> acquired_before_release{0};
  };
  wltest::Shared<Book> book;

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  const FileId lock_file = id_of(path);

  const auto spawn_waiter = [&] {
    return reaper.watch(wltest::fork_child([&] {
      WorkerLock lock(path, quiet(mechanism));
      book->waiting.fetch_add(1);
      lock.lock();
      if (!book->released.load()) book->acquired_before_release.fetch_add(1);
      book->acquired.fetch_add(1);
      return lock.owns_lock() ? 0 : 1;
    }));
  };
  const pid_t victim = spawn_waiter();
  const pid_t survivor = spawn_waiter();
  REQUIRE(wltest::eventually([&] { return book->waiting.load() == 2; }));
  REQUIRE(wait_for_blocked_waiters(lock_file, mechanism, 2));

  CHECK(reaper.kill_and_reap(victim) == 128 + SIGKILL);
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  CHECK(book->acquired == 0);
  CHECK(is_running(survivor));

  book->released = true;
  holder.unlock();
  CHECK(reaper.wait(survivor, 30s) == 0);
  CHECK(book->acquired == 1);
  CHECK(book->acquired_before_release == 0);
}

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "fork: SIGTERM with its default action frees the primary's lock", "[fork]") {
  INFO(describe(mechanism));

  struct Book {
    std::atomic<int> primary{-1};
  };
  wltest::Shared<Book> book;

  const pid_t primary = reaper.watch(wltest::fork_child([&] {
    ::signal(SIGTERM, SIG_DFL);
    auto election = workerlock::is_primary_worker(path, quiet(mechanism));
    book->primary = election.role == Role::primary ? 1 : 0;
    park();
    return 0;
  }));
  REQUIRE(wltest::eventually([&] { return book->primary.load() != -1; }));
  REQUIRE(book->primary == 1);
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK(reaper.kill_and_reap(primary, SIGTERM) == 128 + SIGTERM);
  WorkerLock successor(path, quiet(mechanism));
  CHECK(successor.try_lock());
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "fork: POSIX trap: a sibling handle created tried and destroyed in the holder's process keeps "
    "the "
    "lock",
    "[fork]") {
  INFO(describe(mechanism));

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  REQUIRE(probe_from_other_process(path, mechanism) == Probe::busy);

  {
    WorkerLock sibling(path, quiet(mechanism));
    CHECK_FALSE(sibling.try_lock());  // handles exclude each other inside one process
    CHECK_FALSE(sibling.owns_lock());
    CHECK_FALSE(sibling.try_lock_for(20ms));
  }
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Several siblings, some never tried, some unlocked without holding.
  for (int round = 0; round < 3; ++round) {
    WorkerLock tried(path, quiet(mechanism));
    WorkerLock untried(path, quiet(mechanism));
    CHECK_FALSE(tried.try_lock());
    tried.unlock();
    untried.unlock();
  }
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Roles swapped: once the holder lets go, a sibling gets in, and the former holder,
  // now excluded, is destroyed without taking the sibling's lock with it.
  std::optional<WorkerLock> former;
  former.emplace(std::move(holder));
  former->unlock();
  WorkerLock sibling(path, quiet(mechanism));
  REQUIRE(sibling.try_lock());
  CHECK_FALSE(former->try_lock());
  former.reset();
  CHECK(sibling.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  sibling.unlock();
  CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);
}
