// tests/support/lock_file_lab.hpp: helpers for the lock-file identity and descriptor tests.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "common.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::lock_file_lab {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::lock_error;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WaitMode;
using workerlock::WorkerLock;

//! A problem report written by a child, read by the parent.
struct Text {
  char bytes[4096] = {};
  std::atomic<int> length{0};

  void set(std::string_view text) {
    const auto n = std::min(text.size(), sizeof bytes - 1);
    std::memcpy(bytes, text.data(), n);
    bytes[n] = '\0';
    length.store(static_cast<int>(n));
  }
  void append(std::string_view text) {
    const auto have = static_cast<std::size_t>(length.load());
    const auto n = std::min(text.size(), sizeof bytes - 1 - have);
    std::memcpy(bytes + have, text.data(), n);
    bytes[have + n] = '\0';
    length.store(static_cast<int>(have + n));
  }
  std::string str() const { return std::string(bytes, static_cast<std::size_t>(length.load())); }
};

//! Runs `body` (returning "" or a problem) in a forked child; returns the problem, or says
//! how the child ended when it did not report.
template <typename F>
std::string in_child(F&& body, std::chrono::milliseconds patience = 20s) {
  wltest::Shared<Text> report;
  Children children;
  const pid_t pid = children.spawn([&] {
    std::string problem;
    try {
      problem = body();
    } catch (const std::exception& e) {
      problem = std::string("exception: ") + e.what();
    }
    report->set(problem);
    return problem.empty() ? 0 : 1;
  });
  const int code = children.wait(pid, patience);
  if (code == kTimedOut) return "the child hung and was killed: " + report->str();
  if (code != 0 && report->str().empty()) return fmt::format("the child exited with {}", code);
  return report->str();
}

inline FileId id_of_path(const fs::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino};
}

inline FileId id_of_fd(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return {};
  return {st.st_dev, st.st_ino};
}

// =========================================================================================
// Item: a relative path and chdir()
// =========================================================================================

//! The two-primaries checker of the chdir() test: on_promoted adds one, on_demoted takes
//! one away; more than one at any moment is a violation.
struct PrimaryCount {
  std::atomic<int> primaries{0};
  std::atomic<int> violations{0};
  std::atomic<int> promotions[2] = {};
  std::atomic<int> demotions[2] = {};
  std::atomic<int> step[2] = {};
  std::atomic<bool> quit{false};
  Text problem;

  void promoted(int who) {
    promotions[who].fetch_add(1);
    if (primaries.fetch_add(1) + 1 > 1) violations.fetch_add(1);
  }
  void demoted(int who) {
    demotions[who].fetch_add(1);
    primaries.fetch_sub(1);
  }
};

// =========================================================================================
// Item: rename, then re-lock
// =========================================================================================

// =========================================================================================
// Item: standard streams closed at start-up
// =========================================================================================

// =========================================================================================
// Items: timed waits under a signal storm, and unbounded deadlines
// =========================================================================================

extern "C" inline void count_alarm(int) {}

// =========================================================================================
// Item: a file that is not a lock file is never truncated or written
// =========================================================================================

struct ForeignBoard {
  wltest::StartLine start;
  std::atomic<int> primaries{0};
  std::atomic<int> secondaries{0};
  std::atomic<int> errors{0};
  std::atomic<int> warnings_naming_path{0};
  std::atomic<bool> release{false};
  Text warning;
};

// =========================================================================================
// Item: POSIX locks, two Coordinators per process, and EDEADLK
// =========================================================================================

struct CrossBoard {
  std::atomic<int> step[2] = {};
  std::atomic<int> primary_on[2][2] = {};  // [process][file]: 1 while primary
  std::atomic<std::int64_t> promoted_ms[2][2] = {};
  std::atomic<int> warnings{0};
  std::atomic<bool> quit{false};
  Text warning;
};

//! Number of blocked waiters on the file with inode `ino`, per /proc/locks.
inline int blocked_waiters_on(ino_t ino) {
  std::ifstream locks("/proc/locks");
  std::string line;
  int n = 0;
  const auto needle = fmt::format(":{} ", ino);
  while (std::getline(locks, line))
    if (line.find("->") != std::string::npos && line.find(needle) != std::string::npos) ++n;
  return n;
}

// =========================================================================================
// Items: bad configuration and error messages
// =========================================================================================

}  // namespace wltest::lock_file_lab
