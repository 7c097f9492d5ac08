// tests/test_bad_input.cpp: bad lock paths, hostile directories and foreign lock tools.
//
// Every refusal is checked through all four doors: is_primary_worker() and WorkerLock::try_lock(),
// each in its throwing and its std::error_code form. Whatever needs another uid, a mount
// namespace or a resource limit runs in a forked child, which reports back through shared
// memory; the parent makes the assertions. Tests that need root REQUIRE it (CI runs as root).
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/interprocess/sync/file_lock.hpp>

#include <workerlock/workerlock.hpp>

#include "fault_injection.hpp"
#include "support.hpp"

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using Catch::Matchers::EndsWith;
using Catch::Matchers::StartsWith;
using workerlock::lock_error;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WorkerLock;

static_assert(std::is_base_of_v<std::system_error, lock_error>,
              "lock_error must be catchable as std::system_error");

constexpr uid_t nobody = 65534;      // the unprivileged worker
constexpr uid_t other_user = 65533;  // a second ordinary user
constexpr std::array<Mechanism, 3> all_mechanisms{Mechanism::ofd, Mechanism::posix,
                                                  Mechanism::flock};

Options quiet(Mechanism m) { return Options{}.silent().with(m); }

std::string name_of(Mechanism m) { return std::string(workerlock::to_string(m)); }

//! Mechanisms whose locks exclude a lock of `m` held by another process on a local fs.
bool excludes(Mechanism holder, Mechanism contender) {
  if (holder == contender) return true;
  const bool holder_fcntl = holder != Mechanism::flock;
  const bool contender_fcntl = contender != Mechanism::flock;
  return holder_fcntl && contender_fcntl;  // OFD and POSIX locks are one family on Linux
}

// --- files -------------------------------------------------------------------------------

bool write_file(const fs::path& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  out.close();
  return static_cast<bool>(out);
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct stat stat_of(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) st = {};
  return st;
}

bool same_mtime(const struct stat& a, const struct stat& b) {
  return a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec;
}

bool on_nfs(const fs::path& path) {
  struct statfs info {};
  return ::statfs(path.c_str(), &info) == 0 && info.f_type == 0x6969;  // NFS_SUPER_MAGIC
}

// --- children ----------------------------------------------------------------------------

//! A forked child that is killed and reaped if the test leaves before waiting for it.
class Child {
 public:
  template <typename F>
  explicit Child(F&& body) : pid_(wltest::fork_child(std::forward<F>(body))) {}
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      wltest::wait_exit_code(pid_);
    }
  }
  int wait() {
    const int code = wltest::wait_exit_code(pid_);
    pid_ = -1;
    return code;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_;
};

template <typename F>
int run_child(F&& body) {
  Child child(std::forward<F>(body));
  return child.wait();
}

//! Drops every group and becomes `uid` (gid = uid). Only root can do this.
bool become(uid_t uid) {
  return ::setgroups(0, nullptr) == 0 && ::setgid(uid) == 0 && ::setuid(uid) == 0 &&
         ::geteuid() == uid && ::getegid() == uid;
}

//! Lets a holder child tell the parent it holds, and the parent tell it to let go.
struct Handshake {
  std::atomic<int> state{0};  // 0 starting, 1 holding, -1 failed
  std::atomic<bool> release{false};
};

void wait_for_release(Handshake& hs) {
  wltest::eventually([&] { return hs.release.load(); }, std::chrono::seconds(30));
}

//! Child body: takes `path` with a WorkerLock, reports through `hs`, holds until hs.release.
int hold_until_released(Handshake& hs, const std::filesystem::path& path,
                        const workerlock::Options& options) {
  WorkerLock lock(path, options);
  if (!lock.try_lock()) {
    hs.state = -1;
    return 1;
  }
  hs.state = 1;
  wait_for_release(hs);
  return 0;
}

// --- spawned programs (flock(1), python3) ------------------------------------------------

//! A program started with posix_spawnp, optionally with its stdin and stdout on pipes.
//! Closing stdin is how the holder scripts are told to release.
class Spawned {
 public:
  Spawned(const std::vector<std::string>& args, bool with_pipes) {
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
    const int rc = ::posix_spawnp(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&actions);
    close_all({in[0], out[1]});
    to_stdin_ = in[1];
    from_stdout_ = out[0];
    if (rc != 0) {
      close_all({to_stdin_, from_stdout_});
      pid_ = -1;
      throw std::runtime_error("cannot start " + args.front() + ": " + std::strerror(rc));
    }
  }
  Spawned(const Spawned&) = delete;
  Spawned& operator=(const Spawned&) = delete;
  ~Spawned() {
    close_stdin();
    close_all({from_stdout_});
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      wltest::wait_exit_code(pid_);
    }
  }

  pid_t pid() const { return pid_; }

  void close_stdin() {
    close_all({to_stdin_});
    to_stdin_ = -1;
  }

  int wait() {
    close_stdin();
    const int code = wltest::wait_exit_code(pid_);
    pid_ = -1;
    return code;
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

  pid_t pid_ = -1;
  int to_stdin_ = -1;
  int from_stdout_ = -1;
};

int run_program(const std::vector<std::string>& args) {
  Spawned program(args, false);
  return program.wait();
}

//! util-linux flock(1) holding `path` until its stdin closes; prints "ready" once it holds.
std::vector<std::string> flock_holder_command(const fs::path& path) {
  return {"flock", path.native(), "sh", "-c", "echo ready; exec cat"};
}

//! The Debian python3 that has python3-filelock (a pyenv python3 on PATH may lack it).
std::string python_with_filelock() {
  for (const char* candidate : {"/usr/bin/python3", "python3"}) {
    try {
      if (run_program({candidate, "-c", "import filelock"}) == 0) return candidate;
    } catch (const std::exception&) {
    }
  }
  return {};
}

// Exit 0 when it acquired (and released), 1 when the lock was busy.
constexpr const char* python_try_once =
    "import filelock, sys\n"
    "try:\n"
    "    filelock.FileLock(sys.argv[1]).acquire(timeout=0)\n"
    "except filelock.Timeout:\n"
    "    sys.exit(1)\n"
    "sys.exit(0)\n";

// Prints "ready" once it holds, releases when stdin closes.
constexpr const char* python_hold =
    "import filelock, sys\n"
    "lock = filelock.FileLock(sys.argv[1])\n"
    "lock.acquire(timeout=10)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "lock.release()\n";

// --- recording a refusal -----------------------------------------------------------------

template <std::size_t N>
void copy_text(char (&out)[N], std::string_view text) {
  const auto n = std::min(text.size(), N - 1);
  std::memcpy(out, text.data(), n);
  out[n] = '\0';
}

//! What one throwing call and its error_code twin did. Plain data, so a child can fill it
//! in shared memory.
struct Attempt {
  bool threw_lock_error = false;
  bool threw_other = false;
  bool succeeded = false;  // primary / true / a holder
  int code = 0;
  bool system_category = false;
  bool path_matches = false;
  char what[8192] = {};
  char operation[64] = {};
  // the std::error_code twin
  int ec = 0;
  bool ec_system_category = false;
  bool ec_succeeded = false;
  bool ec_owns_lock = false;
};

