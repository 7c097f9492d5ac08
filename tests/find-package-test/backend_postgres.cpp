// Compiles and links against the installed workerlock::postgres.
#include <workerlock/coordinator.hpp>
#include <workerlock/postgres.hpp>

int main() {
  workerlock::PostgresOptions options;
  options.conninfo = "postgresql://127.0.0.1:1/none";
  workerlock::PostgresBackend backend(options);
  return backend.describe().empty() ? 1 : 0;
}
