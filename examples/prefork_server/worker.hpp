// examples/prefork_server/worker.hpp: one worker process of the pre-fork server: it serves
// HTTP on the listening socket inherited from the master, and its init hook joins the
// election with a workerlock::Coordinator that starts and stops the scheduler.
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <workerlock/workerlock.hpp>

#include "scheduler.hpp"

namespace prefork {

enum class Mode {
  coordinated,    // default: one worker at a time (the primary) runs the scheduler
  uncoordinated,  // --no-coordination: every worker runs the scheduler
  no_workerlock,  // --no-workerlock (benchmark baseline): no Coordinator, no scheduler
};

inline const char* to_string(Mode mode) {
  switch (mode) {
    case Mode::coordinated:
      return "coordinated";
    case Mode::uncoordinated:
      return "uncoordinated";
    case Mode::no_workerlock:
      return "no-workerlock";
  }
  return "unknown";
}

struct Config {
  int workers = 4;
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string lock_path;  // empty: workerlock::default_lock_path()
  std::string report_path = "prefork-report.log";
  double tick_seconds = 1.0;
  Mode mode = Mode::coordinated;
  //! How long the master waits before it replaces a worker that died.
  std::chrono::milliseconds respawn_delay{100};
};

//! An httplib::Server that serves on a listening socket someone else bound (the master), and
//! stops without shutdown(2) of that socket: Server::stop() shuts the socket down, which would
//! stop the listening for every process sharing it.
//! Requires: the socket is non-blocking (the master sets O_NONBLOCK) and an idle interval is
//! set, so the accept loop polls, and a worker that loses the race for a connection gets
//! EAGAIN (which httplib retries) instead of blocking in accept().
class SharedSocketServer : public httplib::Server {
 public:
  //! Runs the accept loop on `fd` until stop_accepting(); in-flight requests finish first.
  bool serve(int fd) {
    svr_sock_ = fd;
    if (stopping_.load()) svr_sock_ = INVALID_SOCKET;  // stop_accepting() came first
    return listen_after_bind();
  }

  //! Leaves the accept loop within one idle interval. Keep-alive connections end after the
  //! request they are serving; the socket itself stays open for the other workers.
  void stop_accepting() {
    stopping_.store(true);
    svr_sock_ = INVALID_SOCKET;
  }

  bool stopping() const { return stopping_.load(); }

 private:
  std::atomic<bool> stopping_{false};
};

class Worker {
 public:
  Worker(const Config& config, int listen_fd)
      : config_(config),
        listen_fd_(listen_fd),
        scheduler_(config.report_path, std::chrono::microseconds(
                                           static_cast<std::int64_t>(config.tick_seconds * 1e6))) {}

  //! The worker's life: init hook, serve until SIGTERM/SIGINT, clean up. Returns the exit code.
  //! Requires: SIGTERM and SIGINT are blocked in the calling thread (the master leaves them
  //! blocked across fork), so that only the signal thread receives them.
  int run(int ready_fd) {
    install_routes();
    if (!init_hook()) return 3;

    std::thread signals([this] { wait_for_stop_signal(); });
    const pid_t me = ::getpid();
    [[maybe_unused]] auto written = ::write(ready_fd, &me, sizeof me);  // tell the master
    ::close(ready_fd);

    const bool clean = server_.serve(listen_fd_);
    if (!clean) log_line(fmt::format("worker pid={}: the accept loop failed", me));
    // Wake the signal thread if the loop ended on its own; it then runs begin_stop().
    ::pthread_kill(signals.native_handle(), SIGTERM);
    signals.join();
    coordinator_.reset();  // stops (running on_demoted if primary) and joins
    scheduler_.stop();
    log_line(fmt::format("worker pid={}: exiting ({} ticks run by this worker)", me,
                         scheduler_.ticks()));
    return clean ? 0 : 1;
  }

