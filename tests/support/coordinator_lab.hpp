// tests/support/coordinator_lab.hpp: Coordinator workers in forked children, the Harness that
// drives them, and the workers of the startup-barrier and lock-file trouble tests.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>

#include <fmt/format.h>
#include <catch2/catch.hpp>
#include <workerlock/workerlock.hpp>

#include "clock.hpp"
#include "common.hpp"
#include "coordinator_board.hpp"
#include "fixtures.hpp"
#include "names.hpp"

namespace wltest::coordinator_lab {

// ----------------------------------------------------------------------------------------
// Child processes
// ----------------------------------------------------------------------------------------

//! How a generic worker behaves (see worker_main).
struct Plan {
  WaitMode mode = WaitMode::background_thread;
  Mechanism mechanism = workerlock::default_mechanism;
  milliseconds poll_every{2};    // main-loop period; poll() interval in polled mode
  bool poll_on_thread = false;   // polled: poll() on a dedicated thread, start()/stop() on main
  milliseconds demote_delay{0};  // on_demoted sleeps this long before it leaves the checker
  bool blocker = false;          // hold a plain WorkerLock instead of running a Coordinator
  bool kept_out = false;         // WORKERLOCK_ROLE=secondary
  bool hold_first_promotion = false;  // the first on_promoted waits for Cluster::go
  bool stop_in_first_promoted = false;
  bool throw_in_first_promoted = false;
  bool stop_in_demoted = false;
  bool throw_in_demoted = false;
  bool with_startup = false;          // on_startup: the shared task (see worker_main)
  bool startup_throws_first = false;  // the first task run throws instead of blocking
  milliseconds startup_wait{0};       // > 0: a thread calls wait_for_startup(startup_wait)
  std::string generation;             // CoordinatorOptions::startup_generation
};

struct CallbackScope {
  CallbackScope(std::atomic<int>& depth, WorkerSlot& slot) : depth_(depth) {
    if (depth_.fetch_add(1) != 0) slot.nested.fetch_add(1);
  }
  ~CallbackScope() { depth_.fetch_sub(1); }
  CallbackScope(const CallbackScope&) = delete;
  CallbackScope& operator=(const CallbackScope&) = delete;

