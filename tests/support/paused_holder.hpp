// tests/support/paused_holder.hpp: a network-backend holder stopped with SIGSTOP past its lease,
// and what a thread in it reads from role() and the backend the moment it runs again.
#pragma once

#include <signal.h>
#include <sys/prctl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>

#include <workerlock/coordinator.hpp>

#include "common.hpp"

namespace wltest {

//! What a holder paused by the test saw, read by a host thread that spins on role() and
//! on its backend, and notices the pause as a jump of steady_clock.
struct PauseReport {
  std::atomic<int> step{0};                       // 1 spinning, 2 jump seen, 3 done
  std::atomic<std::int64_t> jump_ns{0};           // length of the jump
  std::atomic<int> role_after_jump{-1};           // 1 primary, 0 secondary
  std::atomic<int> held_after_jump{-1};           // backend.held() right after the jump
  std::atomic<std::int64_t> expired_by_ns{0};     // (read time) - valid_until() after the jump
  std::atomic<long> primary_reads_after_jump{0};  // in the 150 ms after it
};

//! A child: a Coordinator on `backend`, whose on_demoted takes 300 ms (so a stale primary
//! would be seen for that long), and a host thread spinning on role() until a jump of more
//! than `jump` shows the process was stopped. Exit codes: 0 fine, 1 not primary, 2 no jump.
inline int paused_holder(std::unique_ptr<workerlock::Backend> backend,
                         const workerlock::CoordinatorOptions& options,
                         std::chrono::milliseconds jump, PauseReport& report) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  workerlock::Coordinator c(std::move(backend), options);
  c.on_demoted([] { std::this_thread::sleep_for(std::chrono::milliseconds(300)); });
  c.start();
  if (c.role() != workerlock::Role::primary) return 1;
  std::thread host([&] {
    using clock = std::chrono::steady_clock;
    auto previous = clock::now();
    const auto give_up = previous + std::chrono::seconds(60);
    report.step.store(1);
    for (;;) {
      const auto now = clock::now();
      const workerlock::Role role = c.role();  // the first reads after `now`
      const auto until = c.backend().valid_until();
      const bool held = c.backend().held();
      if (now - previous > jump) {
        report.jump_ns.store(std::chrono::nanoseconds(now - previous).count());
        report.role_after_jump.store(role == workerlock::Role::primary ? 1 : 0);
        report.held_after_jump.store(held ? 1 : 0);
        report.expired_by_ns.store(
            until == clock::time_point::min()
                ? std::numeric_limits<std::int64_t>::max()
                : std::chrono::duration_cast<std::chrono::nanoseconds>(now - until).count());
        report.step.store(2);
        break;
      }
      if (now > give_up) return;
      previous = now;
    }
    // on_demoted takes 300 ms: a role() that waits for it would read primary all along.
    const auto stop_counting = clock::now() + std::chrono::milliseconds(150);
    while (clock::now() < stop_counting) {
      if (c.role() == workerlock::Role::primary) report.primary_reads_after_jump.fetch_add(1);
    }
    report.step.store(3);
  });
  host.join();
  c.stop();
  return report.step.load() >= 2 ? 0 : 2;
}

//! Runs paused_holder() in a child, stops it with SIGSTOP for `pause` once its host thread
//! spins, then lets it go on; returns the child's exit code.
template <typename MakeBackend>
int pause_holder(MakeBackend make_backend, const workerlock::CoordinatorOptions& options,
                 std::chrono::milliseconds jump, std::chrono::milliseconds pause,
                 PauseReport& report) {
  wltest::Children children;
  const pid_t child =
      children.spawn([&] { return paused_holder(make_backend(), options, jump, report); });
  if (!wltest::eventually([&] { return report.step.load() >= 1; }, std::chrono::seconds(20)))
    return -1;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ::kill(child, SIGSTOP);
  std::this_thread::sleep_for(pause);
  ::kill(child, SIGCONT);
  return children.wait(child);
}

}  // namespace wltest
