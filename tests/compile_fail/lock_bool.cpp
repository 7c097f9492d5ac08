// tests/compile_fail/lock_bool.cpp: must NOT compile (run by check.cmake).
// Testing a temporary Election's lock as a bool.
// EXPECT: this asks a temporary WorkerLock
#include <workerlock/workerlock.hpp>

bool elected(const char* path) {
  if (workerlock::is_primary_worker(path).lock) return true;
  return false;
}
