// tests/bench/bench_support.hpp: what the benchmark programs share: errors, clocks, argument
// parsing, the run's header line, temporary directories, statistics and a Python coprocess.
#pragma once

#include <fcntl.h>
#include <spawn.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>

extern char** environ;

namespace wlbench {

[[noreturn]] inline void fail_errno(std::string_view what, int e = errno) {
  throw std::system_error(e, std::system_category(), std::string(what));
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

//! Nanoseconds on `clock` (CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID, ...).
inline std::uint64_t read_clock(clockid_t clock) {
  struct timespec ts {};
  ::clock_gettime(clock, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ULL +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

inline std::uint64_t mono_ns() { return read_clock(CLOCK_MONOTONIC); }

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

inline std::string shell_quote(std::string_view arg) {
  const bool plain = !arg.empty() && std::all_of(arg.begin(), arg.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 ||
           std::strchr("_./=:,+-@%", c) != nullptr;
  });
  if (plain) return std::string(arg);
  std::string quoted = "'";
  for (char c : arg) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

//! The command line as a shell would take it back, for the report's header.
inline std::string command_line(int argc, char** argv) {
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + shell_quote(argv[i]);
  return command;
}

//! Walks argv[1..]: `handle(arg, value)` applies one argument and returns false for an unknown
//! one; `value()` takes the argument after it. A missing value, an unknown argument or a value
//! that std::stoi/std::stod rejects ends the program with status 2 and "<program>: ..." on
//! stderr, followed by the usage when `usage` is not null.
template <typename Handle>
void parse_options(int argc, char** argv, const char* program, void (*usage)(std::FILE*),
                   Handle handle) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s: %s needs a value\n", program, argv[i]);
        if (usage != nullptr) usage(stderr);
        std::exit(2);
      }
      return argv[++i];
    };
    try {
      if (!handle(arg, value)) {
        std::fprintf(stderr, "%s: unknown argument '%s'\n", program, argv[i]);
        if (usage != nullptr) usage(stderr);
        std::exit(2);
      }
    } catch (const std::logic_error&) {  // stoi/stod on garbage
      std::fprintf(stderr, "%s: bad value for %s\n", program, argv[i - 1]);
      std::exit(2);
    }
  }
}

//! main()'s body: returns run(); on an exception, flushes stdout, reports
//! "<program>: error: ..." on stderr and returns 1.
template <typename Run>
int report_errors(const char* program, Run run) {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "\n%s: error: %s\n", program, e.what());
    return 1;
  }
}

// ---------------------------------------------------------------------------------------------
// The machine and its file systems
// ---------------------------------------------------------------------------------------------

//! "date: ... | kernel: ... | compiler: ... (C++ ...L, optimized, NDEBUG) | cpus: N", the start
//! of a report's header line.
inline std::string machine_fields() {
  char date[64];
  const std::time_t t = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&t, &utc);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", &utc);
  struct utsname names {};
  ::uname(&names);
#if defined(__clang__)
  const std::string compiler = fmt::format("clang++ {}", __clang_version__);
#elif defined(__GNUC__)
  const std::string compiler = fmt::format("g++ {}", __VERSION__);
#else
  const std::string compiler = "unknown compiler";
#endif
#ifdef __OPTIMIZE__
  const char* optimized = "optimized";
#else
  const char* optimized = "NOT optimized";
#endif
#ifdef NDEBUG
  const char* ndebug = "NDEBUG";
#else
  const char* ndebug = "assertions on";
#endif
  return fmt::format("date: {} | kernel: {} {} | compiler: {} (C++ {}L, {}, {}) | cpus: {}", date,
                     names.sysname, names.release, compiler, __cplusplus, optimized, ndebug,
                     ::sysconf(_SC_NPROCESSORS_ONLN));
}

//! One line of /proc/self/mountinfo: the device ("major:minor"), mount point and type.
struct Mount {
  std::string device;
  std::string point;
  std::string type;
};

//! The mounts of /proc/self/mountinfo in its order (a later mount shadows an earlier one).
//! Fields: id parent major:minor root mountpoint ... - type ...
inline std::vector<Mount> read_mountinfo() {
  std::vector<Mount> mounts;
  std::ifstream mountinfo("/proc/self/mountinfo");
  std::string line;
  while (std::getline(mountinfo, line)) {
    std::vector<std::string> fields;
    std::size_t pos = 0;
    while (pos < line.size()) {
      const auto end = std::min(line.find(' ', pos), line.size());
      fields.emplace_back(line.substr(pos, end - pos));
      pos = end + 1;
    }
    const auto dash = std::find(fields.begin(), fields.end(), "-");
    if (fields.size() < 5 || dash == fields.end() || dash + 1 == fields.end()) continue;
    mounts.push_back({fields[2], fields[4], *(dash + 1)});
  }
  return mounts;
}

//! Whether the canonical path `path` lies under the mount point `point`.
inline bool is_under(const std::string& path, const std::string& point) {
  return path.compare(0, point.size(), point) == 0 &&
         (point == "/" || path.size() == point.size() || path[point.size()] == '/');
}

