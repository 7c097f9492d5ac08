// workerlock/redis.hpp: RedisBackend, a Coordinator backend that holds the primary role
// through a lease on one Redis server, with fencing tokens and self-demotion.
//
// Needs hiredis (>= 0.14, for its RESP reply parser); link with -lhiredis, or in CMake with
// the workerlock::redis target. This is the only workerlock header that includes hiredis, and
// workerlock.hpp does not include it.
//
// THE LEASE
//   key           = RedisOptions::key, holding the token of the current holder, PX ttl.
//   <key>:fence   = the last fencing token handed out (no expiry).
//   token         = 128 random bits (getrandom) : boot id : pid namespace : pid : host name,
//                   new for every hold, so a stale renewal or release of an earlier hold can
//                   never touch a later one.
//   acquire       = ONE round trip: EVALSHA of a script doing SET key token NX PX ttl and, on
//                   success, INCR <key>:fence, returning the fencing token; on failure it
//                   returns the remaining PTTL and the holder's token instead, so a standby
//                   sleeps exactly until the lease can end. EVAL when Redis answers NOSCRIPT.
//   renew         = compare-then-PEXPIRE script, release = compare-then-DEL script.
//
// SELF-DEMOTION: THE ARITHMETIC
//   T = ttl, D = drift_margin, V = verify_interval, C = command_timeout.
//   s = the monotonic time just BEFORE the last successful acquire or renew was sent. Redis ran
//   that command no earlier than s, so its key lives until at least s + T by Redis's clock; we
//   trust the lease until  valid_until = s + T - D, where D absorbs the rate difference of the
//   two clocks and the scheduling delay of on_demoted (default D = T/10 + 2 ms).
//   A renewal never outlives the lease: every command of verify_held() (reconnecting
//   included) has the deadline min(now + C, valid_until), an absolute one (see I/O), so
//   verify_held() returns false (or throws) at valid_until at the latest, even when Redis is
//   unreachable, stalled (CLIENT PAUSE, DEBUG SLEEP), or the network drops packets. The
//   Coordinator then runs on_demoted, and Redis keeps the key for at least D more, so
//   nobody else can be promoted before on_demoted returns, provided this process is not
//   paused for longer than D (see FENCING) and on_demoted takes less than D.
//   verify_interval() shrinks as the lease runs out, to at most valid_until - now - C, so a
//   long on_promoted callback does not push the next renewal past the end of the lease.
//   Checked by prepare(): V + C <= T - D, so a renewal started on schedule always ends
//   (success or timeout) before the lease does. Defaults: V = T/3, C = min(T/5, 2 s),
//   poll_interval = min(T/10, 1 s); with T = 10 s: V = 3.33 s, C = 2 s, D = 1.002 s, so
//   V + C = 5.33 s <= T - D = 8.998 s: a holder whose first renewal fails is demoted by
//   s + 5.33 s, 4.6 s before Redis can hand the key to anybody (s + 10 s); with T = 1 s
//   (V = 333 ms, C = 200 ms, D = 102 ms): by s + 533 ms, 467 ms before.
//   ALL PARTICIPANTS OF ONE KEY MUST USE THE SAME TTL.
//   valid_until() publishes s + T - D (an atomic, readable from any thread and from signal
//   handlers; time_point::min() while nothing is held), and Coordinator::role() reads
//   secondary from that instant on: a holder paused past its lease (SIGSTOP, a VM freeze)
//   answers secondary the moment it runs again, before its coordinator thread has renewed
//   (and failed) or run on_demoted.
//
// ERRORS
//   lock_error, with an empty path() and target() = "<URL, password ***> key=<key>" (also
//   network_target()). Codes: errc::bad_configuration (== std::errc::invalid_argument) for a
//   bad URL, bad timings or a database the server refuses; errc::lease_lost
//   (== std::errc::timed_out) when a renewal could not be done before valid_until();
//   ETIMEDOUT when a renewal got no answer within command_timeout while the lease was still
//   valid; else the errno of the failure (ECONNREFUSED, EACCES for authentication, ...).
//   Messages never show a password or any query value but db=N, even of a URL that does not
//   parse: of such a URL they show a part only when it is what it should be (a host name, a
//   port or database of digits, a plain socket path), since anything else may hold a password.
//
// FENCING
//   A process paused longer than the lease (GC, SIGSTOP, a VM migration, swapping) wakes up
//   believing it is primary: nothing on this host can prevent that, since its next check
//   runs only when it runs. fencing_token() grows with every new hold; pass it with every
//   write to downstream storage, and have the storage reject a token lower than the highest
//   it has seen. That is the only protection against a paused holder.
//   Tokens stay increasing when Redis loses its data (a restart without persistence,
//   FLUSHALL): a missing <key>:fence is re-created from Redis's TIME in microseconds, which is
//   larger than every earlier token as long as Redis's wall clock does not step backwards.
//
// QUARANTINE AFTER DATA LOSS (RedisOptions::quarantine_after_data_loss, default true)
//   When <key>:fence is missing, Redis has lost its data (or the key is new): a holder from
//   before may still trust its lease for up to T. The acquire script then keeps everybody
//   out for one ttl (it sets key = "workerlock-quarantine" PX ttl), which is Redlock's
//   "delayed restart" done by the lock itself. So a brand-new key, or the first election
//   after Redis restarted without persistence, promotes nobody for one ttl.
//
// FAST FAILOVER ON THE SAME HOST (RedisOptions::fast_local_failover, default true)
//   A standby reads the holder's token with every failed attempt. When the token names a
//   process on this kernel (same /proc/sys/kernel/random/boot_id) in this pid namespace
//   (same /proc/self/ns/pid inode) and that process no longer exists (kill(pid, 0) fails with
//   ESRCH, or /proc/<pid>/stat says zombie), the holder is provably dead: a dead process
//   cannot act as primary. The standby then deletes the key, if it still holds exactly that
//   token, and takes it in the same script. It waits on a pidfd of the holder, so this takes
//   milliseconds instead of a ttl. A reused pid only delays failover to the ttl.
//   Not covered: standbys on other hosts (they wait for the ttl). Assumed: a process never
//   moves to another kernel (a CRIU checkpoint restored on another machine would keep its
//   old token while its old host sees the pid gone). Set fast_local_failover = false there.
//   Why nothing faster for remote holders: "the holder's connection closed" does not mean
//   "the holder stopped", since a live holder may merely be reconnecting, and it only learns
//   of the loss at its next renewal; keyspace notifications only report the expiry the ttl
//   already implies.
//
// LIMITS
//   - One Redis server. With replicas and failover (Sentinel, Cluster), a SET acknowledged by
//     the old master may be missing on the promoted replica: two holders (the quarantine
//     does not help, since <key>:fence usually made it across). WAIT does not fix that; it is
//     not consensus. In Cluster, key and <key>:fence must share a slot: use a hash tag, as in
//     key = "{myapp}:primary".
//   - maxmemory-policy must not evict the key (noeviction, or never reach maxmemory): an
//     evicted key is a lost lock.
//   - Redis expires keys by its wall clock: a step forward on the Redis host ends leases
//     early. Keep that clock slewed (chrony/ntpd), never stepped.
//   - Redlock (N independent masters, majority quorum) would survive a minority of Redis
//     servers failing or restarting; it would not remove the need for fencing tokens (a
//     paused client is the same problem) and it has no monotonic fencing token of its own,
//     since the servers' counters disagree. Not implemented.
//   - No TLS (rediss://), no Sentinel or Cluster discovery.
//   - Callbacks run on the Coordinator thread, which is also the one that renews: while
//     on_promoted or on_startup run, nothing renews. They must return within
//     T - D - C of the acquisition (verify_interval() then returns 0 and the renewal starts
//     at once); a longer one loses the lease, and another process may be promoted while it
//     still runs. on_demoted must finish within D.
//   - No startup barrier (startup_marker_base() is empty): on_startup runs on every promotion.
//
// I/O. hiredis parses the replies; the socket is workerlock's own (SOCK_CLOEXEC, TCP_NODELAY,
// keepalive), not redisConnectWithTimeout()'s, because: hiredis's blocking API write()s and
// raises SIGPIPE when Redis has closed the connection (we send with MSG_NOSIGNAL);
// redisSetTimeout()'s SO_RCVTIMEO bounds each system call, not the command, so it cannot
// enforce "give up at valid_until"; and a blocked hiredis call cannot be interrupted. Here
// every command has an absolute deadline: connect and the last 20 ms before a deadline go
// through ppoll() (microsecond-exact); before that a plain blocking recv() with SO_RCVTIMEO
// at least 10 ms short of the deadline (one system call less per command, so an
// acquire+release costs the same 4 system calls as hiredis's SET NX + DEL). wait_acquire()
// always uses ppoll() on the socket and an eventfd, so interrupt() ends it at once, even in
// the middle of a command (whose outcome is then unknown: release() deletes the key if it
// holds our token). Host names are resolved with getaddrinfo(), which connect_timeout does
// not bound (resolv.conf's own timeouts apply).
#pragma once

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/format.h>
#include <hiredis/hiredis.h>

