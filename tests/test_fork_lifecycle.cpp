// tests/test_fork_lifecycle.cpp: fork safety, handle lifecycle, race-free removal, signals,
// the POSIX close-releases trap and threads. Every cross-process property is checked with
// real child processes (tests/support.hpp); their bookkeeping lives in shared memory.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <workerlock/workerlock.hpp>

#include "support.hpp"

extern char** environ;

namespace {

using namespace std::chrono_literals;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WorkerLock;

static_assert(std::atomic<int>::is_always_lock_free,
              "shared-memory bookkeeping needs lock-free atomics");
static_assert(std::atomic<bool>::is_always_lock_free,
              "shared-memory bookkeeping needs lock-free atomics");
static_assert(std::atomic<pid_t>::is_always_lock_free,
              "shared-memory bookkeeping needs lock-free atomics");

Options quiet(Mechanism mechanism) { return Options{}.with(mechanism).silent(); }

std::string describe(Mechanism mechanism) {
  return "mechanism=" + std::string(workerlock::to_string(mechanism));
}

// ---------------------------------------------------------------------------------------
// Another process's view of the lock.
// ---------------------------------------------------------------------------------------

enum class Probe { acquired, busy, error };

std::ostream& operator<<(std::ostream& out, Probe probe) {
  switch (probe) {
    case Probe::acquired:
      return out << "acquired";
    case Probe::busy:
      return out << "busy";
    case Probe::error:
      return out << "error";
  }
  return out << "?";
}

//! Forks a fresh process that tries once to take the lock on `path` with a new handle and
//! exits (releasing it). Tells whether that other process got the lock.
Probe probe_from_other_process(const std::filesystem::path& path, Mechanism mechanism) {
  const pid_t pid = wltest::fork_child([&] {
    WorkerLock other(path, quiet(mechanism));
    std::error_code ec;
    const bool held = other.try_lock(ec);
    if (ec) return 2;
    return held ? 0 : 1;
  });
  switch (wltest::wait_exit_code(pid)) {
    case 0:
      return Probe::acquired;
    case 1:
      return Probe::busy;
    default:
      return Probe::error;
  }
}

// ---------------------------------------------------------------------------------------
// Processes: reaping (also of orphaned grandchildren), liveness, /proc inspection.
// ---------------------------------------------------------------------------------------

//! Makes this process the subreaper of its descendants for the scope, so grandchildren
//! orphaned by a killed child are reparented here and can be checked and reaped by pid.
//! At scope exit every watched process not reaped yet is SIGKILLed and reaped, so a failed
//! REQUIRE never leaves processes behind. Only pids that are still unreaped children of
//! this process are ever signalled, so a pid can never have been reused.
class Reaper {
 public:
  Reaper() : subreaper_(::prctl(PR_SET_CHILD_SUBREAPER, 1L, 0L, 0L, 0L) == 0) {}
  ~Reaper() {
    for (const pid_t pid : pids_) ::kill(pid, SIGKILL);  // watch() admits only pids > 0
    for (const pid_t pid : pids_) {
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
    if (subreaper_) ::prctl(PR_SET_CHILD_SUBREAPER, 0L, 0L, 0L, 0L);
  }
  Reaper(const Reaper&) = delete;
  Reaper& operator=(const Reaper&) = delete;

  bool is_subreaper() const { return subreaper_; }

  //! Only real pids are watched: kill(0 or -1, ...) would hit whole process groups.
  pid_t watch(pid_t pid) {
    if (pid > 0) pids_.push_back(pid);
    return pid;
  }

  //! Waits up to `timeout` for `pid`: its exit code, 128 + the signal that killed it, or -2
  //! if it did not finish in time (then it is killed, so a hang fails instead of blocking).
  int exit_code(pid_t pid, std::chrono::milliseconds timeout = 30s) {
    if (pid <= 0) return -1;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    for (;;) {
      const pid_t got = ::waitpid(pid, &status, WNOHANG);
      if (got == pid) break;
      if (got < 0 && errno != EINTR) {
        forget(pid);
        return -1;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        ::kill(pid, SIGKILL);
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        forget(pid);
        return -2;
      }
      std::this_thread::sleep_for(200us);
    }
    forget(pid);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
  }

  //! Kills a watched process with `signal_number` and returns how it ended.
  int kill_and_reap(pid_t pid, int signal_number = SIGKILL) {
    if (pid <= 0) return -1;
    ::kill(pid, signal_number);
    return exit_code(pid);
  }

 private:
  void forget(pid_t pid) { pids_.erase(std::remove(pids_.begin(), pids_.end(), pid), pids_.end()); }

  bool subreaper_ = false;
  std::vector<pid_t> pids_;
};

//! True while `pid` exists and has not exited (a zombie has exited).
bool is_running(pid_t pid) {
  std::ifstream stat_file("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat_file, text)) return false;
  const auto paren = text.rfind(')');
  if (paren == std::string::npos || paren + 2 >= text.size()) return false;
  const char state = text[paren + 2];
  return state != 'Z' && state != 'X' && state != 'x';
}

//! The command line of `pid`, arguments separated by spaces.
std::string command_line(pid_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::replace(text.begin(), text.end(), '\0', ' ');
  return text;
}

struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
};

FileId id_of(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino};
}

//! How many descriptors of process `pid` refer to the file `target`, or to `path` by name
//! (a link text naming the path, also "(deleted)" ones); -1 if /proc/<pid>/fd is unreadable.
int descriptors_on(pid_t pid, FileId target, const std::filesystem::path& path) {
  const std::string directory = "/proc/" + std::to_string(pid) + "/fd";
  DIR* listing = ::opendir(directory.c_str());
  if (listing == nullptr) return -1;
  int count = 0;
  while (const dirent* entry = ::readdir(listing)) {
    if (entry->d_name[0] == '.') continue;
    const std::string link = directory + "/" + entry->d_name;
    struct stat st {};
    const bool same_file =
        ::stat(link.c_str(), &st) == 0 && st.st_dev == target.dev && st.st_ino == target.ino;
    char text[4096];
    const ssize_t length = ::readlink(link.c_str(), text, sizeof text - 1);
    const bool names_path =
        length > 0 &&
        std::string_view(text, static_cast<std::size_t>(length)).find(path.native()) == 0;
    if (same_file || names_path) ++count;
  }
  ::closedir(listing);
  return count;
}

//! One line of /proc/locks: a lock held ("POSIX", "OFDLCK", "FLOCK") or a blocked waiter.
struct KernelLock {
  std::string kind;
  long pid = 0;
  bool waiter = false;
  unsigned major_number = 0;
  unsigned minor_number = 0;
  unsigned long inode = 0;