 private:
  std::atomic<int>& depth_;
};

//! Runs commands from the parent until Cmd::exit.
template <typename Handler>
int command_loop(WorkerSlot& me, milliseconds period, Handler&& handle) {
  const auto deadline = std::chrono::steady_clock::now() + kChildLifetime;
  int handled = 0;
  for (;;) {
    handle(Cmd::none);
    me.heartbeat.fetch_add(1);
    const int seq = me.cmd_seq.load();
    if (seq != handled) {
      const auto cmd = static_cast<Cmd>(me.cmd.load());
      if (cmd != Cmd::exit) handle(cmd);
      me.threads.store(count_threads());
      handled = seq;
      me.ack_seq.store(seq);
      if (cmd == Cmd::exit) return 0;
    }
    if (std::chrono::steady_clock::now() > deadline) ::_exit(kChildTimedOut);
    std::this_thread::sleep_for(period);
  }
}

inline int blocker_main(WorkerSlot& me, const fs::path& path, const Plan& plan) {
  workerlock::WorkerLock lock(path, workerlock::Options{}.with(plan.mechanism).silent());
  lock.lock();
  me.role.store(kPrimary);
  me.started.store(1);
  return command_loop(me, plan.poll_every, [](Cmd) {});
}

//! A worker process: a Coordinator whose callbacks feed the checker, driven by commands.
inline int worker_main(Cluster& cl, int id, const fs::path& path, const Plan& plan) {
  WorkerSlot& me = cl.slots[id];
  me.pid.store(::getpid());
  if (plan.blocker) return blocker_main(me, path, plan);
  if (plan.kept_out) ::setenv("WORKERLOCK_ROLE", "secondary", 1);

  const std::thread::id main_id = std::this_thread::get_id();
  std::atomic<std::thread::id> poller_id{std::thread::id()};
  const auto thread_kind = [&]() -> int {
    const auto self = std::this_thread::get_id();
    if (self == main_id) return kMainThread;
    if (self == poller_id.load()) return kPollerThread;
    return kOtherThread;
  };
  std::atomic<int> depth{0};
  const auto deadline = std::chrono::steady_clock::now() + kChildLifetime;

  CoordinatorOptions options = options_for(plan.mode, me, plan.mechanism);
  options.startup_generation = plan.generation;
  auto coordinator = std::make_unique<Coordinator>(path, options);
  Coordinator* const self = coordinator.get();

  self->on_promoted([&] {
    CallbackScope scope(depth, me);
    me.promoted_on.store(thread_kind());
    cl.check.promoted(me.pid.load());
    const int epoch = std::min(cl.epoch.load(), kMaxEpochs - 1);
    cl.promoted_ns_in_epoch[epoch].store(mono_ns());
    cl.promotions_in_epoch[epoch].fetch_add(1);
    me.promoted_ns.store(mono_ns());
    const int n = me.promoted.fetch_add(1) + 1;
    if (n == 1 && plan.hold_first_promotion) wait_flag(cl.go, deadline);
    if (n == 1 && plan.stop_in_first_promoted) self->stop();
    if (n == 1 && plan.throw_in_first_promoted) throw std::runtime_error("boom from on_promoted");
  });
  self->on_demoted([&] {
    CallbackScope scope(depth, me);
    me.demoted_on.store(thread_kind());
    if (plan.demote_delay.count() > 0) std::this_thread::sleep_for(plan.demote_delay);
    cl.check.demoted(me.pid.load());
    me.demoted_ns.store(mono_ns());
    me.demoted.fetch_add(1);
    if (plan.stop_in_demoted) self->stop();
    if (plan.throw_in_demoted) throw 42;
  });
  if (plan.with_startup) {
    // The startup task: run 1 blocks until the parent lets it finish (or throws), later
    // runs finish at once.
    self->on_startup([&] {
      const int run = cl.task_runs.fetch_add(1) + 1;
      if (run <= 8) cl.task_runner[run - 1].store(::getpid());
      if (run == 1 && plan.startup_throws_first) throw std::runtime_error("boom from on_startup");
      if (run == 1) wait_flag(cl.let_first_task_finish, deadline);
      cl.task_done_ns.store(mono_ns());
      cl.task_completions.fetch_add(1);
    });
  }

  try {
    self->start();
  } catch (const std::exception&) {
    me.start_failures.fetch_add(1);
    return 10;
  }
  me.role_after_start.store(static_cast<int>(self->role()));
  me.threads.store(count_threads());
  me.started.store(1);

  std::thread waiter;
  if (plan.startup_wait.count() > 0) {
    waiter = std::thread([&] {
      me.wait_began_ns.store(mono_ns());
      const bool completed = self->wait_for_startup(plan.startup_wait);
      me.wait_returned_ns.store(mono_ns());
      me.wait_result.store(completed ? 1 : 0);
    });
  }
  std::atomic<bool> poller_quit{false};
  std::thread poller;
  const auto start_poller = [&] {
    if (plan.mode != WaitMode::polled || !plan.poll_on_thread || poller.joinable()) return;
    poller_quit.store(false);
    poller = std::thread([&] {
      poller_id.store(std::this_thread::get_id());
      if (me.first_poll_ns.load() == 0) me.first_poll_ns.store(mono_ns());
      while (!poller_quit.load()) {
        self->poll();
        me.polls.fetch_add(1);
        std::this_thread::sleep_for(plan.poll_every);
      }
    });
  };
  const auto stop_poller = [&] {
    if (!poller.joinable()) return;
    poller_quit.store(true);
    poller.join();
  };
  const auto refresh = [&] {
    if (!coordinator) return;
    me.role.store(static_cast<int>(coordinator->role()));
    me.running.store(coordinator->running() ? 1 : 0);
  };
  start_poller();

  const int code = command_loop(me, plan.poll_every, [&](Cmd cmd) {
    switch (cmd) {
      case Cmd::none:
        if (coordinator && plan.mode == WaitMode::polled && !plan.poll_on_thread) {
          if (me.first_poll_ns.load() == 0) me.first_poll_ns.store(mono_ns());
          coordinator->poll();
          me.polls.fetch_add(1);
        }
        break;
      case Cmd::stop:
        stop_poller();
        if (coordinator) {
          me.was_primary_at_stop.store(coordinator->role() == Role::primary ? 1 : 0);
          me.stop_begin_ns.store(mono_ns());
          coordinator->stop();
          me.stop_end_ns.store(mono_ns());
        }
        break;
      case Cmd::start:
        if (coordinator) {
          try {
            coordinator->start();
          } catch (const std::exception&) {
            me.start_failures.fetch_add(1);
          }
          start_poller();
        }
        break;
      case Cmd::destroy:
        stop_poller();
        if (waiter.joinable()) waiter.join();
        if (coordinator) {
          me.was_primary_at_stop.store(coordinator->role() == Role::primary ? 1 : 0);
          me.stop_begin_ns.store(mono_ns());
          coordinator.reset();  // the destructor, without stop()
          me.stop_end_ns.store(mono_ns());
        }
        break;
      case Cmd::stop_concurrently:
        stop_poller();
        if (coordinator) {
          std::atomic<int> ready{0};
          std::atomic<bool> go{false};
          const auto racer = [&] {
            ready.fetch_add(1);
            while (!go.load()) std::this_thread::yield();
            coordinator->stop();
          };
          std::thread first(racer);
          std::thread second(racer);
          while (ready.load() < 2) std::this_thread::yield();
          me.was_primary_at_stop.store(coordinator->role() == Role::primary ? 1 : 0);
          me.stop_begin_ns.store(mono_ns());
          go.store(true);
          first.join();
          second.join();
          me.stop_end_ns.store(mono_ns());
        }
        break;
      case Cmd::exit:
        break;
    }
    refresh();
  });
  stop_poller();
  if (waiter.joinable()) waiter.join();
  coordinator.reset();
  return code;
}

//! A lock directory, the shared Cluster and the worker processes of one scenario.
class Harness {
 public:
  Harness() = default;
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;

