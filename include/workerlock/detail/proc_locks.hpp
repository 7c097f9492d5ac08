// workerlock/detail/proc_locks.hpp: reads /proc/locks (and, for btrfs, /proc/self/mountinfo)
// to learn whether a file is locked and by whom, without opening the file.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "../options.hpp"
#include "posix.hpp"
#include "process_identity.hpp"

namespace workerlock::detail {

//! Reads a /proc text file line by line through one descriptor (no FILE*, no allocation
//! per line). A line longer than the buffer is skipped whole.
class proc_line_reader {
 public:
  explicit proc_line_reader(const char* path) noexcept : fd_(open_proc_file(path)) {}
  ~proc_line_reader() { close_keep_errno(fd_); }
  proc_line_reader(const proc_line_reader&) = delete;
  proc_line_reader& operator=(const proc_line_reader&) = delete;

  bool is_open() const noexcept { return fd_ >= 0; }
  //! False after a read error (errno set); true at a clean end of file.
  bool ok() const noexcept { return error_ == 0; }
  int error() const noexcept { return error_; }

  //! The next line without its '\n'; false at the end of the file or on an error.
  bool next(std::string_view& line) noexcept {
    for (;;) {
      const char* begin = buffer_ + start_;
      const auto* newline = static_cast<const char*>(std::memchr(begin, '\n', end_ - start_));
      if (newline != nullptr) {
        const auto length = static_cast<std::size_t>(newline - begin);
        start_ += length + 1;
        if (skipping_) {
          skipping_ = false;
          continue;
        }
        line = std::string_view(begin, length);
        return true;
      }
      if (eof_) {
        if (start_ == end_ || skipping_) return false;
        line = std::string_view(begin, end_ - start_);
        start_ = end_;
        return true;
      }
      if (start_ > 0) {  // keep the partial line at the front
        std::memmove(buffer_, buffer_ + start_, end_ - start_);
        end_ -= start_;
        start_ = 0;
      } else if (end_ == sizeof buffer_) {  // a line that does not fit: drop it
        skipping_ = true;
        end_ = 0;
      }
      const ssize_t got =
          retry_on_eintr([&] { return ::read(fd_, buffer_ + end_, sizeof buffer_ - end_); });
      if (got < 0) {
        error_ = errno;
        return false;
      }
      if (got == 0) eof_ = true;
      end_ += static_cast<std::size_t>(got);
    }
  }

 private:
  int fd_ = -1;
  char buffer_[4096];
  std::size_t start_ = 0;
  std::size_t end_ = 0;
  bool eof_ = false;
  bool skipping_ = false;
  int error_ = 0;
};

//! One holder line of /proc/locks. The device is the superblock's (as the kernel prints it),
//! which on btrfs is not the st_dev that stat() reports for a file of a subvolume.
struct kernel_lock_line {
  Mechanism kind = Mechanism::posix;  // the kernel's POSIX, OFDLCK or FLOCK
  pid_t pid = 0;                      // as the procfs at /proc sees it: -1 for OFD locks
  dev_t device = 0;
};

//! Returns false (errno set) if /proc/locks cannot be read; else appends to `lines` every
//! holder of a POSIX, OFD or flock lock on an inode numbered `ino`, on any file system.
//! Lines of waiters ("->") are skipped: they do not hold the lock.
inline bool read_kernel_lock_lines(ino_t ino, std::vector<kernel_lock_line>& lines) {
  proc_line_reader table("/proc/locks");
  if (!table.is_open()) return false;
  std::string_view text;
  char line[256];
  while (table.next(text)) {
    if (text.size() >= sizeof line) continue;  // no lock line is that long
    std::memcpy(line, text.data(), text.size());
    line[text.size()] = '\0';
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
    if (inode != ino) continue;
    kernel_lock_line found;
    if (std::strcmp(kind, "POSIX") == 0) {
      found.kind = Mechanism::posix;
    } else if (std::strcmp(kind, "OFDLCK") == 0) {
      found.kind = Mechanism::ofd;
    } else if (std::strcmp(kind, "FLOCK") == 0) {
      found.kind = Mechanism::flock;
    } else {
      continue;  // leases and others do not hold our lock
    }
    found.pid = static_cast<pid_t>(pid);
    found.device = makedev(major_number, minor_number);
    lines.push_back(found);
  }
  if (!table.ok()) {
    errno = table.error();
    return false;
  }
  return true;
}

//! The device of the superblock behind mount `mount_id` (field 3 of /proc/self/mountinfo),
//! which is what /proc/locks prints; nullopt if that mount is not listed.
inline std::optional<dev_t> superblock_device(std::uint64_t mount_id) {
  proc_line_reader mounts("/proc/self/mountinfo");
  std::string_view text;
  while (mounts.next(text)) {
    unsigned long long id = 0;
    unsigned major_number = 0;
    unsigned minor_number = 0;
    char line[128];  // the three fields needed come first
    const auto size = std::min(text.size(), sizeof line - 1);
    std::memcpy(line, text.data(), size);
    line[size] = '\0';
    if (std::sscanf(line, "%llu %*u %u:%u", &id, &major_number, &minor_number) == 3 &&
        id == mount_id)
      return makedev(major_number, minor_number);
  }
  return std::nullopt;
}

//! The calling process's pid as the procfs mounted at /proc numbers it (the pids that
//! /proc/locks prints), or -1 if this process is not visible there.
inline pid_t pid_in_proc() noexcept {
  char target[32];
  const ssize_t n = ::readlink("/proc/self", target, sizeof target - 1);
  if (n <= 0) return -1;
  target[n] = '\0';
  char* end = nullptr;
  const long pid = std::strtol(target, &end, 10);
  return (*end == '\0' && pid > 0) ? static_cast<pid_t>(pid) : -1;
}

enum class open_file_answer { yes, no, unknown };

//! Whether process `pid` (as /proc numbers it) has a descriptor open on the file (dev, ino),
//! by stat() of each /proc/PID/fd entry; unknown when that directory cannot be read.
inline open_file_answer process_has_file_open(pid_t pid, dev_t dev, ino_t ino) {
  if (pid <= 0) return open_file_answer::unknown;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/fd", static_cast<int>(pid));
  const int fd = open_proc_file(path, O_DIRECTORY);
  if (fd < 0) return open_file_answer::unknown;
  DIR* dir = ::fdopendir(fd);
  if (dir == nullptr) {
    close_keep_errno(fd);
    return open_file_answer::unknown;
  }
  auto answer = open_file_answer::no;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    struct stat st {};
    if (::fstatat(fd, entry->d_name, &st, 0) == 0 && st.st_dev == dev && st.st_ino == ino) {
      answer = open_file_answer::yes;
      break;
    }
  }
  ::closedir(dir);
  return answer;
}

}  // namespace workerlock::detail
