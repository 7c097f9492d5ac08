// workerlock/role.hpp: Role (primary or secondary) and ElectedRole, a role bound to the
// process that won it, so that a copy inherited through fork() reads as secondary.
#pragma once

#include <ostream>
#include <string_view>

#include <sys/types.h>
#include <unistd.h>

#include <fmt/format.h>

#include "detail/registry.hpp"

namespace workerlock {

//! The outcome of an election: the primary runs singleton work, secondaries only serve.
enum class Role { primary, secondary };

constexpr std::string_view to_string(Role role) noexcept {
  return role == Role::primary ? "primary" : "secondary";
}

inline std::ostream& operator<<(std::ostream& out, Role role) { return out << to_string(role); }

//! The role returned by is_primary_worker(). It remembers which process won: in a process
//! forked from the winner (the "elected in the master, then forked" mistake) it reads as
//! Role::secondary, so N children never all believe they are primary.
class ElectedRole {
 public:
  constexpr ElectedRole() noexcept = default;
  ElectedRole(Role role, pid_t elected_in) noexcept : role_(role), elected_in_(elected_in) {}

  //! The role in the calling process: secondary in any process other than the one elected.
  Role get() const noexcept { return inherited_across_fork() ? Role::secondary : role_; }
  operator Role() const noexcept { return get(); }  // NOLINT: reads like the enum it stands for

  //! True in a child that inherited this value through fork() from the process elected.
  bool inherited_across_fork() const noexcept {
    return elected_in_ != 0 && elected_in_ != detail::current_pid();
  }
  //! The pid of the process the election ran in.
  pid_t elected_in() const noexcept { return elected_in_; }

  friend bool operator==(const ElectedRole& a, Role b) noexcept { return a.get() == b; }
  friend bool operator==(Role a, const ElectedRole& b) noexcept { return a == b.get(); }
  friend bool operator!=(const ElectedRole& a, Role b) noexcept { return a.get() != b; }
  friend bool operator!=(Role a, const ElectedRole& b) noexcept { return a != b.get(); }
  friend std::ostream& operator<<(std::ostream& out, const ElectedRole& r) {
    return out << r.get();
  }

 private:
  Role role_ = Role::secondary;
  pid_t elected_in_ = 0;
};

}  // namespace workerlock

template <>
struct fmt::formatter<workerlock::Role> : fmt::formatter<std::string_view> {
  template <typename FormatContext>
  auto format(workerlock::Role role, FormatContext& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(workerlock::to_string(role), ctx);
  }
};

template <>
struct fmt::formatter<workerlock::ElectedRole> : fmt::formatter<workerlock::Role> {
  template <typename FormatContext>
  auto format(const workerlock::ElectedRole& role, FormatContext& ctx) const
      -> decltype(ctx.out()) {
    return fmt::formatter<workerlock::Role>::format(role.get(), ctx);
  }
};