  bool on(FileId file) const {
    return inode == file.ino && major_number == major(file.dev) && minor_number == minor(file.dev);
  }
};

//! The kernel's table of locks (and waiters), parsed token by token so that the layout of
//! the waiter lines ("1: -> FLOCK ...") does not matter.
std::vector<KernelLock> kernel_locks() {
  std::vector<KernelLock> table;
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    KernelLock entry;
    entry.waiter = line.find("->") != std::string::npos;
    std::istringstream fields(line);
    std::string token;
    std::vector<std::string> tokens;
    while (fields >> token) tokens.push_back(token);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      int used = 0;
      if (std::sscanf(tokens[i].c_str(), "%x:%x:%lu%n", &entry.major_number, &entry.minor_number,
                      &entry.inode, &used) == 3 &&
          static_cast<std::size_t>(used) == tokens[i].size() && i >= 4) {
        entry.pid = std::strtol(tokens[i - 1].c_str(), nullptr, 10);
        entry.kind = tokens[i - 4];
        table.push_back(entry);
        break;
      }
    }
  }
  return table;
}

//! How many blocked waiters /proc/locks lists on the file `target`.
int blocked_waiters(FileId target) {
  int count = 0;
  for (const auto& entry : kernel_locks()) count += entry.waiter && entry.on(target) ? 1 : 0;
  return count;
}

//! True when the kernel lists a POSIX lock held (not waited for) by process `pid` on `target`.
bool kernel_posix_lock_held_by(pid_t pid, FileId target) {
  for (const auto& entry : kernel_locks()) {
    if (!entry.waiter && entry.kind == "POSIX" && entry.pid == pid && entry.on(target)) return true;
  }
  return false;
}

//! Waits until `count` processes are blocked in the kernel waiting for `target`, or until
//! `watched` (when given) has exited. A POSIX lock() may poll instead of sleeping in
//! F_SETLKW (two handles of one process cannot be told apart by the kernel), and then there
//! is no waiter line to see: for POSIX, give the waiter time and do not insist.
bool wait_for_blocked_waiters(FileId target, Mechanism mechanism, int count = 1,
                              pid_t watched = 0) {
  const auto blocked_or_gone = [&] {
    return blocked_waiters(target) >= count || (watched != 0 && !is_running(watched));
  };
  if (mechanism == Mechanism::posix) {
    wltest::eventually(blocked_or_gone, 500ms);
    std::this_thread::sleep_for(5ms);
    return true;
  }
  return wltest::eventually(blocked_or_gone);
}

//! True once `pid` is stopped (SIGSTOP), per /proc/<pid>/stat.
bool is_stopped(pid_t pid) {
  std::ifstream stat_file("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat_file, text)) return false;
  const auto paren = text.rfind(')');
  return paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'T';
}

//! The fstat() identity of the open descriptor equals the stat() of the path it was
//! opened from: the handle holds the file that the path names now.
bool holds_the_named_file(const WorkerLock& lock) {
  struct stat by_fd {};
  struct stat by_path {};
  if (lock.native_handle() < 0 || ::fstat(lock.native_handle(), &by_fd) != 0) return false;
  if (::stat(lock.path().c_str(), &by_path) != 0) return false;
  return by_fd.st_dev == by_path.st_dev && by_fd.st_ino == by_path.st_ino && by_fd.st_nlink > 0;
}

//! True when `line` contains `number` as a whole number (not as part of a longer one).
bool mentions_number(std::string_view line, long number) {
  const std::string digits = std::to_string(number);
  for (auto at = line.find(digits); at != std::string_view::npos; at = line.find(digits, at + 1)) {
    const bool digit_before = at > 0 && std::isdigit(static_cast<unsigned char>(line[at - 1])) != 0;
    const auto end = at + digits.size();
    const bool digit_after =
        end < line.size() && std::isdigit(static_cast<unsigned char>(line[end])) != 0;
    if (!digit_before && !digit_after) return true;
  }
  return false;
}

//! The first problem any child reports, in shared memory, for the parent's messages.
struct Notes {
  std::atomic<int> count{0};
  char first[512] = {};

  void note(const char* what) {
    if (count.fetch_add(1) == 0)
      std::snprintf(first, sizeof first, "pid %d: %s", static_cast<int>(::getpid()), what);
  }
  void note(const char* what, const std::error_code& ec) {
    const std::string text = std::string(what) + ": " + ec.message();
    note(text.c_str());
  }
  std::string text() const { return count.load() == 0 ? std::string("none") : std::string(first); }
};

//! A critical-section checker shared by all processes: exactly one may be inside.
struct Exclusion {
  std::atomic<int> inside{0};
  std::atomic<int> overlaps{0};
  std::atomic<int> entries{0};

  void enter() {
    if (inside.fetch_add(1) != 0) overlaps.fetch_add(1);
    entries.fetch_add(1);
  }
  void leave() { inside.fetch_sub(1); }
};

//! Waits until killed: what a child does once its part is done.
[[noreturn]] void park() {
  for (;;) ::pause();
}

std::atomic<int>* g_signal_counter = nullptr;

void count_signal(int /*signal_number*/) {
  if (g_signal_counter != nullptr) g_signal_counter->fetch_add(1);
}

}  // namespace

// =======================================================================================
// 1. Fork safety
// =======================================================================================

