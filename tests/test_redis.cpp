// Tests of RedisBackend (workerlock/redis.hpp) against a real redis-server started by
// tests/redis_server.hpp, with forked processes and a shared-memory checker. Skipped, with a
// warning, when redis-server is not installed.

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <workerlock/coordinator.hpp>
#include <workerlock/redis.hpp>

#include "support/clock.hpp"
#include "support/common.hpp"
#include "support/network_lab.hpp"
#include "support/partition_lab.hpp"
#include "support/raw_fork.hpp"
#include "support/redis_server.hpp"

namespace {

using namespace std::chrono_literals;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::lock_error;
using workerlock::RedisBackend;
using workerlock::RedisOptions;
using workerlock::Role;

#define WL_REQUIRE_REDIS_SERVER() \
  WLTEST_REQUIRE_SERVER(wltest::RedisServer, "WORKERLOCK_REQUIRE_REDIS")

using wltest::index_of;
using wltest::mono_ns;
using wltest::ms_between;
using wltest::quiet_coordinator_options;

//! A key of its own for each test, so they never see each other's leases.
std::string fresh_key(const char* name) {
  static int counter = 0;
  return fmt::format("wltest:{}:{}:{}", name, ::getpid(), ++counter);
}

//! fresh_key(name) with a fencing counter, so the first acquisition is not quarantined (a
//! fresh key looks like data loss), with a value from the server's clock as the script would use.
std::string seeded_key(const wltest::RedisServer& server, const char* name) {
  auto key = fresh_key(name);
  server.command({"SET", key + ":fence", "1000"});
  return key;
}

RedisOptions options_for(const wltest::RedisServer& server, const std::string& key,
                         std::chrono::milliseconds ttl = 1000ms) {
  RedisOptions o;
  o.url = server.url();
  o.key = key;
  o.ttl = ttl;
  // Slack for a loaded machine (CI runners, sanitizers): V + C = ttl/3 + ttl/2 <= ttl - D.
  o.command_timeout = ttl / 2;
  o.connect_timeout = 2000ms;
  return o;
}

//! try_acquire() for polling loops: a timeout (a load spike of a busy test machine) counts as
//! "not yet"; every other error propagates.
bool try_acquire_or_timeout(RedisBackend& backend) {
  try {
    return backend.try_acquire();
  } catch (const lock_error& e) {
    if (e.code() != std::errc::timed_out) throw;
    WARN("try_acquire() timed out, retrying: " << e.what());
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// The checker, in shared memory: who is primary, and in which order roles changed.
// ---------------------------------------------------------------------------------------------

struct Event {
  std::atomic<std::int64_t> t{0};
  std::atomic<int> pid{0};
  std::atomic<int> kind{0};  // 1 promoted, 2 demoted, 3 killed by the test
  std::atomic<std::uint64_t> fence{0};
};

struct Checker {
  std::atomic<int> holder{0};             // pid of the primary, 0 when none
  std::atomic<int> overlaps{0};           // promoted while another live process was primary
  std::atomic<int> foreign_demotions{0};  // demoted while not recorded as the holder
  std::atomic<int> fence_violations{0};   // a fencing token not above every earlier one
  std::atomic<int> zero_fences{0};
  std::atomic<int> promotions{0};
  std::atomic<int> demotions{0};
  std::atomic<std::int64_t> last_demoted_ns{0};
  std::atomic<std::int64_t> last_promoted_ns{0};
  std::atomic<std::int64_t> killed_ns{0};
  std::atomic<std::int64_t> min_gap_ns{std::numeric_limits<std::int64_t>::max()};
  // on_demoted's time minus the backend's valid_until(): the largest seen. Redis keeps the key
  // until at least valid_until + drift_margin, so this must stay below the drift margin.
  std::atomic<std::int64_t> worst_demotion_after_lease_ns{std::numeric_limits<std::int64_t>::min()};
  std::atomic<std::uint64_t> max_fence{0};
  std::atomic<bool> stop[16];
  std::atomic<int> nevents{0};
  Event events[512];

  Checker() {
    for (auto& s : stop) s.store(false);
  }

  void log(int kind, int pid, std::uint64_t fence, std::int64_t t) {
    const int i = nevents.fetch_add(1);
    if (i >= 512) return;
    events[i].t.store(t);
    events[i].pid.store(pid);
    events[i].kind.store(kind);
    events[i].fence.store(fence);
  }

  //! on_promoted: CAS from 0 (or from a holder the test killed, which holds nothing).
  void promoted(int pid, std::uint64_t fence) {
    int expected = 0;
    while (!holder.compare_exchange_strong(expected, pid)) {
      if (expected != 0 && workerlock::detail::process_is_gone(expected)) continue;
      overlaps.fetch_add(1);
      holder.store(pid);
      break;
    }
    const auto now = mono_ns();
    const auto previous = std::max(last_demoted_ns.load(), killed_ns.load());
    if (previous != 0) {
      const auto gap = now - previous;
      auto best = min_gap_ns.load();
      while (gap < best && !min_gap_ns.compare_exchange_weak(best, gap)) {
      }
    }
    if (fence == 0) zero_fences.fetch_add(1);
    if (fence <= max_fence.load()) fence_violations.fetch_add(1);
    max_fence.store(std::max(max_fence.load(), fence));
    last_promoted_ns.store(now);
    promotions.fetch_add(1);
    log(1, pid, fence, now);
  }

  //! on_demoted: record the time, then store 0 (the lease is released only after this).
  void demoted(int pid, std::int64_t valid_until_ns) {
    const auto now = mono_ns();
    auto worst = worst_demotion_after_lease_ns.load();
    while (now - valid_until_ns > worst &&
           !worst_demotion_after_lease_ns.compare_exchange_weak(worst, now - valid_until_ns)) {
    }
    last_demoted_ns.store(now);
    demotions.fetch_add(1);
    log(2, pid, 0, now);
    int expected = pid;
    if (!holder.compare_exchange_strong(expected, 0)) foreign_demotions.fetch_add(1);
  }

  std::string dump() const {
    std::string out = fmt::format(
        "promotions={} demotions={} overlaps={} foreign_demotions={} fence_violations={} "
        "zero_fences={}\n",
        promotions.load(), demotions.load(), overlaps.load(), foreign_demotions.load(),
        fence_violations.load(), zero_fences.load());
    const int n = std::min(nevents.load(), 512);
    const std::int64_t t0 = n > 0 ? events[0].t.load() : 0;
    for (int i = 0; i < n; ++i) {
      static const char* names[] = {"?", "promoted", "demoted", "killed"};
      out += fmt::format("  {:9.3f} ms pid={} {} fence={}\n", ms_between(t0, events[i].t.load()),
                         events[i].pid.load(), names[events[i].kind.load() & 3],
                         events[i].fence.load());
    }
    return out;
  }
};

//! A child running a Coordinator on a RedisBackend until checker.stop[index]; exit codes:
//! 0 fine, 3 start() threw.
int coordinator_child(const RedisOptions& options, Checker& checker, int index,
                      wltest::StartLine* line = nullptr) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a test process that was killed
  Coordinator c(std::make_unique<RedisBackend>(options), quiet_coordinator_options());
  const int me = static_cast<int>(::getpid());
  c.on_promoted([&] { checker.promoted(me, c.fencing_token()); });
  c.on_demoted([&] {
    const auto& backend = dynamic_cast<const RedisBackend&>(c.backend());
    checker.demoted(me, std::chrono::duration_cast<std::chrono::nanoseconds>(
                            backend.valid_until().time_since_epoch())
                            .count());
  });
  if (line != nullptr) line->arrive_and_wait();
  try {
    c.start();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child %d: start() threw: %s\n", me, e.what());
    return 3;
  }
  while (!checker.stop[index].load()) std::this_thread::sleep_for(1ms);
  c.stop();
  return 0;
}

//! Forks `n` coordinator children.
std::vector<pid_t> spawn_coordinators(int n, const RedisOptions& options, Checker& checker,
                                      wltest::StartLine* line = nullptr) {
  std::vector<pid_t> pids;
  for (int i = 0; i < n; ++i)
    pids.push_back(
        wltest::fork_child([&, i] { return coordinator_child(options, checker, i, line); }));
  return pids;
}

void stop_all(Checker& checker, int n) {
  for (int i = 0; i < n; ++i) checker.stop[i].store(true);
}

}  // namespace

// =============================================================================================
// Configuration, no server needed
// =============================================================================================

TEST_CASE("redis: URL parsing", "[redis]") {
  using workerlock::detail::parse_redis_url;
  using workerlock::detail::redis_url;
  redis_url url;
  std::string why;

  REQUIRE(parse_redis_url("redis://127.0.0.1", url, why));
  CHECK(url.host == "127.0.0.1");
  CHECK(url.port == 6379);
  CHECK(url.db == 0);
  CHECK(!url.unix_socket);

  REQUIRE(parse_redis_url("redis://cache.example:7000/3", url, why));
  CHECK(url.host == "cache.example");
  CHECK(url.port == 7000);
  CHECK(url.db == 3);

  REQUIRE(parse_redis_url("REDIS://:p%40ss%2Fw@h:1/2", url, why));
  CHECK(url.username.empty());
  CHECK(url.password == "p@ss/w");
  CHECK(url.redacted() == "redis://:***@h:1/2");

  REQUIRE(parse_redis_url("redis://app:pw@h", url, why));
  CHECK(url.username == "app");
  CHECK(url.password == "pw");
  CHECK(url.redacted() == "redis://app:***@h:6379/0");

  REQUIRE(parse_redis_url("redis://[::1]:6380/1", url, why));
  CHECK(url.host == "::1");
  CHECK(url.port == 6380);
  CHECK(url.redacted() == "redis://[::1]:6380/1");

  REQUIRE(parse_redis_url("unix:///run/redis/redis.sock?db=2", url, why));
  CHECK(url.unix_socket);
  CHECK(url.socket_path == "/run/redis/redis.sock");
  CHECK(url.db == 2);

  REQUIRE(parse_redis_url("redis+unix://:pw@/tmp/r.sock", url, why));
  CHECK(url.socket_path == "/tmp/r.sock");
  CHECK(url.password == "pw");

  // What liburiparser reads (RFC 3986): percent-encoding anywhere, IPv6 literals and zones.
  REQUIRE(parse_redis_url("redis://us%3Aer:p%40ss%3Fw%23rd%25:x@h", url, why));
  CHECK(url.username == "us:er");
  CHECK(url.password == "p@ss?w#rd%:x");
  CHECK(url.redacted() == "redis://us:er:***@h:6379/0");
  // Unencoded '@', '/' and '[' in the password: the user info runs to the last '@' before
  // '?' (as redis-cli reads it).
  REQUIRE(parse_redis_url("redis://:p@ss/w[1]@h:1/2", url, why));
  CHECK(url.password == "p@ss/w[1]");
  CHECK(url.host == "h");
  CHECK(url.db == 2);
  REQUIRE(parse_redis_url("redis://[::ffff:192.0.2.1]:7000", url, why));
  CHECK(url.host == "::ffff:192.0.2.1");
  CHECK(url.redacted() == "redis://[::ffff:192.0.2.1]:7000/0");
  REQUIRE(parse_redis_url("redis://[fe80::1%25eth0]:6379/2", url, why));  // RFC 6874
  CHECK(url.host == "fe80::1%eth0");                                      // for getaddrinfo()
  CHECK(url.redacted() == "redis://[fe80::1%eth0]:6379/2");
  REQUIRE(parse_redis_url("redis://[fe80::1%eth0]", url, why));  // the zone unencoded
  CHECK(url.host == "fe80::1%eth0");
  REQUIRE(parse_redis_url("unix:///tmp/my%20redis.sock?db=%31", url, why));
  CHECK(url.socket_path == "/tmp/my redis.sock");
  CHECK(url.db == 1);
  REQUIRE(parse_redis_url("redis://h?", url, why));  // an empty query
  CHECK(url.db == 0);

  const char* bad[][2] = {
      {"", "empty"},
      {"localhost:6379", "no scheme"},
      {"http://h", "unknown scheme"},
      {"rediss://h", "TLS"},
      {"redis://", "host is empty"},
      {"redis://:6379", "host is empty"},
      {"redis://h:0", "bad port"},
      {"redis://h:65536", "bad port"},
      {"redis://h:http", "bad port"},
      {"redis://h:", "port after ':' is empty"},
      {"redis://h/x", "bad database"},
      {"redis://h/-1", "bad database"},
      {"redis://user@h", "user name without a password"},
      {"redis://user:@h", "password after ':' is empty"},
      {"redis://::1:6379", "brackets"},
      {"redis://[::1", "without ']'"},
      {"unix://relative.sock", "absolute"},
      {"redis://h?timeout=1", "query parameter"},
      {"redis://h/1?db=2", "twice"},
      {"redis://:%zz@h", "percent-encoding"},
      {"redis://:ab%4@h", "percent-encoding"},
      {"redis://h#x", "fragment"},
      {"redis://bad host", "bad character"},
      {"redis://[zzz]", "bad IPv6 address"},
      {"redis://[::1;x]:1", "bad character in the host name"},
      {"redis://[v1.x]", "IPvFuture"},
      {"redis://[fe80::1%]:1", "bad IPv6 zone"},
      {"redis://[fe80::1%e;t]", "bad IPv6 zone"},
      {"redis://[::1]:x", "bad port"},
      {"redis://[::1]x", "expected ':port' after ']'"},
      {"redis://h:1:2", "brackets"},
      {"unix:///tmp/a b", "socket path: percent-encode"},
      {"unix:///tmp/a%00b", "NUL byte"},
      {"unix://:pw@relative.sock", "absolute"},
      {"redis://h?db", "query parameter"},
      {"redis://h?db=", "the value of ?db= must be a number"},
  };
  for (const auto& [text, expected] : bad) {
    INFO("URL: '" << text << "'");
    why.clear();
    CHECK_FALSE(parse_redis_url(text, url, why));
    CHECK_THAT(why, Catch::Contains(expected));
  }

  // Messages never show a password, even from a URL that does not parse.
  using workerlock::detail::redact_raw_url;
  CHECK(redact_raw_url("redis://u:topsecret@h:x") == "redis://u:***@h:***");
  CHECK(redact_raw_url("redis://:top/secret@h:x") == "redis://:***@h:***");
  CHECK(redact_raw_url("redis://h:1") == "redis://h:1");
  // An unencoded '@' in the password: masked up to the last '@' of the authority.
  CHECK(redact_raw_url("redis://u:sec@ret@h:6379") == "redis://u:***@h:6379");
  // Query values: only db=N is shown; a value not understood never is.
  CHECK(redact_raw_url("redis://h:6379/0?password=secret1") == "redis://h:6379/0?password=***");
  CHECK(redact_raw_url("redis://h:6379?db=1&password=secret1") ==
        "redis://h:6379?db=1&password=***");
  CHECK(redact_raw_url("redis://h?db=secret1") == "redis://h?db=***");
  CHECK(redact_raw_url("redis://h?secret1") == "redis://h?***");
  CHECK(redact_raw_url("redis://h?pass%20word=secret1#secret2") == "redis://h?***#***");
  CHECK(redact_raw_url("unix:///tmp/r.sock?db=2&auth=secret1") ==
        "unix:///tmp/r.sock?db=2&auth=***");
  CHECK(redact_raw_url("redis://:pw@h/0?password=secret1") == "redis://:***@h/0?password=***");
  // An '@' after '?' or '#': a password with those characters, or an '@' in a query value.
  CHECK(redact_raw_url("redis://:sec?ret@h") == "redis://***");
  CHECK(redact_raw_url("redis://h/0?password=sec@ret1") == "redis://***");
  // A part that is not what it should be may hold a password: only a host name, a port or
  // database of digits, a plain socket path and a scheme-shaped scheme are shown.
  CHECK(redact_raw_url("redis://[::1]:6380/2") == "redis://[::1]:6380/2");
  CHECK(redact_raw_url("redis://h:1/") == "redis://h:1/");
  CHECK(redact_raw_url("redis://h/0&password=secret9") == "redis://h/***");
  CHECK(redact_raw_url("redis://h:63x79?password=secret10") == "redis://h:***?password=***");
  CHECK(redact_raw_url("redis://h/db0secret11") == "redis://h/***");
  CHECK(redact_raw_url("redis://h&password=secret12") == "redis://***");
  CHECK(redact_raw_url("redis://[::1]secret13") == "redis://[::1]***");
  CHECK(redact_raw_url("redis://[::1;secret14]:1") == "redis://[***]:1");
  CHECK(redact_raw_url("unix:///tmp/r.sock&password=secret15") == "unix://***");
  CHECK(redact_raw_url("secret16") == "***");
  CHECK(redact_raw_url("redis:secret17@h://x") == "***://x");

  // `why` quotes no part of the URL that is not what it should be; digits it does quote.
  const char* leaky[][3] = {
      {"redis://h/0&password=secret9", "secret9", "bad database: the database after '/'"},
      {"redis://h:63x79?password=secret10", "63x79", "bad port: the port after ':'"},
      {"redis://h/db0secret11", "secret11", "bad database: the database after '/'"},
      {"redis://u:secret13?x@h", "secret13", "bad port: the port after ':'"},
      {"redis://h?db=secret15", "secret15", "bad database: the value of ?db="},
      {"redis://h&password=secret18", "secret18", "bad character in the host name"},
      {"redis:secret17@h://x", "secret17", "unknown scheme before '://'"},
  };
  for (const auto& [text, secret, expected] : leaky) {
    INFO("URL: '" << text << "'");
    why.clear();
    CHECK_FALSE(parse_redis_url(text, url, why));
    CHECK_THAT(why, Catch::StartsWith(expected));
    CHECK_THAT(why, !Catch::Contains(secret));
  }
  CHECK_FALSE(parse_redis_url("redis://h:65536", url, why));
  CHECK_THAT(why, Catch::Contains("bad port 65536"));
  CHECK_FALSE(parse_redis_url("redis://h/10000000", url, why));
  CHECK_THAT(why, Catch::Contains("bad database 10000000"));
  CHECK_FALSE(parse_redis_url("http://h", url, why));
  CHECK_THAT(why, Catch::Contains("unknown scheme 'http'"));
}

TEST_CASE("redis: a refused URL's password never shows in what(), target() or describe()",
          "[redis]") {
  struct Case {
    const char* url;
    const char* secret;
    const char* shown;  // the start of target()
    const char* wrong;  // what what() says is wrong
  };
  const Case cases[] = {
      {"redis://127.0.0.1:6379/0?password=secret1", "secret1",
       "redis://127.0.0.1:6379/0?password=*** key=", "query parameter"},
      {"redis://127.0.0.1:6379?db=1&password=secret2", "secret2",
       "redis://127.0.0.1:6379?db=1&password=*** key=", "query parameter"},
      {"redis://127.0.0.1:6379?auth=secret3", "secret3",
       "redis://127.0.0.1:6379?auth=*** key=", "query parameter"},
      {"redis://u:sec@ret4@127.0.0.1:notaport", "ret4",
       "redis://u:***@127.0.0.1:*** key=", "bad port"},
      {"redis://127.0.0.1/0?password=sec@ret5", "ret5", "redis://*** key=", "query parameter"},
      {"redis://127.0.0.1:6379/0#secret6", "secret6",
       "redis://127.0.0.1:6379/0#*** key=", "fragment"},
      // A part that is not what it should be (a port or database not all digits) may hold a
      // password: neither the reason nor target() quotes it.
      {"redis://127.0.0.1/0&password=secret9", "secret9",
       "redis://127.0.0.1/*** key=", "the database after '/' must be a number"},
      {"redis://127.0.0.1:63x79?password=secret10", "secret10",
       "redis://127.0.0.1:***?password=*** key=", "the port after ':' must be a number"},
      {"redis://127.0.0.1:63x79?password=secret10", "63x79",
       "redis://127.0.0.1:***?password=*** key=", "the port after ':' must be a number"},
      {"redis://127.0.0.1/db0secret11", "secret11",
       "redis://127.0.0.1/*** key=", "the database after '/' must be a number"},
      {"redis://127.0.0.1&password=secret12", "secret12",
       "redis://*** key=", "bad character in the host name"},
      {"redis://u:secret13?x@127.0.0.1", "secret13",
       "redis://*** key=", "the port after ':' must be a number"},
      {"redis://127.0.0.1?db=secret15", "secret15",
       "redis://127.0.0.1?db=*** key=", "the value of ?db= must be a number"},
      {"secret16", "secret16", "*** key=", "no scheme"},
  };
  for (const auto& c : cases) {
    INFO("URL: " << c.url);
    RedisOptions o;
    o.url = c.url;
    RedisBackend backend(o);
    CHECK_THAT(backend.network_target(), Catch::StartsWith(c.shown));
    CHECK_THAT(backend.network_target(), !Catch::Contains(c.secret));
    CHECK_THAT(backend.describe(), !Catch::Contains(c.secret));
    CHECK_THAT(backend.redacted_url(), !Catch::Contains(c.secret));
    try {
      backend.prepare();
      FAIL("prepare() did not throw");
    } catch (const lock_error& e) {
      CHECK(e.code() == workerlock::errc::bad_configuration);
      CHECK_THAT(e.what(), !Catch::Contains(c.secret));
      CHECK_THAT(e.what(), Catch::Contains(c.wrong));
      CHECK_THAT(e.target(), !Catch::Contains(c.secret));
    }
  }
  // A URL that parses, with an unencoded '@' in the password.
  RedisOptions o;
  o.url = "redis://u:sec@ret7@127.0.0.1:6379/0";
  RedisBackend backend(o);
  CHECK(backend.redacted_url() == "redis://u:***@127.0.0.1:6379/0");
  CHECK_THAT(backend.describe(), !Catch::Contains("ret7"));
}

TEST_CASE(
    "redis: bad configuration is a lock_error from prepare(), try_acquire() and "
    "Coordinator::start()",
    "[redis]") {
  const auto expect_error = [](const RedisOptions& o, const char* text) {
    wltest::check_bad_configuration<RedisBackend>(o, text,
                                                  [](const RedisBackend&, const lock_error&) {});
  };

  RedisOptions o;
  o.url = "redis://:topsecret@127.0.0.1:notaport/0";
  expect_error(o, "bad port: the port after ':' must be a number");
  {
    RedisBackend backend(o);
    CHECK(backend.describe() == "redis=redis://:***@127.0.0.1:***/0 key=workerlock:primary");
  }

  o.url = "rediss://:topsecret@127.0.0.1:6379";
  expect_error(o, "TLS");

  o.url = "redis://127.0.0.1:6379";
  o.ttl = 1000ms;
  o.command_timeout = 900ms;
  expect_error(o, "must not exceed ttl");

  o = RedisOptions{};
  o.url = "redis://127.0.0.1:6379";
  o.ttl = 5ms;
  expect_error(o, "at least 10 ms");

  // No URL anywhere; then the URL from the environment.
  {
    wltest::ScopedEnvironmentVariable url_variable("WORKERLOCK_REDIS_URL", nullptr);
    expect_error(RedisOptions{}, "no Redis URL");
    url_variable.set("redis://10.1.2.3:7777/4");
    RedisBackend backend(RedisOptions{});
    CHECK(backend.options().url == "redis://10.1.2.3:7777/4");
    CHECK(backend.redacted_url() == "redis://10.1.2.3:7777/4");
    CHECK_NOTHROW(backend.prepare());
  }

  // The defaults derived from the ttl.
  RedisOptions d;
  d.url = "redis://h";
  d.ttl = 10000ms;
  RedisBackend backend(d);
  CHECK(backend.options().verify_interval == 3333ms);
  CHECK(backend.options().drift_margin == 1002ms);
  CHECK(backend.options().command_timeout == 2000ms);
  CHECK(backend.options().connect_timeout == 2000ms);
  CHECK(backend.options().poll_interval == 1000ms);
  CHECK(backend.verify_interval() == 3333ms);
}

// =============================================================================================
// Errors against real endpoints
// =============================================================================================

TEST_CASE("redis: refused, unknown host and wrong password are clear lock_errors, never primary",
          "[redis]") {
  const auto expect_failure = [](const RedisOptions& o, std::errc code,
                                 std::vector<std::string> texts, const std::string& secret) {
    RedisBackend backend(o);
    try {
      backend.try_acquire();
      FAIL("try_acquire() did not throw");
    } catch (const lock_error& e) {
      INFO("what(): " << e.what());
      CHECK(e.code() == code);
      for (const auto& t : texts) CHECK_THAT(e.what(), Catch::Contains(t));
      if (!secret.empty()) CHECK_THAT(e.what(), !Catch::Contains(secret));
    }
    CHECK_FALSE(backend.held());
    CHECK(backend.fencing_token() == 0);
    Coordinator c(std::make_unique<RedisBackend>(o), quiet_coordinator_options());
    CHECK_THROWS_AS(c.start(), lock_error);
    CHECK(c.role() == Role::secondary);
  };

  SECTION("connection refused") {
    const int port = wltest::free_loopback_port();
    RedisOptions o;
    o.url = fmt::format("redis://:topsecret@127.0.0.1:{}/0", port);
    expect_failure(o, std::errc::connection_refused,
                   {"cannot acquire the lease on", fmt::format("redis://:***@127.0.0.1:{}/0", port),
                    "connection refused", "is redis-server running"},
                   "topsecret");
  }

  SECTION("unknown host") {
    RedisOptions o;
    o.url = "redis://no-such-host.invalid:6379";
    o.command_timeout = 500ms;
    expect_failure(o, std::errc::host_unreachable,
                   {"redis://no-such-host.invalid:6379/0", "cannot resolve the host name"}, "");
  }

  SECTION("a socket path where nothing listens") {
    RedisOptions o;
    o.url = "unix:///nonexistent/workerlock-test.sock";
    expect_failure(o, std::errc::no_such_file_or_directory,
                   {"unix:///nonexistent", "no such socket"}, "");
  }

  SECTION("password problems") {
    WL_REQUIRE_REDIS_SERVER();
    wltest::RedisServer server({"s3cret-pw", {}});
    RedisOptions o;
    o.key = fresh_key("auth");
    o.quarantine_after_data_loss = false;

    o.url = fmt::format("redis://:hunter2-wrong@127.0.0.1:{}/0", server.port());
    expect_failure(o, std::errc::permission_denied,
                   {"redis://:***@127.0.0.1", "refused the user name or password", "WRONGPASS"},
                   "hunter2-wrong");

    o.url = fmt::format("redis://nobody:hunter2-wrong@127.0.0.1:{}/0", server.port());
    expect_failure(o, std::errc::permission_denied, {"redis://nobody:***@", "WRONGPASS"},
                   "hunter2-wrong");

    o.url = fmt::format("redis://127.0.0.1:{}/0", server.port());
    expect_failure(o, std::errc::permission_denied, {"requires a password", "NOAUTH"}, "");

    o.url = fmt::format("redis://127.0.0.1:{}/5", server.port());
    expect_failure(o, std::errc::permission_denied, {"requires a password"}, "");

    // The right password: in the URL, and through the options.
    o.url = server.url();
    RedisBackend a(o);
    CHECK(a.try_acquire());
    a.release();
    o.url = fmt::format("redis://127.0.0.1:{}/0", server.port());
    o.password = "s3cret-pw";
    RedisBackend b(o);
    CHECK(b.try_acquire());
    CHECK(b.describe().find("s3cret") == std::string::npos);
  }

  SECTION("a password with special characters, percent-encoded or as redis-cli reads it") {
    WL_REQUIRE_REDIS_SERVER();
    const std::string password = "p@ss/w?rd#50%:x";
    wltest::RedisServer server({password, {}});
    RedisOptions o;
    o.key = fresh_key("special-pw");
    o.quarantine_after_data_loss = false;
    for (const char* written : {"p%40ss%2Fw%3Frd%2350%25%3Ax", "p@ss/w%3Frd%2350%25:x"}) {
      INFO("password as written: " << written);
      o.url = fmt::format("redis://:{}@127.0.0.1:{}/0", written, server.port());
      RedisBackend backend(o);
      CHECK(backend.redacted_url() == fmt::format("redis://:***@127.0.0.1:{}/0", server.port()));
      CHECK(backend.try_acquire());
      backend.release();
    }
    o.url = fmt::format("redis://:p@ss/w%3Frd%2350%25:y@127.0.0.1:{}/0", server.port());
    expect_failure(o, std::errc::permission_denied, {"WRONGPASS"}, "rd%2350");
  }

  SECTION("a password the server does not have, a database it does not have") {
    WL_REQUIRE_REDIS_SERVER();
    wltest::RedisServer server;
    RedisOptions o;
    o.key = fresh_key("nopass");
    o.url = fmt::format("redis://:extra-pw@127.0.0.1:{}/0", server.port());
    expect_failure(o, std::errc::permission_denied, {"server has none configured"}, "extra-pw");
    o.url = fmt::format("redis://127.0.0.1:{}/999", server.port());
    expect_failure(o, std::errc::invalid_argument, {"refused the database number"}, "");
  }
}

// =============================================================================================
// The lease itself
// =============================================================================================

TEST_CASE("redis: acquire, renew, release, expiry and fencing tokens", "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "basics");
  const auto o = options_for(server, key);
  RedisBackend a(o);
  RedisBackend b(o);

  REQUIRE(a.try_acquire());
  CHECK(a.held());
  CHECK(a.lease_valid());
  const auto fa = a.fencing_token();
  CHECK(fa > 1000);
  CHECK(server.command({"GET", key}) == a.token());
  const auto pttl = std::stol(server.command({"PTTL", key}));
  CHECK(pttl > 900);
  CHECK(pttl <= 1000);
  CHECK_FALSE(b.try_acquire());
  CHECK(b.fencing_token() == 0);
  a.release();
  CHECK_FALSE(a.held());
  CHECK(a.fencing_token() == 0);
  CHECK(server.command({"EXISTS", key}) == "0");
  REQUIRE(b.try_acquire());
  const auto fb = b.fencing_token();
  CHECK(fb > fa);
  b.release();

  SECTION("renewals keep the lease for longer than one ttl") {
    REQUIRE(a.try_acquire());
    const auto f1 = a.fencing_token();
    const auto until = std::chrono::steady_clock::now() + 1500ms;
    while (std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(a.verify_interval());
      REQUIRE(a.verify_held());
      CHECK_FALSE(b.try_acquire());
    }
    CHECK(a.fencing_token() == f1);  // renewals keep the token
    a.release();
  }

  SECTION("an expired lease: the late holder neither renews nor deletes the next one") {
    REQUIRE(a.try_acquire());
    const auto f1 = a.fencing_token();
    std::this_thread::sleep_for(1100ms);  // no renewal: the key expires
    CHECK_FALSE(a.lease_valid());
    REQUIRE(b.try_acquire());
    CHECK(b.fencing_token() > f1);
    CHECK_FALSE(a.verify_held());  // past valid_until(): lost, without asking the server
    a.release();                   // compare-then-DEL: must not delete b's key
    CHECK(server.command({"GET", key}) == b.token());
    CHECK(b.verify_held());
    b.release();
  }

  SECTION("a lease taken over: verify_held() returns false") {
    REQUIRE(a.try_acquire());
    server.command({"SET", key, "someone-else", "PX", "5000"});
    CHECK_FALSE(a.verify_held());
    a.release();
    CHECK(server.command({"GET", key}) == "someone-else");
  }

  SECTION("our own token in the key (an attempt whose reply was lost) is adopted") {
    server.command({"SET", key, a.token(), "PX", "5000"});
    REQUIRE(a.try_acquire());
    CHECK(a.fencing_token() > fb);
    CHECK(std::stol(server.command({"PTTL", key})) <= 1000);
    const auto old_token = a.token();
    a.release();
    CHECK(a.token() != old_token);  // every hold has its own token
  }

  SECTION("SCRIPT FLUSH: EVALSHA falls back to EVAL") {
    REQUIRE(a.try_acquire());
    server.command({"SCRIPT", "FLUSH"});
    CHECK(a.verify_held());
    a.release();
    server.command({"SCRIPT", "FLUSH"});
    REQUIRE(b.try_acquire());
    b.release();
  }

  SECTION("a unix socket") {
    const wltest::TempDir dir;
    const auto path = (dir / "redis.sock").native();
    wltest::RedisServer with_socket({"", {"--unixsocket", path, "--unixsocketperm", "700"}});
    RedisOptions u = o;
    u.url = "unix://" + path;
    u.quarantine_after_data_loss = false;
    RedisBackend c(u);
    REQUIRE(c.try_acquire());
    CHECK(c.verify_held());
    c.release();
  }
}

TEST_CASE("redis: a fresh key or lost data keeps everybody out for one ttl (quarantine)",
          "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = fresh_key("quarantine");
  const auto o = options_for(server, key, 500ms);
  RedisBackend a(o);
  RedisBackend b(o);

  const auto t0 = std::chrono::steady_clock::now();
  CHECK_FALSE(a.try_acquire());  // no fencing counter: as after a restart without persistence
  CHECK(server.command({"GET", key}) == "workerlock-quarantine");
  REQUIRE(wltest::eventually([&] { return try_acquire_or_timeout(a); }, 5s));
  CHECK(std::chrono::steady_clock::now() - t0 >= 450ms);
  const auto f1 = a.fencing_token();
  CHECK(f1 > 1000000000000000ULL);  // seeded from Redis's TIME in microseconds

  server.command({"FLUSHALL"});
  CHECK_FALSE(a.verify_held());
  a.release();
  CHECK_FALSE(b.try_acquire());
  REQUIRE(wltest::eventually([&] { return try_acquire_or_timeout(b); }, 5s));
  CHECK(b.fencing_token() > f1);
  b.release();

  RedisOptions off = o;
  off.quarantine_after_data_loss = false;
  off.key = fresh_key("no-quarantine");
  RedisBackend c(off);
  CHECK(c.try_acquire());
}

TEST_CASE("redis: a renewal never outlives the lease", "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "deadline");
  auto o = options_for(server, key);
  o.verify_interval = 100ms;
  o.command_timeout = 790ms;  // 100 + 790 <= 1000 - 102
  RedisBackend a(o);
  REQUIRE(a.try_acquire());
  const auto until = a.valid_until();
  // valid_until - now - command_timeout = 108 ms - (time since the acquisition): at most V.
  CHECK(a.verify_interval() <= 100ms);

  server.command({"CLIENT", "PAUSE", "2000"});
  std::this_thread::sleep_until(until - 300ms);
  CHECK(a.verify_interval() == 0ms);  // less than command_timeout left
  const auto before = std::chrono::steady_clock::now();
  CHECK_THROWS_AS(a.verify_held(), lock_error);
  const auto after = std::chrono::steady_clock::now();
  const auto late = std::chrono::duration_cast<std::chrono::microseconds>(after - until);
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(after - before);
  WARN(
      fmt::format("renewal against a paused Redis gave up {:.2f} ms after valid_until, after {} ms "
                  "(command_timeout 790 ms)",
                  static_cast<double>(late.count()) / 1000.0, waited.count()));
  CHECK(late < 250ms);    // without the cut-off: ~490 ms late (now + command_timeout)
  CHECK(waited < 750ms);  // cut at valid_until, not the whole command_timeout (790 ms)
  CHECK_FALSE(a.lease_valid());
}

TEST_CASE("redis: Interrupter::interrupt() ends wait_acquire() promptly, even mid-command",
          "[redis][threads]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "interrupt");
  auto o = options_for(server, key, 20000ms);  // the holder's lease outlasts the pause below
  o.poll_interval = 5000ms;  // without the wake-up, a sleeping waiter would return ~4.8 s late
  RedisBackend holder(o);
  REQUIRE(holder.try_acquire());
  RedisBackend waiter(o);
  workerlock::Interrupter interrupter;

  const auto wait_and_interrupt = [&](std::chrono::milliseconds after) {
    std::atomic<int> result{-1};
    std::atomic<std::int64_t> returned{0};
    interrupter.clear();
    std::thread t([&] {
      result.store(waiter.wait_acquire(interrupter) ? 1 : 0);
      returned.store(mono_ns());
    });
    std::this_thread::sleep_for(after);
    const auto interrupted = mono_ns();
    interrupter.interrupt();
    t.join();
    CHECK(result.load() == 0);
    return ms_between(interrupted, returned.load());
  };

  const double idle = wait_and_interrupt(150ms);
  CHECK(idle < 1500);                           // woken, not at the end of its 5 s sleep
  server.command({"CLIENT", "PAUSE", "3000"});  // the waiter's next attempt hangs in Redis
  const double busy = wait_and_interrupt(600ms);
  CHECK(busy < 1000);  // cut short, not at the end of the pause (~2.4 s later)
  WARN(
      fmt::format("interrupt() -> wait_acquire() returned: {:.2f} ms while sleeping, {:.2f} ms "
                  "while a command hung in a paused Redis",
                  idle, busy));
  waiter.release();  // cleans up the attempt of unknown outcome (waits for the pause)
  CHECK(server.command({"GET", key}) == holder.token());
  holder.release();
  CHECK(waiter.try_acquire());
}

TEST_CASE("redis: the startup barrier: on_startup runs once per generation, kept in <key>:startup",
          "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "startup");
  const auto o = options_for(server, key);
  std::atomic<int> startups{0};
  const auto run = [&](const char* generation, workerlock::WaitMode mode) {
    INFO("generation " << generation);
    auto co = quiet_coordinator_options();
    co.wait = mode;
    co.startup_generation = generation;
    Coordinator c(std::make_unique<RedisBackend>(o), co);
    std::atomic<int> promotions{0};
    c.on_startup([&] { startups.fetch_add(1); });
    c.on_promoted([&] { promotions.fetch_add(1); });
    c.start();
    REQUIRE(wltest::eventually(
        [&] {
          c.poll();  // does nothing in WaitMode::background_thread
          return promotions.load() == 1;
        },
        10s));
    CHECK(c.wait_for_startup(0ms));
    CHECK(server.command({"GET", key + ":startup"}) == generation);
    c.stop();
  };
  run("generation-1", workerlock::WaitMode::background_thread);
  CHECK(startups.load() == 1);
  run("generation-1", workerlock::WaitMode::polled);  // completed: not run again
  CHECK(startups.load() == 1);
  run("generation-2", workerlock::WaitMode::background_thread);
  CHECK(startups.load() == 2);

  // A standby reads the record from any thread; a bad generation is refused at once.
  RedisBackend backend(o);
  const auto marker = backend.startup_barrier("generation-2");
  REQUIRE(marker != nullptr);
  CHECK(marker->completed());
  // A child of fork() reads it on a connection of its own; the parent's stays usable.
  const pid_t child = wltest::fork_child([&] { return marker->completed() ? 0 : 1; });
  CHECK(wltest::wait_exit_code(child) == 0);
  CHECK(marker->completed());
  CHECK_FALSE(backend.startup_barrier("generation-3")->completed());
  CHECK_THAT(marker->describe(), Catch::Contains(key + ":startup"));
  try {
    backend.startup_barrier("");
    FAIL("an empty generation was accepted");
  } catch (const lock_error& e) {
    CHECK(e.code() == workerlock::errc::bad_configuration);
  }
  // A bad URL: the marker's calls throw the backend's configuration error, password hidden.
  RedisOptions bad = o;
  bad.url = "redis://:topsecret@127.0.0.1:notaport/0";
  RedisBackend broken(bad);
  const auto unreadable = broken.startup_barrier("generation-1");
  try {
    (void)unreadable->completed();
    FAIL("completed() answered with a bad URL");
  } catch (const lock_error& e) {
    CHECK(e.code() == workerlock::errc::bad_configuration);
    CHECK_THAT(e.what(), !Catch::Contains("topsecret"));
  }
}

TEST_CASE("redis: Coordinator in WaitMode::polled renews and hands over", "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto o = options_for(server, seeded_key(server, "polled"));
  // Two ttls of polling: the primary renews, the standby stays out.
  wltest::check_polled_handover([&] { return std::make_unique<RedisBackend>(o); }, 2000ms, 2s);
}

TEST_CASE(
    "redis: a renewal that fails while the lease is valid keeps the role: the Coordinator retries "
    "on a new connection",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "keeps-role");
  // ttl 5 s: V = 1.67 s, C = 2.5 s, D = 0.5 s: a failed renewal leaves 2.8 s for the retry.
  const auto o = options_for(server, key, 5000ms);
  auto co = quiet_coordinator_options();
  co.wait = workerlock::WaitMode::polled;
  Coordinator c(std::make_unique<RedisBackend>(o), co);
  int demoted = 0;
  c.on_demoted([&] { ++demoted; });
  c.start();
  REQUIRE(c.role() == Role::primary);
  const std::string token = dynamic_cast<const RedisBackend&>(c.backend()).token();
  const std::string name = fmt::format("workerlock:{}", ::getpid());
  // The server drops the holder's connection: its next renewal fails (cannot tell).
  REQUIRE(server.command({"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"}) != "0");
  const auto until = std::chrono::steady_clock::now() + 5000ms;  // three renewals
  while (std::chrono::steady_clock::now() < until) {
    c.poll();
    std::this_thread::sleep_for(workerlock::recommended_poll_interval);
  }
  CHECK(demoted == 0);
  CHECK(c.role() == Role::primary);
  CHECK(server.command({"GET", key}) == token);
  CHECK(server.command({"CLIENT", "LIST"}).find(name) != std::string::npos);  // reconnected
  c.stop();
  CHECK(demoted == 1);
}

