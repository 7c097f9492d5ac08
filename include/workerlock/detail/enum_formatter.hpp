// workerlock/detail/enum_formatter.hpp: fmt support for workerlock's enums, each formatted as
// the name its to_string() gives (Mechanism, Role).
#pragma once

#include <string_view>

#include <fmt/format.h>

namespace workerlock::detail {

template <typename Enum>
struct enum_formatter : fmt::formatter<std::string_view> {
  template <typename FormatContext>
  auto format(Enum value, FormatContext& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(to_string(value), ctx);
  }
};

}  // namespace workerlock::detail
