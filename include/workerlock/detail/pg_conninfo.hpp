// workerlock/detail/pg_conninfo.hpp: a libpq connection string as libpq parses it, and the
// same for messages: secrets masked, and libpq's message text scrubbed of them.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <libpq-fe.h>

namespace workerlock::detail {

// What is secret is decided on libpq's own keyword/value output (PQconninfoParse), never by
// reading the string ourselves:
//  * every option libpq displays as a password (dispchar "*": password, sslpassword, and
//    whatever a later libpq adds);
//  * what a URL password with an unencoded '@' or '/' leaves in other options: libpq stops
//    the password at the first '@', so "postgresql://u:sec@ret@h" gives host "ret@h", and
//    "postgresql://u:a/b@h/db" gives host "u", port "a" and dbname "b@h/db". A host, port or
//    database name is shown only when it is what it should be: a port of digits, a host or
//    database without '@' (else the part before the last '@' is masked);
//  * a dbname that is itself a connection string is masked the same way, recursively.
// A connection string that libpq cannot parse is never shown, and every quoted part of
// libpq's parse error is masked: it may quote the whole URL, or a piece of a password written
// without quotes ("password=my secret" reports `missing "=" after "secret"`).

//! A connection string, parsed by PQconninfoParse.
struct pg_conninfo {
  //! The options given (keyword, value), in libpq's order: what to connect with.
  std::vector<std::pair<std::string, std::string>> given;
  //! The options for messages, `keyword=value ...` with every secret ***.
  std::string redacted;
  //! The secret values (and pieces of them), to scrub from libpq's and the server's text.
  std::vector<std::string> secrets;
  //! Why it does not parse (libpq's text, quoted parts masked); empty when it parses.
  std::string error;

