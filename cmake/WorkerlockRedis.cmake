# The optional Redis backend, include/workerlock/redis.hpp (RedisBackend).
# include(WorkerlockRedis) after the workerlock target exists. Only when pkg-config finds
# hiredis (>= 0.14) and liburiparser (the URL) does it define
#   workerlock_redis       INTERFACE target: workerlock::workerlock + hiredis + liburiparser
#   workerlock::redis      its ALIAS
# and set WORKERLOCK_HAVE_REDIS to ON (OFF otherwise; nothing else changes).
# Consumers: target_link_libraries(app PRIVATE workerlock::redis), #include <workerlock/redis.hpp>.
include_guard(GLOBAL)

set(WORKERLOCK_HAVE_REDIS OFF)
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  # GLOBAL: the imported target must be visible to projects that add_subdirectory() us.
  pkg_check_modules(WORKERLOCK_HIREDIS QUIET IMPORTED_TARGET GLOBAL hiredis>=0.14)
  pkg_check_modules(WORKERLOCK_URIPARSER QUIET IMPORTED_TARGET GLOBAL liburiparser)
endif()

if(TARGET PkgConfig::WORKERLOCK_HIREDIS AND TARGET PkgConfig::WORKERLOCK_URIPARSER)
  add_library(workerlock_redis INTERFACE)
  add_library(workerlock::redis ALIAS workerlock_redis)
  target_link_libraries(workerlock_redis INTERFACE workerlock::workerlock PkgConfig::WORKERLOCK_HIREDIS
                        PkgConfig::WORKERLOCK_URIPARSER)
  set(WORKERLOCK_HAVE_REDIS ON)
  message(STATUS "workerlock: Redis backend enabled (hiredis ${WORKERLOCK_HIREDIS_VERSION})")
else()
  message(STATUS "workerlock: hiredis or liburiparser not found through pkg-config; the Redis "
                 "backend (workerlock::redis) is not built "
                 "(apt-get install libhiredis-dev liburiparser-dev)")
endif()
