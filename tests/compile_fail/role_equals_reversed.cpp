// tests/compile_fail/role_equals_reversed.cpp: must NOT compile (run by check.cmake).
// The same comparison, written the other way round.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

bool elected(const char* path) {
  return workerlock::Role::primary == workerlock::is_primary_worker(path).role;
}
