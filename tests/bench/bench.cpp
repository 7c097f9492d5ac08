// workerlock benchmark: what a lock attempt and an election cost, side by side with the raw
// syscalls (the floor), boost::interprocess::file_lock and Python's filelock, in ONE run.
//
//   workerlock_bench [--rounds R] [--quick] [--dir DIR] [--sample-ms MS] [--clock cpu|wall]
//                    [--max-seconds S] [--python PATH]
//   bash tests/bench/run-bench.sh [same arguments]   (installs, builds Release, runs)
//
// A. try_lock()+unlock() on an open handle, per mechanism, holder record on and off, against
//    the raw lock+unlock syscall pair on an open descriptor.
// B. is_primary_worker() end to end (open+lock+record+unlock+close), against the same done by
//    hand, boost::interprocess::file_lock and Python's filelock (one python3 coprocess).
//
// Method, for a noisy shared machine: every case is calibrated to about --sample-ms of CPU
// time per sample; then, for R rounds, each group (a floor and the cases compared with it)
// runs one sample of each of its cases in a shuffled order. Each sample is timed by the
// thread's CPU time (what the code costs, however many other processes compete for the
// cores) and by the wall clock; --clock picks the one in the main table. Reported: the median
// ns/op over rounds, and the median over rounds of each round's ratio case/floor (so a slow
// round affects both sides of its ratio alike). The lock files live in fresh temporary
// directories under --dir and /dev/shm, one file per case, removed at exit.
// Output is Markdown on stdout; progress goes to stderr.
// Exit status: 0, or 1 when an operation fails (2 for bad arguments).

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <boost/interprocess/sync/file_lock.hpp>
#include <boost/version.hpp>

#include <workerlock/workerlock.hpp>

#include "bench_support.hpp"

#ifndef F_OFD_SETLK
#error "this benchmark needs Linux open file description locks (F_OFD_SETLK, Linux >= 3.15)"
#endif

