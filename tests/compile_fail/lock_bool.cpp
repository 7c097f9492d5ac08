// tests/compile_fail/lock_bool.cpp: must NOT compile; tests/compile_fail/check.cmake runs it.
// Testing a temporary Election's lock as a bool.
// EXPECT: keep it alive
#include <workerlock/workerlock.hpp>

bool elected(const char* path) {
  if (workerlock::is_primary_worker(path).lock) return true;
  return false;
}