TEST_CASE(
    "Fork safety - a helper forked without exec by the primary is secondary and does not keep the "
    "lock alive",
    "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  REQUIRE(reaper.is_subreaper());

  struct Book {
    std::atomic<int> primary_won{-1};
    std::atomic<int> primary_fds{-1};
    std::atomic<pid_t> helper{0};
    std::atomic<int> helper_owns{-1};
    std::atomic<int> helper_lock_inherited{-1};
    std::atomic<int> helper_role_secondary{-1};
    std::atomic<int> helper_role_compares_primary{-1};
    std::atomic<int> helper_role_inherited{-1};
    std::atomic<pid_t> helper_role_elected_in{0};
    std::atomic<int> helper_native_handle{-2};
    std::atomic<int> helper_fds{-1};
    std::atomic<bool> helper_ready{false};
  };
  wltest::Shared<Book> book;

  const pid_t primary = reaper.watch(wltest::fork_child([&] {
    auto election = workerlock::is_primary_worker(path, quiet(mechanism));
    book->primary_won = election.role == Role::primary && election.lock.owns_lock() ? 1 : 0;
    const FileId lock_file = id_of(path);
    book->primary_fds = descriptors_on(::getpid(), lock_file, path);
    book->helper = wltest::fork_child([&] {
      // The helper: a child of the primary that never execs.
      book->helper_owns = election.lock.owns_lock() ? 1 : 0;
      book->helper_lock_inherited = election.lock.inherited_across_fork() ? 1 : 0;
      book->helper_role_secondary = election.role.get() == Role::secondary ? 1 : 0;
      book->helper_role_compares_primary = election.role == Role::primary ? 1 : 0;
      book->helper_role_inherited = election.role.inherited_across_fork() ? 1 : 0;
      book->helper_role_elected_in = election.role.elected_in();
      book->helper_native_handle = election.lock.native_handle();
      book->helper_fds = descriptors_on(::getpid(), lock_file, path);
      book->helper_ready = true;
      // Lives until killed, but no longer than 30 s, should the test fail before it knows
      // the helper's pid (a grandchild is never left behind for good).
      const auto deadline = std::chrono::steady_clock::now() + 30s;
      while (std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
      return 0;
    });
    park();
    return 0;
  }));

  // The primary stores the helper's pid after fork() returns, maybe after the helper is ready.
  REQUIRE(wltest::eventually([&] { return book->helper_ready.load() && book->helper.load() > 0; }));
  const pid_t helper = reaper.watch(book->helper.load());
  REQUIRE(book->primary_won == 1);
  CHECK(book->primary_fds == 1);
  CHECK(book->helper_owns == 0);
  CHECK(book->helper_lock_inherited == 1);
  CHECK(book->helper_role_secondary == 1);
  CHECK(book->helper_role_compares_primary == 0);
  CHECK(book->helper_role_inherited == 1);
  CHECK(book->helper_role_elected_in == primary);
  CHECK(book->helper_native_handle == -1);
  CHECK(book->helper_fds == 0);  // the inherited descriptor was closed in the helper

  // While the primary lives, nobody else gets the lock.
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK(reaper.kill_and_reap(primary) == 128 + SIGKILL);
  REQUIRE(is_running(helper));
  // The primary is gone and its helper still lives: the lock is free at once.
  WorkerLock successor(path, quiet(mechanism));
  CHECK(successor.try_lock());
  CHECK(is_running(helper));
  CHECK(reaper.kill_and_reap(helper) == 128 + SIGKILL);
}

TEST_CASE("Fork safety - children the primary fork-execs or posix_spawns never hold the lock",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  REQUIRE(reaper.is_subreaper());

  struct Book {
    std::atomic<int> primary_won{-1};
    std::atomic<pid_t> forked_sleep{0};
    std::atomic<pid_t> spawned_sleep{0};
    std::atomic<int> spawn_error{-1};
    std::atomic<bool> ready{false};
  };
  wltest::Shared<Book> book;

  const pid_t primary = reaper.watch(wltest::fork_child([&] {
    auto election = workerlock::is_primary_worker(path, quiet(mechanism));
    book->primary_won = election.role == Role::primary ? 1 : 0;
    char program[] = "/bin/sleep";
    char seconds[] = "30";
    char* argv[] = {program, seconds, nullptr};
    book->forked_sleep = wltest::fork_child([&] {
      ::execv(program, argv);
      return 127;
    });
    pid_t spawned = 0;
    // posix_spawn runs no pthread_atfork handler: only O_CLOEXEC keeps the fd out.
    book->spawn_error = ::posix_spawn(&spawned, program, nullptr, nullptr, argv, environ);
    book->spawned_sleep = spawned;
    book->ready = true;
    park();
    return 0;
  }));

  REQUIRE(wltest::eventually([&] { return book->ready.load(); }));
  REQUIRE(book->primary_won == 1);
  REQUIRE(book->spawn_error == 0);
  const pid_t forked_sleep = reaper.watch(book->forked_sleep.load());
  const pid_t spawned_sleep = reaper.watch(book->spawned_sleep.load());
  REQUIRE(forked_sleep > 0);
  REQUIRE(spawned_sleep > 0);
  const FileId lock_file = id_of(path);
  REQUIRE(lock_file.ino != 0);

  for (const pid_t sleeper : {forked_sleep, spawned_sleep}) {
    INFO("sleep pid " << sleeper);
    REQUIRE(
        wltest::eventually([&] { return command_line(sleeper).rfind("/bin/sleep 30", 0) == 0; }));
    CHECK(descriptors_on(sleeper, lock_file, path) == 0);
  }
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK(reaper.kill_and_reap(primary) == 128 + SIGKILL);
  REQUIRE(is_running(forked_sleep));
  REQUIRE(is_running(spawned_sleep));
  WorkerLock successor(path, quiet(mechanism));
  CHECK(successor.try_lock());
  CHECK(is_running(forked_sleep));
  CHECK(is_running(spawned_sleep));
  CHECK(reaper.kill_and_reap(forked_sleep) == 128 + SIGKILL);
  CHECK(reaper.kill_and_reap(spawned_sleep) == 128 + SIGKILL);
}

TEST_CASE("Fork safety - an election won in the master before fork makes no child primary",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  constexpr int children = 4;

  struct Book {
    std::atomic<int> inherited_role_primary[children]{};
    std::atomic<int> inherited_role_secondary[children]{};
    std::atomic<int> inherited_owns[children]{};
    std::atomic<int> inherited_flagged[children]{};
    std::atomic<int> own_election_primary[children]{};
    std::atomic<int> own_election_owns[children]{};
    std::atomic<int> warned[children]{};
    std::atomic<int> first_round_done{0};
    wltest::StartLine master_released;
    std::atomic<int> second_round_winners{0};
    std::atomic<int> second_round_done{0};
    Notes notes;
  };
  wltest::Shared<Book> book;

  const pid_t master_pid = ::getpid();
  std::optional<workerlock::Election> master;
  master.emplace(workerlock::is_primary_worker(path, quiet(mechanism)));
  REQUIRE(master->role == Role::primary);
  REQUIRE(master->lock.owns_lock());

  std::vector<pid_t> pids;
  for (int i = 0; i < children; ++i) {
    pids.push_back(reaper.watch(wltest::fork_child([&, i] {
      // What the child inherited from the master.
      book->inherited_role_primary[i] = master->role == Role::primary ? 1 : 0;
      book->inherited_role_secondary[i] = master->role.get() == Role::secondary ? 1 : 0;
      book->inherited_owns[i] = master->lock.owns_lock() ? 1 : 0;
      book->inherited_flagged[i] = master->lock.inherited_across_fork() ? 1 : 0;

      // The child runs its own election while the master holds the lock.
      std::vector<std::pair<LogLevel, std::string>> lines;
      Options options = Options{}.with(mechanism);
      options.log = [&lines](LogLevel level, std::string_view line) {
        lines.emplace_back(level, std::string(line));
      };
      {
        auto mine = workerlock::is_primary_worker(path, options);
        book->own_election_primary[i] = mine.role == Role::primary ? 1 : 0;
        book->own_election_owns[i] = mine.lock.owns_lock() ? 1 : 0;
      }
      for (const auto& [level, line] : lines) {
        if (level == LogLevel::warning && mentions_number(line, master_pid) &&
            line.find("fork") != std::string::npos)
          book->warned[i] = 1;
      }
      book->first_round_done.fetch_add(1);

      // Once the master has released, exactly one child may win; the winner holds the lock
      // until every child has tried.
      book->master_released.arrive_and_wait();
      std::error_code ec;
      auto second = workerlock::is_primary_worker(path, options.silent(), ec);
      if (ec) book->notes.note("second election", ec);
      if (second.role == Role::primary) {
        book->second_round_winners.fetch_add(1);
        if (!second.lock.owns_lock()) book->notes.note("primary without the lock");
      }
      book->second_round_done.fetch_add(1);
      if (!wltest::eventually([&] { return book->second_round_done.load() == children; }, 20s))
        book->notes.note("timed out waiting for the other children");
      return 0;
    })));
  }

  REQUIRE(wltest::eventually([&] { return book->first_round_done.load() == children; }, 20s));
  for (int i = 0; i < children; ++i) {
    INFO("child " << i);
    CHECK(book->inherited_role_primary[i] == 0);
    CHECK(book->inherited_role_secondary[i] == 1);
    CHECK(book->inherited_owns[i] == 0);
    CHECK(book->inherited_flagged[i] == 1);
    CHECK(book->own_election_primary[i] == 0);
    CHECK(book->own_election_owns[i] == 0);
    CHECK(book->warned[i] == 1);
  }
  // The children's forks and elections did not take the master's lock away.
  CHECK(master->role == Role::primary);
  CHECK(master->lock.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // The master lets go by destroying its election, which closes its descriptor: if any
  // child still shared the master's open file, no child could win below.
  master.reset();
  REQUIRE(book->master_released.release_when(children));
  for (const pid_t pid : pids) CHECK(reaper.exit_code(pid) == 0);
  INFO("first problem reported by a child: " << book->notes.text());
  CHECK(book->notes.count == 0);
  CHECK(book->second_round_done == children);
  CHECK(book->second_round_winners == 1);
}

// =======================================================================================
// 2. Lifecycle
// =======================================================================================

TEST_CASE("Lifecycle - unlock twice is harmless and never releases another handle's lock",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";

  WorkerLock never_locked(path, quiet(mechanism));
  CHECK_NOTHROW(never_locked.unlock());
  CHECK_FALSE(never_locked.owns_lock());

  WorkerLock lock(path, quiet(mechanism));
  lock.lock();
  REQUIRE(lock.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK_NOTHROW(lock.unlock());
  CHECK_FALSE(lock.owns_lock());
  CHECK_NOTHROW(lock.unlock());
  std::error_code ec;
  lock.unlock(ec);
  CHECK_FALSE(ec);
  CHECK_FALSE(lock.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);

  // A second handle of this process takes the lock; a stray unlock() of the first must
  // not release it.
  WorkerLock sibling(path, quiet(mechanism));
  REQUIRE(sibling.try_lock());
  CHECK_NOTHROW(lock.unlock());
  CHECK(sibling.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  CHECK_FALSE(lock.try_lock());
  sibling.unlock();

  // The doubly unlocked handle still works.
  CHECK(lock.try_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  lock.unlock();
  CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);
}

TEST_CASE("Lifecycle - destroying a handle releases its lock for other processes", "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;

  {
    WorkerLock lock(path, quiet(mechanism));
    REQUIRE(lock.try_lock());
    CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  }
  CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);

  // The same seen the other way round: a child destroys its handle and lives on.
  struct Book {
    std::atomic<int> held{0};
    std::atomic<bool> destroy{false};
    std::atomic<bool> destroyed{false};
    std::atomic<bool> finish{false};
  };
  wltest::Shared<Book> book;
  const pid_t child = reaper.watch(wltest::fork_child([&] {
    {
      WorkerLock lock(path, quiet(mechanism));
      book->held = lock.try_lock() ? 1 : 0;
      while (!book->destroy.load()) std::this_thread::sleep_for(100us);
    }
    book->destroyed = true;
    while (!book->finish.load()) std::this_thread::sleep_for(100us);
    return 0;
  }));
  REQUIRE(wltest::eventually([&] { return book->held.load() != 0; }));
  REQUIRE(book->held == 1);
  WorkerLock parent(path, quiet(mechanism));
  CHECK_FALSE(parent.try_lock());
  book->destroy = true;
  REQUIRE(wltest::eventually([&] { return book->destroyed.load(); }));
  REQUIRE(is_running(child));
  CHECK(parent.try_lock());
  book->finish = true;
  CHECK(reaper.exit_code(child) == 0);
}

TEST_CASE("Lifecycle - move construction and move assignment transfer ownership", "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";

  std::optional<WorkerLock> original;
  original.emplace(path, quiet(mechanism));
  REQUIRE(original->try_lock());
  const int fd = original->native_handle();
  REQUIRE(fd >= 0);

  // Move construction.
  std::optional<WorkerLock> constructed;
  constructed.emplace(std::move(*original));
  CHECK(constructed->owns_lock());
  CHECK(static_cast<bool>(*constructed));
  CHECK(constructed->native_handle() == fd);
  CHECK(constructed->path() == path);
  CHECK(constructed->mechanism() == mechanism);
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // The moved-from handle holds nothing and refuses every attempt with EINVAL.
  WorkerLock& moved_from = *original;
  CHECK_FALSE(moved_from.owns_lock());
  CHECK_FALSE(static_cast<bool>(moved_from));
  CHECK(moved_from.native_handle() == -1);
  CHECK_THROWS_AS(moved_from.try_lock(), workerlock::lock_error);
  try {
    (void)moved_from.try_lock();
    FAIL("try_lock() on a moved-from handle did not throw");
  } catch (const workerlock::lock_error& e) {
    CHECK(e.code().value() == EINVAL);
  }
  CHECK_THROWS_AS(moved_from.lock(), workerlock::lock_error);
  std::error_code ec;
  CHECK_FALSE(moved_from.try_lock(ec));
  CHECK(ec.value() == EINVAL);
  ec.clear();
  moved_from.lock(ec);
  CHECK(ec.value() == EINVAL);
  CHECK_FALSE(moved_from.owns_lock());
  CHECK_NOTHROW(moved_from.unlock());
  // Destroying the moved-from handle releases nothing.
  original.reset();
  CHECK(constructed->owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Move assignment into an empty handle.
  std::optional<WorkerLock> assigned;
  assigned.emplace();
  CHECK_FALSE(assigned->owns_lock());
  *assigned = std::move(*constructed);
  CHECK(assigned->owns_lock());
  CHECK(assigned->native_handle() == fd);
  CHECK_FALSE(constructed->owns_lock());
  CHECK_THROWS_AS(constructed->try_lock(), workerlock::lock_error);
  ec.clear();
  CHECK_FALSE(constructed->try_lock(ec));
  CHECK(ec.value() == EINVAL);
  constructed.reset();
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Self-move-assignment keeps the lock.
  WorkerLock& self = *assigned;
  *assigned = std::move(self);
  CHECK(assigned->owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // The destination releases on destruction.
  assigned.reset();
  CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);
}

TEST_CASE("Lifecycle - move-assigning over a handle that holds a lock releases that lock first",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto first_path = dir / "first.lock";
  const auto second_path = dir / "second.lock";

  SECTION("the source holds another file") {
    WorkerLock target(first_path, quiet(mechanism));
    WorkerLock source(second_path, quiet(mechanism));
    REQUIRE(target.try_lock());
    REQUIRE(source.try_lock());
    CHECK(probe_from_other_process(first_path, mechanism) == Probe::busy);
    CHECK(probe_from_other_process(second_path, mechanism) == Probe::busy);

    target = std::move(source);
    CHECK(probe_from_other_process(first_path, mechanism) == Probe::acquired);
    CHECK(target.owns_lock());
    CHECK(target.path() == second_path);
    CHECK_FALSE(source.owns_lock());
    CHECK(probe_from_other_process(second_path, mechanism) == Probe::busy);
  }

  SECTION("the source is an idle handle on the same file") {
    WorkerLock target(first_path, quiet(mechanism));
    WorkerLock source(first_path, quiet(mechanism));
    REQUIRE(target.try_lock());
    REQUIRE_FALSE(source.try_lock());  // opens the file (a POSIX handle shares the descriptor)
    CHECK(probe_from_other_process(first_path, mechanism) == Probe::busy);

    target = std::move(source);
    CHECK_FALSE(target.owns_lock());
    CHECK(probe_from_other_process(first_path, mechanism) == Probe::acquired);
    // The handle taken over still works.
    CHECK(target.try_lock());
    CHECK(probe_from_other_process(first_path, mechanism) == Probe::busy);
  }

  SECTION("the source is empty") {
    WorkerLock target(first_path, quiet(mechanism));
    REQUIRE(target.try_lock());
    target = WorkerLock();
    CHECK_FALSE(target.owns_lock());
    CHECK(probe_from_other_process(first_path, mechanism) == Probe::acquired);
  }

  // Every handle of the sections is gone: nothing is held any more.
  CHECK(probe_from_other_process(first_path, mechanism) == Probe::acquired);
  CHECK(probe_from_other_process(second_path, mechanism) == Probe::acquired);
}

TEST_CASE("Lifecycle - re-locking reuses the open descriptor across unlock and try_lock cycles",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";

  WorkerLock lock(path, quiet(mechanism));
  CHECK(lock.native_handle() == -1);  // construction touches nothing
  CHECK_FALSE(std::filesystem::exists(path));
  REQUIRE(lock.try_lock());
  const int fd = lock.native_handle();
  REQUIRE(fd >= 0);
  CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
  // Mark the open file description: the offset belongs to it, and the library only uses
  // pread/pwrite. A reopened file (even one given the same fd number) starts at offset 0.
  REQUIRE(::lseek(fd, 7, SEEK_SET) == 7);
  const FileId opened = id_of(path);

  for (int cycle = 0; cycle < 20; ++cycle) {
    INFO("cycle " << cycle);
    lock.unlock();
    CHECK(lock.native_handle() == fd);
    CHECK(::fcntl(fd, F_GETFD) != -1);  // still open while unlocked
    if (cycle == 10) CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);
    if (cycle % 2 == 0) {
      REQUIRE(lock.try_lock());
    } else {
      lock.lock();
    }
    CHECK(lock.native_handle() == fd);
  }
  CHECK(::lseek(fd, 0, SEEK_CUR) == 7);
  const FileId now = id_of(path);
  CHECK(now.ino == opened.ino);
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
}

// =======================================================================================
// 3. Race-free removal
// =======================================================================================

TEST_CASE("Removal - concurrent unlock_and_remove cycles never let two processes hold the lock",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  constexpr int removers = 8;
  constexpr int iterations = 300;
  constexpr int cyclers = 2;

  struct Book {
    Exclusion exclusion;
    std::atomic<int> not_the_named_file{0};
    std::atomic<int> remover_cycles{0};
    std::atomic<int> removers_done{0};
    std::atomic<int> cycler_hits{0};
    std::atomic<int> cycler_misses{0};
    wltest::StartLine start;
    Notes notes;
  };
  wltest::Shared<Book> book;

  const auto critical_section = [&](const WorkerLock& lock) {
    book->exclusion.enter();
    if (!holds_the_named_file(lock)) book->not_the_named_file.fetch_add(1);
    std::this_thread::yield();
    book->exclusion.leave();
  };

  std::vector<pid_t> pids;
  for (int i = 0; i < removers; ++i) {
    pids.push_back(reaper.watch(wltest::fork_child([&] {
      WorkerLock lock(path, quiet(mechanism));
      book->start.arrive_and_wait();
      int result = 0;
      for (int n = 0; n < iterations; ++n) {
        try {
          lock.lock();
          if (!lock.owns_lock()) throw std::runtime_error("lock() returned without the lock");
          critical_section(lock);
          lock.unlock_and_remove();
          if (lock.owns_lock()) throw std::runtime_error("unlock_and_remove() left the lock held");
        } catch (const std::exception& e) {
          book->notes.note(e.what());
          result = 1;
          break;
        }
        book->remover_cycles.fetch_add(1);
      }
      book->removers_done.fetch_add(1);
      return result;
    })));
  }
  for (int i = 0; i < cyclers; ++i) {
    pids.push_back(reaper.watch(wltest::fork_child([&] {
      WorkerLock lock(path, quiet(mechanism));
      book->start.arrive_and_wait();
      while (book->removers_done.load() < removers) {
        std::error_code ec;
        if (lock.try_lock(ec)) {
          critical_section(lock);
          lock.unlock(ec);
          if (ec) {
            book->notes.note("unlock()", ec);
            return 1;
          }
          book->cycler_hits.fetch_add(1);
        } else if (ec) {
          book->notes.note("try_lock()", ec);
          return 1;
        } else {
          book->cycler_misses.fetch_add(1);
        }
        std::this_thread::sleep_for(20us);
      }
      return 0;
    })));
  }
  REQUIRE(book->start.release_when(removers + cyclers));
  int failures = 0;
  for (const pid_t pid : pids) failures += reaper.exit_code(pid, 60s) != 0 ? 1 : 0;

  INFO("first problem reported by a child: " << book->notes.text());
  INFO("cycler hits " << book->cycler_hits << ", misses " << book->cycler_misses);
  CHECK(failures == 0);
  CHECK(book->notes.count == 0);
  CHECK(book->exclusion.overlaps == 0);
  CHECK(book->not_the_named_file == 0);
  CHECK(book->remover_cycles == removers * iterations);
  CHECK(book->exclusion.entries == removers * iterations + book->cycler_hits);
}

TEST_CASE(
    "Removal - a handle that waited on the removed file ends up holding the file the path names "
    "now",
    "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  // Whether the waiter had already locked (and so verified) the old file once before.
  const bool verified_before = GENERATE(false, true);
  INFO(describe(mechanism) << " verified_before=" << verified_before);
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;

  struct Book {
    std::atomic<int> warmed_up{0};
    std::atomic<bool> parent_holds{false};
    std::atomic<ino_t> waited_on{0};
    std::atomic<bool> waiting{false};
    std::atomic<bool> removed{false};
    std::atomic<int> acquired{0};
    std::atomic<int> acquired_before_removal{0};
    std::atomic<int> holds_named_file{-1};
    std::atomic<bool> finish{false};
  };
  wltest::Shared<Book> book;

  const pid_t waiter = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    if (verified_before) {
      if (!lock.try_lock()) return 3;
      lock.unlock();
    }
    book->warmed_up = 1;
    while (!book->parent_holds.load()) std::this_thread::sleep_for(100us);
    if (lock.try_lock()) return 4;  // opens the old file, and must find it held
    struct stat old_file {};
    if (::fstat(lock.native_handle(), &old_file) != 0) return 5;
    book->waited_on = old_file.st_ino;
    book->waiting = true;
    lock.lock();
    book->acquired_before_removal = book->removed.load() ? 0 : 1;
    book->holds_named_file = holds_the_named_file(lock) ? 1 : 0;
    book->acquired = 1;
    while (!book->finish.load()) std::this_thread::sleep_for(100us);
    return lock.owns_lock() ? 0 : 6;
  }));

  REQUIRE(wltest::eventually([&] { return book->warmed_up.load() == 1; }));
  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  const FileId old_file = id_of(path);
  book->parent_holds = true;
  REQUIRE(wltest::eventually([&] { return book->waiting.load(); }));
  CHECK(book->waited_on == old_file.ino);
  REQUIRE(wait_for_blocked_waiters(old_file, mechanism));
  CHECK(book->acquired == 0);

  book->removed = true;
  holder.unlock_and_remove();
  CHECK_FALSE(holder.owns_lock());
  REQUIRE(wltest::eventually([&] { return book->acquired.load() == 1; }));
  CHECK(book->acquired_before_removal == 0);
  CHECK(book->holds_named_file == 1);
  // Nobody else can take the file the path names now: there is exactly one holder.
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  CHECK_FALSE(holder.try_lock());
  book->finish = true;
  CHECK(reaper.exit_code(waiter) == 0);
}

