// tests/test_lock_holder.cpp: forked-process tests of lock_holder (see tests/CMakeLists.txt for the
// topic). Each test case forks real processes and fails if the behaviour it names breaks. The
// file-system tests mount a loop btrfs image and overlayfs in a private mount namespace (root,
// btrfs-progs); the namespace tests unshare a pid namespace and mount a fresh /proc.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <workerlock/holder.hpp>
#include <workerlock/worker_lock.hpp>

#include "fault_injection.hpp"
#include "support.hpp"

namespace {

namespace fs = std::filesystem;
using workerlock::Mechanism;

//! What a forked lab found wrong, in shared memory, for the parent to print.
struct LabReport {
  std::atomic<int> failures{0};
  std::atomic<std::size_t> used{0};
  char text[16384] = {};

  void fail(const std::string& what) {
    failures.fetch_add(1);
    const std::size_t at = used.fetch_add(what.size() + 1);
    if (at + what.size() + 1 >= sizeof text) return;
    std::memcpy(text + at, what.data(), what.size());
    text[at + what.size()] = '\n';
  }
  void expect(bool ok, const std::string& what) {
    if (!ok) fail(what);
  }
};

//! Runs `body` in a forked child and waits for it at most `timeout`; a child still running
//! then is killed (its own children die with it), so a hang fails the test. Returns its exit
//! code, or -1 after a timeout.
template <typename F>
int run_lab(F&& body, std::chrono::seconds timeout) {
  const pid_t parent = ::getpid();
  const pid_t lab = wltest::fork_child([&]() -> int {
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) return 98;
    return body();
  });
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  for (;;) {
    const pid_t got = ::waitpid(lab, &status, WNOHANG);
    if (got == lab) break;
    if (got < 0 && errno != EINTR) return -2;
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(lab, SIGKILL);
      wltest::wait_exit_code(lab);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -2;
}

//! A child that holds a lock on `path` until this object is destroyed (or its parent
//! dies). With `record`, through workerlock (which writes a holder record); else raw.
class HeldLock {
 public:
  HeldLock(const fs::path& path, Mechanism mechanism, bool record) {
    int ready[2];
    int release[2];
    if (::pipe2(ready, O_CLOEXEC) != 0 || ::pipe2(release, O_CLOEXEC) != 0)
      throw std::runtime_error("pipe2 failed");
    const pid_t parent = ::getpid();
    pid_ = wltest::fork_child([&]() -> int {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) return 98;
      ::close(ready[0]);
      ::close(release[1]);
      char ok = 0;
      std::optional<workerlock::WorkerLock> lock;
      if (record) {
        lock.emplace(path, workerlock::Options{}.with(mechanism));
        ok = lock->try_lock() ? 1 : 0;
      } else {
        const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        struct flock range {};
        range.l_type = F_WRLCK;
        range.l_whence = SEEK_SET;
        if (fd >= 0) {
          if (mechanism == Mechanism::flock) ok = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
          if (mechanism == Mechanism::posix) ok = ::fcntl(fd, F_SETLK, &range) == 0;
          if (mechanism == Mechanism::ofd) ok = ::fcntl(fd, F_OFD_SETLK, &range) == 0;
        }
      }
      if (::write(ready[1], &ok, 1) != 1) return 97;
      char byte = 0;
      while (::read(release[0], &byte, 1) < 0 && errno == EINTR) {
      }
      return 0;  // the lock goes with the process
    });
    ::close(ready[1]);
    ::close(release[0]);
    release_fd_ = release[1];
    char ok = 0;
    ssize_t got = 0;
    while ((got = ::read(ready[0], &ok, 1)) < 0 && errno == EINTR) {
    }
    ::close(ready[0]);
    locked_ = got == 1 && ok == 1;
  }
  ~HeldLock() { release(); }
  HeldLock(const HeldLock&) = delete;
  HeldLock& operator=(const HeldLock&) = delete;

  pid_t pid() const { return pid_; }
  bool locked() const { return locked_; }
  //! Lets the child go and waits for it: the lock is free afterwards.
  void release() {
    if (release_fd_ < 0) return;
    ::close(release_fd_);
    release_fd_ = -1;
    wltest::wait_exit_code(pid_);
  }

 private:
  pid_t pid_ = -1;
  int release_fd_ = -1;
  bool locked_ = false;
};

