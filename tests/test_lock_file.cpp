// tests/test_lock_file.cpp: forked-process tests of WorkerLock's lock file: path identity
// (chdir, rename), descriptors 0-2, deadlines, foreign file contents, errors and settings.
// Each test case forks real processes and fails if the behaviour it names breaks.
#include <catch2/catch.hpp>

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

#include <workerlock/workerlock.hpp>

#include "support.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using wltest::Children;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::lock_error;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WaitMode;
using workerlock::WorkerLock;

constexpr int kTimedOut = -2;  // the watchdog had to SIGKILL the child

Options quiet(Mechanism m = workerlock::default_mechanism) { return Options{}.silent().with(m); }

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

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

//! Waits for `pid`, killing it after `patience`: a hang becomes kTimedOut, never a ctest
//! timeout.
int wait_or_kill(Children& children, pid_t pid, std::chrono::milliseconds patience) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  for (;;) {
    int status = 0;
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) {
      // Children::wait would wait again; it tolerates an already reaped pid by returning -1.
      children.wait(pid);
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      children.wait(pid);
      return kTimedOut;
    }
    std::this_thread::sleep_for(1ms);
  }
}

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
  const int code = wait_or_kill(children, pid, patience);
  if (code == kTimedOut) return "the child hung and was killed: " + report->str();
  if (code != 0 && report->str().empty()) return fmt::format("the child exited with {}", code);
  return report->str();
}

//! From another process: 1 if `path` is locked by someone (contention), 0 if free, else
//! an error code.
int probe(const fs::path& path, Mechanism m = workerlock::default_mechanism) {
  Children children;
  const pid_t pid = children.spawn([&] {
    WorkerLock other(path, quiet(m));
    std::error_code ec;
    const bool got = other.try_lock(ec);
    if (ec) return 2;
    return got ? 0 : 1;
  });
  return wait_or_kill(children, pid, 10s);
}

bool reach(const std::atomic<int>& step, int value, std::chrono::milliseconds timeout = 10s) {
  return wltest::eventually([&] { return step.load() >= value; }, timeout);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool write_file(const fs::path& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  out.close();
  return static_cast<bool>(out);
}

struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const FileId& o) const { return dev == o.dev && ino == o.ino; }
};

FileId id_of_path(const fs::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino};
}

FileId id_of_fd(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return {};
  return {st.st_dev, st.st_ino};
}

// =========================================================================================
// Item: a relative path and chdir()
// =========================================================================================

TEST_CASE("lock file: a relative path is resolved at construction so chdir() changes nothing",
          "[lock_file]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto first = dir / "first";
  const auto second = dir / "second";
  fs::create_directory(first);
  fs::create_directory(second);

  struct Board {
    std::atomic<int> step{0};
    Text problem;
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    const auto fail = [&](const std::string& why) {
      board->problem.set(why);
      board->step.store(100);
      return 1;
    };
    if (::chdir(first.c_str()) != 0) return fail("chdir");
    WorkerLock lock("./w.lock", quiet(m));
    if (lock.path() != first / "w.lock") return fail("path() is " + lock.path().string());
    if (::chdir(second.c_str()) != 0) return fail("chdir");
    if (!lock.try_lock()) return fail("first try_lock failed");
    if (fs::exists(second / "w.lock")) return fail("the lock landed in the new directory");
    // Re-locking after another chdir() goes to the same file.
    lock.unlock();
    if (::chdir("/") != 0) return fail("chdir /");
    if (!lock.try_lock()) return fail("re-lock failed");
    if (!(id_of_fd(lock.native_handle()) == id_of_path(first / "w.lock")))
      return fail("re-locked another file than the first one");
    board->step.store(1);
    if (!reach(board->step, 2, 20s)) return fail("parent never came back");
    return 0;
  });
  REQUIRE(reach(board->step, 1));
  INFO(board->problem.str());
  REQUIRE(board->step.load() == 1);
  CHECK(probe(first / "w.lock", m) == 1);  // another process sees it held
  CHECK_FALSE(fs::exists(second / "w.lock"));
  CHECK_FALSE(fs::exists(fs::path("/w.lock")));
  board->step.store(2);
  CHECK(wait_or_kill(children, child, 10s) == 0);
}