// =============================================================================================
// Many processes
// =============================================================================================

TEST_CASE("redis: 8 processes race and exactly one holds the lease", "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  constexpr int n = 8;

  SECTION("RedisBackend directly") {
    for (int round = 0; round < 5; ++round) {
      const auto o = options_for(server, seeded_key(server, "race"), 5000ms);
      wltest::check_race_has_one_winner(
          n, [&] { return std::make_unique<RedisBackend>(o); }, 300ms);
    }
  }

  SECTION("through Coordinator: one primary, handed over as the processes stop") {
    const auto key = seeded_key(server, "race-coordinator");
    const auto o = options_for(server, key);
    wltest::Shared<Checker> checker;
    wltest::Shared<wltest::StartLine> line;
    const auto pids = spawn_coordinators(n, o, *checker, &*line);
    REQUIRE(line->release_when(n));
    REQUIRE(wltest::eventually([&] { return checker->promotions.load() >= 1; }, 5s));
    std::this_thread::sleep_for(500ms);
    CHECK(checker->promotions.load() == 1);
    // Stop them one at a time, the primary first each time: every stop hands over.
    for (int handover = 0; handover < n; ++handover) {
      const int holder = checker->holder.load();
      const int i = index_of(pids, holder);
      REQUIRE(i >= 0);
      const int before = checker->promotions.load();
      checker->stop[i].store(true);
      if (handover + 1 < n) {
        REQUIRE(wltest::eventually([&] { return checker->promotions.load() > before; }, 5s));
      }
    }
    stop_all(*checker, n);
    CHECK(wltest::wait_all_failures(pids) == 0);
    INFO(checker->dump());
    CHECK(checker->promotions.load() == n);
    CHECK(checker->demotions.load() == n);
    CHECK(checker->overlaps.load() == 0);
    CHECK(checker->foreign_demotions.load() == 0);
    CHECK(checker->fence_violations.load() == 0);
    CHECK(checker->zero_fences.load() == 0);
    WARN(fmt::format("graceful handover (stop() -> next on_promoted), smallest: {:.1f} ms",
                     static_cast<double>(checker->min_gap_ns.load()) / 1e6));
  }
}

