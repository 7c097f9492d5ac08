// tests/test_coordinator_contract.cpp: the Coordinator's public contract: accessors from any
// thread, a lease that runs out, errors reported once, callbacks' signal mask, whole-server stop.
//
// Tests about the Coordinator's own logic use small Backend subclasses in this process; tests
// about processes (the whole-server stop) fork real workers that report through shared memory.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <workerlock/workerlock.hpp>

#include "support/common.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/raw_fork.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using std::chrono::steady_clock;
using workerlock::Backend;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::LogLevel;
using workerlock::Role;
using workerlock::StopScope;
using workerlock::WaitMode;

const char* mode_name(WaitMode mode) {
  return mode == WaitMode::polled ? "polled" : "background_thread";
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             steady_clock::now().time_since_epoch())
      .count();
}

//! A lease in memory: always granted, with a deadline the test moves. The Coordinator
//! verifies it only once an hour, so only role() and valid_until() can notice the deadline.
class FakeLease : public Backend {
 public:
  std::atomic<std::int64_t> deadline_ns{std::numeric_limits<std::int64_t>::max()};

  bool try_acquire() override {
    holding_.store(true);
    return true;
  }
  bool wait_acquire(workerlock::Interrupter& interrupter) override {
    interrupter.wait(-1, 0, steady_clock::time_point::max());
    return false;
  }
  bool verify_held() override { return true; }
  std::chrono::milliseconds verify_interval() const noexcept override { return 1h; }
  void release() noexcept override { holding_.store(false); }
  bool held() const noexcept override { return holding_.load(); }
  std::string describe() const override { return "fake lease"; }
  std::uint64_t fencing_token() const noexcept override { return holding_.load() ? 7 : 0; }
  steady_clock::time_point valid_until() const noexcept override {
    if (!holding_.load()) return steady_clock::time_point::min();
    return steady_clock::time_point(std::chrono::nanoseconds(deadline_ns.load()));
  }

 private:
  std::atomic<bool> holding_{false};
};

//! A network backend whose server refuses every connection.
class RefusingServer final : public FakeLease {
 public:
  bool try_acquire() override {
    throw std::system_error(ECONNREFUSED, std::system_category(), "connect");
  }
  std::string network_target() const override { return "fake 127.0.0.1:1 key=app:primary"; }
  std::filesystem::path error_path() const override { return "fake-path-that-must-not-show"; }
};

//! A backend that runs out of memory describing itself.
class OutOfMemory final : public FakeLease {
 public:
  std::string describe() const override { throw std::bad_alloc(); }
};

//! A startup barrier's record in memory: the generation completed, shared between backends.
class MemoryMarker final : public workerlock::GenerationMarker {
 public:
  MemoryMarker(std::shared_ptr<std::string> record, std::string generation)
      : record_(std::move(record)), generation_(std::move(generation)) {}
  bool completed() const override { return *record_ == generation_; }
  void complete() override { *record_ = generation_; }
  std::string describe() const override { return "memory"; }

 private:
  std::shared_ptr<std::string> record_;
  std::string generation_;
};

//! A lease that keeps a startup barrier's record in memory.
class LeaseWithBarrier final : public FakeLease {
 public:
  std::shared_ptr<std::string> record = std::make_shared<std::string>();
  std::unique_ptr<workerlock::GenerationMarker> startup_barrier(
      const std::string& generation) const override {
    return std::make_unique<MemoryMarker>(record, generation);
  }
};

//! A lease whose check cannot tell (it throws) while `cannot_tell` is set.
class UnprovableLease final : public FakeLease {
 public:
  std::atomic<bool> cannot_tell{false};
  std::atomic<int> checks{0};
  bool verify_held() override {
    checks.fetch_add(1);
    if (cannot_tell.load())
      throw workerlock::lock_error("renew the lease on",
                                   workerlock::lock_error::network_target{"fake"},
                                   std::make_error_code(std::errc::timed_out));
    return true;
  }
  std::chrono::milliseconds verify_interval() const noexcept override { return 20ms; }
};

}  // namespace

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: role() reads secondary as soon as the lease's local deadline passes, "
    "before on_demoted runs",
    "[coordinator][coordinator_contract][threads]") {
  INFO("mode " << mode_name(mode));
  auto backend = std::make_unique<FakeLease>();
  FakeLease& lease = *backend;
  CoordinatorOptions options;
  options.wait = mode;
  Coordinator c(std::move(backend), options);
  std::atomic<int> promoted{0};
  std::atomic<int> demoted{0};
  c.on_promoted([&] { promoted.fetch_add(1); });
  c.on_demoted([&] { demoted.fetch_add(1); });
  CHECK(c.valid_until() == steady_clock::time_point::min());  // before start()

  const auto in_a_minute = steady_clock::now() + 60s;
  lease.deadline_ns.store(
      std::chrono::duration_cast<std::chrono::nanoseconds>(in_a_minute.time_since_epoch()).count());
  c.start();
  REQUIRE(wltest::eventually([&] { return promoted.load() == 1; }));
  CHECK(c.role() == Role::primary);
  CHECK(c.valid_until() == in_a_minute);  // "still valid for the next N ms" is answerable
  CHECK(c.fencing_token() == 7);

  // The lease runs out (a paused process woke up): no thread of the Coordinator ran since.
  lease.deadline_ns.store(now_ns() - 1'000'000);
  CHECK(c.role() == Role::secondary);
  CHECK(c.valid_until() < steady_clock::now());
  CHECK(demoted.load() == 0);  // role() did not wait for on_demoted

  c.stop();
  CHECK(demoted.load() == 1);
  CHECK(c.role() == Role::secondary);
  CHECK(c.valid_until() == steady_clock::time_point::min());
}

