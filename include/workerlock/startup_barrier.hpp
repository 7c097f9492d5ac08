// workerlock/startup_barrier.hpp: StartupBarrier, the marker that one-off startup tasks
// (migrations) finished for this generation of the server, and the wait for it.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "detail/posix.hpp"
#include "detail/proc_stat.hpp"
#include "error.hpp"

namespace workerlock {

//! A marker file next to the lock, `<lock path>.startup`, holding the generation whose
//! startup tasks completed. The primary calls complete() after its tasks; every worker may
//! wait_for() it. A new generation (by default: a new master process) starts incomplete,
//! so tasks run again after a restart of the whole server but not after a failover.
class StartupBarrier {
 public:
  //! The default generation: the parent (the pre-fork master) pid and its start time, so
  //! workers respawned by the same master share it and a restarted master does not.
  static std::string master_generation() {
    const pid_t master = ::getppid();
    const std::string start_time =
        detail::proc_stat_start_time(
            detail::read_proc_file(fmt::format("/proc/{}/stat", master).c_str()))
            .value_or("0");
    return fmt::format("master={}:{}", master, start_time);
  }

  StartupBarrier(const std::filesystem::path& lock_path, std::string generation)
      : marker_(lock_path.string() + ".startup"), generation_(std::move(generation)) {}

  const std::filesystem::path& marker_path() const noexcept { return marker_; }
  const std::string& generation() const noexcept { return generation_; }

  //! True when the marker names this generation.
  bool completed() const noexcept {
    const int fd = detail::retry_on_eintr(
        [&] { return ::open(marker_.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY); });
    if (fd < 0) return false;
    char buffer[512];
    const auto got = detail::retry_on_eintr([&] { return ::read(fd, buffer, sizeof buffer); });
    ::close(fd);
    if (got <= 0) return false;
    std::string_view text(buffer, static_cast<std::size_t>(got));
    if (!text.empty() && text.back() == '\n') text.remove_suffix(1);
    return text == generation_;
  }

  //! Marks the tasks complete: writes a temporary file and renames it over the marker, so
  //! a reader sees the old marker or the new one, never half of one.
  //! Throws: lock_error.
  void complete() {
    std::error_code ec;
    complete(ec);
    if (ec) throw lock_error("mark startup complete in", marker_, ec);
  }
  void complete(std::error_code& ec) noexcept {
    ec.clear();
    const std::string temporary = fmt::format("{}.{}.tmp", marker_.native(), ::getpid());
    const int fd = detail::retry_on_eintr([&] {
      return ::open(temporary.c_str(),
                    O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0644);
    });
    if (fd < 0) {
      ec.assign(errno, std::system_category());
      return;
    }
    const std::string line = generation_ + "\n";
    const auto written =
        detail::retry_on_eintr([&] { return ::write(fd, line.data(), line.size()); });
    if (written != static_cast<ssize_t>(line.size()) || ::close(fd) != 0) {
      ec.assign(written < 0 ? errno : EIO, std::system_category());
      ::unlink(temporary.c_str());
      return;
    }
    if (::rename(temporary.c_str(), marker_.c_str()) != 0) {
      ec.assign(errno, std::system_category());
      ::unlink(temporary.c_str());
    }
  }

  //! Waits until completed() or until `timeout` passes; returns completed().
  //! Polls with backoff from 1 ms to 20 ms: this is a wait for startup, not a hot path.
  bool wait_for(std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto pause = std::chrono::milliseconds(1);
    for (;;) {
      if (completed()) return true;
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return false;
      std::this_thread::sleep_for(
          std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
      pause = std::min(pause * 2, std::chrono::milliseconds(20));
    }
  }

 private:
  std::filesystem::path marker_;
  std::string generation_;
};

}  // namespace workerlock