struct Refusal {
  Attempt elect;     // is_primary_worker()
  Attempt try_lock;  // WorkerLock::try_lock()
};

//! Call from inside a catch block.
void record_current_exception(Attempt& a, const fs::path& path) {
  try {
    throw;
  } catch (const std::system_error& e) {
    const auto* error = dynamic_cast<const lock_error*>(&e);
    a.threw_lock_error = error != nullptr;
    a.code = e.code().value();
    a.system_category = e.code().category() == std::system_category();
    copy_text(a.what, e.what());
    if (error != nullptr) {
      copy_text(a.operation, error->operation());
      a.path_matches = error->path() == path;
    }
  } catch (...) {
    a.threw_other = true;
  }
}

void record_ec(Attempt& a, const std::error_code& ec) {
  a.ec = ec.value();
  a.ec_system_category = ec.category() == std::system_category();
}

//! Tries `path` through is_primary_worker() and WorkerLock::try_lock(), both forms each.
void attempt_into(Refusal& r, const fs::path& path, const Options& options) {
  try {
    const auto election = workerlock::is_primary_worker(path, options);
    r.elect.succeeded = election.role == Role::primary;
  } catch (...) {
    record_current_exception(r.elect, path);
  }
  {
    std::error_code ec;
    const auto election = workerlock::is_primary_worker(path, options, ec);
    record_ec(r.elect, ec);
    r.elect.ec_succeeded = election.role != Role::secondary;
    r.elect.ec_owns_lock = election.lock.owns_lock();
  }
  try {
    WorkerLock lock(path, options);
    r.try_lock.succeeded = lock.try_lock();
  } catch (...) {
    record_current_exception(r.try_lock, path);
  }
  {
    WorkerLock lock(path, options);
    std::error_code ec;
    r.try_lock.ec_succeeded = lock.try_lock(ec);
    record_ec(r.try_lock, ec);
    r.try_lock.ec_owns_lock = lock.owns_lock();
  }
}

//! Asks lock_holder() both ways.
void attempt_holder_into(Attempt& a, const fs::path& path) {
  try {
    a.succeeded = workerlock::lock_holder(path).has_value();
  } catch (...) {
    record_current_exception(a, path);
  }
  std::error_code ec;
  a.ec_succeeded = workerlock::lock_holder(path, ec).has_value();
  record_ec(a, ec);
}

void check_attempt(const Attempt& a, const char* call, const fs::path& path, std::errc expected,
                   std::string_view operation, std::initializer_list<std::string_view> mentions) {
  INFO("call: " << call);
  const int value = static_cast<int>(expected);
  CHECK_FALSE(a.threw_other);
  CHECK_FALSE(a.succeeded);
  CHECK(a.threw_lock_error);
  // The error_code twin: same code, never a primary, never a lock.
  CHECK(a.ec == value);
  CHECK(a.ec_system_category);
  CHECK_FALSE(a.ec_succeeded);
  CHECK_FALSE(a.ec_owns_lock);
  if (!a.threw_lock_error) return;  // nothing below can hold; spare the noise
  CHECK(a.system_category);
  CHECK(a.code == value);
  CHECK(std::error_code(a.code, std::system_category()) == expected);
  const std::string what = a.what;
  CHECK_THAT(what, StartsWith("workerlock: cannot " + std::string(operation) + " '" +
                              path.native() + "'"));
  CHECK_THAT(what, Contains(std::strerror(value)));
  for (const auto mention : mentions) CHECK_THAT(what, Contains(std::string(mention)));
  CHECK(std::string_view(a.operation) == operation);
  CHECK(a.path_matches);
}

void check_refused(const Refusal& r, const fs::path& path, std::errc expected,
                   std::initializer_list<std::string_view> mentions) {
  check_attempt(r.elect, "is_primary_worker", path, expected, "open lock file", mentions);
  check_attempt(r.try_lock, "WorkerLock::try_lock", path, expected, "open lock file", mentions);
}

//! Runs the four calls in this process and checks the refusal.
void require_refused_here(const fs::path& path, Mechanism m, std::errc expected,
                          std::initializer_list<std::string_view> mentions) {
  INFO("mechanism: " << name_of(m));
  auto r = std::make_unique<Refusal>();
  attempt_into(*r, path, quiet(m));
  check_refused(*r, path, expected, mentions);
}

}  // namespace

// =========================================================================================
// 1. Bad input
// =========================================================================================

TEST_CASE("bad input: a missing parent directory is refused with ENOENT and never created",
          "[bad-input]") {
  wltest::TempDir tmp;
  const auto missing = tmp / "no-such-dir";
  const auto path = missing / "nested" / "primary.lock";
  for (const auto m : all_mechanisms) {
    require_refused_here(path, m, std::errc::no_such_file_or_directory,
                         {"parent directory does not exist", "does not create directories"});
    CHECK_FALSE(fs::exists(missing));
    CHECK(fs::is_empty(tmp.path()));
  }
  // No file, so nobody holds it: documented as nullopt, not an error.
  CHECK_FALSE(workerlock::lock_holder(path).has_value());

  // The failure leaves the handle usable: once the operator creates the directory, it wins.
  const auto later = tmp / "created-later";
  WorkerLock lock(later / "primary.lock", quiet(Mechanism::ofd));
  std::error_code ec;
  CHECK_FALSE(lock.try_lock(ec));
  CHECK(ec == std::errc::no_such_file_or_directory);
  CHECK_FALSE(fs::exists(later));
  REQUIRE(fs::create_directory(later));
  CHECK(lock.try_lock());
  CHECK(lock.owns_lock());
}

TEST_CASE("bad input: an unprivileged worker gets EACCES, root-owned files stay untouched",
          "[bad-input]") {
  WLTEST_REQUIRE_ROOT("creates root-owned files, then switches a child to uid 65534");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);

  const auto root_only = tmp / "root-only";  // 0700: uid 65534 cannot even look inside
  REQUIRE(::mkdir(root_only.c_str(), 0700) == 0);
  REQUIRE(::chmod(root_only.c_str(), 0700) == 0);
  const auto unwritable = tmp / "unwritable";  // 0755: uid 65534 cannot create a file there
  REQUIRE(::mkdir(unwritable.c_str(), 0755) == 0);
  REQUIRE(::chmod(unwritable.c_str(), 0755) == 0);
  const auto roots_file = unwritable / "roots.lock";  // 0644 root: no O_RDWR for uid 65534
  const std::string roots_content = "1\nnot for uid 65534\n";
  REQUIRE(write_file(roots_file, roots_content));
  REQUIRE(::chmod(roots_file.c_str(), 0644) == 0);
  const auto roots_before = stat_of(roots_file);

  const std::array<fs::path, 3> paths{root_only / "primary.lock", unwritable / "primary.lock",
                                      roots_file};
  for (const auto& path : paths) {
    for (const auto m : all_mechanisms) {
      INFO("path: " << path.native() << ", mechanism: " << name_of(m));
      wltest::Shared<Refusal> r;
      const int code = run_child([&] {
        if (!become(nobody)) return 10;
        attempt_into(*r, path, quiet(m));
        return 0;
      });
      REQUIRE(code == 0);
      check_refused(*r, path, std::errc::permission_denied, {"read and write access"});
    }
  }
  CHECK_FALSE(fs::exists(paths[0]));
  CHECK_FALSE(fs::exists(paths[1]));
  const auto roots_after = stat_of(roots_file);
  CHECK(slurp(roots_file) == roots_content);
  CHECK(roots_after.st_uid == 0);
  CHECK((roots_after.st_mode & 07777) == 0644);
  CHECK(same_mtime(roots_before, roots_after));
}