TEST_CASE("coordinator contract: the error_code twins never throw, even when the log sink throws",
          "[coordinator][coordinator_contract]") {
  std::error_code ec;
  const std::chrono::milliseconds timeout(0);
  {
    Coordinator probe(std::make_unique<FakeLease>());
    CHECK(noexcept(probe.start(ec)));
    CHECK(noexcept(probe.wait_for_startup(timeout, ec)));
  }
  std::atomic<int> sink_calls{0};
  CoordinatorOptions options;
  options.lock.log = [&](LogLevel, std::string_view) {
    sink_calls.fetch_add(1);
    throw std::runtime_error("the log sink is broken");
  };

  SECTION("a bad option") {
    options.health_check_interval = 0ms;
    wltest::TempDir dir;
    Coordinator c(dir / "primary.lock", options);
    REQUIRE_NOTHROW(c.start(ec));
    CHECK(ec == workerlock::errc::bad_configuration);
    CHECK(ec == std::errc::invalid_argument);
    CHECK(c.role() == Role::secondary);
    CHECK_FALSE(c.running());
  }
  SECTION("an unopenable lock file") {
    Coordinator c(fs::path("/nonexistent-workerlock-dir") / "sub" / "primary.lock", options);
    REQUIRE_NOTHROW(c.start(ec));
    CHECK(ec == std::errc::no_such_file_or_directory);
    CHECK(c.role() == Role::secondary);
    CHECK_FALSE(c.running());
  }
  SECTION("a backend that runs out of memory") {
    Coordinator c(std::make_unique<OutOfMemory>(), options);
    REQUIRE_NOTHROW(c.start(ec));
    CHECK(ec == std::errc::not_enough_memory);
    CHECK_FALSE(c.running());
  }
  SECTION("a lease that is granted: the sink throws on every line, start(ec) succeeds") {
    Coordinator c(std::make_unique<FakeLease>(), options);
    REQUIRE_NOTHROW(c.start(ec));
    CHECK_FALSE(ec);
    REQUIRE(wltest::eventually([&] { return c.role() == Role::primary; }));
    c.stop();
    CHECK(sink_calls.load() >= 1);
  }
}

TEST_CASE(
    "coordinator contract: a network backend's start() error names its target, with an empty "
    "path",
    "[coordinator][coordinator_contract]") {
  std::vector<std::string> lines;
  CoordinatorOptions options;
  options.lock.log = [&](LogLevel level, std::string_view line) {
    if (level == LogLevel::error) lines.emplace_back(line);
  };
  Coordinator c(std::make_unique<RefusingServer>(), options);
  bool caught = false;
  try {
    c.start();
  } catch (const workerlock::lock_error& error) {
    caught = true;
    INFO(error.what());
    CHECK(error.code() == std::errc::connection_refused);
    CHECK(error.path().empty());
    CHECK(error.target() == "fake 127.0.0.1:1 key=app:primary");
    CHECK(std::string(error.what()).find("fake-path-that-must-not-show") == std::string::npos);
  }
  CHECK(caught);
  CHECK(lines.empty());  // reported once: thrown, not also logged
  std::error_code ec;
  c.start(ec);
  CHECK(ec == std::errc::connection_refused);
  CHECK(lines.empty());
  CHECK(c.role() == Role::secondary);
}

TEST_CASE(
    "coordinator contract: invalid CoordinatorOptions are errc::bad_configuration, equal to "
    "std::errc::invalid_argument",
    "[coordinator][coordinator_contract]") {
  const int field = GENERATE(range(0, 5));
  INFO("field " << field);
  wltest::TempDir dir;
  CoordinatorOptions options;
  const char* name = "";
  switch (field) {
    case 0:
      options.health_check_interval = -1ms, name = "health_check_interval";
      break;
    case 1:
      options.retry_backoff_min = 0ms, name = "retry_backoff_min";
      break;
    case 2:
      options.retry_backoff_max = 1ms, name = "retry_backoff_max";
      break;
    case 3:
      options.wakeup_signal = SIGKILL, name = "wakeup_signal";
      break;
    default:
      options.server_stop_grace = -1ms, name = "server_stop_grace";
      break;
  }
  Coordinator c(dir / "primary.lock", options);
  bool caught = false;
  try {
    c.start();
  } catch (const workerlock::lock_error& error) {
    caught = true;
    INFO(error.what());
    CHECK(error.code() == workerlock::errc::bad_configuration);
    CHECK(error.code() == std::errc::invalid_argument);
    CHECK(std::string(error.what()).find(name) != std::string::npos);
  }
  CHECK(caught);
  std::error_code ec;
  c.start(ec);
  CHECK(ec == workerlock::errc::bad_configuration);
  CHECK(ec == std::errc::invalid_argument);

  // The startup generation is checked when the Coordinator is built.
  CoordinatorOptions bad_generation;
  bad_generation.startup_generation = "two\nlines";
  bool generation_refused = false;
  try {
    Coordinator refused(dir / "primary.lock", bad_generation);
  } catch (const workerlock::lock_error& error) {
    generation_refused = true;
    CHECK(error.code() == workerlock::errc::bad_configuration);
    CHECK(error.code() == std::errc::invalid_argument);
  }
  CHECK(generation_refused);
}

