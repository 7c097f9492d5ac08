// workerlock/postgres.hpp: PostgresBackend, the Coordinator's backend on PostgreSQL session
// advisory locks, for workers on several hosts sharing one PostgreSQL server.
//
// Needs libpq (included by the detail/pg_*.hpp headers only): link with -lpq, or use the
// CMake target workerlock::postgres. Works with PostgreSQL servers >= 9.6 (fencing tokens
// come from pg_current_xact_id() on >= 13, txid_current() before).
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "backend.hpp"
#include "detail/pg_conninfo.hpp"
#include "detail/pg_hold.hpp"
#include "error.hpp"

namespace workerlock {

//! The settings of a PostgresBackend. Every field has a default except the connection string.
//!
//! Detection times with the defaults (event: who notices, how, how long):
//! - the holder process dies (crash, SIGKILL): the server, its socket closes; a standby is
//!   promoted at once (4 ms median, 10 ms p99 on 127.0.0.1 in tests/bench/postgres_bench.cpp).
//! - one of the holder's sessions is ended (pg_terminate_backend): the holder, at its next
//!   verify_held(); <= verify_interval (1 s), then the successor is promoted.
//! - the server restarts: the holder, at its next verify_held(), <= verify_interval (1 s); the
//!   successor waits out restart_grace (3 s from the server's start).
//! - the server dies or becomes unreachable: the holder, verify_held() fails or times out;
//!   <= verify_interval + command_timeout (3 s).
//! - the same, seen by a waiting standby: libpq keepalives / tcp_user_timeout; ~10 s.
//! - the holder's host dies or is cut off: the server, tcp_keepalives_* / tcp_user_timeout;
//!   ~10 s, then a standby is promoted (the holder itself gave up after <= 3 s).
//! - the holder is paused (SIGSTOP, a VM freeze) for longer than verify_interval +
//!   command_timeout after its last check: its valid_until() has passed when it runs again,
//!   so its role() reads secondary at once and it is demoted (see PostgresBackend).
//!
//! The holder gives up (3 s) well before the server frees its lock (>= 10 s): the options
//! are refused unless 2 * (verify_interval + command_timeout) <= the server's detection time.
struct PostgresOptions {
  //! A libpq connection string, in either form: `host=db.example port=5432 dbname=app
  //! user=app sslmode=verify-full` or `postgresql://app@db.example/app?sslmode=verify-full`.
  //! Every parameter (auth, TLS, passfile, service, target_session_attrs...) goes to libpq
  //! unchanged; PGHOST, PGPASSWORD and the other libpq environment variables fill in what it
  //! leaves out. Empty: $WORKERLOCK_POSTGRES_URL; if that is empty too, prepare() throws
  //! (write `postgresql://` to mean "libpq's defaults"). Passwords never appear in messages.
  //! All workers must reach the same server AND database: advisory locks are per database.
  std::string conninfo;

  //! The lock name. The advisory lock key is PostgresBackend::key_for(name): FNV-1a 64 of
  //! "workerlock:" + name, as a signed 64-bit integer.
  std::string name = "primary";
  //! An explicit 64-bit advisory lock key; overrides `name`.
  std::optional<std::int64_t> key;

  //! Bound on establishing one connection (TCP, TLS, authentication, session setup). A
  //! `connect_timeout` in the connection string (seconds) replaces it.
  std::chrono::milliseconds connect_timeout{5000};
  //! How often the holder proves, with a round trip on each of its two sessions, that they
  //! are alive and still the ones holding the locks.
  std::chrono::milliseconds verify_interval{1000};
  //! Bound on every round trip other than the wait for the lock: verify_held(), a
  //! try_acquire() and the unlocks in release(). No answer in time counts as a lost session.
  std::chrono::milliseconds command_timeout{2000};

