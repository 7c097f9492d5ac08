// examples/prefork_server/main.cpp: a small pre-fork HTTP/1.1 server (cpp-httplib) whose
// workers elect one primary with workerlock::Coordinator; the primary runs a scheduler that
// appends one line per tick to a report file (a stand-in for a report mailer). When the
// primary dies, a standby takes over at once and the tick numbering continues.
//
//   workerlock_prefork_server --workers 4 --port 0 --tick 0.5
//       --lock /run/app/primary.lock --report /var/tmp/report.log
//
// The master binds the listening socket, forks the workers (which inherit it), respawns any
// that die, replaces them one by one on SIGHUP and shuts down gracefully on SIGTERM/SIGINT.
// It never takes part in the election: each worker's init hook does, after fork().
// The report file format is described in scheduler.hpp and in --help.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <workerlock/workerlock.hpp>

#include "scheduler.hpp"
#include "worker.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using prefork::Config;
using prefork::log_line;
using prefork::Mode;

//! How long a worker may take to finish its requests after SIGTERM before it gets SIGKILL.
constexpr auto graceful_timeout = std::chrono::seconds(30);
constexpr int max_workers = 128;

void print_usage(std::FILE* out, const char* program) {
  fmt::print(out,
             "usage: {0} [--workers N] [--host ADDR] [--port P] [--lock PATH]\n"
             "       {1:{2}} [--report FILE] [--tick SECONDS] [--respawn-delay MS]\n"
             "       {1:{2}} [--no-coordination]\n"
             "\n"
             "A pre-fork HTTP/1.1 server. The master binds one listening socket and forks\n"
             "workers that share it; each worker joins a workerlock election after fork(),\n"
             "and only the primary runs the scheduler, which appends one line per tick to\n"
             "the report file. When the primary dies a standby takes over at once.\n"
             "\n"
             "options:\n"
             "  --workers N        worker processes, 1..{3} (default 4)\n"
             "  --host ADDR        numeric IPv4 or IPv6 address to bind (default 127.0.0.1)\n"
             "  --port P           TCP port, 0 picks a free one (default 8000); the first\n"
             "                     line on stdout is \"listening on ADDR:PORT\"\n"
             "  --lock PATH        election lock file (default {4})\n"
             "  --report FILE      report file the scheduler appends to\n"
             "                     (default prefork-report.log)\n"
             "  --tick SECONDS     scheduler period, fractions allowed, 0.01..86400 (default 1)\n"
             "  --respawn-delay MS wait before replacing a dead worker, 0..60000 (default 100):\n"
             "                     a dead primary's standby takes over first\n"
             "  --no-coordination  every worker runs the scheduler: shows the duplicate work\n"
             "  --help             print this text and exit\n"
             "\n"
             "endpoints:\n"
             "  GET /        \"hello from pid N\"\n"
             "  GET /status  {{\"pid\":N,\"role\":\"primary|secondary\",\"holder_pid\":N|null,\n"
             "                \"ticks\":N,\"uptime_s\":S,\"mode\":\"coordinated|uncoordinated\"}}\n"
             "\n"
             "report file: one line per tick, \"TICK PID EPOCH UTC\", for example\n"
             "  17 4242 1764290712.123456 2026-11-28T00:45:12.123456Z\n"
             "TICK is one more than the last line's (1 in an empty file), so the numbering\n"
             "continues across failovers and restarts; EPOCH is seconds since 1970 (UTC).\n"
             "\n"
             "signals to the master:\n"
             "  SIGTERM, SIGINT  stop accepting, let workers finish their requests, exit 0\n"
             "                   (a second one kills the workers at once)\n"
             "  SIGHUP           replace the workers one at a time: start a new one, then\n"
             "                   stop an old one gracefully\n"
             "A worker that dies is respawned (see --respawn-delay). Exit status: 0 after a\n"
             "shutdown, 2 for bad options, 1 when the lock file, the report file or the\n"
             "socket cannot be used.\n",
             program, "", std::strlen(program), max_workers, [] {
               std::error_code ec;  // a bad $WORKERLOCK_PATH is reported when it is used
               const auto path = workerlock::default_lock_path(ec);
               return ec ? std::string("(WORKERLOCK_PATH is invalid)") : path.native();
             }());
}

//! Parses all of `text` as an integer in [low, high].
std::optional<int> parse_int(std::string_view text, int low, int high) {
  int value = 0;
  const auto* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc() || ptr != end || value < low || value > high) return std::nullopt;
  return value;
}