TEST_CASE("redis: SIGKILL of the holder: takeover time", "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  constexpr int n = 4;
  for (const bool fast : {true, false}) {
    INFO("fast_local_failover=" << fast);
    const auto key = seeded_key(server, "sigkill");
    auto o = options_for(server, key);
    o.fast_local_failover = fast;
    wltest::Shared<Checker> checker;
    auto pids = spawn_coordinators(n, o, *checker);
    REQUIRE(wltest::eventually([&] { return checker->promotions.load() >= 1; }, 5s));
    std::this_thread::sleep_for(fast ? 200ms : 500ms);  // mid-lease: some renewals happened
    const int holder = checker->holder.load();
    const int i = index_of(pids, holder);
    REQUIRE(i >= 0);
    const auto killed = mono_ns();
    checker->killed_ns.store(killed);
    checker->log(3, holder, 0, killed);
    ::kill(holder, SIGKILL);
    CHECK(wltest::wait_exit_code(holder) == 128 + SIGKILL);
    REQUIRE(wltest::eventually([&] { return checker->promotions.load() >= 2; }, 5s));
    const double takeover = ms_between(killed, checker->last_promoted_ns.load());
    const RedisBackend probe(o);
    const auto eff = probe.options();
    // The lease may have just been renewed: ttl, plus a poll, plus slack for a loaded machine.
    const double bound = static_cast<double>((eff.ttl + eff.poll_interval).count()) + 400.0;
    WARN(
        fmt::format("SIGKILL -> next on_promoted: {:.1f} ms (fast_local_failover={}, ttl {} ms, "
                    "poll {} ms, bound {:.0f} ms)",
                    takeover, fast, eff.ttl.count(), eff.poll_interval.count(), bound));
    CHECK(takeover < bound);
    if (fast) CHECK(takeover < 500.0);  // typically ~1 ms: a pidfd wakes the standby
    stop_all(*checker, n);
    pids.erase(pids.begin() + i);
    CHECK(wltest::wait_all_failures(pids) == 0);
    INFO(checker->dump());
    CHECK(checker->overlaps.load() == 0);
    CHECK(checker->fence_violations.load() == 0);
  }
}