TEST_CASE("bad input: a directory at the lock path is refused with EISDIR", "[bad-input]") {
  wltest::TempDir tmp;
  const auto path = tmp / "a-directory";
  REQUIRE(fs::create_directory(path));
  for (const auto m : all_mechanisms) {
    require_refused_here(path, m, std::errc::is_a_directory, {"the path is a directory"});
    CHECK(fs::is_directory(path));
    CHECK(fs::is_empty(path));
  }
}

TEST_CASE("bad input: an empty path is refused with EINVAL by every entry point", "[bad-input]") {
  const fs::path empty;
  for (const auto m : all_mechanisms) {
    require_refused_here(empty, m, std::errc::invalid_argument, {"the path is empty"});
  }
  auto holder = std::make_unique<Attempt>();
  attempt_holder_into(*holder, empty);
  check_attempt(*holder, "lock_holder", empty, std::errc::invalid_argument, "inspect lock file",
                {"the path is empty"});

  // An empty handle (default-constructed) fails the same way, with the operation "lock".
  WorkerLock handle;
  std::error_code ec;
  CHECK_FALSE(handle.try_lock(ec));
  CHECK(ec == std::errc::invalid_argument);
  CHECK_FALSE(handle.owns_lock());
  CHECK_THROWS_AS(handle.try_lock(), lock_error);
}

TEST_CASE("bad input: paths longer than PATH_MAX or NAME_MAX are refused with ENAMETOOLONG",
          "[bad-input]") {
  wltest::TempDir tmp;
  std::string too_long = tmp.path().native();
  while (too_long.size() <= PATH_MAX) too_long += "/d";
  too_long += "/primary.lock";
  const fs::path long_component = tmp / (std::string(NAME_MAX + 1, 'n') + ".lock");
  for (const fs::path& path : {fs::path(too_long), long_component}) {
    for (const auto m : all_mechanisms) {
      require_refused_here(path, m, std::errc::filename_too_long, {"the path is too long"});
    }
  }
  CHECK(fs::is_empty(tmp.path()));
}

TEST_CASE("bad input: a read-only file system is refused with EROFS, new or existing file",
          "[bad-input]") {
  WLTEST_REQUIRE_ROOT("the child mounts a tmpfs in its own mount namespace");
  wltest::TempDir tmp;
  const auto mountpoint = tmp / "read-only";
  REQUIRE(fs::create_directory(mountpoint));
  const auto existing = mountpoint / "existing.lock";
  const auto fresh = mountpoint / "fresh.lock";
  const std::string content = "4242\nan old record on a read-only file system\n";

  struct Result {
    Refusal existing;
    Refusal fresh;
    bool existing_unchanged = false;
    bool fresh_absent = false;
    bool nobody_holds_existing = false;
    int setup_errno = 0;
  };
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Result> r;
    const int code = run_child([&] {
      const auto failed = [&](int code) {
        r->setup_errno = errno;
        return code;
      };
      // A private mount namespace: the tmpfs never appears outside this child.
      if (::unshare(CLONE_NEWNS) != 0) return failed(20);
      if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return failed(21);
      if (::mount("workerlock-test", mountpoint.c_str(), "tmpfs", 0, "size=64k") != 0)
        return failed(22);
      if (!write_file(existing, content)) return failed(23);
      if (::mount(nullptr, mountpoint.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr) != 0)
        return failed(24);
      attempt_into(r->existing, existing, quiet(m));
      attempt_into(r->fresh, fresh, quiet(m));
      r->existing_unchanged = slurp(existing) == content;
      r->fresh_absent = !fs::exists(fresh);
      r->nobody_holds_existing = !workerlock::lock_holder(existing).has_value();
      return 0;
    });
    INFO("child exit code " << code << ", setup errno " << r->setup_errno << " ("
                            << std::strerror(r->setup_errno) << ")");
    REQUIRE(code == 0);
    check_refused(r->existing, existing, std::errc::read_only_file_system,
                  {"the file system is read-only"});
    check_refused(r->fresh, fresh, std::errc::read_only_file_system,
                  {"the file system is read-only"});
    CHECK(r->existing_unchanged);
    CHECK(r->fresh_absent);
    CHECK(r->nobody_holds_existing);
  }
  // The mount stayed inside the children's namespaces.
  CHECK(stat_of(mountpoint).st_dev == stat_of(tmp.path()).st_dev);
  CHECK(fs::is_empty(mountpoint));
}

TEST_CASE("bad input: descriptor exhaustion is reported as EMFILE, and the next try succeeds",
          "[bad-input]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  REQUIRE(write_file(path, ""));

  struct Result {
    Refusal refusal;
    Attempt holder;
    int opened = 0;
    bool primary_after_closing = false;
  };
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Result> r;
    const int code = run_child([&] {
      // UBSan's vptr check probes memory through a pipe, which it cannot create once the
      // descriptors are gone: let it meet the types of the error paths first (it caches them).
      {
        Refusal warm_up;
        attempt_into(warm_up, tmp / "missing" / "primary.lock", quiet(m));
        Attempt warm_up_holder;
        attempt_holder_into(warm_up_holder, tmp.path());
      }
      const rlimit limit{64, 64};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) return 10;
      std::vector<int> fds;
      fds.reserve(64);
      for (;;) {
        const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
          if (errno != EMFILE) return 11;
          break;
        }
        fds.push_back(fd);
        if (fds.size() > 64) return 12;
      }
      r->opened = static_cast<int>(fds.size());
      if (fds.empty()) return 13;  // cannot show the recovery below
      attempt_into(r->refusal, path, quiet(m));
      attempt_holder_into(r->holder, path);
      for (const int fd : fds) ::close(fd);
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      r->primary_after_closing = election.role == Role::primary;
      return 0;
    });
    INFO("descriptors opened to reach the limit: " << r->opened);
    REQUIRE(code == 0);
    check_refused(r->refusal, path, std::errc::too_many_files_open, {"no file descriptor left"});
    check_attempt(r->holder, "lock_holder", path, std::errc::too_many_files_open,
                  "inspect lock file", {"/proc/locks"});
    CHECK(r->primary_after_closing);
  }
}