  Cluster& cl() { return *shared_; }
  WorkerSlot& slot(int id) { return shared_->slots[id]; }
  const fs::path& path() const { return path_; }
  const std::string& generation() const { return generation_; }
  const fs::path& dir() const { return dir_.path(); }

  //! Forks a generic worker; returns its slot.
  int spawn(Plan plan) {
    if (plan.generation.empty()) plan.generation = generation_;
    return spawn_body([this, plan](int id) { return worker_main(*shared_, id, path_, plan); });
  }

  //! Forks a custom child body(id) -> exit code; returns its slot.
  int spawn_body(const std::function<int(int)>& body) {
    const int id = used_++;
    if (id >= kMaxSlots) throw std::logic_error("too many workers in one Harness");
    shared_->slots[id].pid.store(children_.spawn([&] { return body(id); }));
    return id;
  }

  pid_t pid(int id) { return slot(id).pid.load(); }

  //! Sends a command and waits for the worker to acknowledge it (the command has run).
  bool command(int id, Cmd cmd, milliseconds timeout = 10s) {
    WorkerSlot& s = slot(id);
    s.cmd.store(static_cast<int>(cmd));
    const int seq = s.cmd_seq.fetch_add(1) + 1;
    return wltest::eventually([&] { return s.ack_seq.load() == seq; }, timeout);
  }

  bool started(int id, milliseconds timeout = 10s) {
    return wltest::eventually([&] { return slot(id).started.load() == 1; }, timeout);
  }

  //! The slot whose pid is the checker's holder, or -1.
  int holder_slot() {
    const pid_t holder = cl().check.holder.load();
    if (holder == 0) return -1;
    for (int id = 0; id < used_; ++id)
      if (slot(id).pid.load() == holder) return id;
    return -1;
  }

  int wait_exit(int id, milliseconds timeout = 10s) { return children_.wait(pid(id), timeout); }

  //! Asks the worker to leave, then returns its exit code.
  int exit_worker(int id, milliseconds timeout = 10s) {
    if (!command(id, Cmd::exit, timeout)) {
      children_.wait(pid(id), 0ms);
      return kNotAcknowledged;
    }
    return wait_exit(id, timeout);
  }

  int used() const { return used_; }

 private:
  wltest::TempDir dir_;
  fs::path path_ = dir_ / "primary.lock";
  wltest::Shared<Cluster> shared_;
  Children children_;  // declared last: its destructor kills the workers first
  int used_ = 0;
  std::string generation_ = fmt::format("wltest-{}-{}", ::getpid(), mono_ns());
};

//! Runs the test once per wait mode (EachWaitMode, as `mode`) with a fresh Harness `h`, its
//! Cluster `cl`, and `plan`: a generic worker's Plan in that mode, for the test to adjust.
struct EachWaitModeHarness : EachWaitMode {
  EachWaitModeHarness() { plan.mode = mode; }

  Harness h;
  Cluster& cl = h.cl();
  Plan plan;

  //! Spawns the first worker, with `p`, and REQUIREs that it is promoted.
  int spawn_first_primary(const Plan& p) {
    const int id = h.spawn(p);
    REQUIRE(wltest::eventually([&] { return cl.check.promotions.load() == 1; }));
    return id;
  }

