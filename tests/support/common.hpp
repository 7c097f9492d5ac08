// tests/support/common.hpp: helpers for tests that start real processes: temporary directories,
// forked children and spawned programs that are always reaped, shared memory for bookkeeping.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/mapped_region.hpp>

extern char** environ;

namespace wltest {

//! A fresh directory under /tmp, removed with its contents at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "workerlock-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

//! One T placed in anonymous shared memory: a child forked afterwards shares it with the
//! parent. T should hold std::atomic members (lock-free atomics work across processes).
template <typename T>
class Shared {
 public:
  Shared() : region_(boost::interprocess::anonymous_shared_memory(sizeof(T))) {
    object_ = new (region_.get_address()) T();
  }
  ~Shared() { object_->~T(); }
  Shared(const Shared&) = delete;
  Shared& operator=(const Shared&) = delete;

  T* operator->() const { return object_; }
  T& operator*() const { return *object_; }

 private:
  boost::interprocess::mapped_region region_;
  T* object_ = nullptr;
};

//! Copies `text` into a fixed-size char array (in shared memory, say), cut to fit and always
//! NUL-terminated.
template <std::size_t N>
void copy_text(char (&out)[N], std::string_view text) {
  const auto n = std::min(text.size(), N - 1);
  std::memcpy(out, text.data(), n);
  out[n] = '\0';
}

//! Forks a child that runs `body` (returning its exit code) and leaves with _exit, so no
//! destructor or atexit handler of the parent runs twice. An exception exits with 99, after
//! saying what it was on stderr.
template <typename F>
pid_t fork_child(F&& body) {
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    int code = 0;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d: exception: %s\n", static_cast<int>(::getpid()), e.what());
      code = 99;
    } catch (...) {
      std::fprintf(stderr, "child %d: exception of an unknown type\n",
                   static_cast<int>(::getpid()));
      code = 99;
    }
    ::_exit(code);
  }
  return pid;
}

//! A waitpid() status as an exit code: the code, or 128 + the signal that killed it.
inline int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

//! Waits for `pid`; returns its exit code, or 128 + the signal that killed it.
inline int wait_exit_code(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return exit_code_of(status);
}

//! Waits for every pid; returns how many did not exit with 0.
inline int wait_all_failures(const std::vector<pid_t>& pids) {
  int failures = 0;
  for (const pid_t pid : pids) failures += wait_exit_code(pid) != 0 ? 1 : 0;
  return failures;
}

//! What Children::wait(pid, timeout) returns when the child had to be SIGKILLed.
inline constexpr int kTimedOut = -2;

//! Tag for Children(adopt_orphans): see there.
struct AdoptOrphans {};
inline constexpr AdoptOrphans adopt_orphans{};

//! Forked children of one test; any child still running when the test leaves (a failed
//! REQUIRE, say) is killed and reaped, so no test leaves a process behind. Only pids that are
//! still unreaped children of this process are ever signalled, so a pid was never reused.
class Children {
 public:
  Children() = default;
  //! Also makes this process the subreaper of its descendants for the scope, so grandchildren
  //! orphaned by a killed child are reparented here and can be watch()ed and reaped by pid.
  explicit Children(AdoptOrphans)
      : subreaper_(::prctl(PR_SET_CHILD_SUBREAPER, 1L, 0L, 0L, 0L) == 0) {}
  Children(const Children&) = delete;
  Children& operator=(const Children&) = delete;
  ~Children() {
    kill_all();
    if (subreaper_) ::prctl(PR_SET_CHILD_SUBREAPER, 0L, 0L, 0L, 0L);
  }

  //! Whether Children(adopt_orphans) made this process a subreaper.
  bool is_subreaper() const { return subreaper_; }

  //! Takes care of `pid`, forked some other way (a grandchild, say): it is killed and reaped
  //! at scope exit like a spawned child. Only real pids are watched: kill(0 or -1, ...) would
  //! hit whole process groups.
  pid_t watch(pid_t pid) {
    if (pid > 0) live_.push_back(pid);
    return pid;
  }