namespace {

namespace fs = std::filesystem;
using workerlock::Mechanism;

using wlbench::fail;
using wlbench::fail_errno;
using wlbench::median;
using wlbench::quantile;
using wlbench::read_clock;

//! Both clocks of one sample: wall (CLOCK_MONOTONIC) and this thread's CPU time, which leaves
//! out the time other processes of a busy machine ran instead of us (but also any time spent
//! blocked, for instance waiting on a journal).
struct Stamp {
  std::uint64_t wall;
  std::uint64_t cpu;
};
Stamp now() { return {read_clock(CLOCK_MONOTONIC), read_clock(CLOCK_THREAD_CPUTIME_ID)}; }

//! ns per operation of one sample, by each clock.
struct PerOp {
  double wall = 0;
  double cpu = 0;
};
PerOp per_op(const Stamp& t0, const Stamp& t1, std::uint64_t n) {
  const auto count = static_cast<double>(n);
  return {static_cast<double>(t1.wall - t0.wall) / count,
          static_cast<double>(t1.cpu - t0.cpu) / count};
}

struct flock whole_file(short type) {
  struct flock range {};
  range.l_type = type;
  range.l_whence = SEEK_SET;
  return range;
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Config {
  int rounds = 15;
  double sample_ms = 25.0;
  bool cpu_clock = true;    // --clock cpu (default) or wall
  double max_seconds = 60;  // stop starting new rounds (after 3) past this; 0: never
  bool quick = false;
  std::string dir;     // empty: a temporary directory under /tmp
  std::string python;  // empty: try python3 on PATH, then /usr/bin/python3
  std::string command;
};

void usage(std::FILE* out) {
  std::fputs(
      "usage: workerlock_bench [--rounds R] [--quick] [--dir DIR] [--sample-ms MS] "
      "[--clock cpu|wall] [--max-seconds S] [--python PATH]\n"
      "  --rounds R      interleaved rounds; medians are over rounds (default 15; 3 with --quick)\n"
      "  --quick         smoke run: few rounds, short samples\n"
      "  --dir DIR       where the lock files of the first file system live (a fresh temporary\n"
      "                  directory is made inside DIR and removed at exit; default /tmp)\n"
      "                  /dev/shm (tmpfs) is measured too when it is another file system\n"
      "  --sample-ms MS  CPU time of one sample of one case (default 25; 2 with --quick)\n"
      "  --clock C       what the main table reports: cpu (this thread's CPU time, the\n"
      "                  default: robust on a busy machine) or wall (CLOCK_MONOTONIC);\n"
      "                  both are measured, the other one goes to the second table\n"
      "  --max-seconds S after S seconds of wall time, start no new round once 3 are done, so\n"
      "                  that a very busy machine does not stretch the run (default 60; 0: off)\n"
      "  --python PATH   interpreter for the Python filelock row (default: the first of\n"
      "                  python3 on PATH and /usr/bin/python3 that can import filelock)\n",
      out);
}

Config parse_args(int argc, char** argv) {
  Config cfg;
  bool rounds_given = false;
  bool sample_given = false;
  cfg.command = wlbench::command_line(argc, argv);
  // One argument; false for an unknown one.
  const auto option = [&](std::string_view arg, auto& value) {
    if (arg == "--rounds") {
      cfg.rounds = std::stoi(value());
      rounds_given = true;
    } else if (arg == "--quick") {
      cfg.quick = true;
    } else if (arg == "--dir") {
      cfg.dir = value();
    } else if (arg == "--sample-ms") {
      cfg.sample_ms = std::stod(value());
      sample_given = true;
    } else if (arg == "--clock") {
      const auto clock = value();
      if (clock != "cpu" && clock != "wall") {
        std::fprintf(stderr, "workerlock_bench: --clock takes cpu or wall\n");
        std::exit(2);
      }
      cfg.cpu_clock = clock == "cpu";
    } else if (arg == "--max-seconds") {
      cfg.max_seconds = std::stod(value());
    } else if (arg == "--python") {
      cfg.python = value();
    } else if (arg == "--help" || arg == "-h") {
      usage(stdout);
      std::exit(0);
    } else {
      return false;
    }
    return true;
  };
  wlbench::parse_options(argc, argv, "workerlock_bench", usage, option);
  if (cfg.quick) {
    if (!rounds_given) cfg.rounds = 3;
    if (!sample_given) cfg.sample_ms = 2.0;
  }
  if (cfg.rounds < 1 || cfg.sample_ms <= 0 || cfg.max_seconds < 0) {
    std::fprintf(stderr,
                 "workerlock_bench: --rounds and --sample-ms must be positive, --max-seconds "
                 "not negative\n");
    std::exit(2);
  }
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// File systems and directories
// ---------------------------------------------------------------------------------------------

//! "ext4 (f_type 0xef53)": the type from /proc/self/mountinfo (ext2/3/4 share one magic),
//! falling back to a name for statfs's f_type.
std::string filesystem_name(const fs::path& dir) {
  struct statfs sf {};
  if (::statfs(dir.c_str(), &sf) != 0) fail_errno("statfs " + dir.native());
  const auto magic = static_cast<unsigned long>(sf.f_type);
  std::string name;
  switch (magic) {
    case 0xEF53:
      name = "ext2/3/4";
      break;
    case 0x01021994:
      name = "tmpfs";
      break;
    case 0x858458F6:
      name = "ramfs";
      break;
    case 0x58465342:
      name = "xfs";
      break;
    case 0x9123683E:
      name = "btrfs";
      break;
    case 0x794C7630:
      name = "overlayfs";
      break;
    case 0x6969:
      name = "nfs";
      break;
    case 0x65735546:
      name = "fuse";
      break;
    case 0x2FC12FC1:
      name = "zfs";
      break;
    case 0xF2F52010:
      name = "f2fs";
      break;
    case 0x01021997:
      name = "9p";
      break;
    default:
      name = "unknown";
      break;
  }
  // Refine from mountinfo: the mount with this st_dev whose mount point is the longest
  // prefix of the directory.
  struct stat st {};
  std::error_code ec;
  const auto canonical = fs::canonical(dir, ec).native();
  if (::stat(dir.c_str(), &st) == 0 && !ec) {
    const auto dev = fmt::format("{}:{}", major(st.st_dev), minor(st.st_dev));
    std::size_t best = 0;
    for (const auto& mount : wlbench::read_mountinfo()) {
      if (mount.device == dev && wlbench::is_under(canonical, mount.point) &&
          mount.point.size() + 1 > best) {
        best = mount.point.size() + 1;
        name = mount.type;
      }
    }
  }
  return fmt::format("{} (f_type 0x{:x})", name, magic);
}

//! Where the lock files live: a fresh directory, removed with them at exit.
using wlbench::TempDir;
constexpr const char* kTempPrefix = "workerlock-bench";

void create_empty_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) fail_errno("create " + path.native());
  ::close(fd);
}

// ---------------------------------------------------------------------------------------------
// Python filelock, as a coprocess: one interpreter answers "N PATH" with ns per
// acquire()+release() cycle of one filelock.FileLock(PATH), timed inside Python.
// ---------------------------------------------------------------------------------------------

constexpr const char* python_script = R"PY(
import sys, time
try:
    import filelock
except Exception as e:
    print("MISSING %s: %s" % (type(e).__name__, e), flush=True)
    sys.exit(0)
print("READY filelock %s, Python %s" % (filelock.__version__, sys.version.split()[0]), flush=True)
locks = {}
for line in sys.stdin:
    n, path = line.rstrip("\n").split(" ", 1)
    n = int(n)
    lock = locks.get(path)
    if lock is None:
        lock = locks[path] = filelock.FileLock(path)
    acquire, release = lock.acquire, lock.release
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(n):
        acquire(timeout=0)  # raises filelock.Timeout if anyone else holds it
        release()
    c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
    print("%.3f %.3f" % ((w1 - w0) / n, (c1 - c0) / n), flush=True)
)PY";

