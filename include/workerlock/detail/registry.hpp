// workerlock/detail/registry.hpp: the process-wide list of open lock files, which makes
// fork() safe (children drop inherited descriptors) and lets POSIX handles share one fd.
#pragma once

#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <filesystem>

#include "../options.hpp"

namespace workerlock::detail {

//! The state behind one WorkerLock. It lives on the heap so that moving a WorkerLock never
//! moves what the registry points at.
struct lock_state {
  std::filesystem::path path;
  Options options;

  int fd = -1;    // -1 while closed
  dev_t dev = 0;  // identity of the open file, valid while fd >= 0
  ino_t ino = 0;
  bool owned = false;                 // this handle holds the lock
  bool kept_out_by_operator = false;  // WORKERLOCK_ROLE=secondary: never acquire

  // Set in a child of fork() by the registry's atfork handler, which closed the inherited fd.
  bool inherited = false;
  bool held_when_forked = false;
  pid_t forked_from = 0;

  lock_state* prev = nullptr;  // intrusive registry list, guarded by registry::mutex
  lock_state* next = nullptr;
};

//! Guards every lock_state's fd, link and registration. fork() takes it (pthread_atfork
//! prepare handler), so no child is ever forked between an open() and its registration.
class registry {
 public:
  static registry& instance() noexcept {
    static registry the_registry;
    return the_registry;
  }

  registry(const registry&) = delete;
  registry& operator=(const registry&) = delete;

  void lock() noexcept { ::pthread_mutex_lock(&mutex_); }
  void unlock() noexcept { ::pthread_mutex_unlock(&mutex_); }

  // Both require the mutex.
  void link(lock_state* state) noexcept {
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

 private:
  registry() noexcept {
    ::pthread_atfork(&before_fork, &after_fork_in_parent, &after_fork_in_child);
  }

  static void before_fork() noexcept { instance().lock(); }
  static void after_fork_in_parent() noexcept { instance().unlock(); }

  // A child of fork() must not keep the parent's lock alive (OFD and flock locks belong to
  // the open file, which the child shares) nor believe it holds it. Close every inherited
  // descriptor; a POSIX lock is never inherited, and closing the child's copy leaves the
  // parent's intact. Only async-signal-safe work happens here.
  static void after_fork_in_child() noexcept {
    auto& self = instance();
    forget_cached_pid();
    const pid_t parent = ::getppid();
    for (auto* s = self.head_; s != nullptr; s = s->next) {
      if (s->fd >= 0 && !fd_shared_with_earlier(self.head_, s)) close_keep_errno(s->fd);
      s->fd = -1;
      s->held_when_forked = s->owned;
      s->owned = false;
      s->inherited = true;
      s->forked_from = parent;
    }
    self.unlock();
  }

  static void forget_cached_pid() noexcept;

  static bool fd_shared_with_earlier(lock_state* head, lock_state* s) noexcept {
    for (auto* t = head; t != s; t = t->next)
      if (t->fd == s->fd) return true;
    return false;
  }

  static void close_keep_errno(int fd) noexcept {
    const int saved = errno;
    ::close(fd);
    errno = saved;
  }

  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
  lock_state* head_ = nullptr;
};

//! This process's pid, cached: getpid() is a real system call, and a costly one on kernels
//! with page-table isolation. The atfork child handler clears the cache, so a child of
//! fork() sees its own pid. (A child made by a raw clone() that skips atfork handlers would
//! see its parent's pid; workerlock does not support such children.)
inline std::atomic<pid_t> cached_process_id{0};

inline void registry::forget_cached_pid() noexcept {
  cached_process_id.store(0, std::memory_order_relaxed);
}

inline pid_t current_pid() noexcept {
  pid_t pid = cached_process_id.load(std::memory_order_relaxed);
  if (pid == 0) {
    registry::instance();  // installs the atfork handlers before anything is cached
    pid = ::getpid();
    cached_process_id.store(pid, std::memory_order_relaxed);
  }
  return pid;
}

//! RAII holder of the registry mutex.
class registry_guard {
 public:
  registry_guard() noexcept : registry_(registry::instance()) { registry_.lock(); }
  ~registry_guard() { registry_.unlock(); }
  registry_guard(const registry_guard&) = delete;
  registry_guard& operator=(const registry_guard&) = delete;
  registry* operator->() noexcept { return &registry_; }

 private:
  registry& registry_;
};

}  // namespace workerlock::detail
