# tests/compile_fail/check.cmake: compiles one snippet of tests/compile_fail/ with the build's
# compiler in each standard of STANDARDS, and passes only when the snippet behaves as it says.
#
#   cmake -DCOMPILER=<c++> -DSOURCE=<snippet.cpp> -DINCLUDES=<dir|dir...> -DSTANDARDS=<17|20>
#         -P check.cmake
#
# A snippet whose header has "// EXPECT: <text>" (no ";") must fail to compile with <text> in the
# compiler's output (so a snippet that fails for another reason, a typo, does not count).
# A snippet with "// EXPECT-SUCCESS" must compile without a warning.
foreach(_var COMPILER SOURCE INCLUDES STANDARDS)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "check.cmake: -D${_var}=... is required")
  endif()
endforeach()

file(STRINGS "${SOURCE}" _expect_lines REGEX "^// EXPECT")
if(_expect_lines MATCHES "^// EXPECT-SUCCESS")
  set(_expect_success TRUE)
elseif(_expect_lines MATCHES "^// EXPECT: (.+)$")
  set(_expect_success FALSE)
  set(_expected_text "${CMAKE_MATCH_1}")
else()
  message(FATAL_ERROR "${SOURCE}: no '// EXPECT: <text>' or '// EXPECT-SUCCESS' line")
endif()

string(REPLACE "|" ";" _includes "${INCLUDES}")
string(REPLACE "|" ";" _standards "${STANDARDS}")
set(_include_flags "")
foreach(_dir IN LISTS _includes)
  if(_dir)
    list(APPEND _include_flags "-I${_dir}")
  endif()
endforeach()

foreach(_std IN LISTS _standards)
  execute_process(
    COMMAND "${COMPILER}" "-std=c++${_std}" -Wall -Wextra -Wpedantic -Werror -fsyntax-only
            ${_include_flags} "${SOURCE}"
    RESULT_VARIABLE _result
    OUTPUT_VARIABLE _output
    ERROR_VARIABLE _output)
  if(_expect_success)
    if(NOT _result EQUAL 0)
      message(FATAL_ERROR "${SOURCE} must compile (C++${_std}) but does not:\n${_output}")
    endif()
    message(STATUS "C++${_std}: compiles, as it must")
  else()
    if(_result EQUAL 0)
      message(FATAL_ERROR "${SOURCE} must NOT compile (C++${_std}), but it does")
    endif()
    string(FIND "${_output}" "${_expected_text}" _at)
    if(_at EQUAL -1)
      message(FATAL_ERROR "${SOURCE} fails to compile (C++${_std}), but without the expected "
                          "text '${_expected_text}', so for some other reason:\n${_output}")
    endif()
    message(STATUS "C++${_std}: refused with '${_expected_text}', as it must be")
  endif()
endforeach()
