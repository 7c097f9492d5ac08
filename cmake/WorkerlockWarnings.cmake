# Helpers for workerlock's *own* targets (tests, examples, benchmark); GCC or Clang.
# Never applied to the workerlock INTERFACE target, so consumers get no flags.
include_guard(GLOBAL)

# workerlock_target_defaults(<target>)
#   - warnings: -Wall -Wextra -Wpedantic (plus -Werror if WORKERLOCK_WERROR)
#   - sanitizers: WORKERLOCK_SANITIZE ("" | "address,undefined" | "thread")
#     -> -fsanitize=<list> -fno-omit-frame-pointer -fno-sanitize-recover=all
#        on both compile and link.
function(workerlock_target_defaults target)
  if(NOT TARGET ${target})
    message(FATAL_ERROR "workerlock_target_defaults: '${target}' is not a target")
  endif()

  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
  if(WORKERLOCK_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()

  if(WORKERLOCK_SANITIZE)
    if(WORKERLOCK_SANITIZE MATCHES "thread" AND WORKERLOCK_SANITIZE MATCHES "address")
      message(FATAL_ERROR "WORKERLOCK_SANITIZE: 'thread' cannot be combined with 'address'")
    endif()
    set(_wl_san_flags
      "-fsanitize=${WORKERLOCK_SANITIZE}"
      -fno-omit-frame-pointer
      -fno-sanitize-recover=all)
    target_compile_options(${target} PRIVATE ${_wl_san_flags})
    target_link_options(${target} PRIVATE ${_wl_san_flags})
  endif()
endfunction()
