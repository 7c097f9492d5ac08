// examples/prefork_server/scheduler.hpp: the singleton job of the pre-fork server (a stand-in
// for a report mailer) and the report file it appends to.
//
// Report file format: one line per tick, four fields separated by single spaces:
//
//   <tick> <pid> <epoch> <utc>
//   17 4242 1764290712.123456 2026-11-28T00:45:12.123456Z
//
//   tick   1 + the tick of the file's last line (1 in an empty file), so the numbering
//          continues across failovers and restarts of the server
//   pid    the worker process that ran the tick
//   epoch  wall-clock time of the tick: seconds since 1970-01-01 UTC, with microseconds
//   utc    the same instant in ISO 8601 UTC
//
// Each line is appended with ONE write(2) on an O_APPEND descriptor, so lines never interleave.
// The scheduler reads the last line while its worker holds the election lock, so with
// coordination tick numbers are unique and consecutive. With --no-coordination every worker
// reads and appends on its own, and numbers repeat: the duplicate work workerlock prevents.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include <fmt/format.h>
#include <workerlock/options.hpp>

namespace prefork {

//! One line of the report to stderr, in one write(2), so workers' lines never interleave.
inline void log_line(std::string_view line) {
  workerlock::stderr_sink(workerlock::LogLevel::info, line);
}

//! The fields of one report line that the scheduler needs back.
struct ReportLine {
  std::uint64_t tick = 0;
  long pid = 0;
  double epoch = 0;  // seconds since the epoch
};

//! Parses "<tick> <pid> <epoch> <utc>"; nullopt for anything else.
inline std::optional<ReportLine> parse_report_line(std::string_view line) {
  const std::string copy(line);
  unsigned long long tick = 0;
  ReportLine parsed;
  char utc[40] = {};
  if (std::sscanf(copy.c_str(), "%llu %ld %lf %39s", &tick, &parsed.pid, &parsed.epoch, utc) != 4 ||
      tick == 0 || parsed.pid <= 0 || !std::isfinite(parsed.epoch)) {
    return std::nullopt;
  }
  parsed.tick = tick;
  return parsed;
}

//! What the end of the report file says.
struct ReportTail {
  std::optional<ReportLine> last;  // the last complete, well-formed line
  bool ends_with_newline = true;   // false: a fragment without '\n' ends the file
};

//! Reads the last complete line of the open report file (looking at most 4 KiB back).
inline ReportTail read_report_tail(int fd) {
  ReportTail tail;
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size == 0) return tail;
  char buffer[4096];
  const auto window = std::min<off_t>(st.st_size, sizeof buffer);
  ssize_t got = -1;
  do {
    got = ::pread(fd, buffer, static_cast<std::size_t>(window), st.st_size - window);
  } while (got < 0 && errno == EINTR);
  if (got <= 0) return tail;
  std::string_view text(buffer, static_cast<std::size_t>(got));
  tail.ends_with_newline = text.back() == '\n';
  const auto last_newline = text.rfind('\n');
  if (last_newline == std::string_view::npos) return tail;
  text = text.substr(0, last_newline);  // drop the newline and any fragment after it
  const bool window_starts_mid_line = window < st.st_size;
  for (;;) {
    const auto start = text.rfind('\n');
    if (start == std::string_view::npos && window_starts_mid_line) break;  // partial first line
    const auto line = start == std::string_view::npos ? text : text.substr(start + 1);
    if (auto parsed = parse_report_line(line)) {
      tail.last = parsed;
      break;
    }
    if (start == std::string_view::npos) break;
    text = text.substr(0, start);
  }
  return tail;
}

//! Formats one report line (with its trailing newline).
inline std::string format_report_line(std::uint64_t tick, pid_t pid,
                                      std::chrono::system_clock::time_point now) {
  const auto micros_total =
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count();
  const std::time_t seconds = static_cast<std::time_t>(micros_total / 1000000);
  const auto micros = static_cast<long>(micros_total % 1000000);
  std::tm utc{};
  ::gmtime_r(&seconds, &utc);
  return fmt::format("{} {} {}.{:06} {:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\n", tick, pid,
                     static_cast<long long>(seconds), micros, utc.tm_year + 1900, utc.tm_mon + 1,
                     utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, micros);
}

