// workerlock/detail/explain_errno.hpp: why opening or locking a lock file failed, in words
// an operator can act on (the errno alone rarely says what to do).
#pragma once

#include <sys/stat.h>

#include <cerrno>

namespace workerlock::detail {

inline const char* explain_open_errno(int e) noexcept {
  switch (e) {
    case ELOOP:
      return "the path is a symbolic link, and workerlock never follows one (O_NOFOLLOW)";
    case EISDIR:
      return "the path is a directory; a lock file must be a regular file";
    case ENOENT:
      return "the parent directory does not exist; workerlock does not create directories "
             "(use systemd's RuntimeDirectory= or install -d)";
    case ENOTDIR:
      return "a component of the path is not a directory";
    case EACCES:
    case EPERM:
      return "the worker's user needs read and write access to the file and write access to "
             "its directory";
    case EROFS:
      return "the file system is read-only";
    case ENAMETOOLONG:
      return "the path is too long";
    case EMFILE:
      return "this process has no file descriptor left (EMFILE)";
    case ENFILE:
      return "the system has no file descriptor left (ENFILE)";
    default:
      return "";
  }
}

inline const char* explain_lock_errno(int e) noexcept {
  switch (e) {
    case ENOLCK:
      return "no lock could be granted: the kernel's lock table is full, or the file system "
             "cannot lock (on NFS: is the lock manager, lockd/rpc.statd, running?)";
    case EINVAL:
    case EOPNOTSUPP:
      return "the file system does not support this lock mechanism";
    default:
      return "";
  }
}

//! What a file of type `mode` is, worded for an error message: what was found, and that a
//! lock file must be a regular file.
inline const char* explain_file_type(mode_t mode) noexcept {
  if (S_ISDIR(mode)) return "the path is a directory; a lock file must be a regular file";
  if (S_ISLNK(mode))
    return "the path is a symbolic link, and workerlock never follows one (O_NOFOLLOW); a lock "
           "file must be a regular file";
  if (S_ISSOCK(mode))
    return "the path is a socket, not a regular file; a lock file must be a regular file";
  if (S_ISFIFO(mode))
    return "the path is a FIFO (named pipe), not a regular file; a lock file must be a regular "
           "file";
  if (S_ISCHR(mode))
    return "the path is a character device, not a regular file; a lock file must be a regular "
           "file";
  if (S_ISBLK(mode))
    return "the path is a block device, not a regular file; a lock file must be a regular file";
  return "the path is not a regular file; a lock file must be a regular file";
}

//! Why open() of `path` failed with `e`, in words: the kind of file found there when that
//! is the reason (a socket or a terminal gives a bare ENXIO otherwise).
inline const char* explain_open_failure(const char* path, int e) noexcept {
  struct stat found {};
  if (e != ENOENT && ::lstat(path, &found) == 0 && !S_ISREG(found.st_mode))
    return explain_file_type(found.st_mode);
  return explain_open_errno(e);
}

}  // namespace workerlock::detail