std::optional<double> parse_seconds(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (errno != 0 || end != text.c_str() + text.size() || !std::isfinite(value) || value < 0.01 ||
      value > 86400) {
    return std::nullopt;
  }
  return value;
}

//! Returns the exit code to leave with, or nullopt to run.
std::optional<int> parse_args(int argc, char** argv, Config& config) {
  const char* program = argv[0];
  const auto fail = [&](const std::string& message) {
    fmt::print(stderr, "{}: {}\n(see {} --help)\n", program, message, program);
    return std::optional<int>(2);
  };
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i];
    std::optional<std::string> value;
    if (const auto eq = name.find('='); name.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    const bool takes_value = name == "--workers" || name == "--host" || name == "--port" ||
                             name == "--lock" || name == "--report" || name == "--tick" ||
                             name == "--respawn-delay";
    if (takes_value && !value) {
      if (i + 1 >= argc) return fail(fmt::format("{} needs a value", name));
      value = argv[++i];
    } else if (!takes_value && value) {
      return fail(fmt::format("{} takes no value", name));
    }
    if (name == "--help" || name == "-h") {
      print_usage(stdout, program);
      return 0;
    } else if (name == "--workers") {
      const auto n = parse_int(*value, 1, max_workers);
      if (!n) return fail(fmt::format("--workers: expected 1..{}, got '{}'", max_workers, *value));
      config.workers = *n;
    } else if (name == "--host") {
      config.host = *value;
    } else if (name == "--port") {
      const auto port = parse_int(*value, 0, 65535);
      if (!port) return fail(fmt::format("--port: expected 0..65535, got '{}'", *value));
      config.port = *port;
    } else if (name == "--lock") {
      if (value->empty()) return fail("--lock: the path is empty");
      config.lock_path = *value;
    } else if (name == "--report") {
      if (value->empty()) return fail("--report: the path is empty");
      config.report_path = *value;
    } else if (name == "--tick") {
      const auto tick = parse_seconds(*value);
      if (!tick)
        return fail(fmt::format("--tick: expected seconds in 0.01..86400, got '{}'", *value));
      config.tick_seconds = *tick;
    } else if (name == "--respawn-delay") {
      const auto ms = parse_int(*value, 0, 60000);
      if (!ms) return fail(fmt::format("--respawn-delay: expected 0..60000 ms, got '{}'", *value));
      config.respawn_delay = std::chrono::milliseconds(*ms);
    } else if (name == "--no-coordination") {
      config.mode = Mode::uncoordinated;
    } else if (name == "--no-workerlock") {
      // Benchmark baseline, deliberately not in --help: no Coordinator and no scheduler, so
      // requests are served exactly as they would be without workerlock in the process.
      config.mode = Mode::no_workerlock;
    } else {
      return fail(fmt::format("unknown option '{}'", argv[i]));
    }
  }
  return std::nullopt;
}

//! Before forking: can the lock file be opened and locked? The probe never writes a holder
//! record, and it is destroyed before the first fork(), so no worker inherits anything.
bool check_lock_path(const std::string& path) {
  auto options = workerlock::Options{}.silent();
  options.write_holder_record = false;
  try {
    workerlock::WorkerLock probe(path, options);
    if (probe.try_lock()) probe.unlock();  // busy (another server's primary) is fine too
  } catch (const workerlock::lock_error& error) {
    fmt::print(stderr, "prefork_server: unusable lock file: {}\n", error.what());
    return false;
  }
  return true;
}

bool check_report_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644);
  if (fd < 0) {
    fmt::print(stderr, "prefork_server: cannot open report file '{}' for appending: {}\n", path,
               std::strerror(errno));
    return false;
  }
  ::close(fd);
  return true;
}

struct Listener {
  int fd = -1;
  std::string address;  // "127.0.0.1:8000" or "[::1]:8000"
};