TEST_CASE("redis: the holder demotes before anyone else is promoted when Redis stalls or restarts",
          "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  constexpr int n = 4;
  const auto key = seeded_key(server, "stall");
  const auto o = options_for(server, key);
  wltest::Shared<Checker> checker;

  // The action that stalls Redis for longer than the ttl.
  std::string what;
  std::function<void()> stall;
  SECTION("Redis killed and restarted on the same port (data lost)") {
    what = "SIGKILL + restart";
    stall = [&] {
      server.stop(SIGKILL);
      std::this_thread::sleep_for(300ms);
      server.restart();
    };
  }
  SECTION("CLIENT PAUSE 3000") {
    what = "CLIENT PAUSE 3000";
    stall = [&] { server.command({"CLIENT", "PAUSE", "3000"}); };
  }
  SECTION("DEBUG SLEEP 2") {
    WLTEST_SKIP_UNLESS(wltest::RedisServer::major_version() >= 7,
                       "DEBUG SLEEP needs --enable-debug-command (Redis >= 7)");
    what = "DEBUG SLEEP 2";
    stall = [&] { server.command({"DEBUG", "SLEEP", "2"}, 10s); };  // blocks Redis and us
  }

  const auto pids = spawn_coordinators(n, o, *checker);
  REQUIRE(wltest::eventually([&] { return checker->promotions.load() >= 1; }, 5s));
  std::this_thread::sleep_for(400ms);
  REQUIRE(checker->promotions.load() == 1);
  const int first_holder = checker->holder.load();
  const auto stalled_at = mono_ns();
  stall();
  REQUIRE(wltest::eventually([&] { return checker->promotions.load() >= 2; }, 10s));
  std::this_thread::sleep_for(300ms);
  stop_all(*checker, n);
  CHECK(wltest::wait_all_failures(pids) == 0);

  INFO(what << "\n" << checker->dump());
  CHECK(checker->overlaps.load() == 0);
  CHECK(checker->foreign_demotions.load() == 0);
  CHECK(checker->fence_violations.load() == 0);
  CHECK(checker->zero_fences.load() == 0);
  // The first holder demoted, and that came before the second promotion.
  std::int64_t first_demotion = 0;
  std::int64_t second_promotion = 0;
  for (int e = 0; e < std::min(checker->nevents.load(), 512); ++e) {
    const auto& ev = checker->events[e];
    if (first_demotion == 0 && ev.kind.load() == 2 && ev.pid.load() == first_holder)
      first_demotion = ev.t.load();
    if (second_promotion == 0 && ev.kind.load() == 1 && ev.t.load() > stalled_at)
      second_promotion = ev.t.load();
  }
  REQUIRE(first_demotion != 0);
  REQUIRE(second_promotion != 0);
  CHECK(first_demotion < second_promotion);
  const RedisBackend probe(o);
  const double worst = static_cast<double>(checker->worst_demotion_after_lease_ns.load()) / 1e6;
  CHECK(worst < static_cast<double>(probe.options().drift_margin.count()));
  WARN(fmt::format(
      "{}: holder demoted {:.0f} ms after the stall began, {:.2f} ms after its "
      "valid_until (drift margin {} ms); next primary {:.0f} ms after that demotion",
      what, ms_between(stalled_at, first_demotion), worst, probe.options().drift_margin.count(),
      ms_between(first_demotion, second_promotion)));
}

