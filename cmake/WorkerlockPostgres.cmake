# The optional PostgreSQL backend, include/workerlock/postgres.hpp (PostgresBackend).
# include(WorkerlockPostgres) after the workerlock target exists. Only when pkg-config finds
# libpq does it define
#   workerlock_postgres    INTERFACE target: workerlock::workerlock + libpq
#   workerlock::postgres   its ALIAS
# and set WORKERLOCK_HAVE_POSTGRES to ON (OFF otherwise; nothing else changes).
# Consumers: target_link_libraries(app PRIVATE workerlock::postgres), #include <workerlock/postgres.hpp>.
include_guard(GLOBAL)

set(WORKERLOCK_HAVE_POSTGRES OFF)
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  # GLOBAL: the imported target must be visible to projects that add_subdirectory() us.
  pkg_check_modules(WORKERLOCK_LIBPQ QUIET IMPORTED_TARGET GLOBAL libpq)
endif()

if(TARGET PkgConfig::WORKERLOCK_LIBPQ)
  add_library(workerlock_postgres INTERFACE)
  add_library(workerlock::postgres ALIAS workerlock_postgres)
  target_link_libraries(workerlock_postgres INTERFACE workerlock::workerlock PkgConfig::WORKERLOCK_LIBPQ)
  set(WORKERLOCK_HAVE_POSTGRES ON)
  message(STATUS "workerlock: PostgreSQL backend enabled (libpq ${WORKERLOCK_LIBPQ_VERSION})")
else()
  message(STATUS "workerlock: libpq not found through pkg-config; the PostgreSQL backend "
                 "(workerlock::postgres) is not built (apt-get install libpq-dev)")
endif()
