// tests/compile_fail/discard_try_lock.cpp: must NOT compile (run by check.cmake).
// Dropping the result of try_lock(): whether the lock is held is lost ([[nodiscard]], -Werror).
// EXPECT: nodiscard
#include <workerlock/workerlock.hpp>

void take(workerlock::WorkerLock& lock) { lock.try_lock(); }
