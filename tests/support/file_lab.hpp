// tests/support/file_lab.hpp: children, commands for flock(1) and python3, users and file checks
// for the bad-input, security and interop tests.
#pragma once

#include <fcntl.h>
#include <grp.h>
#include <sched.h>
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

#include "common.hpp"
#include "fault_injection.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::file_lab {

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

inline constexpr uid_t other_user = 65533;  // a second ordinary user
inline constexpr std::array<Mechanism, 3> all_mechanisms{Mechanism::ofd, Mechanism::posix,
                                                         Mechanism::flock};

//! Mechanisms whose locks exclude a lock of `m` held by another process on a local fs.
inline bool excludes(Mechanism holder, Mechanism contender) {
  if (holder == contender) return true;
  const bool holder_fcntl = holder != Mechanism::flock;
  const bool contender_fcntl = contender != Mechanism::flock;
  return holder_fcntl && contender_fcntl;  // OFD and POSIX locks are one family on Linux
}

// --- files -------------------------------------------------------------------------------

inline struct stat stat_of(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) st = {};
  return st;
}

inline bool same_mtime(const struct stat& a, const struct stat& b) {
  return a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec;
}

inline bool on_nfs(const fs::path& path) {
  struct statfs info {};
  return ::statfs(path.c_str(), &info) == 0 && info.f_type == 0x6969;  // NFS_SUPER_MAGIC
}

// --- children ----------------------------------------------------------------------------

//! Lets a holder child tell the parent it holds, and the parent tell it to let go.
struct Handshake {
  std::atomic<int> state{0};  // 0 starting, 1 holding, -1 failed
  std::atomic<bool> release{false};
};

inline void wait_for_release(Handshake& hs) {
  wltest::eventually([&] { return hs.release.load(); }, std::chrono::seconds(30));
}

//! Child side: reports through `hs` whether it holds the lock and, if it does, keeps it until
//! hs.release. The child's exit code: 0, or 1 when it does not hold.
inline int report_and_hold(Handshake& hs, bool holding) {
  if (!holding) {
    hs.state = -1;
    return 1;
  }
  hs.state = 1;
  wait_for_release(hs);
  return 0;
}

//! Parent side: whether the child reports through `hs`, within `timeout`, that it holds.
inline bool holds(const Handshake& hs,
                  std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  return wltest::eventually([&] { return hs.state.load() != 0; }, timeout) && hs.state.load() == 1;
}

//! Child body: takes `path` with a WorkerLock, reports through `hs`, holds until hs.release.
inline int hold_until_released(Handshake& hs, const std::filesystem::path& path,
                               const workerlock::Options& options) {
  WorkerLock lock(path, options);
  return report_and_hold(hs, lock.try_lock());
}

//! Child body: wins `path` with is_primary_worker(), reports through `hs`, holds until
//! hs.release.
inline int elect_and_hold_until_released(Handshake& hs, const std::filesystem::path& path,
                                         const workerlock::Options& options) {
  const auto election = workerlock::is_primary_worker(path, options);
  return report_and_hold(hs, election.role == Role::primary);
}

// --- external programs (flock(1), python3), started with wltest::Program --------------

//! util-linux flock(1) holding `path` until its stdin closes; prints "ready" once it holds.
inline std::vector<std::string> flock_holder_command(const fs::path& path) {
  return {"flock", path.native(), "sh", "-c", "echo ready; exec cat"};
}

//! The Debian python3 that has python3-filelock (a pyenv python3 on PATH may lack it).
inline std::string python_with_filelock() {
  for (const char* candidate : {"/usr/bin/python3", "python3"}) {
    try {
      if (run_program({candidate, "-c", "import filelock"}) == 0) return candidate;
    } catch (const std::exception&) {
    }
  }
  return {};
}

// Exit 0 when it acquired (and released), 1 when the lock was busy.
inline constexpr const char* python_try_once =
    "import filelock, sys\n"
    "try:\n"
    "    filelock.FileLock(sys.argv[1]).acquire(timeout=0)\n"
    "except filelock.Timeout:\n"
    "    sys.exit(1)\n"
    "sys.exit(0)\n";

// Prints "ready" once it holds, releases when stdin closes.
inline constexpr const char* python_hold =
    "import filelock, sys\n"
    "lock = filelock.FileLock(sys.argv[1])\n"
    "lock.acquire(timeout=10)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "lock.release()\n";

// --- recording a refusal -----------------------------------------------------------------

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
inline void record_current_exception(Attempt& a, const fs::path& path) {
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

inline void record_ec(Attempt& a, const std::error_code& ec) {
  a.ec = ec.value();
  a.ec_system_category = ec.category() == std::system_category();
}

//! Tries `path` through is_primary_worker() and WorkerLock::try_lock(), both forms each.
inline void attempt_into(Refusal& r, const fs::path& path, const Options& options) {
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
inline void attempt_holder_into(Attempt& a, const fs::path& path) {
  try {
    a.succeeded = workerlock::lock_holder(path).has_value();
  } catch (...) {
    record_current_exception(a, path);
  }
  std::error_code ec;
  a.ec_succeeded = workerlock::lock_holder(path, ec).has_value();
  record_ec(a, ec);
}

inline void check_attempt(const Attempt& a, const char* call, const fs::path& path,
                          std::errc expected, std::string_view operation,
                          std::initializer_list<std::string_view> mentions) {
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

inline void check_refused(const Refusal& r, const fs::path& path, std::errc expected,
                          std::initializer_list<std::string_view> mentions) {
  check_attempt(r.elect, "is_primary_worker", path, expected, "open lock file", mentions);
  check_attempt(r.try_lock, "WorkerLock::try_lock", path, expected, "open lock file", mentions);
}

//! Runs the four calls in this process and checks the refusal.
inline void require_refused_here(const fs::path& path, Mechanism m, std::errc expected,
                                 std::initializer_list<std::string_view> mentions) {
  INFO("mechanism: " << name_of(m));
  auto r = std::make_unique<Refusal>();
  attempt_into(*r, path, quiet(m));
  check_refused(*r, path, expected, mentions);
}

//! What the file holds before the test: the record of a holder long gone.
inline constexpr const char* earlier_holders_record =
    "4242\nacquired=2026-01-01T00:00:00.000000Z\n";

//! In this (child) process, makes the lock call of mechanism `m` fail with `error`. fcntl64
//! is fcntl() on 32-bit architectures (with the *64 commands); elsewhere its rules add nothing.
inline bool fail_lock_calls(Mechanism m, int error) {
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

}  // namespace wltest::file_lab
