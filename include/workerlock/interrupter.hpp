// workerlock/interrupter.hpp: Interrupter, the one way a Coordinator ends its backend's wait:
// interrupt() from any thread or signal handler, and the deadline wait that it ends.
#pragma once

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>

#include "detail/deadline.hpp"
#include "detail/posix.hpp"

namespace workerlock {

//! How a wait for a descriptor ended.
enum class WaitResult {
  ready,        //!< the descriptor has one of the events asked for (or POLLERR/POLLHUP)
  timed_out,    //!< the deadline passed first
  interrupted,  //!< Interrupter::interrupt() was called (before or during the wait)
  error,        //!< ppoll() failed, or the Interrupter has no eventfd: errno says why
};

namespace detail {

//! ppoll() on `fds` until one has an event or `deadline` passes (CLOCK_MONOTONIC,
//! time_point::max() for never), resuming after signals on the same absolute deadline.
//! Returns: the number of descriptors with events, 0 once the deadline passed, -1 with errno.
inline int poll_until(struct pollfd* fds, nfds_t count,
                      monotonic_clock::time_point deadline) noexcept {
  for (;;) {
    struct timespec left {};
    const struct timespec* timeout = nullptr;
    if (deadline != monotonic_clock::time_point::max()) {
      const auto now = monotonic_clock::now();
      if (now >= deadline) return 0;
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
      left.tv_sec = static_cast<time_t>(ns / 1000000000);
      left.tv_nsec = static_cast<long>(ns % 1000000000);
      timeout = &left;
    }
    const int n = ::ppoll(fds, count, timeout, nullptr);
    if (n > 0 || (n < 0 && errno != EINTR)) return n;
    // 0 (the kernel may wake a little early) or EINTR: the deadline decides.
  }
}

}  // namespace detail

//! Waits until `fd` has one of `events` (POLLIN, POLLOUT...) or `deadline` passes, with no
//! Interrupter: for the waits that no stop() may cut short (a renewal, a release). A
//! negative `fd` just sleeps until the deadline. Exact to the deadline on CLOCK_MONOTONIC
//! (steady_clock); signals do not restart it. Never throws.
inline WaitResult wait_ready(int fd, short events,
                             std::chrono::steady_clock::time_point deadline) noexcept {
  struct pollfd poll_fd = {fd, events, 0};
  const int n = detail::poll_until(&poll_fd, 1, deadline);
  if (n < 0) return WaitResult::error;
  return n == 0 ? WaitResult::timed_out : WaitResult::ready;
}

//! The Coordinator's one way to end its backend's wait for the lock. The Coordinator owns
//! it and passes it to Backend::wait_acquire(); request_stop() and stop() call interrupt().
//! A backend waits through wait(), which interrupt() ends at once; a backend that sleeps in
//! a call no descriptor can end (FileBackend's blocking lock call) registers a Kick for the
//! time of that call, which interrupt() then also runs (FileBackend sends a signal).
//!
//! Threads: interrupt() and interrupted() from any thread, and from signal handlers (both
//! are async-signal-safe). clear(), wait() and KickScope by the one thread that drives the
//! backend.
//!
//! Fork: a copy of the process (fork(), also syscall(SYS_fork), which runs no atfork
//! handler) never touches the parent's eventfd nor its Kick: interrupt() there only sets
//! the flag, and the copy's first clear() or wait() replaces its copy of the eventfd with a
//! fresh one. The process is asked of the kernel each time (getpid()), never cached.
class Interrupter {
 public:
  //! What interrupt() does besides waking wait(): ends a call that no descriptor can end.
  class Kick {
   public:
    //! Called by interrupt(), maybe from a signal handler on any thread: async-signal-safe
    //! only. May run a moment before the waiting thread enters its call, and is then lost:
    //! Coordinator::stop() repeats interrupt() until the wait returns.
    virtual void kick() noexcept = 0;

   protected:
    ~Kick() = default;
  };

  //! While it lives, interrupt() also runs `kick`. Its destructor waits until no
  //! interrupt() is still running the kick, so the kick never outlives the wait it ends.
  //! One at a time per Interrupter.
  class KickScope {
   public:
    KickScope(Interrupter& interrupter, Kick& kick) noexcept : interrupter_(interrupter) {
      interrupter_.adopt_process();
      interrupter_.kick_.store(&kick);
    }
    ~KickScope() {
      interrupter_.kick_.store(nullptr);
      while (interrupter_.kicking_.load() != 0) ::sched_yield();
    }
    KickScope(const KickScope&) = delete;
    KickScope& operator=(const KickScope&) = delete;