 private:
  //! What a pre-fork server's post-fork init hook does: join the election.
  bool init_hook() {
    switch (config_.mode) {
      case Mode::coordinated:
        coordinator_ = std::make_unique<workerlock::Coordinator>(config_.lock_path);
        coordinator_->on_promoted([this] { scheduler_.start(); });
        coordinator_->on_demoted([this] { scheduler_.stop(); });
        try {
          coordinator_->start();
        } catch (const workerlock::lock_error& error) {
          log_line(fmt::format("worker pid={}: {}", ::getpid(), error.what()));
          coordinator_.reset();
          return false;
        }
        break;
      case Mode::uncoordinated:
        scheduler_.start();
        break;
      case Mode::no_workerlock:
        break;
    }
    return true;
  }

  void install_routes() {
    server_.set_idle_interval(0, 100000);  // the accept loop looks at stop_accepting() every 100 ms
    server_.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(fmt::format("hello from pid {}\n", ::getpid()), "text/plain");
    });
    server_.Get("/status", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(status_json(), "application/json");
    });
    // While draining, tell keep-alive clients to reconnect (to another worker) after this
    // response, instead of closing under them.
    server_.set_post_routing_handler([this](const httplib::Request&, httplib::Response& res) {
      if (server_.stopping() && !res.has_header("Connection"))
        res.set_header("Connection", "close");
    });
    server_.set_exception_handler(
        [](const httplib::Request&, httplib::Response& res, std::exception_ptr error) {
          std::string what = "unknown exception";
          try {
            if (error) std::rethrow_exception(error);
          } catch (const std::exception& e) {
            what = e.what();
          } catch (...) {
          }
          res.status = 500;
          res.set_content(fmt::format("internal error: {}\n", what), "text/plain");
        });
  }

  std::string status_json() const {
    workerlock::Role role = workerlock::Role::secondary;
    std::string holder = "null";
    if (config_.mode == Mode::coordinated) {
      role = coordinator_->role();
    } else if (config_.mode == Mode::uncoordinated) {
      role = workerlock::Role::primary;  // every worker runs the singleton work
    }
    if (config_.mode != Mode::no_workerlock) {
      std::error_code ec;
      const auto found = workerlock::lock_holder(config_.lock_path, ec);
      if (found && found->pid && !ec) holder = std::to_string(*found->pid);
    }
    const auto uptime =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    return fmt::format(
        "{{\"pid\":{},\"role\":\"{}\",\"holder_pid\":{},\"ticks\":{},\"uptime_s\":{:.3f},"
        "\"mode\":\"{}\"}}\n",
        ::getpid(), role, holder, scheduler_.ticks(), uptime, to_string(config_.mode));
  }

  //! The signal thread: the only thread with SIGTERM/SIGINT pending-able (all block them).
  void wait_for_stop_signal() {
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    int received = 0;
    while (sigwait(&stop_signals, &received) != 0) {
    }
    if (!server_.stopping()) {
      log_line(fmt::format("worker pid={}: {}: finishing requests, leaving the election",
                           ::getpid(), received == SIGINT ? "SIGINT" : "SIGTERM"));
    }
    begin_stop();
  }

  //! Stops accepting and hands the singleton work to a standby at once; the main thread
  //! leaves the accept loop once the requests in flight are answered.
  void begin_stop() {
    server_.stop_accepting();
    if (coordinator_) coordinator_->stop();  // on_demoted (joins the scheduler), then release
    if (config_.mode == Mode::uncoordinated) scheduler_.stop();
  }

  const Config config_;
  const int listen_fd_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  SharedSocketServer server_;
  Scheduler scheduler_;                                   // outlives coordinator_, whose
  std::unique_ptr<workerlock::Coordinator> coordinator_;  // callbacks use it
};

//! The body of a freshly forked worker. Never returns into the master's code.
[[noreturn]] inline void run_worker(const Config& config, pid_t master, int listen_fd,
                                    int ready_fd) {
  // Leave when the master dies, even by SIGKILL: SIGTERM starts a graceful stop.
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() != master) ::_exit(0);
  int code = 1;
  try {
    Worker worker(config, listen_fd);
    code = worker.run(ready_fd);
  } catch (const std::exception& error) {
    log_line(fmt::format("worker pid={}: {}", ::getpid(), error.what()));
  }
  ::_exit(code);
}

}  // namespace prefork