TEST_CASE("lock file: a relative path without a current directory fails with a lock_error",
          "[lock_file]") {
  wltest::TempDir dir;
  const auto gone = dir / "gone";
  const auto problem = in_child([&]() -> std::string {
    fs::create_directory(gone);
    if (::chdir(gone.c_str()) != 0) return "chdir";
    fs::remove(gone);
    WorkerLock lock("x.lock", quiet());
    std::error_code ec;
    if (lock.try_lock(ec)) return "try_lock succeeded";
    if (ec != std::errc::no_such_file_or_directory) return "ec is " + ec.message();
    if (lock.lock(ec), ec != std::errc::no_such_file_or_directory)
      return "lock(ec): " + ec.message();
    try {
      (void)lock.try_lock();
      return "try_lock() did not throw";
    } catch (const lock_error& e) {
      const std::string what = e.what();
      if (what.find("x.lock") == std::string::npos) return "what() names no path: " + what;
      if (what.find("current directory") == std::string::npos)
        return "what() does not say why: " + what;
    }
    return {};
  });
  CHECK(problem == "");
}

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

TEST_CASE("lock file: a Coordinator primary that chdir()s stays the only primary",
          "[lock_file][threads]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto home = dir / "home";
  const auto elsewhere = dir / "elsewhere";
  fs::create_directory(home);
  fs::create_directory(elsewhere);
  wltest::Shared<PrimaryCount> count;
  Children children;

  // Worker 0 becomes primary, then chdir()s; worker 1 waits as a standby.
  const auto worker = [&](int who) {
    if (::chdir(home.c_str()) != 0) return 2;
    CoordinatorOptions options;
    options.lock = quiet(m);
    options.health_check_interval = 20ms;
    Coordinator coordinator("coordinated.lock", options);
    coordinator.on_promoted([&] { count->promoted(who); });
    coordinator.on_demoted([&] { count->demoted(who); });
    coordinator.start();
    count->step[who].store(1);
    if (who == 0) {
      if (coordinator.role() != Role::primary) return 3;
      if (::chdir(elsewhere.c_str()) != 0) return 4;
      count->step[who].store(2);
    }
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (!count->quit.load() && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(1ms);
    coordinator.stop();
    return 0;
  };
  const pid_t primary = children.spawn([&] { return worker(0); });
  REQUIRE(reach(count->step[0], 2));
  const pid_t standby = children.spawn([&] { return worker(1); });
  REQUIRE(reach(count->step[1], 1));

  // Fifty health checks of the primary in its new directory.
  std::this_thread::sleep_for(1000ms);
  CHECK(count->violations.load() == 0);
  CHECK(count->promotions[0].load() == 1);
  CHECK(count->demotions[0].load() == 0);
  CHECK(count->promotions[1].load() == 0);
  CHECK_FALSE(fs::exists(elsewhere / "coordinated.lock"));

  // The standby really waits on the same file: it takes over when the primary dies.
  count->primaries.fetch_sub(1);  // the primary's on_demoted will never run
  ::kill(primary, SIGKILL);
  CHECK(wait_or_kill(children, primary, 10s) == 128 + SIGKILL);
  CHECK(wltest::eventually([&] { return count->promotions[1].load() == 1; }, 10s));
  count->quit.store(true);
  CHECK(wait_or_kill(children, standby, 20s) == 0);
  CHECK(count->violations.load() == 0);
}

// =========================================================================================
// Item: rename, then re-lock
// =========================================================================================

TEST_CASE("lock file: a handle never re-locks its old file after a rename or a relink",
          "[lock_file]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  const int how = GENERATE(0, 1);      // 0: rename away, 1: hard link elsewhere, then unlink
  const int call = GENERATE(0, 1, 2);  // 0: try_lock, 1: try_lock_for, 2: lock
  INFO("mechanism=" << workerlock::to_string(m) << " how=" << (how == 0 ? "rename" : "relink")
                    << " call=" << call);
  wltest::TempDir dir;
  const auto path = dir / "moved.lock";
  const auto moved_to = dir / "old.lock";

  struct Board {
    std::atomic<int> step{0};
    std::atomic<int> relocked{-1};
    std::atomic<std::int64_t> returned_ms{0};
    std::atomic<int> holds_named_file{-1};
    Text problem;
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t first = children.spawn([&] {
    WorkerLock lock(path, quiet(m));
    if (!lock.try_lock()) return 2;
    lock.unlock();  // the descriptor stays open for the next attempt
    board->step.store(1);
    if (!reach(board->step, 2, 20s)) return 3;
    bool got = false;
    if (call == 0) got = lock.try_lock();
    if (call == 1) got = lock.try_lock_for(200ms);
    if (call == 2) {
      lock.lock();
      got = true;
    }
    board->returned_ms.store(now_ms());
    board->relocked.store(got ? 1 : 0);
    board->holds_named_file.store(
        lock.native_handle() >= 0 && id_of_fd(lock.native_handle()) == id_of_path(path) ? 1 : 0);
    board->step.store(3);
    if (!reach(board->step, 4, 20s)) return 4;
    return 0;
  });
  REQUIRE(reach(board->step, 1));
  if (how == 0) {
    REQUIRE(::rename(path.c_str(), moved_to.c_str()) == 0);
  } else {
    REQUIRE(::link(path.c_str(), moved_to.c_str()) == 0);
    REQUIRE(::unlink(path.c_str()) == 0);
  }
  // Another worker now holds a new file at the path.
  struct Second {
    std::atomic<int> held{0};
    std::atomic<bool> release{false};
  };
  wltest::Shared<Second> second;
  const pid_t other = children.spawn([&] {
    WorkerLock lock(path, quiet(m));
    if (!lock.try_lock()) return 2;
    second->held.store(1);
    const auto give_up = std::chrono::steady_clock::now() + 20s;
    while (!second->release.load() && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(1ms);
    return 0;
  });
  REQUIRE(reach(second->held, 1));

  board->step.store(2);
  if (call == 2) {
    // lock() must wait for the new file's holder, not return at once on the old inode.
    std::this_thread::sleep_for(300ms);
    CHECK(board->step.load() == 2);
    const auto released_ms = now_ms();
    second->release.store(true);
    REQUIRE(reach(board->step, 3));
    CHECK(board->returned_ms.load() >= released_ms);
    CHECK(board->relocked.load() == 1);
    CHECK(board->holds_named_file.load() == 1);
  } else {
    REQUIRE(reach(board->step, 3));
    CHECK(board->relocked.load() == 0);
    second->release.store(true);
  }
  board->step.store(4);
  CHECK(wait_or_kill(children, other, 10s) == 0);
  CHECK(wait_or_kill(children, first, 10s) == 0);
}

TEST_CASE("lock file: Coordinator stop() then a rename then start() never makes two primaries",
          "[lock_file]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path = dir / "coordinated.lock";
  struct Board {
    std::atomic<int> step{0};
    std::atomic<int> role_after_restart{-1};
    std::atomic<int> other_held{0};
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t worker = children.spawn([&] {
    CoordinatorOptions options;
    options.lock = quiet(m);
    options.wait = WaitMode::polled;  // no thread: start() decides at once
    Coordinator coordinator(path, options);
    coordinator.start();
    if (coordinator.role() != Role::primary) return 2;
    coordinator.stop();
    board->step.store(1);
    if (!reach(board->step, 2, 20s)) return 3;
    coordinator.start();
    board->role_after_restart.store(coordinator.role() == Role::primary ? 1 : 0);
    board->step.store(3);
    if (!reach(board->step, 4, 20s)) return 4;
    coordinator.stop();
    return 0;
  });
  REQUIRE(reach(board->step, 1));
  REQUIRE(::rename(path.c_str(), (dir / "renamed.lock").c_str()) == 0);
  const pid_t other = children.spawn([&] {
    WorkerLock lock(path, quiet(m));
    if (!lock.try_lock()) return 2;
    board->other_held.store(1);
    return reach(board->step, 4, 20s) ? 0 : 3;
  });
  REQUIRE(reach(board->other_held, 1));
  board->step.store(2);
  REQUIRE(reach(board->step, 3));
  CHECK(board->role_after_restart.load() == 0);
  board->step.store(4);
  CHECK(wait_or_kill(children, worker, 10s) == 0);
  CHECK(wait_or_kill(children, other, 10s) == 0);
}

// =========================================================================================
// Item: standard streams closed at start-up
// =========================================================================================

TEST_CASE("lock file: with standard streams closed the lock file never takes descriptor 0 1 or 2",
          "[lock_file]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  const int closed = GENERATE(0, 2);  // 0: stdin, stdout and stderr all closed; 2: only stderr
  INFO("mechanism=" << workerlock::to_string(m) << " closed=" << (closed == 0 ? "0,1,2" : "2"));
  wltest::TempDir dir;
  const auto path = dir / "streams.lock";
  struct Board {
    std::atomic<int> step{0};
    std::atomic<int> fd{-100};
    std::atomic<int> role{-1};
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    if (closed == 0) {
      ::close(0);
      ::close(1);
    }
    ::close(2);
    Options options;  // the default sink: one line to stderr after the election
    options.mechanism = m;
    auto [role, lock] = workerlock::is_primary_worker(path, options);
    board->role.store(role == Role::primary ? 1 : 0);
    board->fd.store(lock.native_handle());
    // A daemon's usual clean-up of its standard streams.
    if (closed == 0 && std::freopen("/dev/null", "r", stdin) == nullptr) return 2;
    if (std::freopen("/dev/null", "w", stderr) == nullptr) return 3;
    board->step.store(1);
    return reach(board->step, 2, 20s) ? 0 : 4;
  });
  REQUIRE(reach(board->step, 1));
  CHECK(board->role.load() == 1);
  CHECK(board->fd.load() > 2);
  CHECK(probe(path, m) == 1);  // still held after freopen()
  const auto text = read_file(path);
  INFO("lock file: " << text);
  CHECK(text.rfind(std::to_string(child) + "\n", 0) == 0);  // the record, not a log line
  CHECK(text.find("workerlock:") == std::string::npos);
  board->step.store(2);
  CHECK(wait_or_kill(children, child, 10s) == 0);
}

// =========================================================================================
// Items: timed waits under a signal storm, and unbounded deadlines
// =========================================================================================

extern "C" void count_alarm(int) {}

TEST_CASE("lock file: try_lock_for ends on time under a 50 microsecond signal storm",
          "[lock_file]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO("mechanism=" << workerlock::to_string(m));
  wltest::TempDir dir;
  const auto path = dir / "storm.lock";
  WorkerLock holder(path, quiet(m));
  REQUIRE(holder.try_lock());
  struct Board {
    std::atomic<int> got{-1};
    std::atomic<std::int64_t> took_ms{-1};
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    struct sigaction action {};
    action.sa_handler = count_alarm;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART
    if (::sigaction(SIGALRM, &action, nullptr) != 0) return 2;
    WorkerLock lock(path, quiet(m));
    const itimerval storm{{0, 50}, {0, 50}};
    if (::setitimer(ITIMER_REAL, &storm, nullptr) != 0) return 3;
    const auto start = std::chrono::steady_clock::now();
    const bool got = lock.try_lock_for(300ms);
    const auto took = std::chrono::steady_clock::now() - start;
    const itimerval off{};
    ::setitimer(ITIMER_REAL, &off, nullptr);
    board->got.store(got ? 1 : 0);
    board->took_ms.store(std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
    return 0;
  });
  CHECK(wait_or_kill(children, child, 15s) == 0);
  INFO("try_lock_for(300ms) took " << board->took_ms.load() << " ms");
  CHECK(board->got.load() == 0);
  CHECK(board->took_ms.load() >= 300);
  CHECK(board->took_ms.load() < 5000);
}

TEST_CASE("lock file: a NaN timeout or deadline is an expired one, never undefined behaviour",
          "[lock_file]") {
  wltest::TempDir dir;
  const auto path = dir / "nan.lock";
  WorkerLock holder(path, quiet());
  REQUIRE(holder.try_lock());
  Children children;
  const pid_t child = children.spawn([&] {
    using seconds_double = std::chrono::duration<double>;
    const seconds_double nan(std::numeric_limits<double>::quiet_NaN());
    ::alarm(10);  // a wait that never ends is a failure (SIGALRM), not a hung suite
    WorkerLock lock(path, quiet());
    const auto began = std::chrono::steady_clock::now();
    if (lock.try_lock_for(nan)) return 1;
    if (lock.try_lock_until(
            std::chrono::time_point<std::chrono::steady_clock, seconds_double>(nan)))
      return 2;
    if (lock.try_lock_until(
            std::chrono::time_point<std::chrono::system_clock, seconds_double>(nan)))
      return 3;
    return std::chrono::steady_clock::now() - began < std::chrono::seconds(5) ? 0 : 4;
  });
  CHECK(children.wait(child) == 0);
}

TEST_CASE("lock file: try_lock_for and try_lock_until with unbounded deadlines wait for the lock",
          "[lock_file]") {
  const int variant = GENERATE(range(0, 7));
  const char* const names[] = {"try_lock_for(hours::max())",
                               "try_lock_for(nanoseconds::max())",
                               "try_lock_until(steady_clock::time_point::max())",
                               "try_lock_until(system_clock::time_point::max())",
                               "try_lock_for(hours::max(), ec)",
                               "try_lock_until(time_point<system_clock, hours>::max())",
                               "try_lock_until(time_point<steady_clock, hours>::max())"};
  INFO(names[variant]);
  wltest::TempDir dir;
  const auto path = dir / "forever.lock";
  WorkerLock holder(path, quiet());
  REQUIRE(holder.try_lock());
  struct Board {
    std::atomic<int> started{0};
    std::atomic<int> got{-1};
    std::atomic<std::int64_t> returned_ms{0};
  };
  wltest::Shared<Board> board;
  Children children;
  const pid_t child = children.spawn([&] {
    WorkerLock lock(path, quiet());
    board->started.store(1);
    bool got = false;
    std::error_code ec;
    switch (variant) {
      case 0:
        got = lock.try_lock_for(std::chrono::hours::max());
        break;
      case 1:
        got = lock.try_lock_for(std::chrono::nanoseconds::max());
        break;
      case 2:
        got = lock.try_lock_until(std::chrono::steady_clock::time_point::max());
        break;
      case 3:
        got = lock.try_lock_until(std::chrono::system_clock::time_point::max());
        break;
      case 4:
        got = lock.try_lock_for(std::chrono::hours::max(), ec) && !ec;
        break;
      case 5:
        got = lock.try_lock_until(
            std::chrono::time_point<std::chrono::system_clock, std::chrono::hours>::max());
        break;
      default:
        got = lock.try_lock_until(
            std::chrono::time_point<std::chrono::steady_clock, std::chrono::hours>::max());
        break;
    }
    board->returned_ms.store(now_ms());
    board->got.store(got ? 1 : 0);
    return 0;
  });
  REQUIRE(reach(board->started, 1));
  std::this_thread::sleep_for(300ms);
  CHECK(board->got.load() == -1);  // still waiting
  const auto released_ms = now_ms();
  holder.unlock();
  CHECK(wait_or_kill(children, child, 10s) == 0);
  CHECK(board->got.load() == 1);
  CHECK(board->returned_ms.load() >= released_ms);
}

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

TEST_CASE("lock file: a file that is not a lock file is locked but never truncated or written",
          "[lock_file]") {
  const Mechanism m = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  const int kind = GENERATE(range(0, 4));
  wltest::TempDir dir;
  const auto path = dir / "important.conf";
  std::string content;
  switch (kind) {
    case 0:  // a configuration file that $WORKERLOCK_PATH named by mistake
      for (int i = 0; content.size() < 49780; ++i)
        content += fmt::format("setting_{} = value {}\n", i, i * 7);
      content.resize(49780);
      break;
    case 1:  // another tool's pidfile
      content = "12345\n";
      break;
    case 2:  // binary garbage shorter than a record
      for (int i = 0; i < 300; ++i) content += static_cast<char>((i * 37 + 11) % 256);
      break;
    default:  // one line without a newline
      content = "hello";
      break;
  }
  INFO("mechanism=" << workerlock::to_string(m) << " kind=" << kind);
  REQUIRE(write_file(path, content));
  const timespec long_ago[2] = {{1000000000, 0}, {1000000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), long_ago, 0) == 0);

  wltest::Shared<ForeignBoard> board;
  Children children;
  constexpr int workers = 4;
  for (int i = 0; i < workers; ++i) {
    children.spawn([&] {
      ::setenv("WORKERLOCK_PATH", path.c_str(), 1);
      Options options;
      options.mechanism = m;
      options.log = [&](LogLevel level, std::string_view line) {
        if (level == LogLevel::warning && line.find(path.native()) != std::string_view::npos) {
          board->warnings_naming_path.fetch_add(1);
          board->warning.set(line);
        }
      };
      board->start.arrive_and_wait();
      std::error_code ec;
      auto election = workerlock::is_primary_worker(workerlock::default_lock_path(), options, ec);
      if (ec) {
        board->errors.fetch_add(1);
        return 2;
      }
      (election.role == Role::primary ? board->primaries : board->secondaries).fetch_add(1);
      const auto give_up = std::chrono::steady_clock::now() + 20s;
      while (!board->release.load() && std::chrono::steady_clock::now() < give_up)
        std::this_thread::sleep_for(1ms);
      return 0;
    });
  }
  REQUIRE(board->start.release_when(workers));
  REQUIRE(wltest::eventually(
      [&] { return board->primaries + board->secondaries + board->errors == workers; }));
  CHECK(board->errors.load() == 0);
  CHECK(board->primaries.load() == 1);
  CHECK(board->warnings_naming_path.load() == 1);
  INFO("warning: " << board->warning.str());
  CHECK_THAT(board->warning.str(), Catch::Matchers::Contains("not a workerlock lock file"));
  CHECK(probe(path, m) == 1);
  struct stat during {};
  REQUIRE(::stat(path.c_str(), &during) == 0);
  CHECK(during.st_mtim.tv_sec == 1000000000);
  CHECK(read_file(path) == content);
  board->release.store(true);
  CHECK(children.wait_all_failures() == 0);
  CHECK(read_file(path) == content);

  // unlock_and_remove() releases it but never deletes it.
  const auto problem = in_child([&]() -> std::string {
    WorkerLock lock(path, quiet(m));
    if (!lock.try_lock()) return "try_lock failed";
    std::error_code ec;
    lock.unlock_and_remove(ec);
    if (ec != std::errc::operation_not_permitted) return "unlock_and_remove: " + ec.message();
    if (lock.owns_lock()) return "still held";
    return {};
  });
  CHECK(problem == "");
  CHECK(read_file(path) == content);
  CHECK(probe(path, m) == 0);
}

TEST_CASE("lock file: an empty file or one holding a record still gets the holder record",
          "[lock_file]") {
  const bool empty = GENERATE(true, false);
  wltest::TempDir dir;
  const auto path = dir / "ours.lock";
  REQUIRE(write_file(path, empty ? ""
                                 : "1\nacquired=2020-01-01T00:00:00.000000Z\nhost=x\n"
                                   "pidns=1\nmechanism=ofd\n" +
                                       std::string(2000, '#')));
  wltest::Shared<Text> warning;
  Children children;
  const pid_t child = children.spawn([&] {
    Options options;
    options.log = [&](LogLevel level, std::string_view line) {
      if (level != LogLevel::info) warning->set(line);
    };
    auto election = workerlock::is_primary_worker(path, options);
    return election.role == Role::primary ? 0 : 2;
  });
  CHECK(wait_or_kill(children, child, 10s) == 0);
  CHECK(warning->str() == "");
  const auto text = read_file(path);
  CHECK(text.rfind(std::to_string(child) + "\n", 0) == 0);
  CHECK(text.size() < 512);
}

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
int blocked_waiters_on(ino_t ino) {
  std::ifstream locks("/proc/locks");
  std::string line;
  int n = 0;
  const auto needle = fmt::format(":{} ", ino);
  while (std::getline(locks, line))
    if (line.find("->") != std::string::npos && line.find(needle) != std::string::npos) ++n;
  return n;
}

TEST_CASE("lock file: two processes with two posix Coordinators each fail over at once and quietly",
          "[lock_file][threads]") {
  wltest::TempDir dir;
  const fs::path files[2] = {dir / "one.lock", dir / "two.lock"};
  wltest::Shared<CrossBoard> board;
  Children children;

  // Process p is primary on file p and then a standby on the other file.
  const auto process = [&](int p) {
    CoordinatorOptions options;
    options.lock = quiet(Mechanism::posix);
    options.lock.log = [&](LogLevel level, std::string_view line) {
      if (level != LogLevel::info) {
        board->warnings.fetch_add(1);
        board->warning.set(line);
      }
    };
    std::vector<std::unique_ptr<Coordinator>> coordinators;
    for (int n = 0; n < 2; ++n) {
      const int f = n == 0 ? p : 1 - p;
      auto c = std::make_unique<Coordinator>(files[f], options);
      c->on_promoted([&, f] {
        board->promoted_ms[p][f].store(now_ms());
        board->primary_on[p][f].store(1);
      });
      c->on_demoted([&, f] { board->primary_on[p][f].store(0); });
      c->start();
      coordinators.push_back(std::move(c));
      board->step[p].store(n + 1);
      if (n == 0 && !reach(board->step[p], 10 + n, 20s)) return 2;  // wait for the parent's go
    }
    while (!board->quit.load()) std::this_thread::sleep_for(1ms);
    return 0;
  };
  const pid_t first = children.spawn([&] { return process(0); });
  REQUIRE(reach(board->step[0], 1));  // primary on one.lock
  const pid_t second = children.spawn([&] { return process(1); });
  REQUIRE(reach(board->step[1], 1));  // primary on two.lock
  // on_promoted may still be running on the coordinator thread when start() returns.
  REQUIRE(wltest::eventually([&] { return board->primary_on[0][0].load() == 1; }));
  REQUIRE(wltest::eventually([&] { return board->primary_on[1][1].load() == 1; }));
  board->step[0].store(10);  // first: standby on two.lock, blocked in the kernel
  REQUIRE(reach(board->step[0], 2));
  struct stat two {};
  REQUIRE(::stat(files[1].c_str(), &two) == 0);
  REQUIRE(wltest::eventually([&] { return blocked_waiters_on(two.st_ino) >= 1; }));
  board->step[1].store(10);  // second: standby on one.lock, which the kernel calls a deadlock
  REQUIRE(reach(board->step[1], 2));
  std::this_thread::sleep_for(1500ms);  // long enough for several retries
  CHECK(board->primary_on[1][0].load() == 0);
  CHECK(board->primary_on[0][1].load() == 0);

  const auto killed_ms = now_ms();
  ::kill(first, SIGKILL);
  CHECK(wait_or_kill(children, first, 10s) == 128 + SIGKILL);
  REQUIRE(wltest::eventually([&] { return board->primary_on[1][0].load() == 1; }, 10s));
  const auto failover_ms = board->promoted_ms[1][0].load() - killed_ms;
  INFO("failover took " << failover_ms << " ms");
  CHECK(failover_ms < 2000);
  INFO("warning: " << board->warning.str());
  CHECK(board->warnings.load() == 0);
  board->quit.store(true);
  CHECK(wait_or_kill(children, second, 20s) == 0);
}

// =========================================================================================
// Items: bad configuration and error messages
// =========================================================================================

TEST_CASE(
    "lock file: WORKERLOCK_PATH values that are blank relative or hold control characters "
    "are refused",
    "[lock_file]") {
  const std::string value =
      GENERATE(as<std::string>{}, " ", "\t", "relative.lock", "./x.lock", "/tmp/x.lock\n",
               " /tmp/x.lock", "/tmp/x.lock ", "/tmp/a\001b.lock");
  INFO("WORKERLOCK_PATH='" << value << "'");
  wltest::TempDir dir;
  const auto problem = in_child([&]() -> std::string {
    if (::chdir(dir.path().c_str()) != 0) return "chdir";
    ::setenv("WORKERLOCK_PATH", value.c_str(), 1);
    std::error_code ec;
    const auto empty = workerlock::default_lock_path(ec);
    if (ec != std::errc::invalid_argument) return "ec: " + ec.message();
    if (!empty.empty()) return "default_lock_path(ec) returned " + empty.string();
    try {
      (void)workerlock::default_lock_path();
      return "default_lock_path() accepted it";
    } catch (const lock_error& e) {
      if (std::string(e.what()).find("WORKERLOCK_PATH") == std::string::npos)
        return std::string("what() does not name WORKERLOCK_PATH: ") + e.what();
      if (e.code() != std::errc::invalid_argument) return "code: " + e.code().message();
    }
    try {
      auto election = workerlock::is_primary_worker();
      return "is_primary_worker() elected with it";
    } catch (const lock_error&) {
    }
    if (!fs::is_empty(dir.path())) return "a file was created";
    return {};
  });
  CHECK(problem == "");
}

TEST_CASE(
    "lock file: an absolute WORKERLOCK_PATH is used and relative runtime directories are "
    "ignored",
    "[lock_file]") {
  wltest::TempDir dir;
  const auto problem = in_child([&]() -> std::string {
    ::setenv("WORKERLOCK_PATH", (dir / "ok.lock").c_str(), 1);
    if (workerlock::default_lock_path() != dir / "ok.lock") return "absolute value not used";
    ::unsetenv("WORKERLOCK_PATH");
    ::setenv("RUNTIME_DIRECTORY", "relative-runtime", 1);
    ::setenv("XDG_RUNTIME_DIR", dir.path().c_str(), 1);
    const auto got = workerlock::default_lock_path();
    if (got.parent_path() != dir.path()) return "relative RUNTIME_DIRECTORY used: " + got.string();
    ::setenv("XDG_RUNTIME_DIR", "relative-xdg", 1);
    if (workerlock::default_lock_path().is_relative()) return "relative XDG_RUNTIME_DIR used";
    return {};
  });
  CHECK(problem == "");
}

TEST_CASE(
    "lock file: errors say what kind of file is at the path and that a regular file is needed",
    "[lock_file]") {
  wltest::TempDir dir;
  const auto socket_path = dir / "a-socket";
  const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(listener >= 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::snprintf(address.sun_path, sizeof address.sun_path, "%s", socket_path.c_str());
  REQUIRE(::bind(listener, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  const auto fifo = dir / "a-fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0644) == 0);
  const auto plain = dir / "plain.lock";
  REQUIRE(write_file(plain, ""));

  struct Case {
    fs::path path;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {socket_path, "the path is a socket"},
      {fifo, "the path is a FIFO"},
      {"/dev/tty", "the path is a character device"},
      {"/dev/null", "the path is a character device"},
      {dir.path(), "the path is a directory"},
      {dir / "missing.lock/", "ends with '/'"},
      {fs::path(plain.native() + "/"), "ends with '/'"},
  };
  for (const auto& c : cases) {
    INFO("path: " << c.path.native());
    const auto problem = in_child([&]() -> std::string {
      for (const auto m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock}) {
        WorkerLock lock(c.path, quiet(m));
        std::error_code ec;
        if (lock.try_lock(ec) || !ec) return "locked it";
        try {
          (void)lock.try_lock();
          return "no exception";
        } catch (const lock_error& e) {
          const std::string what = e.what();
          if (what.find(c.expected) == std::string::npos) return "what(): " + what;
          if (what.find("a lock file must be a regular file") == std::string::npos)
            return "what() does not say what is expected: " + what;
          if (what.find(c.path.native()) == std::string::npos) return "no path: " + what;
        }
      }
      return {};
    });
    CHECK(problem == "");
  }
  ::close(listener);
  CHECK_FALSE(fs::exists(dir / "missing.lock"));
  CHECK(fs::is_regular_file(plain));
}

}  // namespace
