// examples/01_is_primary_worker: a master forks N workers and each worker's init hook calls
// workerlock::is_primary_worker() once: exactly one of them prints PRIMARY.
//
//   workerlock_01_is_primary_worker [--workers N] [--lock PATH]
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <workerlock/workerlock.hpp>

namespace {

// The init hook every worker runs after fork(): the only place that asks for the role.
int worker_main(const std::string& lock_path, int ready_fd, int go_fd) {
  // Keep both: `lock` holds the election for as long as it lives. (Reading the role of the
  // temporary, `is_primary_worker(path).role == Role::primary`, does not compile.)
  auto [role, lock] = workerlock::is_primary_worker(lock_path);
  if (role == workerlock::Role::primary) {
    fmt::print("worker pid={}: PRIMARY   - starting the scheduler and the report mailer\n",
               ::getpid());
  } else {
    fmt::print("worker pid={}: SECONDARY - serving requests only\n", ::getpid());
  }
  std::fflush(stdout);
  // Tell the master this worker is up, then serve (here: wait) until the master says stop.
  const char up = 1;
  [[maybe_unused]] auto written = ::write(ready_fd, &up, 1);
  char ignored = 0;
  [[maybe_unused]] auto got = ::read(go_fd, &ignored, 1);  // 0 once the master closes it
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int workers = 4;
  std::string lock_path;  // empty: workerlock::default_lock_path()
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--workers") {
      workers = std::atoi(argv[i + 1]);
    } else if (flag == "--lock") {
      lock_path = argv[i + 1];
    } else {
      workers = 0;  // an unknown flag: print the usage
    }
  }
  if (workers < 1 || workers > 1024 || argc % 2 == 0) {
    fmt::print(stderr, "usage: {} [--workers 1..1024] [--lock PATH]\n", argv[0]);
    return 2;
  }
  try {
    if (lock_path.empty()) lock_path = workerlock::default_lock_path();  // checks $WORKERLOCK_PATH
  } catch (const workerlock::lock_error& error) {
    fmt::print(stderr, "{}\n", error.what());
    return 2;
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
      } catch (const std::exception& error) {  // such as a lock file that cannot be opened
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
  std::size_t up = 0;
  while (up < children.size() && ::read(ready[0], &byte, 1) == 1) ++up;
  ::close(go[1]);
  int failed = 0;
  for (const pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failed;
  }
  return failed == 0 && static_cast<int>(children.size()) == workers ? 0 : 1;
}
