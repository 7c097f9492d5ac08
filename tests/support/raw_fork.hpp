// tests/support/raw_fork.hpp: copies of the test process made by syscall(SYS_fork), which runs no
// pthread_atfork handler, and how such a copy is ended and waited for.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

#include "common.hpp"

namespace wltest {

//! A copy of the calling process made by the raw system call, as a library that clones by
//! hand does: glibc's fork() would run the pthread_atfork handlers, this runs none.
inline pid_t raw_fork() {
  std::fflush(nullptr);  // the copy's exit() must not write the parent's buffered output again
#ifdef SYS_fork
  return static_cast<pid_t>(::syscall(SYS_fork));
#else
  return static_cast<pid_t>(::syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0));
#endif
}

#if defined(__SANITIZE_THREAD__)
#define WLTEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define WLTEST_TSAN 1
#endif
#endif
#ifdef WLTEST_TSAN
extern "C" void __sanitizer_set_report_fd(void* fd);
#endif

//! First thing in a copy made by raw_fork() beside other threads. ThreadSanitizer does not
//! know of such a copy (its fork() interceptor did not run): it takes the parent's threads
//! for live ones and reports their last accesses and held mutexes as races and double locks,
//! then changes the exit status. Its reports go to /dev/null here, and copy_exit() bypasses
//! its exit hook: the copy's behaviour is checked by its exit code and its effect.
inline void tsan_ignore_this_copy() {
#ifdef WLTEST_TSAN
  const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (null >= 0)
    __sanitizer_set_report_fd(reinterpret_cast<void*>(static_cast<std::intptr_t>(null)));
#endif
}

//! Ends a copy made by raw_fork() with `code`, as _exit() does.
[[noreturn]] inline void copy_exit(int code) {
#ifdef WLTEST_TSAN
  ::syscall(SYS_exit_group, code);
#endif
  ::_exit(code);
}

//! Waits up to `limit` for `pid`, a child of this process forked some other way than by a
//! Children: its exit code (128 + signal), or kTimedOut when it had to be killed.
inline int wait_or_kill(pid_t pid, std::chrono::milliseconds limit) {
  Children children;
  return children.wait(children.watch(pid), limit);
}

}  // namespace wltest
