// tests/support/coordinator_board.hpp: the shared-memory board of the Coordinator workers
// (two-primaries checker, per-worker slots) and the options and log sink they use.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>

#include <workerlock/workerlock.hpp>

#include "clock.hpp"

namespace wltest::coordinator_lab {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using std::chrono::milliseconds;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Role;
using workerlock::WaitMode;

static_assert(std::atomic<pid_t>::is_always_lock_free);
static_assert(std::atomic<std::int64_t>::is_always_lock_free);
static_assert(std::atomic<std::size_t>::is_always_lock_free);

inline constexpr int kMaxSlots = 128;           // worker processes per Harness
inline constexpr int kMaxEpochs = 128;          // SIGKILLs per Harness, plus the first election
inline constexpr std::size_t kLogBytes = 1024;  // warning and error lines kept per worker
inline constexpr auto kChildLifetime = 60s;     // a worker gives up (exit 70) after this long
inline constexpr int kChildTimedOut = 70;
inline constexpr int kNotAcknowledged = -3;  // the worker never acknowledged the exit command

inline int count_threads() {
  std::error_code ec;
  int n = 0;
  for (fs::directory_iterator it("/proc/self/task", ec), end; !ec && it != end; it.increment(ec))
    ++n;
  return n;
}

//! Sleeps until `flag` is set or `deadline` passes.
inline void wait_flag(const std::atomic<bool>& flag,
                      std::chrono::steady_clock::time_point deadline) {
  while (!flag.load() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
}

// ----------------------------------------------------------------------------------------
// Shared memory
// ----------------------------------------------------------------------------------------

//! The two-primaries checker: every worker reports its promotions and demotions here; a
//! promotion while another worker holds the role counts as a violation, unless the parent
//! SIGKILLed that holder (Checker::killed).
struct Checker {
  std::atomic<pid_t> holder{0};
  std::atomic<pid_t> killed{0};  // set by the parent BEFORE it SIGKILLs a holder
  std::atomic<int> promotions{0};
  std::atomic<int> demotions{0};
  std::atomic<int> violations{0};
  std::atomic<pid_t> violation_by{0};
  std::atomic<pid_t> violation_against{0};

  void promoted(pid_t me) {
    pid_t expected = 0;
    if (!holder.compare_exchange_strong(expected, me)) {
      const pid_t previous = expected;
      // Taking over from a holder that the parent SIGKILLed is the one legal overwrite.
      if (previous == me || previous != killed.load() ||
          !holder.compare_exchange_strong(expected, me)) {
        violation(me, previous);
      }
    }
    promotions.fetch_add(1);
  }
  void demoted(pid_t me) {
    pid_t expected = me;
    if (!holder.compare_exchange_strong(expected, 0)) violation(me, expected);
    demotions.fetch_add(1);
  }
  void violation(pid_t by, pid_t against) {
    if (violations.fetch_add(1) == 0) {
      violation_by.store(by);
      violation_against.store(against);
    }
  }
};

enum class Cmd : int { none, stop, start, destroy, stop_concurrently, exit };
enum ThreadKind : int { kNoThread = 0, kMainThread = 1, kPollerThread = 2, kOtherThread = 3 };

//! What one worker process reports. Written by that worker, read by the parent.
struct WorkerSlot {
  std::atomic<pid_t> pid{0};
  std::atomic<int> started{0};
  std::atomic<int> role{-1};     // Role as int, refreshed by the worker's main loop
  std::atomic<int> running{-1};  // Coordinator::running(), refreshed likewise
  std::atomic<int> role_after_start{-1};
  std::atomic<std::uint64_t> heartbeat{0};
  std::atomic<std::uint64_t> polls{0};  // poll() calls made (polled mode)
  std::atomic<std::int64_t> first_poll_ns{0};
  std::atomic<int> threads{0};
  std::atomic<int> start_failures{0};

  std::atomic<int> promoted{0};
  std::atomic<int> demoted{0};
  std::atomic<int> nested{0};  // a callback began while another one of this worker ran
  std::atomic<int> promoted_on{kNoThread};
  std::atomic<int> demoted_on{kNoThread};
  std::atomic<std::int64_t> promoted_ns{0};
  std::atomic<std::int64_t> demoted_ns{0};

  std::atomic<int> cmd{0};
  std::atomic<int> cmd_seq{0};
  std::atomic<int> ack_seq{0};
  std::atomic<int> was_primary_at_stop{-1};
  std::atomic<std::int64_t> stop_begin_ns{0};
  std::atomic<std::int64_t> stop_end_ns{0};

  std::atomic<int> wait_result{-1};  // wait_for_startup(): -1 still waiting, 0 false, 1 true
  std::atomic<std::int64_t> wait_began_ns{0};
  std::atomic<std::int64_t> wait_returned_ns{0};

  std::atomic<std::int64_t> value[8]{};  // free-form results of custom child bodies

  std::atomic<int> infos{0};
  std::atomic<int> warnings{0};
  std::atomic<int> errors{0};
  std::atomic<std::size_t> log_used{0};
  char log[kLogBytes] = {};

  std::string log_text() const { return std::string(log, std::min(log_used.load(), kLogBytes)); }
  double stop_ms() const { return ms_between(stop_begin_ns.load(), stop_end_ns.load()); }
};

struct Cluster {
  Checker check;
  std::atomic<int> epoch{0};  // number of SIGKILLs sent so far
  std::atomic<int> promotions_in_epoch[kMaxEpochs]{};
  std::atomic<std::int64_t> promoted_ns_in_epoch[kMaxEpochs]{};
  std::atomic<bool> go{false};  // releases a worker held in its first on_promoted

  std::atomic<int> task_runs{0};  // on_startup entered
  std::atomic<int> task_completions{0};
  std::atomic<pid_t> task_runner[8]{};
  std::atomic<bool> let_first_task_finish{false};
  std::atomic<std::int64_t> task_done_ns{0};

  WorkerSlot slots[kMaxSlots];
};

//! A log sink that counts lines per level and keeps warning and error lines.
inline workerlock::LogSink recording_sink(WorkerSlot& slot) {
  return [&slot](LogLevel level, std::string_view line) {
    static std::mutex mutex;  // callbacks of one worker may log from two threads
    std::lock_guard<std::mutex> guard(mutex);
    switch (level) {
      case LogLevel::info:
        slot.infos.fetch_add(1);
        return;
      case LogLevel::warning:
        slot.warnings.fetch_add(1);
        break;
      case LogLevel::error:
        slot.errors.fetch_add(1);
        break;
    }
    std::size_t used = slot.log_used.load();
    for (const char ch : line) {
      if (used + 1 >= kLogBytes) break;
      slot.log[used++] = ch;
    }
    if (used < kLogBytes) slot.log[used++] = '\n';
    slot.log_used.store(used);
  };
}

inline CoordinatorOptions options_for(WaitMode mode, WorkerSlot& slot,
                                      Mechanism mechanism = workerlock::default_mechanism) {
  CoordinatorOptions options;
  options.lock = workerlock::Options{}.with(mechanism);
  options.lock.log = recording_sink(slot);
  options.wait = mode;
  return options;
}

}  // namespace wltest::coordinator_lab
