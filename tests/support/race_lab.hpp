// tests/support/race_lab.hpp: elections raced by many forked children, one-shot or over many
// rounds in an arena of long-lived workers that wait in futex(2), and the checks after a race.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "election_lab.hpp"

namespace wltest::election_lab {

// ---------------------------------------------------------------------------------------
// Races
// ---------------------------------------------------------------------------------------

struct RaceBoard {
  wltest::StartLine start;
  std::atomic<int> primaries{0};
  std::atomic<int> secondaries{0};
  std::atomic<int> voted{0};
  std::atomic<pid_t> winner{0};
  std::atomic<bool> expect_record{true};  // false: a foreign file, which gets no record
  Diag diag;

  void reset() {
    start.arrived.store(0);
    start.go.store(false);
    primaries.store(0);
    secondaries.store(0);
    voted.store(0);
    winner.store(0);
    diag.reset();
  }
};

//! One racing worker: sleeps until all siblings are forked, lines up at the start line, runs
//! the election, votes, and keeps its handle until every sibling has voted (the parent opens
//! `all_voted` then), so an early release cannot make a second primary.
inline int race_child(RaceBoard& board, Gate& all_forked, Gate& all_voted, const fs::path& path,
                      const Options& options) {
  all_forked.pass();
  board.start.arrive_and_wait();
  std::string error;
  std::optional<workerlock::Election> election;
  try {
    election.emplace(workerlock::is_primary_worker(path, options));
  } catch (const std::exception& e) {
    error = fmt::format("is_primary_worker threw: {}", e.what());
  }
  const bool primary = election && election->role == Role::primary;
  if (election && primary != election->lock.owns_lock()) {
    error = fmt::format("role={} but owns_lock()={}", election->role, election->lock.owns_lock());
  }
  if (election &&
      (election->lock.path() != path || election->lock.mechanism() != options.mechanism)) {
    error = fmt::format("handle reports path={} mechanism={}", election->lock.path().native(),
                        election->lock.mechanism());
  }
  if (primary && error.empty() && board.expect_record.load()) {
    // While it holds the lock, lock_holder() must name this very process from its record.
    const auto holder = workerlock::lock_holder(path);
    if (!holder || holder->pid != ::getpid() || !holder->recorded) {
      error =
          fmt::format("primary, but lock_holder() says pid={} recorded={}",
                      holder ? holder->pid.value_or(-1) : -2, holder ? holder->recorded : false);
    }
  }
  if (primary) {
    board.winner.store(::getpid());
    board.primaries.fetch_add(1);
  } else {
    board.secondaries.fetch_add(1);
  }
  board.voted.fetch_add(1);
  all_voted.pass();
  if (!error.empty()) return board.diag.fail(error);
  return 0;
}

struct RaceResult {
  int children = 0;
  bool all_arrived = false;
  bool all_voted = false;
  int failed_children = 0;
  int primaries = 0;
  int secondaries = 0;
  pid_t winner = 0;
  bool winner_is_a_child = false;
  std::string diag;

  //! Empty when the race went right; else what went wrong.
  std::string problem() const {
    std::string p;
    if (!all_arrived) p += "not every child reached the start line; ";
    if (!all_voted) p += "not every child voted; ";
    if (failed_children != 0) p += fmt::format("{} children failed ({}); ", failed_children, diag);
    if (primaries != 1) p += fmt::format("{} primaries; ", primaries);
    if (secondaries != children - 1)
      p += fmt::format("{} secondaries of {}; ", secondaries, children);
    if (primaries == 1 && !winner_is_a_child)
      p += fmt::format("winner pid {} is no child; ", winner);
    return p;
  }
};

inline RaceResult run_race(RaceBoard& board, const fs::path& path, int n, const Options& options,
                           bool expect_record = true) {
  board.reset();
  board.expect_record.store(expect_record);
  RaceResult r;
  r.children = n;
  std::vector<pid_t> pids;
  {
    Children children;
    Gate all_forked;
    Gate all_voted;
    for (int i = 0; i < n; ++i) {
      pids.push_back(
          children.spawn([&] { return race_child(board, all_forked, all_voted, path, options); }));
    }
    all_forked.open();
    r.all_arrived = board.start.release_when(n, kParentPatience);
    r.all_voted = wltest::eventually([&] { return board.voted.load() >= n; }, kParentPatience);
    all_voted.open();
    r.failed_children = children.wait_all_failures();
  }
  r.primaries = board.primaries.load();
  r.secondaries = board.secondaries.load();
  r.winner = board.winner.load();
  r.winner_is_a_child = std::find(pids.begin(), pids.end(), r.winner) != pids.end();
  r.diag = board.diag.message();
  return r;
}

//! After a race (all children gone): nobody holds the lock, and the file is exactly the
//! winner's record. Returns what is wrong, or an empty string.
inline std::string check_after_race(const fs::path& path, pid_t winner, Mechanism m) {
  std::error_code ec;
  const auto holder = workerlock::lock_holder(path, ec);
  if (ec) return fmt::format("lock_holder failed after the race: {}", ec.message());
  if (holder)
    return fmt::format("lock_holder names pid {} after every child let go",
                       holder->pid.value_or(-1));
  const auto text = read_file(path);
  const auto record = parse_exact_record(text);
  if (!record) {
    return fmt::format("file is not exactly one record ({} bytes): {}", text.size(),
                       text.substr(0, 200));
  }
  if (record->pid != winner)
    return fmt::format("record names pid {}, winner was {}", record->pid, winner);
  if (record->mechanism != workerlock::to_string(m))
    return fmt::format("record says mechanism={}", record->mechanism);
  return {};
}

//! Even rounds reuse one file (holding the previous winner's record); odd rounds race to
//! create a fresh one (O_CREAT|O_EXCL among all children).
inline fs::path round_path(const fs::path& dir, int round) {
  return round % 2 == 0 ? dir / "reused.lock" : dir / fmt::format("fresh-{}.lock", round);
}

// ---------------------------------------------------------------------------------------
// Many rounds: an arena of long-lived worker processes. Forking costs about 1 ms of CPU per
// child on this project's (virtual) machines, so 1,000 rounds x 16 fresh children would take
// minutes; instead 16 children each run one fresh election per round (a new handle, a new
// open(), a new is_primary_worker() call), keep it until all 16 voted, drop it, and line up
// for the next round. Waiting happens in futex(2) on the shared memory, not by spinning.
// ---------------------------------------------------------------------------------------

template <typename Pred>
bool futex_wait_until(std::atomic<int>& word, Pred&& done, std::chrono::milliseconds timeout) {
  static_assert(sizeof(std::atomic<int>) == sizeof(int) && std::atomic<int>::is_always_lock_free);
  const auto deadline = steady_clock::now() + timeout;
  for (;;) {
    const int seen = word.load();
    if (done(seen)) return true;
    if (steady_clock::now() >= deadline) return false;
    struct timespec pause {
      0, 20'000'000
    };
    ::syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAIT, seen, &pause, nullptr, 0);
  }
}

