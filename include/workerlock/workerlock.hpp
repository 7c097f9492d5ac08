// workerlock/workerlock.hpp: includes the whole public API of workerlock.
// Start with is_primary_worker() in election.hpp; WorkerLock is the handle underneath.
#pragma once

#include "backend.hpp"
#include "coordinator.hpp"
#include "election.hpp"
#include "error.hpp"
#include "file_backend.hpp"
#include "holder.hpp"
#include "options.hpp"
#include "role.hpp"
#include "startup_barrier.hpp"
#include "worker_lock.hpp"
