// workerlock/detail/pg_session.hpp: one libpq connection driven without blocking: connect,
// send a statement, await its result, cancel; fork-safe through pg_fork.hpp.
#pragma once

#include <poll.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <libpq-fe.h>

#include "../error.hpp"
#include "../interrupter.hpp"
#include "pg_conninfo.hpp"
#include "pg_fork.hpp"

namespace workerlock::detail {

using pg_clock = std::chrono::steady_clock;

enum class pg_outcome { done, timed_out, interrupted, failed };

//! Waits until `fd` (ignored if negative) is ready for `events`, `deadline` passes, or,
//! with an `interrupter`, it is interrupted. `failed` leaves errno set.
inline pg_outcome pg_wait(Interrupter* interrupter, int fd, short events,
                          pg_clock::time_point deadline) noexcept {
  switch (interrupter != nullptr ? interrupter->wait(fd, events, deadline)
                                 : wait_ready(fd, events, deadline)) {
    case WaitResult::ready:
      return pg_outcome::done;
    case WaitResult::timed_out:
      return pg_outcome::timed_out;
    case WaitResult::interrupted:
      return pg_outcome::interrupted;
    case WaitResult::error:
      break;
  }
  return pg_outcome::failed;
}

struct pg_result_deleter {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using pg_result = std::unique_ptr<PGresult, pg_result_deleter>;

//! A result of one row with at least `columns` columns.
inline bool pg_one_row(const pg_result& r, int columns) noexcept {
  return r && PQresultStatus(r.get()) == PGRES_TUPLES_OK && PQntuples(r.get()) == 1 &&
         PQnfields(r.get()) >= columns;
}

//! Column `column` of the one row of `r`, as text.
inline const char* pg_text(const pg_result& r, int column) noexcept {
  return PQgetvalue(r.get(), 0, column);
}

//! The SQLSTATE of a failed statement ("" if none).
inline std::string pg_sqlstate(const pg_result& r) {
  const char* state = r ? PQresultErrorField(r.get(), PG_DIAG_SQLSTATE) : nullptr;
  return state != nullptr ? state : "";
}

inline void pg_ignore_notice(void*, const char*) noexcept {}

//! The connection parameters, as PQconnectStartParams takes them.
struct pg_connect_params {
  std::vector<std::string> keywords, values;
};

//! One connection to the server. Driven by one thread at a time. Every libpq call that may
//! wait on the network (name resolution, connecting) runs without the fork mutex; the others
//! (non-blocking sends and reads on a connected socket) run under it, so fork() never copies
//! a connection half changed. Waits end early when the `interrupter` given (if any) is
//! interrupted. Messages are scrubbed of `secrets`.
class pg_session {
 public:
  explicit pg_session(const std::vector<std::string>& secrets) : secrets_(secrets) {
    pg_fork::instance().add(&slot_);
  }
  pg_session(const pg_session&) = delete;
  pg_session& operator=(const pg_session&) = delete;
  ~pg_session() {
    close();
    pg_fork::instance().remove(&slot_);
  }

  //! Connected, and no statement failed on it since.
  bool usable() const noexcept { return slot_.conn != nullptr && !broken_; }
  //! From now on the session is not trusted: close() before the next use.
  void mark_broken() noexcept { broken_ = true; }
  //! The server said the session is over (FATAL, or the socket closed).
  bool ended() const noexcept {
    return slot_.conn == nullptr || PQstatus(slot_.conn) != CONNECTION_OK;
  }
  int server_version() const noexcept { return PQserverVersion(slot_.conn); }

  //! libpq's latest error on this session (or `fallback`), on one line, scrubbed.
  std::string error_text(const char* fallback = "out of memory") const {
    return pg_scrub(slot_.conn != nullptr ? PQerrorMessage(slot_.conn) : fallback, secrets_);
  }
  std::string scrub(const char* text) const { return pg_scrub(text, secrets_); }

