// workerlock/redis.hpp: RedisBackend, a Coordinator backend that holds the primary role
// through a lease on one Redis server, with fencing tokens and self-demotion.
//
// Needs hiredis (>= 0.14) and liburiparser: in CMake, link the workerlock::redis target.
// workerlock.hpp does not include this header.
//
// THE LEASE (the protocol in detail: detail/redis_lease.hpp)
//   The key holds the holder's token for ttl; acquire is one round trip (a Lua script doing
//   SET NX PX and INCR <key>:fence for the fencing token), renew and release compare the token
//   first. A standby sleeps until the lease it saw ends, or until a holder on this host dies.
//
// SELF-DEMOTION: THE ARITHMETIC
//   T = ttl, D = drift_margin, V = verify_interval, C = command_timeout.
//   s = the monotonic time just BEFORE the last successful acquire or renew was sent. Redis ran
//   that command no earlier than s, so its key lives until at least s + T by Redis's clock; we
//   trust the lease until  valid_until = s + T - D, where D absorbs the rate difference of the
//   two clocks and the scheduling delay of on_demoted (default D = T/10 + 2 ms).
//   A renewal never outlives the lease: every command of verify_held() (reconnecting
//   included) has the deadline min(now + C, valid_until), an absolute one (see I/O), so
//   verify_held() returns false (or throws) at valid_until at the latest, even when Redis is
//   unreachable, stalled (CLIENT PAUSE, DEBUG SLEEP), or the network drops packets. (A
//   renewal that fails earlier keeps the role: the Coordinator retries it until then.) The
//   Coordinator then runs on_demoted, and Redis keeps the key for at least D more, so
//   nobody else can be promoted before on_demoted returns, provided this process is not
//   paused for longer than D (see FENCING) and on_demoted takes less than D.
//   verify_interval() shrinks as the lease runs out, to at most valid_until - now - C, so a
//   long on_promoted callback does not push the next renewal past the end of the lease.
//   Checked by prepare(): V + C <= T - D, so a renewal started on schedule always ends
//   (success or timeout) before the lease does. Defaults: V = T/3, C = min(T/5, 2 s),
//   poll_interval = min(T/10, 1 s); with T = 10 s: V = 3.33 s, C = 2 s, D = 1.002 s, so
//   V + C = 5.33 s <= T - D = 8.998 s.
//   ALL PARTICIPANTS OF ONE KEY MUST USE THE SAME TTL.
//   Coordinator::role() reads secondary from valid_until() on, even in a holder paused past
//   its lease (SIGSTOP, a VM freeze) before its thread runs again.
//
// ERRORS
//   lock_error, with an empty path() and target() = "<URL, password ***> key=<key>" (also
//   network_target()). Codes: errc::bad_configuration (== std::errc::invalid_argument) for a
//   bad URL, bad timings or a database the server refuses; errc::lease_lost
//   (== std::errc::timed_out) when a renewal could not be done before valid_until();
//   ETIMEDOUT when a renewal got no answer within command_timeout while the lease was still
//   valid; else the errno of the failure (ECONNREFUSED, EACCES for authentication, ...).
//   Messages never show a password or any query value but db=N, even of a URL that does not
//   parse (then only the parts that are what they should be: host, digits, a plain path).
//
// FENCING
//   A process paused longer than the lease (GC, SIGSTOP, a VM migration, swapping) wakes up
//   believing it is primary: nothing on this host can prevent that, since its next check
//   runs only when it runs. fencing_token() grows with every new hold, also across a loss of
//   Redis's data; pass it with every write to downstream storage, and have the storage reject
//   a token lower than the highest it has seen. That is the only protection against a paused
//   holder.
//
// QUARANTINE AFTER DATA LOSS (RedisOptions::quarantine_after_data_loss, default true): when
//   Redis lost its data (or the key is new), nobody is promoted for one ttl, so that a holder
//   from before cannot overlap the next one. So a brand-new key waits one ttl too.
//
// STARTUP BARRIER: the key <key>:startup names the generation whose on_startup completed.
//
// FAST FAILOVER ON THE SAME HOST (RedisOptions::fast_local_failover, default true): a holder
//   on this host (same kernel, same pid namespace) whose process is gone is replaced within
//   milliseconds instead of a ttl. Standbys on other hosts wait for the ttl: a closed
//   connection does not prove a holder stopped. Set it to false where a process may move to
//   another kernel (a CRIU checkpoint restored elsewhere).
//
// LIMITS
//   - One Redis server. With replicas and failover (Sentinel, Cluster), a SET acknowledged by
//     the old master may be missing on the promoted replica: two holders (the quarantine
//     does not help, since <key>:fence usually made it across). WAIT does not fix that; it is
//     not consensus. In Cluster, key and <key>:fence must share a slot: use a hash tag, as in
//     key = "{myapp}:primary".
//   - maxmemory-policy must not evict the key (noeviction, or never reach maxmemory): an
//     evicted key is a lost lock.
//   - Redis expires keys by its wall clock: a step forward on the Redis host ends leases
//     early. Keep that clock slewed (chrony/ntpd), never stepped.
//   - No Redlock (N masters, majority quorum): it would survive a minority of servers
//     failing, but has no monotonic fencing token (the servers' counters disagree).
//   - No TLS (rediss://), no Sentinel or Cluster discovery.
//   - Callbacks run on the Coordinator thread, which is also the one that renews: while
//     on_promoted or on_startup run, nothing renews. They must return within
//     T - D - C of the acquisition (verify_interval() then returns 0 and the renewal starts
//     at once); a longer one loses the lease, and another process may be promoted while it
//     still runs. on_demoted must finish within D.
//
// I/O: every command has an absolute deadline; the Coordinator's Interrupter ends
// wait_acquire() at once, even in the middle of a command (whose outcome is then unknown:
// release() deletes the key if it holds our token). See detail/redis_connection.hpp.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/format.h>

