// workerlock/detail/fork_layer.hpp: the library's one pthread_atfork registration, the
// ordered hooks that lock handles and backend sessions register with, and raw-copy adoption.
#pragma once

#include <pthread.h>
#include <sched.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>

namespace workerlock::detail {

// How a part of the library stays fork-safe
// -----------------------------------------
// A part that keeps process-wide state a copy of the process must not use as it is (lock
// files, network sessions, eventfds) derives one long-lived object from fork_hook and
// registers it once with fork_layer::add(). The layer then calls it for each of the three
// ways a process gets copied:
//
//  * fork() in any thread: before_fork() in the parent, then after_fork_in_parent() in the
//    parent and after_fork_in_child() in the child.
//  * a "raw copy" made without the atfork handlers (syscall(SYS_fork), clone() without
//    CLONE_VM): no handler runs at the copy. The first library call in the copy that asks
//    fork_layer::adopt_raw_copy() (every entry point that touches inherited state must)
//    runs adopt_raw_copy() of every hook, once, before that call goes on.
//
// The hook contract:
//  * before_fork() may take the part's own mutex (and keep it until the parent or child
//    hook). It must never wait on network I/O, DNS or another process: a fork() in any
//    thread waits for it. So a part must never hold, across connect(), a resolver call, a
//    query or any other wait on the network, a mutex that its before_fork() takes; it does
//    that I/O without the mutex and takes it only to publish or retire a descriptor.
//  * after_fork_in_child() runs in a child of a possibly multithreaded process: it must be
//    async-signal-safe (close, dup3, eventfd; no malloc, no locks but its own mutex). It
//    disowns what the child inherited: closes or neutralizes descriptors (never a network
//    goodbye: the parent's session must live on), marks holds as not held, and releases
//    the mutex taken by before_fork().
//  * adopt_raw_copy() runs in a raw copy, single-threaded as far as the library goes (other
//    threads of the copy that enter the library wait for it). It does what
//    after_fork_in_child() would have done, but finds the part's mutex in whatever state the
//    copy caught it (maybe locked by a thread that does not exist here): it re-initializes
//    that mutex instead of unlocking it.
//  * Order: hooks with a lower fork_order run their before_fork() first, and their
//    after_fork_in_parent()/after_fork_in_child() last (the reverse), as nested locks are
//    taken and released. adopt_raw_copy() runs in increasing order. A part's mutex must
//    never be taken while holding the mutex of a part with a higher order.
//  * A hook lives as long as it is registered; remove() it before destroying it. add() and
//    remove() must not be called from inside a hook, nor while holding a mutex that some
//    hook's before_fork() takes.
//
// Per object, a part that needs to tell "made in this process" from "inherited" keeps a
// process_stamp (below) rather than a pid of its own: it asks the kernel each time.
//
// How network backends use it (Redis, PostgreSQL): one static hook per backend kind holds
// the list of that kind's live connections under its own mutex, which is never held across
// connect() or a name lookup; before_fork() takes that mutex, and after_fork_in_child()
// makes each inherited socket unusable in the copy without touching the parent's session:
// Redis closes it (redis_connection.hpp), libpq's sockets, which libpq owns, are pointed at
// /dev/null with dup3 (pg_fork.hpp), so libpq's later close() in the copy sends nothing.
// Each session also keeps a process_stamp and, on every call, calls
// fork_layer::adopt_raw_copy() and then checks its stamp: a session not made in this process
// holds nothing and opens its own connection. The Coordinator's Interrupter is not a hook:
// it compares the pid that made its eventfd with getpid() on every call (interrupter.hpp).

//! The order of a hook (see the contract above): lock files first, network sessions after.
enum class fork_order : int {
  lock_files = 100,
  network_sessions = 200,
};

//! The part of the library that a fork() or a raw copy of the process must tell about it.
class fork_hook {
 public:
  explicit fork_hook(fork_order order) noexcept : order_(order) {}
  fork_hook(const fork_hook&) = delete;
  fork_hook& operator=(const fork_hook&) = delete;

  virtual void before_fork() noexcept = 0;
  virtual void after_fork_in_parent() noexcept = 0;
  virtual void after_fork_in_child() noexcept = 0;
  virtual void adopt_raw_copy() noexcept = 0;

  fork_order order() const noexcept { return order_; }

 protected:
  ~fork_hook() = default;

 private:
  friend class fork_layer;
  const fork_order order_;
  // The layer's list, sorted by order. Published with single pointer stores, so a raw copy
  // made in the middle of add() or remove() still finds a well-formed list.
  std::atomic<fork_hook*> next_{nullptr};
};

//! Which process an object was made in (or adopted by). Never a cached pid of the caller:
//! every question asks the kernel with getpid(), which a raw copy answers correctly.
class process_stamp {
 public:
  process_stamp() noexcept : pid_(::getpid()) {}

