// workerlock/workerlock.hpp: includes the whole public API of workerlock (the network
// backends excepted: redis.hpp and postgres.hpp come with their own CMake targets).
#pragma once

// The layers, from the top. A header includes headers of its own layer or of layers below
// it, never above; the vocabulary headers may be included from every layer.
//
//  1. Election and Coordinator: election.hpp (is_primary_worker(), the one call of a
//     pre-fork worker) and coordinator.hpp (a primary kept through failovers, with
//     callbacks).
//  2. Lock and holder: worker_lock.hpp (WorkerLock, the RAII handle on one lock file) and
//     holder.hpp (lock_holder(): who holds a lock file).
//  3. Backends, what a Coordinator holds the role through: backend.hpp (the interface),
//     file_backend.hpp, redis.hpp, postgres.hpp, and startup_barrier.hpp.
//  4. detail/: kernel calls (posix.hpp, lock_file.hpp, lock_handle.hpp, explain_errno.hpp,
//     proc_locks.hpp, record.hpp, registry.hpp, deadline.hpp, futex_word.hpp), the fork
//     layer (fork_layer.hpp: the one pthread_atfork registration) and process identity
//     (process_identity.hpp: pid, /proc/PID/stat, boot id, pidfd); role_override.hpp and
//     dependent_false.hpp are small helpers of the layers above.
//  Vocabulary: options.hpp, log.hpp, error.hpp, role.hpp.
//
// Linux only: detail/posix.hpp stops the build elsewhere.

#include "backend.hpp"
#include "coordinator.hpp"
#include "election.hpp"
#include "error.hpp"
#include "file_backend.hpp"
#include "holder.hpp"
#include "log.hpp"
#include "options.hpp"
#include "role.hpp"
#include "startup_barrier.hpp"
#include "worker_lock.hpp"
