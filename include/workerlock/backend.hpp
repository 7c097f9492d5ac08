// workerlock/backend.hpp: Backend, the interface through which a Coordinator holds the
// primary role: a local lock file (FileBackend) or a lease on a network engine.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "generation_marker.hpp"
#include "interrupter.hpp"

namespace workerlock {

//! What a Coordinator needs from a lock or lease. A user may write one (a ZooKeeper lease,
//! say): the Coordinator owns what every backend shares (the Interrupter that ends a wait,
//! the retries, the callbacks), so a backend only answers the questions below.
//!
//! Threads: one thread at a time drives the backend (every member but the ones said to be
//! safe from any thread): the Coordinator's thread, or the thread calling start(), poll()
//! or stop().
//!
//! Errors, the one contract of every backend: try_acquire(), wait_acquire() and
//! verify_held() return true or false only for a definite answer, and throw lock_error
//! (naming the path or the network target, see error_path()) when they cannot tell. Any
//! other std::exception counts as a lock_error. What the Coordinator does with each:
//! - try_acquire(): true promotes; false stays a standby. A throw is passed on by start();
//!   later (WaitMode::polled) it is logged, then reset(), and retried after the backoff.
//! - wait_acquire(): true promotes; false checks for a stop, then waits again. A throw is
//!   logged, then reset(), and retried after the backoff.
//! - verify_held(): true keeps the role until the next check; false means the hold is
//!   lost: on_demoted, release() and reset() at once. A throw means "cannot tell": it is
//!   logged, the role is kept while steady_clock::now() < valid_until(), and the check is
//!   retried after the backoff (at valid_until() at the latest); a check that still cannot
//!   tell at valid_until() steps down as for false.
//! So a hold that cannot be proven never stays primary past valid_until(): a lease must
//! override valid_until() (the default, max() while held, says "cannot expire by time
//! alone", as a lock file's hold), must not move it on without a proof, and answers false,
//! not a throw, when the hold may end sooner than valid_until() says (a session the server
//! may have closed). A throw from try_acquire() or wait_acquire() is followed by reset().
class Backend {
 public:
  virtual ~Backend() = default;

  //! Called once by Coordinator::start() in the caller's thread, before anything else.
  //! Throws: lock_error for a bad configuration (errc::bad_configuration), passed on by
  //! start().
  virtual void prepare() {}

  //! One attempt that does not wait. Returns: true if this process now holds it, false if
  //! another one does.
  virtual bool try_acquire() = 0;

  //! Waits until held (true), or until `interrupter` is interrupted (false; a false
  //! without an interrupt makes the Coordinator call it again at once). Waits through
  //! interrupter.wait() (a socket, a sleep between attempts), or registers an
  //! Interrupter::KickScope around a call that no descriptor can end. Waits that no stop
  //! may cut short (a release, a cancel) use wait_ready() instead.
  virtual bool wait_acquire(Interrupter& interrupter) = 0;

  //! While held, called every verify_interval(): renews a lease or checks the lock is
  //! still ours. Returns true when the hold was proven just now, false when it is lost;
  //! throws lock_error when it cannot tell (see the table above).
  virtual bool verify_held() = 0;
  virtual std::chrono::milliseconds verify_interval() const noexcept = 0;

  //! Gives up the hold, if any. Never throws.
  virtual void release() noexcept = 0;

  //! Gives up the hold and drops any resource (descriptor, connection) so that the next
  //! attempt starts afresh, after an error or a lost hold. Never throws.
  virtual void reset() noexcept { release(); }

  //! Whether this process holds it. Safe from any thread, and async-signal-safe.
  virtual bool held() const noexcept = 0;

  //! For log lines, such as "path=/run/app/primary.lock".
  virtual std::string describe() const = 0;

  //! What lock_error::path() names in the errors the Coordinator reports about this backend:
  //! the lock file's path for FileBackend; for a network backend the text its own errors
  //! carry there (by default describe()).
  virtual std::filesystem::path error_path() const { return describe(); }

  //! For a network backend: the server and key its errors name (never a password), which
  //! the Coordinator's lock_error carries in target() with an empty path(). Empty for a
  //! backend whose errors are about a file (then error_path() is used).
  virtual std::string network_target() const { return {}; }

  //! The startup barrier's record for `generation` (see CoordinatorOptions::
  //! startup_generation), or nullptr when this backend keeps none: then Coordinator::start()
  //! refuses an on_startup callback (errc::bad_configuration), since it could not run it
  //! once per generation. Reads and writes nothing yet.
  //! Throws: lock_error (errc::bad_configuration) if `generation` is not valid here
  //! (see StartupBarrier::check_generation()) or the record has no room (a path too long).
  virtual std::unique_ptr<GenerationMarker> startup_barrier(const std::string& generation) const {
    static_cast<void>(generation);
    return nullptr;
  }

  //! A number that grows with every new holder, for fencing downstream writes; 0 if the
  //! backend has none.
  virtual std::uint64_t fencing_token() const noexcept { return 0; }

  //! For a lease: the local CLOCK_MONOTONIC (steady_clock) instant until which this process
  //! may act as the holder; the Coordinator's role() reads secondary from then on, before
  //! its own thread notices. time_point::max() for a hold that cannot expire by time alone
  //! (a lock file), and time_point::min() while nothing is held. Like held() and
  //! fencing_token(), safe from any thread at any time, and async-signal-safe.
  virtual std::chrono::steady_clock::time_point valid_until() const noexcept {
    return held() ? std::chrono::steady_clock::time_point::max()
                  : std::chrono::steady_clock::time_point::min();
  }

  //! Coordinator::stop(StopScope::whole_server) calls this while holding, just before
  //! release(): leave a note, dated now, that the next holder reads through
  //! server_stop_noted(). The default keeps no note (a whole-server stop is then a plain
  //! stop). A network backend could keep it beside its lease (a second key that expires
  //! after the grace, say). Never throws: a note that cannot be written is lost, and
  //! should be reported through the log sink (FileBackend logs a warning naming the path).
  virtual void note_server_stopping() noexcept {}

  //! Called by a new holder: when the previous holder noted a whole-server stop, the local
  //! steady_clock instant of that note; nullopt when there is none.
  virtual std::optional<std::chrono::steady_clock::time_point> server_stop_noted() const noexcept {
    return std::nullopt;
  }
};

}  // namespace workerlock