// Faults the kernel reports only on a bad day (a full lock table, NFS without its lock
// manager, a failing disk) are injected with a seccomp filter in a child: the real system
// call fails with the errno, and the library's own code handles it.

namespace {

//! What the file holds before the test: the record of a holder long gone.
constexpr const char* earlier_holders_record = "4242\nacquired=2026-01-01T00:00:00.000000Z\n";

//! In this (child) process, makes the lock call of mechanism `m` fail with `error`. fcntl64
//! is fcntl() on 32-bit architectures (with the *64 commands); elsewhere its rules add nothing.
bool fail_lock_calls(Mechanism m, int error) {
  wltest::SyscallFilter filter;
  const auto fail_fcntl = [&](std::initializer_list<std::uint32_t> commands) {
    for (const int call : {SCMP_SYS(fcntl), SCMP_SYS(fcntl64)}) {
      for (const auto command : commands)
        filter.on(call, SCMP_ACT_ERRNO(error), {wltest::low_bits_equal(1, command)});
    }
  };
  switch (m) {
    case Mechanism::ofd:
      fail_fcntl({F_OFD_SETLK, F_OFD_SETLKW});
      break;
    case Mechanism::posix:
      fail_fcntl({F_SETLK, F_SETLKW, F_SETLK64, F_SETLKW64});
      break;
    case Mechanism::flock:
      filter.on(SCMP_SYS(flock), SCMP_ACT_ERRNO(error));
      break;
  }
  return filter.install(true);
}

}  // namespace

TEST_CASE(
    "faults: ENOLCK from the kernel's lock call is an error naming the path and the lock "
    "manager, never a primary, and the file is untouched",
    "[bad-input][faults]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  const std::string before = earlier_holders_record;
  REQUIRE(write_file(path, before));
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Refusal> r;
    const int code = run_child([&] {
      if (!fail_lock_calls(m, ENOLCK)) return 20;
      attempt_into(*r, path, quiet(m));
      return 0;
    });
    REQUIRE(code == 0);
    for (const auto* a : {&r->elect, &r->try_lock}) {
      check_attempt(*a, a == &r->elect ? "is_primary_worker" : "WorkerLock::try_lock", path,
                    std::errc::no_lock_available, "lock", {"lock manager"});
    }
    CHECK(slurp(path) == before);
    CHECK_FALSE(workerlock::lock_holder(path).has_value());
  }
}

TEST_CASE(
    "faults: EIO writing the holder record is reported, the lock is let go at once and "
    "the file keeps its old content",
    "[bad-input][faults]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  const std::string before = earlier_holders_record;
  REQUIRE(write_file(path, before));
  struct Result {
    Refusal refusal;
    Handshake hs;
  };
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    REQUIRE(write_file(path, before));  // the previous round's `other` wrote its record
    wltest::Shared<Result> r;
    Child child([&] {
      if (!wltest::fail_syscall(SCMP_SYS(pwrite64), EIO)) return 20;
      attempt_into(r->refusal, path, quiet(m));
      r->hs.state = 1;
      wait_for_release(r->hs);  // alive: a lock it kept would still be held
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return r->hs.state.load() != 0; }, std::chrono::seconds(10)));
    check_attempt(r->refusal.elect, "is_primary_worker", path, std::errc::io_error,
                  "write holder record to", {});
    check_attempt(r->refusal.try_lock, "WorkerLock::try_lock", path, std::errc::io_error,
                  "write holder record to", {});
    // The failing worker still runs, and holds nothing: anybody else can be primary.
    CHECK_FALSE(workerlock::lock_holder(path).has_value());
    CHECK(slurp(path) == before);
    {
      WorkerLock other(path, quiet(m));
      CHECK(other.try_lock());
    }
    r->hs.release = true;
    CHECK(child.wait() == 0);
  }
}

TEST_CASE("bad input: a regular file used as a directory is refused with ENOTDIR", "[bad-input]") {
  wltest::TempDir tmp;
  const auto plain = tmp / "plain-file";
  REQUIRE(write_file(plain, "just a file\n"));
  const auto path = plain / "primary.lock";
  for (const auto m : all_mechanisms) {
    require_refused_here(path, m, std::errc::not_a_directory,
                         {"a component of the path is not a directory"});
  }
  CHECK(fs::is_regular_file(plain));
  CHECK(slurp(plain) == "just a file\n");
}

TEST_CASE("bad input: a FIFO or a character device at the lock path is not a regular file",
          "[bad-input]") {
  wltest::TempDir tmp;
  const auto fifo = tmp / "a-fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0644) == 0);
  const fs::path dev_null = "/dev/null";
  for (const auto& path : {fifo, dev_null}) {
    INFO("path: " << path.native());
    for (const auto m : all_mechanisms) {
      require_refused_here(path, m, std::errc::invalid_argument, {"not a regular file"});
    }
    auto holder = std::make_unique<Attempt>();
    attempt_holder_into(*holder, path);
    check_attempt(*holder, "lock_holder", path, std::errc::invalid_argument, "inspect lock file",
                  {"not a regular file"});
  }
  CHECK(fs::is_fifo(fifo));
  CHECK(fs::is_character_file(dev_null));
}

// =========================================================================================
// 2. Security
// =========================================================================================

TEST_CASE("security: a symlink planted at the lock path is refused and its target untouched",
          "[security]") {
  wltest::TempDir tmp;
  const auto target = tmp / "precious.txt";
  std::string content = "not a lock file; must survive byte for byte\n";
  for (int i = 0; i < 64; ++i) content += "line " + std::to_string(i) + " of precious data\n";
  REQUIRE(write_file(target, content));
  const timespec long_ago[2] = {{1000000000, 0}, {1000000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, target.c_str(), long_ago, 0) == 0);
  const auto before = stat_of(target);

  const auto link = tmp / "primary.lock";
  fs::create_symlink(target, link);
  for (const auto m : all_mechanisms) {
    require_refused_here(link, m, std::errc::too_many_symbolic_link_levels,
                         {"symbolic link", "never follows"});
  }
  auto holder = std::make_unique<Attempt>();
  attempt_holder_into(*holder, link);
  check_attempt(*holder, "lock_holder", link, std::errc::too_many_symbolic_link_levels,
                "inspect lock file", {"symbolic link"});

  const auto after = stat_of(target);
  CHECK(slurp(target) == content);
  CHECK(after.st_size == before.st_size);
  CHECK(after.st_ino == before.st_ino);
  CHECK(same_mtime(before, after));
  CHECK(fs::is_symlink(link));
  CHECK(fs::read_symlink(link) == target);
}

TEST_CASE("security: a dangling symlink at the lock path never creates its target", "[security]") {
  wltest::TempDir tmp;
  const auto target = tmp / "would-be-created.lock";
  const auto link = tmp / "primary.lock";
  fs::create_symlink(target, link);
  for (const auto m : all_mechanisms) {
    require_refused_here(link, m, std::errc::too_many_symbolic_link_levels,
                         {"symbolic link", "never follows"});
    CHECK(fs::symlink_status(target).type() == fs::file_type::not_found);
  }
  auto holder = std::make_unique<Attempt>();
  attempt_holder_into(*holder, link);
  check_attempt(*holder, "lock_holder", link, std::errc::too_many_symbolic_link_levels,
                "inspect lock file", {"symbolic link"});
  CHECK(fs::is_symlink(link));
  CHECK(fs::symlink_status(target).type() == fs::file_type::not_found);
}