TEST_CASE(
    "Removal - a preempted waiter in lock keeps waiting however often the file is removed and "
    "recreated",
    "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  // The primary cycles lock() / unlock_and_remove() while one worker waits in lock() but
  // is never scheduled at the right moment (here: stopped, as a preempted process is). Each
  // time the worker wakes up on the removed file, the path already names a new file that
  // the primary holds, so the worker must simply wait again, for as long as it takes.
  constexpr int rounds = 80;

  struct Book {
    std::atomic<bool> waiting{false};
    std::atomic<int> acquired{0};
    std::atomic<int> holds_named_file{-1};
    std::atomic<bool> released{false};
    std::atomic<int> acquired_before_release{0};
    Notes notes;
  };
  wltest::Shared<Book> book;

  WorkerLock primary(path, quiet(mechanism));
  REQUIRE(primary.try_lock());
  const pid_t waiter = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    book->waiting = true;
    try {
      lock.lock();
    } catch (const std::exception& e) {
      book->notes.note(e.what());
      return 1;
    }
    if (!book->released.load()) book->acquired_before_release = 1;
    book->holds_named_file = holds_the_named_file(lock) ? 1 : 0;
    book->acquired = 1;
    return lock.owns_lock() ? 0 : 2;
  }));
  REQUIRE(wltest::eventually([&] { return book->waiting.load(); }));

  int completed = 0;
  for (int round = 0; round < rounds; ++round) {
    const FileId current = id_of(path);
    wait_for_blocked_waiters(current, mechanism, 1, waiter);
    if (!is_running(waiter)) break;
    REQUIRE(::kill(waiter, SIGSTOP) == 0);
    REQUIRE(wltest::eventually([&] { return is_stopped(waiter) || !is_running(waiter); }));
    primary.unlock_and_remove();
    REQUIRE(primary.try_lock());  // creates the file anew and takes it first
    REQUIRE(::kill(waiter, SIGCONT) == 0);
    ++completed;
  }
  // The waiter must still be waiting: neither given up nor holding.
  wait_for_blocked_waiters(id_of(path), mechanism, 1, waiter);
  INFO("rounds completed " << completed << "; waiter's problem: " << book->notes.text());
  CHECK(completed == rounds);
  CHECK(is_running(waiter));
  CHECK(book->acquired == 0);

  book->released = true;
  primary.unlock();
  CHECK(reaper.exit_code(waiter) == 0);
  CHECK(book->acquired == 1);
  CHECK(book->acquired_before_release == 0);
  CHECK(book->holds_named_file == 1);
}