#include "backend.hpp"
#include "detail/posix.hpp"
#include "detail/proc_stat.hpp"
#include "detail/record.hpp"
#include "error.hpp"

namespace workerlock {

//! The knobs of a RedisBackend. A zero duration means "the default", computed from ttl.
struct RedisOptions {
  //! redis://[[user]:password@]host[:port][/db], or unix://[[user]:password@]/path[?db=N]
  //! (also redis+unix://). Percent-encode special characters of the user name and password.
  //! Empty: $WORKERLOCK_REDIS_URL; when that is empty too, prepare() throws.
  std::string url;
  //! The Redis key of the lease (the lock name); <key>:fence holds the fencing counter.
  std::string key = "workerlock:primary";
  //! Override the URL's user name and password when not empty (user: Redis 6 ACL).
  std::string username;
  std::string password;
  //! Lease length. Every participant of one key must use the same ttl.
  std::chrono::milliseconds ttl{10000};
  //! How often the holder renews; default ttl/3.
  std::chrono::milliseconds verify_interval{0};
  //! How much earlier than ttl the holder stops trusting its lease; default ttl/10 + 2 ms.
  std::chrono::milliseconds drift_margin{0};
  //! How often a standby retries; default min(ttl/10, 1 s). It also wakes when the lease it
  //! saw ends, and when a holder on this host dies (fast_local_failover).
  std::chrono::milliseconds poll_interval{0};
  //! TCP connect deadline, and deadline of every command; defaults min(ttl/5, 2 s).
  std::chrono::milliseconds connect_timeout{0};
  std::chrono::milliseconds command_timeout{0};
  //! Take over at once from a holder on this host whose process is gone (see the header).
  bool fast_local_failover = true;
  //! Keep everybody out for one ttl when Redis lost its data (see the header).
  bool quarantine_after_data_loss = true;
};

namespace detail {

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

//! A query string for messages: `db=N` (N digits) as is, every other value (and anything not
//! `name=value` with a plain name) masked: a value not understood is never printed.
inline std::string redact_query(std::string_view query) {
  std::string out;
  while (true) {
    const auto amp = query.find('&');
    const auto item = query.substr(0, amp);
    const auto eq = item.find('=');
    const auto name = item.substr(0, eq);
    const bool plain_name =
        made_of(name, [](unsigned char c) { return std::isalnum(c) != 0 || c == '_' || c == '-'; });
    const auto value = eq == std::string_view::npos ? std::string_view() : item.substr(eq + 1);
    const bool digits = made_of(value, is_digit_char);
    if (!plain_name || eq == std::string_view::npos) {
      out += "***";
    } else if (name == "db" && digits) {
      out += std::string(item);
    } else {
      out += std::string(name) + "=***";
    }
    if (amp == std::string_view::npos) return out;
    out += '&';
    query = query.substr(amp + 1);
  }
}

//! host[:port][/db] or a socket path of a URL that may not parse, safe to print: each part is
//! shown only when it looks like what it should be (a host name, digits, a plain path), else
//! it is masked, since a part that is not what it should be may hold a password.
inline std::string redact_raw_location(std::string_view location, bool unix_socket) {
  if (unix_socket)
    return location.empty() || made_of(location, is_path_char) ? std::string(location) : "***";
  const auto shown = [](std::string_view part, bool ok) {
    return part.empty() || ok ? std::string(part) : std::string("***");
  };
  const auto slash = location.find('/');
  const auto authority = location.substr(0, slash);
  std::string out;
  std::string_view port;
  bool has_port = false;
  if (!authority.empty() && authority.front() == '[') {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) return "***";
    const auto host = authority.substr(1, close - 1);
    out = '[' + shown(host, made_of(host, is_bracketed_host_char)) + ']';
    const auto after = authority.substr(close + 1);
    if (!after.empty() && after.front() != ':') return out + "***";
    has_port = !after.empty();
    if (has_port) port = after.substr(1);
  } else {
    const auto colon = authority.find(':');
    out = shown(authority.substr(0, colon), made_of(authority.substr(0, colon), is_host_char));
    has_port = colon != std::string_view::npos;
    if (has_port) port = authority.substr(colon + 1);
  }
  if (has_port) out += ':' + shown(port, made_of(port, is_digit_char));
  if (slash == std::string_view::npos) return out;
  const auto db = location.substr(slash + 1);
  return out + '/' + shown(db, made_of(db, is_digit_char));
}

//! A URL that may not parse, safe to print: the user info up to the last '@' of the authority
//! masked except a user name, every query value except db=N masked, a fragment masked, and
//! the scheme, host, port, database or socket path masked when not what they should be (a
//! port or database that is not all digits, ...). When an '@' follows a '?' or '#' (a
//! password with those characters, or an '@' in a query value), everything after "://" is
//! masked; a text without "://" is masked whole.
inline std::string redact_raw_url(std::string_view text) {
  const auto scheme_end = text.find("://");
  if (scheme_end == std::string_view::npos) return "***";
  const auto scheme = text.substr(0, scheme_end);
  std::string out = made_of(scheme, is_scheme_char) ? std::string(scheme) : std::string("***");
  out += "://";
  std::string lower(scheme);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  std::string_view rest = text.substr(scheme_end + 3);
  const auto at = rest.rfind('@');
  const auto query_start = rest.find_first_of("?#");
  if (at != std::string_view::npos) {
    if (query_start != std::string_view::npos && query_start < at) return out + "***";
    // The user info may contain '/' when not percent-encoded, so use the last '@'.
    const auto userinfo = rest.substr(0, at);
    const auto colon = userinfo.find(':');
    out += colon == std::string_view::npos ? std::string("***")
                                           : std::string(userinfo.substr(0, colon)) + ":***";
    out += '@';
    rest = rest.substr(at + 1);
  }
  const auto q = rest.find_first_of("?#");
  out += redact_raw_location(rest.substr(0, q), lower == "unix" || lower == "redis+unix");
  if (q == std::string_view::npos) return out;
  rest = rest.substr(q);
  if (rest.front() == '?') {
    const auto hash = rest.find('#');
    out += '?' + redact_query(rest.substr(1, hash == std::string_view::npos ? hash : hash - 1));
    if (hash == std::string_view::npos) return out;
  }
  return out + "#***";
}

inline bool percent_decode(std::string_view in, std::string& out, std::string& why) {
  out.clear();
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out += in[i];
      continue;
    }
    const auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    if (i + 2 >= in.size()) {
      why = "bad percent-encoding: '%' must be followed by two hex digits";
      return false;
    }
    const int hi = hex(in[i + 1]);
    const int lo = hex(in[i + 2]);
    if (hi < 0 || lo < 0) {
      why = "bad percent-encoding: '%' must be followed by two hex digits";
      return false;
    }
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return true;
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

//! Parses `text`; on failure returns false with `why` set. `why` quotes no part of `text` that
//! is not what it should be (a port or database that is not all digits, ...): such a part
//! may hold a password.
inline bool parse_redis_url(std::string_view text, redis_url& url, std::string& why) {
  url = redis_url{};
  if (text.empty()) {
    why = "the URL is empty";
    return false;
  }
  const auto scheme_end = text.find("://");
  if (scheme_end == std::string_view::npos) {
    why = "no scheme: expected redis://[:password@]host[:port][/db] or unix:///path/to/socket";
    return false;
  }
  std::string scheme(text.substr(0, scheme_end));
  std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (scheme == "rediss") {
    why = "TLS (rediss://) is not supported by RedisBackend";
    return false;
  }
  if (scheme != "redis" && scheme != "unix" && scheme != "redis+unix") {
    // A scheme that is not scheme-shaped may be part of a password (a URL without "//").
    why = made_of(scheme, is_scheme_char)
              ? fmt::format("unknown scheme '{}': expected redis, unix or redis+unix", scheme)
              : std::string("unknown scheme before '://': expected redis, unix or redis+unix");
    return false;
  }
  url.unix_socket = scheme != "redis";
  std::string_view rest = text.substr(scheme_end + 3);
  if (rest.find('#') != std::string_view::npos) {
    why = "a URL fragment ('#') is not allowed; percent-encode '#' in a password as %23";
    return false;
  }
  std::string_view query;
  if (const auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  // User info: up to the last '@'.
  if (const auto at = rest.rfind('@'); at != std::string_view::npos) {
    const auto userinfo = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const auto colon = userinfo.find(':');
    if (colon == std::string_view::npos) {
      why =
          "a user name without a password; write redis://:PASSWORD@host for a password, or "
          "redis://USER:PASSWORD@host";
      return false;
    }
    if (!percent_decode(userinfo.substr(0, colon), url.username, why)) return false;
    if (!percent_decode(userinfo.substr(colon + 1), url.password, why)) return false;
    if (url.password.empty()) {
      why = "the password after ':' is empty";
      return false;
    }
  }
  bool db_from_path = false;
  if (url.unix_socket) {
    if (rest.empty() || rest.front() != '/') {
      why = "the socket path must be absolute, as in unix:///run/redis/redis.sock";
      return false;
    }
    if (!percent_decode(rest, url.socket_path, why)) return false;
    if (url.socket_path.size() >= sizeof(sockaddr_un{}.sun_path)) {
      why = "the socket path is too long";
      return false;
    }
  } else {
    const auto slash = rest.find('/');
    std::string_view authority = rest.substr(0, slash);
    const std::string_view path = slash == std::string_view::npos ? "" : rest.substr(slash);
    std::string_view port_text;
    if (!authority.empty() && authority.front() == '[') {
      const auto close = authority.find(']');
      if (close == std::string_view::npos) {
        why = "'[' of an IPv6 address without ']'";
        return false;
      }
      url.host = std::string(authority.substr(1, close - 1));
      const auto after = authority.substr(close + 1);
      if (!after.empty()) {
        if (after.front() != ':') {
          why = "expected ':port' after ']'";
          return false;
        }
        port_text = after.substr(1);
        if (port_text.empty()) {
          why = "the port after ':' is empty";
          return false;
        }
      }
    } else {
      const auto colon = authority.find(':');
      if (colon != std::string_view::npos &&
          authority.find(':', colon + 1) != std::string_view::npos) {
        why = "an IPv6 address must be written in brackets, as in redis://[::1]:6379";
        return false;
      }
      url.host = std::string(authority.substr(0, colon));
      if (colon != std::string_view::npos) {
        port_text = authority.substr(colon + 1);
        if (port_text.empty()) {
          why = "the port after ':' is empty";
          return false;
        }
      }
    }
    if (url.host.empty()) {
      why = "the host is empty";
      return false;
    }
    if (!made_of(url.host, is_bracketed_host_char)) {
      // The character is not quoted: a host that is not a host may be part of a password.
      why =
          "bad character in the host name: expected letters, digits, '.', '-' and '_' (an IPv6 "
          "address in brackets)";
      return false;
    }
    if (!port_text.empty()) {
      long port = 0;
      if (!parse_decimal(port_text, 65535, port) || port == 0) {
        // Only digits are quoted: a port that is not a number may be part of a password.
        why = made_of(port_text, is_digit_char)
                  ? fmt::format("bad port {}: expected a number from 1 to 65535", port_text)
                  : std::string("bad port: the port after ':' must be a number from 1 to 65535");
        return false;
      }
      url.port = static_cast<int>(port);
    }
    if (path.size() > 1) {
      if (!parse_decimal(path.substr(1), 1000000, url.db)) {
        why = made_of(path.substr(1), is_digit_char)
                  ? fmt::format("bad database {}: expected a number up to 1000000", path.substr(1))
                  : std::string("bad database: the database after '/' must be a number");
        return false;
      }
      db_from_path = true;
    }
  }
  if (!query.empty()) {
    if (query.substr(0, 3) != "db=" || query.find('&') != std::string_view::npos) {
      why = "the only query parameter supported is ?db=N";
      return false;
    }
    if (db_from_path) {
      why = "the database is given twice (path and ?db=)";
      return false;
    }
    if (!parse_decimal(query.substr(3), 1000000, url.db)) {
      why = made_of(query.substr(3), is_digit_char)
                ? fmt::format("bad database {}: expected a number up to 1000000", query.substr(3))
                : std::string("bad database: the value of ?db= must be a number");
      return false;
    }
  }
  return true;
}

using redis_clock = std::chrono::steady_clock;

struct redis_reply_free {
  void operator()(redisReply* reply) const noexcept {
    if (reply != nullptr) freeReplyObject(reply);
  }
};
using redis_reply = std::unique_ptr<redisReply, redis_reply_free>;

//! What a network step ended with: 0, or an errno value and a sentence.
struct redis_status {
  int code = 0;
  std::string why;
  bool sent = false;  // the command left this process (its effect is unknown on failure)
  bool bad_configuration = false;  // the server refused a setting of ours (the database)
  explicit operator bool() const noexcept { return code != 0; }
};

enum class redis_ready { yes, timeout, interrupted, error };

//! Waits until `fd` has `events`, `deadline` passes, or `wake_fd` (if >= 0) becomes readable.
inline redis_ready redis_wait_fd(int fd, short events, redis_clock::time_point deadline,
                                 int wake_fd, int& error) {
  for (;;) {
    const auto left = deadline - redis_clock::now();
    if (left <= redis_clock::duration::zero()) return redis_ready::timeout;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    struct timespec timeout {};
    timeout.tv_sec = static_cast<time_t>(ns / 1000000000);
    timeout.tv_nsec = static_cast<long>(ns % 1000000000);
    struct pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    const int n = ::ppoll(fds, wake_fd >= 0 ? 2 : 1, &timeout, nullptr);
    if (n < 0) {
      if (errno == EINTR) continue;
      error = errno;
      return redis_ready::error;
    }
    if (n == 0) continue;  // re-check the deadline
    if (wake_fd >= 0 && (fds[1].revents & POLLIN) != 0) return redis_ready::interrupted;
    if (fds[0].revents != 0) return redis_ready::yes;  // POLLERR/POLLHUP surface in the call
  }
}

//! One RESP command of up to `capacity` arguments, referring to caller-owned strings. One
//! more argument is not stored: the command is marked `overflowed`, and exchange() refuses to
//! send it (E2BIG) instead of sending a truncated command.
struct redis_command {
  static constexpr int capacity = 10;
  std::string_view args[capacity];
  int argc = 0;
  bool overflowed = false;

  redis_command& operator<<(std::string_view arg) noexcept {
    if (argc < capacity) {
      args[argc++] = arg;
    } else {
      overflowed = true;
    }
    return *this;
  }
};

//! A connection to Redis: our own non-blocking socket, hiredis's reply parser.
class redis_connection {
 public:
  redis_connection() = default;
  redis_connection(const redis_connection&) = delete;
  redis_connection& operator=(const redis_connection&) = delete;
  ~redis_connection() { close(); }

  bool is_open() const noexcept { return fd_ >= 0; }

  void close() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (reader_ != nullptr) redisReaderFree(reader_);
    reader_ = nullptr;
  }

  redis_status connect(const redis_url& url, redis_clock::time_point deadline, int wake_fd) {
    close();
    redis_status st;
    reader_ = redisReaderCreate();
    if (reader_ == nullptr) {
      st.code = ENOMEM;
      st.why = "cannot allocate the reply parser";
      return st;
    }
    if (url.unix_socket) {
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      std::memcpy(address.sun_path, url.socket_path.c_str(), url.socket_path.size() + 1);
      st = connect_to(AF_UNIX, reinterpret_cast<const sockaddr*>(&address), sizeof address,
                      deadline, wake_fd);
      if (st) st.why = fmt::format("socket {}: {}", url.socket_path, st.why);
    } else {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* found = nullptr;
      const std::string port = std::to_string(url.port);
      const int rc = ::getaddrinfo(url.host.c_str(), port.c_str(), &hints, &found);
      if (rc != 0) {
        st.code = EHOSTUNREACH;
        st.why = fmt::format("cannot resolve the host name '{}': {}", url.host,
                             rc == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(rc));
        close();
        return st;
      }
      st.code = EHOSTUNREACH;
      st.why = "no address";
      for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
        st = connect_to(a->ai_family, a->ai_addr, a->ai_addrlen, deadline, wake_fd);
        if (!st || st.code == ETIMEDOUT || st.code == EINTR) break;
      }
      ::freeaddrinfo(found);
      if (!st) {
        const int one = 1;
        ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        // Blocking from now on: sends pass MSG_DONTWAIT, receives are bounded (see exchange()).
        ::setsockopt(fd_, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        const int idle = 15;
        const int interval = 5;
        const int count = 3;
        ::setsockopt(fd_, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        ::setsockopt(fd_, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
        ::setsockopt(fd_, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
      }
    }
    if (st) {
      close();
    } else {
      ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
      receive_timeout_us_ = 0;
    }
    return st;
  }

  //! Sends `n` commands at once (a pipeline) and reads their `n` replies, by `deadline`.
  //! wake_fd >= 0 makes the exchange end early (EINTR) when it becomes readable.
  //! On any failure the connection is closed: a late reply would be taken for the next one.
  redis_status exchange(const redis_command* commands, std::size_t n, redis_reply* replies,
                        redis_clock::time_point deadline, int wake_fd) {
    redis_status st;
    for (std::size_t i = 0; i < n; ++i) {
      if (commands[i].overflowed) {  // a bug of the caller: nothing is sent
        st.code = E2BIG;
        st.why = fmt::format("a command with more than {} arguments", redis_command::capacity);
        return st;
      }
    }
    if (fd_ < 0) {
      st.code = ENOTCONN;
      st.why = "not connected";
      return st;
    }
    out_.clear();
    for (std::size_t i = 0; i < n; ++i) append(commands[i]);
    std::size_t sent = 0;
    while (sent < out_.size()) {
      const auto wrote =
          ::send(fd_, out_.data() + sent, out_.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (wrote > 0) {
        sent += static_cast<std::size_t>(wrote);
        st.sent = true;
        continue;
      }
      if (wrote < 0 && errno == EINTR) continue;
      if (wrote < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!wait(POLLOUT, deadline, wake_fd, st)) return fail(st);
        continue;
      }
      st.code = errno == EPIPE ? ECONNRESET : errno;
      st.why = "the server closed the connection";
      return fail(st);
    }
    st.sent = true;
    for (std::size_t i = 0; i < n; ++i) {
      for (;;) {
        void* reply = nullptr;
        if (redisReaderGetReply(reader_, &reply) != REDIS_OK) {
          st.code = EPROTO;
          st.why = fmt::format("unreadable reply: {}", reader_->errstr);
          return fail(st);
        }
        if (reply != nullptr) {
          replies[i].reset(static_cast<redisReply*>(reply));
          break;
        }
        char buffer[16384];
        ssize_t got = -1;
        if (wake_fd < 0 && bound_receive_timeout(deadline)) {
          got = ::recv(fd_, buffer, sizeof buffer, 0);  // blocks at most SO_RCVTIMEO
        } else {
          // Interruptible, or close to the deadline: ppoll() is exact to the microsecond.
          if (!wait(POLLIN, deadline, wake_fd, st)) return fail(st);
          got = ::recv(fd_, buffer, sizeof buffer, MSG_DONTWAIT);
        }
        if (got > 0) {
          if (redisReaderFeed(reader_, buffer, static_cast<std::size_t>(got)) != REDIS_OK) {
            st.code = EPROTO;
            st.why = fmt::format("unreadable reply: {}", reader_->errstr);
            return fail(st);
          }
          continue;
        }
        if (got == 0) {
          st.code = ECONNRESET;
          st.why = "the server closed the connection";
          return fail(st);
        }
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        st.code = errno;
        st.why = "cannot read from the server";
        return fail(st);
      }
    }
    return st;
  }

 private:
  redis_status connect_to(int family, const sockaddr* address, socklen_t length,
                          redis_clock::time_point deadline, int wake_fd) {
    redis_status st;
    if (fd_ >= 0) ::close(fd_);
    fd_ =
        keep_off_standard_streams(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (fd_ < 0) {
      st.code = errno;
      st.why = "cannot create a socket";
      return st;
    }
    if (::connect(fd_, address, length) == 0) return st;
    if (errno != EINPROGRESS && errno != EINTR && errno != EAGAIN) {
      st.code = errno;
      st.why = explain_connect(errno);
      return st;
    }
    if (!wait(POLLOUT, deadline, wake_fd, st)) return st;
    int error = 0;
    socklen_t size = sizeof error;
    if (::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &error, &size) != 0) error = errno;
    if (error != 0) {
      st.code = error;
      st.why = explain_connect(error);
    }
    return st;
  }

  static std::string explain_connect(int error) {
    switch (error) {
      case ECONNREFUSED:
        return "connection refused: is redis-server running and listening there?";
      case ENOENT:
        return "no such socket: is redis-server running with unixsocket set?";
      case EACCES:
        return "permission denied on the socket";
      case ENETUNREACH:
      case EHOSTUNREACH:
        return "the host is unreachable";
      default:
        return "cannot connect";
    }
  }

  bool wait(short events, redis_clock::time_point deadline, int wake_fd, redis_status& st) {
    int error = 0;
    switch (redis_wait_fd(fd_, events, deadline, wake_fd, error)) {
      case redis_ready::yes:
        return true;
      case redis_ready::timeout:
        st.code = ETIMEDOUT;
        st.why = "no answer in time";
        return false;
      case redis_ready::interrupted:
        st.code = EINTR;
        st.why = "interrupted";
        return false;
      case redis_ready::error:
        st.code = error;
        st.why = "poll failed";
        return false;
    }
    return false;
  }

  //! A plain blocking recv() costs one system call less than ppoll() + recv(). It is used when
  //! the deadline is more than 20 ms away, with SO_RCVTIMEO at least 10 ms short of it (the
  //! kernel may round the timeout up to its tick); the last 20 ms go through ppoll(). The
  //! option is set only when it must shrink, so commands with the same timeout set it once.
  bool bound_receive_timeout(redis_clock::time_point deadline) noexcept {
    const auto left =
        std::chrono::duration_cast<std::chrono::microseconds>(deadline - redis_clock::now())
            .count();
    if (left <= 20000) return false;
    const long long most = (left - 10000) / 1000 * 1000;  // whole milliseconds
    if (receive_timeout_us_ != 0 && receive_timeout_us_ <= most) return true;
    struct timeval tv {};
    tv.tv_sec = static_cast<time_t>(most / 1000000);
    tv.tv_usec = static_cast<suseconds_t>(most % 1000000);
    if (::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) return false;
    receive_timeout_us_ = most;
    return true;
  }

  redis_status& fail(redis_status& st) noexcept {
    close();
    return st;
  }

  void append(const redis_command& command) {
    out_ += '*';
    out_ += std::to_string(command.argc);
    out_ += "\r\n";
    for (int i = 0; i < command.argc; ++i) {
      out_ += '$';
      out_ += std::to_string(command.args[i].size());
      out_ += "\r\n";
      out_.append(command.args[i].data(), command.args[i].size());
      out_ += "\r\n";
    }
  }

  int fd_ = -1;
  redisReader* reader_ = nullptr;
  std::string out_;
  long long receive_timeout_us_ = 0;  // SO_RCVTIMEO now set; 0: none (blocks forever)
};

// The scripts. KEYS[1] = the lease key, KEYS[2] = <key>:fence.
// acquire: ARGV[1] = our token, ARGV[2] = ttl in ms, ARGV[3] = the token of a holder proven
// dead, or "", ARGV[4] = "1" to quarantine after data loss. Returns the fencing token (> 0)
// when we hold the key now, else {pttl, holder's token}. Our own token in the key (a
// previous attempt of ours whose reply was lost) counts as ours.
inline constexpr std::string_view redis_acquire_script = R"LUA(
if redis.replicate_commands then redis.replicate_commands() end
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not ok then
  local cur = redis.call('GET', KEYS[1])
  if cur == ARGV[1] or (ARGV[3] ~= '' and cur == ARGV[3]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  else
    return {redis.call('PTTL', KEYS[1]), cur or ''}
  end
end
local fence = redis.call('INCR', KEYS[2])
if fence == 1 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[1], 'workerlock-quarantine', 'PX', ARGV[2])
    return {tonumber(ARGV[2]), 'workerlock-quarantine'}
  end
  fence = redis.call('INCR', KEYS[2])
end
return fence
)LUA";

inline constexpr std::string_view redis_renew_script = R"LUA(
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
)LUA";

inline constexpr std::string_view redis_release_script = R"LUA(
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
)LUA";

//! This kernel's boot id (empty if unreadable), read once.
inline const std::string& redis_boot_id() {
  static const std::string id = [] {
    std::string text = read_proc_file("/proc/sys/kernel/random/boot_id");
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text.find(':') == std::string::npos ? text : std::string();
  }();
  return id;
}

//! A new token: 128 random bits, then who holds it (boot id : pid namespace : pid : host).
//! The random bits come from getrandom() in batches, per thread, never shared across fork().
inline std::string redis_make_token() {
  struct pool {
    unsigned char bytes[512];
    std::size_t used = sizeof bytes;
    pid_t pid = 0;
    std::string suffix;
  };
  thread_local pool p;
  const pid_t me = ::getpid();  // never cached: a child of syscall(SYS_fork) runs no atfork handler
  if (p.pid != me) {
    p.pid = me;
    p.used = sizeof p.bytes;  // a forked child must not reuse its parent's bytes
    const auto identity = current_identity();
    p.suffix =
        fmt::format(":{}:{}:{}:{}", redis_boot_id(), identity.pid_namespace, me, identity.host);
  }
  if (p.used + 16 > sizeof p.bytes) {
    std::size_t got = 0;
    while (got < sizeof p.bytes) {
      const auto n = ::getrandom(p.bytes + got, sizeof p.bytes - got, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
    }
    if (got < sizeof p.bytes) {
      std::random_device device;
      for (auto& b : p.bytes) b = static_cast<unsigned char>(device());
    }
    p.used = 0;
  }
  static constexpr char hex[] = "0123456789abcdef";
  std::string token;
  token.reserve(32 + p.suffix.size());
  for (std::size_t i = 0; i < 16; ++i) {
    const unsigned char b = p.bytes[p.used + i];
    token += hex[b >> 4];
    token += hex[b & 15];
  }
  std::memset(p.bytes + p.used, 0, 16);
  p.used += 16;
  token += p.suffix;
  return token;
}

//! The pid of the token's holder when it is a process of this kernel and pid namespace
//! other than us; 0 otherwise.
inline pid_t redis_local_holder(std::string_view token) {
  std::string_view fields[4];
  for (auto& field : fields) {
    const auto colon = token.find(':');
    if (colon == std::string_view::npos) return 0;
    field = token.substr(0, colon);
    token.remove_prefix(colon + 1);
  }
  const auto& boot = redis_boot_id();
  if (boot.empty() || fields[1] != boot) return 0;
  if (fields[2] != std::to_string(current_identity().pid_namespace)) return 0;
  long pid = 0;
  if (!parse_decimal(fields[3], 1L << 30, pid) || pid <= 0 || pid == ::getpid()) return 0;
  return static_cast<pid_t>(pid);
}

//! True only when `pid` provably runs no code any more: no such process, or a zombie.
inline bool redis_process_gone(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  // It exists (or is another user's, EPERM): gone only if it is a zombie. Anything we
  // cannot read counts as alive.
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  const std::string text = read_proc_file(path);
  if (text.empty()) return false;
  const auto close = text.rfind(')');  // the command name may contain ')'
  if (close == std::string::npos || close + 2 >= text.size()) return false;
  const char state = text[close + 2];
  return state == 'Z' || state == 'X' || state == 'x';
}

inline int redis_pidfd_open(pid_t pid) noexcept {
#ifdef SYS_pidfd_open
  const long fd = ::syscall(SYS_pidfd_open, pid, 0);
  if (fd < 0) return -1;
  ::fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);
  return keep_off_standard_streams(static_cast<int>(fd));
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

}  // namespace detail

//! Holds the primary role through a lease on a Redis key; see the top of this header for the
//! protocol, the timing arithmetic and the limits.
//!
//! Threads: driven by one thread at a time (the Coordinator's); interrupt(),
//! clear_interrupt(), held(), fencing_token(), lease_valid(), valid_until(), describe(),
//! network_target(), options() and redacted_url() may be called from any thread at any time.
//! Fork: a copy inherited through fork() (also syscall(SYS_fork) or clone() without CLONE_VM,
//! which run no atfork handler: every check asks the kernel with getpid()) holds nothing,
//! never sends on the parent's connection (its destructor, release() and reset() only close
//! its own copy of the descriptor), and opens its own connection.
class RedisBackend final : public Backend {
 public:
  using clock = std::chrono::steady_clock;

