// tests/support/fault_injection.hpp: makes the kernel fail chosen system calls of this process with
// a chosen errno (a seccomp filter), so error paths are tested with no mock layer in the library.
#pragma once

#include <seccomp.h>

#include <cstdint>
#include <initializer_list>

namespace wltest {

//! A seccomp filter built with libseccomp, on every architecture it supports: a system call
//! that no rule names runs as usual (so do calls of another ABI, such as i386 calls on
//! x86_64). Install it in a forked child: installing is irreversible, and children inherit it.
class SyscallFilter {
 public:
  SyscallFilter() noexcept : filter_(::seccomp_init(SCMP_ACT_ALLOW)) {
    ok_ = filter_ != nullptr &&
          ::seccomp_attr_set(filter_, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_ALLOW) == 0;
  }
  ~SyscallFilter() { ::seccomp_release(filter_); }
  SyscallFilter(const SyscallFilter&) = delete;
  SyscallFilter& operator=(const SyscallFilter&) = delete;

  //! System call `nr` (SCMP_SYS(name), or a SYS_name of this architecture) takes `action`
  //! (SCMP_ACT_ERRNO(e), SCMP_ACT_KILL_PROCESS) when every condition holds, always when
  //! there is none. Rules for one call are alternatives. A pseudo number SCMP_SYS() gives
  //! for a call this architecture lacks (fcntl64 on x86_64) adds nothing.
  SyscallFilter& on(int nr, std::uint32_t action,
                    std::initializer_list<scmp_arg_cmp> conditions = {}) noexcept {
    ok_ = ok_ &&
          ::seccomp_rule_add_array(filter_, action, nr, static_cast<unsigned>(conditions.size()),
                                   conditions.begin()) == 0;
    return *this;
  }

  //! Loads the filter (setting no_new_privs first): from now on it applies to this thread,
  //! or to every thread of the process when `all_threads`. A call already blocked in the
  //! kernel completes. Returns false if a rule was refused or the kernel refused the filter.
  [[nodiscard]] bool install(bool all_threads) noexcept {
    return ok_ && ::seccomp_attr_set(filter_, SCMP_FLTATR_CTL_TSYNC, all_threads ? 1 : 0) == 0 &&
           ::seccomp_load(filter_) == 0;
  }

 private:
  scmp_filter_ctx filter_;
  bool ok_ = false;
};

//! The condition "the low 32 bits of argument `index`, masked with `mask`, equal `value`":
//! for an int argument (a descriptor, an fcntl command, open flags), whatever the upper half
//! of the register holds.
inline scmp_arg_cmp low_bits_equal(unsigned index, std::uint32_t value,
                                   std::uint32_t mask = 0xffffffffU) noexcept {
  return scmp_arg_cmp{index, SCMP_CMP_MASKED_EQ, mask, value};
}

//! From now on, in every thread of this process, system call `nr` fails with `error` without
//! running: every call, or, when `second_arguments` is not empty, only those whose second
//! argument (an fcntl command, say) is one of them. A call already blocked in the kernel
//! completes. Irreversible, and inherited by children: call it in a forked child. Returns
//! false if the filter could not be installed.
inline bool fail_syscall(long nr, int error,
                         std::initializer_list<std::uint32_t> second_arguments = {}) {
  SyscallFilter filter;
  const auto call = static_cast<int>(nr);
  if (second_arguments.size() == 0) filter.on(call, SCMP_ACT_ERRNO(error));
  for (const auto value : second_arguments)
    filter.on(call, SCMP_ACT_ERRNO(error), {low_bits_equal(1, value)});
  return filter.install(true);
}

}  // namespace wltest
