# ctest driver for the find_package consumer test (run with cmake -P):
#   1. cmake --install the workerlock build tree into a fresh temp prefix
#   2. configure + build this consumer with CMAKE_PREFIX_PATH=<prefix>
#   3. run the consumer executable
# Inputs (-D): WORKERLOCK_BINARY_DIR CONSUMER_SOURCE_DIR WORK_DIR CONFIG
#              GENERATOR MAKE_PROGRAM CXX_COMPILER EXTRA_PREFIX_PATH
cmake_minimum_required(VERSION 3.16)

foreach(var WORKERLOCK_BINARY_DIR CONSUMER_SOURCE_DIR WORK_DIR GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run.cmake: -D${var}=... is required")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run)
  string(REPLACE ";" " " pretty "${ARGN}")
  message(STATUS "[find-package-test] ${pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc WORKING_DIRECTORY "${WORK_DIR}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[find-package-test] command failed (${rc}): ${pretty}")
  endif()
endfunction()

set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

# 1. install
run("${CMAKE_COMMAND}" --install "${WORKERLOCK_BINARY_DIR}" --prefix "${prefix}" ${config_args})

# 2. configure + build the consumer against the installed package only
set(prefix_path "${prefix}")
if(EXTRA_PREFIX_PATH)
  list(APPEND prefix_path ${EXTRA_PREFIX_PATH})
endif()
set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${build}" -G "${GENERATOR}"
  "-DCMAKE_PREFIX_PATH=${prefix_path}"
  "-DWORKERLOCK_EXPECTED_PREFIX=${prefix}"
  # make sure the package comes from the prefix, not the user package registry
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(CONFIG)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
run("${CMAKE_COMMAND}" ${configure_args})
run("${CMAKE_COMMAND}" --build "${build}" ${config_args})

# 3. run it (ctest of the consumer knows the exe location for any generator)
set(WORK_DIR "${build}")
set(ctest_config_args "")
if(CONFIG)
  set(ctest_config_args -C "${CONFIG}")
endif()
run("${CMAKE_CTEST_COMMAND}" --output-on-failure ${ctest_config_args})
