// tests/support/fixtures.hpp: the setup that many process tests share, as Catch2 fixtures
// (TEST_CASE_METHOD): one run per mechanism, a fresh directory with the lock path in it.
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

//! EachMechanism, and `reaper`: Children(adopt_orphans), so this process is the subreaper of
//! everything the test forks, and whatever still runs when the test leaves is killed and reaped.
struct EachMechanismReaped : EachMechanism {
  Children reaper{adopt_orphans};
};

}  // namespace wltest
