// tests/compile_fail/role_stream.cpp: must NOT compile (run by check.cmake).
// Printing the role of a temporary Election.
// EXPECT: keep the election alive
#include <workerlock/workerlock.hpp>

#include <iostream>
void show(const char* path) { std::cout << workerlock::is_primary_worker(path).role << "\n"; }