namespace {

//! The signals blocked in `set`, as a string of 0/1 per signal number, for comparisons.
std::string blocked(const sigset_t& set) {
  std::string bits;
  for (int signal = 1; signal <= SIGRTMAX; ++signal)
    bits += sigismember(&set, signal) == 1 ? '1' : '0';
  return bits;
}

std::string current_mask() {
  sigset_t set;
  ::pthread_sigmask(SIG_SETMASK, nullptr, &set);
  return blocked(set);
}

}  // namespace

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: callbacks, and the threads they start, run with the host's signal "
    "mask",
    "[coordinator][coordinator_contract][threads]") {
  INFO("mode " << mode_name(mode));
  wltest::TempDir dir;
  std::string host, in_promoted, in_thread, in_demoted;
  // A host thread with a mask of its own: SIGUSR1 blocked, SIGTERM and the rest not.
  std::thread host_thread([&] {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    ::pthread_sigmask(SIG_SETMASK, &mask, nullptr);
    host = current_mask();
    CoordinatorOptions options;
    options.wait = mode;
    Coordinator c(dir / "primary.lock", options);
    c.on_promoted([&] {
      in_promoted = current_mask();
      std::thread started([&] { in_thread = current_mask(); });  // like the example's scheduler
      started.join();
    });
    c.on_demoted([&] { in_demoted = current_mask(); });
    c.start();
    wltest::eventually([&] { return c.role() == Role::primary; });
    std::this_thread::sleep_for(20ms);  // on_promoted finished (it runs before nothing else)
    c.stop();
  });
  host_thread.join();
  REQUIRE(host.size() == static_cast<std::size_t>(SIGRTMAX));
  CHECK(host[SIGUSR1 - 1] == '1');
  CHECK(host[SIGTERM - 1] == '0');
  CHECK(in_promoted == host);
  CHECK(in_thread == host);
  CHECK(in_demoted == host);
}

TEST_CASE(
    "coordinator contract: role(), fencing_token() and valid_until() may be read from any "
    "thread during failovers",
    "[coordinator][coordinator_contract][threads]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  Coordinator a(path);
  Coordinator b(path);
  std::atomic<bool> done{false};
  std::atomic<long> primary_reads{0};
  std::atomic<long> odd_reads{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < 2; ++i) {
    readers.emplace_back([&] {
      while (!done.load()) {
        for (Coordinator* c : {&a, &b}) {
          const auto until = c->valid_until();
          if (until != steady_clock::time_point::max() && until != steady_clock::time_point::min())
            odd_reads.fetch_add(1);  // a lock file's hold does not expire by time
          if (c->fencing_token() != 0) odd_reads.fetch_add(1);
          if (c->role() == Role::primary) primary_reads.fetch_add(1);
        }
      }
    });
  }
  a.start();
  b.start();
  for (int round = 0; round < 6; ++round) {
    Coordinator& holder = round % 2 == 0 ? a : b;
    Coordinator& standby = round % 2 == 0 ? b : a;
    REQUIRE(wltest::eventually([&] { return holder.role() == Role::primary; }));
    holder.stop();  // failover to the standby
    REQUIRE(wltest::eventually([&] { return standby.role() == Role::primary; }));
    holder.start();
  }
  done.store(true);
  for (auto& reader : readers) reader.join();
  a.stop();
  b.stop();
  CHECK(odd_reads.load() == 0);
  CHECK(primary_reads.load() > 0);
}

// ----------------------------------------------------------------------------------------
// Whole-server stop: forked workers, each stopped by SIGTERM as a server's master would.
// ----------------------------------------------------------------------------------------

namespace {

struct WorkerReport {
  std::atomic<int> started{0};
  std::atomic<int> promoted{0};
  std::atomic<int> demoted{0};
  std::atomic<int> deferred{0};          // log lines saying the promotion is deferred
  std::atomic<int> stale_promotions{0};  // on_promoted while the path names another file
  std::atomic<std::int64_t> promoted_ns{0};
  std::atomic<std::int64_t> demoted_ns{0};
  std::atomic<int> exited{0};
};

struct Board {
  WorkerReport worker[3];
};

Coordinator* g_coordinator = nullptr;
StopScope g_scope = StopScope::worker;

extern "C" void stop_on_sigterm(int) { g_coordinator->request_stop(g_scope); }

//! A worker: joins the election, stops on SIGTERM with `scope`, exits 0.
int run_worker(WorkerReport& r, const fs::path& path, WaitMode mode, StopScope scope,
               std::chrono::milliseconds grace) {
  CoordinatorOptions options;
  options.wait = mode;
  options.server_stop_grace = grace;
  options.lock.log = [&r](LogLevel, std::string_view line) {
    if (line.find("defers on_promoted") != std::string_view::npos) r.deferred.fetch_add(1);
  };
  Coordinator c(path, options);
  c.on_promoted([&r, &c, &path] {
    // The file held must be the one the path names (not a file replaced meanwhile).
    const auto& backend = static_cast<const workerlock::FileBackend&>(c.backend());
    struct stat held {};
    struct stat named {};
    if (::fstat(backend.lock().native_handle(), &held) != 0 || ::stat(path.c_str(), &named) != 0 ||
        held.st_ino != named.st_ino || held.st_dev != named.st_dev)
      r.stale_promotions.fetch_add(1);
    r.promoted_ns.store(now_ns());
    r.promoted.fetch_add(1);
  });
  c.on_demoted([&r] {
    r.demoted_ns.store(now_ns());
    r.demoted.fetch_add(1);
  });
  g_coordinator = &c;
  g_scope = scope;
  struct sigaction term {};
  term.sa_handler = &stop_on_sigterm;
  sigemptyset(&term.sa_mask);
  if (::sigaction(SIGTERM, &term, nullptr) != 0) return 10;
  c.start();
  r.started.store(1);
  while (c.running()) {
    c.poll();
    std::this_thread::sleep_for(2ms);
  }
  c.stop();
  r.exited.store(1);
  return 0;
}

//! Worker 0, which becomes the primary, and worker 1, a standby, on one lock file.
struct TwoWorkers {
  wltest::TempDir dir;
  fs::path path = dir / "primary.lock";
  wltest::Shared<Board> board;
  wltest::Children children;
  WorkerReport& a = board->worker[0];
  WorkerReport& b = board->worker[1];
  pid_t pa = 0;
  pid_t pb = 0;