  //! Opens the connection by `deadline`. Returns false with `f` set and `why` on failure, or
  //! with `f` empty when interrupted.
  bool open(const pg_connect_params& params, pg_clock::time_point deadline,
            Interrupter* interrupter, std::chrono::milliseconds timeout, failure& f,
            std::string& why) {
    constexpr const char* operation = "connect to PostgreSQL";
    std::vector<const char*> keywords, values;
    for (std::size_t k = 0; k < params.keywords.size(); ++k) {
      keywords.push_back(params.keywords[k].c_str());
      values.push_back(params.values[k].c_str());
    }
    keywords.push_back(nullptr);
    values.push_back(nullptr);
    for (;;) {
      close();
      const auto copied = pg_fork::instance().begin_connecting(&slot_);
      PostgresPollingStatusType status = PGRES_POLLING_WRITING;
      PGconn* conn = PQconnectStartParams(keywords.data(), values.data(), 0);  // may resolve names
      if (conn == nullptr || PQstatus(conn) == CONNECTION_BAD) status = PGRES_POLLING_FAILED;
      if (conn != nullptr) PQsetNoticeProcessor(conn, &pg_ignore_notice, nullptr);
      pg_fork::instance().publish(&slot_, conn);
      while (status != PGRES_POLLING_OK && status != PGRES_POLLING_FAILED) {
        const short events = status == PGRES_POLLING_READING ? POLLIN : POLLOUT;
        const auto waited = pg_wait(interrupter, PQsocket(conn), events, deadline);
        if (waited == pg_outcome::done) {
          status = PQconnectPoll(conn);  // may resolve the next host's name
          continue;
        }
        const int e = errno;
        pg_fork::instance().end_connecting(&slot_);
        close();
        if (waited == pg_outcome::interrupted) return false;
        if (waited == pg_outcome::timed_out) {
          why = fmt::format("no connection within {} ms (connect_timeout)", timeout.count());
          f.set(ETIMEDOUT, operation);
        } else {
          why = fmt::format("poll failed: {}", std::strerror(e));
          f.set(e, operation);
        }
        return false;
      }
      // A fork() while libpq worked without the fork mutex may have copied the socket into a
      // child whose handler could not see it: that child would keep the session alive after
      // this process closes it. Such a connection is ended (Terminate) and made afresh.
      if (!pg_fork::instance().end_connecting(&slot_, copied) && status == PGRES_POLLING_OK) {
        if (pg_clock::now() < deadline) continue;
        why = "every attempt to connect was copied by a concurrent fork() until connect_timeout";
        f.set(EAGAIN, operation);
        close();
        return false;
      }
      if (status == PGRES_POLLING_FAILED) {
        why = error_text();
        f.set(classify_connect_error(why), operation);
        close();
        return false;
      }
      break;
    }
    // libpq creates its socket itself and keeps its number: workerlock cannot move it off
    // the standard streams. There, a log line written to stderr would corrupt the protocol,
    // and a reopening of that stream would close the session: either ends the lock unseen.
    if (const int socket_fd = PQsocket(slot_.conn); socket_fd >= 0 && socket_fd <= 2) {
      why = fmt::format(
          "libpq's socket is descriptor {}, a standard stream (0, 1 or 2 was closed in this "
          "process), where a write to that stream or its reopening would end the session and "
          "its lock; open /dev/null on descriptors 0, 1 and 2 before connecting",
          socket_fd);
      f.set(EBADF, operation);
      close();
      return false;
    }
    if (PQsetnonblocking(slot_.conn, 1) != 0) {
      why = error_text();
      f.set(EIO, operation);
      close();
      return false;
    }
    return true;
  }

  //! Closes the connection (a Terminate message tells the server). Never throws.
  void close() noexcept {
    pg_fork::instance().retire(&slot_);
    broken_ = false;
  }

  //! In a copy of the process: frees the parent's connection without a word to the server
  //! (the fork handler pointed its socket at /dev/null). Returns true if it was a copy's.
  bool disown_if_inherited() noexcept {
    if (!pg_fork::instance().disown(&slot_)) return false;
    broken_ = false;
    return true;
  }
  bool inherited() const noexcept { return slot_.inherited.load(); }

  //! Sends a statement (text parameters; `simple`: the simple protocol, several statements).
  //! Returns false with `why` set, and the session marked broken, if it cannot be sent.
  bool send(const char* sql, std::initializer_list<const char*> params, failure& f,
            std::string& why, bool simple = false) {
    if (!usable()) {
      why = "not connected";
      f.set(ENOTCONN, "use PostgreSQL session for");
      return false;
    }
    int ok = 0;
    {
      pg_fork::guard guard;
      ok = simple ? PQsendQuery(slot_.conn, sql)
                  : PQsendQueryParams(slot_.conn, sql, static_cast<int>(params.size()), nullptr,
                                      params.begin(), nullptr, nullptr, 0);
    }
    if (ok != 1) {
      why = error_text();
      f.set(ECONNRESET, "send a statement to PostgreSQL for");
      broken_ = true;
      return false;
    }
    return true;
  }