const char* name_of(Mechanism m) {
  return m == Mechanism::flock ? "flock" : m == Mechanism::posix ? "posix" : "ofd";
}

using PidUnknown = workerlock::Holder::PidUnknown;

std::string describe(const std::optional<workerlock::Holder>& h) {
  if (!h) return "nullopt";
  return fmt::format(
      "pid={} pid_unknown={} mechanism={} recorded={} pid_in_own_namespace={} "
      "pidns={}",
      h->pid ? std::to_string(*h->pid) : "nullopt", to_string(h->pid_unknown), h->mechanism,
      h->recorded, h->pid_in_own_namespace ? std::to_string(*h->pid_in_own_namespace) : "nullopt",
      h->pid_namespace);
}

//! True when `h` names no pid, for the reason given (and a pid that is there is never a
//! sentinel: positive, with pid_known).
bool no_pid_because(const std::optional<workerlock::Holder>& h, PidUnknown reason) {
  return h && !h->pid && h->pid_unknown == reason;
}

//! lock_holder() without exceptions, for use in forked labs.
std::optional<workerlock::Holder> holder_of(const fs::path& path, LabReport& report) {
  std::error_code ec;
  auto holder = workerlock::lock_holder(path, ec);
  if (ec) report.fail(fmt::format("lock_holder({}) failed: {}", path.string(), ec.message()));
  return holder;
}

//! Runs a shell command; mkfs.btrfs and mount live in sbin, which a CI PATH may lack.
int run_command(const std::string& command) {
  const int status = std::system(("PATH=\"$PATH:/usr/sbin:/sbin\" " + command).c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

//! A mount made in this process's private mount namespace, unmounted at scope exit (a loop
//! device that mount(8) set up with autoclear is detached with it).
class Mounted {
 public:
  explicit Mounted(fs::path where) : where_(std::move(where)) {}
  ~Mounted() {
    if (!where_.empty()) ::umount2(where_.c_str(), MNT_DETACH);
  }
  Mounted(const Mounted&) = delete;
  Mounted& operator=(const Mounted&) = delete;

 private:
  fs::path where_;
};

//! Enters a private mount namespace, so nothing mounted here is seen outside and everything
//! goes away with this process even if it is killed.
bool private_mount_namespace(LabReport& report) {
  if (::unshare(CLONE_NEWNS) != 0) {
    report.fail(fmt::format("unshare(CLONE_NEWNS): {}", std::strerror(errno)));
    return false;
  }
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    report.fail(fmt::format("making / private: {}", std::strerror(errno)));
    return false;
  }
  return true;
}

//! For each mechanism, with and without a holder record: while a child holds the lock on
//! `file`, lock_holder() names that child; on `twin` (another file with the same inode
//! number, if any) it names nobody; once released, nobody.
void check_holders(const fs::path& file, const std::optional<fs::path>& twin, LabReport& report) {
  for (const Mechanism m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock}) {
    for (const bool record : {true, false}) {
      const std::string what = fmt::format("{} lock {} a record on {}", name_of(m),
                                           record ? "with" : "without", file.string());
      HeldLock held(file, m, record);
      if (!held.locked()) {
        report.fail(what + ": the holder could not lock it");
        continue;
      }
      const auto h = holder_of(file, report);
      // Without a record the kernel cannot name an OFD lock's holder: no pid, and why.
      if (record || m != Mechanism::ofd) {
        report.expect(
            h && h->pid == held.pid() && h->pid_unknown == PidUnknown::pid_known &&
                h->mechanism == m && h->recorded == record &&
                (record ? h->pid_in_own_namespace == held.pid() : !h->pid_in_own_namespace),
            fmt::format("{}: expected pid {}, got {}", what, held.pid(), describe(h)));
      } else {
        report.expect(no_pid_because(h, PidUnknown::ofd_lock_without_record) && h->mechanism == m &&
                          !h->recorded,
                      fmt::format("{}: expected no pid (ofd_lock_without_record), got {}", what,
                                  describe(h)));
      }
      if (twin) {
        const auto other = holder_of(*twin, report);
        report.expect(!other, fmt::format("{}: its twin {} (same inode number) is not locked, "
                                          "but lock_holder says {}",
                                          what, twin->string(), describe(other)));
      }
      held.release();
      const auto after = holder_of(file, report);
      report.expect(!after,
                    fmt::format("{}: released, but lock_holder says {}", what, describe(after)));
    }
  }
}