  TwoWorkers(WaitMode mode, StopScope primary_scope, StopScope standby_scope,
             std::chrono::milliseconds grace) {
    pa = children.spawn([&] { return run_worker(a, path, mode, primary_scope, grace); });
    REQUIRE(wltest::eventually([&] { return a.promoted.load() == 1; }, 10s));
    pb = children.spawn([&] { return run_worker(b, path, mode, standby_scope, grace); });
    REQUIRE(wltest::eventually([&] { return b.started.load() == 1; }, 10s));
  }

  //! SIGTERMs the first primary, a (its handler stops it), and returns its exit code.
  int terminate_a() { return terminate(pa); }
  //! SIGTERMs the standby, b, and returns its exit code.
  int terminate_b() { return terminate(pb); }

 private:
  int terminate(pid_t pid) {
    ::kill(pid, SIGTERM);
    return children.wait(pid);
  }
};

}  // namespace

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a whole-server stop never promotes a standby that is stopped "
    "during the grace",
    "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  const std::chrono::milliseconds grace =
      20s;  // far longer than the test needs: the standby is stopped in it
  TwoWorkers w(mode, StopScope::whole_server, StopScope::whole_server, grace);
  WorkerReport& a = w.a;
  WorkerReport& b = w.b;

  CHECK(w.terminate_a() == 0);
  CHECK(a.demoted.load() == 1);
  // b takes the lock; without the note it would run on_promoted now.
  REQUIRE(wltest::eventually([&] { return b.deferred.load() + b.promoted.load() > 0; }, 10s));
  CHECK(w.terminate_b() == 0);
  CHECK(b.promoted.load() == 0);
  CHECK(b.demoted.load() == 0);
  CHECK(b.deferred.load() == 1);

  // The lock is free again, and nothing outlives the stop.
  workerlock::WorkerLock probe(w.path);
  CHECK(probe.try_lock());
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a rolling stop hands over at once, whole-server stops aside",
    "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  const std::chrono::milliseconds grace = 20s;
  TwoWorkers w(mode, StopScope::worker, StopScope::worker, grace);
  WorkerReport& a = w.a;
  WorkerReport& b = w.b;

  CHECK(w.terminate_a() == 0);
  REQUIRE(wltest::eventually([&] { return b.promoted.load() == 1; }, 10s));  // not 20 s
  CHECK(b.deferred.load() == 0);
  CHECK(b.promoted_ns.load() - a.demoted_ns.load() < std::chrono::nanoseconds(10s).count());
  CHECK(w.terminate_b() == 0);
  CHECK(b.demoted.load() == 1);
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: after a whole-server stop, a standby that is not stopped is "
    "promoted once the grace has passed",
    "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  const std::chrono::milliseconds grace = 1s;
  TwoWorkers w(mode, StopScope::whole_server, StopScope::worker, grace);
  WorkerReport& a = w.a;
  WorkerReport& b = w.b;

  CHECK(w.terminate_a() == 0);
  REQUIRE(wltest::eventually([&] { return b.promoted.load() == 1; }, 20s));
  CHECK(b.deferred.load() == 1);
  // The note is written after on_demoted, and the grace counts from the note.
  CHECK(b.promoted_ns.load() - a.demoted_ns.load() >= std::chrono::nanoseconds(grace).count());
  CHECK(w.terminate_b() == 0);
  CHECK(b.demoted.load() == 1);
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a deferred standby stopped with whole_server keeps the original "
    "note, so the time without a primary is bounded by one grace",
    "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  const std::chrono::milliseconds grace = 6s;
  const auto grace_ns = std::chrono::nanoseconds(grace).count();
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Shared<Board> board;
  wltest::Children children;
  WorkerReport& p = board->worker[0];
  WorkerReport& a = board->worker[1];
  WorkerReport& b = board->worker[2];
  const pid_t pp =
      children.spawn([&] { return run_worker(p, path, mode, StopScope::whole_server, grace); });
  REQUIRE(wltest::eventually([&] { return p.promoted.load() == 1; }, 10s));
  const pid_t pa =
      children.spawn([&] { return run_worker(a, path, mode, StopScope::whole_server, grace); });
  REQUIRE(wltest::eventually([&] { return a.started.load() == 1; }, 10s));

  ::kill(pp, SIGTERM);
  CHECK(children.wait(pp) == 0);
  REQUIRE(wltest::eventually([&] { return a.deferred.load() == 1; }, 10s));
  // A is stopped (whole_server, as every SIGTERM of this host) late in the grace: rewriting
  // the note would push B's promotion to A's stop + grace, 4.5 s later than the original.
  const auto a_stop_ns = p.demoted_ns.load() + std::chrono::nanoseconds(4500ms).count();
  while (now_ns() < a_stop_ns) std::this_thread::sleep_for(10ms);
  ::kill(pa, SIGTERM);
  CHECK(children.wait(pa) == 0);
  CHECK(a.promoted.load() == 0);
  CHECK(a.demoted.load() == 0);

  const pid_t pb =
      children.spawn([&] { return run_worker(b, path, mode, StopScope::worker, grace); });
  REQUIRE(wltest::eventually([&] { return b.promoted.load() == 1; }, 30s));
  CHECK(b.deferred.load() == 1);
  const auto without_primary = b.promoted_ns.load() - p.demoted_ns.load();
  CHECK(without_primary >= grace_ns);
  // The original note + grace, with 4 s of slack; A's note would give at least 10.5 s.
  CHECK(without_primary < grace_ns + std::chrono::nanoseconds(4s).count());
  ::kill(pb, SIGTERM);
  CHECK(children.wait(pb) == 0);
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a deferred standby whose lock file was replaced during the grace "
    "never runs on_promoted on the stale file",
    "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  const std::chrono::milliseconds grace = 2s;
  TwoWorkers w(mode, StopScope::whole_server, StopScope::worker, grace);
  WorkerReport& b = w.b;

  CHECK(w.terminate_a() == 0);
  REQUIRE(wltest::eventually([&] { return b.deferred.load() == 1; }, 10s));
  // Someone replaces the lock file while b holds the old one, deferred.
  const fs::path replacement = w.dir / "replacement.lock";
  { std::ofstream(replacement.native()) << ""; }
  REQUIRE(::rename(replacement.c_str(), w.path.c_str()) == 0);
  // b notices at the end of the deferral, takes the new file and is promoted on it.
  REQUIRE(wltest::eventually([&] { return b.promoted.load() >= 1; }, 30s));
  CHECK(b.stale_promotions.load() == 0);
  CHECK(b.demoted.load() == 0);  // on_promoted never ran on the old file: no on_demoted
  CHECK(w.terminate_b() == 0);
}