TEST_CASE("security: new lock files are created 0644 at most, whatever the umask", "[security]") {
  wltest::TempDir tmp;
  struct Result {
    bool primary = false;
    mode_t mode = 0;
  };
  const std::array<std::pair<mode_t, mode_t>, 3> cases{
      {{0000, 0644}, {0022, 0644}, {0077, 0600}}};  // umask -> expected permissions
  for (const auto& umask_case : cases) {
    const mode_t mask = umask_case.first;
    const mode_t expected = umask_case.second;
    for (const auto m : all_mechanisms) {
      const auto path = tmp / ("umask-" + std::to_string(mask) + "-" + name_of(m) + ".lock");
      INFO("umask 0" << std::oct << mask << std::dec << ", mechanism " << name_of(m));
      wltest::Shared<Result> r;
      const int code = run_child([&] {
        ::umask(mask);
        const auto election = workerlock::is_primary_worker(path, quiet(m));
        r->primary = election.role == Role::primary;
        struct stat st {};
        if (::stat(path.c_str(), &st) != 0) return 10;
        r->mode = st.st_mode;
        return 0;
      });
      REQUIRE(code == 0);
      CHECK(r->primary);
      CHECK(S_ISREG(r->mode));
      CHECK((r->mode & 07777) == expected);
    }
  }
}

TEST_CASE("security: a contender never truncates or rewrites the holder's record", "[security]") {
  wltest::TempDir tmp;
  for (const auto m : all_mechanisms) {
    INFO("holder mechanism: " << name_of(m));
    const auto path = tmp / ("held-" + name_of(m) + ".lock");
    wltest::Shared<Handshake> hs;
    Child holder([&] {
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      if (election.role != Role::primary) {
        hs->state = -1;
        return 1;
      }
      hs->state = 1;
      wait_for_release(*hs);
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return hs->state.load() != 0; }));
    REQUIRE(hs->state.load() == 1);

    const std::string record = slurp(path);
    REQUIRE_THAT(record, StartsWith(std::to_string(holder.pid()) + "\n"));
    REQUIRE_THAT(record, EndsWith("mechanism=" + name_of(m) + "\n"));
    const auto before = stat_of(path);

    for (const auto c : all_mechanisms) {
      if (!excludes(m, c)) continue;
      INFO("contender mechanism: " << name_of(c));
      {
        const auto election = workerlock::is_primary_worker(path, quiet(c));
        CHECK(election.role == Role::secondary);
      }
      {
        WorkerLock lock(path, quiet(c));
        CHECK_FALSE(lock.try_lock());
        CHECK_FALSE(lock.try_lock_for(std::chrono::milliseconds(20)));
      }
    }
    const auto after = stat_of(path);
    CHECK(slurp(path) == record);
    CHECK(after.st_size == before.st_size);
    CHECK(after.st_ino == before.st_ino);
    CHECK(same_mtime(before, after));

    const auto who = workerlock::lock_holder(path);
    REQUIRE(who.has_value());
    CHECK(who->pid == holder.pid());
    CHECK(who->recorded);

    hs->release = true;
    CHECK(holder.wait() == 0);
  }
}

TEST_CASE("security: a contender leaves larger pre-existing content intact while it is held",
          "[security]") {
  wltest::TempDir tmp;
  std::string old;
  for (int i = 0; old.size() < 4096; ++i)
    old += "pre-existing content, line " + std::to_string(i) + "\n";
  for (const auto m : all_mechanisms) {
    INFO("holder mechanism: " << name_of(m));
    const auto path = tmp / ("big-" + name_of(m) + ".lock");
    REQUIRE(write_file(path, old));
    const timespec long_ago[2] = {{1000000000, 0}, {1000000000, 0}};
    REQUIRE(::utimensat(AT_FDCWD, path.c_str(), long_ago, 0) == 0);
    const auto before = stat_of(path);

    wltest::Shared<Handshake> hs;
    auto options = quiet(m);
    options.write_holder_record = false;  // holds without touching the bytes
    Child holder([&] { return hold_until_released(*hs, path, options); });
    REQUIRE(wltest::eventually([&] { return hs->state.load() != 0; }));
    REQUIRE(hs->state.load() == 1);

    for (const auto c : all_mechanisms) {
      if (!excludes(m, c)) continue;
      INFO("contender mechanism: " << name_of(c));
      const auto election = workerlock::is_primary_worker(path, quiet(c));
      CHECK(election.role == Role::secondary);
      WorkerLock lock(path, quiet(c));
      CHECK_FALSE(lock.try_lock());
    }
    const auto during = stat_of(path);
    CHECK(slurp(path) == old);
    CHECK(during.st_size == static_cast<off_t>(old.size()));
    CHECK(same_mtime(before, during));

    hs->release = true;
    REQUIRE(holder.wait() == 0);
    CHECK(slurp(path) == old);

    // The next primary leaves it intact too: it holds no record, so it is no lock file of
    // ours to overwrite.
    {
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      REQUIRE(election.role == Role::primary);
    }  // released before reading: reading would open and close the file
    CHECK(slurp(path) == old);
  }
}

