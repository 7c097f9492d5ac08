// tests/compile_fail/lock_owns.cpp: must NOT compile; tests/compile_fail/check.cmake runs it.
// Asking a temporary Election's lock whether it is held.
// EXPECT: this asks a temporary WorkerLock (such as is_primary_worker(...).lock), whose lock is released
#include <workerlock/workerlock.hpp>

bool elected(const char* path) { return workerlock::is_primary_worker(path).lock.owns_lock(); }