  //! TCP keepalives and user timeout. Sent to libpq as `keepalives=1 keepalives_idle
  //! keepalives_interval keepalives_count tcp_user_timeout` unless the connection string sets
  //! them (the client notices a dead server), and with server_keepalives also as the session's
  //! `SET tcp_keepalives_idle/_interval/_count, tcp_user_timeout` (the server notices a dead
  //! client host and frees its lock). Detection takes about min(tcp_user_timeout,
  //! keepalives_idle + keepalives_interval * keepalives_count): 10 s with the defaults.
  //! TCP only: Unix-domain sockets never go silent, so they need none of this.
  std::chrono::seconds keepalives_idle{5};
  std::chrono::seconds keepalives_interval{1};
  int keepalives_count = 5;
  std::chrono::milliseconds tcp_user_timeout{10000};  //!< 0: the operating system's default
  bool server_keepalives = true;

  //! Fencing tokens: the acquiring statement also allocates a transaction id
  //! (pg_current_xact_id(), 64 bits, never wraps) and fencing_token() returns it, so it grows
  //! with every new holder. Costs one transaction id (and a commit record) per acquisition
  //! and needs a read-write server: set false on a hot standby; fencing_token() is then 0.
  bool fencing = true;

  //! After the server (re)started less than this long ago, a new holder waits until this
  //! much time has passed since the start before it is promoted: holders of the previous
  //! server life lost their sessions without being told, and need up to verify_interval +
  //! command_timeout (the default) to notice. Use the same value on every worker.
  std::optional<std::chrono::milliseconds> restart_grace;

  //! Standbys open their fence session before they wait, so a takeover costs no connection
  //! setup (a new server process: ~5 ms idle, 100 ms on a loaded server). false: standbys
  //! use one connection each and open the second when they win the election lock.
  bool standby_fence_session = true;

  //! After the Coordinator's Interrupter stops a wait, bound on draining the cancelled
  //! statement; on timeout the connection is closed instead.
  std::chrono::milliseconds cancel_timeout{1000};