#include "backend.hpp"
#include "detail/fork_layer.hpp"
#include "detail/process_identity.hpp"
#include "detail/redis_lease.hpp"
#include "detail/redis_session.hpp"
#include "detail/redis_startup.hpp"
#include "detail/redis_url.hpp"
#include "error.hpp"
#include "interrupter.hpp"

namespace workerlock {

//! The knobs of a RedisBackend. A zero duration means "the default", computed from ttl.
struct RedisOptions {
  //! redis://[[user]:password@]host[:port][/db], or unix://[[user]:password@]/path[?db=N]
  //! (also redis+unix://); an IPv6 host in brackets, with a zone as [fe80::1%25eth0]. RFC 3986
  //! (read by liburiparser), except that the user info runs to the last '@' before '?', as
  //! redis-cli reads it; percent-encode '?', '#' and '%' in a password, and special characters
  //! of a socket path. Empty: $WORKERLOCK_REDIS_URL; when that is empty too, prepare() throws.
  std::string url;
  //! The Redis key of the lease (the lock name); <key>:fence holds the fencing counter.
  std::string key = "workerlock:primary";
  //! Override the URL's user name and password when not empty (user: Redis 6 ACL).
  std::string username;
  std::string password;
  //! Lease length. Every participant of one key must use the same ttl.
  std::chrono::milliseconds ttl{10000};
  //! How often the holder renews; default ttl/3.
  std::chrono::milliseconds verify_interval{0};
  //! How much earlier than ttl the holder stops trusting its lease; default ttl/10 + 2 ms.
  std::chrono::milliseconds drift_margin{0};
  //! How often a standby retries; default min(ttl/10, 1 s). It also wakes when the lease it
  //! saw ends, and when a holder on this host dies (fast_local_failover).
  std::chrono::milliseconds poll_interval{0};
  //! TCP connect deadline, and deadline of every command; defaults min(ttl/5, 2 s).
  std::chrono::milliseconds connect_timeout{0};
  std::chrono::milliseconds command_timeout{0};
  //! Take over at once from a holder on this host whose process is gone (see the header).
  bool fast_local_failover = true;
  //! Keep everybody out for one ttl when Redis lost its data (see the header).
  bool quarantine_after_data_loss = true;
};

//! Holds the primary role through a lease on a Redis key; see the top of this header for the
//! protocol, the timing arithmetic and the limits.
//!
//! Not copyable. Threads: driven by one thread at a time (the Coordinator's); the const
//! members but token() may be called from any thread at any time.
//! Fork: a copy of the process (fork(), also syscall(SYS_fork) or clone() without CLONE_VM)
//! holds nothing and never sends on the parent's connection: the fork layer closes its copy
//! of the socket (at once after fork(), at its first call after a raw copy). It opens its own.
class RedisBackend final : public Backend {
 public:
  using clock = std::chrono::steady_clock;

