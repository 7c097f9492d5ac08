// tests/compile_fail/role_get.cpp: must NOT compile (run by check.cmake).
// get() on the role of a temporary Election.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

workerlock::Role elected(const char* path) {
  return workerlock::is_primary_worker(path).role.get();
}
