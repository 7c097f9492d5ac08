// tests/support/holder_lab.hpp: mounts, pid namespaces and holder children for the lock_holder()
// tests.
#pragma once

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

#include "common.hpp"
#include "fault_injection.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::holder_lab {

namespace fs = std::filesystem;
using workerlock::Mechanism;
using PidUnknown = workerlock::Holder::PidUnknown;

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
//! code, or kTimedOut after a timeout.
template <typename F>
int run_lab(F&& body, std::chrono::seconds timeout) {
  Children children;
  return children.wait(children.spawn(std::forward<F>(body)), timeout);
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
    pid_ = children_.spawn([&]() -> int {
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
    children_.wait(pid_);
  }

 private:
  Children children_;
  pid_t pid_ = -1;
  int release_fd_ = -1;
  bool locked_ = false;
};

inline std::string describe(const std::optional<workerlock::Holder>& h) {
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
inline bool no_pid_because(const std::optional<workerlock::Holder>& h, PidUnknown reason) {
  return h && !h->pid && h->pid_unknown == reason;
}

//! lock_holder() without exceptions, for use in forked labs.
inline std::optional<workerlock::Holder> holder_of(const fs::path& path, LabReport& report) {
  std::error_code ec;
  auto holder = workerlock::lock_holder(path, ec);
  if (ec) report.fail(fmt::format("lock_holder({}) failed: {}", path.string(), ec.message()));
  return holder;
}

//! Runs a shell command; mkfs.btrfs and mount live in sbin, which a CI PATH may lack.
inline int run_status(const std::string& command) {
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
inline bool private_mount_namespace(LabReport& report) {
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
inline void check_holders(const fs::path& file, const std::optional<fs::path>& twin,
                          LabReport& report) {
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

inline ino_t inode_of(const fs::path& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

inline dev_t device_of(const fs::path& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_dev : 0;
}

inline void touch(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd >= 0) ::close(fd);
}

inline std::string lab_failure(int code, const LabReport& report) {
  return fmt::format("lab exit code {} ({}), {} failure(s):\n{}", code,
                     code == kTimedOut ? "killed after the timeout: a hang" : "0 is success",
                     report.failures.load(), report.text);
}

//! Checks that a lab (run_lab) exited with 0 and its report holds no failure, and says why not.
inline void check_lab(int code, const LabReport& report) {
  INFO(lab_failure(code, report));
  CHECK(code == 0);
  CHECK(report.failures.load() == 0);
}

//! Runs `body` as pid 1 of a new pid namespace with its own /proc (in a new, private mount
//! namespace), forked from a child of this process; returns its exit code.
template <typename F>
int in_new_pid_namespace(F&& body, LabReport& report) {
  Children children;
  const pid_t outer = children.spawn([&]() -> int {
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
  return children.wait(outer);
}

//! The last number of the NSpid line of /proc/PID/status: the pid in its own namespace.
inline pid_t innermost_pid(pid_t pid) {
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

inline std::uint64_t pid_namespace_of(const char* proc_path) {
  struct stat st {};
  return ::stat(proc_path, &st) == 0 ? st.st_ino : 0;
}

//! From now on this process is killed (SIGSYS) if it reads through descriptor 0, 1 or 2:
//! with those closed, only a descriptor the library opened there could be read. Returns
//! false if the filter could not be installed.
inline bool kill_on_read_of_standard_streams() {
  wltest::SyscallFilter filter;
  for (const int call : {SCMP_SYS(read), SCMP_SYS(pread64), SCMP_SYS(readv), SCMP_SYS(preadv),
                         SCMP_SYS(getdents64)}) {
    for (const std::uint32_t fd : {0U, 1U, 2U})
      filter.on(call, SCMP_ACT_KILL_PROCESS, {wltest::low_bits_equal(0, fd)});
  }
  return filter.install(false);
}

}  // namespace wltest::holder_lab