  //! Never throws for bad options or a bad URL: prepare() and try_acquire() do, so that
  //! Coordinator::start() reports them.
  explicit RedisBackend(RedisOptions options = {}) : options_(std::move(options)) {
    if (options_.url.empty()) {
      if (const char* env = std::getenv("WORKERLOCK_REDIS_URL"); env != nullptr) options_.url = env;
    }
    configure();
    token_ = detail::redis_make_token();
  }

  //! Releases a hold (bounded by command_timeout), closes the connection. Never throws. In a
  //! forked copy it only closes the copy's descriptors: the parent's lease stays.
  ~RedisBackend() override {
    release();
    session_.close();
  }

  //! Throws: lock_error (errc::bad_configuration, equal to std::errc::invalid_argument) for a
  //! bad URL or inconsistent timings; target() names the URL (password ***) and key.
  void prepare() override { check_config("start the coordinator for"); }

  //! One acquisition attempt (one round trip; two when it takes over from a dead holder on
  //! this host; one more to connect). Returns true if this process holds the lease now.
  //! Throws: lock_error when Redis cannot be reached, refuses us, or answers nonsense.
  bool try_acquire() override {
    check_config("acquire the lease on");
    detach_if_forked();
    if (held_.load()) return true;
    return attempt(nullptr);
  }

  //! Retries every poll_interval (sooner when the lease it saw ends or a local holder dies)
  //! until held (true) or `interrupter` is interrupted (false), which also ends a command
  //! under way. Throws: lock_error on connection errors, for the Coordinator to log and retry
  //! with its backoff.
  bool wait_acquire(Interrupter& interrupter) override {
    check_config("acquire the lease on");
    detach_if_forked();
    for (;;) {
      if (interrupter.interrupted()) return false;
      if (held_.load()) return true;
      if (attempt(&interrupter)) return true;
      auto pause = cfg_.poll_interval;
      if (last_pttl_ >= 0) pause = std::min(pause, std::chrono::milliseconds(last_pttl_ + 1));
      // A holder on this host: its pidfd becomes readable when it exits.
      const int pidfd = options_.fast_local_failover && last_holder_pid_ > 0
                            ? detail::open_pidfd(last_holder_pid_)
                            : -1;
      const auto result = interrupter.wait(pidfd, POLLIN, clock::now() + pause);
      const int wait_errno = errno;
      if (pidfd >= 0) ::close(pidfd);
      if (result == WaitResult::interrupted) return false;
      if (result == WaitResult::error)
        throw lock_error("acquire the lease on", target(),
                         std::error_code(wait_errno, std::system_category()),
                         "cannot wait for the lease");
    }
  }

