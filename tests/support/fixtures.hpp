// tests/support/fixtures.hpp: the setup that many process tests share, as Catch2 fixtures
// (TEST_CASE_METHOD): one run per mechanism or per Coordinator wait mode, a fresh directory.
#pragma once

#include <filesystem>

#include <catch2/catch.hpp>
#include <workerlock/workerlock.hpp>

#include "common.hpp"

namespace wltest {

//! Runs the test once per mechanism (a Catch2 generator), with a fresh directory `dir` and
//! `path`, the lock file "primary.lock" in it (not created).
struct EachMechanism {
  const workerlock::Mechanism mechanism = GENERATE(
      workerlock::Mechanism::ofd, workerlock::Mechanism::posix, workerlock::Mechanism::flock);
  const TempDir dir;
  const std::filesystem::path path = dir / "primary.lock";
};

//! Runs the test once per Coordinator wait mode (a Catch2 generator), as `mode`.
struct EachWaitMode {
  const workerlock::WaitMode mode =
      GENERATE(workerlock::WaitMode::background_thread, workerlock::WaitMode::polled);
};

//! EachMechanism, and `reaper`: Children(adopt_orphans), so this process is the subreaper of
//! everything the test forks, and whatever still runs when the test leaves is killed and reaped.
struct EachMechanismReaped : EachMechanism {
  Children reaper{adopt_orphans};
};

}  // namespace wltest
