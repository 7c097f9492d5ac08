// tests/compile_fail/role_copy.cpp: must NOT compile (run by check.cmake).
// Copying the role out of a temporary Election (the lock is gone, the copy says primary).
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

int elected(const char* path) {
  auto role = workerlock::is_primary_worker(path).role;
  return role == workerlock::Role::primary ? 1 : 0;
}
