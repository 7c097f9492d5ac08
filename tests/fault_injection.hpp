// tests/fault_injection.hpp: makes the kernel fail chosen system calls of this process with a
// chosen errno (a seccomp filter), so error paths are tested with no mock layer in the library.
#pragma once

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace wltest {

#if defined(__x86_64__)
inline constexpr std::uint32_t seccomp_arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
inline constexpr std::uint32_t seccomp_arch = AUDIT_ARCH_AARCH64;
#else
inline constexpr std::uint32_t seccomp_arch = 0;  // fail_syscall() reports false
#endif

//! From now on, in every thread of this process, system call `nr` fails with `error` without
//! running: every call, or, when `second_arguments` is not empty, only those whose second
//! argument (an fcntl command, say) is one of them. A call already blocked in the kernel
//! completes. Irreversible, and inherited by children: call it in a forked child. Returns
//! false if the filter could not be installed.
inline bool fail_syscall(long nr, int error,
                         std::initializer_list<std::uint32_t> second_arguments = {}) {
  if (seccomp_arch == 0) return false;
  // Layout: 0 load arch, 1 arch?, 2 load nr, 3 nr?, [4 load arg 1, 5.. arg?], fail, allow.
  const auto k = static_cast<int>(second_arguments.size());
  const int fail_at = k == 0 ? 4 : 5 + k;
  const int allow_at = fail_at + 1;
  const auto to = [](int target, int from) { return static_cast<std::uint8_t>(target - from - 1); };
  std::vector<sock_filter> program = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, seccomp_arch, 0, to(allow_at, 1)),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<std::uint32_t>(nr), 0, to(allow_at, 3)),
  };
  if (k > 0) {
    // The low 32 bits of args[1] (both supported architectures are little-endian).
    program.push_back(
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args) + sizeof(std::uint64_t)));
    int at = 5;
    for (const auto value : second_arguments) {
      const bool last = at == 5 + k - 1;
      program.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, value, to(fail_at, at),
                                 last ? to(allow_at, at) : std::uint8_t{0}));
      ++at;
    }
  }
  program.push_back(BPF_STMT(
      BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (static_cast<std::uint32_t>(error) & SECCOMP_RET_DATA)));
  program.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  const sock_fprog filter{static_cast<unsigned short>(program.size()), program.data()};
  return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &filter) == 0;
}

}  // namespace wltest