//! The job: appends the next tick's line to the report. Returns the tick written, or 0 and
//! sets `error`. Call it only while holding the election lock (or to show what happens
//! without one).
inline std::uint64_t append_tick(const std::string& path, std::string& error) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    error = fmt::format("cannot open report file '{}': {}", path, std::strerror(errno));
    return 0;
  }
  const auto tail = read_report_tail(fd);
  const std::uint64_t tick = tail.last ? tail.last->tick + 1 : 1;
  // A fragment without a newline (a crashed writer of some other program) gets its own line.
  const std::string line = (tail.ends_with_newline ? "" : "\n") +
                           format_report_line(tick, ::getpid(), std::chrono::system_clock::now());
  ssize_t written = -1;
  do {
    written = ::write(fd, line.data(), line.size());
  } while (written < 0 && errno == EINTR);
  const int write_errno = errno;
  ::close(fd);
  if (written != static_cast<ssize_t>(line.size())) {
    error = fmt::format("cannot append to report file '{}': {}", path,
                        written < 0 ? std::strerror(write_errno) : "short write");
    return 0;
  }
  return tick;
}

//! Runs append_tick() every `tick` on its own thread, between start() and stop().
//! The first tick after start() is aligned to the report's last line: it runs `tick` after
//! that line's time (at once if that is past), so a failover leaves no extra gap.
class Scheduler {
 public:
  Scheduler(std::string report_path, std::chrono::microseconds tick)
      : report_path_(std::move(report_path)), tick_(tick) {}

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;
  ~Scheduler() { stop(); }

  //! Starts the thread; does nothing if it runs. Not to be called concurrently with stop().
  void start() {
    if (thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      stop_requested_ = false;
    }
    thread_ = std::thread([this] { run(); });
  }

  //! Stops the thread and joins it; a tick in progress completes first. Idempotent.
  void stop() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      stop_requested_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  //! Ticks run by this process so far.
  std::uint64_t ticks() const noexcept { return ticks_.load(); }

 private:
  //! How long to wait for the first tick: until `tick` after the report's last line.
  std::chrono::microseconds first_delay() const {
    const int fd = ::open(report_path_.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return std::chrono::microseconds(0);
    const auto tail = read_report_tail(fd);
    ::close(fd);
    if (!tail.last) return std::chrono::microseconds(0);
    const auto now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    const double tick = std::chrono::duration<double>(tick_).count();
    const double due_in = std::clamp(tail.last->epoch + tick - now, 0.0, tick);  // clock skew
    return std::chrono::microseconds(static_cast<std::int64_t>(due_in * 1e6));
  }

  void run() {
    // Signals are for the worker's signal thread, not for this one.
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_BLOCK, &all, nullptr);

    const auto delay = first_delay();
    log_line(fmt::format("worker pid={}: scheduler started (tick {} s, first tick in {} ms)",
                         ::getpid(), std::chrono::duration<double>(tick_).count(),
                         delay.count() / 1000));
    auto due = std::chrono::steady_clock::now() + delay;
    std::unique_lock<std::mutex> guard(mutex_);
    while (!wake_.wait_until(guard, due, [&] { return stop_requested_; })) {
      guard.unlock();
      std::string error;
      if (append_tick(report_path_, error) != 0) {
        ticks_.fetch_add(1);
      } else {
        log_line(fmt::format("worker pid={}: tick failed: {}", ::getpid(), error));
      }
      guard.lock();
      due += tick_;
      const auto now = std::chrono::steady_clock::now();
      if (due < now) due = now;  // fell behind: run the next tick at once, never in a burst
    }
    log_line(fmt::format("worker pid={}: scheduler stopped ({} ticks by this worker so far)",
                         ::getpid(), ticks_.load()));
  }

  const std::string report_path_;
  const std::chrono::microseconds tick_;
  std::atomic<std::uint64_t> ticks_{0};
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_requested_ = false;
};

}  // namespace prefork
