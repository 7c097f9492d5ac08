// workerlock/postgres.hpp: PostgresBackend, the Coordinator's backend on PostgreSQL session
// advisory locks, for workers on several hosts sharing one PostgreSQL server.
//
// Needs libpq (the only workerlock header that includes <libpq-fe.h>): link with -lpq, or use
// the CMake target workerlock::postgres. Works with PostgreSQL servers >= 9.6 (fencing tokens
// come from pg_current_xact_id() on >= 13, txid_current() before).
#pragma once

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <libpq-fe.h>

#include "backend.hpp"
#include "detail/pg_conninfo.hpp"
#include "detail/posix.hpp"
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

  //! After interrupt() stops a wait, bound on draining the cancelled statement; on timeout
  //! the connection is closed instead.
  std::chrono::milliseconds cancel_timeout{1000};

  //! Shown in pg_stat_activity (libpq fallback_application_name: the connection string's
  //! application_name wins).
  std::string application_name = "workerlock";
};

class PostgresBackend;

namespace detail {

//! What the fork handlers need of one PostgresBackend: its connections and its eventfd.
struct pg_fork_state {
  PGconn* conn[2] = {nullptr, nullptr};
  int event_fd = -1;
  std::atomic<bool> inherited{false};  // set in a child of fork(): the connections are not ours
  bool leak = false;                   // the child could not neutralize them: never touch
};

struct pg_registry {
  std::mutex mutex;
  std::vector<pg_fork_state*> states;
  int devnull = -1;
  //! The process whose connections the registered states hold; -pid while a copy made
  //! without the atfork handlers is adopting them (see pg_adopt_process()).
  std::atomic<pid_t> owner{0};
};

//! Every libpq call on a backend's connections runs under this mutex, so fork() never copies
//! a connection half set up or half closed.
inline pg_registry& pg_registry_instance() {
  static pg_registry* instance =
      new pg_registry();  // never destroyed: atfork handlers outlive exit
  return *instance;
}

//! In a child of fork(), no connection of the parent may be used, kept open or closed with
//! a Terminate message: the child would keep the parent's session (and lock) alive, or end it.
//! Each inherited socket becomes /dev/null; the backend then frees the copies unseen.
//! Async-signal-safe (dup3, close, eventfd).
inline void pg_neutralize_inherited(pg_registry& reg) noexcept {
  for (pg_fork_state* state : reg.states) {
    for (PGconn*& conn : state->conn) {
      if (conn == nullptr) continue;
      const int fd = PQsocket(conn);
      if (fd < 0) continue;
      if (reg.devnull < 0 || ::dup3(reg.devnull, fd, O_CLOEXEC) < 0) {
        ::close(fd);
        state->leak = true;
      }
    }
    if (state->event_fd >= 0) {  // the parent's interrupt() must not wake the child, nor back
      const int fresh = keep_off_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      if (fresh >= 0) {
        ::dup3(fresh, state->event_fd, O_CLOEXEC);
        ::close(fresh);
      }
    }
    state->inherited.store(true);
  }
}

inline void pg_adopt_process() noexcept;
inline void pg_atfork_prepare() noexcept {
  pg_adopt_process();  // a copy made by syscall(SYS_fork) may hold the mutex copied locked
  pg_registry_instance().mutex.lock();
}
inline void pg_atfork_parent() noexcept { pg_registry_instance().mutex.unlock(); }
inline void pg_atfork_child() noexcept {
  auto& reg = pg_registry_instance();
  pg_neutralize_inherited(reg);
  reg.owner.store(::getpid());
  reg.mutex.unlock();
}

//! A copy of the process made without the atfork handlers (syscall(SYS_fork), clone()
//! without CLONE_VM) inherits the parent's connections as they are, and the mutex maybe
//! locked by a thread that does not exist in the copy. Asks the kernel who we are (a cached
//! pid would still be the parent's there) and, in such a copy, does once what
//! pg_atfork_child() would have done. Every PostgresBackend member that may touch a
//! connection, the mutex or the eventfd calls this first; it costs one getpid().
inline void pg_adopt_process() noexcept {
  auto& reg = pg_registry_instance();
  const pid_t me = ::getpid();
  pid_t owner = reg.owner.load();
  if (owner == me) return;
  if (owner != -me && reg.owner.compare_exchange_strong(owner, -me)) {
    // Nobody in this process holds the mutex: the thread that held it at the copy (if any)
    // exists only in the parent. A fresh one replaces the copy.
    new (&reg.mutex) std::mutex();
    pg_neutralize_inherited(reg);
    reg.owner.store(me);
    return;
  }
  while (reg.owner.load() != me) ::sched_yield();  // another thread of the copy adopts them
}

//! True when the registered connections belong to this process (no adoption pending).
inline bool pg_process_owns_connections() noexcept {
  return pg_registry_instance().owner.load() == ::getpid();
}

inline void pg_register(pg_fork_state* state) {
  static std::once_flag once;
  std::call_once(once, [] {
    auto& reg = pg_registry_instance();
    reg.devnull = keep_off_standard_streams(::open("/dev/null", O_RDWR | O_CLOEXEC));
    reg.owner.store(::getpid());
    ::pthread_atfork(&pg_atfork_prepare, &pg_atfork_parent, &pg_atfork_child);
  });
  pg_adopt_process();
  auto& reg = pg_registry_instance();
  std::lock_guard<std::mutex> guard(reg.mutex);
  reg.states.push_back(state);
}

inline void pg_unregister(pg_fork_state* state) noexcept {
  pg_adopt_process();
  auto& reg = pg_registry_instance();
  std::lock_guard<std::mutex> guard(reg.mutex);
  reg.states.erase(std::remove(reg.states.begin(), reg.states.end(), state), reg.states.end());
}

struct pg_result_deleter {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using pg_result = std::unique_ptr<PGresult, pg_result_deleter>;

inline void pg_ignore_notice(void*, const char*) noexcept {}

}  // namespace detail

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
//! parent's sessions, nor waits for a mutex copied locked. For that,
//! every libpq call runs under one process-wide mutex that fork() takes too, including the
//! host name lookup of a new connection: a slow resolver (not bounded by connect_timeout)
//! delays fork() and the other PostgresBackends of the process. Give an IP address (hostaddr)
//! where that matters.
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
//! Threads: driven by one thread at a time (the Coordinator's); interrupt() from any thread;
//! held(), fencing_token(), valid_until(), lock_session_pid(), fence_session_pid(),
//! describe(), network_target(), key(), options() and redacted_conninfo() from any thread
//! at any time (atomics; the first three are also async-signal-safe).
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
  explicit PostgresBackend(PostgresOptions options = {}) : options_(std::move(options)) {
    if (options_.conninfo.empty()) {
      if (const char* env = std::getenv("WORKERLOCK_POSTGRES_URL"); env != nullptr)
        options_.conninfo = env;
    }
    key_ = options_.key ? *options_.key : key_for(options_.name);
    key_text_ = std::to_string(key_);
    hi_text_ = std::to_string(static_cast<std::int32_t>(static_cast<std::uint64_t>(key_) >> 32));
    lo_text_ =
        std::to_string(static_cast<std::int32_t>(static_cast<std::uint64_t>(key_) & 0xffffffffu));
    auto conninfo = detail::pg_parse_conninfo(options_.conninfo);
    redacted_ = std::move(conninfo.redacted);
    secrets_ = std::move(conninfo.secrets);
    if (!options_.restart_grace)
      options_.restart_grace = options_.verify_interval + options_.command_timeout;
    configure(conninfo);
    state_.event_fd = detail::keep_off_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (state_.event_fd < 0 && config_error_.empty()) {
      config_errno_ = errno;
      config_error_ = "cannot create the eventfd that interrupt() writes to";
    }
    detail::pg_register(&state_);
  }