// A partition, not a stall: the holder's host is cut off, and only it. Every standby still
// reaches Redis and takes the lease the moment it expires, so the holder must have stopped
// trusting its lease before that, with no word from anyone.
TEST_CASE(
    "redis: a partitioned holder demotes before its lease expires, a standby takes over "
    "after it, and the healed holder stays a standby",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  WLTEST_REQUIRE_PARTITION_LAB("WORKERLOCK_REQUIRE_REDIS");
  wltest::PartitionLab lab;
  wltest::RedisServer server(wltest::RedisServer::Config{
      {}, {"--bind", "127.0.0.1", wltest::PartitionLab::server_address, "--protected-mode", "no"}});
  wltest::Shared<Checker> checker;
  wltest::Children children;  // a failed REQUIRE must not leave the workers running
  const auto key = seeded_key(server, "partition");
  const auto o = options_for(server, key, 2000ms);

  // The holder, on the far side of the link: a host of its own.
  RedisOptions far_side = o;
  far_side.url =
      fmt::format("redis://{}:{}/0", wltest::PartitionLab::server_address, server.port());
  const pid_t holder =
      lab.spawn_far_host(children, [&] { return coordinator_child(far_side, *checker, 0); });
  REQUIRE(wltest::eventually([&] { return checker->promotions.load() == 1; }, 10s));
  REQUIRE(checker->holder.load() == holder);
  // Two standbys on the server's side of the link.
  const pid_t standby_a = children.spawn([&] { return coordinator_child(o, *checker, 1); });
  const pid_t standby_b = children.spawn([&] { return coordinator_child(o, *checker, 2); });
  std::this_thread::sleep_for(1500ms);  // the holder renews twice meanwhile
  REQUIRE(checker->promotions.load() == 1);

  const auto cut_at = mono_ns();
  lab.cut();
  REQUIRE(wltest::eventually([&] { return checker->promotions.load() == 2; }, 10s));
  const auto demoted_ns = checker->last_demoted_ns.load();
  const auto promoted_ns = checker->last_promoted_ns.load();
  INFO(checker->dump());
  CHECK(checker->demotions.load() == 1);
  const int successor = checker->holder.load();
  CHECK((successor == standby_a || successor == standby_b));
  // The holder stopped trusting its lease before Redis could give it away: within a ttl of
  // the cut (plus scheduling slack), and before the lease's end (valid_until, which already
  // leaves the drift margin);
  CHECK(ms_between(cut_at, demoted_ns) < 2000.0 + 500.0);
  const RedisBackend probe(o);
  CHECK(static_cast<double>(checker->worst_demotion_after_lease_ns.load()) / 1e6 <
        static_cast<double>(probe.options().drift_margin.count()));
  // a standby took over once the key expired: not before the holder had demoted, within ttl
  // plus one standby retry (200 ms) and some scheduling slack.
  CHECK(demoted_ns < promoted_ns);
  CHECK(ms_between(cut_at, promoted_ns) < 2000.0 + 200.0 + 800.0);
  CHECK(checker->overlaps.load() == 0);

  // Healed, the old holder reaches Redis again, finds the lease taken and stays a standby.
  lab.heal();
  std::this_thread::sleep_for(2500ms);
  CHECK(checker->promotions.load() == 2);
  CHECK(checker->holder.load() == successor);

  stop_all(*checker, 3);
  CHECK(children.wait(holder) == 0);
  CHECK(children.wait(standby_a) == 0);
  CHECK(children.wait(standby_b) == 0);
  CHECK(checker->overlaps.load() == 0);
  CHECK(checker->foreign_demotions.load() == 0);
  CHECK(checker->fence_violations.load() == 0);
  CHECK(checker->zero_fences.load() == 0);
  WARN(
      fmt::format("partition of the holder's host (ttl 2000 ms): it demoted {:.0f} ms after the "
                  "cut; a standby was promoted {:.0f} ms after the cut",
                  ms_between(cut_at, demoted_ns), ms_between(cut_at, promoted_ns)));
}