//! Binds and listens. The socket is non-blocking: see SharedSocketServer in worker.hpp.
std::optional<Listener> bind_listener(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
      rc != 0) {
    fmt::print(stderr, "prefork_server: --host '{}': {}\n", host, ::gai_strerror(rc));
    return std::nullopt;
  }
  Listener listener;
  listener.fd = ::socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                         found->ai_protocol);
  const int yes = 1;
  const bool ok =
      listener.fd >= 0 &&
      ::setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes) == 0 &&
      // Accepted sockets inherit it. httplib writes headers and body separately, and with
      // Nagle's algorithm every keep-alive response would wait for a delayed ACK (~40 ms).
      ::setsockopt(listener.fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes) == 0 &&
      ::bind(listener.fd, found->ai_addr, found->ai_addrlen) == 0 &&
      ::listen(listener.fd, SOMAXCONN) == 0;
  const int error = errno;
  ::freeaddrinfo(found);
  if (!ok) {
    fmt::print(stderr, "prefork_server: cannot listen on {} port {}: {}\n", host, port,
               std::strerror(error));
    if (listener.fd >= 0) ::close(listener.fd);
    return std::nullopt;
  }
  sockaddr_storage bound{};
  socklen_t length = sizeof bound;
  ::getsockname(listener.fd, reinterpret_cast<sockaddr*>(&bound), &length);
  char text[INET6_ADDRSTRLEN] = {};
  if (bound.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&bound);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    listener.address = fmt::format("[{}]:{}", text, ntohs(in6->sin6_port));
  } else {
    const auto* in4 = reinterpret_cast<const sockaddr_in*>(&bound);
    ::inet_ntop(AF_INET, &in4->sin_addr, text, sizeof text);
    listener.address = fmt::format("{}:{}", text, ntohs(in4->sin_port));
  }
  return listener;
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return fmt::format("exit code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return fmt::format("killed by signal {} ({})", WTERMSIG(status), ::strsignal(WTERMSIG(status)));
  }
  return "stopped";
}

//! The master: forks, watches and replaces workers. Single-threaded; every event (signals
//! through a signalfd, workers' readiness through a pipe) arrives in one poll() loop.
class Master {
 public:
  Master(const Config& config, int listen_fd) : config_(config), listen_fd_(listen_fd) {}

  int run() {
    sigset_t handled;
    sigemptyset(&handled);
    for (const int signo : {SIGCHLD, SIGTERM, SIGINT, SIGHUP}) sigaddset(&handled, signo);
    // Blocked here and, through fork(), in every worker; workers unblock what they need.
    ::sigprocmask(SIG_BLOCK, &handled, nullptr);
    signal_fd_ = ::signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
    int ready[2];
    if (signal_fd_ < 0 || ::pipe2(ready, O_CLOEXEC) != 0) {
      log(fmt::format("cannot set up: {}", std::strerror(errno)));
      return 1;
    }
    ready_read_ = ready[0];
    ready_write_ = ready[1];
    ::fcntl(ready_read_, F_SETFL, O_NONBLOCK);
    log(fmt::format("forking {} workers (mode {}, lock {}, report {}, tick {} s)", config_.workers,
                    prefork::to_string(config_.mode), config_.lock_path, config_.report_path,
                    config_.tick_seconds));

    reconcile();
    while (!(shutting_down_ && children_.empty())) {
      pollfd fds[2] = {{signal_fd_, POLLIN, 0}, {ready_read_, POLLIN, 0}};
      if (::poll(fds, 2, poll_timeout_ms()) < 0 && errno != EINTR) {
        log(fmt::format("poll: {}", std::strerror(errno)));
        return 1;
      }
      read_ready_reports();
      read_signals();
      reap();
      enforce_deadlines();
      reconcile();
    }
    log("all workers have exited; bye");
    return 0;
  }

 private:
  struct Child {
    pid_t pid = 0;
    unsigned generation = 0;
    bool ready = false;
    bool stopping = false;  // sent SIGTERM (or SIGKILL): not counted, never respawned
    bool killed = false;
    Clock::time_point kill_at{};
  };

  void log(const std::string& line) const {
    log_line(fmt::format("master pid={}: {}", ::getpid(), line));
  }

  Child* find(pid_t pid) {
    const auto it = std::find_if(children_.begin(), children_.end(),
                                 [&](const Child& c) { return c.pid == pid; });
    return it == children_.end() ? nullptr : &*it;
  }

  std::size_t active() const {
    return static_cast<std::size_t>(std::count_if(children_.begin(), children_.end(),
                                                  [](const Child& c) { return !c.stopping; }));
  }

  pid_t spawn() {
    std::fflush(nullptr);  // nothing buffered may be written twice
    const pid_t pid = ::fork();
    if (pid < 0) {
      log(fmt::format("fork: {}; retrying in 1 s", std::strerror(errno)));
      next_spawn_ = Clock::now() + std::chrono::seconds(1);
      return 0;
    }
    if (pid == 0) become_worker();
    children_.push_back(Child{pid, generation_});
    log(fmt::format("worker pid={} started (generation {})", pid, generation_));
    return pid;
  }