  //! Waits for every result of the statement in flight; keeps the first error, else the
  //! last result. On anything but `done` the session is marked broken (a statement may still
  //! be in flight), except `interrupted`, which cancel() resolves.
  pg_outcome await(pg_clock::time_point deadline, Interrupter* interrupter, pg_result& out,
                   failure& f, std::string& why) {
    out.reset();
    PGconn* conn = slot_.conn;
    for (;;) {
      int flushed = 0;
      bool input_ok = true;
      bool busy = true;
      {
        pg_fork::guard guard;
        flushed = PQflush(conn);
        if (flushed >= 0) input_ok = PQconsumeInput(conn) == 1;
        while (flushed >= 0 && input_ok && !(busy = PQisBusy(conn) != 0)) {
          PGresult* r = PQgetResult(conn);
          if (r == nullptr) break;
          if (out && PQresultStatus(out.get()) == PGRES_FATAL_ERROR) {
            PQclear(r);  // keep the first error
          } else {
            out.reset(r);
          }
        }
      }
      if (flushed < 0 || !input_ok) {
        why = error_text();
        f.set(ECONNRESET, "talk to PostgreSQL for");
        broken_ = true;
        out.reset();
        return pg_outcome::failed;
      }
      if (!busy) {
        if (!out) {
          why = "no result";
          f.set(EIO, "talk to PostgreSQL for");
          broken_ = true;
          return pg_outcome::failed;
        }
        if (PQstatus(conn) != CONNECTION_OK) broken_ = true;
        return pg_outcome::done;
      }
      const short events = static_cast<short>(POLLIN | (flushed == 1 ? POLLOUT : 0));
      const auto waited = pg_wait(interrupter, PQsocket(conn), events, deadline);
      if (waited == pg_outcome::done) continue;
      if (waited != pg_outcome::interrupted) broken_ = true;
      if (waited == pg_outcome::failed) {
        why = fmt::format("poll failed: {}", std::strerror(errno));
        f.set(errno, "talk to PostgreSQL for");
      }
      out.reset();
      return waited;
    }
  }

  //! True when `r` is one row of exactly `columns` columns; otherwise sets `f` (ECONNRESET
  //! when the session ended, as after pg_terminate_backend, else EIO) and `why`.
  bool check_row(const pg_result& r, int columns, const char* operation, failure& f,
                 std::string& why) const {
    const auto status = PQresultStatus(r.get());
    if (status == PGRES_TUPLES_OK && PQntuples(r.get()) == 1 && PQnfields(r.get()) == columns)
      return true;
    f.set(ended() ? ECONNRESET : EIO, operation);
    why = scrub(PQresultErrorMessage(r.get()));
    if (why.empty()) why = fmt::format("unexpected result {}", PQresStatus(status));
    return false;
  }

  //! After an interrupted await(): PQcancel, then drain within `timeout`. Returns the
  //! statement's result if it completed before the cancel landed; otherwise null (the session
  //! stays open when it drained cleanly, and is closed if not). PQcancel opens a connection of
  //! its own and blocks while doing so (libpq >= 15 bounds that with tcp_user_timeout); it
  //! runs without the fork mutex, on a copy of the cancel key.
  pg_result cancel(std::chrono::milliseconds timeout) {
    bool cancelled = false;
    PGcancel* c = nullptr;
    {
      pg_fork::guard guard;
      if (PQstatus(slot_.conn) == CONNECTION_OK) c = PQgetCancel(slot_.conn);
    }
    if (c != nullptr) {
      char error[256];
      cancelled = PQcancel(c, error, sizeof error) == 1;
      PQfreeCancel(c);
    }
    pg_result r;
    failure f;
    std::string why;
    if (!cancelled || await(pg_clock::now() + timeout, nullptr, r, f, why) != pg_outcome::done) {
      close();
      return {};
    }
    if (PQresultStatus(r.get()) == PGRES_TUPLES_OK) return r;  // completed just before the cancel
    return {};
  }

 private:
  //! An errno that names the failure, for error codes; the message always has libpq's text.
  int classify_connect_error(const std::string& message) const {
    if (slot_.conn != nullptr && PQconnectionNeedsPassword(slot_.conn)) return EACCES;
    if (message.find("authentication failed") != std::string::npos) return EACCES;
    if (message.find("Connection refused") != std::string::npos) return ECONNREFUSED;
    if (message.find("could not translate host name") != std::string::npos) return EHOSTUNREACH;
    return EIO;
  }

  const std::vector<std::string>& secrets_;
  pg_fork::slot slot_;
  bool broken_ = false;
};

}  // namespace workerlock::detail
