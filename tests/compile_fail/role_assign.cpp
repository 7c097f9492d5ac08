// tests/compile_fail/role_assign.cpp: must NOT compile (run by check.cmake).
// Assigning the role of a temporary Election to a kept ElectedRole.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

workerlock::ElectedRole kept;
void elect(const char* path) { kept = workerlock::is_primary_worker(path).role; }
