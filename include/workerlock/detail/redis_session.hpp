// workerlock/detail/redis_session.hpp: the session of one Redis lease: connects and sets up
// the connection, runs the lease's scripts, and says what a failure means as a lock_error.
//
// Setup is one round trip after the TCP handshake: AUTH (when there is a password), SELECT
// (a database other than 0), CLIENT SETNAME workerlock:<pid>, and SCRIPT LOAD of the three
// scripts. A script then runs as EVALSHA, or as EVAL after NOSCRIPT (SCRIPT FLUSH) or when
// SCRIPT LOAD was refused (an ACL). An authentication error closes the connection.
#pragma once

#include <cerrno>
#include <chrono>
#include <string>
#include <string_view>
#include <system_error>

#include <fmt/format.h>
#include <hiredis/hiredis.h>

#include "../error.hpp"
#include "../interrupter.hpp"
#include "redis_connection.hpp"
#include "redis_lease.hpp"
#include "redis_url.hpp"

namespace workerlock::detail {

enum class redis_script { acquire, renew, release };

//! What the scripts run on: KEYS[1] = key, KEYS[2] = fence_key; ARGV = token, ttl, and for
//! acquire the token of a holder proven dead (or "") and "1" to quarantine after data loss.
struct redis_script_args {
  std::string_view key;
  std::string_view fence_key;
  std::string_view token;
  std::string_view ttl;
  std::string_view steal;
  bool quarantine = true;
};

inline bool is_redis_auth_error(const redisReply* reply) {
  const std::string_view text(reply->str, reply->len);
  return text.substr(0, 6) == "NOAUTH" || text.substr(0, 9) == "WRONGPASS" ||
         text.substr(0, 6) == "NOPERM";
}

//! What a reply says, for the backend: an error reply, an integer, or the acquire script's
//! refusal {pttl, holder's token}.
struct redis_answer {
  bool error = false;
  bool has_integer = false;
  long long integer = 0;
  bool refused = false;
  long long pttl = -1;
  std::string holder;
};

inline redis_answer read_answer(const redis_reply& reply) {
  redis_answer answer;
  answer.error = reply->type == REDIS_REPLY_ERROR;
  answer.has_integer = reply->type == REDIS_REPLY_INTEGER;
  if (answer.has_integer) answer.integer = reply->integer;
  if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
      reply->element[0]->type == REDIS_REPLY_INTEGER) {
    answer.refused = true;
    answer.pttl = reply->element[0]->integer;
    const redisReply* holder = reply->element[1];
    if (holder->type == REDIS_REPLY_STRING) answer.holder.assign(holder->str, holder->len);
  }
  return answer;
}

//! One lease's connection and its loaded scripts. Driven by one thread at a time.
class redis_session {
 public:
  //! Where to connect, and the deadline of a connect (the TCP handshake only).
  void configure(const redis_url& url, std::chrono::milliseconds connect_timeout) {
    url_ = url;
    connect_timeout_ = connect_timeout;
  }

  bool is_open() const noexcept { return connection_.is_open(); }
  void close() noexcept { connection_.close(); }

  //! Runs `which`, connecting first if needed, by `deadline`; with an `interrupter`, its
  //! interrupt() ends it (EINTR). `start` is set to the time just before the script was
  //! sent. Returns a failure status; else `reply` is the answer (maybe an error reply).
  redis_status run(redis_script which, const redis_script_args& args,
                   redis_clock::time_point deadline, Interrupter* interrupter, redis_reply& reply,
                   redis_clock::time_point& start) {
    if (!connection_.is_open()) {
      if (auto st = connect(deadline, interrupter); st) return st;
    }
    std::string_view body;
    const std::string* sha = nullptr;
    switch (which) {
      case redis_script::acquire:
        body = redis_acquire_script;
        sha = &sha_acquire_;
        break;
      case redis_script::renew:
        body = redis_renew_script;
        sha = &sha_renew_;
        break;
      case redis_script::release:
        body = redis_release_script;
        sha = &sha_release_;
        break;
    }
    bool by_sha = !sha->empty();
    // EVALSHA sha numkeys key fence token ttl [steal quarantine]: the longest command sent.
    static_assert(9 <= redis_command::capacity, "redis_command is too small");
    for (;;) {
      redis_command command;
      if (by_sha) {
        command << "EVALSHA" << *sha;
      } else {
        command << "EVAL" << body;
      }
      command << "2" << args.key << args.fence_key << args.token << args.ttl;
      if (which == redis_script::acquire) command << args.steal << (args.quarantine ? "1" : "0");
      start = redis_clock::now();
      auto st = call(command, reply, deadline, interrupter);
      if (!st && by_sha && reply->type == REDIS_REPLY_ERROR &&
          std::string_view(reply->str, reply->len).substr(0, 8) == "NOSCRIPT") {
        by_sha = false;  // flushed (SCRIPT FLUSH): EVAL caches it again
        continue;
      }
      return st;
    }
  }

  //! Runs one command, connecting first if needed, by `deadline`; with an `interrupter`,
  //! its interrupt() ends it (EINTR). Returns a failure status; else `reply` is the answer.
  redis_status call(const redis_command& command, redis_reply& reply,
                    redis_clock::time_point deadline, Interrupter* interrupter = nullptr) {
    if (!connection_.is_open()) {
      if (auto st = connect(deadline, interrupter); st) return st;
    }
    auto st = connection_.exchange(&command, 1, &reply, deadline, interrupter);
    if (!st && reply->type == REDIS_REPLY_ERROR && is_redis_auth_error(reply.get()))
      connection_.close();
    return st;
  }

