// workerlock/detail/redis_url.hpp: reads a Redis URL (redis://, unix://, redis+unix://) with
// liburiparser, and says what is wrong with one without quoting its password.
//
// The grammar, IPv6 literals, percent-decoding and the query are liburiparser's (RFC 3986).
// What is written here is what a URL library cannot know:
//   - Redis's reading of the user info, as redis-cli's: it runs to the LAST '@' before any '?'
//     or '#', so a password may hold an unencoded '@' or '/'. Such characters are
//     percent-encoded before liburiparser sees the URL.
//   - The Redis meaning of the parts: a host of letters, digits, '.', '-', '_'; a port from 1
//     to 65535; the database as the path (/N) or as ?db=N, nothing else; a socket path.
//   - Messages that name what is wrong without quoting anything that may be a password (for
//     a URL that does not parse, see redis_url_text.hpp).
#pragma once

#include <sys/un.h>

#include <algorithm>
#include <cctype>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <uriparser/Uri.h>

#include "redis_url_text.hpp"

namespace workerlock::detail {

//! A parsed Redis URL.
struct redis_url {
  bool unix_socket = false;
  std::string host;  // without brackets
  int port = 6379;
  std::string socket_path;
  std::string username;
  std::string password;
  long db = 0;

  //! The URL for messages: the password is never shown.
  std::string redacted() const {
    const std::string user = username.empty() && password.empty()
                                 ? std::string()
                                 : fmt::format("{}{}@", username, password.empty() ? "" : ":***");
    if (unix_socket) {
      return db == 0 ? fmt::format("unix://{}{}", user, socket_path)
                     : fmt::format("unix://{}{}?db={}", user, socket_path, db);
    }
    const bool v6 = host.find(':') != std::string::npos;
    return fmt::format("redis://{}{}{}{}:{}/{}", user, v6 ? "[" : "", host, v6 ? "]" : "", port,
                       db);
  }
};

//! Why a host is not a Redis host name, or "". Quotes nothing: a host that is not a host may
//! be part of a password.
inline std::string check_host(std::string_view host, bool bracketed) {
  if (host.empty()) return "the host is empty";
  if (made_of(host, bracketed ? is_bracketed_host_char : is_host_char)) return {};
  return "bad character in the host name: expected letters, digits, '.', '-' and '_' (an IPv6 "
         "address in brackets)";
}

//! Why `text` is not a port, or "" with `port` set. Quotes only digits.
inline std::string check_port(std::string_view text, int& port) {
  if (text.empty()) return "the port after ':' is empty";
  long value = 0;
  if (parse_decimal(text, 65535, value) && value != 0) {
    port = static_cast<int>(value);
    return {};
  }
  return made_of(text, is_digit_char)
             ? fmt::format("bad port {}: expected a number from 1 to 65535", text)
             : std::string("bad port: the port after ':' must be a number from 1 to 65535");
}

//! Why `text` (`where`: "the database after '/'", "the value of ?db=") is not a database
//! number, or "" with `db` set. Quotes only digits.
inline std::string check_db(std::string_view text, const char* where, long& db) {
  if (parse_decimal(text, 1000000, db)) return {};
  return made_of(text, is_digit_char)
             ? fmt::format("bad database {}: expected a number up to 1000000", text)
             : fmt::format("bad database: {} must be a number", where);
}

//! The URL liburiparser reads: the user info (to the last '@' before '?' or '#') with every
//! character RFC 3986 does not allow there percent-encoded.
inline std::string encode_userinfo(std::string_view text, const redis_url_text& parts) {
  if (!parts.userinfo) return std::string(text);
  const auto begin = static_cast<std::size_t>(parts.userinfo->data() - text.data());
  std::string out(text.substr(0, begin));
  for (const char c : *parts.userinfo) {
    if (is_userinfo_char(static_cast<unsigned char>(c))) {
      out += c;
    } else {
      out += fmt::format("%{:02X}", static_cast<unsigned>(static_cast<unsigned char>(c)));
    }
  }
  out += text.substr(begin + parts.userinfo->size());
  return out;
}

//! liburiparser 0.9.7 does not read an IPv6 zone ("[fe80::1%25eth0]", RFC 6874; or
//! "[fe80::1%eth0]"): cuts it out of the bracketed host at `location_at` of `text`, for
//! parse_redis_url() to put back. Returns the zone ("eth0"; "" when not a plain name), or
//! nullopt when there is none.
inline std::optional<std::string> cut_ipv6_zone(std::string& text, std::size_t location_at) {
  if (text.compare(location_at, 1, "[") != 0) return std::nullopt;
  const auto close = text.find(']', location_at);
  const auto percent = text.find('%', location_at);
  if (close == std::string::npos || percent == std::string::npos || percent > close)
    return std::nullopt;
  std::string zone = text.substr(percent + 1, close - percent - 1);
  text.erase(percent, close - percent);
  if (zone.compare(0, 2, "25") == 0) zone.erase(0, 2);  // "%25" is RFC 6874's '%'
  const bool plain = made_of(zone, [](unsigned char c) { return c != '%' && is_host_char(c); });
  return plain ? zone : std::string();
}

//! Why liburiparser refused a URL (checked: it has "://", a known scheme and no '#'). Quotes
//! nothing that is not what it should be.
inline std::string explain_refused(const redis_url_text& parts) {
  if (parts.userinfo) {
    const auto text = *parts.userinfo;
    for (std::size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '%' &&
          (i + 2 >= text.size() || !std::isxdigit(text[i + 1]) || !std::isxdigit(text[i + 2])))
        return "bad percent-encoding: '%' must be followed by two hex digits";
    }
  }
  if (parts.unix_socket) return "bad character in the socket path: percent-encode it";
  const auto location = split_location(parts.location);
  if (location.bracketed && !location.bracket_closed) return "'[' of an IPv6 address without ']'";
  if (location.junk_after_bracket) return "expected ':port' after ']'";
  if (location.colons_unbracketed)
    return "an IPv6 address must be written in brackets, as in redis://[::1]:6379";
  std::string why = check_host(location.host, location.bracketed);
  int port = 0;
  if (why.empty() && location.port) why = check_port(*location.port, port);
  long db = 0;
  if (why.empty() && location.db && !location.db->empty())
    why = check_db(*location.db, "the database after '/'", db);
  if (why.empty() && location.bracketed) why = "bad IPv6 address in brackets";
  if (why.empty() && parts.query) why = "bad character in the query: percent-encode it";
  return why.empty() ? "not a URL (RFC 3986): percent-encode special characters" : why;
}