  //! Never throws for bad options or a bad URL: prepare() and try_acquire() do, so that
  //! Coordinator::start() reports them.
  explicit RedisBackend(RedisOptions options = {}) : options_(std::move(options)) {
    if (options_.url.empty()) {
      if (const char* env = std::getenv("WORKERLOCK_REDIS_URL"); env != nullptr) options_.url = env;
    }
    configure();
    owner_.store(::getpid());
    wake_fd_ = detail::keep_off_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    token_ = detail::redis_make_token();
  }

  RedisBackend(const RedisBackend&) = delete;
  RedisBackend& operator=(const RedisBackend&) = delete;

  //! Releases a hold (bounded by command_timeout), closes the connection. Never throws. In a
  //! forked copy it only closes the copy's descriptors: the parent's lease stays.
  ~RedisBackend() override {
    release();
    connection_.close();
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  //! Throws: lock_error (errc::bad_configuration, equal to std::errc::invalid_argument) for a
  //! bad URL or inconsistent timings; target() names the URL (password ***) and key.
  void prepare() override { check_config("start the coordinator for"); }

  //! One acquisition attempt (one round trip; two when it takes over from a dead holder on
  //! this host; one more to connect). Returns true if this process holds the lease now.
  //! Throws: lock_error when Redis cannot be reached, refuses us, or answers nonsense.
  bool try_acquire() override {
    check_config("acquire the lease on");
    detach_if_forked();
    if (held_.load()) return true;
    return attempt(-1);
  }

  //! Retries every poll_interval (sooner when the lease it saw ends or a local holder dies)
  //! until held (true) or interrupt() (false). Throws: lock_error on connection errors, for
  //! the Coordinator to log and retry with its backoff.
  bool wait_acquire() override {
    check_config("acquire the lease on");
    detach_if_forked();
    for (;;) {
      if (interrupted_.load()) return false;
      if (held_.load()) return true;
      if (attempt(wake_fd_)) return true;
      if (interrupted_.load()) return false;
      auto pause = cfg_.poll_interval;
      if (last_pttl_ >= 0) pause = std::min(pause, std::chrono::milliseconds(last_pttl_ + 1));
      int pidfd = -1;
      if (options_.fast_local_failover && last_holder_pid_ > 0)
        pidfd = detail::redis_pidfd_open(last_holder_pid_);
      sleep_until(clock::now() + pause, pidfd);
      if (pidfd >= 0) ::close(pidfd);
    }
  }

  //! Async-signal-safe. In a forked copy it only sets the flag: the eventfd is the parent's
  //! until the copy detaches.
  void interrupt() noexcept override {
    interrupted_.store(true);
    if (wake_fd_ >= 0 && owner_.load() == ::getpid()) {
      const std::uint64_t one = 1;
      [[maybe_unused]] const auto n = ::write(wake_fd_, &one, sizeof one);
    }
  }

  void clear_interrupt() noexcept override {
    interrupted_.store(false);
    if (owner_.load() == ::getpid()) drain_wake_fd();  // a forked copy must not eat the parent's
  }

  //! Renews the lease (compare-then-PEXPIRE). Returns false when the key is no longer ours.
  //! Throws: lock_error with errc::lease_lost (equal to std::errc::timed_out) when the lease
  //! ran out before it could be renewed or the renewal got no answer before valid_until();
  //! ETIMEDOUT when it got no answer within command_timeout, the lease still valid then;
  //! with the errno (ECONNRESET, EACCES...) when the renewal failed otherwise. The
  //! Coordinator counts that as false. Returns (or throws) by valid_until() at the latest.
  bool verify_held() override {
    detach_if_forked();
    if (!held_.load()) return false;
    const auto now = clock::now();
    const auto until = valid_until();
    if (now >= until) {
      unknown_ = true;
      throw lock_error(
          "renew the lease on", target(), make_error_code(errc::lease_lost),
          fmt::format("the lease ran out {} ms ago before it could be renewed; was "
                      "this process paused?",
                      std::chrono::duration_cast<std::chrono::milliseconds>(now - until).count()));
    }
    const auto deadline = std::min(now + cfg_.command_timeout, until);
    detail::redis_reply reply;
    clock::time_point start;
    const auto st = run_script(script::renew, deadline, -1, {}, reply, start);
    if (st) {
      unknown_ = true;
      throw error("renew the lease on", st, until);
    }
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1) {
      set_valid_until(start + cfg_.ttl - cfg_.drift_margin);
      return true;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
      unknown_ = true;
      throw server_error("renew the lease on", reply.get());
    }
    lost_ = true;  // the key expired or holds another token
    return false;
  }

