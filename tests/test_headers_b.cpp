// ODR / header hygiene check: test_headers_a.cpp and test_headers_b.cpp both
// include every public header and are linked into the same executable, so a
// non-inline definition in a header fails at link time (multiple definition).
#include <workerlock/workerlock.hpp>

namespace workerlock_tests {

int headers_tu_b();
int headers_tu_b() { return 1; }

}  // namespace workerlock_tests
