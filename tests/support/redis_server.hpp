// tests/support/redis_server.hpp: a throwaway redis-server for tests and the Redis benchmark. It
// listens on 127.0.0.1 on a free port, keeps its files in a fresh temporary directory, never
// persists anything (--save '' --appendonly no), and is stopped by the destructor, or by
// the kernel when the thread that started it dies (PR_SET_PDEATHSIG), so a test killed by a
// timeout or SIGPIPE leaves no server behind (its temporary directory does stay).
// Needs hiredis (for PING and the test commands); does not need Catch2.
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <hiredis/hiredis.h>

#include "servers.hpp"

extern char** environ;

namespace wltest {

class RedisServer {
 public:
  struct Config {
    std::string password;            // --requirepass when not empty
    std::vector<std::string> extra;  // more redis-server arguments
  };

  //! The redis-server binary: $WORKERLOCK_REDIS_SERVER, else /usr/bin/redis-server, else
  //! /usr/local/bin/redis-server; empty when none is executable.
  static std::string binary() {
    if (const char* env = std::getenv("WORKERLOCK_REDIS_SERVER"); env != nullptr && *env != 0)
      return ::access(env, X_OK) == 0 ? std::string(env) : std::string();
    for (const char* candidate : {"/usr/bin/redis-server", "/usr/local/bin/redis-server"})
      if (::access(candidate, X_OK) == 0) return candidate;
    return {};
  }

  static bool available() { return !binary().empty(); }

  //! "redis-server not found ..." for a SKIP message.
  static std::string missing_reason() {
    return "redis-server not found (looked at $WORKERLOCK_REDIS_SERVER, /usr/bin/redis-server, "
           "/usr/local/bin/redis-server): Redis tests skipped; apt-get install redis-server";
  }

  //! The major version of the binary (7 for 7.0.15), 0 if unknown.
  static int major_version() {
    static const int version = [] {
      const std::string command = binary() + " --version 2>/dev/null";
      std::FILE* pipe = ::popen(command.c_str(), "r");
      if (pipe == nullptr) return 0;
      char buffer[256] = {};
      const auto n = std::fread(buffer, 1, sizeof buffer - 1, pipe);
      ::pclose(pipe);
      const std::string text(buffer, n);
      const auto v = text.find("v=");
      return v == std::string::npos ? 0 : std::atoi(text.c_str() + v + 2);
    }();
    return version;
  }

  //! Starts the server on a free port; throws std::runtime_error on failure.
  explicit RedisServer(Config config = {}) : config_(std::move(config)) {
    char pattern[] = "/tmp/workerlock-redis-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
    std::string last_error;
    if (start_on_a_free_port(20, port_, last_error,
                             [this](std::string& error) { return launch(error); }))
      return;
    cleanup_dir();
    throw std::runtime_error("cannot start redis-server: " + last_error);
  }

  ~RedisServer() {
    stop();
    cleanup_dir();
  }

  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }
  const std::filesystem::path& dir() const { return dir_; }

  //! redis://[:password@]127.0.0.1:port/db
  std::string url(int db = 0) const {
    return config_.password.empty()
               ? fmt::format("redis://127.0.0.1:{}/{}", port_, db)
               : fmt::format("redis://:{}@127.0.0.1:{}/{}", config_.password, port_, db);
  }

  //! Stops the server with `sig` (SIGTERM: a clean shutdown, nothing saved; SIGKILL: a
  //! crash) and reaps it. Data is lost either way.
  void stop(int sig = SIGTERM) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