ino_t inode_of(const fs::path& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

dev_t device_of(const fs::path& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_dev : 0;
}

void touch(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd >= 0) ::close(fd);
}

std::string lab_failure(int code, const LabReport& report) {
  return fmt::format("lab exit code {} ({}), {} failure(s):\n{}", code,
                     code == -1 ? "killed after the timeout: a hang" : "0 is success",
                     report.failures.load(), report.text);
}

}  // namespace

// Holder::pid used to be a pid_t with sentinels (-1: an OFD lock without a record, 0: a
// holder in another pid namespace), and kill(holder->pid, SIGTERM) with -1 signals every
// process the caller may signal. Now a caller cannot hand it to kill() without looking.
static_assert(!std::is_invocable_v<decltype(&::kill), decltype(workerlock::Holder::pid), int>,
              "kill(holder->pid, SIGTERM) must not compile: Holder::pid may be absent");
static_assert(std::is_same_v<decltype(workerlock::Holder::pid), std::optional<pid_t>>);
static_assert(std::is_same_v<decltype(workerlock::Holder::mechanism), Mechanism>);

TEST_CASE("lock_holder: a holder whose pid cannot be told has no pid, and a reason",
          "[lock_holder]") {
  wltest::TempDir tmp;
  for (const Mechanism m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock}) {
    INFO("mechanism " << name_of(m));
    const auto path = tmp / fmt::format("{}.lock", name_of(m));
    HeldLock held(path, m, false);  // a program that writes no holder record
    REQUIRE(held.locked());
    const auto h = workerlock::lock_holder(path);
    INFO(describe(h));
    REQUIRE(h.has_value());
    CHECK(h->mechanism == m);
    CHECK_FALSE(h->recorded);
    CHECK_FALSE(h->pid_in_own_namespace.has_value());
    if (m == Mechanism::ofd) {
      // The kernel keeps no pid for OFD locks (/proc/locks and F_OFD_GETLK say -1).
      CHECK_FALSE(h->pid.has_value());
      CHECK(h->pid_unknown == PidUnknown::ofd_lock_without_record);
      CHECK(to_string(h->pid_unknown) == "ofd_lock_without_record");
    } else {
      CHECK(h->pid == held.pid());
      CHECK(h->pid_unknown == PidUnknown::pid_known);
    }
    // The hurried caller's line, written the only way it compiles: it signals the holder
    // (signal 0: a check that it may) or nobody, never a process group or everybody.
    if (h->pid) CHECK(::kill(*h->pid, 0) == 0);
  }
}

TEST_CASE(
    "lock_holder: a record whose pid does not fit a pid_t never yields pid 0 or a negative pid",
    "[lock_holder]") {
  wltest::TempDir tmp;
  struct ::stat ns {};
  REQUIRE(::stat("/proc/self/ns/pid", &ns) == 0);
  // 4294967296 narrows to 0 and 4294967295 to -1: kill(0) signals the caller's own process
  // group, kill(-1) everybody. A corrupt or crafted record must not get there.
  for (const char* pid_text : {"4294967296", "4294967295", "99999999999"}) {
    INFO("record pid " << pid_text);
    const auto path = tmp / fmt::format("wrap-{}.lock", pid_text);
    HeldLock held(path, Mechanism::ofd, false);  // the kernel shows no pid for an OFD lock
    REQUIRE(held.locked());
    {
      std::ofstream record(path, std::ios::trunc);
      record << pid_text << "\nacquired=2026-01-01T00:00:00.000000Z\nhost=h\npidns=" << ns.st_ino
             << "\nmechanism=ofd\n";
    }
    const auto h = workerlock::lock_holder(path);
    INFO(describe(h));
    REQUIRE(h.has_value());
    CHECK_FALSE(h->recorded);
    CHECK(no_pid_because(h, PidUnknown::ofd_lock_without_record));
  }
}

