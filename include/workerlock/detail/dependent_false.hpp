// workerlock/detail/dependent_false.hpp: dependent_false<T>, the condition of a static_assert
// that fires only where the template around it is used.
#pragma once

namespace workerlock::detail {

//! False, but only once T is known: a static_assert on it fires only where the template
//! around it is used (the rvalue overloads that refuse to read a temporary Election).
template <typename T>
inline constexpr bool dependent_false = false;

}  // namespace workerlock::detail
