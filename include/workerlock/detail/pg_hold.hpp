// workerlock/detail/pg_hold.hpp: PostgresBackend's hold: the election and handover advisory
// locks on two sessions, taken, proven and given up (the protocol: see postgres.hpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../error.hpp"
#include "../interrupter.hpp"
#include "pg_session.hpp"
#include "pg_sql.hpp"

namespace workerlock::detail {

//! What the hold needs of PostgresOptions, checked and resolved by PostgresBackend (whose
//! options hold the defaults).
struct pg_hold_settings {
  std::int64_t key = 0;
  pg_connect_params connect_params;
  std::chrono::milliseconds connect_timeout{};
  std::chrono::milliseconds verify_interval{};
  std::chrono::milliseconds command_timeout{};
  std::chrono::milliseconds cancel_timeout{};
  std::chrono::milliseconds restart_grace{};
  bool fencing = false;
  bool standby_fence_session = false;
  pg_session_settings session;
};

//! The two sessions and their locks. Driven by one thread at a time; held(), valid_until(),
//! token() and session_pid() from any thread (atomics; the first three async-signal-safe).
class pg_hold {
 public:
  using clock = std::chrono::steady_clock;
  //! The outcome of a proof: both sessions answered; one did not answer in time and none was
  //! seen lost; one was lost (closed, an error, another server process).
  enum class proof { held, late, lost };

  //! Keeps references to `settings` and `secrets`, which must outlive it.
  pg_hold(const pg_hold_settings& settings, const std::vector<std::string>& secrets)
      : settings_(settings),
        session_{pg_session(secrets), pg_session(secrets)},
        key_text_(std::to_string(settings.key)),
        hi_text_(std::to_string(
            static_cast<std::int32_t>(static_cast<std::uint64_t>(settings.key) >> 32))),
        lo_text_(std::to_string(
            static_cast<std::int32_t>(static_cast<std::uint64_t>(settings.key) & 0xffffffffu))) {}
  pg_hold(const pg_hold&) = delete;
  pg_hold& operator=(const pg_hold&) = delete;

  //! Moves towards holding both locks, waiting when given an `interrupter`. Returns true when
  //! held; false on contention, interruption or a pending grace. On an error sets `f` and
  //! `why` and closes both sessions: nothing is held.
  bool acquire(Interrupter* interrupter, failure& f, std::string& why) {
    interrupter_ = interrupter;
    const bool got = advance(interrupter != nullptr, f, why);
    interrupter_ = nullptr;
    if (!f) return got;
    reset();  // an error never leaves a lock behind
    // The server ended our session: it may have ended the holder's too (every session of
    // the role killed, a restart), and the holder learns it only at its next check.
    if (f.code.value() == ECONNRESET) grace_floor_ = clock::now() + settings_.restart_grace;
    return false;
  }

  //! One `SELECT pg_backend_pid()` on each session, sent together and answered by `deadline`
  //! by the server processes that took the locks. On success, valid_until_ becomes the
  //! instant just before they were sent + verify_interval + command_timeout. `late` when a
  //! session did not answer by `deadline` and none was seen lost (closed, an error, another
  //! server process); `lost` when one was.
  proof prove(clock::time_point deadline) {
    const auto start = clock::now();
    failure f;
    std::string why;
    bool sent[2] = {false, false};
    for (int i = 0; i < 2; ++i) sent[i] = session_[i].send("SELECT pg_backend_pid()", {}, f, why);
    bool lost = !sent[0] || !sent[1];
    bool late = false;
    for (int i = 0; i < 2; ++i) {
      if (!sent[i]) continue;
      pg_result r;
      const auto answer = session_[i].await(deadline, nullptr, r, f, why);
      if (answer == outcome::timed_out) {
        late = true;
        session_[i].mark_broken();
      } else if (answer != outcome::done || !pg_one_row(r, 1) ||
                 std::atoi(pg_text(r, 0)) != pid_[i].load()) {
        lost = true;
        session_[i].mark_broken();
      }
    }
    if (lost) return proof::lost;
    if (late) return proof::late;
    set_valid_until(start + settings_.verify_interval + settings_.command_timeout);
    return proof::held;
  }