  PostgresBackend(const PostgresBackend&) = delete;
  PostgresBackend& operator=(const PostgresBackend&) = delete;

  //! Closes both sessions (the server frees the locks). Never throws.
  ~PostgresBackend() override {
    reset();
    detail::pg_unregister(&state_);
    if (state_.event_fd >= 0) ::close(state_.event_fd);
  }

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
  bool try_acquire() override { return acquire(false); }

  //! Waits in pg_advisory_lock on the lock session, then on the fence session, until both are
  //! held (true) or interrupt() is called (false: the server is asked to cancel the wait
  //! with PQcancel, and the session is kept). Throws as try_acquire(); a server that dies
  //! during the wait is noticed through the TCP keepalives.
  bool wait_acquire() override { return acquire(true); }

  //! Wakes a wait_acquire() on another thread (an eventfd write). Async-signal-safe.
  void interrupt() noexcept override {
    interrupted_.store(true);
    // A copy of the process not yet adopted shares the parent's eventfd: the flag is enough
    // (acquire() checks it after adopting).
    if (!detail::pg_process_owns_connections()) return;
    const std::uint64_t one = 1;
    [[maybe_unused]] auto ignored = ::write(state_.event_fd, &one, sizeof one);
  }
  void clear_interrupt() noexcept override {
    detail::pg_adopt_process();  // never drain the parent's eventfd
    interrupted_.store(false);
    std::uint64_t count = 0;
    [[maybe_unused]] auto ignored = ::read(state_.event_fd, &count, sizeof count);
  }

  //! One `SELECT pg_backend_pid()` round trip on each session, sent together, answered by
  //! the server process that took the lock, within command_timeout and before valid_until()
  //! (false at once when that has passed: the hold can no longer be proven in time, see the
  //! top of this header). On success valid_until() moves on. Never throws.
  bool verify_held() override {
    adopt_after_fork();
    if (!held_.load()) return false;
    const auto until = stored_valid_until();
    const auto now = clock::now();
    if (now >= until) return false;
    return prove(std::min(now + options_.command_timeout, until)) == proof::held;
  }

