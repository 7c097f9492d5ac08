// Compiles and links against the installed workerlock::redis.
#include <workerlock/coordinator.hpp>
#include <workerlock/redis.hpp>

int main() {
  workerlock::RedisOptions options;
  options.url = "redis://127.0.0.1:1";
  workerlock::RedisBackend backend(options);
  return backend.describe().empty() ? 1 : 0;
}
