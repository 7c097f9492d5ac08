// workerlock/detail/redis_connection.hpp: one connection to Redis: workerlock's own socket,
// hiredis's RESP reply parser, and an absolute deadline on every command.
//
// Why not hiredis's own connection: its blocking API write()s and raises SIGPIPE when Redis
// has closed the connection (we send with MSG_NOSIGNAL); redisSetTimeout()'s SO_RCVTIMEO
// bounds each system call, not the command, so it cannot enforce "give up at valid_until";
// and a blocked hiredis call cannot be interrupted. Here connect and the last 20 ms before a
// deadline go through ppoll() (microsecond-exact); before that a plain blocking recv() with
// SO_RCVTIMEO at least 10 ms short of the deadline (one system call less per command, so an
// acquire+release costs the same 4 system calls as hiredis's SET NX + DEL). An interruptible
// exchange always waits in the Coordinator's Interrupter (ppoll() on the socket and its eventfd).
// Host names are resolved with getaddrinfo(), which the connect deadline does not bound
// (resolv.conf's own timeouts apply).
#pragma once

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <hiredis/hiredis.h>

#include "../interrupter.hpp"
#include "fork_layer.hpp"
#include "posix.hpp"
#include "redis_url.hpp"

namespace workerlock::detail {

using redis_clock = std::chrono::steady_clock;

struct redis_reply_free {
  void operator()(redisReply* reply) const noexcept {
    if (reply != nullptr) freeReplyObject(reply);
  }
};
using redis_reply = std::unique_ptr<redisReply, redis_reply_free>;

//! What a network step ended with: 0, or an errno value and a sentence.
struct redis_status {
  int code = 0;
  std::string why;
  bool sent = false;  // the command left this process (its effect is unknown on failure)
  bool bad_configuration = false;  // the server refused a setting of ours (the database)
  explicit operator bool() const noexcept { return code != 0; }
};

//! One RESP command of up to `capacity` arguments, referring to caller-owned strings. One
//! more argument is not stored: the command is marked `overflowed`, and exchange() refuses to
//! send it (E2BIG) instead of sending a truncated command.
struct redis_command {
  static constexpr int capacity = 10;
  std::string_view args[capacity];
  int argc = 0;
  bool overflowed = false;

  redis_command& operator<<(std::string_view arg) noexcept {
    if (argc < capacity) {
      args[argc++] = arg;
    } else {
      overflowed = true;
    }
    return *this;
  }
};

class redis_connection;

//! The fork layer's hook for Redis sockets: a copy of the process (fork(), or a raw copy the
//! fork layer adopts) closes its copy of every inherited socket at once, so that it never
//! sends on the parent's connection and does not keep it open after the parent closed it.
//! Its mutex guards every change of a connection's descriptor (never held across I/O).
class redis_sockets final : public fork_hook {
 public:
  static redis_sockets& instance() noexcept {
    static redis_sockets* the_hook = new redis_sockets();  // never destroyed: fork() may come late
    return *the_hook;
  }

  //! Takes the mutex; in a raw copy of the process, first lets the fork layer adopt it.
  class guard {
   public:
    guard() noexcept : hook_(instance()) {
      fork_layer::adopt_raw_copy();
      ::pthread_mutex_lock(&hook_.mutex_);
    }
    ~guard() { ::pthread_mutex_unlock(&hook_.mutex_); }
    guard(const guard&) = delete;
    guard& operator=(const guard&) = delete;

   private:
    redis_sockets& hook_;
  };

  inline void link(redis_connection& connection) noexcept;    // requires the mutex
  inline void unlink(redis_connection& connection) noexcept;  // requires the mutex

  void before_fork() noexcept override { ::pthread_mutex_lock(&mutex_); }
  void after_fork_in_parent() noexcept override { ::pthread_mutex_unlock(&mutex_); }
  void after_fork_in_child() noexcept override {
    close_inherited();
    ::pthread_mutex_unlock(&mutex_);
  }
  void adopt_raw_copy() noexcept override {
    const pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    mutex_ = fresh;  // maybe copied locked by a thread that does not exist here
    close_inherited();
  }

 private:
  redis_sockets() noexcept : fork_hook(fork_order::network_sessions) { fork_layer::add(*this); }
  inline void close_inherited() noexcept;  // async-signal-safe

  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
  redis_connection* head_ = nullptr;
};

//! A connection to Redis: our own non-blocking socket, hiredis's reply parser.
class redis_connection {
 public:
  redis_connection() noexcept {
    redis_sockets::guard guard;
    redis_sockets::instance().link(*this);
  }
  redis_connection(const redis_connection&) = delete;
  redis_connection& operator=(const redis_connection&) = delete;
  ~redis_connection() {
    close();
    redis_sockets::guard guard;
    redis_sockets::instance().unlink(*this);
  }

  bool is_open() const noexcept { return fd_ >= 0; }

  //! Closes the socket (in a copy of the process, the copy's only: the fork hook closed it
  //! already) and frees the reply parser.
  void close() noexcept {
    set_socket(-1);
    if (reader_ != nullptr) redisReaderFree(reader_);
    reader_ = nullptr;
  }