  //! Renews the lease (compare-then-PEXPIRE). Returns false when the key is no longer ours.
  //! Throws: lock_error with errc::lease_lost (equal to std::errc::timed_out) when the lease
  //! ran out before it could be renewed or the renewal got no answer before valid_until();
  //! ETIMEDOUT when it got no answer within command_timeout, the lease still valid then;
  //! with the errno (ECONNRESET, EACCES...) when the renewal failed otherwise: "cannot tell",
  //! the Coordinator keeps the role until valid_until() and retries (see Backend). Returns
  //! (or throws) by valid_until() at the latest.
  bool verify_held() override {
    detach_if_forked();
    if (!held_.load()) return false;
    const auto now = clock::now();
    const auto until = valid_until();
    if (now >= until) {
      unknown_ = true;
      throw lock_error(
          "renew the lease on", target(), make_error_code(errc::lease_lost),
          fmt::format("the lease ran out {} ms ago before it could be renewed; was "
                      "this process paused?",
                      std::chrono::duration_cast<std::chrono::milliseconds>(now - until).count()));
    }
    const auto deadline = std::min(now + cfg_.command_timeout, until);
    detail::redis_reply reply;
    clock::time_point start;
    const auto st =
        session_.run(detail::redis_script::renew, args(""), deadline, nullptr, reply, start);
    if (st) {
      unknown_ = true;
      throw failure("renew the lease on", st, until);
    }
    const auto answer = detail::read_answer(reply);
    if (answer.has_integer && answer.integer == 1) {
      set_valid_until(start + cfg_.ttl - cfg_.drift_margin);
      return true;
    }
    if (answer.error) {
      unknown_ = true;
      throw detail::redis_server_failure("renew the lease on", where(), reply);
    }
    lost_ = true;  // the key expired or holds another token
    return false;
  }

  //! configured verify_interval, shortened so that a renewal starts no later than
  //! valid_until() - command_timeout.
  std::chrono::milliseconds verify_interval() const noexcept override {
    const auto until = valid_until();
    if (until == clock::time_point::min()) return cfg_.verify_interval;  // not held
    const auto left = until - clock::now() - cfg_.command_timeout;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left);
    return std::clamp(ms, std::chrono::milliseconds(0), cfg_.verify_interval);
  }

  //! Deletes the key if it still holds our token (bounded by command_timeout); also cleans up
  //! after an attempt whose outcome was unknown. Never throws.
  void release() noexcept override {
    if (!stamp_.is_current()) return;  // a forked copy: the hold is the parent's
    const bool was_held = held_.exchange(false);
    fence_.store(0);
    set_valid_until(clock::time_point::min());
    if ((was_held && !lost_) || unknown_) {
      try {
        detail::redis_reply reply;
        clock::time_point start;
        const auto st = session_.run(detail::redis_script::release, args(""),
                                     clock::now() + cfg_.command_timeout, nullptr, reply, start);
        if (!st && !detail::read_answer(reply).error) unknown_ = false;
      } catch (...) {
      }
    }
    lost_ = false;
    // Every hold gets its own token, so that a late renewal or release of this one can never
    // touch the next. After an attempt of unknown outcome that could not be cleaned up, the
    // token stays: the next attempt finds it in the key and adopts it.
    if (was_held) {
      unknown_ = false;
      try {
        token_ = detail::redis_make_token();
      } catch (...) {
      }
    }
  }

  //! release(), then drops the connection. Never throws.
  void reset() noexcept override {
    release();
    session_.close();
  }

  bool held() const noexcept override { return held_.load() && stamp_.is_current(); }

  std::string describe() const override { return "redis=" + where(); }
  //! `<URL, password ***> key=<key>`: what lock_error::target() names in this backend's errors
  //! (and in the Coordinator's about it), such as `redis://127.0.0.1:6379/0 key=app:primary`.
  std::string network_target() const override { return where(); }

  //! The startup barrier's record (<key>:startup), on a connection of its own. Throws:
  //! lock_error (errc::bad_configuration) for a generation that is empty or over 256 bytes.
  std::unique_ptr<GenerationMarker> startup_barrier(const std::string& generation) const override {
    return std::make_unique<detail::redis_generation_marker>(
        detail::redis_generation_marker::settings{url_, config_error_, cfg_.key + ":startup",
                                                  generation, where(), cfg_.connect_timeout,
                                                  cfg_.command_timeout});
  }

