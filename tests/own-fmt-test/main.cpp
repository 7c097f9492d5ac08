// Consumer check (own-fmt): workerlock builds and runs against the fmt::fmt target its
// parent project defined.
#include <workerlock/workerlock.hpp>

#include <fmt/format.h>

#include <iostream>

#ifndef CONSUMER_OWN_FMT
#error "workerlock::workerlock did not link the consumer's own fmt::fmt target"
#endif

int main() {
  const auto path = workerlock::default_lock_path();
  std::cout << fmt::format("workerlock::default_lock_path() = {}\n", path.native());
  return path.empty() ? 1 : 0;
}
