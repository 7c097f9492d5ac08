// tests/support/election_lab.hpp: what the election tests share: gates and diagnostics for
// forked children, a child that holds the primary role, holder records parsed independently.
#pragma once

#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
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
#include <mutex>
#include <optional>
#include <sstream>
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

#include "common.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::election_lab {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using std::chrono::steady_clock;
using std::chrono::system_clock;
using workerlock::ElectedRole;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WorkerLock;

// How long a child waits for the parent (or its siblings) before giving up with an error.
// Generous: under ASan on a loaded 2-core machine a round of 256 forks takes a while.
inline constexpr auto kChildPatience = 60s;
// How long the parent waits for a child to reach a step.
inline constexpr auto kParentPatience = 30s;

//! The first failure message of any child, kept in shared memory for the parent's report.
struct Diag {
  std::atomic<int> failures{0};
  char first[768] = {};

  //! Called in a child: records `what` (if first) and returns the child's exit code.
  int fail(std::string_view what) {
    if (failures.fetch_add(1) == 0)
      copy_text(first, fmt::format("child pid={}: {}", ::getpid(), what));
    return 1;
  }
  std::string message() const { return failures.load() != 0 ? std::string(first) : std::string(); }
  void reset() {
    failures.store(0);
    first[0] = '\0';
  }
};

//! A one-shot gate for many children, made of a pipe: a child blocks in pass() (no CPU, unlike
//! polling) until the parent calls open() or dies. Hundreds of polling or spinning children
//! would otherwise starve the parent that is still forking their siblings.
class Gate {
 public:
  Gate() {
    if (::pipe2(fds_, O_CLOEXEC) != 0)
      throw std::system_error(errno, std::system_category(), "pipe2");
  }
  ~Gate() {
    close_fd(fds_[0]);
    close_fd(fds_[1]);
  }
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;

  //! In a child: drops its copy of the write end, then waits for end-of-file.
  void pass() {
    close_fd(fds_[1]);
    char c = 0;
    while (::read(fds_[0], &c, 1) < 0 && errno == EINTR) {
    }
  }
  //! In the parent: lets every child through, now and later.
  void open() { close_fd(fds_[1]); }

 private:
  static void close_fd(int& fd) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  int fds_[2] = {-1, -1};
};

inline std::string read_fd(int fd) {
  std::string text;
  char buffer[4096];
  ssize_t got = 0;
  while ((got = ::pread(fd, buffer, sizeof buffer, static_cast<off_t>(text.size()))) > 0)
    text.append(buffer, static_cast<std::size_t>(got));
  return text;
}

inline std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    const auto end = text.find('\n', start);
    if (end == std::string::npos) {
      lines.push_back(text.substr(start));
      break;
    }
    lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

