// tests/compile_fail/discard_election.cpp: must NOT compile (run by check.cmake).
// Dropping the Election: its lock is released at once ([[nodiscard]], -Werror).
// EXPECT: nodiscard
#include <workerlock/workerlock.hpp>

void elect(const char* path) { workerlock::is_primary_worker(path); }
