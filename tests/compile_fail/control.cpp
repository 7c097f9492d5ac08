// tests/compile_fail/control.cpp: MUST compile (warning-free): the spellings that keep the
// election alive, beside the snippets here that must not compile.
// EXPECT-SUCCESS
#include <workerlock/workerlock.hpp>

#include <iostream>
#include <utility>

#include <fmt/format.h>

namespace {

using workerlock::Role;

bool structured(const char* path) {
  auto [role, lock] = workerlock::is_primary_worker(path);
  std::cout << role << fmt::format(" {}\n", role);
  return role == Role::primary && Role::primary == role && lock.owns_lock() && bool(lock);
}

bool named(const char* path) {
  auto election = workerlock::is_primary_worker(path);
  const Role role = election.role;
  switch (election.role) {
    case Role::primary:
      break;
    case Role::secondary:
      break;
  }
  workerlock::ElectedRole copy = election.role;
  copy = election.role;
  return election.role != Role::secondary && role == copy.get() && election.lock.owns_lock();
}

bool kept_for_the_process(const char* path) {
  static auto election = workerlock::is_primary_worker(path);
  return election.role == Role::primary;
}

workerlock::Election moved(const char* path) {
  auto election = workerlock::is_primary_worker(path);
  workerlock::Election other;
  other = std::move(election);
  return other;
}

bool with_error_code(const char* path) {
  std::error_code ec;
  auto election = workerlock::is_primary_worker(path, {}, ec);
  return !ec && election.role == Role::primary;
}

bool held(workerlock::WorkerLock& lock) {
  const bool now = lock.try_lock();
  lock.unlock();
  return now;
}

}  // namespace

int main() {
  auto election = moved("/tmp/control.lock");
  return structured("/tmp/a.lock") && named("/tmp/b.lock") && kept_for_the_process("/tmp/c.lock") &&
                 with_error_code("/tmp/d.lock") && held(election.lock)
             ? 0
             : 1;
}
