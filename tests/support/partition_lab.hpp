// tests/support/partition_lab.hpp: a network partition for tests, for real: this process in a
// network namespace of its own, joined to a child's namespace (a second host) by a veth link to
// cut.
#pragma once

#include <fcntl.h>
#include <sched.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "common.hpp"

namespace wltest {

//! This process in a network namespace of its own, restored by the destructor: loopback up,
//! and a virtual link (veth pair) whose end "wl-server" (10.77.0.1/24) stays here while the
//! other, "wl-holder" (10.77.0.2/24), is moved into a child's namespace: a second host.
//! cut() takes the link down, as a pulled cable or a partition would: nothing arrives, and
//! nobody is told (no RST, no FIN). Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and ip(8).
class PartitionLab {
 public:
  static constexpr const char* server_address = "10.77.0.1";
  static constexpr const char* holder_address = "10.77.0.2";
  static constexpr const char* network = "10.77.0.0/24";

  //! Empty when the lab can be built here, else why not.
  static std::string unavailable_reason() {
    if (::geteuid() != 0) return "not root: a network namespace and a veth pair need root";
    if (ip().empty()) return "ip(8) not found: apt-get install iproute2";
    return {};
  }

  PartitionLab() {
    original_ = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (original_ < 0) throw std::runtime_error("open /proc/self/ns/net failed");
    if (::unshare(CLONE_NEWNET) != 0) {
      ::close(original_);
      throw std::runtime_error(fmt::format("unshare(CLONE_NEWNET): {}", std::strerror(errno)));
    }
    try {
      run("link set lo up");
      run("link add wl-server type veth peer name wl-holder");
      run(fmt::format("addr add {}/24 dev wl-server", server_address));
      run("link set wl-server up");
    } catch (...) {
      restore();
      throw;
    }
  }
  ~PartitionLab() { restore(); }
  PartitionLab(const PartitionLab&) = delete;
  PartitionLab& operator=(const PartitionLab&) = delete;

  //! Forks, through `children`, a process on the far end of the link: in a network namespace
  //! of its own, reaching this one at server_address. It runs body() (returning its exit
  //! code) once its side of the link is up; this returns then. Throws if it never gets there.
  template <typename F>
  pid_t spawn_far_host(Children& children, F&& body) {
    enum : int { unshared = 1, handed_over, configured };
    Shared<std::atomic<int>> step;
    const pid_t pid = children.spawn([&]() -> int {
      if (::unshare(CLONE_NEWNET) != 0) return 10;
      step->store(unshared);
      while (step->load() != handed_over) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      run("link set lo up");
      run(fmt::format("addr add {}/24 dev wl-holder", holder_address));
      run("link set wl-holder up");
      step->store(configured);
      return body();
    });
    const auto reached = [&](int s) {
      return eventually([&] { return step->load() == s; }, std::chrono::seconds(10));
    };
    if (!reached(unshared)) throw std::runtime_error("partition lab: the far host never started");
    run(fmt::format("link set wl-holder netns {}", pid));
    step->store(handed_over);
    if (!reached(configured))
      throw std::runtime_error("partition lab: the far host could not configure its link");
    return pid;
  }
  void cut() { run("link set wl-server down"); }
  void heal() { run("link set wl-server up"); }

 private:
  static std::string ip() {
    for (const char* candidate : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"})
      if (::access(candidate, X_OK) == 0) return candidate;
    return {};
  }
  static void run(const std::string& arguments) {
    const std::string command = ip() + " " + arguments + " 2>&1";
    if (std::system(command.c_str()) != 0)
      throw std::runtime_error("partition lab: '" + command + "' failed");
  }
  void restore() noexcept {
    if (original_ < 0) return;
    if (::setns(original_, CLONE_NEWNET) != 0) std::perror("setns back to the original network");
    ::close(original_);
    original_ = -1;
  }
  int original_ = -1;
};

}  // namespace wltest

//! In a TEST_CASE: when no PartitionLab can be built here, fails the test if
//! `require_variable` asks for the server tests (wltest::server_required()), else skips it.
#define WLTEST_REQUIRE_PARTITION_LAB(require_variable)                               \
  do {                                                                               \
    if (const auto why = wltest::PartitionLab::unavailable_reason(); !why.empty()) { \
      if (wltest::server_required(require_variable)) FAIL(why);                      \
      wltest::skip_test(why);                                                        \
      return;                                                                        \
    }                                                                                \
  } while (false)
