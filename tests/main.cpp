// Catch2 (v2) main for workerlock_tests. Test cases live in the other
// tests/*.cpp files listed in WORKERLOCK_TEST_SOURCES (tests/CMakeLists.txt).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