  bool parsed() const noexcept { return error.empty(); }
};

//! How a connection string that does not parse shows in messages.
inline constexpr const char* pg_unparsed_conninfo = "<a connection string that does not parse>";

//! What libpq takes for a connection string rather than a database name in `dbname`.
inline bool pg_looks_like_conninfo(std::string_view text) noexcept {
  const auto starts_with = [&](std::string_view prefix) {
    return text.size() >= prefix.size() &&
           std::equal(prefix.begin(), prefix.end(), text.begin(), [](char p, char c) {
             return p == std::tolower(static_cast<unsigned char>(c));
           });
  };
  return text.find('=') != std::string_view::npos || starts_with("postgresql://") ||
         starts_with("postgres://");
}

//! `value` as a conninfo value: quoted with '' (and \ escapes) when it must be.
inline std::string pg_quote_value(std::string_view value) {
  const bool plain = !value.empty() && std::none_of(value.begin(), value.end(), [](char c) {
    return std::isspace(static_cast<unsigned char>(c)) || c == '\'' || c == '\\';
  });
  if (plain) return std::string(value);
  std::string out = "'";
  for (const char c : value) {
    if (c == '\'' || c == '\\') out += '\\';
    out += c;
  }
  return out + "'";
}

//! Each comma-separated entry of a host, port or dbname value, shown only when it is what it
//! should be; otherwise masked (the part before the last '@') and added to `secrets`.
inline std::string pg_mask_entries(std::string_view keyword, std::string_view value,
                                   std::vector<std::string>& secrets) {
  const bool is_port = keyword == "port";
  const bool is_list = is_port || keyword == "host" || keyword == "hostaddr";
  std::string out;
  for (std::size_t from = 0;;) {
    const auto comma = is_list ? value.find(',', from) : std::string_view::npos;
    const auto entry = value.substr(from, comma == std::string_view::npos ? comma : comma - from);
    if (is_port && !std::all_of(entry.begin(), entry.end(), [](char c) {
          return std::isdigit(static_cast<unsigned char>(c));
        })) {
      out += "***";
      secrets.emplace_back(entry);
    } else if (const auto at = entry.rfind('@'); at != std::string_view::npos && at > 0) {
      out += "***";
      out += entry.substr(at);
      secrets.emplace_back(entry.substr(0, at));
    } else {
      out += entry;
    }
    if (comma == std::string_view::npos) break;
    out += ',';
    from = comma + 1;
  }
  return out;
}

//! Masks every "quoted" part of a libpq parse error but the punctuation its format strings
//! quote themselves (`missing "=" after`, `looking for matching "]"`, `expected ":" or "/"`).
inline std::string pg_mask_quoted(std::string_view message) {
  std::string out;
  for (std::size_t i = 0; i < message.size(); ++i) {
    out += message[i];
    if (message[i] != '"') continue;
    const auto close = message.find('"', i + 1);
    if (close == std::string_view::npos) break;
    const auto quoted = message.substr(i + 1, close - i - 1);
    const bool syntax = quoted == "=" || quoted == "]" || quoted == ":" || quoted == "/";
    out += syntax ? quoted : "***";
    out += '"';
    i = close;
  }
  while (!out.empty() && std::isspace(static_cast<unsigned char>(out.back()))) out.pop_back();
  return out;
}

//! Parses `conninfo` with PQconninfoParse (no environment, no service file: only what it says).
inline pg_conninfo pg_parse_conninfo(const std::string& conninfo) {
  pg_conninfo result;
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  if (options == nullptr) {
    result.redacted = pg_unparsed_conninfo;
    result.error = error != nullptr ? pg_mask_quoted(error) : "out of memory";
    if (error != nullptr) PQfreemem(error);
    return result;
  }
  for (const PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val == nullptr) continue;
    const std::string_view keyword = o->keyword;
    const std::string_view value = o->val;
    result.given.emplace_back(keyword, value);
    std::string shown;
    if (o->dispchar != nullptr && std::strcmp(o->dispchar, "*") == 0) {
      shown = "***";
      result.secrets.emplace_back(value);
    } else if (keyword == "dbname" && pg_looks_like_conninfo(value)) {
      auto inner = pg_parse_conninfo(std::string(value));
      if (inner.parsed()) {
        shown = pg_quote_value(inner.redacted);
        result.secrets.insert(result.secrets.end(), inner.secrets.begin(), inner.secrets.end());
      } else {
        shown = "***";
        result.secrets.emplace_back(value);
      }
    } else if (keyword == "host" || keyword == "hostaddr" || keyword == "port" ||
               keyword == "dbname") {
      shown = pg_quote_value(pg_mask_entries(keyword, value, result.secrets));
    } else {
      shown = pg_quote_value(value);
    }
    if (!result.redacted.empty()) result.redacted += ' ';
    result.redacted += o->keyword;
    result.redacted += '=';
    result.redacted += shown;
  }
  PQconninfoFree(options);
  // A string that gives no option at all holds no value either: show it as written.
  if (result.given.empty()) result.redacted = conninfo;
  result.secrets.erase(std::remove_if(result.secrets.begin(), result.secrets.end(),
                                      [](const std::string& s) { return s.empty(); }),
                       result.secrets.end());
  // Longest first, so that a secret containing another is replaced whole.
  std::sort(result.secrets.begin(), result.secrets.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  return result;
}

//! `text` from libpq or the server, with every secret replaced by ***, on one line: libpq's
//! continuation lines (indented) that go on with a sentence join with a space, other lines
//! with "; ".
inline std::string pg_scrub(std::string text, const std::vector<std::string>& secrets) {
  for (const auto& secret : secrets) {
    for (auto at = text.find(secret); at != std::string::npos; at = text.find(secret, at + 3))
      text.replace(at, secret.size(), "***");
  }
  std::string out;
  std::size_t i = 0;
  while (i < text.size()) {
    const auto end = std::min(text.find('\n', i), text.size());
    const bool indented = i < end && (text[i] == '\t' || text[i] == ' ');
    auto line = std::string_view(text).substr(i, end - i);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.front())))
      line.remove_prefix(1);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back())))
      line.remove_suffix(1);
    if (!line.empty()) {
      if (!out.empty()) {
        out += indented && std::islower(static_cast<unsigned char>(line.front())) ? " " : "; ";
      }
      for (const char c : line) {
        const char d = c == '\t' ? ' ' : c;
        if (d == ' ' && !out.empty() && out.back() == ' ') continue;
        out += d;
      }
    }
    i = end + 1;
  }
  return out;
}

}  // namespace workerlock::detail
