// examples/fencing_store/main.cpp: forked workers elect a primary through a Redis lease; right
// before each singleton write the primary checks its role and takes the fencing token, and the
// store refuses a token lower than the highest it has seen. So a primary that was paused past
// the end of its lease (GC, swapping, SIGSTOP) cannot overwrite the work of its successor.
//
//   workerlock_fencing_store [HOST:PORT]   (default: $FENCING_STORE_REDIS, else 127.0.0.1:6379)
// Exits 0 only if the stale write was refused and no two primaries' writes were accepted.
#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <workerlock/redis.hpp>
#include <workerlock/workerlock.hpp>

namespace {
using namespace std::chrono_literals;

//! The downstream store, here Redis again, standing in for a database: write() accepts a token
//! only if it is at least the highest seen, as `UPDATE ... WHERE fence <= $token` would.
class FencedStore {
 public:
  FencedStore(const std::string& host, int port, std::string prefix)
      : redis_(redisConnect(host.c_str(), port)), prefix_(std::move(prefix)) {
    if (redis_ == nullptr || redis_->err) throw std::runtime_error("cannot connect to " + host);
  }
  ~FencedStore() { redisFree(redis_); }
  FencedStore(const FencedStore&) = delete;
  FencedStore& operator=(const FencedStore&) = delete;

  //! Returns false when the store refused `token` as stale. Every attempt goes to the log.
  bool write(std::uint64_t token, const std::string& text) {
    const char* script =
        "local highest = tonumber(redis.call('GET', KEYS[1]) or '0') "
        "if tonumber(ARGV[1]) < highest then "
        "  redis.call('RPUSH', KEYS[2], 'refused ' .. ARGV[1] .. ' ' .. ARGV[2]) return 0 end "
        "redis.call('SET', KEYS[1], ARGV[1]) "
        "redis.call('RPUSH', KEYS[2], 'accepted ' .. ARGV[1] .. ' ' .. ARGV[2]) return 1";
    return run({"EVAL", script, "2", prefix_ + ":highest", prefix_ + ":log", std::to_string(token),
                text}) == "1";
  }
  //! Redis command helper: an integer, a string, or an array's elements one per line.
  std::string run(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<std::size_t> lengths;
    for (const auto& a : args) argv.push_back(a.c_str()), lengths.push_back(a.size());
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(redis_, static_cast<int>(args.size()), argv.data(), lengths.data()));
    if (r == nullptr || r->type == REDIS_REPLY_ERROR) {
      const std::string why = r != nullptr ? r->str : redis_->errstr;
      if (r != nullptr) freeReplyObject(r);
      throw std::runtime_error("Redis: " + why);
    }
    std::string text = r->type == REDIS_REPLY_INTEGER ? std::to_string(r->integer)
                       : r->str != nullptr            ? std::string(r->str, r->len)
                                                      : "";
    for (std::size_t i = 0; i < r->elements; ++i) text += std::string(r->element[i]->str) + "\n";
    freeReplyObject(r);
    return text;
  }

 private:
  redisContext* redis_;
  std::string prefix_;
};

volatile sig_atomic_t stop_requested = 0;

int worker(const std::string& host, int port, const std::string& prefix) try {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the master
  ::signal(SIGTERM, [](int) { stop_requested = 1; });
  workerlock::RedisOptions options;
  options.url = fmt::format("redis://{}:{}", host, port);
  options.key = prefix + ":lease";
  options.ttl = 1s;  // the same for every participant
  workerlock::Coordinator coordinator(std::make_unique<workerlock::RedisBackend>(options));
  coordinator.start();
  FencedStore store(host, port, prefix);
  while (stop_requested == 0) {
    std::this_thread::sleep_for(20ms);
    // Right before each singleton write: the role, then the token (0: the hold just ended).
    if (coordinator.role() != workerlock::Role::primary) continue;
    const std::uint64_t token = coordinator.fencing_token();
    if (token == 0) continue;
    // A pause can strike anywhere. Here the first primary stops itself once, and its lease
    // runs out while it is stopped: a successor takes over with a higher token.
    if (store.run({"SET", prefix + ":paused", std::to_string(token), "NX"}) == "OK")
      ::raise(SIGSTOP);
    if (!store.write(token, std::to_string(::getpid())))
      fmt::print("worker {}: the store refused my stale token {}\n", ::getpid(), token);
  }
  coordinator.stop();
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "worker {}: {}\n", ::getpid(), e.what());
  return 1;
}
}  // namespace

int main(int argc, char** argv) try {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, in order, from every process
  const char* env = std::getenv("FENCING_STORE_REDIS");
  const std::string address = argc > 1 ? argv[1] : env != nullptr ? env : "127.0.0.1:6379";
  const std::string host = address.substr(0, address.rfind(':'));
  const int port = std::atoi(address.substr(address.rfind(':') + 1).c_str());
  const std::string prefix = fmt::format("fencing-example:{}", ::getpid());
  std::vector<pid_t> workers;
  for (int i = 0; i < 3; ++i) {
    const pid_t pid = ::fork();
    if (pid < 0) throw std::system_error(errno, std::generic_category(), "fork");
    if (pid == 0) std::_Exit(worker(host, port, prefix));
    workers.push_back(pid);
  }
  ::alarm(90);  // a watchdog: a hang fails
  FencedStore store(host, port, prefix);
  int status = 0;
  const pid_t paused = ::waitpid(-1, &status, WUNTRACED);
  if (paused <= 0 || !WIFSTOPPED(status)) throw std::runtime_error("no primary paused itself");
  const auto number = [&](const char* key) {
    return std::strtoull(store.run({"GET", prefix + key}).c_str(), nullptr, 10);
  };
  const auto stale = number(":paused");
  fmt::print("master: primary {} paused holding token {}\n", paused, stale);
  while (number(":highest") <= stale) std::this_thread::sleep_for(10ms);  // a successor wrote
  ::kill(paused, SIGCONT);  // it resumes, still about to write with its old token
  const std::string late_write = fmt::format(" {} {}\n", stale, paused);  // refused, we hope
  while (store.run({"LRANGE", prefix + ":log", "0", "-1"}).find(late_write) == std::string::npos)
    std::this_thread::sleep_for(10ms);
  bool ok = true;
  for (const pid_t pid : workers) ::kill(pid, SIGTERM);
  for (const pid_t pid : workers) ok &= ::waitpid(pid, &status, 0) == pid && status == 0;
  std::istringstream log(store.run({"LRANGE", prefix + ":log", "0", "-1"}));
  std::map<std::uint64_t, std::string> writer;  // every accepted token has one writer
  std::string verdict, who;
  std::uint64_t token = 0, highest = 0;
  while (log >> verdict >> token >> who) {
    if (verdict != "accepted") continue;
    ok &= token >= highest && writer.emplace(token, who).first->second == who;
    highest = std::max(highest, token);
  }
  ok &= !writer.empty() && writer.count(stale) == 0 && highest > stale;
  store.run({"DEL", prefix + ":lease", prefix + ":lease:fence", prefix + ":highest",
             prefix + ":log", prefix + ":paused"});
  fmt::print("master: writes in token order, one writer per token, stale token refused: {}\n",
             ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "master: {}\n", e.what());
  return 1;
}