// =============================================================================================
// Standard streams
// =============================================================================================

namespace {

struct StreamsReport {
  std::atomic<int> step{0};
  char left_open[512] = {};
};

}  // namespace

TEST_CASE(
    "redis: with descriptors 0, 1 and 2 closed, no backend descriptor lands there and "
    "reopening them disturbs nothing",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "stdio");
  const auto o = options_for(server, key);
  wltest::Shared<StreamsReport> report;
  // Exit codes: 0 fine, 1 not primary after start(), 2 a descriptor at 0-2, 3 cannot reopen
  // 0-2 on /dev/null, 4 demoted after the reopening and writes to stderr, 5 stop() left it
  // primary, 99 an exception.
  // A hang becomes a failure: the child is killed after 20 s.
  const int exit_code = wltest::run_without_standard_streams(20s, [&]() -> int {
    auto co = quiet_coordinator_options();
    co.wait = workerlock::WaitMode::polled;
    Coordinator c(std::make_unique<RedisBackend>(o), co);
    int demotions = 0;
    c.on_demoted([&] { ++demotions; });
    report->step = 1;
    c.start();
    if (c.role() != Role::primary) return 1;
    const auto left = wltest::open_standard_descriptors();
    std::snprintf(report->left_open, sizeof report->left_open, "%s", left.c_str());
    if (!left.empty()) return 2;
    // What a daemon does once it notices: standard streams on /dev/null, then it logs.
    report->step = 2;
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int fd = 0; fd <= 2; ++fd)
      if (null < 0 || ::dup2(null, fd) != fd) return 3;
    const char noise[] = "*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nnoise\r\n";
    // Two ttls of renewals, with a "log line" on stdout and stderr before each poll.
    const auto until = std::chrono::steady_clock::now() + 2000ms;
    while (std::chrono::steady_clock::now() < until) {
      [[maybe_unused]] const auto a = ::write(1, noise, sizeof noise - 1);
      [[maybe_unused]] const auto b = ::write(2, noise, sizeof noise - 1);
      c.poll();
      std::this_thread::sleep_for(workerlock::recommended_poll_interval);
    }
    if (c.role() != Role::primary || demotions != 0) return 4;
    report->step = 3;
    c.stop();
    return c.role() == Role::primary ? 5 : 0;
  });
  INFO("step " << report->step.load() << ", descriptors at 0-2:" << report->left_open);
  CHECK(exit_code == 0);  // -2: killed after 20 s; 128 + n: ended by signal n
}

// ---------------------------------------------------------------------------------------------
// Copies of the holder made by syscall(SYS_fork): no pthread_atfork handler runs in them.
// ---------------------------------------------------------------------------------------------

