// examples/06_fencing_store: the primary passes its fencing token with each write, and the store
// refuses a token lower than the highest it has seen: a primary paused past its lease is stopped.
//
//   workerlock_06_fencing_store [HOST:PORT]   (a Redis server; default 127.0.0.1:6379)
// Three workers elect a primary on a Redis lease; the first one pauses itself (SIGSTOP) and wakes
// after a successor took over. Exits 0 only if its stale write was refused.
#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <workerlock/redis.hpp>
#include <workerlock/workerlock.hpp>

namespace {
using namespace std::chrono_literals;
using Connection = std::unique_ptr<redisContext, void (*)(redisContext*)>;
const pid_t master = ::getpid();
std::string key(const char* name) { return fmt::format("fencing-example:{}:{}", master, name); }

// A Redis command: its integer reply as text, or its string reply ("" for nil).
std::string run(const Connection& redis, const std::vector<std::string>& args) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lengths;
  for (const auto& arg : args) argv.push_back(arg.c_str()), lengths.push_back(arg.size());
  auto* reply = static_cast<redisReply*>(
      redisCommandArgv(redis.get(), static_cast<int>(args.size()), argv.data(), lengths.data()));
  if (reply == nullptr || reply->type == REDIS_REPLY_ERROR) throw std::runtime_error("Redis");
  std::string text = reply->type == REDIS_REPLY_INTEGER ? std::to_string(reply->integer)
                                                        : std::string(reply->str ? reply->str : "");
  freeReplyObject(reply);
  return text;
}

// The downstream store (Redis again, standing in for a database): a write is accepted only with
// a token at least the highest seen, as `UPDATE ... WHERE fence <= $token` would do. It keeps
// the sets of tokens it accepted and refused, for the master to check.
bool fenced_write(const Connection& redis, std::uint64_t token) {
  const char* script =
      "if tonumber(ARGV[1]) < tonumber(redis.call('GET', KEYS[1]) or '0') then "
      "  redis.call('SADD', KEYS[3], ARGV[1]) return 0 end "
      "redis.call('SET', KEYS[1], ARGV[1]) redis.call('SADD', KEYS[2], ARGV[1]) return 1";
  return run(redis, {"EVAL", script, "3", key("highest"), key("accepted"), key("refused"),
                     std::to_string(token)}) == "1";
}

int worker(const std::string& host, int port) try {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the master
  workerlock::RedisOptions options;
  options.url = fmt::format("redis://{}:{}", host, port);
  options.key = key("lease");
  options.ttl = 1s;  // the same for every participant
  workerlock::Coordinator coordinator(std::make_unique<workerlock::RedisBackend>(options));
  coordinator.start();
  const Connection store(redisConnect(host.c_str(), port), &redisFree);
  for (;; std::this_thread::sleep_for(20ms)) {  // until the master's SIGKILL
    // Right before each write: the role, then the token (0: the hold just ended).
    const std::uint64_t token = coordinator.fencing_token();
    if (coordinator.role() != workerlock::Role::primary || token == 0) continue;
    // A pause can strike anywhere; here the first primary stops itself right before writing.
    if (run(store, {"SET", key("paused"), std::to_string(token), "NX"}) == "OK") ::raise(SIGSTOP);
    if (!fenced_write(store, token))
      fmt::print("worker {}: the store refused my stale token {}\n", ::getpid(), token);
  }
} catch (const std::exception& error) {
  fmt::print(stderr, "worker {}: {}\n", ::getpid(), error.what());
  return 1;
}
}  // namespace

int main(int argc, char** argv) try {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string address = argc > 1 ? argv[1] : "127.0.0.1:6379";
  const std::string host = address.substr(0, address.rfind(':'));
  const int port = std::atoi(address.substr(address.rfind(':') + 1).c_str());
  std::vector<pid_t> workers;
  for (int i = 0; i < 3; ++i) {
    workers.push_back(::fork());
    if (workers.back() == 0) std::_Exit(worker(host, port));
  }
  ::alarm(90);  // a watchdog: a hang fails
  const Connection store(redisConnect(host.c_str(), port), &redisFree);
  int status = 0;
  const pid_t paused = ::waitpid(-1, &status, WUNTRACED);
  if (paused <= 0 || !WIFSTOPPED(status)) throw std::runtime_error("no primary paused itself");
  const std::string stale = run(store, {"GET", key("paused")});
  fmt::print("master: primary {} paused holding token {}\n", paused, stale);
  while (std::stoull("0" + run(store, {"GET", key("highest")})) <= std::stoull(stale))
    std::this_thread::sleep_for(10ms);
  ::kill(paused, SIGCONT);  // it wakes, still about to write with its old token
  while (run(store, {"SISMEMBER", key("refused"), stale}) != "1") std::this_thread::sleep_for(10ms);
  for (const pid_t pid : workers) ::kill(pid, SIGKILL), ::waitpid(pid, &status, 0);
  // The stale token was refused, and no write ever went through with it.
  const bool ok = run(store, {"SISMEMBER", key("accepted"), stale}) == "0";
  fmt::print("master: stale token refused, never accepted: {}\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& error) {
  fmt::print(stderr, "master: {}\n", error.what());
  return 1;
}