//! A fresh directory (mkdtemp) "<parent>/<prefix>.XXXXXX", removed with its contents when
//! this object goes away.
class TempDir {
 public:
  TempDir(const std::filesystem::path& parent, const std::string& prefix) {
    std::string templ = (parent / (prefix + ".XXXXXX")).native();
    if (::mkdtemp(templ.data()) == nullptr) fail_errno("mkdtemp in " + parent.native());
    path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// ---------------------------------------------------------------------------------------------
// Statistics and rounds
// ---------------------------------------------------------------------------------------------

//! Quantile q (0..1) by linear interpolation between the closest ranks; 0 for no data.
inline double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<std::size_t>(pos);
  const auto hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

inline double median(const std::vector<double>& v) { return quantile(v, 0.5); }

//! a[i] / b[i], round by round.
inline std::vector<double> ratios(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) r.push_back(a[i] / b[i]);
  return r;
}

//! 0..n-1 in a random order: the order in which a round runs its cases.
inline std::vector<std::size_t> shuffled_indices(std::size_t n, std::mt19937& random) {
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), random);
  return order;
}

// ---------------------------------------------------------------------------------------------
// A Python coprocess: `interpreter -c script args...` reads one request a line on stdin and
// answers each with one line "<number> <number>" on stdout; its first line is "READY <version>"
// (or anything else, why it cannot run). Its stderr is ours, so a traceback shows.
// ---------------------------------------------------------------------------------------------

class PythonCoprocess {
 public:
  //! Starts the coprocess; nullptr with `why` set when it does not start or does not say READY.
  static std::unique_ptr<PythonCoprocess> start(const std::string& interpreter, const char* script,
                                                const std::vector<std::string>& args,
                                                std::string& why) {
    int to_child[2];
    int from_child[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0) fail_errno("pipe");
    if (::pipe2(from_child, O_CLOEXEC) != 0) fail_errno("pipe");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, to_child[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&actions, from_child[1], STDOUT_FILENO);
    std::vector<std::string> words = {interpreter, "-c", script};
    words.insert(words.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& w : words) argv.push_back(w.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    const int rc =
        ::posix_spawnp(&pid, interpreter.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(to_child[0]);
    ::close(from_child[1]);
    if (rc != 0) {
      ::close(to_child[1]);
      ::close(from_child[0]);
      why = fmt::format("{}: cannot start ({})", interpreter, std::strerror(rc));
      return nullptr;
    }
    std::unique_ptr<PythonCoprocess> self(
        new PythonCoprocess(pid, to_child[1], ::fdopen(from_child[0], "r")));
    const auto first = self->read_line();
    if (!first || first->rfind("READY ", 0) != 0) {
      why = fmt::format("{}: {}", interpreter, first ? *first : "exited without an answer");
      return nullptr;
    }
    self->version_ = first->substr(6);
    return self;
  }

  ~PythonCoprocess() {
    ::close(to_child_);
    if (from_child_ != nullptr) std::fclose(from_child_);
    ::waitpid(pid_, nullptr, 0);
  }
  PythonCoprocess(const PythonCoprocess&) = delete;
  PythonCoprocess& operator=(const PythonCoprocess&) = delete;

  //! What followed "READY ".
  const std::string& version() const { return version_; }

  //! Sends `request` (one line, with its '\n') and returns the two numbers of the answer;
  //! `who` names the coprocess when it died.
  std::pair<double, double> ask(const std::string& request, std::string_view who) {
    std::size_t done = 0;
    while (done < request.size()) {
      const auto n = ::write(to_child_, request.data() + done, request.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail_errno("write to the Python coprocess");
      done += static_cast<std::size_t>(n);
    }
    const auto answer = read_line();
    if (!answer) fail(fmt::format("{} died (see its traceback above)", who));
    std::pair<double, double> result;
    if (std::sscanf(answer->c_str(), "%lf %lf", &result.first, &result.second) != 2)
      fail("unexpected answer from the Python coprocess: " + *answer);
    return result;
  }

 private:
  PythonCoprocess(pid_t pid, int to_child, std::FILE* from_child)
      : pid_(pid), to_child_(to_child), from_child_(from_child) {}

  std::optional<std::string> read_line() {
    std::string line;
    char buffer[256];
    while (std::fgets(buffer, sizeof buffer, from_child_) != nullptr) {
      line += buffer;
      if (!line.empty() && line.back() == '\n') {
        line.pop_back();
        return line;
      }
    }
    if (line.empty()) return std::nullopt;
    return line;
  }

  pid_t pid_;
  int to_child_;
  std::FILE* from_child_;
  std::string version_;
};

//! The coprocess of the first interpreter that starts: `chosen` (--python) when given, else
//! python3 on PATH, then /usr/bin/python3. Adds "Python row: <interpreter> (<version>)" to
//! `notes`; or returns nullptr with the reason of each interpreter in `why`, joined by "; ".
inline std::unique_ptr<PythonCoprocess> start_python(const std::string& chosen, const char* script,
                                                     const std::vector<std::string>& args,
                                                     std::vector<std::string>& notes,
                                                     std::string& why) {
  std::vector<std::string> candidates;
  if (!chosen.empty()) {
    candidates.push_back(chosen);
  } else {
    candidates = {"python3", "/usr/bin/python3"};
  }
  why.clear();
  for (const auto& interpreter : candidates) {
    std::string reason;
    auto python = PythonCoprocess::start(interpreter, script, args, reason);
    if (python) {
      notes.push_back(fmt::format("Python row: {} ({})", interpreter, python->version()));
      return python;
    }
    why += (why.empty() ? "" : "; ") + reason;
  }
  return nullptr;
}

}  // namespace wlbench
