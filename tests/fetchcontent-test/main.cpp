// Consumer check (fetchcontent): the public umbrella header compiles and links in a
// separate project, and the library is usable.
#include <workerlock/workerlock.hpp>

#include <iostream>

int main() {
  const auto path = workerlock::default_lock_path();
  std::cout << "workerlock::default_lock_path() = " << path << '\n';
  return 0;
}
