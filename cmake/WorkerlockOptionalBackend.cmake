# workerlock_optional_backend(): defines an optional network backend target when pkg-config
# finds every client library it needs. include(WorkerlockOptionalBackend) after the workerlock
# target exists, then for example
#   workerlock_optional_backend(NAME redis TITLE Redis HEADER redis.hpp
#                               PACKAGES "hiredis>=0.14" liburiparser
#                               APT libhiredis-dev liburiparser-dev)
# When all PACKAGES (pkg-config modules, each with an optional version condition) are found,
# it defines
#   workerlock_<NAME>      INTERFACE target: workerlock::workerlock + those libraries
#   workerlock::<NAME>     its ALIAS
# and sets WORKERLOCK_HAVE_<NAME> (upper case) to ON; otherwise to OFF, with a status line
# naming the missing modules and the Debian packages (APT) that provide them, and nothing
# else changes. Consumers: target_link_libraries(app PRIVATE workerlock::<NAME>) and
# #include <workerlock/<HEADER>>.
include_guard(GLOBAL)

function(workerlock_optional_backend)
  cmake_parse_arguments(PARSE_ARGV 0 _wl "" "NAME;TITLE;HEADER" "PACKAGES;APT")
  string(TOUPPER "${_wl_NAME}" _wl_upper)
  if(TARGET workerlock::${_wl_NAME}) # a second find_package(workerlock) in the same project
    set(WORKERLOCK_HAVE_${_wl_upper} ON PARENT_SCOPE)
    return()
  endif()
  set(WORKERLOCK_HAVE_${_wl_upper} OFF PARENT_SCOPE)

  find_package(PkgConfig QUIET)
  set(_wl_found "")
  set(_wl_missing "")
  foreach(_wl_module IN LISTS _wl_PACKAGES)
    string(REGEX REPLACE "[<>= ].*$" "" _wl_bare "${_wl_module}")
    string(MAKE_C_IDENTIFIER "WORKERLOCK_PC_${_wl_bare}" _wl_prefix)
    string(TOUPPER "${_wl_prefix}" _wl_prefix)
    if(PKG_CONFIG_FOUND AND NOT TARGET PkgConfig::${_wl_prefix})
      # GLOBAL: the imported target must be visible to projects that add_subdirectory() us.
      pkg_check_modules(${_wl_prefix} QUIET IMPORTED_TARGET GLOBAL "${_wl_module}")
    endif()
    if(TARGET PkgConfig::${_wl_prefix})
      list(APPEND _wl_found PkgConfig::${_wl_prefix})
    else()
      list(APPEND _wl_missing "${_wl_module}")
    endif()
  endforeach()

  if(_wl_missing)
    string(REPLACE ";" " " _wl_apt "${_wl_APT}")
    string(REPLACE ";" ", " _wl_missing "${_wl_missing}")
    message(STATUS "workerlock: ${_wl_missing} not found through pkg-config; the ${_wl_TITLE} "
                   "backend (workerlock::${_wl_NAME}) is not built (apt-get install ${_wl_apt})")
    return()
  endif()

  add_library(workerlock_${_wl_NAME} INTERFACE)
  add_library(workerlock::${_wl_NAME} ALIAS workerlock_${_wl_NAME})
  target_link_libraries(workerlock_${_wl_NAME} INTERFACE workerlock::workerlock ${_wl_found})
  set(WORKERLOCK_HAVE_${_wl_upper} ON PARENT_SCOPE)
  string(REPLACE ";" ", " _wl_packages "${_wl_PACKAGES}")
  message(STATUS "workerlock: ${_wl_TITLE} backend enabled (${_wl_packages}; "
                 "#include <workerlock/${_wl_HEADER}>)")
endfunction()

# The backends this version of workerlock has.
function(workerlock_optional_backends)
  workerlock_optional_backend(NAME redis TITLE Redis HEADER redis.hpp
    PACKAGES "hiredis>=0.14" liburiparser
    APT libhiredis-dev liburiparser-dev)
  set(WORKERLOCK_HAVE_REDIS ${WORKERLOCK_HAVE_REDIS} PARENT_SCOPE)
  workerlock_optional_backend(NAME postgres TITLE PostgreSQL HEADER postgres.hpp
    PACKAGES libpq
    APT libpq-dev)
  set(WORKERLOCK_HAVE_POSTGRES ${WORKERLOCK_HAVE_POSTGRES} PARENT_SCOPE)
endfunction()