  //! Shown in pg_stat_activity (libpq fallback_application_name: the connection string's
  //! application_name wins).
  std::string application_name = "workerlock";
};

//! Holds the primary role through PostgreSQL session-level advisory locks, each on a
//! dedicated connection. A standby blocks in `SELECT pg_advisory_lock(key)`, so it is
//! promoted as soon as the server frees the lock: when the holder releases it, or when the
//! holder's session ends (the server notices a crashed holder's closed socket at once).
//!
//! Two locks, two sessions. The election lock is `pg_advisory_lock(key)` (bigint) on the lock
//! session. While primary, a process also holds the handover lock `pg_advisory_lock(hi, lo)`
//! (the two int4 halves of the same key) on a second, fence session, and gives it up only
//! in release(), which the Coordinator calls after on_demoted. A new holder needs both, in
//! that order. So when the server ends the old holder's lock session behind its back
//! (pg_terminate_backend of that one session), the next holder waits until the old one
//! has noticed (its next verify_held()) and run on_demoted: the two never overlap. Once it
//! holds the handover lock, a new holder proves both sessions with one more round trip
//! before it is promoted: a standby whose lock session was ended while it waited (its
//! election lock gone, perhaps to a holder since) gives the handover lock back and is not
//! promoted. When the old holder process dies, both sessions close and the standby takes over at
//! once. Not covered: ending BOTH sessions of a live holder at the same moment (two
//! pg_terminate_backend calls, a script that kills idle sessions) while the standbys' sessions
//! survive; the successor is then promoted at once and the old holder steps down only at its next
//! verify_held(), up to verify_interval + command_timeout later. Fence downstream writes with
//! fencing_token().
//!
//! Who holds it, for operators (hi = key >> 32 and lo = key & 0xffffffff, both unsigned):
//!   SELECT pid, objsubid FROM pg_locks WHERE locktype = 'advisory' AND granted
//!     AND classid = <hi> AND objid = <lo>;   -- objsubid 1: lock session, 2: fence session
//! key_for("primary") = 9204049115472362304; in Python:
//!   h = 0xcbf29ce484222325
//!   for b in b"workerlock:" + name: h = ((h ^ b) * 0x100000001b3) % 2**64
//!   key = h - 2**64 if h >= 2**63 else h
//!
//! A server restart ends every session, and holders learn it only at their next
//! verify_held(): a new holder that finds the server younger than restart_grace waits out
//! the rest of it before being promoted. The server start is pg_postmaster_start_time(), or
//! the checkpointer's start after a crash restart when the role may see it (superuser,
//! pg_read_all_stats). Moving to another server (HA failover to a replica) is NOT covered:
//! locks do not replicate, so holders on the old server may overlap a new holder for up to
//! verify_interval + command_timeout; fence downstream writes with fencing_token().
//!
//! Connect directly or through a pooler in session mode. Transaction pooling (PgBouncer
//! pool_mode=transaction) breaks session locks: verify_held() then sees the server pid change
//! and demotes, but a lock may stay behind in a pooled server session.
//!
//! Fork: a child of fork() never uses, keeps or ends the parent's sessions (an atfork handler
//! points its copies of the sockets at /dev/null); in the child, held() is false. A copy made
//! by syscall(SYS_fork) or clone() without CLONE_VM runs no atfork handler: there the first
//! member called (the destructor, release(), reset() included) notices it from getpid() and
//! does the same before anything else, so it never writes (not even libpq's Terminate) on the
//! parent's sessions, nor waits for a mutex copied locked. For that, libpq calls on a
//! connected session run under a process-wide mutex that fork() takes too (they never wait
//! on the network); name lookups and connecting run without it, so a slow resolver (not
//! bounded by connect_timeout) never delays fork(). A connection that a fork() may have
//! copied while it was being set up is ended and made afresh (detail/pg_fork.hpp); the
//! child keeps its copy of that half-made connection (one close-on-exec socket per such
//! fork) until it exits, because libpq cannot be told to drop it without closing it.
//!
//! The local deadline, valid_until(). The holder proves its two sessions every
//! verify_interval (V) with one round trip bounded by command_timeout (C). A proof sent at s
//! shows the server life and both sessions were there at s or later, and what the holder
//! cannot see ends its hold no sooner than the protocol's window after s: after a server
//! restart (which came after s) a successor waits restart_grace, V + C by default; a cut-off
//! holder's locks are freed after the server's detection time, >= 2 (V + C) from s (the
//! options refuse less). So the holder trusts its hold until
//!   valid_until = s + V + C      (3 s after the last proof with the defaults)
//! where s is the instant just before the last successful proof was sent: the round trip on
//! both sessions that follows the handover lock (before the promotion), then each
//! verify_held(). verify_interval() shrinks so that the next check starts by s + V, and
//! that check gives up at valid_until. From valid_until on, verify_held() answers false
//! without a round trip, even if the sessions are still there: a Coordinator's role() has
//! read secondary since then, and a later success would bring primary back without
//! on_promoted. So a process paused past valid_until (SIGSTOP, a VM freeze) reads secondary
//! the moment it runs again, is demoted (on_demoted, the locks released), and takes part in
//! the election afresh. The coordinator thread checks nothing while on_startup or
//! on_promoted runs: a callback that runs past valid_until ends the hold the same way.
//! Use a restart_grace of at least V + C (the default) on every worker.
//!
//! Threads: driven by one thread at a time (the Coordinator's); held(), fencing_token(),
//! valid_until(), lock_session_pid(), fence_session_pid(), describe(), network_target(),
//! key(), options() and redacted_conninfo() from any thread at any time (atomics; the first
//! three are also async-signal-safe).
class PostgresBackend final : public Backend {
 public:
  //! The advisory lock key of a lock name: FNV-1a 64 of "workerlock:" + name, two's complement.
  static constexpr std::int64_t key_for(std::string_view name) noexcept {
    std::uint64_t h = 14695981039346656037ull;
    constexpr std::string_view prefix = "workerlock:";
    for (const char c : prefix) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    for (const char c : name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    return static_cast<std::int64_t>(h);
  }

  //! Effects: resolves the connection string ($WORKERLOCK_POSTGRES_URL when empty) and checks
  //! the options; connects nothing. A bad configuration is reported by prepare() and every
  //! acquisition, as a lock_error with code errc::bad_configuration.
  explicit PostgresBackend(PostgresOptions options = {})
      : options_(resolve(std::move(options))),
        conninfo_(detail::pg_parse_conninfo(options_.conninfo)),
        settings_(configure()),
        hold_(settings_, conninfo_.secrets) {}

  PostgresBackend(const PostgresBackend&) = delete;
  PostgresBackend& operator=(const PostgresBackend&) = delete;

  //! Closes both sessions (the server frees the locks). Never throws.
  ~PostgresBackend() override { reset(); }

  //! Throws: lock_error (errc::bad_configuration, equal to std::errc::invalid_argument) for a
  //! bad connection string or bad options. Every lock_error of this backend has an empty
  //! path() and target() = network_target() (the connection string with passwords ***).
  void prepare() override { check_configuration(); }

  //! One attempt: connects if needed (within connect_timeout), then pg_try_advisory_lock on
  //! each session (within command_timeout each), then one `SELECT pg_backend_pid()` round
  //! trip on both that proves them before it returns true. Returns false on contention, and
  //! also while the election lock is won but the handover lock or the restart grace is still
  //! pending (the next try_acquire() or wait_acquire() continues from there).
  //! Throws: lock_error when the server cannot be reached or a statement fails, or a session
  //! was ended by the server (ECONNRESET: also when the lock session was ended while it
  //! waited for the handover lock), or did not answer the final proof within command_timeout
  //! (ETIMEDOUT; the restart grace applies to the next attempt as after ECONNRESET); then
  //! nothing is held and both sessions are closed.
  bool try_acquire() override { return acquire(nullptr); }

  //! Waits in pg_advisory_lock on the lock session, then on the fence session, until both are
  //! held (true) or `interrupter` is interrupted (false: the server is asked to cancel the
  //! wait with PQcancel, and the session is kept). Throws as try_acquire(); a server that dies
  //! during the wait is noticed through the TCP keepalives.
  bool wait_acquire(Interrupter& interrupter) override { return acquire(&interrupter); }

  //! One `SELECT pg_backend_pid()` round trip on each session, sent together, answered by
  //! the server process that took the lock, within command_timeout and before valid_until()
  //! (false at once when that has passed: the hold can no longer be proven in time, see the
  //! top of this header). On success valid_until() moves on. False when a session is lost
  //! (closed, an error, another server process).
  //! Throws: lock_error (ETIMEDOUT) when a session did not answer in time and none was seen
  //! lost: the Backend contract's "cannot tell" (with the default schedule the deadline is
  //! valid_until() itself, so the Coordinator steps down at once).
  bool verify_held() override {
    hold_.adopt_after_fork();
    if (!hold_.held()) return false;
    const auto until = hold_.valid_until();
    const auto now = clock::now();
    if (now >= until) return false;
    const auto deadline = std::min(now + options_.command_timeout, until);
    switch (hold_.prove(deadline)) {
      case detail::pg_hold::proof::held:
        return true;
      case detail::pg_hold::proof::lost:
        return false;
      case detail::pg_hold::proof::late:
        break;
    }
    throw lock_error(
        "verify the PostgreSQL lock on", target(),
        std::error_code(ETIMEDOUT, std::system_category()),
        fmt::format("a session did not answer within {} ms",
                    std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count()));
  }

  //! verify_interval, shortened so that a check starts no later than valid_until() -
  //! command_timeout: verify_interval after the start of the last proof.
  std::chrono::milliseconds verify_interval() const noexcept override {
    if (!held()) return options_.verify_interval;
    const auto left = hold_.valid_until() - clock::now() - options_.command_timeout;
    return std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(left),
                      std::chrono::milliseconds(0), options_.verify_interval);
  }