  redis_status connect(const redis_url& url, redis_clock::time_point deadline,
                       Interrupter* interrupter) {
    close();
    redis_status st;
    reader_ = redisReaderCreate();
    if (reader_ == nullptr) {
      st.code = ENOMEM;
      st.why = "cannot allocate the reply parser";
      return st;
    }
    if (url.unix_socket) {
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      std::memcpy(address.sun_path, url.socket_path.c_str(), url.socket_path.size() + 1);
      st = connect_to(AF_UNIX, reinterpret_cast<const sockaddr*>(&address), sizeof address,
                      deadline, interrupter);
      if (st) st.why = fmt::format("socket {}: {}", url.socket_path, st.why);
    } else {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* found = nullptr;
      const std::string port = std::to_string(url.port);
      const int rc = ::getaddrinfo(url.host.c_str(), port.c_str(), &hints, &found);
      if (rc != 0) {
        st.code = EHOSTUNREACH;
        st.why = fmt::format("cannot resolve the host name '{}': {}", url.host,
                             rc == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(rc));
        close();
        return st;
      }
      st.code = EHOSTUNREACH;
      st.why = "no address";
      for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
        st = connect_to(a->ai_family, a->ai_addr, a->ai_addrlen, deadline, interrupter);
        if (!st || st.code == ETIMEDOUT || st.code == EINTR) break;
      }
      ::freeaddrinfo(found);
      if (!st) {
        const int one = 1;
        ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        // Blocking from now on: sends pass MSG_DONTWAIT, receives are bounded (see exchange()).
        ::setsockopt(fd_, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        const int idle = 15;
        const int interval = 5;
        const int count = 3;
        ::setsockopt(fd_, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        ::setsockopt(fd_, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
        ::setsockopt(fd_, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
      }
    }
    if (st) {
      close();
    } else {
      ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
      receive_timeout_us_ = 0;
    }
    return st;
  }

  //! Sends `n` commands at once (a pipeline) and reads their `n` replies, by `deadline`.
  //! With an `interrupter`, its interrupt() ends the exchange early (EINTR).
  //! On any failure the connection is closed: a late reply would be taken for the next one.
  redis_status exchange(const redis_command* commands, std::size_t n, redis_reply* replies,
                        redis_clock::time_point deadline, Interrupter* interrupter) {
    redis_status st;
    for (std::size_t i = 0; i < n; ++i) {
      if (commands[i].overflowed) {  // a bug of the caller: nothing is sent
        st.code = E2BIG;
        st.why = fmt::format("a command with more than {} arguments", redis_command::capacity);
        return st;
      }
    }
    if (fd_ < 0) {
      st.code = ENOTCONN;
      st.why = "not connected";
      return st;
    }
    out_.clear();
    for (std::size_t i = 0; i < n; ++i) append(commands[i]);
    std::size_t sent = 0;
    while (sent < out_.size()) {
      const auto wrote =
          ::send(fd_, out_.data() + sent, out_.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (wrote > 0) {
        sent += static_cast<std::size_t>(wrote);
        st.sent = true;
        continue;
      }
      if (wrote < 0 && errno == EINTR) continue;
      if (wrote < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!wait(POLLOUT, deadline, interrupter, st)) return fail(st);
        continue;
      }
      st.code = errno == EPIPE ? ECONNRESET : errno;
      st.why = "the server closed the connection";
      return fail(st);
    }
    st.sent = true;
    for (std::size_t i = 0; i < n; ++i) {
      for (;;) {
        void* reply = nullptr;
        if (redisReaderGetReply(reader_, &reply) != REDIS_OK) {
          st.code = EPROTO;
          st.why = fmt::format("unreadable reply: {}", reader_->errstr);
          return fail(st);
        }
        if (reply != nullptr) {
          replies[i].reset(static_cast<redisReply*>(reply));
          break;
        }
        char buffer[16384];
        ssize_t got = -1;
        if (interrupter == nullptr && bound_receive_timeout(deadline)) {
          got = ::recv(fd_, buffer, sizeof buffer, 0);  // blocks at most SO_RCVTIMEO
        } else {
          // Interruptible, or close to the deadline: ppoll() is exact to the microsecond.
          if (!wait(POLLIN, deadline, interrupter, st)) return fail(st);
          got = ::recv(fd_, buffer, sizeof buffer, MSG_DONTWAIT);
        }
        if (got > 0) {
          if (redisReaderFeed(reader_, buffer, static_cast<std::size_t>(got)) != REDIS_OK) {
            st.code = EPROTO;
            st.why = fmt::format("unreadable reply: {}", reader_->errstr);
            return fail(st);
          }
          continue;
        }
        if (got == 0) {
          st.code = ECONNRESET;
          st.why = "the server closed the connection";
          return fail(st);
        }
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        st.code = errno;
        st.why = "cannot read from the server";
        return fail(st);
      }
    }
    return st;
  }

 private:
  redis_status connect_to(int family, const sockaddr* address, socklen_t length,
                          redis_clock::time_point deadline, Interrupter* interrupter) {
    redis_status st;
    set_socket(family);
    if (fd_ < 0) {
      st.code = errno;
      st.why = "cannot create a socket";
      return st;
    }
    if (::connect(fd_, address, length) == 0) return st;
    if (errno != EINPROGRESS && errno != EINTR && errno != EAGAIN) {
      st.code = errno;
      st.why = explain_connect(errno);
      return st;
    }
    if (!wait(POLLOUT, deadline, interrupter, st)) return st;
    int error = 0;
    socklen_t size = sizeof error;
    if (::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &error, &size) != 0) error = errno;
    if (error != 0) {
      st.code = error;
      st.why = explain_connect(error);
    }
    return st;
  }

  static std::string explain_connect(int error) {
    switch (error) {
      case ECONNREFUSED:
        return "connection refused: is redis-server running and listening there?";
      case ENOENT:
        return "no such socket: is redis-server running with unixsocket set?";
      case EACCES:
        return "permission denied on the socket";
      case ENETUNREACH:
      case EHOSTUNREACH:
        return "the host is unreachable";
      default:
        return "cannot connect";
    }
  }

  //! Waits for `events` on the socket until `deadline`: through `interrupter` when there is
  //! one (then interrupt() ends the wait: EINTR), else uninterruptibly.
  bool wait(short events, redis_clock::time_point deadline, Interrupter* interrupter,
            redis_status& st) {
    const WaitResult result = interrupter != nullptr ? interrupter->wait(fd_, events, deadline)
                                                     : wait_ready(fd_, events, deadline);
    switch (result) {
      case WaitResult::ready:
        return true;
      case WaitResult::timed_out:
        st.code = ETIMEDOUT;
        st.why = "no answer in time";
        return false;
      case WaitResult::interrupted:
        st.code = EINTR;
        st.why = "interrupted";
        return false;
      case WaitResult::error:
        st.code = errno;
        st.why = "poll failed";
        return false;
    }
    return false;
  }

  //! A plain blocking recv() costs one system call less than ppoll() + recv(). It is used when
  //! the deadline is more than 20 ms away, with SO_RCVTIMEO at least 10 ms short of it (the
  //! kernel may round the timeout up to its tick); the last 20 ms go through ppoll(). The
  //! option is set only when it must shrink, so commands with the same timeout set it once.
  bool bound_receive_timeout(redis_clock::time_point deadline) noexcept {
    const auto left =
        std::chrono::duration_cast<std::chrono::microseconds>(deadline - redis_clock::now())
            .count();
    if (left <= 20000) return false;
    const long long most = (left - 10000) / 1000 * 1000;  // whole milliseconds
    if (receive_timeout_us_ != 0 && receive_timeout_us_ <= most) return true;
    struct timeval tv {};
    tv.tv_sec = static_cast<time_t>(most / 1000000);
    tv.tv_usec = static_cast<suseconds_t>(most % 1000000);
    if (::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) return false;
    receive_timeout_us_ = most;
    return true;
  }

  redis_status& fail(redis_status& st) noexcept {
    close();
    return st;
  }

  void append(const redis_command& command) {
    out_ += '*';
    out_ += std::to_string(command.argc);
    out_ += "\r\n";
    for (int i = 0; i < command.argc; ++i) {
      out_ += '$';
      out_ += std::to_string(command.args[i].size());
      out_ += "\r\n";
      out_.append(command.args[i].data(), command.args[i].size());
      out_ += "\r\n";
    }
  }

  //! Closes the socket, and opens a new one of `family` unless it is -1; under the fork
  //! hook's mutex, so that a copy of the process always finds fd_ naming its socket.
  void set_socket(int family) noexcept {
    redis_sockets::guard guard;
    if (fd_ >= 0) ::close(fd_);
    fd_ = family < 0 ? -1
                     : keep_off_standard_streams(
                           ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  }

  friend class redis_sockets;
  redis_connection* prev_ = nullptr;  // redis_sockets' list, guarded by its mutex
  redis_connection* next_ = nullptr;
  int fd_ = -1;
  redisReader* reader_ = nullptr;
  std::string out_;
  long long receive_timeout_us_ = 0;  // SO_RCVTIMEO now set; 0: none (blocks forever)
};

void redis_sockets::link(redis_connection& connection) noexcept {
  connection.next_ = head_;
  if (head_ != nullptr) head_->prev_ = &connection;
  head_ = &connection;
}

void redis_sockets::unlink(redis_connection& connection) noexcept {
  if (connection.prev_ != nullptr) connection.prev_->next_ = connection.next_;
  if (connection.next_ != nullptr) connection.next_->prev_ = connection.prev_;
  if (head_ == &connection) head_ = connection.next_;
  connection.prev_ = connection.next_ = nullptr;
}

void redis_sockets::close_inherited() noexcept {
  for (redis_connection* c = head_; c != nullptr; c = c->next_) {
    close_keep_errno(c->fd_);
    c->fd_ = -1;
  }
}

}  // namespace workerlock::detail