  //! pg_advisory_unlock on both sessions (sent together, within command_timeout); a session
  //! that does not answer, or already failed, is closed instead.
  void release() noexcept {
    held_.store(false);
    token_.store(0);
    set_valid_until(clock::time_point::min());
    if (!locked_[0] && !locked_[1]) return;
    const auto deadline = clock::now() + settings_.command_timeout;
    bool sent[2] = {false, false};
    failure f;
    std::string why;
    if (locked_[0]) {
      sent[0] =
          session_[0].send("SELECT pg_advisory_unlock($1::int8)", {key_text_.c_str()}, f, why);
    }
    if (locked_[1]) {
      sent[1] = session_[1].send("SELECT pg_advisory_unlock($1::int4, $2::int4)",
                                 {hi_text_.c_str(), lo_text_.c_str()}, f, why);
    }
    for (int i = 0; i < 2; ++i) {
      if (!locked_[i]) continue;
      pg_result r;
      const bool unlocked = sent[i] &&
                            session_[i].await(deadline, nullptr, r, f, why) == outcome::done &&
                            pg_one_row(r, 1) && pg_text(r, 0)[0] == 't';
      locked_[i] = false;
      pid_[i] = 0;
      if (!unlocked) close(i);
    }
  }

  //! Closes both sessions: the server frees whatever they held.
  void reset() noexcept {
    held_.store(false);
    token_.store(0);
    set_valid_until(clock::time_point::min());
    close(0);
    close(1);
  }

  //! In a copy of the process (fork(), or a raw copy once adopted): frees the parent's
  //! connections unseen and forgets its hold.
  void adopt_after_fork() noexcept {
    pg_fork::adopt_if_copied();
    const bool copied = session_[0].disown_if_inherited();
    if (!session_[1].disown_if_inherited() && !copied) return;
    reset();
  }

  bool held() const noexcept {
    return held_.load() && !session_[0].inherited() && pg_fork::owns_connections();
  }
  clock::time_point valid_until() const noexcept {
    return clock::time_point(clock::duration(valid_until_.load()));
  }
  std::uint64_t token() const noexcept { return token_.load(); }
  //! The server process of session i while it holds its lock, else 0.
  int session_pid(int i) const noexcept { return locked_[i].load() ? pid_[i].load() : 0; }

 private:
  using outcome = pg_outcome;

  //! Moves towards holding both locks. Returns true when promoted; false on contention,
  //! interruption or a pending grace; sets `f` and `why` on errors.
  bool advance(bool wait, failure& f, std::string& why) {
    const auto command_deadline = [&] {
      return wait ? clock::time_point::max() : clock::now() + settings_.command_timeout;
    };
    if (!locked_[0]) {
      if (!session_[0].usable() && !connect(0, wait, f, why)) return false;
      if (settings_.standby_fence_session && !session_[1].usable() && !connect(1, wait, f, why))
        return false;
      pg_result r;
      if (!take_lock(0, wait, command_deadline(), r, f, why)) return false;
    }
    if (!locked_[1]) {
      if (!session_[1].usable() && !connect(1, wait, f, why)) return false;
      if (life_start_[0] != life_start_[1]) {
        f.set(EXDEV, "take the PostgreSQL lock on");
        why =
            "the lock session and the fence session reached different servers, or the server "
            "restarted in between (a multi-host connection string needs "
            "target_session_attrs=read-write or primary)";
        return false;
      }
      pg_result r;
      if (!take_lock(1, wait, command_deadline(), r, f, why)) return false;
      token_ = std::strtoull(pg_text(r, 2), nullptr, 10);
      const auto uptime = std::chrono::milliseconds(std::atoll(pg_text(r, 3)));
      not_before_ = std::max(
          grace_floor_,
          clock::now() + std::max(std::chrono::milliseconds(0), settings_.restart_grace - uptime));
    }
    if (clock::now() < not_before_) {
      if (!wait) return false;
      if (pg_wait(interrupter_, -1, 0, not_before_) == outcome::interrupted) return false;
    }
    // The handover lock's statement proves only the fence session. The lock session took the
    // election lock earlier and has been silent since: the server may have ended it while we
    // waited, and someone else may have taken the election lock, and both locks, since. One
    // round trip on both sessions, answered by the same server processes, proves that they
    // still hold both locks now (a session ended by the server drops its locks and never
    // comes back); its start is the hold's proof for valid_until. If it fails, acquire()
    // closes both sessions, which frees the handover lock again: never promoted.
    switch (prove(clock::now() + settings_.command_timeout)) {
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
            settings_.command_timeout.count());
        grace_floor_ = clock::now() + settings_.restart_grace;
        return false;
    }
    held_.store(true);  // after valid_until_: a reader never sees a hold without its deadline
    return true;
  }

