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
const pid_t master = ::getpid();
std::string key(const char* name) { return fmt::format("fencing-example:{}:{}", master, name); }

// A connection; run() reports a failed one.
std::unique_ptr<redisContext, void (*)(redisContext*)> connect(const std::string& host, int port) {
  return {redisConnect(host.c_str(), port), &redisFree};
}

// A Redis command: its integer or string reply, or an array's elements one per line.
std::string run(redisContext* redis, const std::vector<std::string>& args) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lengths;
  for (const auto& arg : args) argv.push_back(arg.c_str()), lengths.push_back(arg.size());
  auto* reply = static_cast<redisReply*>(
      redisCommandArgv(redis, static_cast<int>(args.size()), argv.data(), lengths.data()));
  if (reply == nullptr || reply->type == REDIS_REPLY_ERROR) throw std::runtime_error("Redis");
  std::string text = reply->type == REDIS_REPLY_INTEGER ? std::to_string(reply->integer)
                                                        : std::string(reply->str ? reply->str : "");
  for (std::size_t i = 0; i < reply->elements; ++i)
    text += reply->element[i]->str + std::string("\n");
  freeReplyObject(reply);
  return text;
}

// The downstream store (Redis again, standing in for a database): a write is accepted only with
// a token at least the highest seen, as `UPDATE ... WHERE fence <= $token` would do.
bool fenced_write(redisContext* redis, std::uint64_t token, const std::string& text) {
  const char* script =
      "if tonumber(ARGV[1]) < tonumber(redis.call('GET', KEYS[1]) or '0') then "
      "  redis.call('RPUSH', KEYS[2], 'refused ' .. ARGV[1] .. ' ' .. ARGV[2]) return 0 end "
      "redis.call('SET', KEYS[1], ARGV[1]) "
      "redis.call('RPUSH', KEYS[2], 'accepted ' .. ARGV[1] .. ' ' .. ARGV[2]) return 1";
  return run(redis,
             {"EVAL", script, "2", key("highest"), key("log"), std::to_string(token), text}) == "1";
}

int worker(const std::string& host, int port) try {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the master
  workerlock::RedisOptions options;
  options.url = fmt::format("redis://{}:{}", host, port);
  options.key = key("lease");
  options.ttl = 1s;  // the same for every participant
  workerlock::Coordinator coordinator(std::make_unique<workerlock::RedisBackend>(options));
  coordinator.start();
  const auto store = connect(host, port);
  for (;; std::this_thread::sleep_for(20ms)) {  // until the master's SIGKILL
    // Right before each write: the role, then the token (0: the hold just ended).
    const std::uint64_t token = coordinator.fencing_token();
    if (coordinator.role() != workerlock::Role::primary || token == 0) continue;
    // A pause can strike anywhere; here the first primary stops itself right before writing.
    if (run(store.get(), {"SET", key("paused"), std::to_string(token), "NX"}) == "OK")
      ::raise(SIGSTOP);
    if (!fenced_write(store.get(), token, std::to_string(::getpid())))
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
  const auto store = connect(host, port);
  int status = 0;
  const pid_t paused = ::waitpid(-1, &status, WUNTRACED);
  if (paused <= 0 || !WIFSTOPPED(status)) throw std::runtime_error("no primary paused itself");
  const auto stale = std::stoull(run(store.get(), {"GET", key("paused")}));
  fmt::print("master: primary {} paused holding token {}\n", paused, stale);
  while (std::stoull("0" + run(store.get(), {"GET", key("highest")})) <= stale)
    std::this_thread::sleep_for(10ms);
  ::kill(paused, SIGCONT);  // it wakes, still about to write with its old token
  const std::string refused = fmt::format("refused {} {}\n", stale, paused);
  while (run(store.get(), {"LRANGE", key("log"), "0", "-1"}).find(refused) == std::string::npos)
    std::this_thread::sleep_for(10ms);
  for (const pid_t pid : workers) ::kill(pid, SIGKILL), ::waitpid(pid, &status, 0);
  // The stale token was refused, and no write ever went through with it.
  const std::string log = run(store.get(), {"LRANGE", key("log"), "0", "-1"});
  const bool ok = log.find(fmt::format("accepted {} ", stale)) == std::string::npos;
  fmt::print("master: stale token refused, never accepted: {}\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& error) {
  fmt::print(stderr, "master: {}\n", error.what());
  return 1;
}
