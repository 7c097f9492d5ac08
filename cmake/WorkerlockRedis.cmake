# The optional Redis backend, include/workerlock/redis.hpp (RedisBackend).
# include(WorkerlockRedis) after the workerlock target exists. Only when pkg-config finds
# hiredis (>= 0.14) does it define
#   workerlock_redis       INTERFACE target: workerlock::workerlock + hiredis
#   workerlock::redis      its ALIAS
# and set WORKERLOCK_HAVE_REDIS to ON (OFF otherwise; nothing else changes).
# Consumers: target_link_libraries(app PRIVATE workerlock::redis), #include <workerlock/redis.hpp>.
include_guard(GLOBAL)

set(WORKERLOCK_HAVE_REDIS OFF)
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  # GLOBAL: the imported target must be visible to projects that add_subdirectory() us.
  pkg_check_modules(WORKERLOCK_HIREDIS QUIET IMPORTED_TARGET GLOBAL hiredis>=0.14)
endif()

if(TARGET PkgConfig::WORKERLOCK_HIREDIS)
  add_library(workerlock_redis INTERFACE)
  add_library(workerlock::redis ALIAS workerlock_redis)
  target_link_libraries(workerlock_redis INTERFACE workerlock::workerlock PkgConfig::WORKERLOCK_HIREDIS)
  set(WORKERLOCK_HAVE_REDIS ON)
  message(STATUS "workerlock: Redis backend enabled (hiredis ${WORKERLOCK_HIREDIS_VERSION})")
else()
  message(STATUS "workerlock: hiredis not found through pkg-config; the Redis backend "
                 "(workerlock::redis) is not built (apt-get install libhiredis-dev)")
endif()