namespace {

constexpr int kHung = 128 + SIGALRM;  // the watchdog's alarm killed the child

//! A worker (primary on a free lock) whose whole-server note is a FIFO: every open() of it
//! must return at once. 0 when all went as it should, kHung when a call hung.
int run_with_fifo_note(const fs::path& path, WaitMode mode, bool fifo_before_start) {
  ::alarm(20);  // a call that blocks forever is a failure (SIGALRM), not a hung suite
  const std::string note = path.native() + ".stopped";
  if (fifo_before_start && ::mkfifo(note.c_str(), 0600) != 0) return 10;
  std::atomic<int> lost_note_warnings{0};
  CoordinatorOptions options;
  options.wait = mode;
  options.server_stop_grace = 20s;
  options.lock.log = wltest::count_lines(LogLevel::warning, note, lost_note_warnings);
  Coordinator c(path, options);
  c.start();  // reads the note: a FIFO is no note
  if (c.role() != Role::primary) return 11;
  if (!fifo_before_start && ::mkfifo(note.c_str(), 0600) != 0) return 12;
  c.stop(StopScope::whole_server);  // writes the note: a FIFO without reader fails ENXIO
  if (c.role() != Role::secondary) return 13;
  if (lost_note_warnings.load() != 1) return 14;
  return 0;
}

}  // namespace

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a FIFO at the whole-server note's path hangs neither start() nor "
    "stop(whole_server)",
    "[coordinator][coordinator_contract]") {
  const bool fifo_before_start = GENERATE(true, false);
  INFO("mode " << mode_name(mode)
               << (fifo_before_start ? ", FIFO before start()"
                                     : ", FIFO before stop(whole_server)"));
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  wltest::Children children;
  const pid_t pid =
      children.spawn([&] { return run_with_fifo_note(path, mode, fifo_before_start); });
  const int code = children.wait(pid);
  CHECK(code != kHung);
  CHECK(code == 0);
}

TEST_CASE("coordinator contract: a whole-server note that cannot be written is logged",
          "[coordinator][coordinator_contract]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  const std::string note = path.native() + ".stopped";
  fs::create_directory(note);  // open(O_WRONLY) fails with EISDIR, even for root
  std::vector<std::string> warnings;
  CoordinatorOptions options;
  options.wait = WaitMode::polled;
  options.lock.log = [&](LogLevel level, std::string_view line) {
    if (level == LogLevel::warning) warnings.emplace_back(line);
  };
  Coordinator c(path, options);
  c.start();
  REQUIRE(c.role() == Role::primary);
  c.stop(StopScope::whole_server);
  CHECK(c.role() == Role::secondary);
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0].find(note) != std::string::npos);
  CHECK(warnings[0].find(std::generic_category().message(EISDIR)) != std::string::npos);
}

TEST_CASE("coordinator contract: a whole-server note from another boot is ignored",
          "[coordinator][coordinator_contract]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  std::string boot_id;
  {
    std::ifstream in("/proc/sys/kernel/random/boot_id");
    std::getline(in, boot_id);
  }
  if (boot_id.size() != 36) boot_id = std::string(36, '-');  // no /proc: what FileBackend uses
  const bool same_boot = GENERATE(true, false);
  INFO((same_boot ? "this boot's id" : "another boot's id"));
  {
    // A note dated now: within a 20 s grace, it defers the promotion in this boot only.
    std::ofstream note(path.native() + ".stopped");
    char date[32];
    std::snprintf(date, sizeof date, "%020lld", static_cast<long long>(now_ns()));
    note << date << '\n'
         << (same_boot ? boot_id : std::string("00000000-0000-4000-8000-000000000000")) << '\n';
  }
  int deferred = 0;
  CoordinatorOptions options;
  options.wait = WaitMode::polled;
  options.server_stop_grace = 20s;
  options.lock.log = [&](LogLevel, std::string_view line) {
    if (line.find("defers on_promoted") != std::string_view::npos) ++deferred;
  };
  Coordinator c(path, options);
  c.start();
  CHECK(deferred == (same_boot ? 1 : 0));
  CHECK(c.role() == (same_boot ? Role::secondary : Role::primary));
  c.stop();
}

