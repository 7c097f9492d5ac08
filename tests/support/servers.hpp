// tests/support/servers.hpp: what the throwaway test servers (redis_server.hpp,
// postgres_server.hpp) share: a free TCP port on 127.0.0.1, and starting a server on one, retried
// when it is taken.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <stdexcept>
#include <string>

namespace wltest {

//! A TCP port on 127.0.0.1 that nothing listens on: bound to port 0, read back, closed.
//! Throws std::runtime_error when no socket can be bound.
inline int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t size = sizeof address;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot find a free port");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

//! Up to `attempts` times: picks a free port into `port` and calls `start(error)`, which
//! returns whether the server came up (another process may take the port in between).
//! Returns true once it did; false with the last attempt's `error` when none did.
template <typename Start>
bool start_on_a_free_port(int attempts, int& port, std::string& error, Start&& start) {
  for (int attempt = 0; attempt < attempts; ++attempt) {
    port = free_loopback_port();
    if (start(error)) return true;
  }
  return false;
}

}  // namespace wltest
