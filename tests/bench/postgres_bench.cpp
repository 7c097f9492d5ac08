// tests/bench/postgres_bench.cpp: PostgresBackend latency and failover time against a
// throwaway cluster (tests/support/postgres_server.hpp). Prints a Markdown report on stdout.
//
//   postgres_bench [--iterations N] [--runs N] [--quick]
//
// Latency: try_acquire() + release() through the backend, against the floor of bare libpq
// (PQexecParams) running the same statements, all over TCP on 127.0.0.1.
// Failover: a Coordinator holder is SIGKILLed; time until the waiting Coordinator's
// on_promoted runs, with the standby's fence session opened up front (the default) or not.

#include <signal.h>
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
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <libpq-fe.h>

#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/mapped_region.hpp>

#include <workerlock/coordinator.hpp>
#include <workerlock/postgres.hpp>

#include "../support/clock.hpp"
#include "../support/postgres_server.hpp"

namespace {

using namespace std::chrono_literals;
using workerlock::Coordinator;
using workerlock::CoordinatorOptions;
using workerlock::PostgresBackend;
using workerlock::PostgresOptions;

using wltest::mono_ns;

void progress(const std::string& line) {
  std::fprintf(stderr, "postgres_bench: %s\n", line.c_str());
}

struct Stats {
  double median = 0, p90 = 0, p99 = 0, max = 0, mean = 0;
  std::size_t n = 0;
};

Stats stats_of(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  const auto at = [&](double q) {
    return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
  };
  s.n = v.size();
  s.median = at(0.5);
  s.p90 = at(0.9);
  s.p99 = at(0.99);
  s.max = v.back();
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  return s;
}

//! Runs `body` `iterations` times (after a warm-up); returns microseconds per call.
std::vector<double> time_us(int iterations, const std::function<void()>& body) {
  for (int i = 0; i < std::max(10, iterations / 20); ++i) body();
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(iterations));
  for (int i = 0; i < iterations; ++i) {
    const auto t0 = mono_ns();
    body();
    samples.push_back(static_cast<double>(mono_ns() - t0) / 1e3);
  }
  return samples;
}

//! A plain blocking libpq connection: the floor.
class Bare {
 public:
  explicit Bare(const std::string& conninfo) : conn_(PQconnectdb(conninfo.c_str())) {
    if (PQstatus(conn_) != CONNECTION_OK) throw std::runtime_error(PQerrorMessage(conn_));
  }
  ~Bare() { PQfinish(conn_); }
  Bare(const Bare&) = delete;
  Bare& operator=(const Bare&) = delete;

  //! PQexecParams with text parameters; returns the first value.
  std::string exec(const char* sql, std::initializer_list<const char*> params) {
    PGresult* r = PQexecParams(conn_, sql, static_cast<int>(params.size()), nullptr, params.begin(),
                               nullptr, nullptr, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
      const std::string error = PQresultErrorMessage(r);
      PQclear(r);
      throw std::runtime_error(error);
    }
    std::string value = PQgetvalue(r, 0, 0);
    PQclear(r);
    return value;
  }

 private:
  PGconn* conn_;
};

// ---------------------------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------------------------

struct Board {
  std::atomic<int> holder{0};
  std::atomic<int> promotions{0};
  std::atomic<int> overlaps{0};
  std::atomic<int> killed{0};  // the holder the parent SIGKILLed last (stored before kill())
  std::atomic<std::int64_t> promoted_ns{0};
  std::atomic<bool> stop[256];
  Board() {
    for (auto& s : stop) s.store(false);
  }
};

pid_t spawn_coordinator(const PostgresOptions& o, Board& board, int index) {
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid != 0) return pid;
  int code = 0;
  try {
    CoordinatorOptions co;
    co.lock.log = nullptr;
    co.retry_backoff_max = 250ms;
    Coordinator c(std::make_unique<PostgresBackend>(o), co);
    const int me = static_cast<int>(::getpid());
    c.on_promoted([&] {
      board.promoted_ns.store(mono_ns());
      int expected = 0;
      if (!board.holder.compare_exchange_strong(expected, me)) {
        // A holder the parent has SIGKILLed runs no more user code, but until it is a zombie
        // its /proc state still reads running (the kernel frees its sessions while it
        // exits): only a holder that was not killed counts as a second primary.
        if (expected != board.killed.load() && ::kill(expected, 0) == 0) {
          char path[64];
          std::snprintf(path, sizeof path, "/proc/%d/stat", expected);
          if (std::FILE* f = std::fopen(path, "re")) {
            char buffer[512] = {};
            const auto n = std::fread(buffer, 1, sizeof buffer - 1, f);
            std::fclose(f);
            const char* close = std::strrchr(buffer, ')');
            if (n > 0 && close != nullptr && close[1] == ' ' && close[2] != 'Z')
              board.overlaps.fetch_add(1);
          }
        }
        board.holder.store(me);
      }
      board.promotions.fetch_add(1);
    });
    c.on_demoted([&] {
      int expected = me;
      board.holder.compare_exchange_strong(expected, 0);
    });
    c.start();
    while (!board.stop[index].load()) std::this_thread::sleep_for(2ms);
    c.stop();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "postgres_bench: child: %s\n", e.what());
    code = 1;
  }
  ::_exit(code);
}

bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!condition()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(200us);
  }
  return true;
}

//! The floor: a bare libpq process holds pg_advisory_lock(key), another waits in it; SIGKILL
//! the holder, time until the waiter's PQexec returns. Returns milliseconds per run.
std::vector<double> bare_failover(const wltest::PostgresServer& pg, std::int64_t key, int runs) {
  boost::interprocess::mapped_region region(
      boost::interprocess::anonymous_shared_memory(sizeof(Board)));
  Board* board = new (region.get_address()) Board();
  const std::string lock = fmt::format("SELECT pg_advisory_lock({})", key);
  const auto child = [&](bool holder) {
    const pid_t pid = ::fork();
    if (pid != 0) return pid;
    PGconn* conn = PQconnectdb(pg.conninfo().c_str());
    PGresult* r = PQexec(conn, lock.c_str());
    const bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!holder) board->promoted_ns.store(mono_ns());
    board->promotions.fetch_add(ok ? 1 : 1000);
    if (holder) ::pause();
    ::_exit(ok ? 0 : 1);
  };
  std::vector<double> ms;
  for (int run = 0; run < runs; ++run) {
    board->promotions.store(0);
    const pid_t holder = child(true);
    if (!eventually([&] { return board->promotions.load() == 1; }, 30s))
      throw std::runtime_error("bare holder");
    const pid_t waiter = child(false);
    if (!eventually([&] { return pg.lock_waiters(key, 1) == 1; }, 30s))
      throw std::runtime_error("bare waiter");
    const auto t0 = mono_ns();
    ::kill(holder, SIGKILL);
    if (!eventually([&] { return board->promotions.load() == 2; }, 30s))
      throw std::runtime_error("bare takeover");
    ms.push_back(static_cast<double>(board->promoted_ns.load() - t0) / 1e6);
    int status = 0;
    ::waitpid(holder, &status, 0);
    ::waitpid(waiter, &status, 0);
  }
  board->~Board();
  return ms;
}