// =======================================================================================
// 4. EINTR and signals
// =======================================================================================

TEST_CASE("Signals - lock keeps waiting through SIGUSR1 with and without SA_RESTART", "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  const bool sa_restart = GENERATE(false, true);
  INFO(describe(mechanism) << " SA_RESTART=" << sa_restart);
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  constexpr int signals = 5;

  struct Book {
    std::atomic<int> handled{0};
    std::atomic<int> handler_installed{0};
    std::atomic<bool> waiting{false};
    std::atomic<bool> returned{false};
    std::atomic<bool> released{false};
    std::atomic<int> returned_before_release{-1};
    std::atomic<int> owns_after{-1};
  };
  wltest::Shared<Book> book;

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  const FileId lock_file = id_of(path);

  const pid_t waiter = reaper.watch(wltest::fork_child([&] {
    g_signal_counter = &book->handled;
    struct sigaction action {};
    action.sa_handler = count_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = sa_restart ? SA_RESTART : 0;
    book->handler_installed = ::sigaction(SIGUSR1, &action, nullptr) == 0 ? 1 : 0;
    WorkerLock lock(path, quiet(mechanism));
    book->waiting = true;
    lock.lock();  // an exception ends the child with exit code 99
    book->returned_before_release = book->released.load() ? 0 : 1;
    book->owns_after = lock.owns_lock() ? 1 : 0;
    book->returned = true;
    return 0;
  }));

  REQUIRE(wltest::eventually([&] { return book->waiting.load(); }));
  REQUIRE(book->handler_installed == 1);
  REQUIRE(wait_for_blocked_waiters(lock_file, mechanism));
  for (int n = 0; n < signals; ++n) {
    INFO("signal " << n);
    const int before = book->handled.load();
    REQUIRE(::kill(waiter, SIGUSR1) == 0);
    REQUIRE(wltest::eventually([&] { return book->handled.load() > before; }));
    // lock() went back to waiting: it is blocked in the kernel again (or polling, for posix).
    CHECK(wait_for_blocked_waiters(lock_file, mechanism));
    CHECK_FALSE(book->returned);
    REQUIRE(is_running(waiter));
  }
  CHECK(book->handled == signals);
  CHECK(holder.owns_lock());

  book->released = true;
  holder.unlock();
  CHECK(reaper.exit_code(waiter) == 0);  // 99 if lock() threw
  CHECK(book->returned);
  CHECK(book->returned_before_release == 0);
  CHECK(book->owns_after == 1);
}

