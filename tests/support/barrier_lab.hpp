// tests/support/barrier_lab.hpp: startup-barrier markers, hostile files and signal storms.
#pragma once

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "common.hpp"
#include "fault_injection.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::barrier_lab {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::lock_error;
using workerlock::LogLevel;
using workerlock::Role;
using workerlock::StartupBarrier;
using workerlock::WaitMode;

//! How long a test waits for a child (Children::wait(pid, kWatchdog)): one still running then
//! is hung, and killed.
inline constexpr auto kWatchdog = 10s;

//! The contents of a regular file; "" for anything else (never blocks on a planted FIFO).
inline std::string slurp(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(fs::symlink_status(path, ec))) return "";
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void spit(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

inline fs::path marker_of(const fs::path& lock) { return fs::path(lock.native() + ".startup"); }

//! What one worker child saw, for the parent's assertions.
struct WorkerBoard {
  std::atomic<int> startup_runs{0};
  std::atomic<int> promotions{0};
  std::atomic<int> role_after_start{-1};
  std::atomic<int> errors{0};  // error lines of the log sink
  std::atomic<long> stop_ms{-1};
  std::atomic<int> step{0};  // how far the child got
  char first_error[1024] = {};
};

//! A log sink that counts error lines in `board` and keeps the first.
inline workerlock::LogSink error_sink(WorkerBoard& board) {
  return [&board](LogLevel level, std::string_view line) {
    if (level != LogLevel::error) return;
    if (board.errors.fetch_add(1) == 0)
      std::snprintf(board.first_error, sizeof board.first_error, "%.*s",
                    static_cast<int>(line.size()), line.data());
  };
}

inline CoordinatorOptions options_for(WaitMode mode, WorkerBoard& board, std::string generation) {
  CoordinatorOptions options;
  options.wait = mode;
  options.lock.log = error_sink(board);
  options.startup_generation = std::move(generation);
  options.retry_backoff_min = 5ms;
  options.retry_backoff_max = 40ms;
  return options;
}

inline void count_callbacks(Coordinator& coordinator, WorkerBoard& board) {
  coordinator.on_startup([&board] { board.startup_runs.fetch_add(1); });
  coordinator.on_promoted([&board] { board.promotions.fetch_add(1); });
}

//! Keeps `coordinator` running for `duration`, polling in polled mode.
inline void run_for(Coordinator& coordinator, WaitMode mode, std::chrono::milliseconds duration) {
  const auto until = std::chrono::steady_clock::now() + duration;
  while (std::chrono::steady_clock::now() < until) {
    if (mode == WaitMode::polled) coordinator.poll();
    std::this_thread::sleep_for(2ms);
  }
}

inline long stop_and_time(Coordinator& coordinator) {
  const auto before = std::chrono::steady_clock::now();
  coordinator.stop();
  return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::steady_clock::now() - before)
                               .count());
}

//! From now on, in this process, openat() fails with `error` when it opens read-only with
//! O_NOFOLLOW, as the startup marker's read does (and the lock file's read-write open, the
//! temporary file's write-only one and fopen() do not). A seccomp filter: irreversible, so
//! call it in a forked child. Returns false if it could not be installed.
inline bool fail_read_only_nofollow_opens(int error) {
  return wltest::SyscallFilter()
      .on(SCMP_SYS(openat), SCMP_ACT_ERRNO(error),
          {wltest::low_bits_equal(2, O_RDONLY | O_NOFOLLOW, O_ACCMODE | O_NOFOLLOW)})
      .install(true);
}

enum class Planted { fifo, symlink, directory, oversized };

inline const char* name_of(Planted kind) {
  switch (kind) {
    case Planted::fifo:
      return "a FIFO";
    case Planted::symlink:
      return "a symbolic link to a completed marker";
    case Planted::directory:
      return "a directory";
    case Planted::oversized:
      return "a file larger than any generation";
  }
  return "?";
}

//! Puts `kind` at `marker`. The symbolic link points to a file that names `generation`,
//! so following it would wrongly skip the tasks.
inline void plant(Planted kind, const fs::path& marker, const std::string& generation) {
  switch (kind) {
    case Planted::fifo:
      REQUIRE(::mkfifo(marker.c_str(), 0644) == 0);
      break;
    case Planted::symlink: {
      const fs::path target = marker.parent_path() / "elsewhere";
      spit(target, generation + "\n");
      REQUIRE(::symlink(target.c_str(), marker.c_str()) == 0);
      break;
    }
    case Planted::directory:
      REQUIRE(::mkdir(marker.c_str(), 0755) == 0);
      break;
    case Planted::oversized:
      spit(marker, generation + "\n" + std::string(4096, 'x'));
      break;
  }
}

//! Child body: a Coordinator on `lock` whose marker is hostile. The primary must step down
//! without running any callback, log why, stay out while the marker stays, stop promptly,
//! and, once the marker is gone, be promoted and run the tasks once.
inline int hostile_marker_worker(WorkerBoard& board, const fs::path& lock, WaitMode mode,
                                 const std::string& generation) {
  Coordinator coordinator(lock, options_for(mode, board, generation));
  count_callbacks(coordinator, board);
  coordinator.start();
  board.step.store(1);
  board.role_after_start.store(static_cast<int>(coordinator.role()));
  run_for(coordinator, mode, 150ms);  // several retries, each refused
  board.step.store(2);
  if (board.startup_runs.load() != 0 || board.promotions.load() != 0) return 11;
  // Removed: the next attempt reads "not completed" and runs the tasks.
  std::error_code ignored;
  fs::remove_all(marker_of(lock), ignored);
  const bool promoted = wltest::eventually([&] {
    if (mode == WaitMode::polled) coordinator.poll();
    return board.promotions.load() == 1;
  });
  board.step.store(3);
  board.stop_ms.store(stop_and_time(coordinator));
  if (!promoted) return 12;
  return board.startup_runs.load() == 1 ? 0 : 13;
}

inline void check_hostile_marker(WaitMode mode) {
  for (const Planted kind :
       {Planted::fifo, Planted::symlink, Planted::directory, Planted::oversized}) {
    INFO("marker: " << name_of(kind)
                    << ", mode: " << (mode == WaitMode::polled ? "polled" : "background_thread"));
    wltest::TempDir dir;
    const fs::path lock = dir / "app.lock";
    const std::string generation = "hostile-marker-test";
    plant(kind, marker_of(lock), generation);
    wltest::Shared<WorkerBoard> board;
    Children children;
    const pid_t worker =
        children.spawn([&] { return hostile_marker_worker(*board, lock, mode, generation); });
    const int code = children.wait(worker, kWatchdog);
    INFO("exit code " << code << " (-2: hung, killed), step " << board->step.load()
                      << ", first error: " << board->first_error);
    CHECK(code == 0);
    CHECK(board->role_after_start.load() != -1);
    CHECK(board->errors.load() >= 1);
    CHECK_THAT(std::string(board->first_error), Contains(marker_of(lock).native()));
    CHECK_THAT(std::string(board->first_error), Contains("on_startup not run"));
    CHECK(board->startup_runs.load() == 1);  // only once the marker was removed
    CHECK(board->promotions.load() == 1);
    CHECK(board->stop_ms.load() >= 0);
    CHECK(board->stop_ms.load() < 3000);  // stop() returned, not hung
    CHECK(slurp(marker_of(lock)) == generation + "\n");
    if (kind == Planted::symlink) CHECK(slurp(dir / "elsewhere") == generation + "\n");
  }
}

}  // namespace wltest::barrier_lab
