// workerlock/role.hpp: Role (primary or secondary) and ElectedRole, a role bound to the
// process that won it, so that a copy inherited through fork() reads as secondary.
#pragma once

#include <ostream>
#include <string_view>

#include <sys/types.h>
#include <unistd.h>

#include <fmt/format.h>

#include "detail/dependent_false.hpp"
#include "detail/enum_formatter.hpp"

// The message of every refused read of a temporary Election's role (static_assert needs a
// string literal).
#define WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE                                             \
  "this reads the role of a temporary Election, whose lock is released at the end of the "   \
  "statement, so every worker would read primary; keep the election alive: auto election = " \
  "workerlock::is_primary_worker(...); then read election.role"

namespace workerlock {

//! The outcome of an election: the primary runs singleton work, secondaries only serve.
enum class Role { primary, secondary };

constexpr std::string_view to_string(Role role) noexcept {
  return role == Role::primary ? "primary" : "secondary";
}

inline std::ostream& operator<<(std::ostream& out, Role role) { return out << to_string(role); }

namespace detail {

// ElectedRole is this template's only specialization. Being a template is what lets each
// rvalue overload below refuse with a message: a member of a class template is compiled
// only where it is used, so its static_assert fires there and nowhere else.
template <typename Unused>
class elected_role {
 public:
  constexpr elected_role() noexcept = default;
  elected_role(Role role, pid_t elected_in) noexcept : role_(role), elected_in_(elected_in) {}

  // Copies from a named role (an lvalue); from a temporary's role, refuses.
  elected_role(const elected_role&) noexcept = default;
  elected_role& operator=(const elected_role&) noexcept = default;
  elected_role(elected_role&& /*temporary*/) noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
  }
  elected_role& operator=(elected_role&& /*temporary*/) noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return *this;
  }
  ~elected_role() = default;

  Role get() const& noexcept { return inherited_across_fork() ? Role::secondary : role_; }
  Role get() const&& noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return Role::secondary;
  }
  operator Role() const& noexcept { return get(); }  // NOLINT: reads like the enum it stands for
  operator Role() const&& noexcept {                 // NOLINT
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return Role::secondary;
  }

  bool inherited_across_fork() const noexcept {
    return elected_in_ != 0 && elected_in_ != ::getpid();
  }
  pid_t elected_in() const noexcept { return elected_in_; }

  bool operator==(Role b) const& noexcept { return get() == b; }
  bool operator!=(Role b) const& noexcept { return get() != b; }
  bool operator==(Role /*b*/) const&& noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return false;
  }
  bool operator!=(Role /*b*/) const&& noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return false;
  }
  friend bool operator==(Role a, const elected_role& b) noexcept { return a == b.get(); }
  friend bool operator!=(Role a, const elected_role& b) noexcept { return a != b.get(); }
  friend bool operator==(Role /*a*/, const elected_role&& /*b*/) noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return false;
  }
  friend bool operator!=(Role /*a*/, const elected_role&& /*b*/) noexcept {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return false;
  }
  friend std::ostream& operator<<(std::ostream& out, const elected_role& r) {
    return out << r.get();
  }
  friend std::ostream& operator<<(std::ostream& out, const elected_role&& /*r*/) {
    static_assert(dependent_false<Unused>, WORKERLOCK_DETAIL_TEMPORARY_ROLE_MESSAGE);
    return out;
  }

 private:
  Role role_ = Role::secondary;
  pid_t elected_in_ = 0;
};

}  // namespace detail

//! The role returned by is_primary_worker(). It remembers which process won: in a process
//! forked from the winner (the "elected in the master, then forked" mistake, also through
//! syscall(SYS_fork) or clone()) it reads as Role::secondary, so N children never all
//! believe they are primary.
//!
//!   role.get(), Role(role)         the role in the calling process
//!   role == Role::primary, !=      compare (either way round)
//!   role.inherited_across_fork()   true in a process other than the one elected (getpid())
//!   role.elected_in()              the pid of the process the election ran in
//!   std::cout << role, fmt "{}"    "primary" or "secondary"
//!
//! A role is read only while its Election lives. Reading, comparing, printing, copying or
//! assigning the role of a temporary, as in `is_primary_worker(path).role == Role::primary`
//! or `auto role = is_primary_worker(path).role;`, does not compile (a static_assert says
//! so): that Election's lock is released at the end of the statement, and every worker
//! would read primary. Keep the election: `auto election = workerlock::is_primary_worker();`
//! or `auto [role, lock] = workerlock::is_primary_worker();`. An ElectedRole copies from a
//! named one only; it has no usable move (return a local one as `ElectedRole(local)`).
//! Formatting a temporary's role with fmt cannot be refused (fmt takes every argument by
//! reference): it prints the role at that instant, with the lock released just after.
using ElectedRole = detail::elected_role<void>;

}  // namespace workerlock

template <>
struct fmt::formatter<workerlock::Role> : workerlock::detail::enum_formatter<workerlock::Role> {};

template <>
struct fmt::formatter<workerlock::ElectedRole> : fmt::formatter<workerlock::Role> {
  template <typename FormatContext>
  auto format(const workerlock::ElectedRole& role, FormatContext& ctx) const
      -> decltype(ctx.out()) {
    return fmt::formatter<workerlock::Role>::format(role.get(), ctx);
  }
};