   private:
    Interrupter& interrupter_;
  };

  //! Opens the eventfd. One that cannot be opened (EMFILE) is opened again by the next
  //! wait(), which reports WaitResult::error while it cannot. Never throws.
  Interrupter() noexcept { open_event(); }
  //! Closes this process's descriptor (in a forked copy, the copy's only).
  ~Interrupter() {
    if (const int fd = event_fd_.load(); fd >= 0) ::close(fd);
  }
  Interrupter(const Interrupter&) = delete;
  Interrupter& operator=(const Interrupter&) = delete;

  //! Ends the current wait() (and runs the Kick, if one is registered) and every later
  //! one until clear(). May be called repeatedly. Async-signal-safe: atomics, getpid(),
  //! write() and the Kick. Keeps errno.
  void interrupt() noexcept {
    const int saved = errno;
    interrupted_.store(true);
    if (owner_.load() == ::getpid()) {
      kicking_.fetch_add(1);
      if (Kick* kick = kick_.load()) kick->kick();
      kicking_.fetch_sub(1);
      if (const int fd = event_fd_.load(); fd >= 0) {
        const std::uint64_t one = 1;
        [[maybe_unused]] const auto written = ::write(fd, &one, sizeof one);
      }
    }
    errno = saved;
  }

  //! Forgets an earlier interrupt(), before the next wait. A wakeup that an interrupt()
  //! racing with clear() leaves in the eventfd is ignored by wait().
  void clear() noexcept {
    adopt_process();
    interrupted_.store(false);
    drain();
  }

  //! Whether interrupt() was called since the last clear(). Async-signal-safe.
  bool interrupted() const noexcept { return interrupted_.load(); }

  //! Waits until `fd` has one of `events`, `deadline` passes (exact, on steady_clock), or
  //! interrupt() is called (also before this call, since the last clear()). A negative
  //! `fd` waits for the deadline or the interrupt only. Signals do not restart the wait.
  //! Returns: interrupted whenever interrupted() is true on return, even when `fd` is
  //! ready too. Never throws.
  WaitResult wait(int fd, short events, std::chrono::steady_clock::time_point deadline) noexcept {
    adopt_process();
    if (event_fd_.load() < 0) open_event();
    for (;;) {
      if (interrupted_.load()) return WaitResult::interrupted;
      const int event_fd = event_fd_.load();
      if (event_fd < 0) {
        errno = open_errno_;
        return WaitResult::error;
      }
      struct pollfd fds[2] = {{event_fd, POLLIN, 0}, {fd, events, 0}};
      const int n = detail::poll_until(fds, 2, deadline);
      if (n < 0) return WaitResult::error;
      if (interrupted_.load()) return WaitResult::interrupted;
      if (n == 0) return WaitResult::timed_out;
      if (fd >= 0 && fds[1].revents != 0) return WaitResult::ready;
      drain();  // a stale wakeup from an interrupt() that raced with clear()
    }
  }

 private:
  void open_event() noexcept {
    const int fd = detail::keep_off_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (fd < 0) open_errno_ = errno;
    event_fd_.store(fd);
    owner_.store(::getpid());
  }

  //! In a copy of the process: drops the parent's eventfd (closing the copy's descriptor
  //! only) and Kick, and opens a fresh eventfd, so that neither process wakes the other.
  void adopt_process() noexcept {
    if (owner_.load() == ::getpid()) return;
    owner_.store(0);  // interrupt() in between only sets the flag
    kick_.store(nullptr);
    kicking_.store(0);
    if (const int inherited = event_fd_.exchange(-1); inherited >= 0) ::close(inherited);
    open_event();
  }

  void drain() noexcept {
    const int fd = event_fd_.load();
    std::uint64_t count = 0;
    if (fd >= 0) {
      while (::read(fd, &count, sizeof count) > 0) {
      }
    }
  }

  std::atomic<bool> interrupted_{false};
  std::atomic<int> event_fd_{-1};
  std::atomic<pid_t> owner_{0};  // the process whose eventfd event_fd_ is
  std::atomic<Kick*> kick_{nullptr};
  std::atomic<int> kicking_{0};  // interrupt() calls between loading kick_ and its end
  int open_errno_ = 0;           // why the eventfd could not be opened
};

}  // namespace workerlock
