// workerlock/detail/registry.hpp: the process-wide list of open lock files, which makes
// fork() safe (children drop inherited descriptors) and lets POSIX handles share one fd.
#pragma once

#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include <filesystem>

#include "../options.hpp"
#include "fork_layer.hpp"
#include "posix.hpp"

namespace workerlock::detail {

//! The state behind one WorkerLock. It lives on the heap so that moving a WorkerLock never
//! moves what the registry points at.
struct lock_state {
  std::filesystem::path path;
  Options options;

  // The process this state belongs to: the one that made it, or the copy of fork() whose
  // atfork handler or whose first registry_guard adopted it. In any other process (a copy
  // made by syscall(SYS_fork) or clone(), which run no atfork handler) the state is a copy
  // that owns nothing, whatever `owned` says, and `fd` is a duplicate it may only close.
  pid_t process = 0;

  int fd = -1;    // -1 while closed
  dev_t dev = 0;  // identity of the open file, valid while fd >= 0
  ino_t ino = 0;
  bool owned = false;                 // this handle holds the lock
  bool kept_out_by_operator = false;  // WORKERLOCK_ROLE=secondary: never acquire

  // Set in a copy of the process (made by fork() or a raw clone), whose inherited fd was
  // closed there.
  bool inherited = false;
  bool held_when_forked = false;
  pid_t forked_from = 0;

  lock_state* prev = nullptr;  // intrusive registry list, guarded by registry::mutex
  lock_state* next = nullptr;

  //! True when this state was copied into the calling process from another one.
  bool copied_from_another_process() const noexcept { return process != ::getpid(); }
};

//! Guards every lock_state's fd, link and registration. It is the fork layer's lock-file
//! hook: fork() takes its mutex (before_fork), so no child is ever forked between an open()
//! and its registration, and a child of fork() or a raw copy of the process (see
//! fork_layer.hpp) disowns every inherited state (see disown_copies()).
class registry final : public fork_hook {
 public:
  static registry& instance() noexcept {
    static registry* the_registry = new registry();  // never destroyed: fork() may come late
    return *the_registry;
  }

  void lock() noexcept { ::pthread_mutex_lock(&mutex_); }
  void unlock() noexcept { ::pthread_mutex_unlock(&mutex_); }

  // Both require the mutex.
  void link(lock_state* state) noexcept {
    state->process = ::getpid();
    state->prev = nullptr;
    state->next = head_;
    if (head_ != nullptr) head_->prev = state;
    head_ = state;
  }
  void unlink(lock_state* state) noexcept {
    if (state->prev != nullptr) state->prev->next = state->next;
    if (state->next != nullptr) state->next->prev = state->prev;
    if (head_ == state) head_ = state->next;
    state->prev = state->next = nullptr;
  }

  //! Visits every registered state; requires the mutex. f returns true to stop.
  template <typename F>
  lock_state* find_if(F f) noexcept {
    for (auto* s = head_; s != nullptr; s = s->next)
      if (f(*s)) return s;
    return nullptr;
  }

  void before_fork() noexcept override { lock(); }
  void after_fork_in_parent() noexcept override { unlock(); }

  // A child of fork() must not keep the parent's lock alive (OFD and flock locks belong to
  // the open file, which the child shares) nor believe it holds it.
  void after_fork_in_child() noexcept override {
    disown_copies(::getpid());
    unlock();
  }

  // The mutex may have been copied locked by a thread that does not exist in the copy.
  void adopt_raw_copy() noexcept override {
    const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    mutex_ = fresh;
    disown_copies(::getpid());
  }

 private:
  registry() noexcept : fork_hook(fork_order::lock_files) { fork_layer::add(*this); }

  // Closes every inherited descriptor, each once (POSIX handles share one). A POSIX lock is
  // never inherited, and closing the copy's duplicate of an OFD or flock descriptor leaves
  // the original's lock intact: nothing here releases a lock. Async-signal-safe.
  void disown_copies(pid_t me) noexcept {
    const pid_t parent = ::getppid();
    for (auto* s = head_; s != nullptr; s = s->next) {
      if (s->process == me) continue;
      if (s->fd >= 0) {
        close_keep_errno(s->fd);
        for (auto* t = s->next; t != nullptr; t = t->next)
          if (t->process != me && t->fd == s->fd) t->fd = -1;  // the same descriptor
      }
      s->fd = -1;
      s->held_when_forked = s->owned;
      s->owned = false;
      s->inherited = true;
      s->forked_from = parent;
      s->process = me;
    }
  }

  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
  lock_state* head_ = nullptr;
};

//! RAII holder of the registry mutex.
class registry_guard {
 public:
  //! Takes the mutex; in a raw copy of the process, first disowns the inherited states.
  registry_guard() noexcept : registry_(registry::instance()) {
    fork_layer::adopt_raw_copy();
    registry_.lock();
  }
  ~registry_guard() { registry_.unlock(); }
  registry_guard(const registry_guard&) = delete;
  registry_guard& operator=(const registry_guard&) = delete;
  registry* operator->() noexcept { return &registry_; }

 private:
  registry& registry_;
};

}  // namespace workerlock::detail