  [[noreturn]] void become_worker() {
    ::close(signal_fd_);
    ::close(ready_read_);
    // SIGTERM and SIGINT stay blocked: the worker's signal thread sigwait()s for them.
    // SIGHUP is for the master alone; a worker ignores it.
    ::signal(SIGHUP, SIG_IGN);
    sigset_t unblock;
    sigemptyset(&unblock);
    sigaddset(&unblock, SIGCHLD);
    sigaddset(&unblock, SIGHUP);
    ::sigprocmask(SIG_UNBLOCK, &unblock, nullptr);
    prefork::run_worker(config_, master_pid_, listen_fd_, ready_write_);
  }

  void stop_child(Child& child) {
    ::kill(child.pid, SIGTERM);
    child.stopping = true;
    child.kill_at = Clock::now() + graceful_timeout;
  }

  void read_ready_reports() {
    pid_t pid = 0;
    while (::read(ready_read_, &pid, sizeof pid) == static_cast<ssize_t>(sizeof pid)) {
      Child* child = find(pid);
      if (child == nullptr) continue;
      child->ready = true;
      startup_failures_ = 0;
      if (pid == replacement_) {
        if (Child* old = find(replacing_); old != nullptr && !old->stopping) {
          log(fmt::format("worker pid={} is ready; stopping worker pid={} (generation {})", pid,
                          old->pid, old->generation));
          stop_child(*old);
        }
      }
    }
  }

  void read_signals() {
    signalfd_siginfo info{};
    while (::read(signal_fd_, &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
      switch (info.ssi_signo) {
        case SIGTERM:
        case SIGINT:
          begin_shutdown(static_cast<int>(info.ssi_signo));
          break;
        case SIGHUP:
          begin_reload();
          break;
        default:
          break;  // SIGCHLD: reap() runs after every wakeup anyway
      }
    }
  }

  void reap() {
    int status = 0;
    pid_t pid = 0;
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) on_exit(pid, status);
  }

  void on_exit(pid_t pid, int status) {
    Child* found = find(pid);
    if (found == nullptr) return;
    const Child child = *found;
    children_.erase(children_.begin() + (found - children_.data()));
    const std::string how = describe_exit(status);
    if (pid == replacing_) {
      log(fmt::format("worker pid={} (generation {}) {}; replaced by pid={}", pid, child.generation,
                      how, replacement_));
      replacing_ = replacement_ = 0;
    } else if (pid == replacement_) {
      log(fmt::format("replacement worker pid={} {} before taking over", pid, how));
      replacing_ = replacement_ = 0;
    } else if (child.stopping) {
      log(fmt::format("worker pid={} {}", pid, how));
    } else {
      log(fmt::format("worker pid={} {}{}", pid, how,
                      shutting_down_
                          ? ""
                          : fmt::format("; respawning in {} ms", config_.respawn_delay.count())));
      // Kernel locks are not fair: a worker forked the moment the primary died could take
      // the free lock before a standby thread is even scheduled. The standbys take over
      // within a millisecond; the replacement then joins as a secondary.
      next_spawn_ = std::max(next_spawn_, Clock::now() + config_.respawn_delay);
    }
    if (!child.ready && !shutting_down_) {
      // It died before it came up: a crash loop must not become a fork loop.
      ++startup_failures_;
      const auto delay = std::min<std::chrono::milliseconds>(
          std::chrono::milliseconds(100) * (1 << std::min(startup_failures_ - 1, 6)),
          std::chrono::seconds(5));
      next_spawn_ = Clock::now() + delay;
      log(fmt::format("worker pid={} failed to start; next attempt in {} ms", pid, delay.count()));
    }
  }

  void begin_shutdown(int signo) {
    const char* name = signo == SIGINT ? "SIGINT" : "SIGTERM";
    if (shutting_down_) {
      log(fmt::format("{} again: killing {} workers now", name, children_.size()));
      for (auto& child : children_) {
        ::kill(child.pid, SIGKILL);
        child.killed = true;
      }
      return;
    }
    shutting_down_ = true;
    log(fmt::format("{}: stopping {} workers gracefully", name, children_.size()));
    for (auto& child : children_) {
      if (!child.stopping) stop_child(child);
    }
    ::close(listen_fd_);  // the workers hold their own descriptors of the socket
    listen_fd_ = -1;
  }

  void begin_reload() {
    if (shutting_down_) return;
    ++generation_;
    reload_in_progress_ = true;
    log(fmt::format("SIGHUP: replacing {} workers one at a time (generation {})", config_.workers,
                    generation_));
  }