  //! The fencing token of the current hold (0 when not held): larger than every token of an
  //! earlier hold of this key.
  std::uint64_t fencing_token() const noexcept override { return held() ? fence_.load() : 0; }

  //! True while held and the lease is still trusted: clock::now() < valid_until(). A primary
  //! may check it before an action that must not run twice; it does not replace fencing.
  bool lease_valid() const noexcept { return clock::now() < valid_until(); }

  //! The end of the trusted lease, on this host's steady_clock: the instant just before the
  //! last successful acquire or renew was sent, + ttl - drift_margin (see the top of this
  //! header). time_point::min() while not held (before the first hold, after release(), in a
  //! forked copy). A Coordinator's role() reads secondary from then on, even while its thread
  //! has not yet noticed (a process paused past its lease). Any thread, async-signal-safe.
  clock::time_point valid_until() const noexcept override {
    if (!held()) return clock::time_point::min();
    return clock::time_point(clock::duration(valid_until_.load()));
  }

  //! The effective options (defaults filled in, URL from the environment).
  const RedisOptions& options() const noexcept { return cfg_; }

  //! The token of the current or next hold. Driving thread only.
  const std::string& token() const noexcept { return token_; }

  //! The URL without its password.
  std::string redacted_url() const { return redacted_; }

 private:
  void configure() {
    cfg_ = options_;
    const auto ttl = cfg_.ttl;
    using std::chrono::milliseconds;
    if (cfg_.verify_interval.count() == 0) cfg_.verify_interval = ttl / 3;
    if (cfg_.drift_margin.count() == 0) cfg_.drift_margin = ttl / 10 + milliseconds(2);
    if (cfg_.poll_interval.count() == 0)
      cfg_.poll_interval = std::clamp(ttl / 10, milliseconds(1), milliseconds(1000));
    if (cfg_.command_timeout.count() == 0)
      cfg_.command_timeout = std::clamp(ttl / 5, milliseconds(1), milliseconds(2000));
    if (cfg_.connect_timeout.count() == 0) cfg_.connect_timeout = cfg_.command_timeout;

    config_error_ = detail::read_redis_url(cfg_.url, cfg_.username, cfg_.password, url_, redacted_);
    if (config_error_.empty()) {
      if (cfg_.key.empty()) {
        config_error_ = "RedisOptions::key is empty";
      } else if (ttl < milliseconds(10)) {
        config_error_ = "ttl must be at least 10 ms";
      } else if (cfg_.verify_interval.count() < 0 || cfg_.drift_margin.count() < 0 ||
                 cfg_.poll_interval.count() < 0 || cfg_.command_timeout.count() < 0 ||
                 cfg_.connect_timeout.count() < 0) {
        config_error_ = "negative durations in RedisOptions";
      } else if (cfg_.verify_interval + cfg_.command_timeout > ttl - cfg_.drift_margin) {
        config_error_ = fmt::format(
            "verify_interval ({} ms) + command_timeout ({} ms) must not exceed ttl ({} ms) - "
            "drift_margin ({} ms): a renewal started on schedule must end before the lease",
            cfg_.verify_interval.count(), cfg_.command_timeout.count(), ttl.count(),
            cfg_.drift_margin.count());
      }
    }
    fence_key_ = cfg_.key + ":fence";
    ttl_text_ = std::to_string(ttl.count());
    session_.configure(url_, cfg_.connect_timeout);
  }

  void check_config(const char* operation) const {
    if (!config_error_.empty())
      throw lock_error(operation, target(), make_error_code(errc::bad_configuration),
                       config_error_);
  }

  std::string where() const { return fmt::format("{} key={}", redacted_, cfg_.key); }
  lock_error::network_target target() const { return {where()}; }