TEST_CASE("Signals - a SIGKILLed waiter disturbs neither the holder nor the other waiters",
          "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;

  struct Book {
    std::atomic<int> waiting{0};
    std::atomic<int> acquired{0};
    std::atomic<bool> released{false};
    std::atomic<int> acquired_before_release{0};
  };
  wltest::Shared<Book> book;

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  const FileId lock_file = id_of(path);

  const auto spawn_waiter = [&] {
    return reaper.watch(wltest::fork_child([&] {
      WorkerLock lock(path, quiet(mechanism));
      book->waiting.fetch_add(1);
      lock.lock();
      if (!book->released.load()) book->acquired_before_release.fetch_add(1);
      book->acquired.fetch_add(1);
      return lock.owns_lock() ? 0 : 1;
    }));
  };
  const pid_t victim = spawn_waiter();
  const pid_t survivor = spawn_waiter();
  REQUIRE(wltest::eventually([&] { return book->waiting.load() == 2; }));
  REQUIRE(wait_for_blocked_waiters(lock_file, mechanism, 2));

  CHECK(reaper.kill_and_reap(victim) == 128 + SIGKILL);
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  CHECK(book->acquired == 0);
  CHECK(is_running(survivor));

  book->released = true;
  holder.unlock();
  CHECK(reaper.exit_code(survivor) == 0);
  CHECK(book->acquired == 1);
  CHECK(book->acquired_before_release == 0);
}

