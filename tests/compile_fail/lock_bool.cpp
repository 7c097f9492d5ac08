// tests/compile_fail/lock_bool.cpp: must NOT compile; tests/compile_fail/check.cmake runs it.
// Testing a temporary Election's lock as a bool.
// EXPECT: this asks a temporary WorkerLock (such as is_primary_worker(...).lock), whose lock is released
#include <workerlock/workerlock.hpp>

bool elected(const char* path) {
  if (workerlock::is_primary_worker(path).lock) return true;
  return false;
}