TEST_CASE("lock_holder: names the holder of a lock file on btrfs, in a subvolume too",
          "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("the lab mounts a loop device in its own mount namespace");
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  const int code = run_lab(
      [&]() -> int {
        if (!private_mount_namespace(*report)) return 1;
        const auto image = tmp / "btrfs.img";
        const auto top = tmp / "btrfs";
        fs::create_directory(top);
        if (::truncate(image.c_str(), 0) != 0) touch(image);
        if (::truncate(image.c_str(), 120 << 20) != 0) {
          report->fail(fmt::format("truncate {}: {}", image.string(), std::strerror(errno)));
          return 1;
        }
        if (run_command(fmt::format("mkfs.btrfs -q -f '{}' >/dev/null 2>&1", image.string())) !=
            0) {
          report->fail("mkfs.btrfs failed: install btrfs-progs (apt-get install btrfs-progs)");
          return 1;
        }
        if (run_command(fmt::format("mount -t btrfs -o loop '{}' '{}'", image.string(),
                                    top.string())) != 0) {
          report->fail(
              "mount -t btrfs -o loop failed: the kernel needs btrfs (modprobe btrfs) and a free "
              "loop device (losetup -f)");
          return 1;
        }
        Mounted mounted(top);
        const auto sub = top / "subvolume";
        if (run_command(fmt::format("btrfs subvolume create '{}' >/dev/null", sub.string())) != 0) {
          report->fail("btrfs subvolume create failed");
          return 1;
        }
        // The first file of each subvolume: the same inode number, two files.
        const auto in_top = top / "top.lock";
        const auto in_sub = sub / "sub.lock";
        touch(in_top);
        touch(in_sub);
        report->expect(inode_of(in_top) == inode_of(in_sub),
                       "the first files of two btrfs subvolumes should share an inode number");
        report->expect(device_of(in_top) != device_of(in_sub),
                       "a btrfs subvolume should have its own st_dev");
        check_holders(in_top, in_sub, *report);
        check_holders(in_sub, in_top, *report);
        return 0;
      },
      std::chrono::seconds(60));
  INFO(lab_failure(code, *report));
  CHECK(code == 0);
  CHECK(report->failures.load() == 0);
}

TEST_CASE("lock_holder: names the holder of a lock file on overlayfs", "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("the lab mounts in its own mount namespace");
  wltest::TempDir tmp;        // on the root file system (ext4 here)
  wltest::Shared<LabReport> report;
  const int code = run_lab(
      [&]() -> int {
        if (!private_mount_namespace(*report)) return 1;
        const auto tmpfs = tmp / "tmpfs";
        fs::create_directory(tmpfs);
        if (::mount("workerlock-test", tmpfs.c_str(), "tmpfs", 0, "size=4m") != 0) {
          report->fail(fmt::format("mount tmpfs: {}", std::strerror(errno)));
          return 1;
        }
        Mounted tmpfs_mounted(tmpfs);
        // Two overlays: every layer on one tmpfs, and a lower layer on the TempDir's file
        // system under an upper layer on tmpfs (stat() then reports a layer's device).
        struct Layout {
          fs::path lower, upper, work, merged;
        };
        const Layout layouts[] = {
            {tmpfs / "lower", tmpfs / "upper", tmpfs / "work", tmp / "merged-samefs"},
            {tmp / "lower", tmpfs / "upper2", tmpfs / "work2", tmp / "merged-mixed"},
        };
        for (const auto& l : layouts) {
          for (const auto& d : {l.lower, l.upper, l.work, l.merged}) fs::create_directories(d);
          touch(l.lower / "lower.lock");  // in the lower layer: copied up when opened to lock
          const auto options = fmt::format("lowerdir={},upperdir={},workdir={}", l.lower.string(),
                                           l.upper.string(), l.work.string());
          if (::mount("overlay", l.merged.c_str(), "overlay", 0, options.c_str()) != 0) {
            report->fail(fmt::format("mount overlay {}: {}", options, std::strerror(errno)));
            return 1;
          }
          Mounted overlay(l.merged);
          check_holders(l.merged / "lower.lock", std::nullopt, *report);
          touch(l.merged / "upper.lock");
          check_holders(l.merged / "upper.lock", std::nullopt, *report);
        }
        return 0;
      },
      std::chrono::seconds(60));
  INFO(lab_failure(code, *report));
  CHECK(code == 0);
  CHECK(report->failures.load() == 0);
}