TEST_CASE("Signals - SIGTERM with its default action frees the primary's lock", "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;

  struct Book {
    std::atomic<int> primary{-1};
  };
  wltest::Shared<Book> book;

  const pid_t primary = reaper.watch(wltest::fork_child([&] {
    ::signal(SIGTERM, SIG_DFL);
    auto election = workerlock::is_primary_worker(path, quiet(mechanism));
    book->primary = election.role == Role::primary ? 1 : 0;
    park();
    return 0;
  }));
  REQUIRE(wltest::eventually([&] { return book->primary.load() != -1; }));
  REQUIRE(book->primary == 1);
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  CHECK(reaper.kill_and_reap(primary, SIGTERM) == 128 + SIGTERM);
  WorkerLock successor(path, quiet(mechanism));
  CHECK(successor.try_lock());
}

// =======================================================================================
// 5. The POSIX close-releases trap
// =======================================================================================

TEST_CASE(
    "POSIX trap - a sibling handle created tried and destroyed in the holder's process keeps the "
    "lock",
    "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::posix, Mechanism::ofd, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  REQUIRE(probe_from_other_process(path, mechanism) == Probe::busy);

  {
    WorkerLock sibling(path, quiet(mechanism));
    CHECK_FALSE(sibling.try_lock());  // handles exclude each other inside one process
    CHECK_FALSE(sibling.owns_lock());
    CHECK_FALSE(sibling.try_lock_for(20ms));
  }
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Several siblings, some never tried, some unlocked without holding.
  for (int round = 0; round < 3; ++round) {
    WorkerLock tried(path, quiet(mechanism));
    WorkerLock untried(path, quiet(mechanism));
    CHECK_FALSE(tried.try_lock());
    tried.unlock();
    untried.unlock();
  }
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Roles swapped: once the holder lets go, a sibling gets in, and the former holder,
  // now excluded, is destroyed without taking the sibling's lock with it.
  std::optional<WorkerLock> former;
  former.emplace(std::move(holder));
  former->unlock();
  WorkerLock sibling(path, quiet(mechanism));
  REQUIRE(sibling.try_lock());
  CHECK_FALSE(former->try_lock());
  former.reset();
  CHECK(sibling.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);
  sibling.unlock();
  CHECK(probe_from_other_process(path, mechanism) == Probe::acquired);
}

