// examples/02_coordinator: each worker runs a workerlock::Coordinator on its background thread:
// on_promoted and on_demoted start and stop the singleton work, and SIGTERM stops the worker.
//
//   workerlock_02_coordinator [LOCK_PATH]
// The master forks 2 workers, then sends SIGTERM to the primary (the standby is promoted at
// once), then to the new primary.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <workerlock/workerlock.hpp>

namespace {

workerlock::Coordinator* coordinator_to_stop = nullptr;  // for the SIGTERM handler

// A worker's life: `promotions` tells the master who was promoted (for this example only).
int worker(const std::string& lock_path, int promotions) {
  workerlock::Coordinator coordinator(lock_path);
  // The callbacks run on the coordinator's thread, one at a time. on_demoted runs before the
  // lock is released, so the next primary's work never overlaps with this one's.
  coordinator
      .on_promoted([promotions] {
        fmt::print("worker {}: promoted: starting the scheduler\n", ::getpid());
        const pid_t self = ::getpid();
        [[maybe_unused]] auto written = ::write(promotions, &self, sizeof self);
      })
      .on_demoted([] { fmt::print("worker {}: demoted: scheduler stopped\n", ::getpid()); });
  coordinator_to_stop = &coordinator;
  // request_stop() is async-signal-safe: the coordinator thread then runs on_demoted and lets go.
  ::signal(SIGTERM, [](int) { coordinator_to_stop->request_stop(); });
  coordinator.start();  // returns at once: primary now, or a standby waiting on its thread
  fmt::print("worker {}: started as {}\n", ::getpid(), coordinator.role());
  while (coordinator.running()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a real worker serves here
  }
  coordinator.stop();          // joins the thread
  ::signal(SIGTERM, SIG_DFL);  // the handler must not outlive `coordinator`
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // whole lines, from every process
  const std::string lock_path = argc > 1 ? argv[1] : "/tmp/workerlock-example-02.lock";
  int promotions[2];
  if (::pipe(promotions) != 0) return 1;
  std::vector<pid_t> workers;
  for (int i = 0; i < 2; ++i) {
    const pid_t pid = ::fork();
    if (pid < 0) return 1;
    if (pid == 0) {
      ::close(promotions[0]);
      try {
        ::_exit(worker(lock_path, promotions[1]));
      } catch (const std::exception& error) {  // such as a lock file that cannot be opened
        fmt::print(stderr, "worker {}: {}\n", ::getpid(), error.what());
        ::_exit(1);
      }
    }
    workers.push_back(pid);
  }
  ::close(promotions[1]);
  ::alarm(100);  // a watchdog: a hang fails
  for (int round = 0; round < 2; ++round) {
    pid_t primary = 0;
    if (::read(promotions[0], &primary, sizeof primary) != sizeof primary) return 1;
    fmt::print("master: SIGTERM to the primary, worker {}\n", primary);
    ::kill(primary, SIGTERM);
  }
  int failed = 0;
  for (const pid_t pid : workers) {
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
      ++failed;
  }
  return failed == 0 ? 0 : 1;
}