  //! A copy of the process that built us (fork(), or a raw syscall(SYS_fork) or clone() that
  //! runs no atfork handler) holds nothing; the fork layer's hook closed its copy of the socket
  //! (detail/redis_connection.hpp). The stamp asks the kernel who we are, never a cached pid.
  void detach_if_forked() {
    detail::fork_layer::adopt_raw_copy();
    const bool adopted = stamp_.adopt([&] {
      session_.close();
      held_.store(false);
      fence_.store(0);
      set_valid_until(clock::time_point::min());
      lost_ = unknown_ = false;
    });
    if (adopted) token_ = detail::redis_make_token();
  }

  void set_valid_until(clock::time_point t) noexcept {
    valid_until_.store(t.time_since_epoch().count());
  }

  //! One attempt, plus a second one that takes over from a holder proven dead.
  bool attempt(Interrupter* interrupter) {
    if (try_once(interrupter, {})) return true;
    if (interrupter != nullptr && interrupter->interrupted()) return false;
    if (last_holder_pid_ > 0 && options_.fast_local_failover &&
        detail::process_is_gone(last_holder_pid_)) {
      const std::string dead = last_holder_;
      return try_once(interrupter, dead);
    }
    return false;
  }

  bool try_once(Interrupter* interrupter, const std::string& dead_holder) {
    last_pttl_ = -1;
    last_holder_pid_ = 0;
    last_holder_.clear();
    auto deadline = clock::now() + cfg_.command_timeout;
    if (!session_.is_open()) deadline += cfg_.connect_timeout;
    detail::redis_reply reply;
    clock::time_point start;
    const auto st = session_.run(detail::redis_script::acquire, args(dead_holder), deadline,
                                 interrupter, reply, start);
    if (st) {
      if (st.sent) unknown_ = true;
      if (st.code == EINTR) return false;  // interrupted: wait_acquire() returns false
      throw failure("acquire the lease on", st, {});
    }
    auto answer = detail::read_answer(reply);
    if (answer.has_integer && answer.integer > 0) {
      fence_.store(static_cast<std::uint64_t>(answer.integer));
      set_valid_until(start + cfg_.ttl - cfg_.drift_margin);
      lost_ = false;
      unknown_ = false;
      held_.store(true);
      return true;
    }
    if (answer.refused) {
      last_pttl_ = answer.pttl;
      last_holder_ = std::move(answer.holder);
      last_holder_pid_ = detail::redis_local_holder(last_holder_);
      return false;
    }
    if (answer.error) throw detail::redis_server_failure("acquire the lease on", where(), reply);
    throw lock_error("acquire the lease on", target(),
                     std::make_error_code(std::errc::protocol_error),
                     "unexpected reply to the acquire script");
  }

  detail::redis_script_args args(std::string_view steal) const noexcept {
    return {cfg_.key, fence_key_, token_, ttl_text_, steal, options_.quarantine_after_data_loss};
  }

  lock_error failure(const char* operation, const detail::redis_status& st,
                     clock::time_point renewing_until) const {
    return detail::redis_failure(operation, where(), st, renewing_until, cfg_.connect_timeout,
                                 cfg_.command_timeout);
  }

  RedisOptions options_;  // as given (URL from the environment filled in)
  RedisOptions cfg_;      // effective
  detail::redis_url url_;
  std::string redacted_;
  std::string config_error_;
  std::string fence_key_;
  std::string ttl_text_;

  detail::redis_session session_;
  std::string token_;

  detail::process_stamp stamp_;  // the process whose hold and connection these are
  std::atomic<bool> held_{false};
  std::atomic<std::uint64_t> fence_{0};
  std::atomic<clock::rep> valid_until_{clock::time_point::min().time_since_epoch().count()};
  bool lost_ = false;     // the key is known not to hold our token any more
  bool unknown_ = false;  // a command of ours may or may not have run

  long long last_pttl_ = -1;  // from the last failed attempt: when the lease we saw ends
  std::string last_holder_;
  pid_t last_holder_pid_ = 0;
};

}  // namespace workerlock
