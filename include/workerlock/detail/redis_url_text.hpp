// workerlock/detail/redis_url_text.hpp: a Redis URL as written: split into its parts without
// parsing them, for a URL that does not parse, and redacted for messages.
//
// No library parses a URL that is not one, yet its message must name it without its password:
// a part is shown only when it is what it should be (a host name, a port or database of
// digits, a plain path), since anything else may hold a password.
#pragma once

#include <algorithm>
#include <cctype>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <uriparser/Uri.h>

namespace workerlock::detail {

//! True when `text` is not empty and made of the characters `allowed` accepts.
template <typename Allowed>
bool made_of(std::string_view text, Allowed allowed) {
  return !text.empty() && std::all_of(text.begin(), text.end(), [&](char c) {
    return allowed(static_cast<unsigned char>(c));
  });
}
inline bool is_digit_char(unsigned char c) { return c >= '0' && c <= '9'; }
inline bool is_scheme_char(unsigned char c) {
  return std::isalnum(c) != 0 || c == '+' || c == '-' || c == '.';
}
inline bool is_host_char(unsigned char c) {
  return std::isalnum(c) != 0 || c == '.' || c == '-' || c == '_' || c == '%';
}
inline bool is_bracketed_host_char(unsigned char c) { return is_host_char(c) || c == ':'; }
inline bool is_path_char(unsigned char c) {
  return std::isalnum(c) != 0 || c == '/' || c == '.' || c == '-' || c == '_' || c == '~' ||
         c == '+';
}
//! What RFC 3986 allows unencoded in the user info (unreserved, sub-delims, ':', and '%').
inline bool is_userinfo_char(unsigned char c) {
  return std::isalnum(c) != 0 ||
         std::string_view("-._~!$&'()*+,;=:%").find(static_cast<char>(c)) != std::string_view::npos;
}

inline bool parse_decimal(std::string_view text, long max, long& value) {
  if (text.empty() || text.size() > 10) return false;
  long v = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  if (v > max) return false;
  value = v;
  return true;
}

//! A URL as written, split the way Redis reads it (RFC 3986 appendix B, but the user info runs
//! to the last '@' before any '?' or '#'). For URLs liburiparser refuses, and for redaction.
struct redis_url_text {
  std::string_view scheme;  // as written
  bool unix_socket = false;
  std::optional<std::string_view> userinfo;
  std::string_view location;  // host[:port][/db], or the socket path
  std::optional<std::string_view> query;
  std::optional<std::string_view> fragment;
  bool at_after_query = false;  // an '@' after '?' or '#': a password with one of those?
};

//! Splits `text`; nullopt when it has no "://".
inline std::optional<redis_url_text> split_redis_url(std::string_view text) {
  const auto scheme_end = text.find("://");
  if (scheme_end == std::string_view::npos) return std::nullopt;
  redis_url_text parts;
  parts.scheme = text.substr(0, scheme_end);
  std::string lower(parts.scheme);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  parts.unix_socket = lower == "unix" || lower == "redis+unix";
  std::string_view rest = text.substr(scheme_end + 3);
  const auto query_start = rest.find_first_of("?#");
  const auto head = rest.substr(0, query_start);
  parts.at_after_query = query_start != std::string_view::npos &&
                         rest.find('@', query_start) != std::string_view::npos;
  if (const auto at = head.rfind('@'); at != std::string_view::npos) {
    parts.userinfo = head.substr(0, at);
    parts.location = head.substr(at + 1);
  } else {
    parts.location = head;
  }
  if (query_start == std::string_view::npos) return parts;
  rest = rest.substr(query_start);
  const auto hash = rest.find('#');
  if (rest.front() == '?')
    parts.query = rest.substr(1, hash == std::string_view::npos ? hash : hash - 1);
  if (hash != std::string_view::npos) parts.fragment = rest.substr(hash + 1);
  return parts;
}

//! host[:port][/db] as written.
struct redis_location_text {
  std::string_view host;  // without brackets
  bool bracketed = false;
  bool bracket_closed = false;
  bool junk_after_bracket = false;  // "[::1]x"
  std::optional<std::string_view> port;
  std::optional<std::string_view> db;  // after the first '/'
  bool colons_unbracketed = false;     // "::1:6379": an IPv6 address without brackets
};

inline redis_location_text split_location(std::string_view location) {
  redis_location_text parts;
  const auto slash = location.find('/');
  const auto authority = location.substr(0, slash);
  if (slash != std::string_view::npos) parts.db = location.substr(slash + 1);
  std::string_view after_host;
  if (!authority.empty() && authority.front() == '[') {
    parts.bracketed = true;
    const auto close = authority.find(']');
    parts.bracket_closed = close != std::string_view::npos;
    if (!parts.bracket_closed) return parts;
    parts.host = authority.substr(1, close - 1);
    after_host = authority.substr(close + 1);
    parts.junk_after_bracket = !after_host.empty() && after_host.front() != ':';
    if (parts.junk_after_bracket) return parts;
  } else {
    const auto colon = authority.find(':');
    parts.host = authority.substr(0, colon);
    if (colon != std::string_view::npos) after_host = authority.substr(colon);
    parts.colons_unbracketed = after_host.find(':', 1) != std::string_view::npos;
  }
  if (!after_host.empty()) parts.port = after_host.substr(1);
  return parts;
}

//! The items of a query, percent-decoded by liburiparser: name and value (nullopt: no '=').
//! Empty items ("a&&b") are skipped. nullopt when out of memory.
inline std::optional<std::vector<std::pair<std::string, std::optional<std::string>>>> query_items(
    std::string_view query) {
  UriQueryListA* list = nullptr;
  int count = 0;
  if (uriDissectQueryMallocExA(&list, &count, query.data(), query.data() + query.size(), URI_FALSE,
                               URI_BR_DONT_TOUCH) != URI_SUCCESS)
    return std::nullopt;
  std::vector<std::pair<std::string, std::optional<std::string>>> items;
  for (auto* item = list; item != nullptr; item = item->next) {
    items.emplace_back(
        item->key, item->value == nullptr ? std::nullopt : std::optional<std::string>(item->value));
  }
  uriFreeQueryListA(list);
  return items;
}

//! A query string for messages: `db=N` (N digits) as is, every other value (and anything not
//! `name=value` with a plain name) masked: a value not understood is never printed.
inline std::string redact_query(std::string_view query) {
  const auto items = query_items(query);
  if (!items) return "***";
  std::string out;
  for (const auto& [name, value] : *items) {
    if (!out.empty()) out += '&';
    if (!value || !made_of(name, [](unsigned char c) {
          return std::isalnum(c) != 0 || c == '_' || c == '-';
        })) {
      out += "***";
    } else if (name == "db" && made_of(*value, is_digit_char)) {
      out += "db=" + *value;
    } else {
      out += name + "=***";
    }
  }
  return out;
}

//! host[:port][/db] or a socket path of a URL that may not parse, safe to print.
inline std::string redact_raw_location(std::string_view location, bool unix_socket) {
  if (unix_socket)
    return location.empty() || made_of(location, is_path_char) ? std::string(location) : "***";
  const auto shown = [](std::string_view part, bool ok) {
    return part.empty() || ok ? std::string(part) : std::string("***");
  };
  const auto parts = split_location(location);
  if (parts.bracketed && !parts.bracket_closed) return "***";
  std::string out = shown(
      parts.host, made_of(parts.host, parts.bracketed ? is_bracketed_host_char : is_host_char));
  if (parts.bracketed) out = '[' + out + ']';
  if (parts.junk_after_bracket) return out + "***";
  if (parts.port) out += ':' + shown(*parts.port, made_of(*parts.port, is_digit_char));
  if (parts.db) out += '/' + shown(*parts.db, made_of(*parts.db, is_digit_char));
  return out;
}

//! A URL that may not parse, safe to print: the user info masked except a user name, every
//! query value except db=N masked, a fragment masked, and the scheme, host, port, database or
//! socket path masked when not what they should be. When an '@' follows a '?' or '#' (a
//! password with those characters, or an '@' in a query value), everything after "://" is
//! masked; a text without "://" is masked whole.
inline std::string redact_raw_url(std::string_view text) {
  const auto parts = split_redis_url(text);
  if (!parts) return "***";
  std::string out = made_of(parts->scheme, is_scheme_char) ? std::string(parts->scheme) : "***";
  out += "://";
  if (parts->at_after_query) return out + "***";
  if (parts->userinfo) {
    const auto colon = parts->userinfo->find(':');
    out += colon == std::string_view::npos
               ? std::string("***")
               : std::string(parts->userinfo->substr(0, colon)) + ":***";
    out += '@';
  }
  out += redact_raw_location(parts->location, parts->unix_socket);
  if (parts->query) out += '?' + redact_query(*parts->query);
  if (parts->fragment) out += "#***";
  return out;
}

}  // namespace workerlock::detail