  //! configured verify_interval, shortened so that a renewal starts no later than
  //! valid_until() - command_timeout.
  std::chrono::milliseconds verify_interval() const noexcept override {
    const auto until = valid_until();
    if (until == clock::time_point::min()) return cfg_.verify_interval;  // not held
    const auto left = until - clock::now() - cfg_.command_timeout;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left);
    return std::clamp(ms, std::chrono::milliseconds(0), cfg_.verify_interval);
  }

  //! Deletes the key if it still holds our token (bounded by command_timeout); also cleans up
  //! after an attempt whose outcome was unknown. Never throws.
  void release() noexcept override {
    if (owner_.load() != ::getpid()) return;  // a forked copy: the hold is the parent's
    const bool was_held = held_.exchange(false);
    fence_.store(0);
    set_valid_until(clock::time_point::min());
    if ((was_held && !lost_) || unknown_) {
      try {
        detail::redis_reply reply;
        clock::time_point start;
        const auto st =
            run_script(script::release, clock::now() + cfg_.command_timeout, -1, {}, reply, start);
        if (!st && reply->type != REDIS_REPLY_ERROR) unknown_ = false;
      } catch (...) {
      }
    }
    lost_ = false;
    // Every hold gets its own token, so that a late renewal or release of this one can never
    // touch the next. After an attempt of unknown outcome that could not be cleaned up, the
    // token stays: the next attempt finds it in the key and adopts it.
    if (was_held) {
      unknown_ = false;
      try {
        token_ = detail::redis_make_token();
      } catch (...) {
      }
    }
  }

