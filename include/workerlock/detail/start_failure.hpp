// workerlock/detail/start_failure.hpp: start_failure, what went wrong in Coordinator::start()
// or wait_for_startup(), kept until the throwing call or its error_code twin reports it.
#pragma once

#include <exception>
#include <new>
#include <string>
#include <system_error>

#include "../error.hpp"

namespace workerlock::detail {

//! What went wrong in Coordinator::start() or wait_for_startup(): the throwing call turns
//! it into a lock_error, the error_code twin keeps only `code`.
struct start_failure {
  std::error_code code;
  std::string operation;
  std::string explanation;
  std::exception_ptr thrown;  // a lock_error of the backend, passed on as it is

  //! Returns false, for `return f.set(...)` in a function that reports success.
  bool set(std::error_code ec, const char* op, std::string why = {}) {
    code = ec;
    operation = op;
    explanation = std::move(why);
    return false;
  }

  //! From inside a catch block: the exception being handled, turned into an error. A
  //! lock_error is kept as it is; a std::system_error keeps its code; anything else is EIO
  //! (ENOMEM for std::bad_alloc). Never throws, even when out of memory (then the
  //! explanation is lost).
  void set_from_current_exception(const char* op) noexcept {
    const char* why = "";
    try {
      throw;
    } catch (const lock_error& error) {
      code = error.code();
      thrown = std::current_exception();
      return;
    } catch (const std::system_error& error) {
      code = error.code();
      why = error.what();
    } catch (const std::bad_alloc&) {
      code = std::make_error_code(std::errc::not_enough_memory);
    } catch (const std::exception& error) {
      code = std::make_error_code(std::errc::io_error);
      why = error.what();
    } catch (...) {
      code = std::make_error_code(std::errc::io_error);
      why = "an exception of an unknown type";
    }
    try {
      operation = op;
      explanation = why;
    } catch (...) {
    }
  }
};

}  // namespace workerlock::detail