namespace {

//! Runs `body` as pid 1 of a new pid namespace with its own /proc (in a new, private mount
//! namespace), forked from a child of this process; returns its exit code.
template <typename F>
int in_new_pid_namespace(F&& body, LabReport& report) {
  const pid_t outer = wltest::fork_child([&]() -> int {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::unshare(CLONE_NEWPID | CLONE_NEWNS) != 0) {
      report.fail(fmt::format("unshare(CLONE_NEWPID | CLONE_NEWNS): {}", std::strerror(errno)));
      return 91;
    }
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
      report.fail(fmt::format("making / private: {}", std::strerror(errno)));
      return 92;
    }
    const pid_t init = wltest::fork_child([&]() -> int {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getpid() != 1) {
        report.fail("the first process of the new pid namespace is not pid 1");
        return 93;
      }
      if (::mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) {
        report.fail(fmt::format("mount proc on /proc: {}", std::strerror(errno)));
        return 94;
      }
      return body();
    });
    return wltest::wait_exit_code(init);
  });
  return wltest::wait_exit_code(outer);
}

//! The last number of the NSpid line of /proc/PID/status: the pid in its own namespace.
pid_t innermost_pid(pid_t pid) {
  std::FILE* status = std::fopen(fmt::format("/proc/{}/status", pid).c_str(), "re");
  if (status == nullptr) return -1;
  char line[256];
  pid_t last = -1;
  while (std::fgets(line, sizeof line, status) != nullptr) {
    if (std::strncmp(line, "NSpid:", 6) != 0) continue;
    const char* number = std::strrchr(line, '\t');
    if (number != nullptr) last = static_cast<pid_t>(std::atoi(number + 1));
  }
  std::fclose(status);
  return last;
}

std::uint64_t pid_namespace_of(const char* proc_path) {
  struct stat st {};
  return ::stat(proc_path, &st) == 0 ? st.st_ino : 0;
}

}  // namespace

TEST_CASE(
    "lock_holder: a holder outside the caller's pid namespace is reported as the header "
    "says for each mechanism",
    "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("unshare(CLONE_NEWPID) and mounting /proc");
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  const int code = run_lab(
      [&]() -> int {
        for (const Mechanism m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock}) {
          for (const bool record : {true, false}) {
            const auto path = tmp / fmt::format("{}-{}.lock", name_of(m), record);
            const std::string what = fmt::format("{} lock {} a record held outside", name_of(m),
                                                 record ? "with" : "without");
            HeldLock held(path, m, record);
            if (!held.locked()) {
              report->fail(what + ": the holder could not lock it");
              continue;
            }
            const pid_t holder_pid = held.pid();
            const auto outer_namespace = pid_namespace_of("/proc/self/ns/pid");
            const int inner = in_new_pid_namespace(
                [&]() -> int {
                  const auto h = holder_of(path, *report);
                  const std::string got = describe(h);
                  if (m == Mechanism::flock) {
                    // The kernel hides it from /proc/locks, and F_OFD_GETLK ignores flock.
                    report->expect(!h, what + ": documented as nullopt, got " + got);
                  } else if (record) {
                    // The record's pid means another process here (pid 1 is this lab): it
                    // is reported as the pid in the holder's own namespace, never as pid.
                    report->expect(no_pid_because(h, PidUnknown::other_pid_namespace) &&
                                       h->recorded && h->pid_in_own_namespace == holder_pid &&
                                       h->pid_namespace == outer_namespace && h->mechanism == m,
                                   fmt::format("{}: expected no pid (other_pid_namespace) and "
                                               "the record's pid {} there, got {}",
                                               what, holder_pid, got));
                    if (m == Mechanism::posix) {
                      // A record that claims this namespace while the kernel says the holder
                      // is outside it is not the holder's: naming pid 1 (this lab's init), or
                      // 4294967296, which narrows to 0 (what the kernel shows here), and
                      // kill(0) would signal the caller's own process group.
                      char text[workerlock::detail::max_record_size];
                      const auto n = workerlock::detail::format_record(
                          text, 1, std::chrono::system_clock::now(), m);
                      for (const std::string forged_pid : {"1", "4294967296"}) {
                        const std::string forged_record = forged_pid + std::string(text + 1, n - 1);
                        const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
                        report->expect(
                            fd >= 0 && ::write(fd, forged_record.data(), forged_record.size()) ==
                                           static_cast<ssize_t>(forged_record.size()),
                            what + ": cannot write the record");
                        if (fd >= 0) ::close(fd);
                        const auto forged = holder_of(path, *report);
                        report->expect(no_pid_because(forged, PidUnknown::other_pid_namespace) &&
                                           !forged->recorded && !forged->pid_in_own_namespace,
                                       fmt::format("{}: a record claiming this namespace must "
                                                   "not name pid {} here, got {}",
                                                   what, forged_pid, describe(forged)));
                      }
                    }
                  } else {
                    const auto reason = m == Mechanism::ofd ? PidUnknown::ofd_lock_without_record
                                                            : PidUnknown::other_pid_namespace;
                    report->expect(no_pid_because(h, reason) && !h->recorded &&
                                       !h->pid_in_own_namespace && h->mechanism == m,
                                   fmt::format("{}: expected no pid ({}), got {}", what,
                                               to_string(reason), got));
                  }
                  return 0;
                },
                *report);
            report->expect(inner == 0,
                           fmt::format("{}: the namespace lab exited with {}", what, inner));
          }
        }
        return 0;
      },
      std::chrono::seconds(60));
  INFO(lab_failure(code, *report));
  CHECK(code == 0);
  CHECK(report->failures.load() == 0);
}

