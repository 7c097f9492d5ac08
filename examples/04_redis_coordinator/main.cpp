// examples/04_redis_coordinator: a Coordinator on a Redis lease (RedisBackend): the primary
// checks the lease's remaining validity before each singleton write and passes its fencing token.
//
//   workerlock_04_redis_coordinator [HOST:PORT]   (default 127.0.0.1:6379)
// Every worker of every host runs this with the same key and ttl; one of them is the primary.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <thread>

#include <fmt/format.h>
#include <workerlock/redis.hpp>
#include <workerlock/workerlock.hpp>

int main(int argc, char** argv) try {
  using namespace std::chrono_literals;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  workerlock::RedisOptions redis;
  redis.url = fmt::format("redis://{}", argc > 1 ? argv[1] : "127.0.0.1:6379");
  redis.key = "workerlock-example:primary";
  redis.ttl = 2s;  // the lease: renewed while this process lives, the same for every participant
  workerlock::Coordinator coordinator(std::make_unique<workerlock::RedisBackend>(redis));
  coordinator.on_promoted([] { fmt::print("pid {}: promoted\n", ::getpid()); }).on_demoted([] {
    fmt::print("pid {}: demoted\n", ::getpid());
  });
  // start() throws if the options are bad; an unreachable server is retried. A brand-new key
  // (or a server that lost its data) promotes nobody for one ttl: a standby at first.
  coordinator.start();

  // Six writes over 3 s, longer than the ttl: the lease is renewed behind our back.
  for (int write = 1; write <= 6; std::this_thread::sleep_for(500ms)) {
    // Right before each write: is there enough lease left for it? A paused process (SIGSTOP, a
    // stalled VM) may wake after its lease ran out; it then reads no validity left at all.
    const auto left = coordinator.remaining_validity();
    if (left < 200ms) {
      fmt::print("pid {}: not the primary now, the write waits\n", ::getpid());
      continue;
    }
    // The store should refuse a token lower than the highest it has seen (see 06_fencing_store).
    fmt::print("pid {}: write {} with fencing token {} ({} ms of lease left)\n", ::getpid(),
               write++, coordinator.fencing_token(),
               std::chrono::duration_cast<std::chrono::milliseconds>(left).count());
  }
  coordinator.stop();  // runs on_demoted, then gives the lease up: a standby takes over at once
  return 0;
} catch (const std::exception& error) {
  fmt::print(stderr, "{}\n", error.what());
  return 1;
}
