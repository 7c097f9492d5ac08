// workerlock/detail/role_override.hpp: the operator override WORKERLOCK_ROLE, read the same
// way by the election and the Coordinator.
#pragma once

#include <cstdlib>
#include <string_view>

#include "../error.hpp"
#include "../options.hpp"

namespace workerlock::detail {

//! The operator override: WORKERLOCK_ROLE=secondary keeps this worker out of the election.
//! Forcing primary by environment is refused, since that is how duplicate work comes back.
inline bool kept_out_by_operator(const Options& options, failure& f) noexcept {
  const char* forced = options.honour_role_override ? std::getenv("WORKERLOCK_ROLE") : nullptr;
  const std::string_view value = forced != nullptr ? forced : "";
  if (value == "secondary") return true;
  if (value == "primary") {
    f.set(errc::role_override_refused, "elect a primary on",
          "WORKERLOCK_ROLE=primary is refused: forcing primary is how singleton work comes to run "
          "twice; "
          "unset it, or set WORKERLOCK_ROLE=secondary to keep this worker out of the election");
  } else if (!value.empty() && value != "auto") {
    f.set(errc::bad_configuration, "elect a primary on",
          "WORKERLOCK_ROLE must be unset, 'auto' or 'secondary'");
  }
  return false;
}

}  // namespace workerlock::detail