//! liburiparser's text range as a string_view ("" when absent).
inline std::string_view range_text(const UriTextRangeA& range) {
  if (range.first == nullptr) return {};
  return {range.first, static_cast<std::size_t>(range.afterLast - range.first)};
}

//! Percent-decoded by liburiparser.
inline std::string uri_decode(std::string_view text) {
  std::string out(text);
  if (out.empty()) return out;
  const char* end = uriUnescapeInPlaceExA(&out[0], URI_FALSE, URI_BR_DONT_TOUCH);
  out.resize(static_cast<std::size_t>(end - out.data()));
  return out;
}

//! Fills `url` from what liburiparser parsed; false with `why` when it is no Redis URL.
inline bool read_redis_uri(const UriUriA& uri, redis_url& url, std::string& why) {
  if (uri.userInfo.first != nullptr) {
    const auto userinfo = range_text(uri.userInfo);
    const auto colon = userinfo.find(':');
    if (colon == std::string_view::npos) {
      why =
          "a user name without a password; write redis://:PASSWORD@host for a password, or "
          "redis://USER:PASSWORD@host";
      return false;
    }
    url.username = uri_decode(userinfo.substr(0, colon));
    url.password = uri_decode(userinfo.substr(colon + 1));
    if (url.password.empty()) {
      why = "the password after ':' is empty";
      return false;
    }
  }
  // The path without its leading '/': liburiparser's segments point into the text.
  const std::string_view path =
      uri.pathHead == nullptr
          ? std::string_view()
          : std::string_view(
                uri.pathHead->text.first,
                static_cast<std::size_t>(uri.pathTail->text.afterLast - uri.pathHead->text.first));
  bool db_from_path = false;
  if (url.unix_socket) {
    if (!range_text(uri.hostText).empty() || uri.portText.first != nullptr ||
        uri.pathHead == nullptr) {
      why = "the socket path must be absolute, as in unix:///run/redis/redis.sock";
      return false;
    }
    url.socket_path = '/' + uri_decode(path);
    if (url.socket_path.find('\0') != std::string::npos) {
      why = "the socket path holds a NUL byte (%00)";
      return false;
    }
    if (url.socket_path.size() >= sizeof(sockaddr_un{}.sun_path)) {
      why = "the socket path is too long";
      return false;
    }
  } else {
    if (uri.hostData.ipFuture.first != nullptr) {
      why = "an IPvFuture address ([v...]) is not supported";
      return false;
    }
    url.host = std::string(range_text(uri.hostText));
    why = check_host(url.host, uri.hostData.ip6 != nullptr);
    if (why.empty() && uri.portText.first != nullptr)
      why = check_port(range_text(uri.portText), url.port);
    if (why.empty() && !path.empty()) {
      why = check_db(path, "the database after '/'", url.db);
      db_from_path = true;
    }
    if (!why.empty()) return false;
  }
  if (uri.query.first == nullptr) return true;
  const auto items = query_items(range_text(uri.query));
  if (!items) {
    why = "out of memory";
    return false;
  }
  if (items->empty()) return true;
  if (items->size() != 1 || items->front().first != "db" || !items->front().second) {
    why = "the only query parameter supported is ?db=N";
    return false;
  }
  if (db_from_path) {
    why = "the database is given twice (path and ?db=)";
    return false;
  }
  why = check_db(*items->front().second, "the value of ?db=", url.db);
  return why.empty();
}

