// examples/03_polled_event_loop: a Coordinator in WaitMode::polled inside an epoll loop: a
// timerfd calls poll() every recommended_poll_interval, a signalfd ends the loop on SIGTERM.
//
//   workerlock_03_polled_event_loop [LOCK_PATH]
// Run two: stop the primary (SIGTERM, or SIGKILL) and the other one's next poll() takes over.
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <system_error>

#include <fmt/format.h>
#include <workerlock/workerlock.hpp>

namespace {

int checked(int result, const char* what) {
  if (result < 0) throw std::system_error(errno, std::generic_category(), what);
  return result;
}

}  // namespace

int main(int argc, char** argv) try {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string lock_path = argc > 1 ? argv[1] : "/tmp/workerlock-example-03.lock";
  // SIGTERM and SIGINT become readable data on a signalfd instead of interrupting the loop.
  sigset_t stop_signals;
  ::sigemptyset(&stop_signals);
  ::sigaddset(&stop_signals, SIGTERM);
  ::sigaddset(&stop_signals, SIGINT);
  ::sigprocmask(SIG_BLOCK, &stop_signals, nullptr);
  const int signals = checked(::signalfd(-1, &stop_signals, SFD_CLOEXEC), "signalfd");
  // The poll timer: failover takes at most one interval after the primary is gone.
  const int timer = checked(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC), "timerfd_create");
  itimerspec every{};
  every.it_interval.tv_nsec =
      std::chrono::nanoseconds(workerlock::recommended_poll_interval).count();
  every.it_value = every.it_interval;
  checked(::timerfd_settime(timer, 0, &every, nullptr), "timerfd_settime");
  const int loop = checked(::epoll_create1(EPOLL_CLOEXEC), "epoll_create1");
  for (const int fd : {signals, timer}) {
    epoll_event watch{};
    watch.events = EPOLLIN;
    watch.data.fd = fd;
    checked(::epoll_ctl(loop, EPOLL_CTL_ADD, fd, &watch), "epoll_ctl");
  }

  workerlock::CoordinatorOptions options;
  options.wait = workerlock::WaitMode::polled;  // no thread: callbacks run inside poll()
  workerlock::Coordinator coordinator(lock_path, options);
  coordinator
      .on_promoted([] { fmt::print("pid {}: promoted: singleton work starts\n", ::getpid()); })
      .on_demoted([] { fmt::print("pid {}: demoted: singleton work stops\n", ::getpid()); });
  coordinator.start();  // primary now, or a standby until a poll() finds the lock free
  fmt::print("pid {}: started as {}\n", ::getpid(), coordinator.role());

  for (bool stopping = false; !stopping;) {
    epoll_event ready[2];
    const int n = ::epoll_wait(loop, ready, 2, -1);
    if (n < 0 && errno != EINTR) checked(n, "epoll_wait");
    for (int i = 0; i < n; ++i) {
      if (ready[i].data.fd == timer) {
        std::uint64_t expirations = 0;
        checked(static_cast<int>(::read(timer, &expirations, sizeof expirations)), "read timer");
        coordinator.poll();  // never throws, never waits for another thread
      } else {
        signalfd_siginfo signal{};
        checked(static_cast<int>(::read(signals, &signal, sizeof signal)), "read signalfd");
        stopping = true;
      }
    }
  }
  coordinator.stop();  // a primary runs on_demoted here, then releases: a standby takes over
  fmt::print("pid {}: stopped\n", ::getpid());
  return 0;
} catch (const std::exception& error) {
  fmt::print(stderr, "{}\n", error.what());
  return 1;
}
