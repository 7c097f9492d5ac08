// tests/support/network_lab.hpp: what the Redis and PostgreSQL tests share: holders run in a child,
// and the scenarios both backends must pass, each written once and given a backend factory.
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <workerlock/coordinator.hpp>

#include "common.hpp"
#include "paused_holder.hpp"
#include "raw_fork.hpp"

namespace wltest {

//! Coordinator options for tests: no log (WORKERLOCK_TEST_VERBOSE=1 logs to stderr), and a
//! short retry backoff (10 to 250 ms), so that a test waits for the backend, not the backoff.
inline workerlock::CoordinatorOptions quiet_coordinator_options() {
  using namespace std::chrono_literals;
  workerlock::CoordinatorOptions co;
  co.lock.log = nullptr;
  if (const char* v = std::getenv("WORKERLOCK_TEST_VERBOSE"); v != nullptr && *v == '1')
    co.lock.log = workerlock::stderr_sink;
  co.retry_backoff_min = 10ms;
  co.retry_backoff_max = 250ms;
  return co;
}

//! The position of `pid` in `pids`, -1 when it is not there.
inline int index_of(const std::vector<pid_t>& pids, int pid) {
  for (std::size_t i = 0; i < pids.size(); ++i)
    if (pids[i] == pid) return static_cast<int>(i);
  return -1;
}

//! The backend of `c`, as the type the test gave it.
template <typename Backend>
Backend& backend_of(workerlock::Coordinator& c) {
  return const_cast<Backend&>(dynamic_cast<const Backend&>(c.backend()));
}

//! Runs `holder` in a child of the test (killed with the test), killed after `limit` so that a
//! hang is a failure; returns its exit code as wait_or_kill() does.
template <typename F>
int run_holder(std::chrono::milliseconds limit, F&& holder) {
  std::fflush(nullptr);  // else the holder's copies would print the test's buffered output
  const pid_t pid = fork_child([&]() -> int {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    return holder();
  });
  return wait_or_kill(pid, limit);
}

//! Runs the holder of a raw-fork test in a child of the test, killed after `limit`: the holder
//! from `make_holder()` starts (`start()`, 0 or an exit code), `report.step` becomes 1, then
//! `copies(holder)` makes and checks the copies, then the holder stops
//! (`stop(report.released_by_parent)`). Returns the first of the three codes that is not 0,
//! else 0.
template <typename MakeHolder, typename Report, typename Copies>
int run_raw_fork_holder(std::chrono::milliseconds limit, MakeHolder make_holder, Report& report,
                        Copies&& copies) {
  return run_holder(limit, [&]() -> int {
    auto holder = make_holder();
    if (const int code = holder.start(); code != 0) return code;
    report.step = 1;
    if (const int code = copies(holder); code != 0) return code;
    return holder.stop(report.released_by_parent);
  });
}

//! Runs `body` in a child of the test whose descriptors 0, 1 and 2 are closed, killed after
//! `limit` so that a hang is a failure; returns its exit code as wait_or_kill() does.
template <typename F>
int run_without_standard_streams(std::chrono::milliseconds limit, F&& body) {
  return run_holder(limit, [&]() -> int {
    ::close(0);
    ::close(1);
    ::close(2);
    return body();
  });
}

//! Sets (or with nullptr unsets) the environment variable `name`, and puts back what it was
//! when it goes out of scope, also when a REQUIRE ends the test.
class ScopedEnvironmentVariable {
 public:
  ScopedEnvironmentVariable(const char* name, const char* value) : name_(name) {
    if (const char* saved = std::getenv(name)) saved_ = saved;
    set(value);
  }
  ~ScopedEnvironmentVariable() { set(saved_ ? saved_->c_str() : nullptr); }
  ScopedEnvironmentVariable(const ScopedEnvironmentVariable&) = delete;
  ScopedEnvironmentVariable& operator=(const ScopedEnvironmentVariable&) = delete;