//! SIGKILLs the holder `runs` times; returns the takeover times in milliseconds.
std::vector<double> failover(const wltest::PostgresServer& pg, PostgresOptions o, int runs,
                             int& overlaps) {
  boost::interprocess::mapped_region region(
      boost::interprocess::anonymous_shared_memory(sizeof(Board)));
  Board* board = new (region.get_address()) Board();
  const auto key = PostgresBackend::key_for(o.name);
  std::vector<pid_t> children;
  std::vector<double> takeover_ms;
  const auto reap_all = [&] {
    for (auto& s : board->stop) s.store(true);
    for (const pid_t pid : children) {
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
  };
  try {
    children.push_back(spawn_coordinator(o, *board, 0));
    if (!eventually([&] { return board->promotions.load() == 1; }, 30s))
      throw std::runtime_error("no first primary");
    for (int run = 0; run < runs && run + 1 < 256; ++run) {
      children.push_back(spawn_coordinator(o, *board, run + 1));
      // The new standby waits in pg_advisory_lock (its fence session, if any, is open by then).
      if (!eventually([&] { return pg.lock_waiters(key, 1) == 1; }, 30s))
        throw std::runtime_error("no standby");
      const int victim = board->holder.load();
      const int before = board->promotions.load();
      board->killed.store(victim);
      const auto t0 = mono_ns();
      ::kill(victim, SIGKILL);
      if (!eventually([&] { return board->promotions.load() == before + 1; }, 30s))
        throw std::runtime_error("no takeover");
      takeover_ms.push_back(static_cast<double>(board->promoted_ns.load() - t0) / 1e6);
    }
  } catch (...) {
    reap_all();
    throw;
  }
  reap_all();
  overlaps += board->overlaps.load();
  board->~Board();
  return takeover_ms;
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 2000;
  int runs = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      iterations = 200;
      runs = 10;
    } else if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::atoi(argv[++i]);
    } else if (arg == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--iterations N] [--runs N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (!wltest::PostgresServer::available()) {
    std::fprintf(stderr, "postgres_bench: %s\n", wltest::PostgresServer::missing_reason().c_str());
    return 1;
  }
  try {
    progress("starting a throwaway cluster");
    const auto t0 = mono_ns();
    wltest::PostgresServer pg;
    const double setup_ms = static_cast<double>(mono_ns() - t0) / 1e6;
    const std::string version = pg.query("SHOW server_version");

    PostgresOptions o;
    o.conninfo = pg.conninfo();
    o.name = "bench";
    o.restart_grace = 0ms;  // latency only; the cluster is seconds old
    const auto key = PostgresBackend::key_for(o.name);
    const std::string key_text = std::to_string(key);
    const std::string hi =
        std::to_string(static_cast<std::int32_t>(static_cast<std::uint64_t>(key) >> 32));
    const std::string lo =
        std::to_string(static_cast<std::int32_t>(static_cast<std::uint64_t>(key) & 0xffffffffu));

    struct Row {
      std::string what;
      std::string round_trips;
      std::function<void()> body;
      int floor;      //!< the row whose median is this one's floor, or -1
      int same_work;  //!< the bare libpq row doing the same statements, or -1
      std::vector<double> samples;
    };
    std::vector<Row> rows;

    progress("latency: bare libpq and PostgresBackend, interleaved in 20 rounds");
    Bare one(pg.conninfo());
    Bare two(pg.conninfo());
    const std::string life =
        two.exec("SELECT extract(epoch FROM pg_postmaster_start_time())::text", {});
    const char* fence =
        "SELECT l.got, pg_backend_pid(), CASE WHEN l.got THEN pg_current_xact_id()::text ELSE '0' "
        "END, "
        "((extract(epoch FROM clock_timestamp()) - $3::numeric) * 1000)::int8 "
        "FROM (SELECT pg_try_advisory_lock($1::int4, $2::int4) AS got OFFSET 0) AS l";
    PostgresBackend fenced(o);
    auto unfenced_options = o;
    unfenced_options.fencing = false;
    unfenced_options.name = "bench-unfenced";
    PostgresBackend unfenced(unfenced_options);
    auto verified_options = o;
    verified_options.name = "bench-verify";
    PostgresBackend verified(verified_options);
    if (!verified.try_acquire()) throw std::runtime_error("try_acquire() failed");
    const auto cycle = [](PostgresBackend& backend) {
      if (!backend.try_acquire()) throw std::runtime_error("try_acquire() failed");
      backend.release();
    };
    const auto add = [&](std::string what, std::string round_trips, std::function<void()> body,
                         int floor = -1, int same_work = -1) {
      rows.push_back(
          Row{std::move(what), std::move(round_trips), std::move(body), floor, same_work, {}});
    };
    add("bare libpq: `pg_try_advisory_lock($1)` + `pg_advisory_unlock($1)` (the floor)", "2", [&] {
      one.exec("SELECT pg_try_advisory_lock($1::int8)", {key_text.c_str()});
      one.exec("SELECT pg_advisory_unlock($1::int8)", {key_text.c_str()});
    });
    add("bare libpq: the backend's 6 statements (lock, fence, the proof on each session, two "
        "unlocks), one after the other, on 2 connections",
        "6", [&] {
          one.exec("SELECT pg_try_advisory_lock($1::int8), pg_backend_pid()", {key_text.c_str()});
          two.exec(fence, {hi.c_str(), lo.c_str(), life.c_str()});
          one.exec("SELECT pg_backend_pid()", {});
          two.exec("SELECT pg_backend_pid()", {});
          one.exec("SELECT pg_advisory_unlock($1::int8)", {key_text.c_str()});
          two.exec("SELECT pg_advisory_unlock($1::int4, $2::int4)", {hi.c_str(), lo.c_str()});
        });
    add(
        "PostgresBackend: `try_acquire()` + `release()`, fencing on",
        "4 (the proof and the unlocks pipelined)", [&] { cycle(fenced); }, 0, 1);
    add(
        "PostgresBackend: `try_acquire()` + `release()`, fencing off",
        "4 (the proof and the unlocks pipelined)", [&] { cycle(unfenced); }, 0);
    add("bare libpq: `SELECT pg_backend_pid()`", "1",
        [&] { one.exec("SELECT pg_backend_pid()", {}); });
    add(
        "PostgresBackend: `verify_held()` (both sessions, pipelined)", "1",
        [&] {
          if (!verified.verify_held()) throw std::runtime_error("verify_held() failed");
        },
        4);
    constexpr int rounds = 20;
    for (auto& row : rows) time_us(std::max(10, iterations / 20), row.body);  // warm-up
    for (int round = 0; round < rounds; ++round) {
      for (auto& row : rows) {
        for (int i = 0; i < std::max(1, iterations / rounds); ++i) {
          const auto begin = mono_ns();
          row.body();
          row.samples.push_back(static_cast<double>(mono_ns() - begin) / 1e3);
        }
      }
    }
    verified.release();

    // The failover runs use the default restart grace: let the cluster grow older than it.
    PostgresOptions f = o;
    f.restart_grace.reset();
    const auto grace = f.verify_interval + f.command_timeout;
    while (
        std::atoll(
            pg.query("SELECT (extract(epoch FROM clock_timestamp() - pg_postmaster_start_time()) * "
                     "1000)::int8")
                .c_str()) < grace.count() + 500) {
      std::this_thread::sleep_for(100ms);
    }
    int overlaps = 0;
    progress(fmt::format("failover: {} SIGKILLs, standbys with their fence session open", runs));
    f.name = "failover-eager";
    const auto eager = stats_of(failover(pg, f, runs, overlaps));
    const int lazy_runs = std::max(5, runs / 2);
    progress(fmt::format("failover: {} SIGKILLs, standby_fence_session = false", lazy_runs));
    f.name = "failover-lazy";
    f.standby_fence_session = false;
    const auto lazy = stats_of(failover(pg, f, lazy_runs, overlaps));
    progress(fmt::format("failover: {} SIGKILLs, bare libpq (the floor)", lazy_runs));
    const auto bare =
        stats_of(bare_failover(pg, PostgresBackend::key_for("failover-bare"), lazy_runs));

    std::printf("## PostgresBackend benchmark\n\n");
    std::printf(
        "PostgreSQL %s, throwaway cluster on 127.0.0.1 (TCP, trust auth, fsync off), set up in "
        "%.0f ms; %d "
        "iterations per latency row, interleaved in 20 rounds. Load average: ",
        version.c_str(), setup_ms, iterations);
    if (std::FILE* load = std::fopen("/proc/loadavg", "re")) {
      char buffer[64] = {};
      if (std::fgets(buffer, sizeof buffer, load) != nullptr) {
        buffer[std::strcspn(buffer, "\n")] = 0;
        std::printf("%s", buffer);
      }
      std::fclose(load);
    }
    std::printf(", %u CPUs.\n\n", std::thread::hardware_concurrency());
    std::printf(
        "### Latency (µs)\n\nmedian / floor: this row's median over the median of the bare "
        "libpq floor it is compared with (the 2-statement lock + unlock, or the single "
        "`SELECT`); median / same work: over the median of bare libpq running the backend's own "
        "statements one by one.\n\n| operation | round trips | median | p90 | p99 | max | mean | "
        "median / floor | median / same work |\n|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& row : rows) {
      const Stats st = stats_of(row.samples);
      const auto ratio = [&](int other) -> std::string {
        if (other < 0) return "";
        const double floor = stats_of(rows[static_cast<std::size_t>(other)].samples).median;
        return floor > 0 ? fmt::format("{:.2f}×", st.median / floor) : "";
      };
      std::printf("| %s | %s | %.0f | %.0f | %.0f | %.0f | %.0f | %s | %s |\n", row.what.c_str(),
                  row.round_trips.c_str(), st.median, st.p90, st.p99, st.max, st.mean,
                  ratio(row.floor).c_str(), ratio(row.same_work).c_str());
    }
    std::printf(
        "\n### Failover: SIGKILL of the holder → the waiting Coordinator's on_promoted (ms)\n\n");
    std::printf(
        "| standby | runs | median | p90 | p99 | max | goal |\n|---|---|---|---|---|---|---|\n");
    std::printf(
        "| fence session open while waiting (default) | %zu | %.1f | %.1f | %.1f | %.1f | p99 < 50 "
        "ms: %s |\n",
        eager.n, eager.median, eager.p90, eager.p99, eager.max, eager.p99 < 50 ? "met" : "MISSED");
    std::printf(
        "| `standby_fence_session = false` (connects on takeover) | %zu | %.1f | %.1f | %.1f | "
        "%.1f | |\n",
        lazy.n, lazy.median, lazy.p90, lazy.p99, lazy.max);
    std::printf(
        "| floor: bare libpq waiter in `pg_advisory_lock`, one lock, no Coordinator | %zu | %.1f | "
        "%.1f | %.1f | "
        "%.1f | |\n",
        bare.n, bare.median, bare.p90, bare.p99, bare.max);
    std::printf("\nTwo primaries at once: %d.\n", overlaps);
    return overlaps == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "postgres_bench: %s\n", e.what());
    return 1;
  }
}