  //! pg_advisory_unlock on both sessions (sent together, within command_timeout); a session
  //! that does not answer, or already failed, is closed instead. Never throws.
  void release() noexcept override {
    hold_.adopt_after_fork();
    hold_.release();
  }

  //! Closes both sessions: the server frees whatever they held. Never throws.
  void reset() noexcept override {
    hold_.adopt_after_fork();
    hold_.reset();
  }

  bool held() const noexcept override { return hold_.held(); }

  //! The instant, on this host's steady_clock, until which this process may act as the
  //! holder: the start of the last successful proof (the acquisition, or verify_held()) +
  //! verify_interval + command_timeout; time_point::min() while not held. See the top of this
  //! header for why. A Coordinator's role() reads secondary from then on, even before its
  //! thread has run verify_held() (a process paused past it). Any thread, async-signal-safe.
  std::chrono::steady_clock::time_point valid_until() const noexcept override {
    return held() ? hold_.valid_until() : clock::time_point::min();
  }

  //! `postgres=<connection string, password ***> lock=<name> key=<key>`.
  std::string describe() const override { return "postgres=" + network_target(); }
  //! `<connection string, password ***> lock=<name> key=<key>`: what lock_error::target()
  //! names in this backend's errors (and in the Coordinator's about it).
  std::string network_target() const override {
    if (options_.key) return fmt::format("{} key={}", conninfo_.redacted, settings_.key);
    return fmt::format("{} lock={} key={}", conninfo_.redacted, options_.name, settings_.key);
  }

