// tests/test_contract.cpp: the public contract of is_primary_worker() and WorkerLock: raw
// copies of the process own nothing, unlock() never throws, errors are reported once, errc.
// (That reading a temporary Election's role does not compile is proven by tests/compile_fail.)
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <workerlock/workerlock.hpp>

#include "raw_fork.hpp"
#include "support.hpp"

namespace {

using namespace std::chrono_literals;
using wltest::Children;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WorkerLock;

Options quiet(Mechanism mechanism) { return Options{}.with(mechanism).silent(); }

//! Another process's attempt on `path`: 0 acquired, 1 busy, 2 error.
int other_process_try(const std::filesystem::path& path, Mechanism mechanism) {
  return wltest::wait_exit_code(wltest::fork_child([&] {
    WorkerLock other(path, quiet(mechanism));
    std::error_code ec;
    const bool held = other.try_lock(ec);
    if (ec) return 2;
    return held ? 0 : 1;
  }));
}
constexpr int kAcquired = 0;
constexpr int kBusy = 1;

//! A sink that throws on every line, after counting it.
struct ThrowingSink {
  std::shared_ptr<int> lines = std::make_shared<int>(0);
  void operator()(LogLevel /*level*/, std::string_view /*line*/) const {
    ++*lines;
    throw std::runtime_error("the log sink throws");
  }
};

//! A sink that keeps every line.
struct KeepingSink {
  std::shared_ptr<std::vector<std::string>> lines = std::make_shared<std::vector<std::string>>();
  void operator()(LogLevel level, std::string_view line) const {
    lines->push_back(std::string(workerlock::to_string(level)) + ": " + std::string(line));
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Item 1: the kept spellings (the refused ones are tests/compile_fail/*.cpp under ctest).
// ---------------------------------------------------------------------------------------

TEST_CASE("contract: four forked workers keeping their Election elect exactly one primary",
          "[contract][process]") {
  wltest::TempDir dir;
  const auto path = dir / "four.lock";
  struct Board {
    wltest::StartLine start;
    std::atomic<int> primaries{0};
    std::atomic<int> decided{0};
  };
  wltest::Shared<Board> board;
  Children children;
  for (int i = 0; i < 4; ++i) {
    children.spawn([&, i] {
      board->start.arrive_and_wait();
      bool primary = false;
      if (i % 2 == 0) {
        auto [role, lock] = workerlock::is_primary_worker(path, quiet(Mechanism::ofd));
        primary = role == Role::primary && lock.owns_lock();
        board->primaries.fetch_add(primary ? 1 : 0);
        board->decided.fetch_add(1);
        // Keep the election until everyone has decided.
        if (!wltest::eventually([&] { return board->decided.load() == 4; }, 60s)) return 3;
      } else {
        auto election = workerlock::is_primary_worker(path, quiet(Mechanism::ofd));
        primary = election.role == Role::primary && election.lock.owns_lock();
        board->primaries.fetch_add(primary ? 1 : 0);
        board->decided.fetch_add(1);
        if (!wltest::eventually([&] { return board->decided.load() == 4; }, 60s)) return 3;
      }
      return 0;
    });
  }
  REQUIRE(board->start.release_when(4));
  CHECK(children.wait_all_failures() == 0);
  CHECK(board->primaries.load() == 1);
}

TEST_CASE("contract: a moved Election keeps the lock and the moved-from one reads secondary",
          "[contract]") {
  wltest::TempDir dir;
  const auto path = dir / "moved.lock";
  auto first = workerlock::is_primary_worker(path, quiet(Mechanism::ofd));
  REQUIRE(first.role == Role::primary);
  workerlock::Election second = std::move(first);
  CHECK(second.role == Role::primary);
  CHECK(second.lock.owns_lock());
  CHECK(first.role == Role::secondary);  // NOLINT(bugprone-use-after-move): documented state
  CHECK_FALSE(first.lock.owns_lock());
  workerlock::Election third;
  CHECK(third.role == Role::secondary);
  third = std::move(second);
  CHECK(third.role == Role::primary);
  CHECK(second.role == Role::secondary);  // NOLINT(bugprone-use-after-move)
  CHECK(other_process_try(path, Mechanism::ofd) == kBusy);
}

// ---------------------------------------------------------------------------------------
// Item 2: no cached pid; a raw copy of the process owns nothing and releases nothing.
// ---------------------------------------------------------------------------------------

TEST_CASE(
    "contract: a copy made by syscall(SYS_fork) reads secondary and cannot release or "
    "remove the original's lock",
    "[contract][raw_fork]") {
  const auto mechanism = GENERATE(Mechanism::ofd, Mechanism::flock, Mechanism::posix);
  const std::string operation = GENERATE(as<std::string>{}, "read", "unlock", "unlock(ec)",
                                         "unlock_and_remove", "unlock_and_remove(ec)", "destroy",
                                         "move-assign", "try_lock", "try_lock_for", "lock_for ec");
  INFO("mechanism=" << workerlock::to_string(mechanism) << " operation=" << operation);
  wltest::TempDir dir;
  const auto path = dir / "raw.lock";
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
  CHECK(other_process_try(path, mechanism) == kBusy);
  CHECK(workerlock::lock_holder(path).has_value());
  election.reset();
  CHECK(other_process_try(path, mechanism) == kAcquired);
}

TEST_CASE(
    "contract: a raw copy made while another thread holds the registry mutex does not "
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
  CHECK(other_process_try(path, mechanism) == kBusy);
}

// ---------------------------------------------------------------------------------------
// Item 3: unlock() is noexcept (BasicLockable); std::unique_lock, scoped_lock, std::lock.
// ---------------------------------------------------------------------------------------

TEST_CASE("contract: WorkerLock::unlock() is noexcept and so are the error_code twins",
          "[contract]") {
  WorkerLock lock;
  std::error_code ec;
  const std::chrono::milliseconds timeout(1);
  const auto deadline = std::chrono::steady_clock::now();
  const std::filesystem::path path("/nonexistent/x.lock");
  const Options options;
  CHECK(noexcept(lock.unlock()));
  CHECK(noexcept(lock.unlock(ec)));
  CHECK(noexcept(lock.lock(ec)));
  CHECK(noexcept(lock.try_lock(ec)));
  CHECK(noexcept(lock.try_lock_for(timeout, ec)));
  CHECK(noexcept(lock.try_lock_until(deadline, ec)));
  CHECK(noexcept(lock.unlock_and_remove(ec)));
  CHECK(noexcept(workerlock::is_primary_worker(path, options, ec)));
  CHECK(noexcept(workerlock::default_lock_path(ec)));
}

TEST_CASE(
    "contract: an unlock that fails under std::unique_lock neither terminates the "
    "process nor keeps the lock",
    "[contract][process]") {
  const auto mechanism = GENERATE(Mechanism::ofd, Mechanism::flock, Mechanism::posix);
  INFO("mechanism=" << workerlock::to_string(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "unique.lock";
  struct Board {
    std::atomic<int> stage{0};  // 1: unlocked under unique_lock, 2: parent probed
    std::atomic<int> warnings{0};
  };
  wltest::Shared<Board> board;
  const pid_t child = wltest::fork_child([&] {
    Options options = quiet(mechanism);
    options.log = [&](LogLevel level, std::string_view line) {
      if (level == LogLevel::warning && line.find("cannot unlock") != std::string_view::npos)
        board->warnings.fetch_add(1);
      throw std::runtime_error("the log sink throws too");
    };
    WorkerLock lock(path, options);
    {
      std::unique_lock<WorkerLock> guard(lock);
      if (!lock.owns_lock()) return 2;
      ::close(lock.native_handle());  // behind the handle's back: unlock() will fail (EBADF)
    }  // ~unique_lock calls unlock(): a throw here would be std::terminate
    if (lock.owns_lock()) return 3;
    board->stage.store(1);
    if (!wltest::eventually([&] { return board->stage.load() == 2; }, 60s)) return 4;
    return 0;
  });
  // Until the child has unlocked, or has died trying (134: SIGABRT from std::terminate).
  int died = -1;
  const bool unlocked = wltest::eventually(
      [&] {
        int status = 0;
        if (::waitpid(child, &status, WNOHANG) == child) {
          died = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
          return true;
        }
        return board->stage.load() == 1;
      },
      60s);
  if (died >= 0) FAIL("the child ended (" << died << ") before its unique_lock had unlocked");
  // The child is alive and its lock is free.
  CHECK(other_process_try(path, mechanism) == kAcquired);
  board->stage.store(2);
  CHECK(wltest::wait_or_kill(child, 60s) == 0);
  CHECK(unlocked);
  CHECK(board->warnings.load() == 1);
}

TEST_CASE(
    "contract: std::lock and std::scoped_lock over two WorkerLocks exclude across "
    "racing forked workers",
    "[contract][process]") {
  const auto mechanism = GENERATE(Mechanism::ofd, Mechanism::flock, Mechanism::posix);
  INFO("mechanism=" << workerlock::to_string(mechanism));
  wltest::TempDir dir;
  const auto path_a = dir / "a.lock";
  const auto path_b = dir / "b.lock";
  struct Board {
    wltest::StartLine start;
    std::atomic<int> inside{0};
    std::atomic<int> overlaps{0};
    std::atomic<int> rounds{0};
  };
  wltest::Shared<Board> board;
  constexpr int kWorkers = 4;
  constexpr int kRounds = 40;
  Children children;
  for (int w = 0; w < kWorkers; ++w) {
    children.spawn([&, w] {
      WorkerLock a(path_a, quiet(mechanism));
      WorkerLock b(path_b, quiet(mechanism));
      board->start.arrive_and_wait();
      for (int round = 0; round < kRounds; ++round) {
        const auto critical = [&] {
          if (!a.owns_lock() || !b.owns_lock()) board->overlaps.fetch_add(100);
          if (board->inside.fetch_add(1) != 0) board->overlaps.fetch_add(1);
          std::this_thread::sleep_for(50us);
          board->inside.fetch_sub(1);
          board->rounds.fetch_add(1);
        };
        switch ((w + round) % 3) {
          case 0: {
            std::scoped_lock both(a, b);
            critical();
            break;
          }
          case 1: {
            std::lock(b, a);  // the other order
            std::unique_lock<WorkerLock> hold_a(a, std::adopt_lock);
            std::unique_lock<WorkerLock> hold_b(b, std::adopt_lock);
            critical();
            break;
          }
          default: {
            std::unique_lock<WorkerLock> hold_a(a, std::defer_lock);
            std::unique_lock<WorkerLock> hold_b(b, std::defer_lock);
            std::lock(hold_a, hold_b);
            critical();
            break;
          }
        }
        if (a.owns_lock() || b.owns_lock()) return 5;
      }
      return 0;
    });
  }
  REQUIRE(board->start.release_when(kWorkers));
  CHECK(children.wait_all_failures() == 0);
  CHECK(board->overlaps.load() == 0);
  CHECK(board->rounds.load() == kWorkers * kRounds);
}

// ---------------------------------------------------------------------------------------
// Item 6: an error is reported once; a throwing log sink escapes no error_code twin.
// ---------------------------------------------------------------------------------------

TEST_CASE(
    "contract: a failing is_primary_worker() reports its error once (thrown or through "
    "the error_code) and never also logs it",
    "[contract]") {
  wltest::TempDir dir;
  const auto path = dir / "missing-directory" / "x.lock";
  KeepingSink sink;
  Options options;
  options.log = sink;
  CHECK_THROWS_AS((void)workerlock::is_primary_worker(path, options), workerlock::lock_error);
  std::error_code ec;
  auto election = workerlock::is_primary_worker(path, options, ec);
  CHECK(ec == std::errc::no_such_file_or_directory);
  CHECK(election.role == Role::secondary);
  INFO("logged: " << fmt::format("{}", fmt::join(*sink.lines, " | ")));
  CHECK(sink.lines->empty());
}

TEST_CASE("contract: a log sink that throws escapes no error_code twin and changes no outcome",
          "[contract][process]") {
  wltest::TempDir dir;
  const auto path = dir / "sink.lock";
  ThrowingSink sink;
  Options options = quiet(Mechanism::ofd);
  options.log = sink;

  SECTION("is_primary_worker(ec): primary, then secondary, each logging a line") {
    std::error_code ec;
    std::optional<workerlock::Election> first;
    CHECK_NOTHROW(first.emplace(workerlock::is_primary_worker(path, options, ec)));
    CHECK_FALSE(ec);
    REQUIRE(first);
    CHECK(first->role == Role::primary);
    CHECK(first->lock.owns_lock());
    std::optional<workerlock::Election> second;
    CHECK_NOTHROW(second.emplace(workerlock::is_primary_worker(path, options, ec)));
    CHECK_FALSE(ec);
    REQUIRE(second);
    CHECK(second->role == Role::secondary);
    CHECK(*sink.lines == 2);
  }
  SECTION("the throwing is_primary_worker() drops the sink's exception and keeps the lock") {
    std::optional<workerlock::Election> election;
    CHECK_NOTHROW(election.emplace(workerlock::is_primary_worker(path, options)));
    REQUIRE(election);
    CHECK(election->role == Role::primary);
    CHECK(other_process_try(path, Mechanism::ofd) == kBusy);
    CHECK(*sink.lines == 1);
  }
  SECTION("the warning of a child elected after its parent won (is_primary_worker(ec))") {
    auto master = workerlock::is_primary_worker(path, quiet(Mechanism::ofd));
    REQUIRE(master.role == Role::primary);
    wltest::Shared<std::atomic<int>> lines;
    Children children;
    const pid_t child = children.spawn([&] {
      std::error_code ec;
      try {
        auto election = workerlock::is_primary_worker(path, options, ec);
        lines->store(*sink.lines);
        if (ec) return 2;
        return election.role == Role::secondary ? 0 : 3;
      } catch (...) {
        return 4;  // the sink's exception escaped
      }
    });
    CHECK(children.wait(child) == 0);
    CHECK(lines->load() == 2);  // the warning and the role line
  }
  SECTION("every error_code twin of WorkerLock on a file with foreign contents (a warning)") {
    {
      std::ofstream foreign(path);
      foreign << "not a holder record\n";
    }
    std::error_code ec;
    WorkerLock lock(path, options);
    CHECK(lock.try_lock(ec));
    CHECK_FALSE(ec);
    lock.unlock(ec);
    CHECK_FALSE(ec);
    lock.lock(ec);
    CHECK_FALSE(ec);
    lock.unlock(ec);
    CHECK(lock.try_lock_for(1s, ec));
    CHECK_FALSE(ec);
    lock.unlock(ec);
    CHECK(lock.try_lock_until(std::chrono::system_clock::now() + 1s, ec));
    CHECK_FALSE(ec);
    lock.unlock_and_remove(ec);
    CHECK(ec == workerlock::errc::foreign_owner);
    CHECK(std::filesystem::exists(path));
    CHECK(*sink.lines == 4);  // one warning per acquisition
  }
}

// ---------------------------------------------------------------------------------------
// Item 7: library conditions carry workerlock::errc (and still compare with std::errc).
// ---------------------------------------------------------------------------------------

TEST_CASE(
    "contract: WORKERLOCK_ROLE=primary carries errc::role_override_refused and a bad value "
    "errc::bad_configuration and a kept-out worker's lock() errc::kept_out_by_operator",
    "[contract][process]") {
  wltest::TempDir dir;
  const auto path = dir / "role.lock";
  Children children;
  struct Refusal {
    const char* value;
    workerlock::errc code;
    std::errc standard;
  };
  for (const Refusal refusal :
       {Refusal{"primary", workerlock::errc::role_override_refused,
                std::errc::operation_not_permitted},
        Refusal{"banana", workerlock::errc::bad_configuration, std::errc::invalid_argument}}) {
    INFO("WORKERLOCK_ROLE=" << refusal.value);
    const pid_t child = children.spawn([&] {
      ::setenv("WORKERLOCK_ROLE", refusal.value, 1);
      std::error_code ec;
      auto election = workerlock::is_primary_worker(path, quiet(Mechanism::ofd), ec);
      if (ec != refusal.code) return 2;
      if (ec != refusal.standard) return 3;
      if (election.role != Role::secondary) return 4;
      try {
        auto thrown = workerlock::is_primary_worker(path, quiet(Mechanism::ofd));
        return 5;
      } catch (const workerlock::lock_error& error) {
        if (error.code() != refusal.code) return 6;
      }
      return 0;
    });
    CHECK(children.wait(child) == 0);
  }
  const pid_t kept_out = children.spawn([&] {
    ::setenv("WORKERLOCK_ROLE", "secondary", 1);
    auto election = workerlock::is_primary_worker(path, quiet(Mechanism::ofd));
    if (election.role != Role::secondary) return 2;
    std::error_code ec;
    election.lock.lock(ec);
    if (ec != workerlock::errc::kept_out_by_operator) return 3;
    if (ec != std::errc::operation_not_permitted) return 4;
    return 0;
  });
  CHECK(children.wait(kept_out) == 0);
}

TEST_CASE("contract: unlock_and_remove() refusals carry errc::not_held and errc::foreign_owner",
          "[contract]") {
  wltest::TempDir dir;
  const auto path = dir / "remove.lock";
  WorkerLock lock(path, quiet(Mechanism::ofd));
  std::error_code ec;
  lock.unlock_and_remove(ec);
  CHECK(ec == workerlock::errc::not_held);
  CHECK(ec == std::errc::operation_not_permitted);
  try {
    lock.unlock_and_remove();
    FAIL("unlock_and_remove() of a handle holding nothing did not throw");
  } catch (const workerlock::lock_error& error) {
    CHECK(error.code() == workerlock::errc::not_held);
  }

  const auto foreign_path = dir / "foreign.conf";
  {
    std::ofstream foreign(foreign_path);
    foreign << "setting = 1\n";
  }
  WorkerLock foreign(foreign_path, quiet(Mechanism::ofd));
  REQUIRE(foreign.try_lock());
  foreign.unlock_and_remove(ec);
  CHECK(ec == workerlock::errc::foreign_owner);
  CHECK(ec == std::errc::operation_not_permitted);
  CHECK(std::filesystem::exists(foreign_path));
}

TEST_CASE("contract: a refused WORKERLOCK_PATH carries errc::bad_configuration",
          "[contract][process]") {
  Children children;
  const pid_t child = children.spawn([&] {
    ::setenv("WORKERLOCK_PATH", "relative/app.lock", 1);
    std::error_code ec;
    const auto path = workerlock::default_lock_path(ec);
    if (ec != workerlock::errc::bad_configuration) return 2;
    if (ec != std::errc::invalid_argument) return 3;
    if (!path.empty()) return 4;
    try {
      (void)workerlock::default_lock_path();
      return 5;
    } catch (const workerlock::lock_error& error) {
      if (error.code() != workerlock::errc::bad_configuration) return 6;
    }
    return 0;
  });
  CHECK(children.wait(child) == 0);
}