TEST_CASE(
    "lock_holder: a holder inside a child pid namespace is named by its record there and by "
    "the kernel's pid here",
    "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("unshare(CLONE_NEWPID) and mounting /proc");
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  struct Handshake {
    std::atomic<int> locked{0};  // 1 locked, -1 failed
    std::atomic<bool> release{false};
    std::atomic<std::uint64_t> pid_namespace{0};
  };
  const int code = run_lab(
      [&]() -> int {
        // stale: the record names another process of that namespace (pid 2), which let go;
        // then pid 1 holds a POSIX lock without writing a record.
        for (const std::string kind :
             {"ofd", "posix", "flock", "ofd-raw", "posix-raw", "flock-raw", "stale"}) {
          const auto path = tmp / (kind + ".lock");
          const Mechanism m = kind.rfind("ofd", 0) == 0     ? Mechanism::ofd
                              : kind.rfind("flock", 0) == 0 ? Mechanism::flock
                                                            : Mechanism::posix;
          const bool record = kind.find('-') == std::string::npos && kind != "stale";
          wltest::Shared<Handshake> hs;
          const pid_t lab = wltest::fork_child([&]() -> int {
            return in_new_pid_namespace(
                [&]() -> int {
                  hs->pid_namespace = pid_namespace_of("/proc/self/ns/pid");
                  if (kind == "stale") {
                    const pid_t writer = wltest::fork_child([&]() -> int {
                      workerlock::WorkerLock lock(path, workerlock::Options{}.with(m));
                      return lock.try_lock() ? 0 : 1;  // released at exit, the record stays
                    });
                    if (writer != 2 || wltest::wait_exit_code(writer) != 0) {
                      report->fail(fmt::format("stale: the record writer was pid {}", writer));
                      hs->locked = -1;
                      return 1;
                    }
                  }
                  HeldLock held(path, m, record);
                  (void)held;
                  hs->locked = held.locked() ? 1 : -1;
                  while (!hs->release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                  return 0;
                },
                *report);
          });
          if (!wltest::eventually([&] { return hs->locked.load() != 0; },
                                  std::chrono::seconds(20)) ||
              hs->locked != 1) {
            report->fail(kind + ": the holder in the new pid namespace did not lock");
            hs->release = true;
            wltest::wait_exit_code(lab);
            continue;
          }
          // The holder is HeldLock's child of pid 1: pid 2 (3 after the stale writer).
          const auto h = holder_of(path, *report);
          const std::string got = describe(h);
          if (record) {
            // The record's pid (2) is the holder's pid in its own namespace. Here the kernel
            // names it for POSIX and flock locks; an OFD lock shows no pid, and the record's
            // means another process here, so there is none.
            const pid_t expected = 2;
            const bool pid_ok = m == Mechanism::ofd
                                    ? no_pid_because(h, PidUnknown::other_pid_namespace)
                                    : h && h->pid && *h->pid != expected &&
                                          innermost_pid(*h->pid) == expected &&
                                          h->pid_unknown == PidUnknown::pid_known;
            report->expect(pid_ok && h->recorded && h->pid_in_own_namespace == expected &&
                               h->pid_namespace == hs->pid_namespace &&
                               h->pid_namespace != pid_namespace_of("/proc/self/ns/pid") &&
                               h->mechanism == m,
                           fmt::format("{}: expected the record's pid {} in namespace {}, got {}",
                                       kind, expected, hs->pid_namespace.load(), got));
          } else if (m == Mechanism::ofd) {
            report->expect(
                no_pid_because(h, PidUnknown::ofd_lock_without_record) && !h->recorded &&
                    !h->pid_in_own_namespace,
                fmt::format("{}: expected no pid (ofd_lock_without_record), got {}", kind, got));
          } else {
            // The kernel's pid, as this namespace numbers the holder.
            report->expect(
                h && !h->recorded && h->pid && *h->pid > 0 && h->mechanism == m &&
                    innermost_pid(*h->pid) == (kind == "stale" ? 3 : 2),
                fmt::format("{}: expected the kernel's pid of the holder, got {}", kind, got));
          }
          hs->release = true;
          const int exit_code = wltest::wait_exit_code(lab);
          report->expect(exit_code == 0,
                         fmt::format("{}: the namespace lab exited with {}", kind, exit_code));
        }
        return 0;
      },
      std::chrono::seconds(60));
  INFO(lab_failure(code, *report));
  CHECK(code == 0);
  CHECK(report->failures.load() == 0);
}

namespace {

//! From now on this process is killed (SIGSYS) if it reads through descriptor 0, 1 or 2:
//! with those closed, only a descriptor the library opened there could be read. Returns
//! false if the filter could not be installed.
bool kill_on_read_of_standard_streams() {
  wltest::SyscallFilter filter;
  for (const int call : {SCMP_SYS(read), SCMP_SYS(pread64), SCMP_SYS(readv), SCMP_SYS(preadv),
                         SCMP_SYS(getdents64)}) {
    for (const std::uint32_t fd : {0U, 1U, 2U})
      filter.on(call, SCMP_ACT_KILL_PROCESS, {wltest::low_bits_equal(0, fd)});
  }
  return filter.install(false);
}

}  // namespace

TEST_CASE(
    "lock_holder: with descriptors 0, 1 and 2 closed it answers right and never reads "
    "through them",
    "[lock_holder]") {
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  const auto posix_file = tmp / "posix.lock";
  const auto ofd_file = tmp / "ofd.lock";
  const auto free_file = tmp / "free.lock";
  touch(free_file);
  const int code = run_lab(
      [&]() -> int {
        HeldLock posix(posix_file, Mechanism::posix, true);
        HeldLock ofd(ofd_file, Mechanism::ofd, true);
        if (!posix.locked() || !ofd.locked()) {
          report->fail("the holders could not lock");
          return 1;
        }
        const auto check = [&](const char* when) {
          const auto p = holder_of(posix_file, *report);
          report->expect(
              p && p->recorded && p->pid == posix.pid(),
              fmt::format("{}: posix holder {} expected, got {}", when, posix.pid(), describe(p)));
          const auto o = holder_of(ofd_file, *report);
          report->expect(
              o && o->recorded && o->pid == ofd.pid(),
              fmt::format("{}: ofd holder {} expected, got {}", when, ofd.pid(), describe(o)));
          const auto f = holder_of(free_file, *report);
          report->expect(!f, fmt::format("{}: free file, got {}", when, describe(f)));
        };
        // glibc's timegm() (parsing the record's date) loads /etc/localtime once per process
        // through a descriptor of its own: load it now, it is not the library's.
        ::tzset();
        ::close(0);
        ::close(1);
        ::close(2);
        if (!kill_on_read_of_standard_streams()) {
          report->fail("cannot install the seccomp filter");
          return 1;
        }
        check("0, 1, 2 closed");
        const auto left = wltest::open_standard_descriptors();
        report->expect(left.empty(), "descriptors left open at 0, 1, 2:" + left);
        // A daemon reopening its standard streams on /dev/null, then logging to stderr.
        for (int fd = 0; fd <= 2; ++fd) {
          if (::open("/dev/null", O_RDWR) != fd)
            report->fail(fmt::format("/dev/null not at {}", fd));
        }
        const char noise[] = "a log line on stderr\n";
        report->expect(::write(2, noise, sizeof noise - 1) == sizeof noise - 1, "write to fd 2");
        check("0, 1, 2 on /dev/null");
        return 0;
      },
      std::chrono::seconds(30));
  INFO(lab_failure(code, *report));
  INFO("exit code 159 = SIGSYS: the library read through descriptor 0, 1 or 2");
  CHECK(code == 0);
  CHECK(report->failures.load() == 0);
}
