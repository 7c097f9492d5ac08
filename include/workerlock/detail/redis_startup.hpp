// workerlock/detail/redis_startup.hpp: the startup barrier's record in Redis: the key
// <key>:startup names the generation whose startup tasks (on_startup) completed.
#pragma once

#include <pthread.h>

#include <chrono>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/format.h>
#include <hiredis/hiredis.h>

#include "../error.hpp"
#include "../generation_marker.hpp"
#include "fork_layer.hpp"
#include "redis_session.hpp"
#include "redis_url.hpp"

namespace workerlock::detail {

//! Read with GET, written with SET (no expiry), on a connection of its own: the Coordinator's
//! thread writes it while any thread may read it (Coordinator::wait_for_startup()). A copy of
//! the process opens its own connection (the fork layer closed the inherited socket).
class redis_generation_marker final : public GenerationMarker {
 public:
  struct settings {
    redis_url url;
    std::string config_error;  // the backend's: every call throws it
    std::string key;           // <key>:startup
    std::string generation;
    std::string target;  // for errors: "<URL, password ***> key=<key>"
    std::chrono::milliseconds connect_timeout{0};
    std::chrono::milliseconds command_timeout{0};
  };

  //! Throws: lock_error (errc::bad_configuration) for a generation that cannot name one
  //! (see generation_problem()).
  explicit redis_generation_marker(settings s) : s_(std::move(s)) {
    if (const char* problem = generation_problem(s_.generation))
      throw lock_error("set up the startup barrier on", lock_error::network_target{s_.target},
                       make_error_code(errc::bad_configuration), problem);
    session_.configure(s_.url, s_.connect_timeout);
  }

  bool completed() const override {
    redis_command get;
    get << "GET" << s_.key;
    const auto reply = call("read the startup marker on", get);
    if (reply->type == REDIS_REPLY_NIL) return false;
    if (reply->type != REDIS_REPLY_STRING) throw unexpected("read the startup marker on");
    return std::string_view(reply->str, reply->len) == s_.generation;
  }

  void complete() override {
    redis_command set;
    set << "SET" << s_.key << s_.generation;
    const auto reply = call("write the startup marker on", set);
    if (reply->type != REDIS_REPLY_STATUS) throw unexpected("write the startup marker on");
  }

  std::string describe() const override { return fmt::format("'{}' on {}", s_.key, s_.target); }

 private:
  redis_reply call(const char* operation, const redis_command& command) const {
    if (!s_.config_error.empty())
      throw lock_error(operation, lock_error::network_target{s_.target},
                       make_error_code(errc::bad_configuration), s_.config_error);
    fork_layer::adopt_raw_copy();
    stamp_.adopt([&] {  // a copy of the process: the mutex may have been copied locked
      const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
      mutex_ = fresh;
      session_.close();
    });
    redis_reply reply;
    ::pthread_mutex_lock(&mutex_);
    auto deadline = redis_clock::now() + s_.command_timeout;
    if (!session_.is_open()) deadline += s_.connect_timeout;
    const redis_status st = session_.call(command, reply, deadline);
    ::pthread_mutex_unlock(&mutex_);
    if (st)
      throw redis_failure(operation, s_.target, st, {}, s_.connect_timeout, s_.command_timeout);
    if (reply->type == REDIS_REPLY_ERROR) throw redis_server_failure(operation, s_.target, reply);
    return reply;
  }

  lock_error unexpected(const char* operation) const {
    return lock_error(operation, lock_error::network_target{s_.target},
                      std::make_error_code(std::errc::protocol_error),
                      "unexpected reply to " + s_.key);
  }

  settings s_;
  mutable pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
  mutable process_stamp stamp_;
  mutable redis_session session_;
};

}  // namespace workerlock::detail