// ---------------------------------------------------------------------------------------------
// Cases, groups, the harness
// ---------------------------------------------------------------------------------------------

struct Case {
  std::string name;
  std::string goal;                             // empty: no goal of its own
  double max_ratio = 0;                         // goal: median ratio to floor at most this
  int faster_than = -1;                         // goal: faster than this case of the group
  std::function<PerOp(std::uint64_t)> measure;  // runs N iterations, returns ns/op
  std::uint64_t iterations = 1;
  std::vector<double> samples;  // ns/op by the reported clock, one per round
  std::vector<double> other;    // ns/op by the other clock
};

struct Group {
  std::string title;  // printed before the case names
  std::vector<Case> cases;
  std::size_t floor = 0;  // index of the floor case
};

//! Wraps a loop body into a timed measurement.
template <typename Body>
std::function<PerOp(std::uint64_t)> timed(Body body) {
  return [body](std::uint64_t n) mutable {
    const auto t0 = now();
    for (std::uint64_t i = 0; i < n; ++i) body();
    return per_op(t0, now(), n);
  };
}

//! Sets the iterations of one sample so that it takes about `sample_ns` of CPU time; the
//! fastest of three tries guards against a try that was preempted.
void calibrate(Case& c, double sample_ns) {
  std::uint64_t n = 1;
  c.measure(n);  // warm up: opens files, faults pages in
  for (;;) {
    const double ns = c.measure(n).cpu;
    if (ns * static_cast<double>(n) >= sample_ns / 10 || n >= (1ULL << 30)) break;
    n *= 4;
  }
  double best = c.measure(n).cpu;
  for (int i = 0; i < 2; ++i) best = std::min(best, c.measure(n).cpu);
  best = std::max(best, 1.0);
  c.iterations = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(sample_ns / best));
}

std::vector<double> ratios(const Case& a, const Case& b) {
  return wlbench::ratios(a.samples, b.samples);
}

// ---------------------------------------------------------------------------------------------
// A. try_lock()+unlock() on an open handle
// ---------------------------------------------------------------------------------------------

struct Primitive {
  Mechanism mechanism;
  std::string floor_name;
  int (*lock)(int fd);
  int (*unlock)(int fd);
};