 private:
  redis_status connect(redis_clock::time_point deadline, Interrupter* interrupter) {
    const auto connect_deadline = std::min(deadline, redis_clock::now() + connect_timeout_);
    auto st = connection_.connect(url_, connect_deadline, interrupter);
    if (st) {
      st.why = "cannot connect: " + st.why;
      return st;
    }
    const std::string db = std::to_string(url_.db);
    const std::string name = fmt::format("workerlock:{}", ::getpid());
    redis_command commands[6];
    std::size_t n = 0;
    int auth_index = -1;
    if (!url_.password.empty()) {
      auth_index = static_cast<int>(n);
      commands[n] << "AUTH";
      if (!url_.username.empty()) commands[n] << url_.username;
      commands[n++] << url_.password;
    }
    int select_index = -1;
    if (url_.db != 0) {
      select_index = static_cast<int>(n);
      commands[n++] << "SELECT" << db;
    }
    commands[n++] << "CLIENT"
                  << "SETNAME" << name;
    const std::size_t first_script = n;
    commands[n++] << "SCRIPT"
                  << "LOAD" << redis_acquire_script;
    commands[n++] << "SCRIPT"
                  << "LOAD" << redis_renew_script;
    commands[n++] << "SCRIPT"
                  << "LOAD" << redis_release_script;
    redis_reply replies[6];
    st = connection_.exchange(commands, n, replies, deadline, interrupter);
    if (st) {
      st.sent = false;  // nothing of the lease was sent yet
      st.why = "cannot set up the connection: " + st.why;
      return st;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const redisReply* r = replies[i].get();
      if (r->type != REDIS_REPLY_ERROR) continue;
      const std::string text(r->str, r->len);
      redis_status failure;
      failure.code = EACCES;
      if (static_cast<int>(i) == auth_index) {
        failure.why = text.find("without any password configured") != std::string::npos
                          ? "the URL has a password but the server has none configured: " + text
                          : "the server refused the user name or password: " + text;
      } else if (text.substr(0, 6) == "NOAUTH") {
        failure.why =
            "the server requires a password: give it in the URL (redis://:PASSWORD@host:port) "
            "or in RedisOptions::password (" +
            text + ")";
      } else if (static_cast<int>(i) == select_index) {
        failure.code = EINVAL;
        failure.bad_configuration = true;
        failure.why = "the server refused the database number: " + text;
      } else {
        continue;  // CLIENT SETNAME or SCRIPT LOAD refused (ACL): run by EVAL instead
      }
      connection_.close();
      return failure;
    }
    std::string* shas[3] = {&sha_acquire_, &sha_renew_, &sha_release_};
    for (std::size_t i = 0; i < 3; ++i) {
      const redisReply* r = replies[first_script + i].get();
      shas[i]->assign(r->type == REDIS_REPLY_STRING ? std::string(r->str, r->len) : std::string());
    }
    return {};
  }

  redis_url url_;
  std::chrono::milliseconds connect_timeout_{0};
  redis_connection connection_;
  std::string sha_acquire_;
  std::string sha_renew_;
  std::string sha_release_;
};

//! The lock_error of a failed network step. `renewing_until` is the end of the lease a
//! renewal tried to extend (time_point{} for anything else): a renewal that got no answer
//! before it is errc::lease_lost; one that timed out after command_timeout while the lease
//! is still valid is only ETIMEDOUT.
inline lock_error redis_failure(const char* operation, const std::string& target,
                                const redis_status& st, redis_clock::time_point renewing_until,
                                std::chrono::milliseconds connect_timeout,
                                std::chrono::milliseconds command_timeout) {
  std::string why = st.why;
  const bool renewing = renewing_until != redis_clock::time_point{};
  if (st.code == ETIMEDOUT) {
    why = renewing ? fmt::format(
                         "{}: within command_timeout ({} ms) or before the lease ran out, "
                         "whichever came first",
                         why, command_timeout.count())
                   : fmt::format("{}: connect_timeout {} ms, command_timeout {} ms", why,
                                 connect_timeout.count(), command_timeout.count());
  }
  auto code = std::error_code(st.code, std::system_category());
  if (st.code == ETIMEDOUT && renewing && redis_clock::now() >= renewing_until)
    code = make_error_code(errc::lease_lost);
  if (st.bad_configuration) code = make_error_code(errc::bad_configuration);
  return lock_error(operation, lock_error::network_target{target}, code, why);
}

//! The lock_error of an error reply.
inline lock_error redis_server_failure(const char* operation, const std::string& target,
                                       const redis_reply& reply) {
  const std::string text(reply->str, reply->len);
  int code = EIO;
  std::string why = "the server answered: " + text;
  if (is_redis_auth_error(reply.get())) {
    code = EACCES;
  } else if (text.substr(0, 8) == "READONLY") {
    why += " (this server is a read-only replica; point the URL at the master)";
    code = EROFS;
  } else if (text.substr(0, 3) == "OOM") {
    code = ENOMEM;
  }
  return lock_error(operation, lock_error::network_target{target},
                    std::error_code(code, std::system_category()), why);
}

}  // namespace workerlock::detail
