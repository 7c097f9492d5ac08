// examples/basic/main.cpp: a master forks N workers; each worker's init hook asks
// workerlock whether it is the primary. Exactly one prints PRIMARY.
//
//   workerlock_basic --workers 4 --lock /tmp/demo.lock
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <workerlock/workerlock.hpp>

namespace {

// The init hook every worker runs after fork(): the only place that asks for the role.
int worker_main(const std::string& lock_path, int ready_fd, int go_fd) {
  auto [role, lock] = workerlock::is_primary_worker(lock_path);
  if (role == workerlock::Role::primary) {
    fmt::print("worker pid={}: PRIMARY   - starting the scheduler and the report mailer\n",
               ::getpid());
  } else {
    fmt::print("worker pid={}: SECONDARY - serving requests only\n", ::getpid());
  }
  std::fflush(stdout);
  // Tell the master we are up, then stay alive (holding `lock`) until it says stop.
  const char up = 1;
  [[maybe_unused]] auto written = ::write(ready_fd, &up, 1);
  char ignored = 0;
  [[maybe_unused]] auto got = ::read(go_fd, &ignored, 1);  // returns 0 when the master closes it
  return 0;
}

int usage(const char* program, int code) {
  fmt::print(code == 0 ? stdout : stderr, "usage: {} [--workers N] [--lock PATH]\n", program);
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  int workers = 4;
  std::string lock_path;  // empty: workerlock::default_lock_path()
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--workers" && i + 1 < argc) {
      workers = std::atoi(argv[++i]);
    } else if (arg == "--lock" && i + 1 < argc) {
      lock_path = argv[++i];
    } else if (arg == "--help" || arg == "-h") {
      return usage(argv[0], 0);
    } else {
      return usage(argv[0], 2);
    }
  }
  if (workers < 1 || workers > 1024) return usage(argv[0], 2);
  if (lock_path.empty()) {
    try {
      lock_path = workerlock::default_lock_path();  // refuses a bad $WORKERLOCK_PATH
    } catch (const workerlock::lock_error& error) {
      fmt::print(stderr, "{}\n", error.what());
      return 2;
    }
  }

  fmt::print("master pid={}: forking {} workers, lock file {}\n", ::getpid(), workers, lock_path);
  std::fflush(stdout);
  int ready[2];
  int go[2];
  if (::pipe(ready) != 0 || ::pipe(go) != 0) return 1;

  std::vector<pid_t> children;
  for (int i = 0; i < workers; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(ready[0]);
      ::close(go[1]);
      try {
        ::_exit(worker_main(lock_path, ready[1], go[0]));
      } catch (const std::exception& error) {
        fmt::print(stderr, "worker pid={}: {}\n", ::getpid(), error.what());
        ::_exit(1);
      }
    }
    if (pid > 0) children.push_back(pid);
  }
  ::close(ready[1]);
  ::close(go[0]);

  // Wait until every worker has reported its role, then let them all exit.
  char byte = 0;
  int up = 0;
  while (up < static_cast<int>(children.size()) && ::read(ready[0], &byte, 1) == 1) ++up;
  ::close(go[1]);

  int failed = 0;
  for (const pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failed;
  }
  return failed == 0 && static_cast<int>(children.size()) == workers ? 0 : 1;
}
