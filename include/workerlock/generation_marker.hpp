// workerlock/generation_marker.hpp: GenerationMarker, where a backend records that the
// startup tasks of one generation completed, and the wait for that record.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "detail/deadline.hpp"
#include "detail/process_identity.hpp"

namespace workerlock {

//! The startup barrier's record on one backend, for one generation: Backend::startup_barrier()
//! makes it. The Coordinator's primary asks completed() before on_startup and calls
//! complete() after it; Coordinator::wait_for_startup() polls completed().
//! Errors: both calls throw lock_error when they cannot answer or write (never "false" for
//! "cannot tell": the Coordinator would run the tasks twice); the primary then steps down.
class GenerationMarker {
 public:
  virtual ~GenerationMarker() = default;

  //! Returns: true when the record names this generation; false when it names another one
  //! or there is none. Throws: lock_error when the record cannot be read or is refused.
  virtual bool completed() const = 0;

  //! Records that the tasks of this generation completed, atomically (a reader sees the old
  //! record or the new one). Throws: lock_error.
  virtual void complete() = 0;

  //! For log lines: where the record is, such as "'/run/app/primary.lock.startup'".
  virtual std::string describe() const = 0;
};

namespace detail {

//! The longest generation a barrier accepts, in bytes.
inline constexpr std::size_t max_generation_size = 256;

//! Why `generation` cannot name a generation (empty, longer than max_generation_size, a
//! newline or a NUL inside), or nullptr when it can. Every barrier checks it the same way.
inline const char* generation_problem(std::string_view generation) noexcept {
  static_assert(max_generation_size == 256, "keep the explanation in step");
  if (generation.empty()) return "startup_generation is empty";
  if (generation.size() > max_generation_size) return "startup_generation is longer than 256 bytes";
  if (generation.find('\n') != std::string_view::npos) return "startup_generation holds a newline";
  if (generation.find('\0') != std::string_view::npos) return "startup_generation holds a NUL byte";
  return nullptr;
}

//! The default generation: the parent (the pre-fork master) pid and its start time, so
//! workers respawned by the same master share it and a restarted master does not. Read it
//! in the worker: in the master itself it names the master's own parent.
inline std::string master_generation() {
  const pid_t master = ::getppid();
  const auto stat = read_proc_stat(master);
  return fmt::format("master={}:{}", master, stat ? stat->start_time : std::string("0"));
}

//! Calls `done()` until it returns true or `timeout` passes, on an absolute deadline, so
//! that signals cannot prolong it, pausing from 1 ms to 20 ms between calls (a wait for
//! startup, not a hot path). Returns: whether done() returned true.
template <typename Done>
bool poll_until_done(std::chrono::milliseconds timeout, Done&& done) {
  const auto deadline = deadline_after(timeout);
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    if (done()) return true;
    const auto now = monotonic_clock::now();
    if (now >= deadline) return false;
    sleep_until(deadline - now > pause ? now + pause : deadline);
    pause = std::min(pause * 2, std::chrono::milliseconds(20));
  }
}

}  // namespace detail

//! Waits until `marker.completed()` or until `timeout` passes; an error is retried until the
//! deadline. Returns: whether the tasks completed. Throws: the lock_error of the last read
//! before the deadline, when that read failed.
inline bool wait_for_generation(const GenerationMarker& marker, std::chrono::milliseconds timeout) {
  std::exception_ptr last_error;
  const bool done = detail::poll_until_done(timeout, [&] {
    try {
      last_error = nullptr;
      return marker.completed();
    } catch (...) {
      last_error = std::current_exception();
      return false;
    }
  });
  if (!done && last_error) std::rethrow_exception(last_error);
  return done;
}

}  // namespace workerlock
