// workerlock/detail/redis_lease.hpp: the Lua scripts of a Redis lease and its tokens: who
// holds the key, and whether that holder is a process on this host (process_identity.hpp
// then tells whether it is gone).
//
// THE PROTOCOL
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
//   Fencing after data loss: a missing <key>:fence is re-created from Redis's TIME in
//   microseconds, larger than every earlier token as long as Redis's wall clock does not step
//   backwards. Quarantine: when <key>:fence was missing, the script sets
//   key = "workerlock-quarantine" PX ttl instead of taking the key (Redlock's "delayed
//   restart"), since a holder from before the loss may trust its lease for up to one ttl.
//   Fast local failover: when the holder's token names a process of this kernel (boot id) and
//   pid namespace (inode of /proc/self/ns/pid) that is gone (kill(pid, 0) fails with ESRCH,
//   or /proc/PID/stat says zombie), the acquire script replaces exactly that token. A standby
//   sleeps on the holder's pidfd, so this takes milliseconds. A reused pid only delays the
//   failover to the ttl; a process moved to another kernel (CRIU) would defeat it.
#pragma once

#include <sys/random.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <system_error>

#include <fmt/format.h>

#include "process_identity.hpp"

namespace workerlock::detail {

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
    p.suffix = fmt::format(":{}:{}:{}:{}", boot_id(), identity.pid_namespace, me, identity.host);
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
  const auto& boot = boot_id();
  if (boot.empty() || fields[1] != boot) return 0;
  if (fields[2] != std::to_string(current_identity().pid_namespace)) return 0;
  pid_t pid = 0;
  const char* end = fields[3].data() + fields[3].size();
  const auto parsed = std::from_chars(fields[3].data(), end, pid);
  if (parsed.ec != std::errc() || parsed.ptr != end || pid <= 0 || pid == ::getpid()) return 0;
  return pid;
}

}  // namespace workerlock::detail
