// workerlock/workerlock.hpp: includes the whole public API of workerlock (the network
// backends excepted: redis.hpp and postgres.hpp come with their own CMake targets).
#pragma once

// The layers, from the top. A header includes headers of its own layer or of layers below
// it, never above; the vocabulary headers may be included from every layer. A detail/
// header belongs to the layer it serves: the Coordinator's parts to layer 1, the backends'
// parts to layer 3; only the kernel, fork-layer and process-identity headers are layer 4.
//
//  1. Election and Coordinator: election.hpp (is_primary_worker(), the one call of a
//     pre-fork worker), coordinator.hpp (a primary kept through failovers, with callbacks)
//     and coordinator_options.hpp; their parts detail/role_machine.hpp,
//     coordinator_drivers.hpp, stop_signal.hpp, start_failure.hpp, role_override.hpp.
//  2. Lock and holder: worker_lock.hpp (WorkerLock, the RAII handle on one lock file) and
//     holder.hpp (lock_holder(): who holds a lock file).
//  3. Backends, what a Coordinator holds the role through: backend.hpp (the interface),
//     interrupter.hpp (how the Coordinator stops a backend's wait), generation_marker.hpp
//     (the startup barrier's interface), file_backend.hpp with startup_barrier.hpp and
//     detail/wakeup_signal.hpp, and redis.hpp and postgres.hpp (their own CMake targets; not
//     included here) with their parts detail/redis_*.hpp and detail/pg_*.hpp, the only
//     headers that include hiredis, uriparser or libpq.
//  4. detail/ kernel calls (posix.hpp, lock_file.hpp, lock_handle.hpp, explain_errno.hpp,
//     proc_locks.hpp, record.hpp, registry.hpp, deadline.hpp, futex_word.hpp), the fork layer
//     (fork_layer.hpp: the one pthread_atfork registration) and process identity
//     (process_identity.hpp: pid, /proc/PID/stat, boot id, pidfd); dependent_false.hpp and
//     enum_formatter.hpp are small helpers of the layers above.
//  Vocabulary: options.hpp, log.hpp, error.hpp, role.hpp.
//
// Linux only: detail/posix.hpp stops the build elsewhere.

#include "backend.hpp"
#include "coordinator.hpp"
#include "coordinator_options.hpp"
#include "election.hpp"
#include "error.hpp"
#include "file_backend.hpp"
#include "generation_marker.hpp"
#include "holder.hpp"
#include "interrupter.hpp"
#include "log.hpp"
#include "options.hpp"
#include "role.hpp"
#include "startup_barrier.hpp"
#include "worker_lock.hpp"