//! Parses `text`; on failure returns false with `why` set. `why` quotes no part of `text` that
//! is not what it should be (a port or database that is not all digits, ...): such a part
//! may hold a password.
inline bool parse_redis_url(std::string_view text, redis_url& url, std::string& why) {
  url = redis_url{};
  if (text.empty()) {
    why = "the URL is empty";
    return false;
  }
  const auto parts = split_redis_url(text);
  if (!parts) {
    why = "no scheme: expected redis://[:password@]host[:port][/db] or unix:///path/to/socket";
    return false;
  }
  std::string scheme(parts->scheme);
  std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (scheme == "rediss") {
    why = "TLS (rediss://) is not supported by RedisBackend";
    return false;
  }
  if (scheme != "redis" && !parts->unix_socket) {
    // A scheme that is not scheme-shaped may be part of a password (a URL without "//").
    why = made_of(scheme, is_scheme_char)
              ? fmt::format("unknown scheme '{}': expected redis, unix or redis+unix", scheme)
              : std::string("unknown scheme before '://': expected redis, unix or redis+unix");
    return false;
  }
  if (parts->fragment) {
    why = "a URL fragment ('#') is not allowed; percent-encode '#' in a password as %23";
    return false;
  }
  url.unix_socket = parts->unix_socket;
  std::string encoded = encode_userinfo(text, *parts);
  const auto location_at =
      static_cast<std::size_t>(parts->location.data() - text.data()) + encoded.size() - text.size();
  const auto zone = url.unix_socket ? std::nullopt : cut_ipv6_zone(encoded, location_at);
  UriUriA uri;
  const char* error_at = nullptr;
  if (uriParseSingleUriExA(&uri, encoded.data(), encoded.data() + encoded.size(), &error_at) !=
      URI_SUCCESS) {
    why = explain_refused(*parts);
    return false;
  }
  const std::unique_ptr<UriUriA, void (*)(UriUriA*)> free_members(&uri, uriFreeUriMembersA);
  if (!read_redis_uri(uri, url, why)) return false;
  if (!zone) return true;
  if (uri.hostData.ip6 == nullptr || zone->empty()) {
    why = "bad IPv6 zone: expected [address%25name], as in redis://[fe80::1%25eth0]:6379";
    return false;
  }
  url.host += '%' + *zone;
  return true;
}

//! RedisOptions' URL (`text`), with its user name and password overridden when `username`
//! or `password` is not empty: fills `url`, and `redacted` for messages. Returns "" or what is
//! wrong (a configuration error).
inline std::string read_redis_url(const std::string& text, const std::string& username,
                                  const std::string& password, redis_url& url,
                                  std::string& redacted) {
  std::string why;
  if (text.empty()) {
    redacted = "(no URL)";
    return "no Redis URL: set RedisOptions::url or $WORKERLOCK_REDIS_URL";
  }
  if (!parse_redis_url(text, url, why)) {
    redacted = redact_raw_url(text);
    return "bad Redis URL: " + why;
  }
  if (!username.empty()) url.username = username;
  if (!password.empty()) url.password = password;
  redacted = url.redacted();
  if (!url.username.empty() && url.password.empty())
    return "RedisOptions::username is set without a password";
  return {};
}

}  // namespace workerlock::detail