  void enforce_deadlines() {
    const auto now = Clock::now();
    for (auto& child : children_) {
      if (child.stopping && !child.killed && now >= child.kill_at) {
        log(fmt::format("worker pid={} still running {} s after SIGTERM; sending SIGKILL",
                        child.pid, graceful_timeout.count()));
        ::kill(child.pid, SIGKILL);
        child.killed = true;
      }
    }
  }

  //! Brings the workers to the wanted state: N of them, and one reload step at a time.
  void reconcile() {
    if (shutting_down_ || Clock::now() < next_spawn_) return;
    const auto wanted = static_cast<std::size_t>(config_.workers);
    if (replacing_ == 0 && active() >= wanted) {
      const auto is_old = [&](const Child& c) { return !c.stopping && c.generation < generation_; };
      auto old = std::find_if(children_.begin(), children_.end(), is_old);
      if (old != children_.end()) {
        // The primary goes last, so the singleton work moves once, to a new worker.
        const std::optional<pid_t> primary = current_primary();
        const auto other = std::find_if(children_.begin(), children_.end(), [&](const Child& c) {
          return is_old(c) && (!primary || c.pid != *primary);
        });
        if (other != children_.end()) old = other;
        const pid_t old_pid = old->pid;
        log(fmt::format("replacing worker pid={} (generation {})", old_pid, old->generation));
        if (const pid_t pid = spawn(); pid != 0) {
          replacing_ = old_pid;
          replacement_ = pid;
        }
      } else if (reload_in_progress_) {
        reload_in_progress_ = false;
        log(fmt::format("reload complete: all workers are generation {}", generation_));
      }
    }
    // One extra worker while a replacement starts next to the worker it replaces.
    const Child* old = replacing_ != 0 ? find(replacing_) : nullptr;
    const std::size_t target = wanted + (old != nullptr && !old->stopping ? 1 : 0);
    while (active() < target && Clock::now() >= next_spawn_) {
      if (spawn() == 0) break;
    }
  }

  //! The worker holding the election lock, if known. lock_holder() only reads /proc/locks
  //! and the holder record; the master never locks. Holder::pid is empty when the holder's
  //! pid cannot be told (an OFD lock of a program that wrote no record, another pid
  //! namespace): never a sentinel to compare or signal.
  std::optional<pid_t> current_primary() const {
    if (config_.mode != Mode::coordinated) return std::nullopt;
    std::error_code ec;
    const auto holder = workerlock::lock_holder(config_.lock_path, ec);
    if (!holder || ec) return std::nullopt;
    return holder->pid;
  }

  //! Until the next deadline: a SIGKILL due, or a respawn held back by the crash backoff.
  //! Everything else (signals, readiness) wakes poll() through its descriptors.
  int poll_timeout_ms() const {
    const auto now = Clock::now();
    auto next = now + std::chrono::seconds(10);
    for (const auto& child : children_) {
      if (child.stopping && !child.killed) next = std::min(next, child.kill_at);
    }
    if (!shutting_down_ && next_spawn_ > now) next = std::min(next, next_spawn_);
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count();
    return static_cast<int>(std::max<long long>(wait, 0) + 1);
  }

  const Config config_;
  const pid_t master_pid_ = ::getpid();
  int listen_fd_;
  int signal_fd_ = -1;
  int ready_read_ = -1;
  int ready_write_ = -1;
  std::vector<Child> children_;
  unsigned generation_ = 1;
  bool shutting_down_ = false;
  bool reload_in_progress_ = false;
  pid_t replacing_ = 0;    // the worker a reload step replaces, 0 between steps
  pid_t replacement_ = 0;  // the worker that replaces it
  int startup_failures_ = 0;
  Clock::time_point next_spawn_{};
};

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (const auto code = parse_args(argc, argv, config)) return *code;
  if (config.lock_path.empty()) {
    try {
      config.lock_path = workerlock::default_lock_path();  // refuses a bad $WORKERLOCK_PATH
    } catch (const workerlock::lock_error& error) {
      fmt::print(stderr, "{}\n", error.what());
      return 2;
    }
  }

  // Everything that can be checked is checked here, before the first fork().
  if (config.mode == Mode::coordinated && !check_lock_path(config.lock_path)) return 1;
  if (config.mode != Mode::no_workerlock && !check_report_path(config.report_path)) return 1;
  ::signal(SIGPIPE, SIG_IGN);
  const auto listener = bind_listener(config.host, config.port);
  if (!listener) return 1;
  fmt::print("listening on {}\n", listener->address);
  std::fflush(stdout);

  Master master(config, listener->fd);
  return master.run();
}