inline std::string shell_quote(const std::string& text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

inline std::string run_command(const std::string& command) {
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return "<popen failed>";
  std::string out;
  char buffer[4096];
  std::size_t got = 0;
  while ((got = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, got);
  ::pclose(pipe);
  return out;
}

inline std::string host_name() {
  struct utsname names {};
  if (::uname(&names) != 0) return {};
  return names.nodename;
}

inline std::uint64_t pid_namespace_inode() {
  struct stat ns {};
  if (::stat("/proc/self/ns/pid", &ns) != 0) return 0;
  return static_cast<std::uint64_t>(ns.st_ino);
}

//! A holder record as documented in detail/record.hpp, parsed independently of the library.
//! Matches only if `text` is exactly one record: no leading or trailing bytes.
struct Record {
  pid_t pid = 0;
  system_clock::time_point acquired;
  std::string host;
  std::uint64_t pid_namespace = 0;
  std::string mechanism;
};

//! A tiny cursor over text, for parsers that accept exactly one format and nothing else.
struct Cursor {
  std::string_view rest;

  bool literal(std::string_view expected) {
    if (rest.substr(0, expected.size()) != expected) return false;
    rest.remove_prefix(expected.size());
    return true;
  }
  //! Between min and max decimal digits.
  bool digits(std::size_t min, std::size_t max, std::uint64_t& value) {
    std::size_t n = 0;
    value = 0;
    while (n < rest.size() && n < max && rest[n] >= '0' && rest[n] <= '9')
      value = value * 10 + static_cast<std::uint64_t>(rest[n++] - '0');
    if (n < min) return false;
    rest.remove_prefix(n);
    return true;
  }
  //! Everything up to (not including) the first of `stops`, or to the end.
  std::string_view until(std::string_view stops) {
    const auto n = std::min(rest.find_first_of(stops), rest.size());
    const auto taken = rest.substr(0, n);
    rest.remove_prefix(n);
    return taken;
  }
};

inline std::optional<Record> parse_exact_record(const std::string& text) {
  Cursor c{text};
  std::uint64_t pid = 0, year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0, micros = 0;
  std::uint64_t pidns = 0;
  if (!c.digits(1, 10, pid) || pid == 0 || !c.literal("\nacquired=")) return std::nullopt;
  if (!c.digits(4, 4, year) || !c.literal("-") || !c.digits(2, 2, month) || !c.literal("-") ||
      !c.digits(2, 2, day) || !c.literal("T") || !c.digits(2, 2, hour) || !c.literal(":") ||
      !c.digits(2, 2, minute) || !c.literal(":") || !c.digits(2, 2, second) || !c.literal(".") ||
      !c.digits(6, 6, micros) || !c.literal("Z\nhost="))
    return std::nullopt;
  Record r;
  r.host = std::string(c.until("\n"));
  if (!c.literal("\npidns=") || !c.digits(1, 20, pidns) || !c.literal("\nmechanism="))
    return std::nullopt;
  r.mechanism = std::string(c.until("\n"));
  if (r.mechanism != "ofd" && r.mechanism != "posix" && r.mechanism != "flock") return std::nullopt;
  if (!c.literal("\n") || !c.rest.empty()) return std::nullopt;  // nothing after the record
  std::tm utc{};
  utc.tm_year = static_cast<int>(year) - 1900;
  utc.tm_mon = static_cast<int>(month) - 1;
  utc.tm_mday = static_cast<int>(day);
  utc.tm_hour = static_cast<int>(hour);
  utc.tm_min = static_cast<int>(minute);
  utc.tm_sec = static_cast<int>(second);
  r.pid = static_cast<pid_t>(pid);
  r.acquired = system_clock::time_point(std::chrono::seconds(::timegm(&utc)) +
                                        std::chrono::microseconds(micros));
  r.pid_namespace = pidns;
  return r;
}

//! An election log line: `workerlock: pid=<pid> role=<role> path=<path>[ <more>]`.
struct ElectionLine {
  std::string pid;
  std::string role;
  std::string path;
};

inline std::optional<ElectionLine> parse_election_line(std::string_view line) {
  Cursor c{line};
  std::uint64_t pid = 0;
  ElectionLine parsed;
  if (!c.literal("workerlock: pid=") || !c.digits(1, 10, pid)) return std::nullopt;
  parsed.pid = std::to_string(pid);
  if (!c.literal(" role=")) return std::nullopt;
  parsed.role = std::string(c.until(" "));
  if (parsed.role != "primary" && parsed.role != "secondary") return std::nullopt;
  if (!c.literal(" path=")) return std::nullopt;
  parsed.path = std::string(c.until(" "));
  if (parsed.path.empty() || (!c.rest.empty() && c.rest[0] != ' ')) return std::nullopt;
  return parsed;
}

//! A record in the documented format, written by this test (not by the library).
inline std::string make_record(pid_t pid, system_clock::time_point when, std::string_view mechanism,
                               const std::string& host) {
  const auto us =
      std::chrono::duration_cast<std::chrono::microseconds>(when.time_since_epoch()).count();
  const std::time_t seconds = static_cast<std::time_t>(us / 1000000);
  std::tm utc{};
  ::gmtime_r(&seconds, &utc);
  return fmt::format(
      "{}\nacquired={:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\nhost={}\npidns={}\nmechanism={}\n",
      pid, utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec,
      us % 1000000, host, pid_namespace_inode(), mechanism);
}

//! Redirects this (child) process's standard error to `file`.
inline bool redirect_stderr(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  const bool ok = ::dup2(fd, STDERR_FILENO) == STDERR_FILENO;
  ::close(fd);
  return ok;
}

// ---------------------------------------------------------------------------------------
// A child that wins the election and holds the lock until told
// ---------------------------------------------------------------------------------------

struct HolderBoard {
  std::atomic<int> state{0};  // 0 starting, 1 primary and holding, 2 failed
  std::atomic<bool> release{false};
  std::atomic<int> delay_ms{0};          // how long to keep holding after `release`
  std::atomic<bool> releasing{false};    // set just before the child lets go
  std::atomic<bool> fork_helper{false};  // the primary forks a long-lived helper (no exec)
  std::atomic<pid_t> helper{0};
  std::atomic<bool> helper_running{false};  // the helper runs its own code: atfork handlers ran
  std::atomic<bool> helper_may_exit{false};
  Diag diag;
};

//! Polls `flag` every millisecond: cheap for a child that waits long.
inline bool sleep_until_set(const std::atomic<bool>& flag, std::chrono::milliseconds timeout) {
  const auto deadline = steady_clock::now() + timeout;
  while (!flag.load()) {
    if (steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

//! Spawns a child that must become primary, then holds until board.release. Waits until the
//! child reports and REQUIREs that it is primary (saying why not); returns its pid.
inline pid_t spawn_primary(Children& children, HolderBoard& board, const fs::path& path,
                           const Options& options) {
  const pid_t pid = children.spawn([&] {
    auto [role, lock] = workerlock::is_primary_worker(path, options);
    if (role != Role::primary || !lock.owns_lock()) {
      board.state.store(2);
      return board.diag.fail(
          fmt::format("expected primary, got {} owns_lock={}", role, lock.owns_lock()));
    }
    if (board.fork_helper.load()) {
      // A helper forked by the primary without exec, as servers do for background work. It
      // outlives the primary; it must not keep the primary's lock alive (locking.md).
      const pid_t helper = ::fork();
      if (helper < 0) return board.diag.fail("fork of the helper failed");
      if (helper == 0) {
        board.helper_running.store(true);
        ::_exit(sleep_until_set(board.helper_may_exit, 60s) ? 0 : 1);
      }
      board.helper.store(helper);
      // Until the helper is scheduled and its atfork handler has closed the inherited
      // descriptor, it shares the primary's open file description (flock/OFD): a kill in that
      // window (microseconds, longer on a loaded machine) would find the lock still held.
      if (!sleep_until_set(board.helper_running, 10s))
        return board.diag.fail("the helper never started");
    }
    board.state.store(1);
    if (!sleep_until_set(board.release, 120s)) return board.diag.fail("never released");
    std::this_thread::sleep_for(std::chrono::milliseconds(board.delay_ms.load()));
    board.releasing.store(true);
    return 0;  // _exit closes the descriptor, which releases the lock
  });
  wltest::eventually([&] { return board.state.load() != 0; }, kParentPatience);
  INFO(board.diag.message());
  REQUIRE(board.state.load() == 1);
  return pid;
}

// ---------------------------------------------------------------------------------------
// The holder record
// ---------------------------------------------------------------------------------------

struct SecondaryBoard {
  wltest::StartLine start;
  std::atomic<int> secondaries{0};
  Diag diag;
};

// ---------------------------------------------------------------------------------------
// SIGKILL of the primary
// ---------------------------------------------------------------------------------------

struct TakeoverBoard {
  std::atomic<int> waiting{0};
  std::atomic<std::int64_t> acquired_ns{0};
  Diag diag;
};

// ---------------------------------------------------------------------------------------
// API basics
// ---------------------------------------------------------------------------------------

struct StepBoard {
  std::atomic<int> step{0};
  std::atomic<bool> releasing{false};
  Diag diag;
};

// ---------------------------------------------------------------------------------------
// default_lock_path()
// ---------------------------------------------------------------------------------------

inline std::string program_short_name() {
  // argv[0] from /proc, independent of the library's use of program_invocation_short_name.
  std::string cmdline = read_file("/proc/self/cmdline");
  cmdline = cmdline.substr(0, cmdline.find('\0'));
  return fs::path(cmdline).filename().string();
}

struct PathBoard {
  char got[8][1024] = {};
  Diag diag;
};

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

struct LogSlot {
  std::atomic<pid_t> pid{0};
  std::atomic<int> role{-1};  // 0 primary, 1 secondary
  std::atomic<int> lines{0};
  std::atomic<int> levels[4] = {};
  char text[4][512] = {};
};

struct LogBoard {
  wltest::StartLine start;
  std::atomic<int> voted{0};
  LogSlot slot[16];
  Diag diag;
};

//! A sink that keeps lines in the (child's) memory, plus the code that copies them out.
struct CapturingSink {
  std::vector<std::pair<LogLevel, std::string>> lines;
  Options options(Options base = quiet()) {
    base.log = [this](LogLevel level, std::string_view line) { lines.emplace_back(level, line); };
    return base;
  }
  void store(LogSlot& slot) const {
    slot.pid.store(::getpid());
    slot.lines.store(static_cast<int>(lines.size()));
    for (std::size_t i = 0; i < lines.size() && i < 4; ++i) {
      slot.levels[i].store(static_cast<int>(lines[i].first));
      copy_text(slot.text[i], lines[i].second);
    }
  }
};

}  // namespace wltest::election_lab
