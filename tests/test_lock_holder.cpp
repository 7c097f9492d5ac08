// tests/test_lock_holder.cpp: forked-process tests of lock_holder (see tests/CMakeLists.txt for the topic).
// Each test case forks real processes and fails if the behaviour it names breaks.
#include <catch2/catch.hpp>

#include "support.hpp"
