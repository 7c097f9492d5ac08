// tests/compile_fail/role_switch.cpp: must NOT compile (run by check.cmake).
// switch on the role of a temporary Election.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

int elected(const char* path) {
  switch (workerlock::is_primary_worker(path).role) {
    case workerlock::Role::primary:
      return 1;
    case workerlock::Role::secondary:
      return 0;
  }
  return 0;
}