TEST_CASE(
    "coordinator contract: remaining_validity() saturates: zero when not primary, max for a "
    "lock file, the lease's time left",
    "[coordinator][coordinator_contract]") {
  wltest::TempDir dir;
  const fs::path path = dir / "primary.lock";
  CoordinatorOptions options;
  options.wait = WaitMode::polled;
  {
    Coordinator holder(path, options);
    Coordinator standby(path, options);
    CHECK(holder.remaining_validity() == std::chrono::nanoseconds::zero());  // not started
    holder.start();
    standby.start();
    REQUIRE(holder.role() == Role::primary);
    REQUIRE(standby.role() == Role::secondary);
    CHECK(holder.remaining_validity() == std::chrono::nanoseconds::max());
    // valid_until() - now() here is min() - now(): an overflow that reads as a long time.
    CHECK(standby.remaining_validity() == std::chrono::nanoseconds::zero());
    holder.stop();
    CHECK(holder.remaining_validity() == std::chrono::nanoseconds::zero());
    standby.stop();
  }
  auto lease = std::make_unique<FakeLease>();
  FakeLease& fake = *lease;
  Coordinator c(std::move(lease), options);
  c.start();
  REQUIRE(c.role() == Role::primary);
  CHECK(c.remaining_validity() == std::chrono::nanoseconds::max());  // deadline max(): no expiry
  fake.deadline_ns.store(now_ns() + std::chrono::nanoseconds(1h).count());
  const auto left = c.remaining_validity();
  CHECK(left > std::chrono::nanoseconds(50min));
  CHECK(left <= std::chrono::nanoseconds(1h));
  fake.deadline_ns.store(now_ns() - std::chrono::nanoseconds(1s).count());  // ran out
  CHECK(c.remaining_validity() == std::chrono::nanoseconds::zero());
  CHECK(c.role() == Role::secondary);
  c.stop();
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: start() refuses on_startup on a backend that keeps no startup "
    "barrier, naming the backend",
    "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  CoordinatorOptions options;
  options.wait = mode;
  auto backend = std::make_unique<FakeLease>();
  FakeLease& lease = *backend;
  Coordinator c(std::move(backend), options);
  CHECK(c.startup_barrier() == nullptr);
  int startups = 0;
  c.on_startup([&] { ++startups; });
  try {
    c.start();
    FAIL("start() accepted on_startup on a backend without a startup barrier");
  } catch (const workerlock::lock_error& error) {
    CHECK(error.code() == workerlock::errc::bad_configuration);
    CHECK_THAT(error.what(),
               Catch::Matchers::Contains("on_startup") && Catch::Matchers::Contains("fake lease"));
  }
  std::error_code ec;
  c.start(ec);
  CHECK(ec == workerlock::errc::bad_configuration);
  CHECK_FALSE(c.running());
  CHECK_FALSE(lease.held());
  CHECK(c.role() == Role::secondary);
  CHECK(startups == 0);

  // The same backend without on_startup starts.
  Coordinator plain(std::make_unique<FakeLease>(), options);
  plain.start();
  CHECK(wltest::eventually([&] { return plain.role() == Role::primary; }));
  plain.stop();
}

TEST_CASE_METHOD(wltest::EachWaitMode,
                 "coordinator contract: a backend's own startup barrier runs on_startup once per "
                 "generation",
                 "[coordinator][coordinator_contract]") {
  INFO("mode " << mode_name(mode));
  CoordinatorOptions options;
  options.wait = mode;
  options.startup_generation = "generation-1";
  auto backend = std::make_unique<LeaseWithBarrier>();
  LeaseWithBarrier& lease = *backend;
  Coordinator c(std::move(backend), options);
  std::atomic<int> startups{0};
  std::atomic<int> promotions{0};
  c.on_startup([&] { startups.fetch_add(1); });
  c.on_promoted([&] { promotions.fetch_add(1); });
  CHECK_FALSE(c.wait_for_startup(0ms));
  for (int round = 1; round <= 2; ++round) {
    c.start();
    REQUIRE(wltest::eventually([&] { return promotions.load() == round; }));
    CHECK(startups.load() == 1);  // the second promotion finds the generation completed
    CHECK(*lease.record == "generation-1");
    CHECK(c.wait_for_startup(0ms));
    c.stop();
  }
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a check that cannot tell keeps the role until the lease's deadline, "
    "then steps down",
    "[coordinator][coordinator_contract][threads]") {
  INFO("mode " << mode_name(mode));
  CoordinatorOptions options;
  options.wait = mode;
  std::atomic<int> warnings{0};
  options.lock.log = wltest::count_lines(LogLevel::warning, "cannot verify", warnings);
  auto backend = std::make_unique<UnprovableLease>();
  UnprovableLease& lease = *backend;
  Coordinator c(std::move(backend), options);
  std::atomic<int> demoted{0};
  c.on_demoted([&] { demoted.fetch_add(1); });
  lease.deadline_ns.store(now_ns() + std::chrono::nanoseconds(1h).count());
  c.start();
  const auto poll_until = [&](auto condition) {
    return wltest::eventually([&] {
      c.poll();  // does nothing in WaitMode::background_thread
      return condition();
    });
  };
  REQUIRE(poll_until([&] { return c.role() == Role::primary; }));

  lease.cannot_tell.store(true);
  const int before = lease.checks.load();
  REQUIRE(poll_until([&] { return lease.checks.load() >= before + 3; }));
  CHECK(warnings.load() >= 2);
  CHECK(demoted.load() == 0);  // still valid for an hour: kept
  CHECK(c.role() == Role::primary);

  lease.deadline_ns.store(now_ns() - 1'000'000);  // the lease ran out, still unproven
  CHECK(poll_until([&] { return demoted.load() == 1; }));
  CHECK_FALSE(lease.held());
  c.stop();
  CHECK(demoted.load() == 1);
}