  void set_valid_until(clock::time_point t) noexcept {
    valid_until_.store(t.time_since_epoch().count());
  }

  //! Runs the lock statement of session i: returns whether it now holds its lock (then
  //! locked_[i] and pid_[i] are set), with the row (got, pid[, token, milliseconds since the
  //! server started]) in `r`. False with `f` set on errors.
  bool take_lock(int i, bool wait, clock::time_point deadline, pg_result& r, failure& f,
                 std::string& why) {
    auto& session = session_[i];
    const char* sql = wait ? sql_[i].wait.c_str() : sql_[i].attempt.c_str();
    const bool sent =
        i == 0 ? session.send(sql, {key_text_.c_str()}, f, why)
               : session.send(sql, {hi_text_.c_str(), lo_text_.c_str(), life_start_[1].c_str()}, f,
                              why);
    if (!sent) return false;
    switch (session.await(deadline, wait ? interrupter_ : nullptr, r, f, why)) {
      case outcome::done:
        break;
      case outcome::interrupted:
        r = session.cancel(settings_.cancel_timeout);
        if (!r) return false;
        break;
      case outcome::timed_out:
        why = fmt::format("no answer within command_timeout ({} ms)",
                          settings_.command_timeout.count());
        f.set(ETIMEDOUT, "take the PostgreSQL lock on");
        return false;
      case outcome::failed:
        return false;
    }
    if (!session.check_row(r, i == 0 ? 2 : 4, "take the PostgreSQL lock on", f, why)) {
      if (pg_sqlstate(r) == "25006" && settings_.fencing) {
        why +=
            "; fencing tokens need a read-write server: connect to the primary, or set "
            "PostgresOptions::fencing = false";
      }
      return false;
    }
    if (pg_text(r, 0)[0] != 't') return false;
    locked_[i] = true;
    pid_[i] = std::atoi(pg_text(r, 1));
    return true;
  }

  void close(int i) noexcept {
    session_[i].close();
    locked_[i] = false;
    pid_[i] = 0;
    life_start_[i].clear();
  }

  //! Connects session i within connect_timeout (interruptibly if `wait`), then sets up the
  //! session. Returns false with `f` empty when interrupted.
  bool connect(int i, bool wait, failure& f, std::string& why) {
    close(i);
    auto& session = session_[i];
    const auto deadline = clock::now() + settings_.connect_timeout;
    Interrupter* interrupter = wait ? interrupter_ : nullptr;
    if (!session.open(settings_.connect_params, deadline, interrupter, settings_.connect_timeout, f,
                      why))
      return false;
    const int version = session.server_version();
    sql_[i] = i == 0 ? pg_lock_session_sql() : pg_fence_session_sql(version, settings_.fencing);
    pg_result r;
    auto answer = outcome::failed;
    if (session.send(pg_setup_sql(version, settings_.session).c_str(), {}, f, why, true))
      answer = session.await(deadline, interrupter, r, f, why);
    if (answer == outcome::done && session.check_row(r, 1, "connect to PostgreSQL", f, why)) {
      life_start_[i] = pg_text(r, 0);
      return true;
    }
    if (answer == outcome::done) {
      why = "session setup failed: " + why;
    } else if (answer == outcome::timed_out) {
      why = fmt::format("no answer to the session setup within {} ms (connect_timeout)",
                        settings_.connect_timeout.count());
      f.set(ETIMEDOUT, "connect to PostgreSQL");
    }
    close(i);
    return false;
  }

  const pg_hold_settings& settings_;
  pg_session session_[2];  // the lock session, the fence session
  std::string key_text_, hi_text_, lo_text_;
  pg_lock_sql sql_[2];
  Interrupter* interrupter_ = nullptr;  // during acquire()
  // Written by the driving thread only; atomic because held(), token(), valid_until() and
  // session_pid() are read from any thread.
  std::atomic<bool> locked_[2] = {false, false};
  std::atomic<int> pid_[2] = {0, 0};
  std::string life_start_[2];  // per session: when the server's life began (epoch seconds)
  std::atomic<bool> held_{false};
  std::atomic<std::uint64_t> token_{0};
  std::atomic<clock::rep> valid_until_{clock::time_point::min().time_since_epoch().count()};
  clock::time_point not_before_{};   // promotion waits until then (restart grace)
  clock::time_point grace_floor_{};  // ... and until then (our session was ended by the server)
};

}  // namespace workerlock::detail
