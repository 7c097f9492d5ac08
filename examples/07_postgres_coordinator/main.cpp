// examples/07_postgres_coordinator: a Coordinator on a PostgreSQL session advisory lock
// (PostgresBackend): when the primary dies, the server ends its session and frees the lock.
//
//   workerlock_07_postgres_coordinator CONNINFO   (such as "host=db user=app dbname=app")
// Run one in every worker, on any host sharing the server; SIGTERM or SIGINT stops one.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <memory>

#include <fmt/format.h>
#include <workerlock/postgres.hpp>
#include <workerlock/workerlock.hpp>

int main(int argc, char** argv) try {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc != 2) {
    fmt::print(stderr, "usage: {} CONNINFO\n", argv[0]);
    return 2;
  }
  sigset_t stop_signals;  // taken by sigwait() below
  ::sigemptyset(&stop_signals);
  ::sigaddset(&stop_signals, SIGTERM);
  ::sigaddset(&stop_signals, SIGINT);
  ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  workerlock::PostgresOptions postgres;
  postgres.conninfo = argv[1];          // a libpq connection string or postgresql:// URL
  postgres.name = "example-scheduler";  // the lock: the same name in every participant
  workerlock::Coordinator coordinator(std::make_unique<workerlock::PostgresBackend>(postgres));
  coordinator
      .on_promoted([&coordinator] {
        fmt::print("pid {}: promoted, fencing token {}\n", ::getpid(), coordinator.fencing_token());
      })
      .on_demoted([] { fmt::print("pid {}: demoted\n", ::getpid()); });
  // Throws if the options are bad; an unreachable server is retried. Just after the server
  // started, nobody is promoted for a moment (PostgresOptions::restart_grace).
  coordinator.start();
  fmt::print("pid {}: started as {}\n", ::getpid(), coordinator.role());
  int signal = 0;
  ::sigwait(&stop_signals, &signal);  // a real worker serves requests meanwhile
  coordinator.stop();  // a primary runs on_demoted, then unlocks: a standby takes over at once
  fmt::print("pid {}: stopped\n", ::getpid());
  return 0;
} catch (const std::exception& error) {
  fmt::print(stderr, "{}\n", error.what());
  return 1;
}