TEST_CASE(
    "interrupter: interrupt() ends a wait at once, from another thread, and clear() re-arms it",
    "[coordinator][coordinator_contract][threads]") {
  workerlock::Interrupter interrupter;
  using workerlock::WaitResult;
  // A deadline is kept: nothing else ends the wait.
  const auto start = steady_clock::now();
  CHECK(interrupter.wait(-1, 0, start + 20ms) == WaitResult::timed_out);
  CHECK(steady_clock::now() >= start + 20ms);

  std::thread stopper([&] {
    std::this_thread::sleep_for(20ms);
    interrupter.interrupt();
  });
  CHECK(interrupter.wait(-1, 0, steady_clock::now() + 1h) == WaitResult::interrupted);
  stopper.join();
  CHECK(interrupter.interrupted());
  CHECK(interrupter.wait(-1, 0, steady_clock::now() + 1h) == WaitResult::interrupted);
  interrupter.clear();
  CHECK_FALSE(interrupter.interrupted());
  CHECK(interrupter.wait(-1, 0, steady_clock::now() + 10ms) == WaitResult::timed_out);

  // A descriptor that is ready ends it too.
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  REQUIRE(::write(pipe_fds[1], "x", 1) == 1);
  CHECK(interrupter.wait(pipe_fds[0], POLLIN, steady_clock::now() + 1h) == WaitResult::ready);
  CHECK(workerlock::wait_ready(pipe_fds[0], POLLIN, steady_clock::now() + 1h) == WaitResult::ready);
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
}

namespace {
struct CountingKick final : workerlock::Interrupter::Kick {
  std::atomic<int> kicks{0};
  void kick() noexcept override { kicks.fetch_add(1); }
};
}  // namespace

TEST_CASE(
    "interrupter: a copy made by a raw fork never runs the parent's kick, and waits on its own "
    "eventfd",
    "[coordinator][coordinator_contract]") {
  using workerlock::WaitResult;
  workerlock::Interrupter interrupter;
  CountingKick kick;
  workerlock::Interrupter::KickScope scope(interrupter, kick);
  const pid_t child = wltest::raw_fork();
  if (child == 0) {
    // The parent's kick would signal a thread that does not exist here.
    interrupter.interrupt();
    const bool kick_skipped = kick.kicks.load() == 0;
    const bool interrupted =
        interrupter.wait(-1, 0, steady_clock::now() + 1h) == WaitResult::interrupted;
    interrupter.clear();
    const bool timed_out =
        interrupter.wait(-1, 0, steady_clock::now() + 10ms) == WaitResult::timed_out;
    interrupter.interrupt();
    const bool interrupted_again =
        interrupter.wait(-1, 0, steady_clock::now() + 1h) == WaitResult::interrupted;
    ::_exit(kick_skipped && interrupted && timed_out && interrupted_again ? 0 : 1);
  }
  REQUIRE(child > 0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK_FALSE(interrupter.interrupted());
  interrupter.interrupt();
  CHECK(kick.kicks.load() == 1);
  CHECK(interrupter.wait(-1, 0, steady_clock::now() + 1h) == WaitResult::interrupted);
}

namespace {
//! A lease like RedisBackend's near its end: verify_interval() drops to 0 once less than
//! `last_stretch` is left before the deadline, and every check fails at once (a refused
//! connection). Only start() acquires it.
class RefusedRenewals final : public FakeLease {
 public:
  static constexpr std::chrono::milliseconds last_stretch{300};
  std::atomic<int> checks{0};
  std::atomic<int> acquisitions{0};
  bool try_acquire() override { return acquisitions.fetch_add(1) == 0 && FakeLease::try_acquire(); }
  bool verify_held() override {
    checks.fetch_add(1);
    throw std::system_error(ECONNREFUSED, std::system_category(), "connect");
  }
  std::chrono::milliseconds verify_interval() const noexcept override {
    const auto left = valid_until() - steady_clock::now() - last_stretch;
    return std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(left), 0ms,
                      std::chrono::milliseconds(1h));
  }
};

//! Options in `mode` that retry a failed acquisition after 10 to 20 ms.
CoordinatorOptions quick_retries(WaitMode mode) {
  CoordinatorOptions options;
  options.wait = mode;
  options.retry_backoff_min = 10ms;
  options.retry_backoff_max = 20ms;
  return options;
}

//! A user's backend that throws something that is no std::exception: an int from every
//! attempt after start()'s, and from every check.
class ThrowsInts final : public FakeLease {
 public:
  std::atomic<int> attempts{0};
  std::atomic<int> checks{0};
  bool try_acquire() override {
    if (attempts.fetch_add(1) == 0) return FakeLease::try_acquire();
    throw 42;
  }
  bool wait_acquire(workerlock::Interrupter&) override { return try_acquire(); }
  bool verify_held() override {
    checks.fetch_add(1);
    throw 42;
  }
  std::chrono::milliseconds verify_interval() const noexcept override { return 10ms; }
};
}  // namespace

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a check that fails at once near the lease's end is retried after a "
    "backoff, not in a loop, and steps down at the deadline",
    "[coordinator][coordinator_contract][threads]") {
  INFO("mode " << mode_name(mode));
  CoordinatorOptions options = quick_retries(mode);
  std::atomic<int> late_lines{0};  // the step-down says how late the last check came
  options.lock.log = wltest::count_lines(LogLevel::warning, "its lease ran out", late_lines);
  auto backend = std::make_unique<RefusedRenewals>();
  RefusedRenewals& lease = *backend;
  const auto deadline = steady_clock::now() + RefusedRenewals::last_stretch + 200ms;
  lease.deadline_ns.store(
      std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count());
  Coordinator c(std::move(backend), options);
  std::atomic<std::int64_t> demoted_at{0};
  c.on_demoted([&] { demoted_at.store(now_ns()); });
  c.start();
  REQUIRE(c.role() == Role::primary);
  // The last 300 ms hold at most ~300 / 10 checks; a loop without a pause makes thousands
  // (polled: one per poll(), every 100 us here).
  REQUIRE(wltest::eventually([&] {
    c.poll();  // does nothing in WaitMode::background_thread
    return demoted_at.load() != 0;
  }));
  CHECK(demoted_at.load() >= lease.deadline_ns.load());  // kept while valid, not after
  CHECK(lease.checks.load() >= 1);
  CHECK(lease.checks.load() < 100);
  CHECK(late_lines.load() == 1);
  CHECK(c.role() == Role::secondary);
  CHECK_FALSE(lease.held());
  c.stop();
}

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a backend that throws something that is no std::exception is "
    "logged and retried, and a check that throws one steps down at the deadline",
    "[coordinator][coordinator_contract][threads]") {
  INFO("mode " << mode_name(mode));
  CoordinatorOptions options = quick_retries(mode);
  std::atomic<int> unknown_lines{0};
  options.lock.log = wltest::count_lines(LogLevel::warning, "unknown type", unknown_lines);
  auto backend = std::make_unique<ThrowsInts>();
  ThrowsInts& lease = *backend;
  lease.deadline_ns.store(now_ns() + std::chrono::nanoseconds(200ms).count());
  Coordinator c(std::move(backend), options);
  std::atomic<int> demoted{0};
  c.on_demoted([&] { demoted.fetch_add(1); });
  c.start();
  REQUIRE(c.role() == Role::primary);
  const auto poll_until = [&](auto condition) {
    return wltest::eventually([&] {
      c.poll();  // does nothing in WaitMode::background_thread
      return condition();
    });
  };
  CHECK(poll_until([&] { return demoted.load() == 1; }));  // the checks could not tell
  CHECK(lease.checks.load() >= 1);
  CHECK(poll_until([&] { return lease.attempts.load() >= 3; }));  // retried after a backoff
  CHECK(unknown_lines.load() >= 3);
  CHECK(c.role() == Role::secondary);
  c.stop();
  CHECK(demoted.load() == 1);
}