  void set(const char* value) {
    if (value != nullptr)
      ::setenv(name_.c_str(), value, 1);
    else
      ::unsetenv(name_.c_str());
  }

 private:
  std::string name_;
  std::optional<std::string> saved_;
};

//! What a network backend of type `Backend` does with the bad options `o`: prepare() throws a
//! lock_error (std::errc::invalid_argument) whose what() contains `text` and never the password
//! "topsecret", and for which `more_checks(backend, error)` holds; try_acquire() and
//! wait_acquire() throw lock_error; nothing is held, no fencing token; a Coordinator on such a
//! backend refuses start(), in both forms, and stays a secondary that is not running.
template <typename Backend, typename Options, typename MoreChecks>
void check_bad_configuration(const Options& o, const char* text, MoreChecks&& more_checks) {
  INFO("expected: " << text);
  Backend backend(o);
  try {
    backend.prepare();
    FAIL("prepare() did not throw");
  } catch (const workerlock::lock_error& e) {
    CHECK_THAT(e.what(), Catch::Contains(text));
    CHECK_THAT(e.what(), !Catch::Contains("topsecret"));
    CHECK(e.code() == std::errc::invalid_argument);
    more_checks(backend, e);
  }
  CHECK_THROWS_AS(backend.try_acquire(), workerlock::lock_error);
  workerlock::Interrupter never;  // never interrupted: only the error can end the wait
  CHECK_THROWS_AS(backend.wait_acquire(never), workerlock::lock_error);
  CHECK_FALSE(backend.held());
  CHECK(backend.fencing_token() == 0);
  workerlock::Coordinator c(std::make_unique<Backend>(o), quiet_coordinator_options());
  CHECK_THROWS_AS(c.start(), workerlock::lock_error);
  std::error_code ec;
  c.start(ec);
  CHECK(ec == std::errc::invalid_argument);
  CHECK(c.role() == workerlock::Role::secondary);
  CHECK_FALSE(c.running());
}

//! `n` processes, each with a backend from `make_backend()` prepared beforehand, call
//! try_acquire() at the same instant: none throws and exactly one wins. They keep what they got
//! until every one has tried and `hold` has passed; then the winner's verify_held() is true.
template <typename MakeBackend>
void check_race_has_one_winner(int n, MakeBackend make_backend, std::chrono::milliseconds hold) {
  struct Race {
    StartLine line;
    std::atomic<int> attempted{0};
    std::atomic<int> winners{0};
    std::atomic<int> errors{0};
    std::atomic<bool> done{false};
  };
  Shared<Race> race;
  std::vector<pid_t> pids;
  for (int i = 0; i < n; ++i) {
    pids.push_back(fork_child([&] {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      auto backend = make_backend();
      backend->prepare();
      race->line.arrive_and_wait();
      bool won = false;
      try {
        won = backend->try_acquire();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "try_acquire() threw: %s\n", e.what());
        race->errors.fetch_add(1);
      }
      if (won) race->winners.fetch_add(1);
      race->attempted.fetch_add(1);
      while (!race->done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      if (won && !backend->verify_held()) return 2;
      backend->release();
      return race->errors.load() == 0 ? 0 : 1;
    }));
  }
  const bool started = race->line.release_when(n);
  const bool all_tried =
      eventually([&] { return race->attempted.load() == n; }, std::chrono::seconds(30));
  std::this_thread::sleep_for(hold);
  const int winners = race->winners.load();
  race->done.store(true);  // the children end before any REQUIRE below can end the test
  CHECK(wait_all_failures(pids) == 0);
  REQUIRE(started);
  REQUIRE(all_tried);
  CHECK(race->errors.load() == 0);
  REQUIRE(winners == 1);
}

//! Two Coordinators in WaitMode::polled on backends from `make_backend()`: the first started is
//! primary and stays so through `hold` of polling (it renews, the standby stays out), promoted
//! once and never demoted; its stop() demotes it, and within `takeover` the standby's poll()
//! promotes the standby, once, with a higher fencing token.
template <typename MakeBackend>
void check_polled_handover(MakeBackend make_backend, std::chrono::milliseconds hold,
                           std::chrono::milliseconds takeover) {
  using workerlock::Role;
  auto co = quiet_coordinator_options();
  co.wait = workerlock::WaitMode::polled;
  workerlock::Coordinator first(make_backend(), co);
  workerlock::Coordinator second(make_backend(), co);
  int promoted[2] = {0, 0};
  int demoted[2] = {0, 0};
  first.on_promoted([&] { ++promoted[0]; }).on_demoted([&] { ++demoted[0]; });
  second.on_promoted([&] { ++promoted[1]; }).on_demoted([&] { ++demoted[1]; });
  first.start();
  second.start();
  REQUIRE(first.role() == Role::primary);
  REQUIRE(second.role() == Role::secondary);
  const auto f1 = first.fencing_token();
  CHECK(f1 > 0);
  const auto until = std::chrono::steady_clock::now() + hold;
  while (std::chrono::steady_clock::now() < until) {
    first.poll();
    second.poll();
    std::this_thread::sleep_for(workerlock::recommended_poll_interval);
  }
  CHECK(first.role() == Role::primary);
  CHECK(second.role() == Role::secondary);
  CHECK(promoted[0] == 1);
  CHECK(demoted[0] == 0);
  first.stop();
  CHECK(demoted[0] == 1);
  REQUIRE(eventually(
      [&] {
        second.poll();
        return second.role() == Role::primary;
      },
      takeover));
  CHECK(second.fencing_token() > f1);
  CHECK(promoted[1] == 1);
  second.stop();
}

//! Two Coordinators on backends from `make_backend()` hand the role over `failovers` times while
//! two threads read role(), fencing_token() and the backend's fencing_token(), valid_until(),
//! describe(), network_target() and `read_more(backend)` of both, in a loop (ThreadSanitizer
//! checks these reads against the coordinator threads). Each time a primary is there within
//! `primary_within`, `hand_over(c, p, n)` makes c[p] give up the role for the n-th time, a new
//! promotion follows within `takeover`, and a stopped c[p] starts again. Fencing tokens only
//! grow, no reader saw a token above the last one issued, and each Coordinator was read as
//! primary and as valid at least once.
template <typename Backend, typename MakeBackend, typename HandOver, typename ReadMore>
void check_accessors_during_failovers(MakeBackend make_backend, HandOver hand_over,
                                      ReadMore read_more, std::chrono::milliseconds primary_within,
                                      std::chrono::milliseconds takeover) {
  using workerlock::Role;
  workerlock::Coordinator c[2] = {
      workerlock::Coordinator(make_backend(), quiet_coordinator_options()),
      workerlock::Coordinator(make_backend(), quiet_coordinator_options())};
  std::atomic<int> promotions{0};
  std::atomic<int> fence_violations{0};
  std::atomic<std::uint64_t> last_token{0};
  for (int i = 0; i < 2; ++i) {
    c[i].on_promoted([&, i] {
      const auto token = c[i].fencing_token();
      if (token <= last_token.load()) fence_violations.fetch_add(1);
      last_token.store(token);
      promotions.fetch_add(1);
    });
  }
  struct Reads {  // what the readers saw of one Coordinator
    std::atomic<long> rounds{0};
    std::atomic<long> primary{0};
    std::atomic<long> valid{0};
  };
  Reads reads[2];
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> seen[2] = {0, 0};  // the largest token each reader saw
  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r) {
    readers.emplace_back([&, r] {
      auto& max_seen = seen[r];
      while (!done.load()) {
        for (int i = 0; i < 2; ++i) {
          const auto& backend = dynamic_cast<const Backend&>(c[i].backend());
          if (c[i].role() == Role::primary) reads[i].primary.fetch_add(1);
          const auto token = std::max(c[i].fencing_token(), backend.fencing_token());
          if (token > max_seen.load()) max_seen.store(token);  // one writer per reader
          if (backend.valid_until() > std::chrono::steady_clock::now()) reads[i].valid++;
          read_more(backend);
          (void)backend.describe();
          (void)backend.network_target();
          reads[i].rounds++;
        }
      }
    });
  }
  struct JoinReaders {  // also when a REQUIRE throws: a joinable thread would terminate()
    std::atomic<bool>& done;
    std::vector<std::thread>& readers;
    ~JoinReaders() {
      done.store(true);
      for (auto& t : readers)
        if (t.joinable()) t.join();
    }
  } join_readers{done, readers};
  c[0].start();
  c[1].start();
  constexpr int failovers = 6;
  for (int n = 0; n < failovers; ++n) {
    // Exactly one reads primary: a holder whose session the server ended still reads primary
    // until its next check notices, and handing "its" role over would promote nobody.
    REQUIRE(
        eventually([&] { return (c[0].role() == Role::primary) != (c[1].role() == Role::primary); },
                   primary_within));
    // The promotion is counted in on_promoted, which may run a moment after role() says so.
    REQUIRE(eventually([&] { return promotions.load() >= n + 1; }, takeover));
    const int before = promotions.load();
    const int p = c[0].role() == Role::primary ? 0 : 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    hand_over(c, p, n);
    REQUIRE(eventually([&] { return promotions.load() > before; }, takeover));
    if (!c[p].running()) c[p].start();
  }
  done.store(true);
  for (auto& t : readers) t.join();
  c[0].stop();
  c[1].stop();
  CHECK(fence_violations.load() == 0);
  CHECK(promotions.load() >= failovers + 1);
  for (const auto& s : seen) CHECK(s.load() <= last_token.load());  // no token from nowhere
  for (const auto& r : reads) {
    CHECK(r.rounds.load() > 0);
    CHECK(r.primary.load() > 0);
    CHECK(r.valid.load() > 0);
  }
}

