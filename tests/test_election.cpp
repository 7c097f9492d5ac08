// tests/test_election.cpp: is_primary_worker(): races, SIGKILL takeover, stale files,
// configuration, logging. Helpers live in tests/support/; every test forks real processes where it
// needs more than one.
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
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
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/contract_lab.hpp"
#include "support/election_lab.hpp"
#include "support/fixtures.hpp"
#include "support/lock_file_lab.hpp"
#include "support/race_lab.hpp"

using namespace wltest;
using namespace wltest::contract_lab;
using namespace wltest::election_lab;
using namespace wltest::lock_file_lab;

TEST_CASE("election: four forked workers keeping their Election elect exactly one primary",
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

TEST_CASE("election: a moved Election keeps the lock and the moved-from one reads secondary",
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
  CHECK(other_process_try_lock(path, Mechanism::ofd) == kBusy);
}

TEST_CASE(
    "election: a failing is_primary_worker() reports its error once (thrown or through "
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

TEST_CASE("election: a log sink that throws escapes no error_code twin and changes no outcome",
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
    CHECK(other_process_try_lock(path, Mechanism::ofd) == kBusy);
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

TEST_CASE(
    "election: WORKERLOCK_ROLE=primary carries errc::role_override_refused and a bad value "
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

TEST_CASE("election: a refused WORKERLOCK_PATH carries errc::bad_configuration",
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

TEST_CASE("election: 2 16 64 and 256 children elect exactly one primary", "[election]") {
  const int n = GENERATE(2, 16, 64, 256);
  const int rounds = n == 2 ? 10 : n == 16 ? 4 : n == 64 ? 2 : 1;
  wltest::TempDir dir;
  wltest::Shared<RaceBoard> board;
  for (int round = 0; round < rounds; ++round) {
    const auto path = round_path(dir.path(), round);
    const auto r = run_race(*board, path, n, quiet());
    INFO("children=" << n << " round=" << round << " path=" << path);
    INFO(r.problem());
    REQUIRE(r.problem().empty());
    CHECK(r.primaries == 1);
    CHECK(r.secondaries == n - 1);
    const auto after = check_after_race(path, r.winner, workerlock::default_mechanism);
    INFO(after);
    CHECK(after.empty());
  }
}

TEST_CASE("election: 16 children x 1000 rounds elect exactly one primary every round",
          "[election]") {
  constexpr int kRounds = 1000;
  static_assert(kRounds <= kArenaMaxRounds);
  wltest::TempDir dir;
  wltest::Shared<ArenaBoard> board;
  const auto r = run_arena(*board, dir.path(), 16, kRounds, quiet());
  INFO(fmt::format("{} rounds of 16 workers in {:.2f} s", r.rounds_run, r.seconds));
  INFO("first problem: " << r.first_problem);
  INFO(board->diag.message());
  CHECK(r.first_problem.empty());
  CHECK(r.rounds_run == kRounds);
  CHECK(r.primaries_seen == kRounds);
  CHECK(r.failed_workers == 0);
}

TEST_CASE_METHOD(wltest::EachMechanism, "election: 16-way races for each mechanism", "[election]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));

  // 50 rounds among 16 long-lived workers.
  wltest::Shared<ArenaBoard> arena;
  const auto a = run_arena(*arena, dir.path(), 16, 50, quiet(mechanism));
  INFO(fmt::format("arena: {} rounds in {:.2f} s; first problem: {}", a.rounds_run, a.seconds,
                   a.first_problem));
  CHECK(a.first_problem.empty());
  CHECK(a.primaries_seen == 50);
  CHECK(a.failed_workers == 0);

  // And fresh children every round, as a pre-fork server has them.
  wltest::Shared<RaceBoard> board;
  for (int round = 0; round < 2; ++round) {
    const int n = 16;
    const auto path = dir / fmt::format("fork-{}.lock", round);
    const auto r = run_race(*board, path, n, quiet(mechanism));
    INFO("fresh children: n=" << n << " round=" << round << " " << r.problem());
    REQUIRE(r.problem().empty());
    const auto after = check_after_race(path, r.winner, mechanism);
    INFO(after);
    CHECK(after.empty());
  }
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "election: after a SIGKILL of the primary a waiting sibling acquires within 100 ms",
    "[election]") {
  // 0: a try_lock() loop, 1: blocking lock(), 2: try_lock_for()
  const int style = GENERATE(0, 1, 2);
  INFO("mechanism=" << workerlock::to_string(mechanism) << " waiter style=" << style);
  wltest::Shared<HolderBoard> board;
  wltest::Shared<TakeoverBoard> takeover;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(mechanism));

  const pid_t waiter = children.spawn([&] {
    auto [role, lock] = workerlock::is_primary_worker(path, quiet(mechanism));
    if (role != Role::secondary) return takeover->diag.fail("waiter became primary while held");
    takeover->waiting.store(1);
    bool got = false;
    if (style == 0) {
      const auto deadline = steady_clock::now() + kChildPatience;
      while (!(got = lock.try_lock()) && steady_clock::now() < deadline) {
      }
    } else if (style == 1) {
      lock.lock();
      got = true;
    } else {
      got = lock.try_lock_for(kChildPatience);
    }
    const auto now = mono_ns();
    if (!got) return takeover->diag.fail("never acquired");
    takeover->acquired_ns.store(now);
    if (!lock.owns_lock()) return takeover->diag.fail("acquired but owns_lock() is false");
    const auto holder = workerlock::lock_holder(path);
    if (!holder || holder->pid != ::getpid() || !holder->recorded)
      return takeover->diag.fail(
          fmt::format("lock_holder says {}", holder ? holder->pid.value_or(-1) : -2));
    return 0;
  });
  REQUIRE(wltest::eventually([&] { return takeover->waiting.load() == 1; }, kParentPatience));
  std::this_thread::sleep_for(20ms);  // let it settle into its wait
  INFO(takeover->diag.message());
  REQUIRE(takeover->acquired_ns.load() == 0);  // no acquisition while the primary lives

  const auto kill_ns = mono_ns();
  REQUIRE(::kill(primary, SIGKILL) == 0);
  CHECK(children.wait(primary) == 128 + SIGKILL);
  const int waiter_code = children.wait(waiter);
  INFO(takeover->diag.message());
  REQUIRE(waiter_code == 0);
  const double latency_ms = static_cast<double>(takeover->acquired_ns.load() - kill_ns) / 1e6;
  INFO("kill -> acquisition: " << latency_ms << " ms");
  CHECK(latency_ms >= 0.0);
  CHECK(latency_ms < 1000.0);  // woken by the kernel, not by a timeout; speed: tests/bench
}

TEST_CASE_METHOD(wltest::EachMechanism, "election: stale lock files never block an election",
                 "[election]") {
  const int kind = GENERATE(range(0, 10));
  Children children;
  Gate wake_sleeper;
  pid_t sleeper = 0;  // a live, unrelated process that sleeps through the election
  if (kind == 5 || kind == 7) {
    sleeper = children.spawn([&] {
      wake_sleeper.pass();
      return 0;
    });
    REQUIRE(::kill(sleeper, 0) == 0);
  }
  pid_t dead = 0;  // a pid that no longer runs
  if (kind == 8) {
    dead = children.spawn([] { return 0; });
    REQUIRE(children.wait(dead) == 0);
    REQUIRE(::kill(dead, 0) != 0);
  }

  std::string description;
  const auto now = system_clock::now();
  switch (kind) {
    case 0:
      description = "empty file";
      REQUIRE(write_file(path, ""));
      break;
    case 1: {
      description = "binary garbage";
      std::string bytes;
      for (int i = 0; i < 3000; ++i) bytes += static_cast<char>((i * 37 + 11) % 256);
      REQUIRE(write_file(path, bytes));
      break;
    }
    case 2: {
      description = "8 MiB sparse file";
      const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
      REQUIRE(fd >= 0);
      const int rc = ::ftruncate(fd, 8 << 20);
      ::close(fd);
      REQUIRE(rc == 0);
      break;
    }
    case 3: {
      description = "8 MiB of real bytes";
      std::string bytes;
      bytes.reserve(8 << 20);
      while (bytes.size() < (8u << 20)) bytes += "12345\nacquired=never\n";
      REQUIRE(write_file(path, bytes));
      break;
    }
    case 4:
      description = "record naming the live parent";
      REQUIRE(write_file(
          path, make_record(::getpid(), now, workerlock::to_string(mechanism), host_name())));
      break;
    case 5:
      description = "record naming a live sleeping child";
      REQUIRE(write_file(path,
                         make_record(sleeper, now, workerlock::to_string(mechanism), host_name())));
      break;
    case 6:
      description = "bare pidfile line naming the live parent";
      REQUIRE(write_file(path, fmt::format("{}\n", ::getpid())));
      break;
    case 7:
      description = "bare pidfile line naming a live sleeping child";
      REQUIRE(write_file(path, fmt::format("{}\n", sleeper)));
      break;
    case 8:
      description = "record naming a dead pid";
      REQUIRE(write_file(
          path, make_record(dead, now - 10min, workerlock::to_string(mechanism), host_name())));
      break;
    default:
      description = "record of another host and pid namespace";
      REQUIRE(write_file(path, make_record(1, now, "ofd", "elsewhere.example")));
      break;
  }
  INFO("mechanism=" << workerlock::to_string(mechanism) << " stale file: " << description);
  // A file that holds no record (garbage, another tool's pidfile) is locked but never written.
  const bool foreign = kind != 0 && (kind < 4 || kind == 6 || kind == 7);
  const std::string before = read_file(path);
  if (kind >= 4 && kind != 6 && kind != 7) REQUIRE(parse_exact_record(read_file(path)).has_value());

  // Nobody "thinks the lock is held" before the election.
  std::error_code ec;
  CHECK_FALSE(workerlock::lock_holder(path, ec).has_value());
  CHECK_FALSE(ec);
  CHECK_FALSE(workerlock::lock_holder(path).has_value());

  wltest::Shared<RaceBoard> board;
  const auto r = run_race(*board, path, 4, quiet(mechanism), !foreign);
  INFO(r.problem());
  CHECK(r.problem().empty());
  if (foreign) {
    CHECK(read_file(path) == before);
  } else {
    const auto after = check_after_race(path, r.winner, mechanism);
    INFO(after);
    CHECK(after.empty());
  }

  if (sleeper != 0) {
    CHECK(::kill(sleeper, 0) == 0);  // it lived through the election
    wake_sleeper.open();
    CHECK(children.wait(sleeper) == 0);
  }
}

TEST_CASE(
    "election: Role and ElectedRole format as primary or secondary and a forked copy reads "
    "secondary",
    "[election]") {
  CHECK(fmt::format("{}", Role::primary) == "primary");
  CHECK(fmt::format("{}", Role::secondary) == "secondary");
  CHECK(fmt::format("[{:>9}]", Role::primary) == "[  primary]");
  CHECK(workerlock::to_string(Role::secondary) == "secondary");
  std::ostringstream os;
  os << Role::primary << ' ' << Role::secondary;
  CHECK(os.str() == "primary secondary");

  const ElectedRole won(Role::primary, ::getpid());
  CHECK(fmt::format("{}", won) == "primary");
  CHECK(won == Role::primary);
  CHECK(Role::primary == won);
  CHECK_FALSE(won != Role::primary);
  CHECK(won.elected_in() == ::getpid());
  CHECK_FALSE(won.inherited_across_fork());
  std::ostringstream os2;
  const ElectedRole lost(Role::secondary, ::getpid());
  const ElectedRole unset;
  os2 << won << ' ' << lost << ' ' << unset;
  CHECK(os2.str() == "primary secondary secondary");
  const Role as_enum = won;
  CHECK(as_enum == Role::primary);

  // The structured binding the documentation promises, with the documented types.
  wltest::TempDir dir;
  const auto path = dir / "role.lock";
  auto [role, lock] = workerlock::is_primary_worker(path, quiet());
  static_assert(std::is_same_v<decltype(role), ElectedRole>);
  static_assert(std::is_same_v<decltype(lock), WorkerLock>);
  REQUIRE(role == Role::primary);
  REQUIRE(lock.owns_lock());
  CHECK(fmt::format("{}", role) == "primary");

  // A child forked after the election inherits role and handle, and neither says primary.
  wltest::Shared<Diag> diag;
  Children children;
  const pid_t parent = ::getpid();
  const pid_t child = children.spawn([&, &role = role, &lock = lock] {
    if (role == Role::primary) return diag->fail("inherited role reads primary");
    if (role.get() != Role::secondary) return diag->fail("role.get() is not secondary");
    if (!role.inherited_across_fork()) return diag->fail("inherited_across_fork() is false");
    if (role.elected_in() != parent) return diag->fail("elected_in() is not the parent");
    if (fmt::format("{}", role) != "secondary") return diag->fail("fmt does not say secondary");
    std::ostringstream out;
    out << role;
    if (out.str() != "secondary") return diag->fail("ostream does not say secondary");
    if (lock.owns_lock()) return diag->fail("inherited handle owns the lock");
    if (!lock.inherited_across_fork()) return diag->fail("handle not marked inherited");
    auto [mine, mine_lock] = workerlock::is_primary_worker(path, quiet());
    if (mine == Role::primary || mine_lock.owns_lock())
      return diag->fail("a fresh election won while the parent holds the lock");
    return 0;
  });
  INFO(diag->message());
  CHECK(children.wait(child) == 0);
  // The child closing its inherited copy did not release the parent's lock.
  CHECK(role == Role::primary);
  CHECK(lock.owns_lock());
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == ::getpid());
}

TEST_CASE(
    "election: default_lock_path follows WORKERLOCK_PATH then RUNTIME_DIRECTORY then "
    "XDG_RUNTIME_DIR",
    "[election]") {
  const char* const vars[] = {"WORKERLOCK_PATH", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"};
  std::vector<std::optional<std::string>> parent_env;
  for (const char* v : vars) {
    const char* value = std::getenv(v);
    parent_env.push_back(value != nullptr ? std::optional<std::string>(value) : std::nullopt);
  }

  const auto program = program_short_name();
  REQUIRE_FALSE(program.empty());
  const auto fallback_dir = fs::is_directory("/run/lock") ? "/run/lock" : "/tmp";
  struct Scenario {
    const char* name;
    const char* workerlock_path;  // nullptr: unset
    const char* runtime_directory;
    const char* xdg_runtime_dir;
    std::string expected;
  };
  const std::vector<Scenario> scenarios = {
      {"WORKERLOCK_PATH wins over everything", "/srv/app/explicit.lock", "/run/a:/run/b",
       "/run/user/4242", "/srv/app/explicit.lock"},
      {"RUNTIME_DIRECTORY, first of a colon list", nullptr, "/run/svc-a:/run/svc-b",
       "/run/user/4242", fmt::format("/run/svc-a/{}.lock", program)},
      {"empty WORKERLOCK_PATH is ignored", "", "/run/single", nullptr,
       fmt::format("/run/single/{}.lock", program)},
      {"XDG_RUNTIME_DIR", nullptr, nullptr, "/run/user/4242",
       fmt::format("/run/user/4242/{}.lock", program)},
      {"empty RUNTIME_DIRECTORY falls through to XDG_RUNTIME_DIR", nullptr, "", "/run/user/7",
       fmt::format("/run/user/7/{}.lock", program)},
      {"nothing set: /run/lock/<program>-<euid>.lock", nullptr, nullptr, nullptr,
       fmt::format("{}/{}-{}.lock", fallback_dir, program, ::geteuid())},
  };

  wltest::Shared<PathBoard> board;
  Children children;
  for (std::size_t i = 0; i < scenarios.size(); ++i) {
    const auto& s = scenarios[i];
    const pid_t pid = children.spawn([&] {
      const char* values[] = {s.workerlock_path, s.runtime_directory, s.xdg_runtime_dir};
      for (int v = 0; v < 3; ++v) {
        if (values[v] == nullptr) {
          ::unsetenv(vars[v]);
        } else {
          ::setenv(vars[v], values[v], 1);
        }
      }
      copy_text(board->got[i], workerlock::default_lock_path().native());
      return 0;
    });
    REQUIRE(children.wait(pid) == 0);
    INFO(s.name);
    CHECK(std::string(board->got[i]) == s.expected);
  }
  // The parent's environment is untouched.
  for (std::size_t v = 0; v < 3; ++v) {
    const char* value = std::getenv(vars[v]);
    INFO(vars[v]);
    CHECK((value != nullptr ? std::optional<std::string>(value) : std::nullopt) == parent_env[v]);
  }
}

TEST_CASE(
    "election: is_primary_worker without arguments locks default_lock_path from WORKERLOCK_PATH",
    "[election]") {
  wltest::TempDir dir;
  const auto path = dir / "from-env.lock";
  const auto log = dir / "stderr.txt";
  wltest::Shared<StepBoard> board;
  Children children;
  const pid_t child = children.spawn([&] {
    ::setenv("WORKERLOCK_PATH", path.c_str(), 1);
    if (!redirect_stderr(log)) return board->diag.fail("cannot redirect stderr");
    auto [role, lock] = workerlock::is_primary_worker();
    if (role != Role::primary) return board->diag.fail("not primary on a fresh path");
    if (lock.path() != path) return board->diag.fail("handle path is " + lock.path().string());
    board->step.store(1);
    if (!reach(board->step, 2, kChildPatience)) return board->diag.fail("timeout");
    return 0;
  });
  INFO(board->diag.message());
  REQUIRE(reach(board->step, 1, kParentPatience));
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == child);
  CHECK(std::getenv("WORKERLOCK_PATH") == nullptr);
  board->step.store(2);
  CHECK(children.wait(child) == 0);
  CHECK(read_file(log).find(fmt::format("pid={} role=primary path={}", child, path.native())) !=
        std::string::npos);
}

TEST_CASE("election: WORKERLOCK_ROLE=secondary keeps a worker out even while the lock is free",
          "[election]") {
  REQUIRE(std::getenv("WORKERLOCK_ROLE") == nullptr);
  wltest::TempDir dir;
  const auto path = dir / "override.lock";
  wltest::Shared<StepBoard> board;
  Children children;

  const pid_t kept_out = children.spawn([&] {
    auto& b = *board;
    ::setenv("WORKERLOCK_ROLE", "secondary", 1);
    if (workerlock::lock_holder(path)) return b.diag.fail("lock not free before the election");
    auto [role, lock] = workerlock::is_primary_worker(path, quiet());
    if (role != Role::secondary) return b.diag.fail("overridden worker is primary");
    if (lock.owns_lock()) return b.diag.fail("overridden handle owns the lock");
    for (int i = 0; i < 20; ++i)
      if (lock.try_lock()) return b.diag.fail("try_lock succeeded on a free lock");
    std::error_code ec;
    if (lock.try_lock(ec) || ec) return b.diag.fail("try_lock(ec) succeeded or erred");
    if (lock.try_lock_for(20ms)) return b.diag.fail("try_lock_for succeeded on a free lock");
    if (workerlock::lock_holder(path)) return b.diag.fail("someone holds it after our election");
    b.step.store(1);
    if (!reach(b.step, 2, kChildPatience)) return b.diag.fail("timeout at step 2");
    if (lock.try_lock()) return b.diag.fail("try_lock succeeded while the sibling holds it");
    b.step.store(3);
    if (!reach(b.step, 4, kChildPatience)) return b.diag.fail("timeout at step 4");
    if (lock.try_lock()) return b.diag.fail("try_lock succeeded after the sibling left");
    lock.lock(ec);  // must report, not wait forever or win
    if (!ec) return b.diag.fail("blocking lock() on a kept-out handle reported no error");
    if (lock.owns_lock()) return b.diag.fail("blocking lock() took the lock");
    return 0;
  });
  INFO(board->diag.message());
  REQUIRE(reach(board->step, 1, kParentPatience));
  CHECK_FALSE(workerlock::lock_holder(path).has_value());

  wltest::Shared<HolderBoard> sibling;
  const pid_t primary =
      spawn_primary(children, *sibling, path, quiet());  // a sibling without the override wins
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);
  board->step.store(2);
  REQUIRE(reach(board->step, 3, kParentPatience));
  sibling->release.store(true);
  CHECK(children.wait(primary) == 0);
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
  board->step.store(4);
  CHECK(children.wait(kept_out) == 0);
  CHECK_FALSE(workerlock::lock_holder(path).has_value());

  // With honour_role_override off, the same environment elects normally.
  wltest::Shared<Diag> diag;
  const pid_t ignoring = children.spawn([&] {
    ::setenv("WORKERLOCK_ROLE", "secondary", 1);
    Options options = quiet();
    options.honour_role_override = false;
    auto [role, lock] = workerlock::is_primary_worker(path, options);
    if (role != Role::primary) return diag->fail("override honoured although switched off");
    return 0;
  });
  INFO(diag->message());
  CHECK(children.wait(ignoring) == 0);
}

TEST_CASE("election: WORKERLOCK_ROLE=primary or an unknown value is an error and never primary",
          "[election]") {
  REQUIRE(std::getenv("WORKERLOCK_ROLE") == nullptr);
  const std::string value = GENERATE(as<std::string>{}, "primary", "banana", "PRIMARY", "1");
  INFO("WORKERLOCK_ROLE=" << value);
  wltest::TempDir dir;
  const auto path = dir / "forced.lock";
  wltest::Shared<PathBoard> board;
  Children children;
  const pid_t child = children.spawn([&] {
    auto& d = board->diag;
    ::setenv("WORKERLOCK_ROLE", value.c_str(), 1);
    try {
      auto election = workerlock::is_primary_worker(path, quiet());
      return d.fail(fmt::format("no exception; role={}", election.role));
    } catch (const workerlock::lock_error& e) {
      copy_text(board->got[0], e.what());
      if (e.path() != path) return d.fail("lock_error::path() is wrong");
      if (value == "primary" && e.code() != std::errc::operation_not_permitted)
        return d.fail(fmt::format("code is {}", e.code().message()));
    }
    std::error_code ec;
    auto election = workerlock::is_primary_worker(path, quiet(), ec);
    if (!ec) return d.fail("error_code overload reported no error");
    if (election.role != Role::secondary) return d.fail("error_code overload returned primary");
    if (election.lock.owns_lock()) return d.fail("error_code overload holds the lock");
    if (workerlock::lock_holder(path)) return d.fail("the lock was taken despite the error");
    return 0;
  });
  const int code = children.wait(child);
  INFO(board->diag.message());
  CHECK(code == 0);
  INFO("what(): " << board->got[0]);
  CHECK(std::string(board->got[0]).find("WORKERLOCK_ROLE") != std::string::npos);
  CHECK_FALSE(workerlock::lock_holder(path).has_value());

  // Contrast: "auto" means an ordinary election.
  const pid_t normal = children.spawn([&] {
    ::setenv("WORKERLOCK_ROLE", "auto", 1);
    auto [role, lock] = workerlock::is_primary_worker(path, quiet());
    return role == Role::primary && lock.owns_lock() ? 0 : 1;
  });
  CHECK(children.wait(normal) == 0);
}

TEST_CASE("election: log sink receives exactly one election line per worker with its pid and role",
          "[election]") {
  wltest::TempDir dir;
  const auto path = dir / "log.lock";
  wltest::Shared<LogBoard> board;
  Children children;

  SECTION("8 racing workers: one line each, one of them role=primary") {
    constexpr int kWorkers = 8;
    std::vector<pid_t> pids;
    Gate all_forked;
    for (int i = 0; i < kWorkers; ++i) {
      pids.push_back(children.spawn([&, i] {
        CapturingSink sink;
        const auto options = sink.options();
        all_forked.pass();
        board->start.arrive_and_wait();
        auto [role, lock] = workerlock::is_primary_worker(path, options);
        board->slot[i].role.store(role == Role::primary ? 0 : 1);
        sink.store(board->slot[i]);
        board->voted.fetch_add(1);  // hold until all voted: no second primary
        return reach(board->voted, kWorkers, kChildPatience) ? 0 : 1;
      }));
    }
    all_forked.open();
    REQUIRE(board->start.release_when(kWorkers));
    CHECK(children.wait_all_failures() == 0);
    int primaries = 0;
    for (int i = 0; i < kWorkers; ++i) {
      const auto& slot = board->slot[i];
      const std::string line = slot.text[0];
      INFO("worker " << i << " pid=" << pids[i] << " line: " << line);
      REQUIRE(slot.lines.load() == 1);
      CHECK(slot.pid.load() == pids[i]);
      CHECK(slot.levels[0].load() == static_cast<int>(LogLevel::info));
      const auto m = parse_election_line(line);
      REQUIRE(m.has_value());
      CHECK(m->pid == std::to_string(pids[i]));
      CHECK(m->role == (slot.role.load() == 0 ? "primary" : "secondary"));
      CHECK(m->path == path.native());
      primaries += slot.role.load() == 0 ? 1 : 0;
    }
    CHECK(primaries == 1);
  }

  SECTION("secondary with an established primary names the holder") {
    wltest::Shared<HolderBoard> holder_board;
    const pid_t primary = spawn_primary(children, *holder_board, path, quiet());
    const pid_t child = children.spawn([&] {
      CapturingSink sink;
      auto [role, lock] = workerlock::is_primary_worker(path, sink.options());
      board->slot[0].role.store(role == Role::primary ? 0 : 1);
      sink.store(board->slot[0]);
      return 0;
    });
    CHECK(children.wait(child) == 0);
    const std::string line = board->slot[0].text[0];
    INFO(line);
    CHECK(board->slot[0].lines.load() == 1);
    CHECK(board->slot[0].role.load() == 1);
    CHECK(line.rfind(
              fmt::format("workerlock: pid={} role=secondary path={} ", child, path.native()), 0) ==
          0);
    CHECK(line.find(fmt::format("holder={}", primary)) != std::string::npos);
    holder_board->release.store(true);
    CHECK(children.wait(primary) == 0);
  }

  SECTION("WORKERLOCK_ROLE=secondary logs role=secondary; =primary is reported, not logged") {
    const pid_t kept_out = children.spawn([&] {
      ::setenv("WORKERLOCK_ROLE", "secondary", 1);
      CapturingSink sink;
      auto [role, lock] = workerlock::is_primary_worker(path, sink.options());
      sink.store(board->slot[0]);
      return role == Role::secondary ? 0 : 1;
    });
    CHECK(children.wait(kept_out) == 0);
    const std::string line = board->slot[0].text[0];
    INFO(line);
    CHECK(board->slot[0].lines.load() == 1);
    const auto m = parse_election_line(line);
    REQUIRE(m.has_value());
    CHECK(m->pid == std::to_string(kept_out));
    CHECK(m->role == "secondary");

    const pid_t forced = children.spawn([&] {
      ::setenv("WORKERLOCK_ROLE", "primary", 1);
      CapturingSink sink;
      std::error_code ec;
      auto election = workerlock::is_primary_worker(path, sink.options(), ec);
      sink.store(board->slot[1]);
      return ec && election.role == Role::secondary ? 0 : 1;
    });
    CHECK(children.wait(forced) == 0);
    INFO(board->slot[1].text[0]);
    CHECK(board->slot[1].lines.load() == 0);  // reported once: through ec, never also logged
  }

  SECTION("elected in the parent before fork: the child warns and logs role=secondary") {
    CapturingSink parent_sink;
    auto [role, lock] = workerlock::is_primary_worker(path, parent_sink.options());
    REQUIRE(role == Role::primary);
    REQUIRE(parent_sink.lines.size() == 1);
    CHECK(parent_sink.lines[0].second.rfind(
              fmt::format("workerlock: pid={} role=primary path={}", ::getpid(), path.native()),
              0) == 0);
    const pid_t child = children.spawn([&] {
      CapturingSink sink;
      auto [child_role, child_lock] = workerlock::is_primary_worker(path, sink.options());
      sink.store(board->slot[0]);
      return child_role == Role::secondary && !child_lock.owns_lock() ? 0 : 1;
    });
    CHECK(children.wait(child) == 0);
    const auto& slot = board->slot[0];
    REQUIRE(slot.lines.load() == 2);
    const std::string warning = slot.text[0];
    const std::string line = slot.text[1];
    INFO(warning << "\n" << line);
    CHECK(slot.levels[0].load() == static_cast<int>(LogLevel::warning));
    CHECK(warning.find(fmt::format("parent pid={}", ::getpid())) != std::string::npos);
    const auto m = parse_election_line(line);
    REQUIRE(m.has_value());
    CHECK(m->pid == std::to_string(child));
    CHECK(m->role == "secondary");
  }
}

TEST_CASE("election: silent() writes nothing and the default sink writes one line to stderr",
          "[election]") {
  wltest::TempDir dir;
  const auto path = dir / "stderr.lock";
  CHECK_FALSE(static_cast<bool>(Options{}.silent().log));
  CHECK(static_cast<bool>(Options{}.log));
  wltest::Shared<HolderBoard> holder_board;
  wltest::Shared<Diag> diag;
  Children children;

  // A worker with stderr redirected to `file` runs one election; returns 0 (primary) or
  // 1 (secondary), or 2 on failure.
  const auto worker = [&](const fs::path& file, const Options& options) {
    return children.spawn([&, file] {
      if (!redirect_stderr(file)) return 2;
      auto [role, lock] = workerlock::is_primary_worker(path, options);
      return role == Role::primary ? 0 : 1;
    });
  };

  SECTION("silent()") {
    const pid_t first = worker(dir / "first.txt", Options{}.silent());
    CHECK(children.wait(first) == 0);
    const pid_t primary = spawn_primary(children, *holder_board, path, quiet());
    const pid_t second = worker(dir / "second.txt", Options{}.silent());
    CHECK(children.wait(second) == 1);
    CHECK(fs::exists(dir / "first.txt"));
    CHECK(read_file(dir / "first.txt").empty());
    CHECK(read_file(dir / "second.txt").empty());
    holder_board->release.store(true);
    CHECK(children.wait(primary) == 0);
  }

  SECTION("default sink: stderr") {
    const auto first_file = dir / "primary.txt";
    const pid_t first = children.spawn([&] {
      if (!redirect_stderr(first_file)) return diag->fail("cannot redirect stderr");
      auto [role, lock] = workerlock::is_primary_worker(path);  // default Options
      if (role != Role::primary) return diag->fail("not primary");
      holder_board->state.store(1);
      wltest::eventually([&] { return holder_board->release.load(); }, kChildPatience);
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return holder_board->state.load() == 1; }, kParentPatience));
    const pid_t second = worker(dir / "secondary.txt", Options{});
    CHECK(children.wait(second) == 1);
    holder_board->release.store(true);
    INFO(diag->message());
    CHECK(children.wait(first) == 0);

    const auto primary_text = read_file(first_file);
    const auto secondary_text = read_file(dir / "secondary.txt");
    INFO("primary's stderr: " << primary_text);
    INFO("secondary's stderr: " << secondary_text);
    for (const auto& [text, pid, role] : {std::tuple(primary_text, first, "primary"),
                                          std::tuple(secondary_text, second, "secondary")}) {
      REQUIRE_FALSE(text.empty());
      CHECK(text.back() == '\n');
      const auto lines = split_lines(text);
      REQUIRE(lines.size() == 1);
      const auto m = parse_election_line(lines[0]);
      REQUIRE(m.has_value());
      CHECK(m->pid == std::to_string(pid));
      CHECK(m->role == role);
      CHECK(m->path == path.native());
    }
  }
}

TEST_CASE(
    "election: WORKERLOCK_PATH values that are blank relative or hold control characters "
    "are refused",
    "[lock_file]") {
  const std::string value =
      GENERATE(as<std::string>{}, " ", "\t", "relative.lock", "./x.lock", "/tmp/x.lock\n",
               " /tmp/x.lock", "/tmp/x.lock ", "/tmp/a\001b.lock");
  INFO("WORKERLOCK_PATH='" << value << "'");
  wltest::TempDir dir;
  const auto problem = in_child([&]() -> std::string {
    if (::chdir(dir.path().c_str()) != 0) return "chdir";
    ::setenv("WORKERLOCK_PATH", value.c_str(), 1);
    std::error_code ec;
    const auto empty = workerlock::default_lock_path(ec);
    if (ec != std::errc::invalid_argument) return "ec: " + ec.message();
    if (!empty.empty()) return "default_lock_path(ec) returned " + empty.string();
    try {
      (void)workerlock::default_lock_path();
      return "default_lock_path() accepted it";
    } catch (const lock_error& e) {
      if (std::string(e.what()).find("WORKERLOCK_PATH") == std::string::npos)
        return std::string("what() does not name WORKERLOCK_PATH: ") + e.what();
      if (e.code() != std::errc::invalid_argument) return "code: " + e.code().message();
    }
    try {
      auto election = workerlock::is_primary_worker();
      return "is_primary_worker() elected with it";
    } catch (const lock_error&) {
    }
    if (!fs::is_empty(dir.path())) return "a file was created";
    return {};
  });
  CHECK(problem == "");
}

TEST_CASE(
    "election: an absolute WORKERLOCK_PATH is used and relative runtime directories are "
    "ignored",
    "[lock_file]") {
  wltest::TempDir dir;
  const auto problem = in_child([&]() -> std::string {
    ::setenv("WORKERLOCK_PATH", (dir / "ok.lock").c_str(), 1);
    if (workerlock::default_lock_path() != dir / "ok.lock") return "absolute value not used";
    ::unsetenv("WORKERLOCK_PATH");
    ::setenv("RUNTIME_DIRECTORY", "relative-runtime", 1);
    ::setenv("XDG_RUNTIME_DIR", dir.path().c_str(), 1);
    const auto got = workerlock::default_lock_path();
    if (got.parent_path() != dir.path()) return "relative RUNTIME_DIRECTORY used: " + got.string();
    ::setenv("XDG_RUNTIME_DIR", "relative-xdg", 1);
    if (workerlock::default_lock_path().is_relative()) return "relative XDG_RUNTIME_DIR used";
    return {};
  });
  CHECK(problem == "");
}