namespace {
//! A user's startup barrier that throws an int: from its first read, and from complete().
class IntThrowingMarker final : public workerlock::GenerationMarker {
 public:
  explicit IntThrowingMarker(std::shared_ptr<std::atomic<int>> reads) : reads_(std::move(reads)) {}
  bool completed() const override {
    if (reads_->fetch_add(1) == 0) throw 42;
    return false;
  }
  void complete() override { throw 42; }
  std::string describe() const override { return "int-throwing marker"; }

 private:
  std::shared_ptr<std::atomic<int>> reads_;
};

//! A lease, taken again at once after a release, whose startup barrier throws ints.
class LeaseWithIntThrowingBarrier final : public FakeLease {
 public:
  std::shared_ptr<std::atomic<int>> reads = std::make_shared<std::atomic<int>>(0);
  bool wait_acquire(workerlock::Interrupter&) override { return try_acquire(); }
  std::unique_ptr<workerlock::GenerationMarker> startup_barrier(const std::string&) const override {
    return std::make_unique<IntThrowingMarker>(reads);
  }
};
}  // namespace

TEST_CASE_METHOD(
    wltest::EachWaitMode,
    "coordinator contract: a startup barrier that throws something that is no std::exception "
    "is logged: an unreadable record steps down and retries, a failed complete() still promotes",
    "[coordinator][coordinator_contract][threads]") {
  INFO("mode " << mode_name(mode));
  CoordinatorOptions options;
  options.wait = mode;
  options.startup_generation = "generation-1";
  std::atomic<int> unknown_errors{0};
  options.lock.log = wltest::count_lines(LogLevel::error, "unknown type", unknown_errors);
  auto backend = std::make_unique<LeaseWithIntThrowingBarrier>();
  LeaseWithIntThrowingBarrier& lease = *backend;
  Coordinator c(std::move(backend), options);
  std::atomic<int> startups{0};
  std::atomic<int> promotions{0};
  c.on_startup([&] { startups.fetch_add(1); });
  c.on_promoted([&] { promotions.fetch_add(1); });
  c.start();
  REQUIRE(wltest::eventually([&] {
    c.poll();  // does nothing in WaitMode::background_thread
    return promotions.load() == 1;
  }));
  CHECK(lease.reads->load() == 2);  // the first read threw: stepped down, taken again
  CHECK(startups.load() == 1);
  CHECK(unknown_errors.load() == 2);  // the read, then complete()
  CHECK(c.role() == Role::primary);
  c.stop();
}