inline void futex_wake_all(std::atomic<int>& word) {
  ::syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

inline constexpr int kArenaMaxRounds = 1000;

struct ArenaRound {
  wltest::StartLine start;
  std::atomic<int> voted{0};
  std::atomic<int> released{0};
  std::atomic<int> primaries{0};
  std::atomic<pid_t> winner{0};
};

struct ArenaBoard {
  std::atomic<int> open_round{-1};
  ArenaRound rounds[kArenaMaxRounds];
  Diag diag;
};

inline int arena_worker(ArenaBoard& board, const fs::path& dir, int n, int rounds,
                        const Options& options) {
  for (int r = 0; r < rounds; ++r) {
    auto& round = board.rounds[r];
    if (!futex_wait_until(
            board.open_round, [&](int v) { return v >= r; }, kChildPatience))
      return board.diag.fail(fmt::format("round {} never opened", r));
    round.start.arrive_and_wait();
    std::string error;
    {
      std::optional<workerlock::Election> election;
      try {
        election.emplace(workerlock::is_primary_worker(round_path(dir, r), options));
      } catch (const std::exception& e) {
        error = fmt::format("is_primary_worker threw: {}", e.what());
      }
      const bool primary = election && election->role == Role::primary;
      if (election && primary != election->lock.owns_lock())
        error =
            fmt::format("role={} but owns_lock()={}", election->role, election->lock.owns_lock());
      if (primary) {
        round.winner.store(::getpid());
        round.primaries.fetch_add(1);
      }
      if (round.voted.fetch_add(1) + 1 == n) {
        futex_wake_all(round.voted);
      } else if (!futex_wait_until(
                     round.voted, [&](int v) { return v >= n; }, kChildPatience)) {
        error = "timed out waiting for the siblings' votes";
      }
    }  // the handle goes here: the primary lets go only after everyone voted
    if (round.released.fetch_add(1) + 1 == n) futex_wake_all(round.released);
    if (!error.empty()) return board.diag.fail(fmt::format("round {}: {}", r, error));
  }
  return 0;
}

struct ArenaResult {
  int rounds_run = 0;
  int primaries_seen = 0;
  std::string first_problem;  // empty when every round went right
  int failed_workers = 0;
  double seconds = 0;
};

inline ArenaResult run_arena(ArenaBoard& board, const fs::path& dir, int n, int rounds,
                             const Options& options) {
  ArenaResult result;
  const auto started = steady_clock::now();
  Children children;
  std::vector<pid_t> pids;
  for (int i = 0; i < n; ++i)
    pids.push_back(children.spawn([&] { return arena_worker(board, dir, n, rounds, options); }));
  for (int r = 0; r < rounds && result.first_problem.empty(); ++r) {
    auto& round = board.rounds[r];
    board.open_round.store(r);
    futex_wake_all(board.open_round);
    std::string problem;
    if (!round.start.release_when(n, kParentPatience)) {
      problem = "not every worker reached the start line";
    } else if (!futex_wait_until(
                   round.released, [&](int v) { return v >= n; }, kParentPatience)) {
      problem = "not every worker let go of its handle";
    } else {
      result.primaries_seen += round.primaries.load();
      if (round.primaries.load() != 1) {
        problem = fmt::format("{} primaries", round.primaries.load());
      } else if (std::find(pids.begin(), pids.end(), round.winner.load()) == pids.end()) {
        problem = fmt::format("winner pid {} is no worker", round.winner.load());
      } else {
        problem = check_after_race(round_path(dir, r), round.winner.load(), options.mechanism);
      }
    }
    if (!problem.empty()) {
      result.first_problem = fmt::format("round {}: {} {}", r, problem, board.diag.message());
    }
    if (r % 2 == 1) fs::remove(round_path(dir, r));
    result.rounds_run = r + 1;
  }
  if (result.first_problem.empty()) result.failed_workers = children.wait_all_failures();
  result.seconds = std::chrono::duration<double>(steady_clock::now() - started).count();
  return result;  // on a problem, ~Children kills the workers still waiting
}

}  // namespace wltest::election_lab