int ofd_lock(int fd) {
  auto r = whole_file(F_WRLCK);
  return ::fcntl(fd, F_OFD_SETLK, &r);
}
int ofd_unlock(int fd) {
  auto r = whole_file(F_UNLCK);
  return ::fcntl(fd, F_OFD_SETLK, &r);
}
int posix_lock(int fd) {
  auto r = whole_file(F_WRLCK);
  return ::fcntl(fd, F_SETLK, &r);
}
int posix_unlock(int fd) {
  auto r = whole_file(F_UNLCK);
  return ::fcntl(fd, F_SETLK, &r);
}
int flock_lock(int fd) { return ::flock(fd, LOCK_EX | LOCK_NB); }
int flock_unlock(int fd) { return ::flock(fd, LOCK_UN); }

//! Owns what the cases of the benchmark keep open between samples.
struct Fixtures {
  std::vector<std::unique_ptr<workerlock::WorkerLock>> locks;
  std::vector<int> fds;
  ~Fixtures() {
    locks.clear();
    for (int fd : fds) ::close(fd);
  }
};

Group try_lock_group(const Primitive& p, const fs::path& dir, const std::string& fs_label,
                     Fixtures& fixtures) {
  Group g;
  g.title = fmt::format("A {} {}", to_string(p.mechanism), fs_label);

  const fs::path raw_path = dir / fmt::format("a-{}-raw.lock", to_string(p.mechanism));
  const int fd = ::open(raw_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) fail_errno("open " + raw_path.native());
  fixtures.fds.push_back(fd);
  Case floor;
  floor.name = p.floor_name + " on an open fd (floor)";
  floor.measure = timed([fd, p, raw_path] {
    if (p.lock(fd) != 0) fail_errno("raw lock " + raw_path.native());
    if (p.unlock(fd) != 0) fail_errno("raw unlock " + raw_path.native());
  });
  g.cases.push_back(std::move(floor));

  for (const bool record : {false, true}) {
    workerlock::Options options = workerlock::Options{}.silent().with(p.mechanism);
    options.write_holder_record = record;
    const fs::path path =
        dir / fmt::format("a-{}-{}.lock", to_string(p.mechanism), record ? "record" : "norecord");
    auto lock = std::make_unique<workerlock::WorkerLock>(path, options);
    if (!lock->try_lock()) fail("cannot take " + path.native() + " (held by someone else?)");
    lock->unlock();  // the file stays open: what is measured is the re-lock
    workerlock::WorkerLock* handle = lock.get();
    fixtures.locks.push_back(std::move(lock));
    Case c;
    c.name = fmt::format("WorkerLock try_lock()+unlock(), write_holder_record={}{}",
                         record ? "true" : "false", record ? " (default)" : "");
    c.goal = "<= 1.2x floor";
    c.max_ratio = 1.2;
    c.measure = timed([handle] {
      if (!handle->try_lock()) fail("try_lock() found " + handle->path().native() + " held");
      handle->unlock();
    });
    g.cases.push_back(std::move(c));
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// B. is_primary_worker() end to end
// ---------------------------------------------------------------------------------------------

Group election_group(const fs::path& dir, const std::string& fs_label,
                     wlbench::PythonCoprocess* python) {
  Group g;
  g.title = fmt::format("B {}", fs_label);
  const std::string pid_text = fmt::format("{}\n", ::getpid());

  // (1) the floor: what a careful hand-written election does.
  const fs::path floor_path = dir / "b-floor.lock";
  Case floor;
  floor.name = "open(O_RDWR|O_CREAT|O_CLOEXEC)+F_OFD_SETLK+pwrite(pid)+close by hand (floor)";
  floor.measure = timed([floor_path, pid_text] {
    const int fd = ::open(floor_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) fail_errno("open " + floor_path.native());
    auto range = whole_file(F_WRLCK);
    if (::fcntl(fd, F_OFD_SETLK, &range) != 0) fail_errno("F_OFD_SETLK " + floor_path.native());
    if (::pwrite(fd, pid_text.data(), pid_text.size(), 0) != static_cast<ssize_t>(pid_text.size()))
      fail_errno("pwrite " + floor_path.native());
    ::close(fd);  // releases the OFD lock
  });
  g.cases.push_back(std::move(floor));

  // (2) workerlock.
  const fs::path wl_path = dir / "b-workerlock.lock";
  const workerlock::Options options = workerlock::Options{}.silent();
  Case wl;
  wl.name = "is_primary_worker(path, Options{}.silent()), handle destroyed";
  wl.goal = "<= 2x floor, < Python filelock";
  wl.max_ratio = 2.0;
  wl.measure = timed([wl_path, options] {
    auto election = workerlock::is_primary_worker(wl_path, options);
    if (election.role != workerlock::Role::primary)
      fail("lost the election on " + wl_path.native());
  });
  g.cases.push_back(std::move(wl));

  // (3) boost::interprocess::file_lock (a POSIX fcntl lock) needs an existing file and has no
  // accessor for its descriptor: it opens the lowest free one, found by a probe and checked
  // against the file's inode once per sample, so that the pid can be written as in the floor.
  const fs::path boost_path = dir / "b-boost.lock";
  create_empty_file(boost_path);
  Case boost_case;
  boost_case.name = "boost::interprocess::file_lock ctor+try_lock+pwrite(pid)+unlock+dtor";
  boost_case.measure = [boost_path, pid_text](std::uint64_t n) {
    struct stat expected {};
    if (::stat(boost_path.c_str(), &expected) != 0) fail_errno("stat " + boost_path.native());
    const int probe = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (probe < 0) fail_errno("open /dev/null");
    ::close(probe);
    {
      boost::interprocess::file_lock check(boost_path.c_str());
      struct stat st {};
      if (::fstat(probe, &st) != 0 || st.st_ino != expected.st_ino || st.st_dev != expected.st_dev)
        fail("boost::interprocess::file_lock did not open the lowest free descriptor");
    }
    const auto t0 = now();
    for (std::uint64_t i = 0; i < n; ++i) {
      boost::interprocess::file_lock lock(boost_path.c_str());
      if (!lock.try_lock())
        fail("boost file_lock::try_lock() found " + boost_path.native() + " held");
      if (::pwrite(probe, pid_text.data(), pid_text.size(), 0) !=
          static_cast<ssize_t>(pid_text.size()))
        fail_errno("pwrite " + boost_path.native());
      lock.unlock();
    }
    return per_op(t0, now(), n);
  };
  g.cases.push_back(std::move(boost_case));

  // (4) Python filelock, if an interpreter with it was found.
  if (python != nullptr) {
    const fs::path py_path = dir / "b-python.lock";
    Case py;
    py.name =
        "Python filelock.FileLock acquire()+release() in one python3 (open+flock+unlock+close)";
    py.measure = [python, py_path](std::uint64_t n) {
      const auto [wall, cpu] =
          python->ask(fmt::format("{} {}\n", n, py_path.native()), "the Python filelock coprocess");
      return PerOp{wall, cpu};
    };
    g.cases.push_back(std::move(py));
    g.cases[1].faster_than = static_cast<int>(g.cases.size() - 1);
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

std::string header_line(const Config& cfg) {
  return fmt::format("{} | command: `{}`", wlbench::machine_fields(), cfg.command);
}

//! Markdown table cells cannot hold a bare '|'.
std::string cell(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

std::string format_ns(double ns) {
  if (ns >= 100000) return fmt::format("{:.0f}", ns);
  if (ns >= 100) return fmt::format("{:.0f}", ns);
  return fmt::format("{:.1f}", ns);
}

std::vector<double> other_ratios(const Case& a, const Case& b) {
  return wlbench::ratios(a.other, b.other);
}

void print_report(const std::vector<Group>& groups, const Config& cfg, int rounds) {
  const char* clock = cfg.cpu_clock ? "CPU time" : "wall time";
  const char* other_clock = cfg.cpu_clock ? "wall" : "CPU";
  fmt::print("ns/op by {} (--clock {}):\n\n", clock, cfg.cpu_clock ? "cpu" : "wall");
  fmt::print("| case | ns/op (median) | ratio to floor | goal | met? |\n");
  fmt::print("|---|---:|---:|---|---|\n");
  for (const auto& g : groups) {
    const Case& floor = g.cases[g.floor];
    for (std::size_t i = 0; i < g.cases.size(); ++i) {
      const Case& c = g.cases[i];
      const double ratio = i == g.floor ? 1.0 : median(ratios(c, floor));
      std::string met = i == g.floor ? "(floor)" : "-";
      if (c.max_ratio > 0) {
        const bool ratio_ok = ratio <= c.max_ratio;
        met = fmt::format("{} ({:.2f}x {} {:.1f}x)", ratio_ok ? "yes" : "**no**", ratio,
                          ratio_ok ? "<=" : ">", c.max_ratio);
        if (c.faster_than >= 0) {
          const double vs = median(ratios(c, g.cases[static_cast<std::size_t>(c.faster_than)]));
          met = fmt::format("{}; {} ({:.2f}x Python's time)", met, vs < 1.0 ? "yes" : "**no**", vs);
        } else if (c.goal.find("Python") != std::string::npos) {
          met += "; Python row skipped";
        }
      }
      fmt::print("| {}: {} | {} | {:.2f} | {} | {} |\n", g.title, cell(c.name),
                 format_ns(median(c.samples)), ratio, c.goal.empty() ? "-" : c.goal, met);
    }
  }
  fmt::print(
      "\nSpread over the {} rounds ({}: min / p25 / p75 / max ns/op, ratio to floor p25..p75), "
      "and the same by {} time (median ns/op, median ratio):\n\n",
      rounds, clock, other_clock);
  fmt::print(
      "| case | min | p25 | p75 | max | ratio p25..p75 | {} ns/op | {} ratio | iterations/sample "
      "|\n",
      other_clock, other_clock);
  fmt::print("|---|---:|---:|---:|---:|---|---:|---:|---:|\n");
  for (const auto& g : groups) {
    const Case& floor = g.cases[g.floor];
    for (std::size_t i = 0; i < g.cases.size(); ++i) {
      const Case& c = g.cases[i];
      const auto r = ratios(c, floor);
      const auto& s = c.samples;
      fmt::print("| {}: {} | {} | {} | {} | {} | {:.2f}..{:.2f} | {} | {:.2f} | {} |\n", g.title,
                 cell(c.name), format_ns(quantile(s, 0)), format_ns(quantile(s, 0.25)),
                 format_ns(quantile(s, 0.75)), format_ns(quantile(s, 1)), quantile(r, 0.25),
                 quantile(r, 0.75), format_ns(median(c.other)), median(other_ratios(c, floor)),
                 c.iterations);
    }
  }
}

int run(const Config& cfg) {
  const auto program_start = now();
  ::signal(SIGPIPE, SIG_IGN);     // a dead coprocess shows up as a write error
  ::unsetenv("WORKERLOCK_ROLE");  // the operator override would turn every election secondary

  // The Python coprocess first, before any lock file is open.
  std::vector<std::string> notes;
  std::string why;
  const std::unique_ptr<wlbench::PythonCoprocess> python =
      wlbench::start_python(cfg.python, python_script, {}, notes, why);
  if (!python) {
    notes.push_back(fmt::format(
        "NOTE: Python filelock row SKIPPED: no interpreter could import filelock ({}). "
        "Install Debian's python3-filelock (tests/bench/run-bench.sh does) or pass --python.",
        why));
  }

  const TempDir main_dir(cfg.dir.empty() ? fs::path("/tmp") : fs::path(cfg.dir), kTempPrefix);
  std::vector<std::pair<fs::path, std::string>> dirs;
  dirs.emplace_back(main_dir.path(), filesystem_name(main_dir.path()));
  std::unique_ptr<TempDir> shm_dir;
  {
    struct stat a {};
    struct stat b {};
    if (::stat("/dev/shm", &b) == 0 && S_ISDIR(b.st_mode) && ::access("/dev/shm", W_OK) == 0 &&
        ::stat(main_dir.path().c_str(), &a) == 0 && a.st_dev != b.st_dev) {
      shm_dir = std::make_unique<TempDir>("/dev/shm", kTempPrefix);
      dirs.emplace_back(shm_dir->path(), filesystem_name(shm_dir->path()));
    } else {
      notes.push_back(
          "/dev/shm: not measured (absent, not writable, or the same file system as --dir)");
    }
  }

  Fixtures fixtures;
  std::vector<Group> groups;
  const Primitive primitives[] = {
      {Mechanism::ofd, "fcntl(F_OFD_SETLK, F_WRLCK)+fcntl(F_OFD_SETLK, F_UNLCK)", ofd_lock,
       ofd_unlock},
      {Mechanism::posix, "fcntl(F_SETLK, F_WRLCK)+fcntl(F_SETLK, F_UNLCK)", posix_lock,
       posix_unlock},
      {Mechanism::flock, "flock(LOCK_EX|LOCK_NB)+flock(LOCK_UN)", flock_lock, flock_unlock},
  };
  for (const auto& [dir, fs_name] : dirs) {
    const std::string label = fs_name.substr(0, fs_name.find(' '));
    for (const auto& p : primitives) groups.push_back(try_lock_group(p, dir, label, fixtures));
  }
  for (const auto& [dir, fs_name] : dirs) {
    const std::string label = fs_name.substr(0, fs_name.find(' '));
    groups.push_back(election_group(dir, label, python.get()));
  }

  const double sample_ns = cfg.sample_ms * 1e6;
  std::fprintf(stderr, "workerlock_bench: calibrating %zu groups...\n", groups.size());
  for (auto& g : groups)
    for (auto& c : g.cases) calibrate(c, sample_ns);

  std::mt19937 shuffle(12345);
  const auto started = now();
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  int rounds_done = 0;
  for (int round = 0; round < cfg.rounds; ++round) {
    const double elapsed = static_cast<double>(now().wall - program_start.wall) / 1e9;
    if (cfg.max_seconds > 0 && round >= 3 && elapsed > cfg.max_seconds) {
      notes.push_back(fmt::format(
          "NOTE: stopped after {} of {} rounds: --max-seconds {} was spent (a busy machine?)",
          round, cfg.rounds, cfg.max_seconds));
      break;
    }
    rounds_done = round + 1;
    if (tty) std::fprintf(stderr, "\rworkerlock_bench: round %d/%d", round + 1, cfg.rounds);
    std::vector<std::size_t> group_order(groups.size());
    for (std::size_t i = 0; i < groups.size(); ++i)
      group_order[i] = (i + static_cast<std::size_t>(round)) % groups.size();
    for (const auto gi : group_order) {
      auto& g = groups[gi];
      for (const auto ci : wlbench::shuffled_indices(g.cases.size(), shuffle)) {
        auto& c = g.cases[ci];
        const auto sample = c.measure(c.iterations);
        c.samples.push_back(cfg.cpu_clock ? sample.cpu : sample.wall);
        c.other.push_back(cfg.cpu_clock ? sample.wall : sample.cpu);
      }
    }
  }
  std::fprintf(stderr, "%sworkerlock_bench: %d rounds in %.1f s\n", tty ? "\r" : "", rounds_done,
               static_cast<double>(now().wall - started.wall) / 1e9);

  fmt::print("# workerlock benchmark\n\n{}\n\n", header_line(cfg));
  fmt::print(
      "rounds: {} | sample: ~{} ms per case per round | medians over rounds; ratio = median of "
      "per-round ratios to the group's floor | Boost {}.{}.{} | fmt {}\n",
      rounds_done, cfg.sample_ms, BOOST_VERSION / 100000, BOOST_VERSION / 100 % 1000,
      BOOST_VERSION % 100, FMT_VERSION);
  for (const auto& [dir, fs_name] : dirs)
    fmt::print("file system of {}: {}\n", dir.native(), fs_name);
  for (const auto& n : notes) fmt::print("{}\n", n);
  fmt::print("\n");
  print_report(groups, cfg, rounds_done);
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Config cfg = parse_args(argc, argv);
  return wlbench::report_errors("workerlock_bench", [&] { return run(cfg); });
}