TEST_CASE(
    "POSIX trap - lock_holder in the holding process reports it and does not release the lock",
    "[fork]") {
  const Mechanism mechanism = GENERATE(Mechanism::posix, Mechanism::ofd, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  REQUIRE(probe_from_other_process(path, mechanism) == Probe::busy);

  for (int round = 0; round < 3; ++round) {
    const auto seen = workerlock::lock_holder(path);
    REQUIRE(seen.has_value());
    CHECK(seen->pid == ::getpid());
    CHECK(seen->recorded);
    CHECK(seen->mechanism == mechanism);
    std::error_code ec;
    const auto again = workerlock::lock_holder(path, ec);
    CHECK_FALSE(ec);
    REQUIRE(again.has_value());
    CHECK(again->pid == ::getpid());
  }
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Another process sees this process as the holder too.
  struct Book {
    std::atomic<pid_t> seen{-2};
  };
  wltest::Shared<Book> book;
  const pid_t child = reaper.watch(wltest::fork_child([&] {
    const auto seen = workerlock::lock_holder(path);
    book->seen = seen ? seen->pid.value_or(-1) : -1;
    return 0;
  }));
  CHECK(reaper.exit_code(child) == 0);
  CHECK(book->seen == ::getpid());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  holder.unlock();
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
}

// =======================================================================================
// 6. Threads
// =======================================================================================

TEST_CASE("Threads - two threads with their own handles on one file exclude each other",
          "[fork][threads]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  constexpr int try_iterations = 2000;
  constexpr int lock_iterations = 300;

  Exclusion exclusion;
  std::atomic<int> errors{0};
  std::atomic<int> hits[2]{};
  std::atomic<int> ready{0};

  const auto body = [&](int id) {
    WorkerLock lock(path, quiet(mechanism));
    ready.fetch_add(1);
    while (ready.load() < 2) std::this_thread::yield();
    for (int n = 0; n < try_iterations; ++n) {
      std::error_code ec;
      if (lock.try_lock(ec)) {
        exclusion.enter();
        std::this_thread::yield();
        exclusion.leave();
        hits[id].fetch_add(1);
        lock.unlock(ec);
        if (ec) errors.fetch_add(1);
      } else if (ec) {
        errors.fetch_add(1);
      }
    }
    // Blocking waits between the two threads (a POSIX lock() polls).
    for (int n = 0; n < lock_iterations; ++n) {
      std::error_code ec;
      lock.lock(ec);
      if (ec || !lock.owns_lock()) {
        errors.fetch_add(1);
        continue;
      }
      exclusion.enter();
      std::this_thread::yield();
      exclusion.leave();
      lock.unlock(ec);
      if (ec) errors.fetch_add(1);
    }
  };
  std::thread first(body, 0);
  std::thread second(body, 1);
  first.join();
  second.join();

  INFO("hits " << hits[0] << " + " << hits[1]);
  CHECK(errors == 0);
  CHECK(exclusion.overlaps == 0);
  CHECK(hits[0] + hits[1] > 0);
  CHECK(exclusion.entries == hits[0] + hits[1] + 2 * lock_iterations);
}

TEST_CASE(
    "Threads - handles of several threads never hold a lock the kernel has let go while another "
    "process contends",
    "[fork][threads]") {
  const Mechanism mechanism = GENERATE(Mechanism::ofd, Mechanism::posix, Mechanism::flock);
  INFO(describe(mechanism));
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  // POSIX locks belong to the process, so a thread's unlock() drops the lock in the kernel
  // for every handle of the process; only one handle of the process may ever believe it
  // holds the lock, and while it does the kernel must list a POSIX lock of this process.
  const auto budget = mechanism == Mechanism::posix ? 3s : 1s;
  constexpr int trying_threads = 2;
  constexpr int locking_threads = 2;

  struct Book {
    Exclusion exclusion;
    std::atomic<int> lost{0};
    std::atomic<int> errors{0};
    std::atomic<int> other_process_entries{0};
    std::atomic<bool> stop{false};
    Notes notes;
  };
  wltest::Shared<Book> book;
  {
    WorkerLock create(path, quiet(mechanism));
    REQUIRE(create.try_lock());
  }

  // The other process, forked before any thread starts.
  const pid_t other = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    while (!book->stop.load()) {
      std::error_code ec;
      lock.lock(ec);
      if (ec) {
        book->notes.note("other process: lock()", ec);
        return 1;
      }
      book->exclusion.enter();
      book->other_process_entries.fetch_add(1);
      std::this_thread::sleep_for(20us);
      book->exclusion.leave();
      lock.unlock();
    }
    return 0;
  }));

  const auto critical_section = [&](const WorkerLock& lock) {
    book->exclusion.enter();
    if (mechanism == Mechanism::posix) {
      struct stat st {};
      ::fstat(lock.native_handle(), &st);
      if (!kernel_posix_lock_held_by(::getpid(), FileId{st.st_dev, st.st_ino})) {
        book->lost.fetch_add(1);
        book->stop = true;
      }
    }
    book->exclusion.leave();
  };
  const auto trying = [&] {
    WorkerLock lock(path, quiet(mechanism));
    while (!book->stop.load()) {
      std::error_code ec;
      if (lock.try_lock(ec)) {
        critical_section(lock);
        lock.unlock(ec);
      }
      if (ec) book->errors.fetch_add(1);
    }
  };
  const auto locking = [&] {
    WorkerLock lock(path, quiet(mechanism));
    while (!book->stop.load()) {
      std::error_code ec;
      lock.lock(ec);
      if (ec || !lock.owns_lock()) {
        book->errors.fetch_add(1);
        continue;
      }
      critical_section(lock);
      lock.unlock(ec);
      if (ec) book->errors.fetch_add(1);
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < trying_threads; ++i) threads.emplace_back(trying);
  for (int i = 0; i < locking_threads; ++i) threads.emplace_back(locking);
  wltest::eventually([&] { return book->stop.load(); },
                     std::chrono::duration_cast<std::chrono::milliseconds>(budget));
  book->stop = true;
  for (auto& thread : threads) thread.join();
  const int other_exit = reaper.exit_code(other);

  INFO("entries " << book->exclusion.entries << " (other process " << book->other_process_entries
                  << "); problem: " << book->notes.text());
  CHECK(book->lost == 0);
  CHECK(book->exclusion.overlaps == 0);
  CHECK(book->errors == 0);
  CHECK(other_exit == 0);
  CHECK(book->other_process_entries > 0);
  CHECK(book->exclusion.entries > book->other_process_entries);
}

// A race, so a time budget: a broken lock_holder is caught in well under a second typically
// (3.7 s at worst in 11 runs here); a correct one costs the whole budget.
TEST_CASE(
    "Threads - lock_holder in one thread never drops a POSIX lock another thread takes meanwhile",
    "[fork][threads][stress]") {
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  Reaper reaper;
  const Mechanism mechanism = Mechanism::posix;
  // Another process takes and releases the lock in a loop. Two threads ask lock_holder():
  // while the other process holds, and no handle of ours has the file open, it may read the
  // record through a descriptor of its own, which it then closes. A third thread opens a
  // fresh handle and takes the lock whenever it can. Such a close() must never coincide with
  // the third thread holding: it would drop this process's POSIX lock without a word.

  struct Book {
    Exclusion exclusion;
    std::atomic<int> lost{0};
    std::atomic<int> queries{0};
    std::atomic<bool> stop{false};
  };
  wltest::Shared<Book> book;
  {
    WorkerLock create(path, quiet(mechanism));
    REQUIRE(create.try_lock());
  }
  const pid_t other = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    while (!book->stop.load()) {
      lock.lock();
      book->exclusion.enter();
      book->exclusion.leave();
      lock.unlock();
    }
    return 0;
  }));
  const auto observer = [&] {
    while (!book->stop.load()) {
      std::error_code ec;
      (void)workerlock::lock_holder(path, ec);
      book->queries.fetch_add(1);
    }
  };
  const auto worker = [&] {
    while (!book->stop.load()) {
      WorkerLock lock(path, quiet(mechanism));  // a fresh handle: nothing of ours is open
      std::error_code ec;
      if (!lock.try_lock(ec)) continue;
      book->exclusion.enter();
      struct stat st {};
      ::fstat(lock.native_handle(), &st);
      if (!kernel_posix_lock_held_by(::getpid(), FileId{st.st_dev, st.st_ino})) {
        book->lost.fetch_add(1);
        book->stop = true;
      }
      book->exclusion.leave();
    }
  };
  std::thread first(observer);
  std::thread second(observer);
  std::thread third(worker);
  wltest::eventually([&] { return book->stop.load(); }, 5s);
  book->stop = true;
  first.join();
  second.join();
  third.join();
  CHECK(reaper.exit_code(other) == 0);
  INFO("lock_holder calls " << book->queries << ", entries " << book->exclusion.entries);
  CHECK(book->lost == 0);
  CHECK(book->exclusion.overlaps == 0);
}