//! The backend half of "a paused holder's role ends on its own": pause_holder() pauses a holder
//! on `make_backend()` for `pause`; the holder saw the pause as a jump of more than `seen`, and
//! its backend's valid_until() had passed when it ran again.
template <typename MakeBackend>
void check_paused_backend_expired(MakeBackend make_backend, std::chrono::milliseconds jump,
                                  std::chrono::milliseconds pause, std::chrono::milliseconds seen) {
  Shared<PauseReport> report;
  REQUIRE(pause_holder(make_backend, quiet_coordinator_options(), jump, pause, *report) == 0);
  INFO("jump " << report->jump_ns.load() / 1000000 << " ms; held after it "
               << report->held_after_jump.load());
  CHECK(report->jump_ns.load() > std::chrono::nanoseconds(seen).count());  // the SIGSTOP
  CHECK(report->expired_by_ns.load() > 0);  // valid_until() < the clock read before it
}

//! The Coordinator half: the paused holder's role() reads secondary the moment it runs again
//! (it compares the backend's valid_until() with the clock), before on_demoted has returned.
template <typename MakeBackend>
void check_paused_role_secondary(MakeBackend make_backend, std::chrono::milliseconds jump,
                                 std::chrono::milliseconds pause, std::chrono::milliseconds seen) {
  Shared<PauseReport> report;
  REQUIRE(pause_holder(make_backend, quiet_coordinator_options(), jump, pause, *report) == 0);
  INFO("jump " << report->jump_ns.load() / 1000000 << " ms");
  CHECK(report->jump_ns.load() > std::chrono::nanoseconds(seen).count());
  CHECK(report->role_after_jump.load() == 0);
  CHECK(report->primary_reads_after_jump.load() == 0);
}

}  // namespace wltest
