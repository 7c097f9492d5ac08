// workerlock/detail/proc_locks.hpp: reads /proc/locks to learn whether a file is locked and
// by whom, without opening the file (which could drop a POSIX lock of this very process).
#pragma once

#include <sys/sysmacros.h>
#include <sys/types.h>

#include <cstdio>
#include <cstring>

namespace workerlock::detail {

enum class kernel_lock_kind { none, posix, ofd, flock };

struct kernel_lock_owner {
  kernel_lock_kind kind = kernel_lock_kind::none;
  pid_t pid = 0;  // -1 for OFD locks, 0 when the holder is outside our pid namespace
  //! Some POSIX lock on the file belongs to process `self` (flock and POSIX locks coexist,
  //! so it need not be the first holder listed). Closing any descriptor would drop it.
  bool posix_by_self = false;
};

//! Returns false if /proc/locks cannot be read; else fills `owner` (kind none: unlocked)
//! from the first holder of the file, and posix_by_self from all of them.
//! Lines of waiters ("->") are skipped: they do not hold the lock.
inline bool read_kernel_lock_owner(dev_t dev, ino_t ino, pid_t self,
                                   kernel_lock_owner& owner) noexcept {
  owner = {};
  std::FILE* table = std::fopen("/proc/locks", "re");
  if (table == nullptr) return false;
  char line[256];
  while (std::fgets(line, sizeof line, table) != nullptr) {
    if (std::strstr(line, "->") != nullptr) continue;
    char kind[16] = {};
    char access[16] = {};
    char mode[16] = {};
    long pid = 0;
    unsigned major_number = 0;
    unsigned minor_number = 0;
    unsigned long inode = 0;
    if (std::sscanf(line, "%*d: %15s %15s %15s %ld %x:%x:%lu", kind, mode, access, &pid,
                    &major_number, &minor_number, &inode) != 7)
      continue;
    if (inode != ino || major_number != major(dev) || minor_number != minor(dev)) continue;
    kernel_lock_kind found = kernel_lock_kind::none;
    if (std::strcmp(kind, "POSIX") == 0) {
      found = kernel_lock_kind::posix;
    } else if (std::strcmp(kind, "OFDLCK") == 0) {
      found = kernel_lock_kind::ofd;
    } else if (std::strcmp(kind, "FLOCK") == 0) {
      found = kernel_lock_kind::flock;
    } else {
      continue;  // leases and others do not hold our lock
    }
    if (found == kernel_lock_kind::posix && pid == self) owner.posix_by_self = true;
    if (owner.kind == kernel_lock_kind::none) {
      owner.kind = found;
      owner.pid = static_cast<pid_t>(pid);
    }
  }
  std::fclose(table);
  return true;
}

}  // namespace workerlock::detail