  //! The transaction id allocated when this hold began (grows with every new holder on the
  //! server), or 0 when not held or fencing is off.
  std::uint64_t fencing_token() const noexcept override { return held() ? hold_.token() : 0; }

  std::int64_t key() const noexcept { return settings_.key; }
  const PostgresOptions& options() const noexcept { return options_; }
  //! The connection string with passwords replaced by ***.
  const std::string& redacted_conninfo() const noexcept { return conninfo_.redacted; }
  //! The server process ids of the lock session and the fence session while they hold their
  //! lock (0 otherwise): the `pid` column of pg_locks and pg_stat_activity.
  int lock_session_pid() const noexcept { return hold_.session_pid(0); }
  int fence_session_pid() const noexcept { return hold_.session_pid(1); }

 private:
  using clock = std::chrono::steady_clock;

  // ------------------------------------------------------------------------------------------
  // Configuration
  // ------------------------------------------------------------------------------------------

  //! The connection string from $WORKERLOCK_POSTGRES_URL when empty; the default grace.
  static PostgresOptions resolve(PostgresOptions options) {
    if (options.conninfo.empty()) {
      if (const char* env = std::getenv("WORKERLOCK_POSTGRES_URL"); env != nullptr)
        options.conninfo = env;
    }
    if (!options.restart_grace)
      options.restart_grace = options.verify_interval + options.command_timeout;
    return options;
  }