  //! release(), then drops the connection. Never throws.
  void reset() noexcept override {
    release();
    connection_.close();
  }

  bool held() const noexcept override { return held_.load() && owner_.load() == ::getpid(); }

  std::string describe() const override { return "redis=" + where(); }
  //! `<URL, password ***> key=<key>`: what lock_error::target() names in this backend's errors
  //! (and in the Coordinator's about it), such as `redis://127.0.0.1:6379/0 key=app:primary`.
  std::string network_target() const override { return where(); }

  //! The fencing token of the current hold (0 when not held): larger than every token of an
  //! earlier hold of this key.
  std::uint64_t fencing_token() const noexcept override { return held() ? fence_.load() : 0; }

  //! True while held and the lease is still trusted: clock::now() < valid_until(). A primary
  //! may check it before an action that must not run twice; it does not replace fencing.
  bool lease_valid() const noexcept { return clock::now() < valid_until(); }

  //! The end of the trusted lease, on this host's steady_clock: the instant just before the
  //! last successful acquire or renew was sent, + ttl - drift_margin (see the top of this
  //! header). time_point::min() while not held (before the first hold, after release(), in a
  //! forked copy). A Coordinator's role() reads secondary from then on, even while its thread
  //! has not yet noticed (a process paused past its lease). Any thread, async-signal-safe.
  clock::time_point valid_until() const noexcept override {
    if (!held()) return clock::time_point::min();
    return clock::time_point(clock::duration(valid_until_.load()));
  }