  //! Forks a child running body(); the child dies with the test process (PR_SET_PDEATHSIG),
  //! so an interrupted run leaves no child spinning at a start line. The child starts without
  //! the operator override $WORKERLOCK_ROLE: a test that wants it sets it in the child.
  template <typename F>
  pid_t spawn(F&& body) {
    const pid_t parent = ::getpid();
    const pid_t pid = wltest::fork_child([&]() -> int {
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) return 98;
      ::unsetenv("WORKERLOCK_ROLE");
      return body();
    });
    live_.push_back(pid);
    return pid;
  }

  //! Waits for one child; returns its exit code (128 + signal when killed).
  int wait(pid_t pid) {
    const int code = wltest::wait_exit_code(pid);
    forget(pid);
    return code;
  }

  //! Waits up to `timeout` for one child: its exit code (128 + signal when killed), or
  //! kTimedOut if it had to be SIGKILLed because it did not finish in time.
  int wait(pid_t pid, std::chrono::milliseconds timeout) {
    if (pid <= 0) return -1;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      int status = 0;
      const pid_t got = ::waitpid(pid, &status, WNOHANG);
      if (got == pid || (got < 0 && errno != EINTR)) {
        forget(pid);
        return got == pid ? exit_code_of(status) : -1;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        ::kill(pid, SIGKILL);
        wait(pid);
        return kTimedOut;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  //! Waits for every remaining child; returns how many did not exit with 0.
  int wait_all_failures() {
    const int failures = wltest::wait_all_failures(live_);
    live_.clear();
    return failures;
  }

  //! Sends `signal_number` to a child and returns how it ended (as wait(pid, 30 s)).
  int kill_and_reap(pid_t pid, int signal_number = SIGKILL) {
    if (pid <= 0) return -1;
    ::kill(pid, signal_number);
    return wait(pid, std::chrono::seconds(30));
  }

  //! SIGKILLs and reaps every child still running.
  void kill_all() noexcept {
    for (const pid_t pid : live_) ::kill(pid, SIGKILL);
    for (const pid_t pid : live_) wltest::wait_exit_code(pid);
    live_.clear();
  }

 private:
  void forget(pid_t pid) { live_.erase(std::remove(live_.begin(), live_.end(), pid), live_.end()); }

  bool subreaper_ = false;
  std::vector<pid_t> live_;
};

//! One child of a Children, for a test that forks just one: Child c(body); c.pid(); c.wait().
//! Killed and reaped if the test leaves before waiting for it.
class Child {
 public:
  template <typename F>
  explicit Child(F&& body) : pid_(children_.spawn(std::forward<F>(body))) {}

  pid_t pid() const { return pid_; }
  //! Its exit code (128 + signal when killed).
  int wait() { return children_.wait(pid_); }

 private:
  Children children_;
  pid_t pid_;
};

//! Runs `body` in a child and returns its exit code.
template <typename F>
int run_child(F&& body) {
  Child child(std::forward<F>(body));
  return child.wait();
}

//! Whether a Program's stdin and stdout are pipes to the test or the test's own.
enum class Pipes { none, stdin_and_stdout };

//! An external program (flock(1), python3, ...) started with posix_spawnp; like a Child it is
//! killed and reaped if the test leaves before waiting for it. With Pipes::stdin_and_stdout
//! the test reads its stdout line by line and closes its stdin to tell it to finish.
class Program {
 public:
  explicit Program(const std::vector<std::string>& args, Pipes pipes = Pipes::stdin_and_stdout) {
    const bool with_pipes = pipes == Pipes::stdin_and_stdout;
    int in[2] = {-1, -1};
    int out[2] = {-1, -1};
    if (with_pipes && (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0)) {
      close_all({in[0], in[1], out[0], out[1]});
      throw std::runtime_error("pipe2 failed");
    }
    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    if (with_pipes) {
      ::posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
      ::posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    }
    std::vector<char*> argv;
    for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&actions);
    close_all({in[0], out[1]});
    to_stdin_ = in[1];
    from_stdout_ = out[0];
    if (rc != 0) {
      close_all({to_stdin_, from_stdout_});
      throw std::runtime_error("cannot start " + args.front() + ": " + std::strerror(rc));
    }
    pid_ = children_.watch(pid);
  }
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;
  //! Closes the pipes; children_ then kills and reaps the program if it was not waited for.
  ~Program() {
    close_stdin();
    close_all({from_stdout_});
  }

  pid_t pid() const { return pid_; }

  void close_stdin() {
    close_all({to_stdin_});
    to_stdin_ = -1;
  }

  //! Closes its stdin and returns its exit code (128 + signal when killed).
  int wait() {
    close_stdin();
    return children_.wait(pid_);
  }

  //! One line of the program's stdout, or a description of why there was none.
  std::string read_line(std::chrono::milliseconds timeout = std::chrono::seconds(15)) {
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return line + "<timed out>";
      pollfd ready{from_stdout_, POLLIN, 0};
      const int n = ::poll(&ready, 1, static_cast<int>(left.count()));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return line + "<timed out>";
      char c = 0;
      const auto got = ::read(from_stdout_, &c, 1);
      if (got <= 0) return line + "<end of output>";
      if (c == '\n') return line;
      line += c;
    }
  }

 private:
  static void close_all(std::initializer_list<int> fds) {
    for (const int fd : fds)
      if (fd >= 0) ::close(fd);
  }

  Children children_;
  pid_t pid_ = -1;
  int to_stdin_ = -1;
  int from_stdout_ = -1;
};