namespace {

using wltest::copy_exit;
using wltest::raw_fork;
using wltest::tsan_ignore_this_copy;
using wltest::wait_or_kill;

//! A Coordinator with static storage, as a server keeps it: exit() destroys it, and with it
//! the backend, in every process that calls exit(), a copy made by fork included.
std::optional<Coordinator>& static_coordinator() {
  static std::optional<Coordinator> coordinator;
  return coordinator;
}

//! What the holder saw; 1 = as it must be, 2 = not, 0 = not reached.
struct RawForkReport {
  std::atomic<int> step{0};
  std::atomic<int> exiting_child{-1};  // exit code of the copy that called exit()
  std::atomic<int> key_after_exit{0};
  std::atomic<int> renewed_after_exit{0};
  std::atomic<int> members_child{-1};  // exit code of the copy that called every member
  std::atomic<int> key_after_members{0};
  std::atomic<int> renewed_after_members{0};
  std::atomic<int> released_by_parent{0};
};

//! The holder of the raw-fork tests, in a child of the test: a Coordinator in
//! static_coordinator(), whose lease the test reads from `key` on `server`.
class RawForkHolder {
 public:
  RawForkHolder(const wltest::RedisServer& server, const std::string& key, const RedisOptions& o,
                const CoordinatorOptions& co)
      : server_(server), key_(key), o_(o), co_(co) {}

  //! Starts the Coordinator: 0, or the holder's exit code 1 (not primary after start()) or 2
  //! (the key does not hold the token).
  int start() {
    auto& slot = static_coordinator();
    slot.emplace(std::make_unique<RedisBackend>(o_), co_);
    slot->start();
    if (slot->role() != Role::primary) return 1;
    token_ = backend().token();
    return key_kept() == 1 ? 0 : 2;
  }

  Coordinator& coordinator() { return *static_coordinator(); }
  RedisBackend& backend() { return wltest::backend_of<RedisBackend>(coordinator()); }

  //! 1 when the key still holds the holder's token, else 2.
  int key_kept() const { return server_.command({"GET", key_}) == token_ ? 1 : 2; }

  //! Stops the Coordinator on the holder's own connection: 0, or the holder's exit code 4
  //! (still primary after stop()); whether the key is gone then, into `released`.
  int stop(std::atomic<int>& released) {
    coordinator().stop();
    if (coordinator().role() == Role::primary) return 4;
    released = server_.command({"GET", key_}) == "(nil)" ? 1 : 2;
    static_coordinator().reset();
    return 0;
  }

 private:
  const wltest::RedisServer& server_;
  const std::string key_;
  const RedisOptions o_;
  const CoordinatorOptions co_;
  std::string token_;
};

}  // namespace

TEST_CASE(
    "redis: a copy of the holder made by syscall(SYS_fork) that exits or uses its backend "
    "leaves the holder's lease and connection alone",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "rawfork");
  // ttl 2 s: the holder's renewals here are explicit, and must not race the lease's end.
  const auto o = options_for(server, key, 2000ms);
  wltest::Shared<RawForkReport> report;
  // Holder exit codes: 0 done, 1 not primary after start(), 2 the key does not hold the
  // token, 3 raw fork failed, 4 still primary after stop().
  auto co = quiet_coordinator_options();
  co.wait = workerlock::WaitMode::polled;
  const int holder = wltest::run_raw_fork_holder(
      30s, [&] { return RawForkHolder(server, key, o, co); }, *report,
      [&](RawForkHolder& h) {
        RedisBackend& backend = h.backend();

        // A helper that calls exit(): the static Coordinator and its backend are destroyed.
        pid_t child = raw_fork();
        if (child < 0) return 3;
        if (child == 0) std::exit(h.coordinator().role() == Role::primary ? 1 : 0);
        report->exiting_child = wait_or_kill(child, 10s);
        report->key_after_exit = h.key_kept();
        report->renewed_after_exit = backend.verify_held() ? 1 : 2;
        report->step = 2;

        // A copy that calls every member of its backend, then destroys it.
        child = raw_fork();
        if (child < 0) return 3;
        if (child == 0) {
          int code = 0;
          if (backend.held() || backend.fencing_token() != 0 || backend.lease_valid()) code = 1;
          if (code == 0 && backend.verify_held()) code = 2;
          {
            workerlock::Interrupter interrupter;
            interrupter.interrupt();
            if (code == 0 && backend.wait_acquire(interrupter)) code = 3;
          }
          backend.release();
          backend.reset();
          static_coordinator().reset();
          copy_exit(code);
        }
        report->members_child = wait_or_kill(child, 10s);
        report->key_after_members = h.key_kept();
        report->renewed_after_members = backend.verify_held() ? 1 : 2;
        report->step = 3;
        return 0;  // then the holder's own connection still works: its release deletes the key
      });
  INFO("holder reached step " << report->step.load());
  REQUIRE(holder == 0);
  CHECK(report->exiting_child.load() == 0);
  CHECK(report->key_after_exit.load() == 1);
  CHECK(report->renewed_after_exit.load() == 1);
  CHECK(report->members_child.load() == 0);
  CHECK(report->key_after_members.load() == 1);
  CHECK(report->renewed_after_members.load() == 1);
  CHECK(report->released_by_parent.load() == 1);
}

// Tagged [raw_fork], not [threads]: ThreadSanitizer does not model a raw syscall(SYS_fork)
// of a multi-threaded process (the copy exits 66 on its reports), so the gcc, clang20 and
// asan configs run this test and the tsan config does not.
TEST_CASE(
    "redis: a copy made by syscall(SYS_fork) beside the coordinator thread frees its copy "
    "without touching the holder's lease",
    "[redis][raw_fork]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "rawfork-thread");
  // ttl 10 s: the coordinator thread renews every 3.3 s and sleeps in between, so the copy
  // is made while it sleeps (a copy of a thread inside malloc could not exit).
  const auto o = options_for(server, key, 10000ms);
  wltest::Shared<RawForkReport> report;
  // Holder exit codes: 0 done, 1 not primary after start(), 2 the key does not hold the
  // token, 3 raw fork failed, 4 still primary after stop(), 5 demoted after the copy exited.
  const auto co = quiet_coordinator_options();
  const int holder = wltest::run_raw_fork_holder(
      30s, [&] { return RawForkHolder(server, key, o, co); }, *report,
      [&](RawForkHolder& h) {
        const pid_t child = raw_fork();
        if (child < 0) return 3;
        if (child == 0) {
          tsan_ignore_this_copy();
          // Destroys the copy as exit() would, then _exit(): LeakSanitizer's exit-time check
          // cannot stop the coordinator thread this copy lists but does not have.
          const int code = h.coordinator().role() == Role::primary ? 1 : 0;
          static_coordinator().reset();
          copy_exit(code);
        }
        report->exiting_child = wait_or_kill(child, 10s);
        report->key_after_exit = h.key_kept();
        report->step = 2;
        // Then stop() releases on the holder's connection, from the coordinator thread.
        return h.coordinator().role() == Role::primary ? 0 : 5;
      });
  INFO("holder reached step " << report->step.load());
  REQUIRE(holder == 0);
  CHECK(report->exiting_child.load() == 0);
  CHECK(report->key_after_exit.load() == 1);
  CHECK(report->released_by_parent.load() == 1);
}

TEST_CASE(
    "redis: a child of fork() closes its copy of the connection at once: the holder's close "
    "ends the connection on the server while the child lives on",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "fork-closes");
  RedisBackend holder(options_for(server, key));
  REQUIRE(holder.try_acquire());
  const std::string name = fmt::format("name=workerlock:{}", ::getpid());
  const auto connected = [&] {
    return server.command({"CLIENT", "LIST"}).find(name) != std::string::npos;
  };
  REQUIRE(connected());
  int go[2];
  REQUIRE(::pipe(go) == 0);
  // The child never touches the backend: only the fork layer's hook can close its copy.
  const pid_t child = wltest::fork_child([&] {
    ::close(go[1]);
    char byte = 0;
    return ::read(go[0], &byte, 1) == 1 ? 0 : 1;
  });
  ::close(go[0]);
  holder.reset();  // releases, then closes the holder's connection
  bool closed = false;
  for (int i = 0; i < 1000 && !closed; ++i) {  // 10 s; it takes a millisecond
    closed = !connected();
    if (!closed) std::this_thread::sleep_for(10ms);
  }
  CHECK(closed);
  CHECK(::kill(child, 0) == 0);  // still alive: its copy of the socket is closed, not exited
  CHECK(::write(go[1], "x", 1) == 1);
  ::close(go[1]);
  CHECK(wltest::wait_exit_code(child) == 0);
}

// =============================================================================================
// The public contract: the local deadline, accessors from any thread, errors
// =============================================================================================

