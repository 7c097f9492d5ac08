// workerlock/detail/pg_sql.hpp: the statements PostgresBackend sends: session setup and the
// advisory lock statements of its two sessions, for the server's version.
#pragma once

#include <chrono>
#include <string>

#include <fmt/format.h>

namespace workerlock::detail {

//! What the session setup sets on the server.
struct pg_session_settings {
  bool server_keepalives = true;
  std::chrono::seconds keepalives_idle{5};
  std::chrono::seconds keepalives_interval{1};
  int keepalives_count = 5;
  std::chrono::milliseconds tcp_user_timeout{10000};
};

//! The session setup, one row in reply: when the server's life began (epoch seconds, text).
//! The session must never time out on its own: the wait is meant to be long and the holder
//! idles between checks. Then the server-side keepalives. A crash restart ends every session,
//! so the life start is fixed for the life of the session; the checkpointer's start shows a
//! crash restart (visible to superusers and pg_read_all_stats only; NULL, so ignored by
//! GREATEST, for others).
inline std::string pg_setup_sql(int version, const pg_session_settings& s) {
  std::string setup =
      "SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout "
      "= 0";
  if (version >= 140000) setup += "; SET idle_session_timeout = 0";
  if (s.server_keepalives) {
    setup += fmt::format(
        "; SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET "
        "tcp_keepalives_count = {}",
        s.keepalives_idle.count(), s.keepalives_interval.count(), s.keepalives_count);
    if (version >= 120000)
      setup += fmt::format("; SET tcp_user_timeout = {}", s.tcp_user_timeout.count());
  }
  setup += version >= 100000
               ? "; SELECT extract(epoch FROM GREATEST(pg_postmaster_start_time(), (SELECT "
                 "max(backend_start) FROM pg_stat_activity WHERE backend_type = "
                 "'checkpointer')))::text"
               : "; SELECT extract(epoch FROM pg_postmaster_start_time())::text";
  return setup;
}

//! The lock statements of one session: `attempt` (pg_try_advisory_lock) and `wait`
//! (pg_advisory_lock).
struct pg_lock_sql {
  std::string attempt, wait;
};

//! Lock session ($1: the int8 key): (got, pid).
inline pg_lock_sql pg_lock_session_sql() {
  return {"SELECT pg_try_advisory_lock($1::int8), pg_backend_pid()",
          "SELECT true, pg_backend_pid() FROM (SELECT pg_advisory_lock($1::int8) OFFSET 0) AS l"};
}

//! Fence session ($1, $2: the key's int4 halves; $3: the server's life start): (got, pid,
//! token, milliseconds since the server started). The OFFSET 0 subquery makes the lock come
//! first, so the transaction id is allocated only once the lock is held (and so after the
//! previous holder's).
inline pg_lock_sql pg_fence_session_sql(int version, bool fencing) {
  const std::string token = !fencing            ? "'0'"
                            : version >= 130000 ? "pg_current_xact_id()::text"
                                                : "txid_current()::text";
  const std::string uptime = "((extract(epoch FROM clock_timestamp()) - $3::numeric) * 1000)::int8";
  return {"SELECT l.got, pg_backend_pid(), CASE WHEN l.got THEN " + token + " ELSE '0' END, " +
              uptime +
              " FROM (SELECT pg_try_advisory_lock($1::int4, $2::int4) AS got OFFSET 0) AS l",
          "SELECT true, pg_backend_pid(), " + token + ", " + uptime +
              " FROM (SELECT pg_advisory_lock($1::int4, $2::int4) OFFSET 0) AS l"};
}

}  // namespace workerlock::detail
