// workerlock/detail/pg_fork.hpp: the fork hook of libpq connections: a copy of the process
// never uses, keeps or ends the parent's sessions.
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include <libpq-fe.h>

#include "fork_layer.hpp"
#include "posix.hpp"

namespace workerlock::detail {

//! The process-wide list of this process's libpq connections: their fork hook (see
//! fork_layer.hpp for the contract).
//!
//! In a child of fork(), no connection of the parent may be used, kept open or closed with a
//! Terminate message: the child would keep the parent's session (and its lock) alive after
//! the parent closes it, or end it. The child handler points each inherited socket at
//! /dev/null; the child's session then frees its copy unseen (disown()).
//!
//! The mutex that fork() takes is never held across a wait on the network: libpq resolves
//! host names and connects (PQconnectStartParams, PQconnectPoll) without it, so a fork() in
//! any thread never waits for a resolver. During that time the slot is `connecting` and the
//! handlers leave its connection alone (its memory and socket may be half changed); a
//! connection that a fork() may have copied that way is ended (Terminate: the server ends the
//! session, whatever the child holds) and made afresh (end_connecting() returns false). Every
//! other libpq call (non-blocking sends and reads on a connected socket) runs under the mutex.
class pg_fork final : public fork_hook {
 public:
  //! One connection as the handlers see it.
  struct slot {
    PGconn* conn = nullptr;   // guarded by the mutex (read without it by its own thread)
    bool connecting = false;  // libpq works on conn without the mutex: the handlers skip it
    bool leak = false;        // inherited while connecting, or not neutralized: never touch conn
    std::atomic<bool> inherited{false};  // copied into this process from its parent
  };

  //! RAII holder of the mutex (after adopting a raw copy).
  class guard {
   public:
    guard() noexcept { instance().lock(); }
    ~guard() { instance().unlock(); }
    guard(const guard&) = delete;
    guard& operator=(const guard&) = delete;
  };

  static pg_fork& instance() noexcept {
    static pg_fork* the_instance = new pg_fork();  // never destroyed: handlers outlive exit
    return *the_instance;
  }

  void add(slot* s) {
    guard g;
    slots_.push_back(s);
  }
  void remove(slot* s) noexcept {
    guard g;
    slots_.erase(std::remove(slots_.begin(), slots_.end(), s), slots_.end());
  }

  //! Before libpq resolves and connects without the mutex; returns the fork count.
  std::uint64_t begin_connecting(slot* s) noexcept {
    guard g;
    s->connecting = true;
    return forks_;
  }
  void publish(slot* s, PGconn* conn) noexcept {
    guard g;
    s->conn = conn;
  }
  //! After: true when no fork() happened since begin_connecting() returned `forks`.
  bool end_connecting(slot* s, std::uint64_t forks = 0) noexcept {
    guard g;
    s->connecting = false;
    return forks_ == forks;
  }

  //! Closes the connection (PQfinish: a Terminate on the non-blocking socket, no wait).
  void retire(slot* s) noexcept {
    guard g;
    if (s->conn != nullptr && !s->leak) PQfinish(s->conn);
    s->conn = nullptr;
    s->leak = false;
  }

  //! In a copy of the process, frees the inherited connection unseen (its socket is
  //! /dev/null); returns false when the slot is this process's own.
  bool disown(slot* s) noexcept {
    guard g;
    if (!s->inherited.load()) return false;
    if (s->conn != nullptr && !s->leak) PQfinish(s->conn);
    s->conn = nullptr;
    s->connecting = false;
    s->leak = false;
    s->inherited.store(false);
    return true;
  }

  //! True when the registered connections belong to this process (no raw-copy adoption
  //! pending). Async-signal-safe.
  static bool owns_connections() noexcept { return !fork_layer::is_unadopted_copy(); }

  //! In a raw copy of the process (syscall(SYS_fork), clone() without CLONE_VM), runs every
  //! fork hook's adoption once (this one: adopt_raw_copy() below). Costs one getpid().
  static void adopt_if_copied() noexcept { fork_layer::adopt_raw_copy(); }

 private:
  pg_fork() noexcept
      : fork_hook(fork_order::network_sessions),
        devnull_(keep_off_standard_streams(::open("/dev/null", O_RDWR | O_CLOEXEC))) {
    fork_layer::add(*this);
  }

  void lock() noexcept {
    fork_layer::adopt_raw_copy();
    ::pthread_mutex_lock(&mutex_);
  }
  void unlock() noexcept { ::pthread_mutex_unlock(&mutex_); }

  // Takes the mutex only: it is never held across a wait on the network.
  void before_fork() noexcept override {
    ::pthread_mutex_lock(&mutex_);
    ++forks_;
  }
  void after_fork_in_parent() noexcept override { unlock(); }
  void after_fork_in_child() noexcept override {
    neutralize_inherited(false);
    unlock();
  }
  //! A raw copy inherits the connections as they are, and the mutex maybe locked by a thread
  //! that does not exist in the copy: a fresh mutex, then what the child hook does.
  void adopt_raw_copy() noexcept override {
    const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    mutex_ = fresh;
    neutralize_inherited(true);
  }

  //! Points every inherited socket at /dev/null. Async-signal-safe (dup3, close). A
  //! connection that was being set up is never touched again (its memory may be half
  //! changed): after fork() the parent makes it afresh, so its socket is left alone here
  //! (its number may be stale); a raw copy, which the parent never learns of, points the
  //! socket libpq last recorded at /dev/null too.
  void neutralize_inherited(bool raw_copy) noexcept {
    for (slot* s : slots_) {
      if (s->connecting) s->leak = true;
      if (s->conn != nullptr && (!s->connecting || raw_copy)) {
        const int fd = PQsocket(s->conn);
        if (fd >= 0 && (devnull_ < 0 || ::dup3(devnull_, fd, O_CLOEXEC) < 0)) {
          ::close(fd);
          s->leak = true;
        }
      }
      s->inherited.store(true);
    }
  }

  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
  std::vector<slot*> slots_;
  std::uint64_t forks_ = 0;
  int devnull_ = -1;
};

}  // namespace workerlock::detail
