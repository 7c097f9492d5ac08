// tests/compile_fail/role_not_equals.cpp: must NOT compile (run by check.cmake).
// != on the role of a temporary Election.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

bool elected(const char* path) {
  return workerlock::is_primary_worker(path).role != workerlock::Role::secondary;
}
