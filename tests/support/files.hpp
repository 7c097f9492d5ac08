// tests/support/files.hpp: small helpers shared by the tests: whole-file reads and writes,
// silent Options, another process's try at a lock, another user to become, a step counter.
#pragma once

#include <grp.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>

#include <workerlock/workerlock.hpp>

#include "common.hpp"

namespace wltest {

//! Options that log nothing, with mechanism `m`.
inline workerlock::Options quiet(workerlock::Mechanism m = workerlock::default_mechanism) {
  return workerlock::Options{}.with(m).silent();
}

//! What other_process_try_lock() found: the exit code of the process that tried.
inline constexpr int kAcquired = 0;   // it took the lock (and let it go as it exited)
inline constexpr int kBusy = 3;       // someone else holds it (not 1: a sanitizer report exits 1)
inline constexpr int kTryFailed = 4;  // try_lock() failed with an error

//! Forks a fresh process that tries once to take `path` with a new WorkerLock of mechanism
//! `m` and exits (releasing it). Returns kAcquired, kBusy, kTryFailed, or kTimedOut when it
//! had not finished after `patience`.
inline int other_process_try_lock(const std::filesystem::path& path,
                                  workerlock::Mechanism m = workerlock::default_mechanism,
                                  std::chrono::milliseconds patience = std::chrono::seconds(10)) {
  Children children;
  const pid_t pid = children.spawn([&] {
    workerlock::WorkerLock other(path, quiet(m));
    std::error_code ec;
    const bool held = other.try_lock(ec);
    if (ec) return kTryFailed;
    return held ? kAcquired : kBusy;
  });
  return children.wait(pid, patience);
}

//! A log sink that counts, in `count`, the lines of `level` that contain `needle`.
inline workerlock::LogSink count_lines(workerlock::LogLevel level, std::string needle,
                                       std::atomic<int>& count) {
  return
      [level, needle = std::move(needle), &count](workerlock::LogLevel l, std::string_view line) {
        if (l == level && line.find(needle) != std::string_view::npos) count.fetch_add(1);
      };
}

//! The whole content of `path` ("" if it cannot be read).
inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

//! Replaces the content of `path` with `bytes`; whether that worked.
inline bool write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  return static_cast<bool>(out);
}

//! Waits until `step` reaches `value` or `timeout` passes.
inline bool reach(const std::atomic<int>& step, int value,
                  std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  return eventually([&] { return step.load() >= value; }, timeout);
}

//! Which file a path or descriptor names: device and inode.
struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const FileId& o) const { return dev == o.dev && ino == o.ino; }
};

//! The unprivileged user a root test becomes (nobody).
inline constexpr uid_t nobody = 65534;

//! Drops every group and becomes `uid` (gid = uid). Only root can do this.
inline bool become(uid_t uid) {
  return ::setgroups(0, nullptr) == 0 && ::setgid(uid) == 0 && ::setuid(uid) == 0 &&
         ::geteuid() == uid && ::getegid() == uid;
}

}  // namespace wltest
