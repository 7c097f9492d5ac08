// tests/test_worker_lock.cpp: WorkerLock: paths, descriptors, deadlines, lifecycle, bad input and
// the standard lock concepts. Helpers live in tests/support/; every test forks real processes where
// it needs more than one.
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
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
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <boost/interprocess/sync/file_lock.hpp>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/contract_lab.hpp"
#include "support/election_lab.hpp"
#include "support/file_lab.hpp"
#include "support/fixtures.hpp"
#include "support/fork_lab.hpp"
#include "support/lock_file_lab.hpp"

using namespace wltest;
using namespace wltest::file_lab;
using namespace wltest::contract_lab;
using namespace wltest::election_lab;
using namespace wltest::fork_lab;
using namespace wltest::lock_file_lab;

TEST_CASE("WorkerLock: a missing parent directory is refused with ENOENT and never created",
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

TEST_CASE("WorkerLock: an unprivileged worker gets EACCES, root-owned files stay untouched",
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
  CHECK(read_file(roots_file) == roots_content);
  CHECK(roots_after.st_uid == 0);
  CHECK((roots_after.st_mode & 07777) == 0644);
  CHECK(same_mtime(roots_before, roots_after));
}

TEST_CASE("WorkerLock: a directory at the lock path is refused with EISDIR", "[bad-input]") {
  wltest::TempDir tmp;
  const auto path = tmp / "a-directory";
  REQUIRE(fs::create_directory(path));
  for (const auto m : all_mechanisms) {
    require_refused_here(path, m, std::errc::is_a_directory, {"the path is a directory"});
    CHECK(fs::is_directory(path));
    CHECK(fs::is_empty(path));
  }
}

TEST_CASE("WorkerLock: an empty path is refused with EINVAL by every entry point", "[bad-input]") {
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

TEST_CASE("WorkerLock: paths longer than PATH_MAX or NAME_MAX are refused with ENAMETOOLONG",
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

TEST_CASE("WorkerLock: a read-only file system is refused with EROFS, new or existing file",
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
      r->existing_unchanged = read_file(existing) == content;
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

TEST_CASE("WorkerLock: a regular file used as a directory is refused with ENOTDIR", "[bad-input]") {
  wltest::TempDir tmp;
  const auto plain = tmp / "plain-file";
  REQUIRE(write_file(plain, "just a file\n"));
  const auto path = plain / "primary.lock";
  for (const auto m : all_mechanisms) {
    require_refused_here(path, m, std::errc::not_a_directory,
                         {"a component of the path is not a directory"});
  }
  CHECK(fs::is_regular_file(plain));
  CHECK(read_file(plain) == "just a file\n");
}

TEST_CASE("WorkerLock: a FIFO or a character device at the lock path is not a regular file",
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

TEST_CASE("WorkerLock: WorkerLock::unlock() is noexcept and so are the error_code twins",
          "[contract]") {
  WorkerLock lock;
  std::error_code ec;
  const std::chrono::milliseconds timeout(1);
  const auto deadline = std::chrono::steady_clock::now();
  const std::filesystem::path path("/nonexistent/x.lock");
  const Options options;
  CHECK(noexcept(lock.unlock()));
  CHECK(noexcept(lock.unlock(ec)));
  CHECK(noexcept(lock.lock(ec)));
  CHECK(noexcept(lock.try_lock(ec)));
  CHECK(noexcept(lock.try_lock_for(timeout, ec)));
  CHECK(noexcept(lock.try_lock_until(deadline, ec)));
  CHECK(noexcept(lock.unlock_and_remove(ec)));
  CHECK(noexcept(workerlock::is_primary_worker(path, options, ec)));
  CHECK(noexcept(workerlock::default_lock_path(ec)));
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: an unlock that fails under std::unique_lock neither terminates the "
                 "process nor keeps the lock",
                 "[contract][process]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  struct Board {
    std::atomic<int> stage{0};  // 1: unlocked under unique_lock, 2: parent probed
    std::atomic<int> warnings{0};
  };
  wltest::Shared<Board> board;
  const pid_t child = wltest::fork_child([&] {
    Options options = quiet(mechanism);
    options.log = [&](LogLevel level, std::string_view line) {
      if (level == LogLevel::warning && line.find("cannot unlock") != std::string_view::npos)
        board->warnings.fetch_add(1);
      throw std::runtime_error("the log sink throws too");
    };
    WorkerLock lock(path, options);
    {
      std::unique_lock<WorkerLock> guard(lock);
      if (!lock.owns_lock()) return 2;
      ::close(lock.native_handle());  // behind the handle's back: unlock() will fail (EBADF)
    }  // ~unique_lock calls unlock(): a throw here would be std::terminate
    if (lock.owns_lock()) return 3;
    board->stage.store(1);
    if (!wltest::eventually([&] { return board->stage.load() == 2; }, 60s)) return 4;
    return 0;
  });
  // Until the child has unlocked, or has died trying (134: SIGABRT from std::terminate).
  int died = -1;
  const bool unlocked = wltest::eventually(
      [&] {
        int status = 0;
        if (::waitpid(child, &status, WNOHANG) == child) {
          died = wltest::exit_code_of(status);
          return true;
        }
        return board->stage.load() == 1;
      },
      60s);
  if (died >= 0) FAIL("the child ended (" << died << ") before its unique_lock had unlocked");
  // The child is alive and its lock is free.
  CHECK(other_process_try_lock(path, mechanism) == kAcquired);
  board->stage.store(2);
  CHECK(wltest::wait_or_kill(child, 60s) == 0);
  CHECK(unlocked);
  CHECK(board->warnings.load() == 1);
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: std::lock and std::scoped_lock over two WorkerLocks exclude across "
                 "racing forked workers",
                 "[contract][process]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  const auto path_a = dir / "a.lock";
  const auto path_b = dir / "b.lock";
  struct Board {
    wltest::StartLine start;
    std::atomic<int> inside{0};
    std::atomic<int> overlaps{0};
    std::atomic<int> rounds{0};
  };
  wltest::Shared<Board> board;
  constexpr int kWorkers = 4;
  constexpr int kRounds = 40;
  Children children;
  for (int w = 0; w < kWorkers; ++w) {
    children.spawn([&, w] {
      WorkerLock a(path_a, quiet(mechanism));
      WorkerLock b(path_b, quiet(mechanism));
      board->start.arrive_and_wait();
      for (int round = 0; round < kRounds; ++round) {
        const auto critical = [&] {
          if (!a.owns_lock() || !b.owns_lock()) board->overlaps.fetch_add(100);
          if (board->inside.fetch_add(1) != 0) board->overlaps.fetch_add(1);
          std::this_thread::sleep_for(50us);
          board->inside.fetch_sub(1);
          board->rounds.fetch_add(1);
        };
        switch ((w + round) % 3) {
          case 0: {
            std::scoped_lock both(a, b);
            critical();
            break;
          }
          case 1: {
            std::lock(b, a);  // the other order
            std::unique_lock<WorkerLock> hold_a(a, std::adopt_lock);
            std::unique_lock<WorkerLock> hold_b(b, std::adopt_lock);
            critical();
            break;
          }
          default: {
            std::unique_lock<WorkerLock> hold_a(a, std::defer_lock);
            std::unique_lock<WorkerLock> hold_b(b, std::defer_lock);
            std::lock(hold_a, hold_b);
            critical();
            break;
          }
        }
        if (a.owns_lock() || b.owns_lock()) return 5;
      }
      return 0;
    });
  }
  REQUIRE(board->start.release_when(kWorkers));
  CHECK(children.wait_all_failures() == 0);
  CHECK(board->overlaps.load() == 0);
  CHECK(board->rounds.load() == kWorkers * kRounds);
}

TEST_CASE("WorkerLock: unlock_and_remove() refusals carry errc::not_held and errc::foreign_owner",
          "[contract]") {
  wltest::TempDir dir;
  const auto path = dir / "remove.lock";
  WorkerLock lock(path, quiet(Mechanism::ofd));
  std::error_code ec;
  lock.unlock_and_remove(ec);
  CHECK(ec == workerlock::errc::not_held);
  CHECK(ec == std::errc::operation_not_permitted);
  try {
    lock.unlock_and_remove();
    FAIL("unlock_and_remove() of a handle holding nothing did not throw");
  } catch (const workerlock::lock_error& error) {
    CHECK(error.code() == workerlock::errc::not_held);
  }

  const auto foreign_path = dir / "foreign.conf";
  {
    std::ofstream foreign(foreign_path);
    foreign << "setting = 1\n";
  }
  WorkerLock foreign(foreign_path, quiet(Mechanism::ofd));
  REQUIRE(foreign.try_lock());
  foreign.unlock_and_remove(ec);
  CHECK(ec == workerlock::errc::foreign_owner);
  CHECK(ec == std::errc::operation_not_permitted);
  CHECK(std::filesystem::exists(foreign_path));
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: composes with std::unique_lock and std::scoped_lock across processes",
                 "[election]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  const auto path_a = dir / "a.lock";
  const auto path_b = dir / "b.lock";
  wltest::Shared<StepBoard> board;
  Children children;

  SECTION("std::unique_lock: lock and unlock seen from a forked child") {
    WorkerLock handle(path_a, quiet(mechanism));
    std::unique_lock<WorkerLock> guard(handle);
    REQUIRE(guard.owns_lock());
    REQUIRE(handle.owns_lock());
    const pid_t child = children.spawn([&] {
      auto& b = *board;
      if (handle.owns_lock()) return b.diag.fail("inherited handle claims the lock");
      WorkerLock mine(path_a, quiet(mechanism));
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
    WorkerLock a(path_a, quiet(mechanism));
    WorkerLock b(path_b, quiet(mechanism));
    // A child holds b for a while; the scoped_lock must wait for it.
    const pid_t holder_child = children.spawn([&] {
      WorkerLock theirs(path_b, quiet(mechanism));
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
        WorkerLock pa(path_a, quiet(mechanism));
        WorkerLock pb(path_b, quiet(mechanism));
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
      WorkerLock pa(path_a, quiet(mechanism));
      WorkerLock pb(path_b, quiet(mechanism));
      if (!pa.try_lock()) return diag->fail("a still held after the scoped_lock");
      if (!pb.try_lock()) return diag->fail("b still held after the scoped_lock");
      return 0;
    });
    INFO(diag->message());
    CHECK(children.wait(prober) == 0);
  }
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "WorkerLock: try_lock_for times out while another process holds the lock and succeeds once "
    "released",
    "[election]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  wltest::Shared<HolderBoard> board;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(mechanism));

  WorkerLock mine(path, quiet(mechanism));
  auto t0 = steady_clock::now();
  CHECK_FALSE(mine.try_lock_for(300ms));
  auto elapsed = steady_clock::now() - t0;
  INFO("try_lock_for(300ms) took " << to_ms(elapsed) << " ms");
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
  INFO("try_lock_for(10s) took " << to_ms(elapsed) << " ms");
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

TEST_CASE("WorkerLock: accessors owns_lock path mechanism and empty or moved-from handles",
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

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: unlock twice is harmless and never releases another handle's lock",
                 "[fork]") {
  INFO(describe(mechanism));

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

TEST_CASE_METHOD(wltest::EachMechanismReaped,
                 "WorkerLock: destroying a handle releases its lock for other processes",
                 "[fork]") {
  INFO(describe(mechanism));

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
  CHECK(reaper.wait(child, 30s) == 0);
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: move construction and move assignment transfer ownership", "[fork]") {
  INFO(describe(mechanism));

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

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "WorkerLock: move-assigning over a handle that holds a lock releases that lock first",
    "[fork]") {
  INFO(describe(mechanism));
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

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "WorkerLock: re-locking reuses the open descriptor across unlock and try_lock cycles",
    "[fork]") {
  INFO(describe(mechanism));

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

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: two threads with their own handles on one file exclude each other",
                 "[fork][threads]") {
  INFO(describe(mechanism));
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

TEST_CASE_METHOD(
    wltest::EachMechanismReaped,
    "WorkerLock: handles of several threads never hold a lock the kernel has let go while another "
    "process contends",
    "[fork][threads]") {
  INFO(describe(mechanism));
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
  const int other_exit = reaper.wait(other, 30s);

  INFO("entries " << book->exclusion.entries << " (other process " << book->other_process_entries
                  << "); problem: " << book->notes.text());
  CHECK(book->lost == 0);
  CHECK(book->exclusion.overlaps == 0);
  CHECK(book->errors == 0);
  CHECK(other_exit == 0);
  CHECK(book->other_process_entries > 0);
  CHECK(book->exclusion.entries > book->other_process_entries);
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "WorkerLock: a relative path is resolved at construction so chdir() changes nothing",
    "[lock_file]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
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
    WorkerLock lock("./w.lock", quiet(mechanism));
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
  CHECK(other_process_try_lock(first / "w.lock", mechanism) ==
        kBusy);  // another process sees it held
  CHECK_FALSE(fs::exists(second / "w.lock"));
  CHECK_FALSE(fs::exists(fs::path("/w.lock")));
  board->step.store(2);
  CHECK(children.wait(child, 10s) == 0);
}

TEST_CASE("WorkerLock: a relative path without a current directory fails with a lock_error",
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

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: a handle never re-locks its old file after a rename or a relink",
                 "[lock_file]") {
  const int how = GENERATE(0, 1);      // 0: rename away, 1: hard link elsewhere, then unlink
  const int call = GENERATE(0, 1, 2);  // 0: try_lock, 1: try_lock_for, 2: lock
  INFO("mechanism=" << workerlock::to_string(mechanism)
                    << " how=" << (how == 0 ? "rename" : "relink") << " call=" << call);
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
    WorkerLock lock(path, quiet(mechanism));
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
    WorkerLock lock(path, quiet(mechanism));
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
  CHECK(children.wait(other, 10s) == 0);
  CHECK(children.wait(first, 10s) == 0);
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "WorkerLock: with standard streams closed the lock file never takes descriptor 0 1 or 2",
    "[lock_file]") {
  const int closed = GENERATE(0, 2);  // 0: stdin, stdout and stderr all closed; 2: only stderr
  INFO("mechanism=" << workerlock::to_string(mechanism)
                    << " closed=" << (closed == 0 ? "0,1,2" : "2"));
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
    options.mechanism = mechanism;
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
  CHECK(other_process_try_lock(path, mechanism) == kBusy);  // still held after freopen()
  const auto text = read_file(path);
  INFO("lock file: " << text);
  CHECK(text.rfind(std::to_string(child) + "\n", 0) == 0);  // the record, not a log line
  CHECK(text.find("workerlock:") == std::string::npos);
  board->step.store(2);
  CHECK(children.wait(child, 10s) == 0);
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "WorkerLock: try_lock_for ends on time under a 50 microsecond signal storm",
                 "[lock_file]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  WorkerLock holder(path, quiet(mechanism));
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
    WorkerLock lock(path, quiet(mechanism));
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
  CHECK(children.wait(child, 15s) == 0);
  INFO("try_lock_for(300ms) took " << board->took_ms.load() << " ms");
  CHECK(board->got.load() == 0);
  CHECK(board->took_ms.load() >= 300);
  CHECK(board->took_ms.load() < 5000);
}

TEST_CASE("WorkerLock: a NaN timeout or deadline is an expired one, never undefined behaviour",
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

TEST_CASE("WorkerLock: try_lock_for and try_lock_until with unbounded deadlines wait for the lock",
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
  CHECK(children.wait(child, 10s) == 0);
  CHECK(board->got.load() == 1);
  CHECK(board->returned_ms.load() >= released_ms);
}

TEST_CASE(
    "WorkerLock: errors say what kind of file is at the path and that a regular file is needed",
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