  //! The effective options (defaults filled in, URL from the environment).
  const RedisOptions& options() const noexcept { return cfg_; }

  //! The token of the current or next hold. Driving thread only.
  const std::string& token() const noexcept { return token_; }

  //! The URL without its password.
  std::string redacted_url() const { return redacted_; }

 private:
  enum class script { acquire, renew, release };

  void configure() {
    cfg_ = options_;
    const auto ttl = cfg_.ttl;
    using std::chrono::milliseconds;
    if (cfg_.verify_interval.count() == 0) cfg_.verify_interval = ttl / 3;
    if (cfg_.drift_margin.count() == 0) cfg_.drift_margin = ttl / 10 + milliseconds(2);
    if (cfg_.poll_interval.count() == 0)
      cfg_.poll_interval = std::clamp(ttl / 10, milliseconds(1), milliseconds(1000));
    if (cfg_.command_timeout.count() == 0)
      cfg_.command_timeout = std::clamp(ttl / 5, milliseconds(1), milliseconds(2000));
    if (cfg_.connect_timeout.count() == 0) cfg_.connect_timeout = cfg_.command_timeout;

    std::string why;
    if (cfg_.url.empty()) {
      config_error_ = "no Redis URL: set RedisOptions::url or $WORKERLOCK_REDIS_URL";
      redacted_ = "(no URL)";
    } else if (!detail::parse_redis_url(cfg_.url, url_, why)) {
      config_error_ = "bad Redis URL: " + why;
      redacted_ = detail::redact_raw_url(cfg_.url);
    } else {
      if (!cfg_.username.empty()) url_.username = cfg_.username;
      if (!cfg_.password.empty()) url_.password = cfg_.password;
      redacted_ = url_.redacted();
      if (!url_.username.empty() && url_.password.empty())
        config_error_ = "RedisOptions::username is set without a password";
    }
    if (config_error_.empty()) {
      if (cfg_.key.empty()) {
        config_error_ = "RedisOptions::key is empty";
      } else if (ttl < milliseconds(10)) {
        config_error_ = "ttl must be at least 10 ms";
      } else if (cfg_.verify_interval.count() < 0 || cfg_.drift_margin.count() < 0 ||
                 cfg_.poll_interval.count() < 0 || cfg_.command_timeout.count() < 0 ||
                 cfg_.connect_timeout.count() < 0) {
        config_error_ = "negative durations in RedisOptions";
      } else if (cfg_.verify_interval + cfg_.command_timeout > ttl - cfg_.drift_margin) {
        config_error_ = fmt::format(
            "verify_interval ({} ms) + command_timeout ({} ms) must not exceed ttl ({} ms) - "
            "drift_margin ({} ms): a renewal started on schedule must end before the lease",
            cfg_.verify_interval.count(), cfg_.command_timeout.count(), ttl.count(),
            cfg_.drift_margin.count());
      }
    }
    fence_key_ = cfg_.key + ":fence";
    ttl_text_ = std::to_string(ttl.count());
  }

