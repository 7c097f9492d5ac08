// tests/test_election.cpp: the election across real processes. Every test that involves more
// than one process forks real children (wltest::fork_child) and lets them report through
// anonymous shared memory (wltest::Shared); children never use Catch2 macros, they return an
// exit code and leave a message in a Diag block, which the parent prints on failure.
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

#include "support.hpp"

namespace {

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
constexpr auto kChildPatience = 60s;
// How long the parent waits for a child to reach a step.
constexpr auto kParentPatience = 30s;

Options quiet(Mechanism m = workerlock::default_mechanism) { return Options{}.with(m).silent(); }

std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             steady_clock::now().time_since_epoch())
      .count();
}

double milliseconds(steady_clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double seconds_apart(system_clock::time_point a, system_clock::time_point b) {
  return std::chrono::duration<double>(a > b ? a - b : b - a).count();
}

template <std::size_t N>
void copy_text(char (&out)[N], std::string_view text) {
  const auto n = std::min(text.size(), N - 1);
  std::memcpy(out, text.data(), n);
  out[n] = '\0';
}

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

using wltest::Children;

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

bool reach(const std::atomic<int>& step, int value, std::chrono::milliseconds timeout) {
  return wltest::eventually([&] { return step.load() >= value; }, timeout);
}

std::string read_fd(int fd) {
  std::string text;
  char buffer[4096];
  ssize_t got = 0;
  while ((got = ::pread(fd, buffer, sizeof buffer, static_cast<off_t>(text.size()))) > 0)
    text.append(buffer, static_cast<std::size_t>(got));
  return text;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

bool write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  return static_cast<bool>(out);
}

std::vector<std::string> split_lines(const std::string& text) {
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

std::string shell_quote(const std::string& text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string run_command(const std::string& command) {
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return "<popen failed>";
  std::string out;
  char buffer[4096];
  std::size_t got = 0;
  while ((got = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, got);
  ::pclose(pipe);
  return out;
}

std::string host_name() {
  struct utsname names {};
  if (::uname(&names) != 0) return {};
  return names.nodename;
}

std::uint64_t pid_namespace_inode() {
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

std::optional<Record> parse_exact_record(const std::string& text) {
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

std::optional<ElectionLine> parse_election_line(std::string_view line) {
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
std::string make_record(pid_t pid, system_clock::time_point when, std::string_view mechanism,
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
bool redirect_stderr(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  const bool ok = ::dup2(fd, STDERR_FILENO) == STDERR_FILENO;
  ::close(fd);
  return ok;
}

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
int race_child(RaceBoard& board, Gate& all_forked, Gate& all_voted, const fs::path& path,
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

RaceResult run_race(RaceBoard& board, const fs::path& path, int n, const Options& options,
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
std::string check_after_race(const fs::path& path, pid_t winner, Mechanism m) {
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
fs::path round_path(const fs::path& dir, int round) {
  return round % 2 == 0 ? dir / "reused.lock" : dir / fmt::format("fresh-{}.lock", round);
}

TEST_CASE("race: 2 16 64 and 256 children elect exactly one primary", "[election]") {
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

void futex_wake_all(std::atomic<int>& word) {
  ::syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

constexpr int kArenaMaxRounds = 1000;

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

int arena_worker(ArenaBoard& board, const fs::path& dir, int n, int rounds,
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

ArenaResult run_arena(ArenaBoard& board, const fs::path& dir, int n, int rounds,
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

TEST_CASE("race: 16 children x 1000 rounds elect exactly one primary every round", "[election]") {
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

TEST_CASE("race: 16-way races for each mechanism", "[election]") {
  const Mechanism m = GENERATE(Mechanism::posix, Mechanism::flock, Mechanism::ofd);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;

  // 50 rounds among 16 long-lived workers.
  wltest::Shared<ArenaBoard> arena;
  const auto a = run_arena(*arena, dir.path(), 16, 50, quiet(m));
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
    const auto r = run_race(*board, path, n, quiet(m));
    INFO("fresh children: n=" << n << " round=" << round << " " << r.problem());
    REQUIRE(r.problem().empty());
    const auto after = check_after_race(path, r.winner, m);
    INFO(after);
    CHECK(after.empty());
  }
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
bool sleep_until_set(const std::atomic<bool>& flag, std::chrono::milliseconds timeout) {
  const auto deadline = steady_clock::now() + timeout;
  while (!flag.load()) {
    if (steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

//! Spawns a child that must become primary, then holds until board.release. Waits until the
//! child reports; returns its pid (check board.state == 1).
pid_t spawn_primary(Children& children, HolderBoard& board, const fs::path& path,
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
  return pid;
}

// ---------------------------------------------------------------------------------------
// The holder record
// ---------------------------------------------------------------------------------------

TEST_CASE(
    "holder record: the primary's pid and acquired time via file text and cat and lock_holder",
    "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path = dir / "holder.lock";
  wltest::Shared<HolderBoard> board;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(m));
  INFO(board->diag.message());
  REQUIRE(board->state.load() == 1);

  // As text, line by line.
  const auto text = read_file(path);
  INFO("file: " << text);
  const auto lines = split_lines(text);
  REQUIRE(lines.size() >= 2);
  CHECK(lines[0] == std::to_string(primary));
  CHECK(lines[1].rfind("acquired=", 0) == 0);
  CHECK(text.back() == '\n');
  const auto record = parse_exact_record(text);
  REQUIRE(record.has_value());
  CHECK(record->pid == primary);
  CHECK(seconds_apart(record->acquired, system_clock::now()) < 1.0);
  CHECK(record->host == host_name());
  CHECK(record->pid_namespace == pid_namespace_inode());
  CHECK(record->mechanism == workerlock::to_string(m));

  // Through cat(1), as an operator would look.
  CHECK(run_command("cat " + shell_quote(path.string())) == text);
  CHECK(run_command("head -n 1 " + shell_quote(path.string())) == fmt::format("{}\n", primary));
  const auto copy = dir / "copy.txt";
  CHECK(std::system(
            ("cat " + shell_quote(path.string()) + " > " + shell_quote(copy.string())).c_str()) ==
        0);
  CHECK(read_file(copy) == text);

  // Through lock_holder() from the parent, which holds nothing.
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);
  CHECK(holder->recorded);
  REQUIRE(holder->acquired.has_value());
  CHECK(seconds_apart(*holder->acquired, system_clock::now()) < 1.0);
  CHECK(*holder->acquired == record->acquired);
  CHECK(holder->mechanism == m);
  CHECK(holder->host == host_name());
  CHECK(holder->pid_namespace == pid_namespace_inode());

  board->release.store(true);
  CHECK(children.wait(primary) == 0);
  // Gone: nobody holds it, although the record stays in the file.
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
  CHECK(read_file(path) == text);
}

struct SecondaryBoard {
  wltest::StartLine start;
  std::atomic<int> secondaries{0};
  Diag diag;
};

TEST_CASE("holder record: 20 secondaries leave the primary's record byte-for-byte intact",
          "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path = dir / "keep.lock";
  wltest::Shared<HolderBoard> board;
  wltest::Shared<SecondaryBoard> others;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(m));
  INFO(board->diag.message());
  REQUIRE(board->state.load() == 1);

  const auto before = read_file(path);
  REQUIRE(parse_exact_record(before).has_value());
  struct stat st_before {};
  REQUIRE(::stat(path.c_str(), &st_before) == 0);
  std::this_thread::sleep_for(20ms);  // so that a rewrite would show in the mtime too

  constexpr int kSecondaries = 20;
  std::vector<pid_t> pids;
  Gate all_forked;
  for (int i = 0; i < kSecondaries; ++i) {
    pids.push_back(children.spawn([&] {
      all_forked.pass();
      others->start.arrive_and_wait();
      auto [role, lock] = workerlock::is_primary_worker(path, quiet(m));
      if (role != Role::secondary) return others->diag.fail("became primary while another holds");
      if (lock.owns_lock()) return others->diag.fail("secondary's handle owns the lock");
      if (lock.try_lock()) return others->diag.fail("try_lock() succeeded while another holds");
      const auto holder = workerlock::lock_holder(path);
      if (!holder || holder->pid != primary || !holder->recorded)
        return others->diag.fail(
            fmt::format("lock_holder says {}", holder ? holder->pid.value_or(-1) : -2));
      others->secondaries.fetch_add(1);
      return 0;
    }));
  }
  all_forked.open();
  REQUIRE(others->start.release_when(kSecondaries));
  int failures = 0;
  for (const pid_t pid : pids) failures += children.wait(pid) != 0 ? 1 : 0;
  INFO(others->diag.message());
  CHECK(failures == 0);
  CHECK(others->secondaries.load() == kSecondaries);

  const auto after = read_file(path);
  CHECK(after == before);
  struct stat st_after {};
  REQUIRE(::stat(path.c_str(), &st_after) == 0);
  CHECK(st_after.st_ino == st_before.st_ino);
  CHECK(st_after.st_size == st_before.st_size);
  CHECK(st_after.st_mtim.tv_sec == st_before.st_mtim.tv_sec);
  CHECK(st_after.st_mtim.tv_nsec == st_before.st_mtim.tv_nsec);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);

  board->release.store(true);
  CHECK(children.wait(primary) == 0);
}

TEST_CASE("holder record: a longer stale record is shrunk to exactly the new record",
          "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  const int kind = GENERATE(0, 1, 2);  // a file without any record is never written
  wltest::TempDir dir;
  const auto path = dir / "shrink.lock";
  std::string stale;
  switch (kind) {
    case 0:  // a well-formed record, longer only by its pid's digits (4194303 is pid_max)
      stale = make_record(4194303, system_clock::now() - 1h, workerlock::to_string(m), host_name());
      break;
    case 1:  // a well-formed record with a long host name
      stale = make_record(4194303, system_clock::now() - 1h, "flock", std::string(300, 'h'));
      break;
    default:  // a record followed by a long garbage tail
      stale =
          make_record(1, system_clock::now(), "posix", host_name()) + std::string(5000, 'x') + "\n";
      break;
  }
  INFO("mechanism=" << workerlock::to_string(m) << " stale kind=" << kind);
  REQUIRE(write_file(path, stale));

  wltest::Shared<HolderBoard> board;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(m));
  INFO(board->diag.message());
  REQUIRE(board->state.load() == 1);

  const auto text = read_file(path);
  INFO("file now: " << text.substr(0, 400));
  CHECK(text.size() < stale.size());
  CHECK(fs::file_size(path) == text.size());
  const auto record = parse_exact_record(text);  // exactly one record, nothing after it
  REQUIRE(record.has_value());
  CHECK(record->pid == primary);
  CHECK(record->mechanism == workerlock::to_string(m));
  CHECK(seconds_apart(record->acquired, system_clock::now()) < 1.0);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);
  CHECK(holder->recorded);

  board->release.store(true);
  CHECK(children.wait(primary) == 0);
}

// ---------------------------------------------------------------------------------------
// SIGKILL of the primary
// ---------------------------------------------------------------------------------------

struct TakeoverBoard {
  std::atomic<int> waiting{0};
  std::atomic<std::int64_t> acquired_ns{0};
  Diag diag;
};

TEST_CASE("SIGKILL of the primary: a waiting sibling acquires within 100 ms", "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  // 0: a try_lock() loop, 1: blocking lock(), 2: try_lock_for()
  const int style = GENERATE(0, 1, 2);
  INFO("mechanism=" << workerlock::to_string(m) << " waiter style=" << style);
  wltest::TempDir dir;
  const auto path = dir / "kill.lock";
  wltest::Shared<HolderBoard> board;
  wltest::Shared<TakeoverBoard> takeover;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(m));
  INFO(board->diag.message());
  REQUIRE(board->state.load() == 1);

  const pid_t waiter = children.spawn([&] {
    auto [role, lock] = workerlock::is_primary_worker(path, quiet(m));
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
    const auto now = steady_ns();
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

  const auto kill_ns = steady_ns();
  REQUIRE(::kill(primary, SIGKILL) == 0);
  CHECK(children.wait(primary) == 128 + SIGKILL);
  const int waiter_code = children.wait(waiter);
  INFO(takeover->diag.message());
  REQUIRE(waiter_code == 0);
  const double latency_ms = static_cast<double>(takeover->acquired_ns.load() - kill_ns) / 1e6;
  INFO("kill -> acquisition: " << latency_ms << " ms");
  CHECK(latency_ms >= 0.0);
  CHECK(latency_ms < 100.0);
}

TEST_CASE("SIGKILL of the primary: lock_holder reports nobody until the parent takes over",
          "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  // With a helper: the primary forked a child (no exec) that outlives it.
  const bool with_helper = GENERATE(false, true);
  INFO("mechanism=" << workerlock::to_string(m) << " primary forked a helper: " << with_helper);
  wltest::TempDir dir;
  const auto path = dir / "kill2.lock";
  wltest::Shared<HolderBoard> board;
  struct HelperCleanup {
    HolderBoard& board;
    ~HelperCleanup() {
      board.helper_may_exit.store(true);
      if (const pid_t helper = board.helper.load(); helper > 0) ::kill(helper, SIGKILL);
    }
  } helper_cleanup{*board};
  board->fork_helper.store(with_helper);
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(m));
  INFO(board->diag.message());
  REQUIRE(board->state.load() == 1);
  if (with_helper) REQUIRE(board->helper.load() > 0);
  const auto before = workerlock::lock_holder(path);
  REQUIRE(before.has_value());
  REQUIRE(before->pid == primary);

  const auto killed_at = steady_clock::now();
  REQUIRE(::kill(primary, SIGKILL) == 0);
  REQUIRE(children.wait(primary) == 128 + SIGKILL);
  if (with_helper) REQUIRE(::kill(board->helper.load(), 0) == 0);  // the helper lives on
  // Dead and reaped, nobody else has tried yet: nobody holds it, whatever the file says.
  const auto stale = read_file(path);
  CHECK(parse_exact_record(stale).has_value());
  std::error_code ec;
  CHECK_FALSE(workerlock::lock_holder(path, ec).has_value());
  CHECK_FALSE(ec);

  WorkerLock mine(path, quiet(m));
  bool got = false;
  while (!(got = mine.try_lock()) && steady_clock::now() - killed_at < 5s) {
  }
  const auto latency_ms = milliseconds(steady_clock::now() - killed_at);
  INFO("kill -> acquisition: " << latency_ms << " ms");
  REQUIRE(got);
  CHECK(latency_ms < 100.0);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == ::getpid());
  CHECK(holder->recorded);
  // Read through our own descriptor: opening and closing the file here would drop a POSIX
  // lock of this process (that is the kernel's rule, not the library's).
  const auto record = parse_exact_record(read_fd(mine.native_handle()));
  REQUIRE(record.has_value());
  CHECK(record->pid == ::getpid());

  // lock_holder() in the holding process must not have dropped the lock (the POSIX
  // close-releases trap): another process still cannot take it.
  wltest::Shared<Diag> diag;
  const pid_t prober = children.spawn([&] {
    WorkerLock other(path, quiet(m));
    if (other.try_lock()) return diag->fail("took the lock the parent still holds");
    return 0;
  });
  INFO(diag->message());
  CHECK(children.wait(prober) == 0);
  CHECK(mine.owns_lock());
}

// ---------------------------------------------------------------------------------------
// Stale files
// ---------------------------------------------------------------------------------------

TEST_CASE("stale lock files never block an election", "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  const int kind = GENERATE(range(0, 10));
  wltest::TempDir dir;
  const auto path = dir / "stale.lock";
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
      REQUIRE(
          write_file(path, make_record(::getpid(), now, workerlock::to_string(m), host_name())));
      break;
    case 5:
      description = "record naming a live sleeping child";
      REQUIRE(write_file(path, make_record(sleeper, now, workerlock::to_string(m), host_name())));
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
      REQUIRE(
          write_file(path, make_record(dead, now - 10min, workerlock::to_string(m), host_name())));
      break;
    default:
      description = "record of another host and pid namespace";
      REQUIRE(write_file(path, make_record(1, now, "ofd", "elsewhere.example")));
      break;
  }
  INFO("mechanism=" << workerlock::to_string(m) << " stale file: " << description);
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
  const auto r = run_race(*board, path, 4, quiet(m), !foreign);
  INFO(r.problem());
  CHECK(r.problem().empty());
  if (foreign) {
    CHECK(read_file(path) == before);
  } else {
    const auto after = check_after_race(path, r.winner, m);
    INFO(after);
    CHECK(after.empty());
  }

  if (sleeper != 0) {
    CHECK(::kill(sleeper, 0) == 0);  // it lived through the election
    wake_sleeper.open();
    CHECK(children.wait(sleeper) == 0);
  }
}

TEST_CASE("lock_holder does not attribute a lock to the stale record of a dead holder",
          "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path = dir / "stale-holder.lock";
  Children children;

  // An earlier primary writes its record, then exits.
  wltest::Shared<HolderBoard> first;
  const pid_t old = spawn_primary(children, *first, path, quiet(m));
  INFO(first->diag.message());
  REQUIRE(first->state.load() == 1);
  first->release.store(true);
  REQUIRE(children.wait(old) == 0);
  REQUIRE(::kill(old, 0) != 0);
  const auto stale = parse_exact_record(read_file(path));
  REQUIRE(stale.has_value());
  REQUIRE(stale->pid == old);

  // Now a process that writes no record holds the lock (write_holder_record = false, or any
  // program that only locks the file). The dead process's record is still in the file.
  Options no_record = quiet(m);
  no_record.write_holder_record = false;
  wltest::Shared<HolderBoard> second;
  const pid_t current = spawn_primary(children, *second, path, no_record);
  INFO(second->diag.message());
  REQUIRE(second->state.load() == 1);
  const auto still = parse_exact_record(read_file(path));
  REQUIRE(still.has_value());
  REQUIRE(still->pid == old);  // the new holder wrote nothing

  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  INFO("lock_holder: pid=" << holder->pid.value_or(-1) << " recorded=" << holder->recorded
                           << " mechanism=" << workerlock::to_string(holder->mechanism));
  CHECK(holder->pid != old);  // a dead process holds nothing
  CHECK_FALSE(holder->recorded);
  CHECK_FALSE(holder->acquired.has_value());
  // holder.hpp: the kernel keeps no pid for an OFD lock of a program that wrote no record.
  if (m == Mechanism::ofd) {
    CHECK_FALSE(holder->pid.has_value());
    CHECK(holder->pid_unknown == workerlock::Holder::PidUnknown::ofd_lock_without_record);
  } else {
    CHECK(holder->pid == current);
  }
  CHECK(holder->mechanism == m);

  second->release.store(true);
  CHECK(children.wait(current) == 0);
}

// ---------------------------------------------------------------------------------------
// API basics
// ---------------------------------------------------------------------------------------

TEST_CASE("Role and ElectedRole format as primary or secondary and a forked copy reads secondary",
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

struct StepBoard {
  std::atomic<int> step{0};
  std::atomic<bool> releasing{false};
  Diag diag;
};

TEST_CASE("WorkerLock composes with std::unique_lock and std::scoped_lock across processes",
          "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path_a = dir / "a.lock";
  const auto path_b = dir / "b.lock";
  wltest::Shared<StepBoard> board;
  Children children;

  SECTION("std::unique_lock: lock and unlock seen from a forked child") {
    WorkerLock handle(path_a, quiet(m));
    std::unique_lock<WorkerLock> guard(handle);
    REQUIRE(guard.owns_lock());
    REQUIRE(handle.owns_lock());
    const pid_t child = children.spawn([&] {
      auto& b = *board;
      if (handle.owns_lock()) return b.diag.fail("inherited handle claims the lock");
      WorkerLock mine(path_a, quiet(m));
      if (mine.try_lock()) return b.diag.fail("try_lock succeeded while the parent holds it");
      const auto holder = workerlock::lock_holder(path_a);
      if (!holder || holder->pid != ::getppid())
        return b.diag.fail("lock_holder is not the parent");
      b.step.store(1);
      if (!reach(b.step, 2, kChildPatience)) return b.diag.fail("timeout at step 2");
      if (!mine.try_lock()) return b.diag.fail("try_lock failed after the parent unlocked");
      b.step.store(3);
      if (!reach(b.step, 4, kChildPatience)) return b.diag.fail("timeout at step 4");
      b.releasing.store(true);
      mine.unlock();
      b.step.store(5);
      return 0;
    });
    INFO(board->diag.message());
    REQUIRE(reach(board->step, 1, kParentPatience));
    guard.unlock();
    CHECK_FALSE(guard.owns_lock());
    CHECK_FALSE(handle.owns_lock());
    board->step.store(2);
    REQUIRE(reach(board->step, 3, kParentPatience));
    CHECK_FALSE(guard.try_lock());  // the child holds it now
    board->step.store(4);
    guard.lock();  // blocks until the child unlocks
    CHECK(board->releasing.load());
    CHECK(guard.owns_lock());
    CHECK(handle.owns_lock());
    CHECK(children.wait(child) == 0);
    std::unique_lock<WorkerLock> deferred(handle, std::defer_lock);
    CHECK_FALSE(deferred.owns_lock());
  }

  SECTION("std::scoped_lock over two files waits for another process and excludes it") {
    WorkerLock a(path_a, quiet(m));
    WorkerLock b(path_b, quiet(m));
    // A child holds b for a while; the scoped_lock must wait for it.
    const pid_t holder_child = children.spawn([&] {
      WorkerLock theirs(path_b, quiet(m));
      if (!theirs.try_lock()) return board->diag.fail("could not take b");
      board->step.store(1);
      std::this_thread::sleep_for(150ms);
      board->releasing.store(true);
      theirs.unlock();
      return 0;
    });
    REQUIRE(reach(board->step, 1, kParentPatience));
    {
      std::scoped_lock both(a, b);
      CHECK(board->releasing.load());  // acquired only after the child let go
      CHECK(a.owns_lock());
      CHECK(b.owns_lock());
      CHECK(children.wait(holder_child) == 0);
      wltest::Shared<Diag> diag;
      const pid_t prober = children.spawn([&] {
        WorkerLock pa(path_a, quiet(m));
        WorkerLock pb(path_b, quiet(m));
        if (pa.try_lock()) return diag->fail("a free inside the scoped_lock");
        if (pb.try_lock()) return diag->fail("b free inside the scoped_lock");
        return 0;
      });
      INFO(diag->message());
      CHECK(children.wait(prober) == 0);
    }
    CHECK_FALSE(a.owns_lock());
    CHECK_FALSE(b.owns_lock());
    wltest::Shared<Diag> diag;
    const pid_t prober = children.spawn([&] {
      WorkerLock pa(path_a, quiet(m));
      WorkerLock pb(path_b, quiet(m));
      if (!pa.try_lock()) return diag->fail("a still held after the scoped_lock");
      if (!pb.try_lock()) return diag->fail("b still held after the scoped_lock");
      return 0;
    });
    INFO(diag->message());
    CHECK(children.wait(prober) == 0);
  }
}

TEST_CASE("try_lock_for times out while another process holds the lock and succeeds once released",
          "[election]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path = dir / "timeout.lock";
  wltest::Shared<HolderBoard> board;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(m));
  INFO(board->diag.message());
  REQUIRE(board->state.load() == 1);

  WorkerLock mine(path, quiet(m));
  auto t0 = steady_clock::now();
  CHECK_FALSE(mine.try_lock_for(300ms));
  auto elapsed = steady_clock::now() - t0;
  INFO("try_lock_for(300ms) took " << milliseconds(elapsed) << " ms");
  CHECK(elapsed >= 300ms);
  CHECK(elapsed < 2300ms);  // roughly the timeout; generous for a loaded 2-core machine
  CHECK_FALSE(mine.owns_lock());

  std::error_code ec;
  t0 = steady_clock::now();
  CHECK_FALSE(mine.try_lock_for(50ms, ec));
  CHECK_FALSE(ec);  // contention is not an error
  CHECK(steady_clock::now() - t0 >= 50ms);
  CHECK_FALSE(mine.try_lock_until(system_clock::now() + 30ms));

  // Released meanwhile: the holder lets go 150 ms after we start waiting.
  board->delay_ms.store(150);
  t0 = steady_clock::now();
  board->release.store(true);
  const bool got = mine.try_lock_for(10s);
  elapsed = steady_clock::now() - t0;
  INFO("try_lock_for(10s) took " << milliseconds(elapsed) << " ms");
  REQUIRE(got);
  CHECK(board->releasing.load());  // only after the holder let go
  CHECK(elapsed >= 140ms);
  CHECK(elapsed < 3s);
  CHECK(mine.owns_lock());
  CHECK(children.wait(primary) == 0);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == ::getpid());
}

TEST_CASE("WorkerLock accessors owns_lock path mechanism and empty or moved-from handles",
          "[election]") {
  wltest::TempDir dir;
  const auto path = dir / "access.lock";
  Children children;
  // A child's verdict: 0 = it could take the lock (free), 1 = it could not (held).
  const auto probe_takes = [&](Mechanism m) {
    const pid_t pid = children.spawn([&] {
      WorkerLock other(path, quiet(m));
      return other.try_lock() ? 0 : 1;
    });
    return children.wait(pid);
  };

  CHECK(WorkerLock(path).mechanism() == workerlock::default_mechanism);
  WorkerLock handle(path, quiet(Mechanism::flock));
  CHECK(handle.path() == path);
  CHECK(handle.mechanism() == Mechanism::flock);
  CHECK(handle.options().mechanism == Mechanism::flock);
  CHECK_FALSE(handle.owns_lock());
  CHECK_FALSE(static_cast<bool>(handle));
  CHECK(handle.native_handle() == -1);
  CHECK_FALSE(fs::exists(path));  // constructing touches nothing

  REQUIRE(handle.try_lock());
  CHECK(handle.owns_lock());
  CHECK(static_cast<bool>(handle));
  CHECK(handle.native_handle() >= 0);
  CHECK(handle.try_lock());  // already held: still true
  CHECK(probe_takes(Mechanism::flock) == 1);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == ::getpid());
  CHECK(holder->mechanism == Mechanism::flock);

  handle.unlock();
  CHECK_FALSE(handle.owns_lock());
  CHECK_NOTHROW(handle.unlock());      // a second unlock is harmless
  CHECK(handle.native_handle() >= 0);  // the file stays open
  CHECK(probe_takes(Mechanism::flock) == 0);

  REQUIRE(handle.try_lock());
  WorkerLock moved = std::move(handle);
  CHECK(moved.owns_lock());
  CHECK(moved.path() == path);
  CHECK(moved.mechanism() == Mechanism::flock);
  CHECK(probe_takes(Mechanism::flock) == 1);
  CHECK_FALSE(handle.owns_lock());  // NOLINT(bugprone-use-after-move): documented state
  CHECK(handle.path().empty());
  CHECK(handle.native_handle() == -1);
  std::error_code ec;
  CHECK_FALSE(handle.try_lock(ec));
  CHECK(ec == std::errc::invalid_argument);
  moved.unlock();
  CHECK(probe_takes(Mechanism::flock) == 0);

  WorkerLock empty;
  CHECK_FALSE(empty.owns_lock());
  CHECK(empty.path().empty());
  CHECK(empty.native_handle() == -1);
  CHECK_THROWS_AS(empty.try_lock(), workerlock::lock_error);
  CHECK_THROWS_AS(empty.lock(), workerlock::lock_error);
  CHECK_NOTHROW(empty.unlock());
}

// ---------------------------------------------------------------------------------------
// default_lock_path()
// ---------------------------------------------------------------------------------------

std::string program_short_name() {
  // argv[0] from /proc, independent of the library's use of program_invocation_short_name.
  std::string cmdline = read_file("/proc/self/cmdline");
  cmdline = cmdline.substr(0, cmdline.find('\0'));
  return fs::path(cmdline).filename().string();
}

struct PathBoard {
  char got[8][1024] = {};
  Diag diag;
};

TEST_CASE("default_lock_path follows WORKERLOCK_PATH then RUNTIME_DIRECTORY then XDG_RUNTIME_DIR",
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

TEST_CASE("is_primary_worker without arguments locks default_lock_path from WORKERLOCK_PATH",
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

// ---------------------------------------------------------------------------------------
// Operator override
// ---------------------------------------------------------------------------------------

TEST_CASE("WORKERLOCK_ROLE=secondary keeps a worker out even while the lock is free",
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
  const pid_t primary = spawn_primary(children, *sibling, path, quiet());
  INFO(sibling->diag.message());
  REQUIRE(sibling->state.load() == 1);  // a sibling without the override wins
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

TEST_CASE("WORKERLOCK_ROLE=primary or an unknown value is an error and never primary",
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

TEST_CASE("log sink receives exactly one election line per worker with its pid and role",
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
    REQUIRE(holder_board->state.load() == 1);
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

TEST_CASE("log output: silent() writes nothing and the default sink writes one line to stderr",
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
    REQUIRE(holder_board->state.load() == 1);
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

}  // namespace
