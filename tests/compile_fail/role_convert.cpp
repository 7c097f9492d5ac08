// tests/compile_fail/role_convert.cpp: must NOT compile (run by check.cmake).
// Converting the role of a temporary Election to Role.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

workerlock::Role elected(const char* path) {
  workerlock::Role role = workerlock::is_primary_worker(path).role;
  return role;
}