  void check_config(const char* operation) const {
    if (!config_error_.empty())
      throw lock_error(operation, target(), make_error_code(errc::bad_configuration),
                       config_error_);
    if (wake_fd_ < 0)
      throw lock_error(operation, target(), std::make_error_code(std::errc::too_many_files_open),
                       "cannot create the eventfd that interrupt() signals");
  }

  std::string where() const { return fmt::format("{} key={}", redacted_, cfg_.key); }
  lock_error::network_target target() const { return {where()}; }

  //! A process forked from the one that built us holds nothing and shares no socket. The
  //! kernel says who we are: a cached pid would still be the parent's in a child of
  //! syscall(SYS_fork) or clone() (no atfork handler runs there), and that child would then
  //! renew or delete the parent's lease on the parent's own socket.
  void detach_if_forked() {
    const pid_t me = ::getpid();
    if (me == owner_.load()) return;
    connection_.close();  // our copy only: the parent's socket stays open
    held_.store(false);
    fence_.store(0);
    set_valid_until(clock::time_point::min());
    lost_ = unknown_ = false;
    if (wake_fd_ >= 0) ::close(wake_fd_);
    wake_fd_ = detail::keep_off_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    token_ = detail::redis_make_token();
    owner_.store(me);
  }

  void set_valid_until(clock::time_point t) noexcept {
    valid_until_.store(t.time_since_epoch().count());
  }

  void drain_wake_fd() noexcept {
    std::uint64_t value = 0;
    if (wake_fd_ >= 0) {
      while (::read(wake_fd_, &value, sizeof value) > 0) {
      }
    }
  }