//! Runs a program with the test's own stdin and stdout and returns its exit code.
inline int run_program(const std::vector<std::string>& args) {
  Program program(args, Pipes::none);
  return program.wait();
}

//! Polls `condition` every 100 µs until it holds or `timeout` passes.
template <typename F>
bool eventually(F&& condition, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!condition()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

//! A start line for racing children: each calls arrive_and_wait(), the parent calls
//! release() once all arrived, so they all start their attempt at nearly the same instant.
struct StartLine {
  std::atomic<int> arrived{0};
  std::atomic<bool> go{false};

  void arrive_and_wait() {
    arrived.fetch_add(1);
    while (!go.load()) std::this_thread::yield();
  }
  bool release_when(int expected, std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    const bool all = eventually([&] { return arrived.load() >= expected; }, timeout);
    go.store(true);
    return all;
  }
};

//! The descriptors 0, 1 and 2 that are open, with what they point at (" 0 -> /dev/null").
inline std::string open_standard_descriptors() {
  std::string open;
  for (int fd = 0; fd <= 2; ++fd) {
    char target[256] = {};
    const std::string link = "/proc/self/fd/" + std::to_string(fd);
    const ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
    if (n >= 0) open += " " + std::to_string(fd) + " -> " + target;
  }
  return open;
}

//! Whether this run is CI ($CI set and not empty): there nothing may skip.
inline bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && *ci != 0;
}

//! Whether a test that needs a server may skip when the server's package is missing: not
//! in CI. $<require_variable>=1 (tests/run-suite.sh sets it) or $CI makes it a failure.
inline bool server_required(const char* require_variable) {
  const char* require = std::getenv(require_variable);
  return (require != nullptr && std::string(require) == "1") || in_ci();
}

//! The exit code ctest reports as "Skipped" (tests/CMakeLists.txt sets SKIP_RETURN_CODE on
//! every test it registers, together with $WORKERLOCK_CTEST=1).
inline constexpr int skip_exit_code = 77;

//! Ends the running test as skipped, saying why. Under ctest (one test case per process)
//! the process exits with skip_exit_code, which ctest counts and prints as skipped; in a
//! direct run of the test binary, where other test cases follow, it prints the reason and
//! returns, and the caller must return too (the WLTEST_SKIP macros below do).
inline void skip_test(const std::string& why) {
  std::printf("SKIPPED: %s\n", why.c_str());
  std::fflush(stdout);
  if (std::getenv("WORKERLOCK_CTEST") != nullptr) std::_Exit(skip_exit_code);
}

}  // namespace wltest

//! Skips the test with `why` unless `condition` holds; in CI ($CI) fails it instead.
#define WLTEST_SKIP_UNLESS(condition, why) \
  do {                                     \
    if (!(condition)) {                    \
      if (wltest::in_ci()) FAIL(why);      \
      wltest::skip_test(why);              \
      return;                              \
    }                                      \
  } while (false)

//! First statement of a test that needs root (mounts, namespaces, other uids).
#define WLTEST_REQUIRE_ROOT(what_for) \
  WLTEST_SKIP_UNLESS(::geteuid() == 0, std::string("needs root: ") + (what_for))

//! First statement of a test that needs `Server` (wltest::RedisServer, PostgresServer):
//! skips, or fails where the server is required (see server_required).
#define WLTEST_REQUIRE_SERVER(Server, require_variable)                              \
  do {                                                                               \
    if (!Server::available()) {                                                      \
      if (wltest::server_required(require_variable)) FAIL(Server::missing_reason()); \
      wltest::skip_test(Server::missing_reason());                                   \
      return;                                                                        \
    }                                                                                \
  } while (false)
