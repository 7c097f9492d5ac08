// tests/compile_fail/lock_owns.cpp: must NOT compile; tests/compile_fail/check.cmake runs it.
// Asking a temporary Election'"s
// EXPECT: lock
#include <workerlock/workerlock.hpp>
whether
