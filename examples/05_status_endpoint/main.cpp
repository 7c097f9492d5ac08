// examples/05_status_endpoint: an HTTP status endpoint (cpp-httplib) that answers who holds
// the lock with workerlock::lock_holder(), which only looks: it never locks nor writes.
//
//   workerlock_05_status_endpoint [LOCK_PATH]   then: curl http://127.0.0.1:PORT/primary
// A forked worker is elected primary, so there is someone to name; SIGTERM stops the server.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <string>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <workerlock/workerlock.hpp>

namespace {

// GET /primary: 200 {"pid":N,...}, 404 when nobody holds the lock, 500 if it cannot be read.
void answer_who_holds(const std::string& lock_path, httplib::Response& response) {
  std::error_code error;
  const auto holder = workerlock::lock_holder(lock_path, error);  // reads /proc/locks: not cheap
  if (error) {
    response.status = 500;
    response.set_content(fmt::format("{{\"error\":\"{}\"}}\n", error.message()),
                         "application/json");
  } else if (!holder) {
    response.status = 404;
    response.set_content("{\"pid\":null}\n", "application/json");
  } else {
    // pid is empty for a holder this pid namespace cannot name (pid_unknown says why).
    const std::string pid = holder->pid ? std::to_string(*holder->pid) : "null";
    response.set_content(fmt::format("{{\"pid\":{},\"mechanism\":\"{}\",\"why_no_pid\":\"{}\"}}\n",
                                     pid, workerlock::to_string(holder->mechanism),
                                     workerlock::to_string(holder->pid_unknown)),
                         "application/json");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string lock_path = argc > 1 ? argv[1] : "/tmp/workerlock-example-05.lock";
  sigset_t stop_signals;  // blocked in every thread: sigwait() below takes them
  ::sigemptyset(&stop_signals);
  ::sigaddset(&stop_signals, SIGTERM);
  ::sigaddset(&stop_signals, SIGINT);
  ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  int stay[2];  // the worker holds the lock until the server closes its end
  if (::pipe(stay) != 0) return 1;
  const pid_t worker = ::fork();
  if (worker == 0) {
    ::close(stay[1]);
    try {
      auto [role, lock] = workerlock::is_primary_worker(lock_path);
      fmt::print("worker {} is {}\n", ::getpid(), role);
      char byte = 0;
      ::_exit(::read(stay[0], &byte, 1) == 0 && role == workerlock::Role::primary ? 0 : 1);
    } catch (const std::exception& error) {  // such as a lock file that cannot be opened
      fmt::print(stderr, "worker {}: {}\n", ::getpid(), error.what());
      ::_exit(1);
    }
  }
  ::close(stay[0]);

  httplib::Server server;
  server.Get("/primary", [&](const httplib::Request&, httplib::Response& response) {
    answer_who_holds(lock_path, response);
  });
  const int port = server.bind_to_any_port("127.0.0.1");
  if (worker < 0 || port < 0) return 1;
  fmt::print("listening on http://127.0.0.1:{}/primary\n", port);
  std::thread http([&] { server.listen_after_bind(); });
  int signal = 0;
  ::sigwait(&stop_signals, &signal);
  server.stop();
  http.join();
  ::close(stay[1]);
  int status = 0;
  const bool worker_ok = ::waitpid(worker, &status, 0) == worker && status == 0;
  fmt::print("stopped\n");
  return worker_ok ? 0 : 1;
}