TEST_CASE(
    "security: a lock file of another user in a sticky world-writable directory is "
    "refused with EPERM",
    "[security]") {
  WLTEST_REQUIRE_ROOT("chowns files to other users and switches uid in children");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const auto sticky = tmp / "sticky";  // a /tmp look-alike, owned by root
  REQUIRE(::mkdir(sticky.c_str(), 0755) == 0);
  REQUIRE(::chmod(sticky.c_str(), 01777) == 0);

  // uid 65534 got there first: it ran an election itself (creating the file), then left.
  const auto planted = sticky / "planted.lock";
  REQUIRE(run_child([&] {
            if (!become(nobody)) return 10;
            const auto election = workerlock::is_primary_worker(planted, quiet(Mechanism::ofd));
            return election.role == Role::primary ? 0 : 11;
          }) == 0);
  REQUIRE(stat_of(planted).st_uid == nobody);

  // The same, made by chown, with content that must not change.
  const auto chowned = sticky / "chowned.lock";
  const std::string chowned_content = "planted by uid 65534\n";
  REQUIRE(write_file(chowned, chowned_content));
  REQUIRE(::chown(chowned.c_str(), nobody, nobody) == 0);
  REQUIRE(::chmod(chowned.c_str(), 0644) == 0);
  const auto chowned_before = stat_of(chowned);
  const std::string planted_content = slurp(planted);

  const std::initializer_list<std::string_view> mentions{
      "belongs to another user", "world-writable sticky directory", "hold the lock forever"};
  for (const auto& path : {planted, chowned}) {
    INFO("path: " << path.native());
    for (const auto m : all_mechanisms)
      require_refused_here(path, m, std::errc::operation_not_permitted, mentions);
  }
  const auto chowned_after = stat_of(chowned);
  CHECK(slurp(chowned) == chowned_content);
  CHECK(slurp(planted) == planted_content);
  CHECK(chowned_after.st_uid == nobody);
  CHECK(same_mtime(chowned_before, chowned_after));

  // Options::allow_foreign_owner lets the caller accept the risk.
  for (const auto m : all_mechanisms) {
    INFO("allow_foreign_owner, mechanism: " << name_of(m));
    auto options = quiet(m);
    options.allow_foreign_owner = true;
    const auto election = workerlock::is_primary_worker(chowned, options);
    CHECK(election.role == Role::primary);
    CHECK(election.lock.owns_lock());
  }

  // Any other ordinary user (uid 65533) is refused too, and allowed with the option.
  const auto shared_rw = sticky / "foreign-0666.lock";
  REQUIRE(write_file(shared_rw, ""));
  REQUIRE(::chown(shared_rw.c_str(), nobody, nobody) == 0);
  REQUIRE(::chmod(shared_rw.c_str(), 0666) == 0);
  struct Result {
    Refusal refusal;
    bool allowed_primary = false;
  };
  for (const auto m : all_mechanisms) {
    INFO("uid 65533, mechanism: " << name_of(m));
    wltest::Shared<Result> r;
    const int code = run_child([&] {
      if (!become(other_user)) return 10;
      attempt_into(r->refusal, shared_rw, quiet(m));
      auto options = quiet(m);
      options.allow_foreign_owner = true;
      const auto election = workerlock::is_primary_worker(shared_rw, options);
      r->allowed_primary = election.role == Role::primary;
      return 0;
    });
    REQUIRE(code == 0);
    check_refused(r->refusal, shared_rw, std::errc::operation_not_permitted, mentions);
    CHECK(r->allowed_primary);
  }
}

TEST_CASE(
    "security: a lock file of another user in a sticky directory is refused even while that "
    "user holds it",
    "[security]") {
  // The denial of service the check exists for: uid 65534 created the lock file in a /tmp
  // look-alike and holds it. Workers must get the EPERM explanation, not a silent
  // Role::secondary for as long as that user pleases.
  WLTEST_REQUIRE_ROOT("switches a child to uid 65534");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const auto sticky = tmp / "sticky";
  REQUIRE(::mkdir(sticky.c_str(), 0755) == 0);
  REQUIRE(::chmod(sticky.c_str(), 01777) == 0);
  const auto path = sticky / "squatted.lock";
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Handshake> hs;
    Child squatter([&] {
      if (!become(nobody)) {
        hs->state = -1;
        return 10;
      }
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      if (election.role != Role::primary) {
        hs->state = -1;
        return 11;
      }
      hs->state = 1;
      wait_for_release(*hs);
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return hs->state.load() != 0; }));
    REQUIRE(hs->state.load() == 1);
    REQUIRE(stat_of(path).st_uid == nobody);
    const std::string record = slurp(path);

    require_refused_here(
        path, m, std::errc::operation_not_permitted,
        {"belongs to another user", "world-writable sticky directory", "hold the lock forever"});
    // A bounded wait reports the refusal too, instead of timing out as if merely busy.
    WorkerLock lock(path, quiet(m));
    std::error_code ec;
    CHECK_FALSE(lock.try_lock_for(std::chrono::milliseconds(100), ec));
    CHECK(ec == std::errc::operation_not_permitted);
    CHECK(slurp(path) == record);

    hs->release = true;
    CHECK(squatter.wait() == 0);
  }
}

TEST_CASE(
    "security: the sticky-directory check accepts root's files, the directory owner's "
    "files and files outside sticky directories",
    "[security]") {
  WLTEST_REQUIRE_ROOT("chowns files and switches uid in children");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const auto make_dir = [](const fs::path& dir, mode_t mode, uid_t owner) {
    REQUIRE(::mkdir(dir.c_str(), 0700) == 0);
    REQUIRE(::chown(dir.c_str(), owner, owner) == 0);
    REQUIRE(::chmod(dir.c_str(), mode) == 0);
  };
  const auto make_file = [](const fs::path& file, mode_t mode, uid_t owner) {
    REQUIRE(write_file(file, ""));
    REQUIRE(::chown(file.c_str(), owner, owner) == 0);
    REQUIRE(::chmod(file.c_str(), mode) == 0);
  };
  const auto sticky = tmp / "sticky";
  make_dir(sticky, 01777, 0);
  const auto open_dir = tmp / "world-writable-not-sticky";
  make_dir(open_dir, 0777, 0);
  const auto users_sticky = tmp / "sticky-owned-by-65534";
  make_dir(users_sticky, 01777, nobody);

  // Root's files are trusted: a 0666 root-owned file in a sticky directory is accepted,
  // whether the directory belongs to root (opened by uid 65534) or to uid 65534 (opened by
  // uid 65533, so that only the "owned by root" rule can accept it).
  const auto roots_in_roots_dir = sticky / "root-owned-0666.lock";
  make_file(roots_in_roots_dir, 0666, 0);
  const auto roots_in_users_dir = users_sticky / "root-owned-0666.lock";
  make_file(roots_in_users_dir, 0666, 0);
  struct Result {
    int ec = -1;
    bool primary = false;
  };
  const std::array<std::pair<fs::path, uid_t>, 2> root_owned{
      {{roots_in_roots_dir, nobody}, {roots_in_users_dir, other_user}}};
  for (const auto& path_and_user : root_owned) {
    const fs::path path = path_and_user.first;
    const uid_t user = path_and_user.second;
    for (const auto m : all_mechanisms) {
      INFO("uid " << user << " on root-owned " << path.native() << ", mechanism " << name_of(m));
      wltest::Shared<Result> r;
      const int code = run_child([&] {
        if (!become(user)) return 10;
        std::error_code ec;
        const auto election = workerlock::is_primary_worker(path, quiet(m), ec);
        r->ec = ec.value();
        r->primary = election.role == Role::primary;
        return 0;
      });
      REQUIRE(code == 0);
      CHECK(r->ec == 0);
      CHECK(r->primary);
    }
  }

  // root opening a file of uid 65534 where uid 65534 could not plant it against root's will.
  const auto not_sticky = open_dir / "foreign.lock";
  make_file(not_sticky, 0644, nobody);
  const auto dir_owners = users_sticky / "foreign.lock";
  make_file(dir_owners, 0644, nobody);
  for (const auto& path : {not_sticky, dir_owners}) {
    for (const auto m : all_mechanisms) {
      INFO("root on " << path.native() << ", mechanism " << name_of(m));
      std::error_code ec;
      const auto election = workerlock::is_primary_worker(path, quiet(m), ec);
      CHECK_FALSE(ec);
      CHECK(election.role == Role::primary);
    }
  }
}

// =========================================================================================
// 3. Interoperation with other lock tools
// =========================================================================================

