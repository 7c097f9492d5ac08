// workerlock/detail/proc_stat.hpp: transition only: the /proc readers moved to
// process_identity.hpp; delete this file once redis.hpp and startup_barrier.hpp include that.
#pragma once

#include "process_identity.hpp"