  //! Sleeps until `until`, or until interrupt(), or until `pidfd` (if >= 0) reports its
  //! process gone.
  void sleep_until(clock::time_point until, int pidfd) {
    for (;;) {
      if (interrupted_.load()) return;
      const auto left = until - clock::now();
      if (left <= clock::duration::zero()) return;
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      struct timespec timeout {};
      timeout.tv_sec = static_cast<time_t>(ns / 1000000000);
      timeout.tv_nsec = static_cast<long>(ns % 1000000000);
      struct pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {pidfd, POLLIN, 0}};
      const int n = ::ppoll(fds, pidfd >= 0 ? 2 : 1, &timeout, nullptr);
      if (n < 0 && errno != EINTR) return;
      if (n > 0 && pidfd >= 0 && fds[1].revents != 0) return;
      if (n > 0 && (fds[0].revents & POLLIN) != 0 && !interrupted_.load()) {
        drain_wake_fd();  // a stale wakeup (interrupt() raced with clear_interrupt())
      }
    }
  }

  //! One attempt, plus a second one that takes over from a holder proven dead.
  bool attempt(int wake_fd) {
    if (try_once(wake_fd, {})) return true;
    if (interrupted_.load()) return false;
    if (last_holder_pid_ > 0 && options_.fast_local_failover &&
        detail::redis_process_gone(last_holder_pid_)) {
      const std::string dead = last_holder_;
      return try_once(wake_fd, dead);
    }
    return false;
  }

  bool try_once(int wake_fd, const std::string& dead_holder) {
    last_pttl_ = -1;
    last_holder_pid_ = 0;
    last_holder_.clear();
    auto deadline = clock::now() + cfg_.command_timeout;
    if (!connection_.is_open()) deadline += cfg_.connect_timeout;
    detail::redis_reply reply;
    clock::time_point start;
    const auto st = run_script(script::acquire, deadline, wake_fd, dead_holder, reply, start);
    if (st) {
      if (st.sent) unknown_ = true;
      if (st.code == EINTR) {  // interrupt(), or a stale wakeup: retried by wait_acquire()
        if (!interrupted_.load()) drain_wake_fd();
        return false;
      }
      throw error("acquire the lease on", st, {});
    }
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer > 0) {
      fence_.store(static_cast<std::uint64_t>(reply->integer));
      set_valid_until(start + cfg_.ttl - cfg_.drift_margin);
      lost_ = false;
      unknown_ = false;
      held_.store(true);
      return true;
    }
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
        reply->element[0]->type == REDIS_REPLY_INTEGER) {
      last_pttl_ = reply->element[0]->integer;
      const auto* holder = reply->element[1];
      if (holder->type == REDIS_REPLY_STRING) {
        last_holder_.assign(holder->str, holder->len);
        last_holder_pid_ = detail::redis_local_holder(last_holder_);
      }
      return false;
    }
    if (reply->type == REDIS_REPLY_ERROR) throw server_error("acquire the lease on", reply.get());
    throw lock_error("acquire the lease on", target(),
                     std::make_error_code(std::errc::protocol_error),
                     "unexpected reply to the acquire script");
  }

  //! Runs one of the scripts: EVALSHA, or EVAL after NOSCRIPT (or when SCRIPT LOAD was
  //! refused). Connects first if needed. `start` is set to the time just before the script
  //! was sent. Returns a failure status; else `reply` is the answer (maybe an error reply).
  detail::redis_status run_script(script which, clock::time_point deadline, int wake_fd,
                                  std::string_view steal, detail::redis_reply& reply,
                                  clock::time_point& start) {
    if (!connection_.is_open()) {
      if (auto st = connect(deadline, wake_fd); st) return st;
    }
    std::string_view body;
    const std::string* sha = nullptr;
    switch (which) {
      case script::acquire:
        body = detail::redis_acquire_script;
        sha = &sha_acquire_;
        break;
      case script::renew:
        body = detail::redis_renew_script;
        sha = &sha_renew_;
        break;
      case script::release:
        body = detail::redis_release_script;
        sha = &sha_release_;
        break;
    }
    bool by_sha = !sha->empty();
    // EVALSHA sha numkeys key fence token ttl [steal quarantine]: the longest command sent.
    static_assert(9 <= detail::redis_command::capacity, "redis_command is too small");
    for (;;) {
      detail::redis_command command;
      if (by_sha) {
        command << "EVALSHA" << *sha;
      } else {
        command << "EVAL" << body;
      }
      command << "2" << cfg_.key << fence_key_ << token_ << ttl_text_;
      if (which == script::acquire)
        command << steal << (options_.quarantine_after_data_loss ? "1" : "0");
      start = clock::now();
      auto st = connection_.exchange(&command, 1, &reply, deadline, wake_fd);
      if (st) return st;
      if (reply->type != REDIS_REPLY_ERROR) return st;
      const std::string_view text(reply->str, reply->len);
      if (by_sha && text.substr(0, 8) == "NOSCRIPT") {
        by_sha = false;  // flushed (SCRIPT FLUSH): EVAL caches it again
        continue;
      }
      if (is_auth_error(reply.get())) connection_.close();
      return st;
    }
  }

  static bool is_auth_error(const redisReply* reply) {
    const std::string_view text(reply->str, reply->len);
    return text.substr(0, 6) == "NOAUTH" || text.substr(0, 9) == "WRONGPASS" ||
           text.substr(0, 6) == "NOPERM";
  }

  //! Connects, authenticates, selects the database, names the connection and loads the
  //! scripts: one round trip after the TCP handshake.
  detail::redis_status connect(clock::time_point deadline, int wake_fd) {
    const auto connect_deadline = std::min(deadline, clock::now() + cfg_.connect_timeout);
    auto st = connection_.connect(url_, connect_deadline, wake_fd);
    if (st) {
      st.why = "cannot connect: " + st.why;
      return st;
    }
    const std::string db = std::to_string(url_.db);
    const std::string name = fmt::format("workerlock:{}", ::getpid());
    detail::redis_command commands[6];
    std::size_t n = 0;
    int auth_index = -1;
    if (!url_.password.empty()) {
      auth_index = static_cast<int>(n);
      commands[n] << "AUTH";
      if (!url_.username.empty()) commands[n] << url_.username;
      commands[n++] << url_.password;
    }
    int select_index = -1;
    if (url_.db != 0) {
      select_index = static_cast<int>(n);
      commands[n++] << "SELECT" << db;
    }
    commands[n++] << "CLIENT"
                  << "SETNAME" << name;
    const std::size_t first_script = n;
    commands[n++] << "SCRIPT"
                  << "LOAD" << detail::redis_acquire_script;
    commands[n++] << "SCRIPT"
                  << "LOAD" << detail::redis_renew_script;
    commands[n++] << "SCRIPT"
                  << "LOAD" << detail::redis_release_script;
    detail::redis_reply replies[6];
    st = connection_.exchange(commands, n, replies, deadline, wake_fd);
    if (st) {
      st.sent = false;  // nothing of the lease was sent yet
      st.why = "cannot set up the connection: " + st.why;
      return st;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const redisReply* r = replies[i].get();
      if (r->type != REDIS_REPLY_ERROR) continue;
      const std::string text(r->str, r->len);
      detail::redis_status failure;
      failure.code = EACCES;
      if (static_cast<int>(i) == auth_index) {
        failure.why = text.find("without any password configured") != std::string::npos
                          ? "the URL has a password but the server has none configured: " + text
                          : "the server refused the user name or password: " + text;
      } else if (text.substr(0, 6) == "NOAUTH") {
        failure.why =
            "the server requires a password: give it in the URL (redis://:PASSWORD@host:port) "
            "or in RedisOptions::password (" +
            text + ")";
      } else if (static_cast<int>(i) == select_index) {
        failure.code = EINVAL;
        failure.bad_configuration = true;
        failure.why = "the server refused the database number: " + text;
      } else {
        continue;  // CLIENT SETNAME or SCRIPT LOAD refused (ACL): run by EVAL instead
      }
      connection_.close();
      return failure;
    }
    std::string* shas[3] = {&sha_acquire_, &sha_renew_, &sha_release_};
    for (std::size_t i = 0; i < 3; ++i) {
      const redisReply* r = replies[first_script + i].get();
      shas[i]->assign(r->type == REDIS_REPLY_STRING ? std::string(r->str, r->len) : std::string());
    }
    return {};
  }

  lock_error error(const char* operation, const detail::redis_status& st,
                   clock::time_point until) const {
    std::string why = st.why;
    if (st.code == ETIMEDOUT) {
      why = until != clock::time_point{}
                ? fmt::format(
                      "{}: within command_timeout ({} ms) or before the lease ran out, "
                      "whichever came first",
                      why, cfg_.command_timeout.count())
                : fmt::format("{}: connect_timeout {} ms, command_timeout {} ms", why,
                              cfg_.connect_timeout.count(), cfg_.command_timeout.count());
    }
    // A renewal that got no answer before the lease ran out: the lease is lost. One that timed
    // out after command_timeout while the lease is still valid is only a timeout (ETIMEDOUT).
    auto code = std::error_code(st.code, std::system_category());
    if (st.code == ETIMEDOUT && until != clock::time_point{} && clock::now() >= until)
      code = make_error_code(errc::lease_lost);
    if (st.bad_configuration) code = make_error_code(errc::bad_configuration);
    return lock_error(operation, target(), code, why);
  }

  lock_error server_error(const char* operation, const redisReply* reply) const {
    const std::string text(reply->str, reply->len);
    int code = EIO;
    std::string why = "the server answered: " + text;
    if (is_auth_error(reply)) {
      code = EACCES;
    } else if (text.substr(0, 8) == "READONLY") {
      why += " (this server is a read-only replica; point the URL at the master)";
      code = EROFS;
    } else if (text.substr(0, 3) == "OOM") {
      code = ENOMEM;
    }
    return lock_error(operation, target(), std::error_code(code, std::system_category()), why);
  }

  RedisOptions options_;  // as given (URL from the environment filled in)
  RedisOptions cfg_;      // effective
  detail::redis_url url_;
  std::string redacted_;
  std::string config_error_;
  std::string fence_key_;
  std::string ttl_text_;

  detail::redis_connection connection_;
  std::string sha_acquire_;
  std::string sha_renew_;
  std::string sha_release_;
  std::string token_;

  std::atomic<pid_t> owner_{0};  // the process whose hold and connection these are
  int wake_fd_ = -1;
  std::atomic<bool> interrupted_{false};
  std::atomic<bool> held_{false};
  std::atomic<std::uint64_t> fence_{0};
  std::atomic<clock::rep> valid_until_{clock::time_point::min().time_since_epoch().count()};
  bool lost_ = false;     // the key is known not to hold our token any more
  bool unknown_ = false;  // a command of ours may or may not have run

  long long last_pttl_ = -1;  // from the last failed attempt: when the lease we saw ends
  std::string last_holder_;
  pid_t last_holder_pid_ = 0;
};

}  // namespace workerlock