TEST_CASE("interop: Mechanism::flock and util-linux flock(1) exclude each other", "[interop]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";

  // We hold: `flock -n PATH true` exits 1 (busy), and 0 once we let go.
  {
    auto election = workerlock::is_primary_worker(path, quiet(Mechanism::flock));
    REQUIRE(election.role == Role::primary);
    CHECK(run_program({"flock", "-n", path.native(), "true"}) == 1);
    election.lock.unlock();
    CHECK(run_program({"flock", "-n", path.native(), "true"}) == 0);
  }

  // flock(1) holds: our flock attempt fails until flock(1) and its command have exited.
  Spawned holder(flock_holder_command(path), true);
  REQUIRE(holder.read_line() == "ready");
  WorkerLock lock(path, quiet(Mechanism::flock));
  CHECK_FALSE(lock.try_lock());
  {
    const auto election = workerlock::is_primary_worker(path, quiet(Mechanism::flock));
    CHECK(election.role == Role::secondary);
  }
  CHECK_FALSE(lock.try_lock_for(std::chrono::milliseconds(20)));
  REQUIRE(holder.wait() == 0);  // closes its stdin: cat ends, then flock(1)
  CHECK(lock.try_lock());
  CHECK(run_program({"flock", "-n", path.native(), "true"}) == 1);
}

TEST_CASE(
    "interop: Mechanism::posix and ofd exclude boost::interprocess::file_lock across "
    "processes",
    "[interop]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  REQUIRE(write_file(path, ""));  // boost's file_lock needs an existing file
  constexpr int acquired = 10;
  constexpr int busy = 20;
  const auto boost_try_in_child = [&] {
    return run_child([&] {
      boost::interprocess::file_lock lock(path.c_str());
      return lock.try_lock() ? acquired : busy;
    });
  };
  for (const auto m : {Mechanism::posix, Mechanism::ofd}) {
    INFO("mechanism: " << name_of(m));
    // We hold: boost's try_lock() in another process fails.
    {
      auto election = workerlock::is_primary_worker(path, quiet(m));
      REQUIRE(election.role == Role::primary);
      CHECK(boost_try_in_child() == busy);
      election.lock.unlock();
      CHECK(boost_try_in_child() == acquired);
    }
    // boost holds in another process: we cannot have it until it lets go.
    wltest::Shared<Handshake> hs;
    Child holder([&] {
      boost::interprocess::file_lock lock(path.c_str());
      lock.lock();
      hs->state = 1;
      wait_for_release(*hs);
      lock.unlock();
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return hs->state.load() != 0; }));
    WorkerLock lock(path, quiet(m));
    CHECK_FALSE(lock.try_lock());
    {
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      CHECK(election.role == Role::secondary);
    }
    const auto who = workerlock::lock_holder(path);
    REQUIRE(who.has_value());
    CHECK(who->pid == holder.pid());  // boost's POSIX lock: /proc/locks names the process
    CHECK_FALSE(who->recorded);
    hs->release = true;
    REQUIRE(holder.wait() == 0);
    CHECK(lock.try_lock());
  }
}

TEST_CASE(
    "interop: lock_holder() never drops this process's boost::interprocess::file_lock, even "
    "while another process holds an flock lock on the file",
    "[interop]") {
  const bool boost_first = GENERATE(true, false);
  INFO("boost's POSIX lock taken " << (boost_first ? "before" : "after") << " the flock lock");
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  REQUIRE(write_file(path, ""));
  const auto boost_busy_in_child = [&] {
    return run_child([&] {
             boost::interprocess::file_lock lock(path.c_str());
             return lock.try_lock() ? 10 : 20;
           }) == 20;
  };
  // flock and POSIX locks do not conflict, so both are held at once, listed in /proc/locks
  // in either order.
  boost::interprocess::file_lock ours(path.c_str());
  if (boost_first) REQUIRE(ours.try_lock());
  wltest::Shared<Handshake> hs;
  Child flock_holder([&] { return hold_until_released(*hs, path, quiet(Mechanism::flock)); });
  REQUIRE(wltest::eventually([&] { return hs->state.load() != 0; }));
  REQUIRE(hs->state.load() == 1);
  if (!boost_first) REQUIRE(ours.try_lock());
  REQUIRE(boost_busy_in_child());

  for (int round = 0; round < 3; ++round) {
    const auto who = workerlock::lock_holder(path);
    REQUIRE(who.has_value());
    CHECK((who->pid == ::getpid() || who->pid == flock_holder.pid()));
  }
  // Opening and closing the file here would have dropped our POSIX lock.
  CHECK(boost_busy_in_child());
  hs->release = true;
  REQUIRE(flock_holder.wait() == 0);
  CHECK(boost_busy_in_child());
  ours.unlock();
  CHECK_FALSE(boost_busy_in_child());
}

TEST_CASE("interop: Mechanism::flock and Python filelock exclude each other", "[interop]") {
  const std::string python = python_with_filelock();
  INFO("python3 with the filelock module (Debian python3-filelock): '" << python << "'");
  REQUIRE_FALSE(python.empty());
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";

  // We hold: filelock with timeout=0 raises Timeout (exit 1); after release it acquires.
  {
    auto election = workerlock::is_primary_worker(path, quiet(Mechanism::flock));
    REQUIRE(election.role == Role::primary);
    CHECK(run_program({python, "-c", python_try_once, path.native()}) == 1);
    election.lock.unlock();
    CHECK(run_program({python, "-c", python_try_once, path.native()}) == 0);
  }

  // filelock holds: we are secondary until it releases.
  Spawned holder({python, "-c", python_hold, path.native()}, true);
  REQUIRE(holder.read_line() == "ready");
  WorkerLock lock(path, quiet(Mechanism::flock));
  CHECK_FALSE(lock.try_lock());
  {
    const auto election = workerlock::is_primary_worker(path, quiet(Mechanism::flock));
    CHECK(election.role == Role::secondary);
  }
  REQUIRE(holder.wait() == 0);
  CHECK(lock.try_lock());
}

TEST_CASE(
    "interop: OFD and POSIX locks exclude each other across processes, flock locks "
    "coexist with both",
    "[interop]") {
  wltest::TempDir tmp;
  const bool nfs = on_nfs(tmp.path());
  if (nfs) WARN("the temporary directory is on NFS, where flock is emulated by POSIX locks");
  for (const auto holder_mechanism : all_mechanisms) {
    const auto path = tmp / ("matrix-" + name_of(holder_mechanism) + ".lock");
    wltest::Shared<Handshake> hs;
    Child holder([&] {
      const auto election = workerlock::is_primary_worker(path, quiet(holder_mechanism));
      if (election.role != Role::primary) {
        hs->state = -1;
        return 1;
      }
      hs->state = 1;
      wait_for_release(*hs);
      return 0;
    });
    REQUIRE(wltest::eventually([&] { return hs->state.load() != 0; }));
    REQUIRE(hs->state.load() == 1);
    for (const auto contender : all_mechanisms) {
      const bool expect_excluded = excludes(holder_mechanism, contender);
      if (nfs && !expect_excluded) continue;
      INFO("holder " << name_of(holder_mechanism) << " in pid " << holder.pid() << ", contender "
                     << name_of(contender) << " in this process");
      WorkerLock lock(path, quiet(contender));
      CHECK(lock.try_lock() == !expect_excluded);
    }
    // util-linux flock(1) agrees: busy only while a flock lock is held.
    if (!nfs || holder_mechanism == Mechanism::flock) {
      CHECK(run_program({"flock", "-n", path.native(), "true"}) ==
            (holder_mechanism == Mechanism::flock ? 1 : 0));
    }
    hs->release = true;
    CHECK(holder.wait() == 0);
  }
}