  //! True when the calling process is the one stamped.
  bool is_current() const noexcept { return pid_.load(std::memory_order_acquire) == ::getpid(); }
  //! The stamped process (0 while an adoption is under way, see adopt()).
  pid_t pid() const noexcept {
    const pid_t p = pid_.load(std::memory_order_acquire);
    return p > 0 ? p : 0;
  }
  //! Stamps the calling process (from a hook, or when the object is reset).
  void stamp_current() noexcept { pid_.store(::getpid(), std::memory_order_release); }

  //! When the stamp names another process, runs disown() exactly once in this process (in
  //! the first thread that gets here; the others wait for it) and stamps this process.
  //! Returns true in the thread that ran disown().
  template <typename F>
  bool adopt(F disown) noexcept {
    const pid_t me = ::getpid();
    pid_t seen = pid_.load(std::memory_order_acquire);
    if (seen == me) return false;
    if (seen != -me && pid_.compare_exchange_strong(seen, -me, std::memory_order_acq_rel)) {
      disown();
      pid_.store(me, std::memory_order_release);
      return true;
    }
    while (pid_.load(std::memory_order_acquire) != me) ::sched_yield();
    return false;
  }

 private:
  std::atomic<pid_t> pid_;  // -pid while process pid adopts
};

//! The single pthread_atfork registration of the library, and the list of fork hooks.
class fork_layer {
 public:
  //! Registers `hook` (once; a part registers one long-lived hook).
  static void add(fork_hook& hook) noexcept {
    auto& self = instance();
    adopt_raw_copy();
    self.lock();
    std::atomic<fork_hook*>* link = &self.head_;
    for (fork_hook* h = link->load(); h != nullptr && h->order_ <= hook.order_; h = link->load())
      link = &h->next_;
    hook.next_.store(link->load());
    link->store(&hook);  // the one store that publishes it
    self.unlock();
  }

  //! Unregisters `hook`; afterwards no handler calls it.
  static void remove(fork_hook& hook) noexcept {
    auto& self = instance();
    adopt_raw_copy();
    self.lock();
    for (std::atomic<fork_hook*>* link = &self.head_; link->load() != nullptr;
         link = &link->load()->next_) {
      if (link->load() == &hook) {
        link->store(hook.next_.load());  // the one store that unpublishes it
        break;
      }
    }
    self.unlock();
  }

  //! In a raw copy of the process (see the top of this header), runs every hook's
  //! adopt_raw_copy() once; elsewhere costs one getpid(). Every library entry point that
  //! touches state a copy may have inherited calls it first.
  static void adopt_raw_copy() noexcept {
    auto& self = instance();
    self.process_.adopt([&] {
      // Nobody in this process holds the list mutex: a thread that held it at the copy
      // exists only in the original.
      self.mutex_ = fresh_mutex();
      for (fork_hook* h = self.head_.load(); h != nullptr; h = h->next_.load()) h->adopt_raw_copy();
    });
  }

  //! True when this process is a copy whose adoption has not run yet (for assertions).
  static bool is_unadopted_copy() noexcept { return !instance().process_.is_current(); }

 private:
  fork_layer() noexcept { ::pthread_atfork(&prepare, &in_parent, &in_child); }

  static fork_layer& instance() noexcept {
    static fork_layer* the_layer = new fork_layer();  // never destroyed: handlers outlive exit
    return *the_layer;
  }

  static pthread_mutex_t fresh_mutex() noexcept {
    const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    return fresh;
  }

  void lock() noexcept { ::pthread_mutex_lock(&mutex_); }
  void unlock() noexcept { ::pthread_mutex_unlock(&mutex_); }

  // A hook list is short (one hook per kind of state); recursion walks it in reverse.
  template <typename F>
  static void in_reverse(fork_hook* h, F f) noexcept {
    if (h == nullptr) return;
    in_reverse(h->next_.load(), f);
    f(*h);
  }

  static void prepare() noexcept {
    adopt_raw_copy();  // a raw copy that forks before any other library call
    auto& self = instance();
    self.lock();
    for (fork_hook* h = self.head_.load(); h != nullptr; h = h->next_.load()) h->before_fork();
  }
  static void in_parent() noexcept {
    auto& self = instance();
    in_reverse(self.head_.load(), [](fork_hook& h) { h.after_fork_in_parent(); });
    self.unlock();
  }
  static void in_child() noexcept {
    auto& self = instance();
    self.process_.stamp_current();
    in_reverse(self.head_.load(), [](fork_hook& h) { h.after_fork_in_child(); });
    self.unlock();
  }

  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;  // guards add/remove against fork()
  std::atomic<fork_hook*> head_{nullptr};
  process_stamp process_;
};

}  // namespace workerlock::detail