  //! verify_interval, shortened so that a check starts no later than valid_until() -
  //! command_timeout: verify_interval after the start of the last proof.
  std::chrono::milliseconds verify_interval() const noexcept override {
    if (!held()) return options_.verify_interval;
    const auto left = stored_valid_until() - clock::now() - options_.command_timeout;
    return std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(left),
                      std::chrono::milliseconds(0), options_.verify_interval);
  }

  //! pg_advisory_unlock on both sessions (sent together, within command_timeout); a session
  //! that does not answer, or already failed, is closed instead. Never throws.
  void release() noexcept override {
    adopt_after_fork();
    held_.store(false);
    token_.store(0);
    set_valid_until(clock::time_point::min());
    if (!locked_[0] && !locked_[1]) return;
    const auto deadline = clock::now() + options_.command_timeout;
    bool sent[2] = {false, false};
    detail::failure f;
    if (locked_[0])
      sent[0] = send(0, "SELECT pg_advisory_unlock($1::int8)", {key_text_.c_str()}, f);
    if (locked_[1])
      sent[1] = send(1, "SELECT pg_advisory_unlock($1::int4, $2::int4)",
                     {hi_text_.c_str(), lo_text_.c_str()}, f);
    for (int i = 0; i < 2; ++i) {
      if (!locked_[i]) continue;
      detail::pg_result r;
      detail::failure g;
      const bool unlocked = sent[i] && await(i, deadline, false, r, g) == outcome::done &&
                            rows(r, 1) && PQgetvalue(r.get(), 0, 0)[0] == 't';
      locked_[i] = false;
      pid_[i] = 0;
      if (!unlocked) close(i);
    }
  }

  //! Closes both sessions: the server frees whatever they held. Never throws.
  void reset() noexcept override {
    adopt_after_fork();
    held_.store(false);
    token_.store(0);
    set_valid_until(clock::time_point::min());
    close(0);
    close(1);
  }

  bool held() const noexcept override {
    return held_.load() && !state_.inherited.load() && detail::pg_process_owns_connections();
  }

  //! The instant, on this host's steady_clock, until which this process may act as the
  //! holder: the start of the last successful proof (the acquisition, or verify_held()) +
  //! verify_interval + command_timeout; time_point::min() while not held. See the top of this
  //! header for why. A Coordinator's role() reads secondary from then on, even before its
  //! thread has run verify_held() (a process paused past it). Any thread, async-signal-safe.
  std::chrono::steady_clock::time_point valid_until() const noexcept override {
    return held() ? stored_valid_until() : clock::time_point::min();
  }

  //! `postgres=<connection string, password ***> lock=<name> key=<key>`.
  std::string describe() const override { return "postgres=" + network_target(); }
  //! `<connection string, password ***> lock=<name> key=<key>`: what lock_error::target()
  //! names in this backend's errors (and in the Coordinator's about it).
  std::string network_target() const override {
    if (options_.key) return fmt::format("{} key={}", redacted_, key_);
    return fmt::format("{} lock={} key={}", redacted_, options_.name, key_);
  }

  //! The transaction id allocated when this hold began (grows with every new holder on the
  //! server), or 0 when not held or fencing is off.
  std::uint64_t fencing_token() const noexcept override { return held() ? token_.load() : 0; }

  std::int64_t key() const noexcept { return key_; }
  const PostgresOptions& options() const noexcept { return options_; }
  //! The connection string with passwords replaced by ***.
  const std::string& redacted_conninfo() const noexcept { return redacted_; }
  //! The server process ids of the lock session and the fence session while they hold their
  //! lock (0 otherwise): the `pid` column of pg_locks and pg_stat_activity.
  int lock_session_pid() const noexcept { return locked_[0].load() ? pid_[0].load() : 0; }
  int fence_session_pid() const noexcept { return locked_[1].load() ? pid_[1].load() : 0; }

 private:
  using clock = std::chrono::steady_clock;
  enum class outcome { done, timed_out, interrupted, failed };

  // ------------------------------------------------------------------------------------------
  // Configuration
  // ------------------------------------------------------------------------------------------

  void configure(detail::pg_conninfo& conninfo) {
    const auto bad = [&](std::string why) {
      if (config_error_.empty()) config_error_ = std::move(why);
    };
    if (options_.conninfo.empty()) {
      bad("no connection string: set PostgresOptions::conninfo or $WORKERLOCK_POSTGRES_URL (a "
          "libpq "
          "conninfo such as 'host=db dbname=app user=app', or a postgresql:// URL)");
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
    if (!config_error_.empty()) return;

    if (!conninfo.parsed()) {
      bad("the connection string does not parse: " + conninfo.error);
      return;
    }
    std::chrono::milliseconds connect_timeout = options_.connect_timeout;
    bool has_fallback_name = false;
    std::vector<std::string> given;
    for (auto& [keyword, value] : conninfo.given) {
      if (keyword == "connect_timeout") {
        const int seconds = std::atoi(value.c_str());  // libpq: at least 2 s; <= 0: no limit
        if (seconds > 0) connect_timeout = std::chrono::seconds(std::max(seconds, 2));
      }
      if (keyword == "fallback_application_name") has_fallback_name = true;
      given.push_back(keyword);
      keywords_.push_back(std::move(keyword));
      values_.push_back(std::move(value));
    }
    connect_timeout_ = connect_timeout;
    const auto add_default = [&](const char* keyword, std::string value) {
      if (std::find(given.begin(), given.end(), keyword) != given.end()) return;
      keywords_.emplace_back(keyword);
      values_.push_back(std::move(value));
    };
    add_default("keepalives", "1");
    add_default("keepalives_idle", std::to_string(options_.keepalives_idle.count()));
    add_default("keepalives_interval", std::to_string(options_.keepalives_interval.count()));
    add_default("keepalives_count", std::to_string(options_.keepalives_count));
    if (options_.tcp_user_timeout.count() > 0)
      add_default("tcp_user_timeout", std::to_string(options_.tcp_user_timeout.count()));
    if (!has_fallback_name && !options_.application_name.empty())
      add_default("fallback_application_name", options_.application_name);
  }

  void check_configuration() const {
    if (config_error_.empty()) return;
    throw lock_error("use the PostgreSQL lock on", target(),
                     config_errno_ != 0 ? std::error_code(config_errno_, std::system_category())
                                        : make_error_code(errc::bad_configuration),
                     config_error_);
  }

  lock_error::network_target target() const { return {network_target()}; }

  std::string scrub(std::string_view text) const {
    return detail::pg_scrub(std::string(text), secrets_);
  }

  // ------------------------------------------------------------------------------------------
  // Acquisition
  // ------------------------------------------------------------------------------------------

  bool acquire(bool wait) {
    adopt_after_fork();
    check_configuration();
    if (held_.load()) return true;
    if (wait && interrupted_.load()) return false;
    detail::failure f;
    std::string why;
    const bool got = advance(wait, f, why);
    if (f) {
      reset();  // an error never leaves a lock behind
      // The server ended our session: it may have ended the holder's too (every session of
      // the role killed, a restart), and the holder learns it only at its next check.
      if (f.code.value() == ECONNRESET) grace_floor_ = clock::now() + *options_.restart_grace;
      throw lock_error(f.operation, target(), f.code, why);
    }
    return got;
  }

  //! Moves towards holding both locks. Returns true when promoted; false on contention,
  //! interruption or a pending grace; sets `f` and `why` on errors.
  bool advance(bool wait, detail::failure& f, std::string& why) {
    const auto command_deadline = [&] {
      return wait ? clock::time_point::max() : clock::now() + options_.command_timeout;
    };
    if (!locked_[0]) {
      if (!connected(0) && !connect(0, wait, f, why)) return false;
      if (options_.standby_fence_session && !connected(1) && !connect(1, wait, f, why))
        return false;
      detail::pg_result r;
      const bool got = lock_statement(0, wait, command_deadline(), r, f, why);
      if (f || !got) return false;
      locked_[0] = true;
      pid_[0] = std::atoi(PQgetvalue(r.get(), 0, 1));
    }
    if (!locked_[1]) {
      if (!connected(1) && !connect(1, wait, f, why)) return false;
      if (life_start_[0] != life_start_[1]) {
        f.set(EXDEV, "take the PostgreSQL lock on");
        why =
            "the lock session and the fence session reached different servers, or the server "
            "restarted in between (a multi-host connection string needs "
            "target_session_attrs=read-write or primary)";
        return false;
      }
      detail::pg_result r;
      const bool got = lock_statement(1, wait, command_deadline(), r, f, why);
      if (f || !got) return false;
      locked_[1] = true;
      pid_[1] = std::atoi(PQgetvalue(r.get(), 0, 1));
      token_ = std::strtoull(PQgetvalue(r.get(), 0, 2), nullptr, 10);
      const auto uptime = std::chrono::milliseconds(std::atoll(PQgetvalue(r.get(), 0, 3)));
      not_before_ = std::max(
          grace_floor_,
          clock::now() + std::max(std::chrono::milliseconds(0), *options_.restart_grace - uptime));
    }
    if (clock::now() < not_before_) {
      if (!wait) return false;
      if (wait_io(-1, 0, not_before_, true) == outcome::interrupted) return false;
    }
    // The handover lock's statement proves only the fence session. The lock session took the
    // election lock earlier and has been silent since: the server may have ended it while we
    // waited, and someone else may have taken the election lock, and both locks, since. One
    // round trip on both sessions, answered by the same server processes, proves that they
    // still hold both locks now (a session ended by the server drops its locks and never
    // comes back); its start is the hold's proof for valid_until. If it fails, acquire()
    // closes both sessions, which frees the handover lock again: never promoted.
    switch (prove(clock::now() + options_.command_timeout)) {
      case proof::held:
        break;
      case proof::lost:
        f.set(ECONNRESET, "take the PostgreSQL lock on");
        why =
            "a session was lost when both locks were finally held (the lock session may have "
            "been ended while it waited for the handover lock)";
        return false;
      case proof::late:
        // Not known to be lost, but not known to be alive either: a session the server ended
        // behind a network fault looks the same until the fault heals, and whatever ended
        // ours may have ended the holder's sessions too (which it learns only at its next
        // check). So the restart grace applies as after a lost session; only the code
        // differs. acquire() sets grace_floor_ for ECONNRESET; here it is set directly.
        f.set(ETIMEDOUT, "take the PostgreSQL lock on");
        why = fmt::format(
            "a session did not answer within command_timeout ({} ms) when both locks were "
            "finally held",
            options_.command_timeout.count());
        grace_floor_ = clock::now() + *options_.restart_grace;
        return false;
    }
    held_.store(true);  // after valid_until_: a reader never sees a hold without its deadline
    return true;
  }

  //! One `SELECT pg_backend_pid()` on each session, sent together and answered by `deadline`
  //! by the server processes that took the locks. On success, valid_until_ becomes the
  //! instant just before they were sent + verify_interval + command_timeout. `late` when a
  //! session did not answer by `deadline` and none was seen lost (closed, an error, another
  //! server process); `lost` when one was.
  enum class proof { held, late, lost };
  proof prove(clock::time_point deadline) {
    const auto start = clock::now();
    detail::failure f;
    bool sent[2] = {false, false};
    for (int i = 0; i < 2; ++i) sent[i] = send(i, "SELECT pg_backend_pid()", {}, f);
    bool lost = !sent[0] || !sent[1];
    bool late = false;
    for (int i = 0; i < 2; ++i) {
      if (!sent[i]) continue;
      detail::pg_result r;
      detail::failure g;
      const auto answer = await(i, deadline, false, r, g);
      if (answer == outcome::timed_out) {
        late = true;
        broken_[i] = true;
      } else if (answer != outcome::done || !rows(r, 1) ||
                 std::atoi(PQgetvalue(r.get(), 0, 0)) != pid_[i].load()) {
        lost = true;
        broken_[i] = true;
      }
    }
    if (lost) return proof::lost;
    if (late) return proof::late;
    set_valid_until(start + options_.verify_interval + options_.command_timeout);
    return proof::held;
  }

  clock::time_point stored_valid_until() const noexcept {
    return clock::time_point(clock::duration(valid_until_.load()));
  }
  void set_valid_until(clock::time_point t) noexcept {
    valid_until_.store(t.time_since_epoch().count());
  }

  //! The lock statement of session i: returns whether it is now held, with the row
  //! (got, pid[, token, milliseconds since the server started]) in `r`.
  bool lock_statement(int i, bool wait, clock::time_point deadline, detail::pg_result& r,
                      detail::failure& f, std::string& why) {
    const char* sql = sql_[i][wait ? 1 : 0].c_str();
    const bool sent =
        i == 0 ? send(i, sql, {key_text_.c_str()}, f)
               : send(i, sql, {hi_text_.c_str(), lo_text_.c_str(), life_start_[1].c_str()}, f);
    if (!sent) {
      why = last_error_;
      return false;
    }
    switch (await(i, deadline, wait, r, f)) {
      case outcome::done:
        break;
      case outcome::interrupted:
        r = cancel(i);
        if (!r) return false;
        break;
      case outcome::timed_out:
        why = fmt::format("no answer within command_timeout ({} ms)",
                          options_.command_timeout.count());
        f.set(ETIMEDOUT, "take the PostgreSQL lock on");
        return false;
      case outcome::failed:
        why = last_error_;
        return false;
    }
    if (!check_result(i, r, i == 0 ? 2 : 4, f, why)) return false;
    return PQgetvalue(r.get(), 0, 0)[0] == 't';
  }

  bool check_result(int i, const detail::pg_result& r, int columns, detail::failure& f,
                    std::string& why) const {
    const auto status = PQresultStatus(r.get());
    if (status == PGRES_TUPLES_OK && PQntuples(r.get()) == 1 && PQnfields(r.get()) == columns)
      return true;
    const char* state = PQresultErrorField(r.get(), PG_DIAG_SQLSTATE);
    // FATAL (pg_terminate_backend, shutdown): the session is gone.
    f.set(PQstatus(state_.conn[i]) == CONNECTION_OK ? EIO : ECONNRESET,
          "take the PostgreSQL lock on");
    why = scrub(PQresultErrorMessage(r.get()));
    if (why.empty()) why = fmt::format("unexpected result {}", PQresStatus(status));
    if (state != nullptr && std::strcmp(state, "25006") == 0 && options_.fencing) {
      why +=
          "; fencing tokens need a read-write server: connect to the primary, or set "
          "PostgresOptions::fencing = false";
    }
    return false;
  }

  //! After interrupt() during a lock wait: PQcancel, then drain within cancel_timeout. Returns
  //! the statement's result if the lock was granted before the cancel landed; otherwise null
  //! (the session stays open when it drained cleanly, and is closed if not).
  //! PQcancel opens a connection of its own and blocks while doing so; libpq >= 15 bounds that
  //! with tcp_user_timeout.
  detail::pg_result cancel(int i) {
    bool cancelled = false;
    PGcancel* c = nullptr;
    {
      std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
      if (PQstatus(state_.conn[i]) == CONNECTION_OK) c = PQgetCancel(state_.conn[i]);
    }
    if (c != nullptr) {
      char error[256];
      cancelled = PQcancel(c, error, sizeof error) == 1;
      PQfreeCancel(c);
    }
    detail::pg_result r;
    detail::failure f;
    if (!cancelled ||
        await(i, clock::now() + options_.cancel_timeout, false, r, f) != outcome::done) {
      close(i);
      return {};
    }
    const auto status = PQresultStatus(r.get());
    if (status == PGRES_TUPLES_OK) return r;  // granted just before the cancel
    return {};
  }

  // ------------------------------------------------------------------------------------------
  // Connections
  // ------------------------------------------------------------------------------------------

  bool connected(int i) const noexcept { return state_.conn[i] != nullptr && !broken_[i]; }

  void close(int i) noexcept {
    {
      std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
      if (state_.conn[i] != nullptr) PQfinish(state_.conn[i]);
      state_.conn[i] = nullptr;
    }
    broken_[i] = false;
    locked_[i] = false;
    pid_[i] = 0;
    life_start_[i].clear();
  }

  //! Adopts the state after fork(): the parent's connections were neutralized by the atfork
  //! handler; free them without a word to the server.
  void adopt_after_fork() noexcept {
    detail::pg_adopt_process();  // also after syscall(SYS_fork), which runs no atfork handler
    if (!state_.inherited.load()) return;
    {
      std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
      for (PGconn*& conn : state_.conn) {
        if (conn != nullptr && !state_.leak) PQfinish(conn);
        conn = nullptr;
      }
      state_.leak = false;
      state_.inherited.store(false);
    }
    for (int i = 0; i < 2; ++i) {
      broken_[i] = false;
      locked_[i] = false;
      pid_[i] = 0;
    }
    held_.store(false);
    token_.store(0);
    set_valid_until(clock::time_point::min());
  }

  std::string connection_error(int i) const {
    return scrub(state_.conn[i] != nullptr ? PQerrorMessage(state_.conn[i]) : "out of memory");
  }

  //! An errno that names the failure, for error codes; the message always has libpq's text.
  int classify_connect_error(int i, const std::string& message) const {
    if (state_.conn[i] != nullptr && PQconnectionNeedsPassword(state_.conn[i])) return EACCES;
    if (message.find("authentication failed") != std::string::npos) return EACCES;
    if (message.find("Connection refused") != std::string::npos) return ECONNREFUSED;
    if (message.find("could not translate host name") != std::string::npos) return EHOSTUNREACH;
    return EIO;
  }

  //! Connects session i within connect_timeout (interruptibly if `wait`), then sets up the
  //! session. Returns false with `f` empty when interrupted.
  bool connect(int i, bool wait, detail::failure& f, std::string& why) {
    close(i);
    const auto deadline = clock::now() + connect_timeout_;
    std::vector<const char*> keywords;
    std::vector<const char*> values;
    for (std::size_t k = 0; k < keywords_.size(); ++k) {
      keywords.push_back(keywords_[k].c_str());
      values.push_back(values_[k].c_str());
    }
    keywords.push_back(nullptr);
    values.push_back(nullptr);
    PostgresPollingStatusType status = PGRES_POLLING_WRITING;
    {
      std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
      state_.conn[i] = PQconnectStartParams(keywords.data(), values.data(), 0);
      if (state_.conn[i] != nullptr) {
        PQsetNoticeProcessor(state_.conn[i], &detail::pg_ignore_notice, nullptr);
        if (PQstatus(state_.conn[i]) == CONNECTION_BAD) status = PGRES_POLLING_FAILED;
      } else {
        status = PGRES_POLLING_FAILED;
      }
    }
    constexpr const char* operation = "connect to PostgreSQL";
    while (status != PGRES_POLLING_OK) {
      if (status == PGRES_POLLING_FAILED) {
        why = connection_error(i);
        f.set(classify_connect_error(i, why), operation);
        close(i);
        return false;
      }
      const short events = status == PGRES_POLLING_READING ? POLLIN : POLLOUT;
      switch (wait_io(PQsocket(state_.conn[i]), events, deadline, wait)) {
        case outcome::done:
          break;
        case outcome::interrupted:
          close(i);
          return false;
        case outcome::timed_out:
          why =
              fmt::format("no connection within {} ms (connect_timeout)", connect_timeout_.count());
          f.set(ETIMEDOUT, operation);
          close(i);
          return false;
        case outcome::failed:
          why = fmt::format("poll failed: {}", std::strerror(errno));
          f.set(errno, operation);
          close(i);
          return false;
      }
      std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
      status = PQconnectPoll(state_.conn[i]);
    }
    // libpq creates its socket itself and keeps its number: workerlock cannot move it off
    // the standard streams. There, a log line written to stderr would corrupt the protocol,
    // and a reopening of that stream would close the session: either ends the lock unseen.
    if (const int socket_fd = PQsocket(state_.conn[i]); socket_fd >= 0 && socket_fd <= 2) {
      why = fmt::format(
          "libpq's socket is descriptor {}, a standard stream (0, 1 or 2 was closed in this "
          "process), where a write to that stream or its reopening would end the session and "
          "its lock; open /dev/null on descriptors 0, 1 and 2 before connecting",
          socket_fd);
      f.set(EBADF, operation);
      close(i);
      return false;
    }
    if (PQsetnonblocking(state_.conn[i], 1) != 0) {
      why = connection_error(i);
      f.set(EIO, operation);
      close(i);
      return false;
    }
    build_statements(i);
    // The session must never time out on its own: the wait is meant to be long and the holder
    // idles between checks. Then the server-side keepalives.
    std::string setup =
        "SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout "
        "= 0";
    const int version = PQserverVersion(state_.conn[i]);
    if (version >= 140000) setup += "; SET idle_session_timeout = 0";
    if (options_.server_keepalives) {
      setup += fmt::format(
          "; SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET "
          "tcp_keepalives_count = {}",
          options_.keepalives_idle.count(), options_.keepalives_interval.count(),
          options_.keepalives_count);
      if (version >= 120000)
        setup += fmt::format("; SET tcp_user_timeout = {}", options_.tcp_user_timeout.count());
    }
    // When this server's life began: a crash restart ends every session, so it is fixed for
    // the life of the session. The checkpointer's start shows a crash restart (visible to
    // superusers and pg_read_all_stats only; NULL, so ignored by GREATEST, for others).
    setup += version >= 100000
                 ? "; SELECT extract(epoch FROM GREATEST(pg_postmaster_start_time(), (SELECT "
                   "max(backend_start) FROM pg_stat_activity WHERE backend_type = "
                   "'checkpointer')))::text"
                 : "; SELECT extract(epoch FROM pg_postmaster_start_time())::text";
    detail::pg_result r;
    if (!send(i, setup.c_str(), {}, f, /*simple=*/true)) {
      why = last_error_;
      close(i);
      return false;
    }
    switch (await(i, deadline, wait, r, f)) {
      case outcome::done:
        break;
      case outcome::interrupted:
        close(i);
        return false;
      case outcome::timed_out:
        why = fmt::format("no answer to the session setup within {} ms (connect_timeout)",
                          connect_timeout_.count());
        f.set(ETIMEDOUT, operation);
        close(i);
        return false;
      case outcome::failed:
        why = last_error_;
        close(i);
        return false;
    }
    if (!rows(r, 1)) {
      why = "session setup failed: " + scrub(PQresultErrorMessage(r.get()));
      f.set(EIO, operation);
      close(i);
      return false;
    }
    life_start_[i] = PQgetvalue(r.get(), 0, 0);
    return true;
  }

  //! The statements of session i, for its server version. Lock session: (got, pid). Fence
  //! session, given the server's life start as $3: (got, pid, token, milliseconds since the
  //! server started). The OFFSET 0 subquery makes the lock come first, so the transaction id
  //! is allocated only once the lock is held (and so after the previous holder's).
  void build_statements(int i) {
    if (i == 0) {
      sql_[0][0] = "SELECT pg_try_advisory_lock($1::int8), pg_backend_pid()";
      sql_[0][1] =
          "SELECT true, pg_backend_pid() FROM (SELECT pg_advisory_lock($1::int8) OFFSET 0) AS l";
      return;
    }
    const int version = PQserverVersion(state_.conn[i]);
    const std::string token = !options_.fencing   ? "'0'"
                              : version >= 130000 ? "pg_current_xact_id()::text"
                                                  : "txid_current()::text";
    const std::string uptime =
        "((extract(epoch FROM clock_timestamp()) - $3::numeric) * 1000)::int8";
    sql_[1][0] = "SELECT l.got, pg_backend_pid(), CASE WHEN l.got THEN " + token +
                 " ELSE '0' END, " + uptime +
                 " FROM (SELECT pg_try_advisory_lock($1::int4, $2::int4) AS got OFFSET 0) AS l";
    sql_[1][1] = "SELECT true, pg_backend_pid(), " + token + ", " + uptime +
                 " FROM (SELECT pg_advisory_lock($1::int4, $2::int4) OFFSET 0) AS l";
  }

  // ------------------------------------------------------------------------------------------
  // Non-blocking round trips
  // ------------------------------------------------------------------------------------------

  //! Sends a statement on session i (text parameters). Returns false with last_error_ set,
  //! and the session marked broken, if it cannot be sent.
  bool send(int i, const char* sql, std::initializer_list<const char*> params, detail::failure& f,
            bool simple = false) {
    if (!connected(i)) {
      last_error_ = "not connected";
      f.set(ENOTCONN, "use PostgreSQL session for");
      return false;
    }
    int ok = 0;
    {
      std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
      ok = simple ? PQsendQuery(state_.conn[i], sql)
                  : PQsendQueryParams(state_.conn[i], sql, static_cast<int>(params.size()), nullptr,
                                      params.begin(), nullptr, nullptr, 0);
    }
    if (ok != 1) {
      last_error_ = connection_error(i);
      f.set(ECONNRESET, "send a statement to PostgreSQL for");
      broken_[i] = true;
      return false;
    }
    return true;
  }

  //! Waits for every result of the statement in flight on session i; keeps the first error,
  //! else the last result. On anything but `done` the session is marked broken (a statement
  //! may still be in flight), except `interrupted`, which cancel() resolves.
  outcome await(int i, clock::time_point deadline, bool interruptible, detail::pg_result& out,
                detail::failure& f) {
    out.reset();
    PGconn* conn = state_.conn[i];
    for (;;) {
      int flushed = 0;
      bool input_ok = true;
      bool busy = true;
      {
        std::lock_guard<std::mutex> guard(detail::pg_registry_instance().mutex);
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
        last_error_ = connection_error(i);
        f.set(ECONNRESET, "talk to PostgreSQL for");
        broken_[i] = true;
        out.reset();
        return outcome::failed;
      }
      if (!busy) {
        if (!out) {
          last_error_ = "no result";
          f.set(EIO, "talk to PostgreSQL for");
          broken_[i] = true;
          return outcome::failed;
        }
        if (PQstatus(conn) != CONNECTION_OK) broken_[i] = true;
        return outcome::done;
      }
      const short events = static_cast<short>(POLLIN | (flushed == 1 ? POLLOUT : 0));
      const auto waited = wait_io(PQsocket(conn), events, deadline, interruptible);
      if (waited == outcome::done) continue;
      if (waited != outcome::interrupted) broken_[i] = true;
      if (waited == outcome::failed) {
        last_error_ = fmt::format("poll failed: {}", std::strerror(errno));
        f.set(errno, "talk to PostgreSQL for");
      }
      out.reset();
      return waited;
    }
  }

  //! Waits until `fd` (ignored if negative) is ready for `events`, interrupt() is called
  //! (when `interruptible`), or `deadline` passes.
  outcome wait_io(int fd, short events, clock::time_point deadline, bool interruptible) {
    for (;;) {
      if (interruptible && interrupted_.load()) return outcome::interrupted;
      int timeout = -1;
      if (deadline != clock::time_point::max()) {
        const auto left = deadline - clock::now();
        if (left <= clock::duration::zero()) return outcome::timed_out;
        timeout = static_cast<int>(std::min<std::int64_t>(
            std::chrono::ceil<std::chrono::milliseconds>(left).count(), 24 * 3600 * 1000));
      }
      pollfd fds[2] = {{fd, events, 0}, {state_.event_fd, POLLIN, 0}};
      const int rc = ::poll(fds, interruptible ? 2 : 1, timeout);
      if (rc < 0) {
        if (errno == EINTR) continue;
        return outcome::failed;
      }
      if (interruptible && fds[1].revents != 0) return outcome::interrupted;
      if (fd >= 0 && fds[0].revents != 0) return outcome::done;
    }
  }

  static bool rows(const detail::pg_result& r, int columns) noexcept {
    return r && PQresultStatus(r.get()) == PGRES_TUPLES_OK && PQntuples(r.get()) == 1 &&
           PQnfields(r.get()) >= columns;
  }

  PostgresOptions options_;
  std::int64_t key_ = 0;
  std::string key_text_, hi_text_, lo_text_;
  std::string redacted_;
  std::vector<std::string> secrets_;
  std::string config_error_;
  int config_errno_ = 0;
  std::vector<std::string> keywords_, values_;
  std::chrono::milliseconds connect_timeout_{5000};
  std::string sql_[2][2];  // [session][0: try, 1: wait]

  detail::pg_fork_state state_;  // the two connections: 0 = lock session, 1 = fence session
  bool broken_[2] = {false, false};
  // Written by the driving thread only; atomic because held(), fencing_token(),
  // valid_until(), lock_session_pid() and fence_session_pid() are read from any thread.
  std::atomic<bool> locked_[2] = {false, false};
  std::atomic<int> pid_[2] = {0, 0};
  std::string life_start_[2];  // per session: when the server's life began (epoch seconds)
  std::string last_error_;
  std::atomic<bool> held_{false};
  std::atomic<std::uint64_t> token_{0};
  std::atomic<clock::rep> valid_until_{clock::time_point::min().time_since_epoch().count()};
  clock::time_point not_before_{};   // promotion waits until then (restart grace)
  clock::time_point grace_floor_{};  // ... and until then (our session was ended by the server)
  std::atomic<bool> interrupted_{false};
};

}  // namespace workerlock
