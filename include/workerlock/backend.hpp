// workerlock/backend.hpp: Backend, the interface through which a Coordinator holds the
// primary role: a local lock file (FileBackend) or a lease on a network engine.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace workerlock {

//! What a Coordinator needs from a lock or lease. Errors are thrown as lock_error (or
//! another std::exception); the Coordinator surfaces those from start() and logs and
//! retries them later. An implementation is driven by one thread at a time, except
//! interrupt(), which other threads may call at any moment.
class Backend {
 public:
  virtual ~Backend() = default;

  //! Called once by Coordinator::start() in the caller's thread, before anything else.
  virtual void prepare() {}

  //! One attempt that does not wait. Returns: true if this process now holds it.
  virtual bool try_acquire() = 0;

  //! Waits until held (true) or until interrupt() is called (false).
  virtual bool wait_acquire() = 0;

  //! Makes a wait_acquire() running on another thread return soon. May be called repeatedly,
  //! and must be async-signal-safe: Coordinator::request_stop() calls it from signal handlers.
  virtual void interrupt() noexcept = 0;

  //! Clears an earlier interrupt() before the next wait.
  virtual void clear_interrupt() noexcept = 0;

  //! While held, called every verify_interval(): renews a lease or checks the lock is
  //! still ours. Returns false as soon as the hold is lost or cannot be proven.
  virtual bool verify_held() = 0;
  virtual std::chrono::milliseconds verify_interval() const noexcept = 0;

  //! Gives up the hold, if any. Never throws.
  virtual void release() noexcept = 0;

  //! Gives up the hold and drops any resource (descriptor, connection) so that the next
  //! attempt starts afresh, after an error or a lost hold. Never throws.
  virtual void reset() noexcept { release(); }

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

  //! The base path of the startup barrier's marker (the marker is `<base>.startup`), or
  //! empty when the backend offers none.
  virtual std::filesystem::path startup_marker_base() const { return {}; }

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