TEST_CASE("redis: valid_until() is the lease's local deadline, and min() while nothing is held",
          "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "valid-until");
  const auto o = options_for(server, key);
  RedisBackend a(o);
  const workerlock::Backend& as_backend = a;
  constexpr auto never = std::chrono::steady_clock::time_point::min();

  CHECK(a.valid_until() == never);  // before the first hold
  CHECK(as_backend.valid_until() == never);
  CHECK_FALSE(a.lease_valid());

  const auto before = std::chrono::steady_clock::now();
  REQUIRE(a.try_acquire());
  const auto after = std::chrono::steady_clock::now();
  const auto first = a.valid_until();
  const auto trusted = a.options().ttl - a.options().drift_margin;
  CHECK(first >= before + trusted);  // s + ttl - drift, s taken between before and after
  CHECK(first <= after + trusted);
  CHECK(as_backend.valid_until() == first);  // the override the Coordinator reads
  CHECK(a.lease_valid());

  std::this_thread::sleep_for(50ms);
  REQUIRE(a.verify_held());
  CHECK(a.valid_until() > first);  // a renewal moves it on

  // A forked copy holds nothing, so it has no deadline either.
  const pid_t child = wltest::fork_child([&]() -> int {
    if (a.held()) return 1;
    if (a.valid_until() != never || as_backend.valid_until() != never) return 2;
    if (a.lease_valid()) return 3;
    return 0;
  });
  CHECK(wltest::wait_exit_code(child) == 0);

  a.release();
  CHECK(a.valid_until() == never);
  CHECK(as_backend.valid_until() == never);
  CHECK_FALSE(a.lease_valid());
}

namespace {

//! The code of the lock_error that `call` throws about `backend`'s server, after checking that
//! it names that server in target(), not in path(), and shows no password.
template <typename F>
std::error_code network_error_code(const RedisBackend& backend, F&& call) {
  try {
    call();
  } catch (const lock_error& e) {
    INFO("what(): " << e.what());
    CHECK(e.path().empty());
    CHECK(e.target() == backend.network_target());
    CHECK_THAT(e.what(), !Catch::Contains("topsecret"));
    return e.code();
  }
  FAIL("no lock_error");
  return {};
}

}  // namespace

TEST_CASE(
    "redis: errors name the server and key in target(), never in path(), with workerlock's "
    "codes for bad configuration and a lost lease",
    "[redis]") {
  // Bad configuration: errc::bad_configuration, which still equals std::errc::invalid_argument.
  RedisOptions bad;
  bad.url = "redis://:topsecret@127.0.0.1:notaport/0";
  bad.key = "app:primary";
  RedisBackend misconfigured(bad);
  CHECK(misconfigured.network_target() == "redis://:***@127.0.0.1:***/0 key=app:primary");
  auto code = network_error_code(misconfigured, [&] { misconfigured.prepare(); });
  CHECK(code == workerlock::errc::bad_configuration);
  CHECK(code == std::errc::invalid_argument);

  // A refused connection: the errno.
  RedisOptions refused;
  refused.url = fmt::format("redis://:topsecret@127.0.0.1:{}/0", wltest::free_loopback_port());
  RedisBackend unreachable(refused);
  CHECK_THAT(unreachable.network_target(), Catch::StartsWith("redis://:***@127.0.0.1:"));
  code = network_error_code(unreachable, [&] { unreachable.try_acquire(); });
  CHECK(code == std::errc::connection_refused);

  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "errors");
  const auto o = options_for(server, key);

  // A database the server does not have is bad configuration too.
  RedisOptions db = o;
  db.url = fmt::format("redis://127.0.0.1:{}/999", server.port());
  RedisBackend no_such_db(db);
  code = network_error_code(no_such_db, [&] { no_such_db.try_acquire(); });
  CHECK(code == workerlock::errc::bad_configuration);
  CHECK(code == std::errc::invalid_argument);

  // The lease ran out before the renewal: a definite answer, false, not an error (see the
  // last test case).
  RedisBackend a(o);
  REQUIRE(a.try_acquire());
  std::this_thread::sleep_until(a.valid_until() + 10ms);
  CHECK_FALSE(a.verify_held());
  a.release();

  // A renewal that gets no answer before the lease runs out: lease_lost as well. Started 300 ms
  // before valid_until(), so its deadline is valid_until(), not now + command_timeout (500 ms).
  REQUIRE(a.try_acquire());
  std::this_thread::sleep_until(a.valid_until() - 300ms);
  server.command({"CLIENT", "PAUSE", "1500"});
  code = network_error_code(a, [&] { a.verify_held(); });
  CHECK(code == workerlock::errc::lease_lost);
  a.release();
  std::this_thread::sleep_for(1600ms);  // the pause is over
}

TEST_CASE(
    "redis: a renewal that times out while the lease is still valid is ETIMEDOUT, not "
    "lease_lost",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "renewal-timeout");
  // command_timeout 500 ms, the lease valid for 10 s - D: the renewal gives up ~9 s before
  // the lease runs out.
  auto o = options_for(server, key, 10000ms);
  o.command_timeout = 500ms;
  RedisBackend a(o);
  REQUIRE(a.try_acquire());
  server.command({"CLIENT", "PAUSE", "3000"});
  std::error_code code;
  try {
    a.verify_held();
    FAIL("verify_held() did not throw");
  } catch (const lock_error& e) {
    code = e.code();
    INFO(e.what());
    CHECK_THAT(e.what(), Catch::Contains("command_timeout (500 ms)"));
  }
  CHECK(a.lease_valid());
  CHECK(code == std::errc::timed_out);
  CHECK(code == std::error_code(ETIMEDOUT, std::system_category()));
  CHECK_FALSE(code == workerlock::errc::lease_lost);
  std::this_thread::sleep_for(3100ms);  // the pause is over
  a.release();
}

TEST_CASE("redis: a command with more arguments than redis_command holds is refused, not sent",
          "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  workerlock::detail::redis_url url;
  std::string why;
  REQUIRE(workerlock::detail::parse_redis_url(server.url(), url, why));
  workerlock::detail::redis_connection connection;
  const auto deadline = [] { return std::chrono::steady_clock::now() + 5s; };
  REQUIRE_FALSE(connection.connect(url, deadline(), nullptr));

  const std::string key = fresh_key("overflow");
  // RPUSH key v1 ... v11: 13 arguments, more than the command holds.
  const std::string values[11] = {"v1", "v2", "v3", "v4",  "v5", "v6",
                                  "v7", "v8", "v9", "v10", "v11"};
  workerlock::detail::redis_command command;
  command << "RPUSH" << key;
  for (const auto& v : values) command << v;
  workerlock::detail::redis_reply reply;
  const auto st = connection.exchange(&command, 1, &reply, deadline(), nullptr);
  CHECK(st.code == E2BIG);
  CHECK_FALSE(st.sent);
  CHECK(server.command({"EXISTS", key}) == "0");  // nothing, not a truncated command

  // The connection is still usable for a command that fits.
  workerlock::detail::redis_command ping;
  ping << "PING";
  const auto ok = connection.exchange(&ping, 1, &reply, deadline(), nullptr);
  REQUIRE_FALSE(ok);
  CHECK(std::string(reply->str, reply->len) == "PONG");
}

// The rule: role(), fencing_token() and the lease's validity may be read from any thread at
// any time. ThreadSanitizer (the tsan config runs [threads] tests) reports any unsynchronized
// access between these reads and the coordinator threads' acquisitions and releases.
TEST_CASE(
    "redis: role(), fencing_token() and valid_until() read from other threads during failovers",
    "[redis][threads]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto o = options_for(server, seeded_key(server, "accessors"));
  wltest::check_accessors_during_failovers<RedisBackend>(
      [&] { return std::make_unique<RedisBackend>(o); },
      [](Coordinator(&c)[2], int p, int) {
        c[p].stop();  // the coordinator thread runs on_demoted and releases; the other takes over
        REQUIRE(wltest::eventually([&] { return c[1 - p].role() == Role::primary; }, 10s));
      },
      [](const RedisBackend& backend) { (void)backend.lease_valid(); }, 0ms, 10s);
}

TEST_CASE(
    "redis: a holder paused past its lease: its backend's valid_until() has passed when it "
    "runs again",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto o = options_for(server, seeded_key(server, "paused-backend"));  // ttl 1 s
  wltest::check_paused_backend_expired([&] { return std::make_unique<RedisBackend>(o); }, o.ttl,
                                       3000ms, 2000ms);
}

// Needs Coordinator::role() to compare the backend's valid_until() with the clock (the
// Coordinator's half of "a lease role expires on its own"): before that, the paused holder's
// role() reads primary until on_demoted has returned.
TEST_CASE(
    "redis: a holder paused past its lease reads secondary from role() the moment it runs "
    "again, before on_demoted",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto o = options_for(server, seeded_key(server, "paused-role"));
  wltest::check_paused_role_secondary([&] { return std::make_unique<RedisBackend>(o); }, o.ttl,
                                      3000ms, 2000ms);
}

TEST_CASE(
    "redis: a check after valid_until() returns false without throwing, and release() still "
    "deletes the key that outlived it",
    "[redis]") {
  WL_REQUIRE_REDIS_SERVER();
  wltest::RedisServer server;
  const auto key = seeded_key(server, "past-valid-until");
  // The key lives 1 s past valid_until() (the drift margin): the check finds it still ours.
  auto o = options_for(server, key, 3000ms);
  o.drift_margin = 1000ms;
  o.command_timeout = 500ms;
  RedisBackend a(o);
  REQUIRE(a.try_acquire());
  const std::string token = a.token();
  std::this_thread::sleep_until(a.valid_until() + 10ms);
  bool answer = true;
  CHECK_NOTHROW(answer = a.verify_held());
  CHECK_FALSE(answer);  // like PostgresBackend: past valid_until() the hold is lost
  CHECK_FALSE(a.lease_valid());
  CHECK(server.command({"GET", key}) == token);
  a.release();
  CHECK(server.command({"EXISTS", key}) == "0");
}