  //! Starts it again on the same port (after stop()); throws on failure.
  void restart() {
    stop();
    std::string error;
    for (int attempt = 0; attempt < 50; ++attempt) {  // the port may linger briefly
      if (launch(error)) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    throw std::runtime_error("cannot restart redis-server on port " + std::to_string(port_) + ": " +
                             error);
  }

  //! Runs one command on a fresh connection; returns the reply as text ("(nil)", "OK", the
  //! number, "ERR ..." for errors). Throws if the server cannot be reached.
  std::string command(std::initializer_list<std::string> args,
                      std::chrono::milliseconds timeout = std::chrono::seconds(5)) const {
    struct timeval tv {};
    tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
    tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
    std::unique_ptr<redisContext, void (*)(redisContext*)> c(
        redisConnectWithTimeout("127.0.0.1", port_, tv), &redisFree);
    if (!c || c->err) throw std::runtime_error("connect to redis failed");
    redisSetTimeout(c.get(), tv);
    if (!config_.password.empty()) {
      auto* auth =
          static_cast<redisReply*>(redisCommand(c.get(), "AUTH %s", config_.password.c_str()));
      if (auth != nullptr) freeReplyObject(auth);
    }
    std::vector<const char*> argv;
    std::vector<std::size_t> lengths;
    for (const auto& a : args) {
      argv.push_back(a.c_str());
      lengths.push_back(a.size());
    }
    auto* reply = static_cast<redisReply*>(
        redisCommandArgv(c.get(), static_cast<int>(argv.size()), argv.data(), lengths.data()));
    if (reply == nullptr)
      throw std::runtime_error(std::string("redis command failed: ") + c->errstr);
    std::string text;
    switch (reply->type) {
      case REDIS_REPLY_INTEGER:
        text = std::to_string(reply->integer);
        break;
      case REDIS_REPLY_NIL:
        text = "(nil)";
        break;
      case REDIS_REPLY_ARRAY:
        text = fmt::format("(array of {})", reply->elements);
        break;
      default:
        text.assign(reply->str, reply->len);
        break;
    }
    freeReplyObject(reply);
    return text;
  }

  bool ping() const {
    try {
      return command({"PING"}, std::chrono::milliseconds(200)) == "PONG";
    } catch (const std::exception&) {
      return false;
    }
  }

 private:
  bool launch(std::string& error) {
    const std::string bin = binary();
    if (bin.empty()) {
      error = missing_reason();
      return false;
    }
    std::vector<std::string> args = {bin,
                                     "--port",
                                     std::to_string(port_),
                                     "--bind",
                                     "127.0.0.1",
                                     "--dir",
                                     dir_.native(),
                                     "--save",
                                     "",
                                     "--appendonly",
                                     "no",
                                     "--daemonize",
                                     "no",
                                     "--logfile",
                                     (dir_ / "redis.log").native(),
                                     "--loglevel",
                                     "warning"};
    if (major_version() >= 7) args.insert(args.end(), {"--enable-debug-command", "yes"});
    if (!config_.password.empty()) args.insert(args.end(), {"--requirepass", config_.password});
    args.insert(args.end(), config_.extra.begin(), config_.extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      error = fmt::format("fork: {}", std::strerror(errno));
      return false;
    }
    if (pid == 0) {  // only async-signal-safe calls until exec
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::execve(bin.c_str(), argv.data(), environ);
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {  // exited: port taken, bad option...
        error = fmt::format("redis-server exited at startup (port {}); see its log {}", port_,
                            (dir_ / "redis.log").native());
        return false;
      }
      pid_ = pid;
      if (ping_unauthenticated()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    pid_ = -1;
    error = "redis-server did not answer PING within 10 s";
    return false;
  }

  //! PING answered, possibly with NOAUTH when a password is required: the server is up.
  bool ping_unauthenticated() const {
    struct timeval tv {
      0, 200000
    };
    std::unique_ptr<redisContext, void (*)(redisContext*)> c(
        redisConnectWithTimeout("127.0.0.1", port_, tv), &redisFree);
    if (!c || c->err) return false;
    redisSetTimeout(c.get(), tv);
    auto* reply = static_cast<redisReply*>(redisCommand(c.get(), "PING"));
    if (reply == nullptr) return false;
    const bool up =
        reply->type == REDIS_REPLY_STATUS ||
        (reply->type == REDIS_REPLY_ERROR && std::strncmp(reply->str, "NOAUTH", 6) == 0);
    freeReplyObject(reply);
    return up;
  }

  void cleanup_dir() {
    std::error_code ignored;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ignored);
  }

  Config config_;
  std::filesystem::path dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace wltest