TEST_CASE("interop: a same-process handle of another mechanism is refused and keeps a POSIX lock",
          "[interop]") {
  // POSIX locks die when the process closes ANY descriptor of the file. POSIX handles of
  // one process share one descriptor; a handle of another mechanism would need its own, so
  // workerlock refuses it (EBUSY, named) rather than let its close() drop the POSIX lock.
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  auto primary = workerlock::is_primary_worker(path, quiet(Mechanism::posix));
  REQUIRE(primary.role == Role::primary);
  for (const auto other : {Mechanism::ofd, Mechanism::flock}) {
    INFO("same-process handle with mechanism " << name_of(other) << " opened, then destroyed");
    {
      WorkerLock lock(path, quiet(other));
      std::error_code ec;
      CHECK_FALSE(lock.try_lock(ec));
      CHECK(ec == std::errc::device_or_resource_busy);
      CHECK_FALSE(lock.owns_lock());
      CHECK_THROWS_WITH(lock.try_lock(),
                        Catch::Contains("Mechanism::posix") && Catch::Contains(path.native()));
    }
    REQUIRE(primary.lock.owns_lock());
    // Another process must still be kept out: otherwise there are two primaries.
    const int code = run_child([&] {
      WorkerLock lock(path, quiet(Mechanism::posix));
      return lock.try_lock() ? 1 : 0;
    });
    CHECK(code == 0);
  }
}

// =========================================================================================
// 4. lock_holder()
// =========================================================================================

TEST_CASE("interop: lock_holder reports flock(1)'s kernel pid, not a stale record", "[interop]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  // An earlier workerlock primary wrote its record, then exited.
  const int code = run_child([&] {
    const auto election = workerlock::is_primary_worker(path, quiet(Mechanism::flock));
    return election.role == Role::primary ? 0 : 1;
  });
  REQUIRE(code == 0);
  const std::string stale = slurp(path);
  REQUIRE_FALSE(stale.empty());
  const pid_t stale_pid = std::stoi(stale);

  Spawned holder(flock_holder_command(path), true);
  REQUIRE(holder.read_line() == "ready");
  REQUIRE(slurp(path) == stale);  // flock(1) does not write
  REQUIRE(stale_pid != holder.pid());
  const auto who = workerlock::lock_holder(path);
  REQUIRE(who.has_value());
  CHECK(who->pid == holder.pid());
  CHECK_FALSE(who->recorded);
  CHECK(who->mechanism == Mechanism::flock);
  CHECK_FALSE(who->acquired.has_value());
  REQUIRE(holder.wait() == 0);
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
}

TEST_CASE(
    "interop: lock_holder does not trust a record whose pid now belongs to a later process, "
    "when a program that writes no record holds an OFD lock",
    "[interop]") {
  using std::chrono::system_clock;
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  const auto write_record = [&](pid_t pid, system_clock::time_point acquired) {
    char buffer[workerlock::detail::max_record_size];
    const auto n = workerlock::detail::format_record(buffer, pid, acquired, Mechanism::ofd);
    return write_file(path, std::string(buffer, n));
  };
  REQUIRE(write_record(1, system_clock::now()));

  // A live process unrelated to the lock, started just now.
  wltest::Shared<Handshake> bystander_hs;
  Child bystander([&] {
    bystander_hs->state = 1;
    wait_for_release(*bystander_hs);
    return 0;
  });
  // A program that takes an OFD lock and writes nothing; the kernel shows no pid for it.
  wltest::Shared<Handshake> program_hs;
  Child program([&] {
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    struct flock whole {};
    whole.l_type = F_WRLCK;
    whole.l_whence = SEEK_SET;
    if (fd < 0 || ::fcntl(fd, F_OFD_SETLK, &whole) != 0) {
      program_hs->state = -1;
      return 1;
    }
    program_hs->state = 1;
    wait_for_release(*program_hs);
    return 0;
  });
  const auto ready = [](Handshake& hs) {
    return wltest::eventually([&] { return hs.state.load() != 0; }, std::chrono::seconds(10)) &&
           hs.state.load() == 1;
  };
  REQUIRE(ready(*bystander_hs));
  REQUIRE(ready(*program_hs));

  // The record names the bystander's pid but is dated an hour before it started: it was
  // written by an earlier process with the same pid, so it says nothing about this lock.
  REQUIRE(write_record(bystander.pid(), system_clock::now() - std::chrono::hours(1)));
  auto who = workerlock::lock_holder(path);
  REQUIRE(who.has_value());
  CHECK_FALSE(who->pid.has_value());
  CHECK(who->pid_unknown == workerlock::Holder::PidUnknown::ofd_lock_without_record);
  CHECK_FALSE(who->recorded);
  CHECK(who->mechanism == Mechanism::ofd);

  // Dated after the bystander started, the record could be its own, and is believed: for
  // OFD locks the kernel names no owner to check it against.
  REQUIRE(write_record(bystander.pid(), system_clock::now()));
  who = workerlock::lock_holder(path);
  REQUIRE(who.has_value());
  CHECK(who->pid == bystander.pid());
  CHECK(who->recorded);

  bystander_hs->release = true;
  program_hs->release = true;
  CHECK(bystander.wait() == 0);
  CHECK(program.wait() == 0);
}

TEST_CASE("interop: lock_holder returns nullopt for an unlocked file with a valid record",
          "[interop]") {
  wltest::TempDir tmp;
  for (const auto m : all_mechanisms) {
    INFO("mechanism of the departed holder: " << name_of(m));
    const auto path = tmp / ("departed-" + name_of(m) + ".lock");
    Child departed([&] {
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      return election.role == Role::primary ? 0 : 1;
    });
    const pid_t departed_pid = departed.pid();
    REQUIRE(departed.wait() == 0);
    const std::string record = slurp(path);
    REQUIRE_THAT(record, StartsWith(std::to_string(departed_pid) + "\nacquired="));
    REQUIRE_THAT(record, EndsWith("mechanism=" + name_of(m) + "\n"));
    std::error_code ec;
    CHECK_FALSE(workerlock::lock_holder(path, ec).has_value());
    CHECK_FALSE(ec);
    CHECK_FALSE(workerlock::lock_holder(path).has_value());
    CHECK(slurp(path) == record);  // lock_holder never writes
  }
}
