// workerlock Redis benchmark: what a RedisBackend acquire+release costs, side by side with a
// bare hiredis SET NX PX + DEL (the floor), other ways of building the same lease, and
// redis-py's redis.lock.Lock, all against one redis-server started for this run; then the
// failover time after SIGKILL of a holder.
//
//   redis_bench [--rounds R] [--iterations N] [--failover-runs K] [--python PATH] [--quick]
//
// Method: each case runs N acquire+release cycles per sample; for R rounds every case runs
// one sample, in a shuffled order, so a slow moment of a busy machine hits all cases alike.
// Reported: the median over rounds of ns per cycle (wall clock: a round trip is waiting, not
// CPU), and the median over rounds of each round's ratio case/floor.
// Failover: a holder and two standbys, each a Coordinator on a RedisBackend in its own
// process (ttl 1000 ms); the holder is SIGKILLed mid-lease; measured: SIGKILL -> the next
// on_promoted, median over K runs, with and without fast_local_failover.
// Exit status: 0, 1 when something fails, 2 for bad arguments.

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <hiredis/hiredis.h>

#include <workerlock/coordinator.hpp>
#include <workerlock/redis.hpp>

#include "../support/clock.hpp"
#include "../support/redis_server.hpp"
#include "bench_support.hpp"

namespace {

using namespace std::chrono_literals;

using wlbench::fail;
using wlbench::median;
using wlbench::quantile;

using wltest::mono_ns;

//! ns per acquire+release cycle, and ns of the acquire part alone (0 when not measured).
struct Sample {
  double cycle = 0;
  double acquire = 0;
};

struct Config {
  int rounds = 21;
  int iterations = 400;
  int failover_runs = 5;
  std::string python;
};

Config parse_args(int argc, char** argv) {
  Config cfg;
  // One argument; false for an unknown one.
  const auto option = [&](std::string_view arg, auto& value) {
    if (arg == "--rounds") {
      cfg.rounds = std::stoi(value());
    } else if (arg == "--iterations") {
      cfg.iterations = std::stoi(value());
    } else if (arg == "--failover-runs") {
      cfg.failover_runs = std::stoi(value());
    } else if (arg == "--python") {
      cfg.python = value();
    } else if (arg == "--quick") {
      cfg.rounds = 3;
      cfg.iterations = 100;
      cfg.failover_runs = 1;
    } else if (arg == "--help" || arg == "-h") {
      std::puts(
          "usage: redis_bench [--rounds R] [--iterations N] [--failover-runs K] "
          "[--python PATH] [--quick]");
      std::exit(0);
    } else {
      return false;
    }
    return true;
  };
  wlbench::parse_options(argc, argv, "redis_bench", nullptr, option);
  if (cfg.rounds < 1 || cfg.iterations < 1 || cfg.failover_runs < 0) {
    std::fprintf(stderr, "redis_bench: values must be positive\n");
    std::exit(2);
  }
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// A blocking hiredis connection for the floor and the alternative designs.
// ---------------------------------------------------------------------------------------------

class Hiredis {
 public:
  explicit Hiredis(int port) {
    struct timeval tv {
      2, 0
    };
    c_ = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (c_ == nullptr || c_->err) fail("hiredis: cannot connect");
    redisSetTimeout(c_, tv);
  }
  ~Hiredis() { redisFree(c_); }
  Hiredis(const Hiredis&) = delete;
  Hiredis& operator=(const Hiredis&) = delete;

  //! Runs a command; returns the reply (the caller frees it), failing on a connection error.
  redisReply* run(std::initializer_list<std::string_view> args) {
    const char* argv[12];
    std::size_t lengths[12];
    int n = 0;
    for (const auto a : args) {
      argv[n] = a.data();
      lengths[n++] = a.size();
    }
    auto* reply = static_cast<redisReply*>(redisCommandArgv(c_, n, argv, lengths));
    if (reply == nullptr) fail(std::string("hiredis: ") + c_->errstr);
    return reply;
  }

  //! Runs a command, expecting an integer/status/string reply that is not an error.
  long long integer(std::initializer_list<std::string_view> args) {
    redisReply* r = run(args);
    if (r->type == REDIS_REPLY_ERROR) {
      const std::string text(r->str, r->len);
      freeReplyObject(r);
      fail("redis error: " + text);
    }
    const long long v =
        r->type == REDIS_REPLY_INTEGER ? r->integer : (r->type == REDIS_REPLY_NIL ? 0 : 1);
    freeReplyObject(r);
    return v;
  }

  std::string string(std::initializer_list<std::string_view> args) {
    redisReply* r = run(args);
    std::string text(r->str != nullptr ? std::string(r->str, r->len) : std::string());
    const bool error = r->type == REDIS_REPLY_ERROR;
    freeReplyObject(r);
    if (error) fail("redis error: " + text);
    return text;
  }

  redisContext* get() const { return c_; }

 private:
  redisContext* c_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// redis-py as a coprocess: answers "N" with ns per acquire()+release() of a redis.lock.Lock.
// ---------------------------------------------------------------------------------------------

constexpr const char* python_script = R"PY(
import sys, time
try:
    import redis
except Exception as e:
    print("MISSING %s: %s" % (type(e).__name__, e), flush=True)
    sys.exit(0)
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
r.ping()
print("READY redis-py %s, Python %s" % (redis.__version__, sys.version.split()[0]), flush=True)
lock = r.lock("wlbench:python", timeout=10)
acquire, release, clock = lock.acquire, lock.release, time.perf_counter_ns
for line in sys.stdin:
    n = int(line)
    in_acquire = 0
    w0 = clock()
    for _ in range(n):
        a0 = clock()
        if not acquire(blocking=False):
            raise SystemExit("the Python lock was held")
        in_acquire += clock() - a0
        release()
    w1 = clock()
    print("%.3f %.3f" % ((w1 - w0) / n, in_acquire / n), flush=True)
)PY";

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

struct Case {
  Case(std::string n, std::string h, std::function<Sample(int)> m)
      : name(std::move(n)), how(std::move(h)), measure(std::move(m)) {}
  std::string name;
  std::string how;                     // round trips and server work
  std::function<Sample(int)> measure;  // runs N cycles
  std::vector<double> samples;         // ns per cycle, one per round
  std::vector<double> acquire;         // ns per acquire, one per round
};

//! Times N cycles of acquire() then release(), and the acquire() calls alone.
template <typename Acquire, typename Release>
std::function<Sample(int)> timed(Acquire acquire, Release release) {
  return [acquire, release](int n) mutable {
    std::int64_t in_acquire = 0;
    const auto t0 = mono_ns();
    for (int i = 0; i < n; ++i) {
      const auto a0 = mono_ns();
      acquire();
      in_acquire += mono_ns() - a0;
      release();
    }
    return Sample{static_cast<double>(mono_ns() - t0) / n, static_cast<double>(in_acquire) / n};
  };
}

void expect(bool ok, const char* what) {
  if (!ok) fail(what);
}

// ---------------------------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------------------------

struct FailoverShared {
  std::atomic<int> holder{0};
  std::atomic<int> promotions{0};
  std::atomic<std::int64_t> last_promoted_ns{0};
  std::atomic<bool> stop{false};
};

double one_failover(const wltest::RedisServer& server, bool fast, int run) {
  auto* shared = static_cast<FailoverShared*>(::mmap(
      nullptr, sizeof(FailoverShared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (shared == MAP_FAILED) fail("mmap");
  new (shared) FailoverShared();
  const std::string key = fmt::format("wlbench:failover:{}:{}:{}", ::getpid(), fast, run);
  server.command({"SET", key + ":fence", "1000"});
  workerlock::RedisOptions o;
  o.url = server.url();
  o.key = key;
  o.ttl = 1000ms;
  o.command_timeout = 500ms;
  o.connect_timeout = 2000ms;
  o.fast_local_failover = fast;
  std::vector<pid_t> pids;
  for (int i = 0; i < 3; ++i) {
    const pid_t pid = ::fork();
    if (pid < 0) fail("fork");
    if (pid == 0) {
      int code = 0;
      try {
        workerlock::CoordinatorOptions co;
        co.lock.log = nullptr;
        co.retry_backoff_max = 250ms;
        workerlock::Coordinator c(std::make_unique<workerlock::RedisBackend>(o), co);
        const int me = ::getpid();
        c.on_promoted([&] {
          shared->holder.store(me);
          shared->last_promoted_ns.store(mono_ns());
          shared->promotions.fetch_add(1);
        });
        c.start();
        while (!shared->stop.load()) std::this_thread::sleep_for(1ms);
        c.stop();
      } catch (...) {
        code = 1;
      }
      ::_exit(code);
    }
    pids.push_back(pid);
  }
  const auto wait_for = [&](int promotions) {
    const auto deadline = mono_ns() + 10'000'000'000LL;
    while (shared->promotions.load() < promotions) {
      if (mono_ns() > deadline) fail("failover: no promotion within 10 s");
      std::this_thread::sleep_for(100us);
    }
  };
  wait_for(1);
  // Kill at a random point of the lease, as a crash would.
  std::mt19937 random(static_cast<unsigned>(run * 7 + fast));
  std::this_thread::sleep_for(std::chrono::milliseconds(200 + random() % 400));
  const int victim = shared->holder.load();
  const auto killed = mono_ns();
  ::kill(victim, SIGKILL);
  ::waitpid(victim, nullptr, 0);
  wait_for(2);
  const double ms = static_cast<double>(shared->last_promoted_ns.load() - killed) / 1e6;
  shared->stop.store(true);
  for (const pid_t pid : pids)
    if (pid != victim) ::waitpid(pid, nullptr, 0);
  shared->~FailoverShared();
  ::munmap(shared, sizeof(FailoverShared));
  return ms;
}

// ---------------------------------------------------------------------------------------------

std::string machine_line() {
  struct utsname u {};
  ::uname(&u);
  double load = 0;
  if (std::FILE* f = std::fopen("/proc/loadavg", "re")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = 0;
    std::fclose(f);
  }
  return fmt::format("{} {} | {} CPUs | load average {:.1f} at start | hiredis {}.{}.{}", u.sysname,
                     u.release, std::thread::hardware_concurrency(), load, HIREDIS_MAJOR,
                     HIREDIS_MINOR, HIREDIS_PATCH);
}

int run(const Config& cfg) {
  ::signal(SIGPIPE, SIG_IGN);
  if (!wltest::RedisServer::available()) {
    std::fprintf(stderr, "redis_bench: %s\n", wltest::RedisServer::missing_reason().c_str());
    return 1;
  }
  wltest::RedisServer server;
  const std::string redis_version = [&] {
    Hiredis h(server.port());
    return h.string({"INFO", "server"});
  }();
  std::string version = "?";
  if (const auto p = redis_version.find("redis_version:"); p != std::string::npos)
    version = redis_version.substr(p + 14, redis_version.find('\r', p) - p - 14);

  std::vector<std::string> notes;
  std::string reasons;
  const std::unique_ptr<wlbench::PythonCoprocess> python = wlbench::start_python(
      cfg.python, python_script, {std::to_string(server.port())}, notes, reasons);
  if (!python)
    notes.push_back("NOTE: redis-py row SKIPPED (" + reasons +
                    "); apt-get install python3-redis or pass --python");

  std::vector<Case> cases;
  // Floor: the bare lock, no token check on release, no fencing.
  auto floor_conn = std::make_shared<Hiredis>(server.port());
  cases.push_back({"hiredis SET k v NX PX + DEL (floor)", "2 round trips, 2 plain commands",
                   timed(
                       [c = floor_conn] {
                         expect(c->integer({"SET", "wlbench:floor", "v", "NX", "PX", "10000"}) == 1,
                                "floor: SET NX failed");
                       },
                       [c = floor_conn] {
                         c->integer({"DEL", "wlbench:floor"});
                       })});

  // The product.
  workerlock::RedisOptions o;
  o.url = server.url();
  o.key = "wlbench:backend";
  o.quarantine_after_data_loss = false;
  auto backend = std::make_shared<workerlock::RedisBackend>(o);
  cases.push_back(
      {"RedisBackend try_acquire() + release()",
       "2 round trips: EVALSHA acquire (SET NX PX + INCR fence), EVALSHA compare-DEL",
       timed([b = backend] { expect(b->try_acquire(), "RedisBackend: try_acquire failed"); },
             [b = backend] { b->release(); })});

  // The same scripts through hiredis's blocking API: the cost of workerlock's own I/O layer.
  auto script_conn = std::make_shared<Hiredis>(server.port());
  const std::string sha_acquire =
      script_conn->string({"SCRIPT", "LOAD", workerlock::detail::redis_acquire_script});
  const std::string sha_release =
      script_conn->string({"SCRIPT", "LOAD", workerlock::detail::redis_release_script});
  script_conn->integer({"SET", "wlbench:scripts:fence", "1000"});
  cases.push_back({"hiredis EVALSHA acquire script + EVALSHA release script",
                   "the same 2 scripts over hiredis's blocking API",
                   timed(
                       [c = script_conn, sha_acquire] {
                         expect(c->integer({"EVALSHA", sha_acquire, "2", "wlbench:scripts",
                                            "wlbench:scripts:fence", "tok", "10000", "", "0"}) > 0,
                                "scripts: acquire failed");
                       },
                       [c = script_conn, sha_release] {
                         c->integer({"EVALSHA", sha_release, "2", "wlbench:scripts",
                                     "wlbench:scripts:fence", "tok", "10000"});
                       })});

  // Alternative acquire paths: SET NX alone (no fencing token, redis-py's design), and
  // SET NX + INCR in MULTI/EXEC (fencing without a script, but INCR runs on every attempt).
  auto alt_conn = std::make_shared<Hiredis>(server.port());
  cases.push_back(
      {"hiredis SET NX PX + EVALSHA compare-DEL (no fencing)",
       "2 round trips: plain SET NX, release script",
       timed(
           [c = alt_conn] {
             expect(c->integer({"SET", "wlbench:setnx", "tok", "NX", "PX", "10000"}) == 1,
                    "setnx: SET NX failed");
           },
           [c = alt_conn, sha_release] {
             c->integer({"EVALSHA", sha_release, "2", "wlbench:setnx", "x", "tok", "0"});
           })});
  auto multi_conn = std::make_shared<Hiredis>(server.port());
  cases.push_back(
      {"hiredis MULTI SET NX PX, INCR EXEC + EVALSHA compare-DEL",
       "2 round trips: 4 pipelined commands, release script",
       timed(
           [c = multi_conn] {
             redisContext* ctx = c->get();
             redisAppendCommand(ctx, "MULTI");
             redisAppendCommand(ctx, "SET wlbench:multi tok NX PX 10000");
             redisAppendCommand(ctx, "INCR wlbench:multi:fence");
             redisAppendCommand(ctx, "EXEC");
             bool ok = true;
             for (int i = 0; i < 4; ++i) {
               void* reply = nullptr;
               if (redisGetReply(ctx, &reply) != REDIS_OK) fail("multi: connection");
               auto* r = static_cast<redisReply*>(reply);
               if (i == 3)
                 ok = r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
                      r->element[0]->type == REDIS_REPLY_STATUS;
               freeReplyObject(r);
             }
             expect(ok, "multi: SET NX failed");
           },
           [c = multi_conn, sha_release] {
             c->integer({"EVALSHA", sha_release, "2", "wlbench:multi", "x", "tok", "0"});
           })});

  if (python) {
    wlbench::PythonCoprocess* p = python.get();
    cases.push_back(
        {"redis-py redis.lock.Lock acquire(blocking=False) + release()",
         "2 round trips: SET NX PX, EVALSHA compare-DEL; timed inside Python", [p](int n) {
           const auto [cycle, acquire] = p->ask(fmt::format("{}\n", n), "the Python coprocess");
           return Sample{cycle, acquire};
         }});
  }

  std::fprintf(stderr, "redis_bench: warming up...\n");
  for (auto& c : cases) c.measure(std::max(10, cfg.iterations / 10));  // connect, load scripts

  std::mt19937 shuffle(12345);
  for (int round = 0; round < cfg.rounds; ++round) {
    std::fprintf(stderr, "\rredis_bench: round %d/%d", round + 1, cfg.rounds);
    for (const auto i : wlbench::shuffled_indices(cases.size(), shuffle)) {
      const auto sample = cases[i].measure(cfg.iterations);
      cases[i].samples.push_back(sample.cycle);
      cases[i].acquire.push_back(sample.acquire);
    }
  }
  std::fprintf(stderr, "\n");

  std::vector<double> fast_ms;
  std::vector<double> ttl_ms;
  for (int runs = 0; runs < cfg.failover_runs; ++runs) {
    std::fprintf(stderr, "\rredis_bench: failover run %d/%d", runs + 1, cfg.failover_runs);
    fast_ms.push_back(one_failover(server, true, runs));
    ttl_ms.push_back(one_failover(server, false, runs));
  }
  if (cfg.failover_runs > 0) std::fprintf(stderr, "\n");

  fmt::print("# workerlock Redis benchmark\n\n");
  fmt::print("{} | Redis {} on 127.0.0.1 (TCP) | {} rounds x {} cycles per case, shuffled\n",
             machine_line(), version, cfg.rounds, cfg.iterations);
  for (const auto& n : notes) fmt::print("{}\n", n);
  fmt::print(
      "\nWall clock, medians over rounds; ratio = median of the per-round ratios to the "
      "floor (p25..p75 in brackets):\n\n");
  fmt::print("| case | what it sends | acquire+release µs | ratio | acquire alone µs | ratio |\n");
  fmt::print("|---|---|---:|---:|---:|---:|\n");
  const auto ratio_text = [](const std::vector<double>& a, const std::vector<double>& floor) {
    const auto r = wlbench::ratios(a, floor);
    return fmt::format("{:.2f} ({:.2f}..{:.2f})", median(r), quantile(r, 0.25), quantile(r, 0.75));
  };
  for (const auto& c : cases) {
    fmt::print("| {} | {} | {:.1f} | {} | {:.1f} | {} |\n", c.name, c.how, median(c.samples) / 1000,
               ratio_text(c.samples, cases[0].samples), median(c.acquire) / 1000,
               ratio_text(c.acquire, cases[0].acquire));
  }
  if (cfg.failover_runs > 0) {
    fmt::print(
        "\nFailover: SIGKILL of the holder -> next on_promoted (3 Coordinator processes, "
        "ttl 1000 ms, poll 100 ms), {} runs:\n\n",
        cfg.failover_runs);
    fmt::print("| fast_local_failover | median ms | min ms | max ms |\n|---|---:|---:|---:|\n");
    const auto row = [](const char* name, const std::vector<double>& v) {
      fmt::print("| {} | {:.1f} | {:.1f} | {:.1f} |\n", name, median(v),
                 *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()));
    };
    row("true (pidfd on the local holder)", fast_ms);
    row("false (wait for the lease to expire)", ttl_ms);
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Config cfg = parse_args(argc, argv);
  return wlbench::report_errors("redis_bench", [&] { return run(cfg); });
}
