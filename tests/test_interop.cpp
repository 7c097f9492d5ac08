// tests/test_interop.cpp: interoperation with flock(1), Boost.Interprocess, Python and the other
// mechanisms. Helpers live in tests/support/; every test forks real processes where it needs more
// than one.
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
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/file_lab.hpp"

using namespace wltest;
using namespace wltest::file_lab;

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
  Program holder(flock_holder_command(path));
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
  Program holder({python, "-c", python_hold, path.native()});
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
    Child holder([&] { return elect_and_hold_until_released(*hs, path, quiet(holder_mechanism)); });
    REQUIRE(holds(*hs));
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
