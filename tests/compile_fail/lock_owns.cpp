// tests/compile_fail/lock_owns.cpp: must NOT compile (run by check.cmake).
// Asking a temporary Election's lock whether it is held.
// EXPECT: this asks a temporary WorkerLock
#include <workerlock/workerlock.hpp>

bool elected(const char* path) { return workerlock::is_primary_worker(path).lock.owns_lock(); }
