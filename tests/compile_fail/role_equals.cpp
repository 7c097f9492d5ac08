// tests/compile_fail/role_equals.cpp: must NOT compile (run by check.cmake).
// Comparing the role of a temporary Election: every worker would read primary.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

bool elected(const char* path) {
  return workerlock::is_primary_worker(path).role == workerlock::Role::primary;
}