  //! Checks the options (the first problem lands in config_error_) and resolves them.
  detail::pg_hold_settings configure() {
    detail::pg_hold_settings settings;
    settings.key = options_.key ? *options_.key : key_for(options_.name);
    settings.verify_interval = options_.verify_interval;
    settings.command_timeout = options_.command_timeout;
    settings.cancel_timeout = options_.cancel_timeout;
    settings.restart_grace = *options_.restart_grace;
    settings.fencing = options_.fencing;
    settings.standby_fence_session = options_.standby_fence_session;
    settings.session = {options_.server_keepalives, options_.keepalives_idle,
                        options_.keepalives_interval, options_.keepalives_count,
                        options_.tcp_user_timeout};
    const auto bad = [&](std::string why) {
      if (config_error_.empty()) config_error_ = std::move(why);
    };
    if (options_.conninfo.empty()) {
      bad("no connection string: set PostgresOptions::conninfo or $WORKERLOCK_POSTGRES_URL (a "
          "libpq conninfo such as 'host=db dbname=app user=app', or a postgresql:// URL)");
    }
    if (!options_.key && options_.name.empty()) bad("the lock name is empty and no key is given");
    if (options_.connect_timeout < std::chrono::milliseconds(10))
      bad("connect_timeout must be at least 10 ms");
    if (options_.verify_interval < std::chrono::milliseconds(10))
      bad("verify_interval must be at least 10 ms");
    if (options_.command_timeout < std::chrono::milliseconds(10))
      bad("command_timeout must be at least 10 ms");
    if (options_.cancel_timeout < std::chrono::milliseconds(1))
      bad("cancel_timeout must be at least 1 ms");
    if (options_.keepalives_idle < std::chrono::seconds(1) ||
        options_.keepalives_interval < std::chrono::seconds(1) || options_.keepalives_count < 1) {
      bad("keepalives_idle and keepalives_interval must be at least 1 s, keepalives_count at least "
          "1");
    }
    if (options_.tcp_user_timeout < std::chrono::milliseconds(0))
      bad("tcp_user_timeout must not be negative");
    if (*options_.restart_grace < std::chrono::milliseconds(0))
      bad("restart_grace must not be negative");
    if (options_.server_keepalives) {
      auto detection = std::chrono::duration_cast<std::chrono::milliseconds>(
          options_.keepalives_idle + options_.keepalives_interval * options_.keepalives_count);
      if (options_.tcp_user_timeout.count() > 0)
        detection = std::min(detection, options_.tcp_user_timeout);
      if (2 * (options_.verify_interval + options_.command_timeout) > detection) {
        bad(fmt::format(
            "2 * (verify_interval + command_timeout) = {} ms exceeds the {} ms in which the server "
            "frees the lock of a silent holder (min(tcp_user_timeout, keepalives_idle + "
            "keepalives_interval * keepalives_count)): a cut-off holder could still act as primary "
            "when the next one is promoted",
            2 * (options_.verify_interval + options_.command_timeout).count(), detection.count()));
      }
    }
    if (!config_error_.empty()) return settings;
    if (!conninfo_.parsed()) {
      bad("the connection string does not parse: " + conninfo_.error);
      return settings;
    }
    std::chrono::milliseconds connect_timeout = options_.connect_timeout;
    bool has_fallback_name = false;
    std::vector<std::string> given;
    auto& params = settings.connect_params;
    for (const auto& [keyword, value] : conninfo_.given) {
      if (keyword == "connect_timeout") {
        const int seconds = std::atoi(value.c_str());  // libpq: at least 2 s; <= 0: no limit
        if (seconds > 0) connect_timeout = std::chrono::seconds(std::max(seconds, 2));
      }
      if (keyword == "fallback_application_name") has_fallback_name = true;
      given.push_back(keyword);
      params.keywords.push_back(keyword);
      params.values.push_back(value);
    }
    settings.connect_timeout = connect_timeout;
    const auto add_default = [&](const char* keyword, std::string value) {
      if (std::find(given.begin(), given.end(), keyword) != given.end()) return;
      params.keywords.emplace_back(keyword);
      params.values.push_back(std::move(value));
    };
    add_default("keepalives", "1");
    add_default("keepalives_idle", std::to_string(options_.keepalives_idle.count()));
    add_default("keepalives_interval", std::to_string(options_.keepalives_interval.count()));
    add_default("keepalives_count", std::to_string(options_.keepalives_count));
    if (options_.tcp_user_timeout.count() > 0)
      add_default("tcp_user_timeout", std::to_string(options_.tcp_user_timeout.count()));
    if (!has_fallback_name && !options_.application_name.empty())
      add_default("fallback_application_name", options_.application_name);
    return settings;
  }

  void check_configuration() const {
    if (config_error_.empty()) return;
    throw lock_error("use the PostgreSQL lock on", target(),
                     make_error_code(errc::bad_configuration), config_error_);
  }

  lock_error::network_target target() const { return {network_target()}; }

  // ------------------------------------------------------------------------------------------
  // Acquisition
  // ------------------------------------------------------------------------------------------

  //! Waits (interruptibly) when given an `interrupter`, tries once without.
  bool acquire(Interrupter* interrupter) {
    hold_.adopt_after_fork();
    check_configuration();
    if (hold_.held()) return true;
    if (interrupter != nullptr && interrupter->interrupted()) return false;
    detail::failure f;
    std::string why;
    const bool got = hold_.acquire(interrupter, f, why);
    if (f) throw lock_error(f.operation, target(), f.code, why);
    return got;
  }

  PostgresOptions options_;
  detail::pg_conninfo conninfo_;  // parsed and redacted
  std::string config_error_;      // the first problem with the options, if any
  detail::pg_hold_settings settings_;
  detail::pg_hold hold_;
};

}  // namespace workerlock