  //! Spawns a worker with `p` and REQUIREs that it has started.
  int spawn_started(const Plan& p) {
    const int id = h.spawn(p);
    REQUIRE(h.started(id));
    return id;
  }
};

inline void report(const std::string& line) {
  std::printf("[coordinator] %s\n", line.c_str());
  std::fflush(stdout);
}

// ----------------------------------------------------------------------------------------
// Startup barrier
// ----------------------------------------------------------------------------------------

inline Plan startup_plan(WaitMode mode, milliseconds wait) {
  Plan plan;
  plan.mode = mode;
  plan.with_startup = true;
  plan.startup_wait = wait;
  return plan;
}

inline int spawn_blocker(Harness& h) {
  Plan blocker;
  blocker.blocker = true;
  const int id = h.spawn(blocker);
  REQUIRE(h.started(id));
  return id;
}

//! Field 22 of /proc/self/stat read by whitespace tokens (an independent parse).
inline std::string own_start_time() {
  std::ifstream stat("/proc/self/stat");
  std::string line;
  std::getline(stat, line);
  std::istringstream fields(line.substr(line.rfind(')') + 1));
  std::string field;
  for (int number = 3; number <= 22; ++number) fields >> field;
  return field;
}

struct GenerationBoard {
  char generation[2][128] = {};
  std::atomic<int> startup_runs{0};
  std::atomic<int> primaries{0};
};

// ----------------------------------------------------------------------------------------
// Robustness
// ----------------------------------------------------------------------------------------

//! One Coordinator worker and one plain lock holder, for the lock-file trouble tests.
struct TroubleBoard {
  std::atomic<int> promotions{0};
  std::atomic<int> demotions{0};
  std::atomic<int> role{-1};
  std::atomic<bool> exit{false};
  std::atomic<int> warnings{0};  // warning and error lines of the worker's sink
  char first_warning[512] = {};
  std::atomic<int> holder_state{0};  // the plain holder: 1 holds, 2 failed
  std::atomic<bool> holder_release{false};
};

//! Child body: a Coordinator on `path` that counts its role changes and warnings in `board`,
//! polls in polled mode, and stops when board.exit is set. `after_start`, if given, runs once
//! start() returned; the worker exits with 21 if it returns false.
inline int trouble_worker(TroubleBoard& board, const fs::path& path, CoordinatorOptions options,
                          const std::function<bool()>& after_start = {}) {
  options.lock.log = [&board](LogLevel level, std::string_view line) {
    if (level == LogLevel::info) return;
    if (board.warnings.fetch_add(1) == 0)
      std::snprintf(board.first_warning, sizeof board.first_warning, "%.*s",
                    static_cast<int>(line.size()), line.data());
  };
  Coordinator coordinator(path, options);
  coordinator.on_promoted([&] { board.promotions.fetch_add(1); });
  coordinator.on_demoted([&] { board.demotions.fetch_add(1); });
  coordinator.start();
  if (after_start && !after_start()) return 21;
  board.role.store(static_cast<int>(coordinator.role()));
  const auto deadline = std::chrono::steady_clock::now() + kChildLifetime;
  while (!board.exit.load() && std::chrono::steady_clock::now() < deadline) {
    if (options.wait == WaitMode::polled) coordinator.poll();
    board.role.store(static_cast<int>(coordinator.role()));
    std::this_thread::sleep_for(5ms);
  }
  coordinator.stop();
  return coordinator.running() ? 1 : 0;
}

//! Child body: a plain WorkerLock on `path`, held until board.holder_release.
inline int trouble_holder(TroubleBoard& board, const fs::path& path) {
  workerlock::WorkerLock lock(path, workerlock::Options{}.silent());
  if (!lock.try_lock()) {
    board.holder_state.store(2);
    return 1;
  }
  board.holder_state.store(1);
  wait_flag(board.holder_release, std::chrono::steady_clock::now() + kChildLifetime);
  return 0;
}

//! Starts trouble_holder() in a child and waits until it holds `path`.
inline pid_t spawn_plain_primary(Children& children, TroubleBoard& board, const fs::path& path) {
  const pid_t primary = children.spawn([&] { return trouble_holder(board, path); });
  REQUIRE(wltest::eventually([&] { return board.holder_state.load() != 0; }, 5s));
  REQUIRE(board.holder_state.load() == 1);
  return primary;
}

//! Options for the trouble tests that count retries: a short backoff, 10 to 80 ms.
inline CoordinatorOptions quick_retry_options(WaitMode mode) {
  CoordinatorOptions options;
  options.wait = mode;
  options.retry_backoff_min = 10ms;
  options.retry_backoff_max = 80ms;
  return options;
}

}  // namespace wltest::coordinator_lab
