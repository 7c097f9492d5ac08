// tests/support/postgres_server.hpp: a throwaway PostgreSQL cluster for tests and the PostgreSQL
// benchmark: initdb into a fresh temporary directory, listening on 127.0.0.1 on a free port
// and on a Unix socket in that directory, fsync off, stopped (pg_ctl stop -m immediate) and
// removed by the destructor. It can also listen on one more address and trust one more
// client network (the partition test's virtual link). As root, initdb and the server run as the
// `postgres` system user (else `nobody`). pg_hba.conf trusts everyone except the role `wl_pw`,
// which needs its password (scram-sha-256). Needs libpq for queries; does not need Catch2.
#pragma once

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <libpq-fe.h>

#include "servers.hpp"

extern char** environ;

namespace wltest {

class PostgresServer {
 public:
  //! The role that must authenticate with a password, and its password.
  static constexpr const char* password_user = "wl_pw";
  static constexpr const char* password = "wl-Secret-4711";

  //! The directory holding initdb, pg_ctl and postgres: $WORKERLOCK_PG_BINDIR, else the
  //! newest /usr/lib/postgresql/<version>/bin, else `pg_config --bindir`; empty when none.
  static std::string bindir() {
    const auto usable = [](const std::string& dir) {
      return !dir.empty() && ::access((dir + "/initdb").c_str(), X_OK) == 0 &&
             ::access((dir + "/pg_ctl").c_str(), X_OK) == 0 &&
             ::access((dir + "/postgres").c_str(), X_OK) == 0;
    };
    if (const char* env = std::getenv("WORKERLOCK_PG_BINDIR"); env != nullptr && *env != 0)
      return usable(env) ? std::string(env) : std::string();
    std::vector<std::pair<int, std::string>> found;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/usr/lib/postgresql", ec)) {
      const auto dir = (entry.path() / "bin").string();
      if (usable(dir)) found.emplace_back(std::atoi(entry.path().filename().c_str()), dir);
    }
    if (!found.empty()) return std::max_element(found.begin(), found.end())->second;
    if (std::FILE* pipe = ::popen("pg_config --bindir 2>/dev/null", "r")) {
      char buffer[512] = {};
      const auto n = std::fread(buffer, 1, sizeof buffer - 1, pipe);
      ::pclose(pipe);
      std::string dir(buffer, n);
      while (!dir.empty() && (dir.back() == '\n' || dir.back() == ' ')) dir.pop_back();
      if (usable(dir)) return dir;
    }
    return {};
  }

  static bool available() { return !bindir().empty(); }

  //! "PostgreSQL server binaries not found ..." for a skip message.
  static std::string missing_reason() {
    return "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found (looked at "
           "$WORKERLOCK_PG_BINDIR, "
           "/usr/lib/postgresql/*/bin, pg_config --bindir): PostgreSQL tests skipped; apt-get "
           "install postgresql";
  }

  //! initdb, then starts the server on a free port; throws std::runtime_error on failure.
  //! `also_listen` ("10.77.0.1") is added to listen_addresses, and clients from
  //! `also_trust` ("10.77.0.0/24") are trusted like those on 127.0.0.1.
  explicit PostgresServer(const std::string& also_listen = {}, const std::string& also_trust = {})
      : bin_(bindir()) {
    if (bin_.empty()) throw std::runtime_error(missing_reason());
    pick_user();
    char pattern[] = "/tmp/workerlock-pg-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
    try {
      if (run_as_user_) {
        if (::chown(dir_.c_str(), uid_, gid_) != 0)
          throw std::runtime_error("chown of the cluster directory failed");
      }
      const std::string data = (dir_ / "data").string();
      run({bin_ + "/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
           "--locale=C"},
          "initdb");
      {
        std::ofstream conf(dir_ / "data" / "postgresql.conf", std::ios::app);
        conf << "\n# workerlock test cluster\n"
             << "listen_addresses = '127.0.0.1" << (also_listen.empty() ? "" : ", ") << also_listen
             << "'\n"
             << "unix_socket_directories = '" << dir_.string() << "'\n"
             << "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
             << "max_connections = 200\nshared_buffers = 16MB\n"
             << "log_min_messages = warning\nlog_min_error_statement = panic\n";
        std::ofstream hba(dir_ / "data" / "pg_hba.conf", std::ios::trunc);
        hba << "local all " << password_user << " scram-sha-256\n"
            << "host all " << password_user << " 127.0.0.1/32 scram-sha-256\n"
            << "local all all trust\n"
            << "host all all 127.0.0.1/32 trust\n";
        if (!also_trust.empty()) hba << "host all all " << also_trust << " trust\n";
      }
      std::string error;
      if (!start_on_a_free_port(10, port_, error, [this](std::string& e) { return start(e); }))
        throw std::runtime_error("cannot start the PostgreSQL test cluster: " + error);
      query(fmt::format("CREATE ROLE {} LOGIN PASSWORD '{}'", password_user, password));
    } catch (...) {
      remove_dir();
      throw;
    }
  }

  ~PostgresServer() {
    stop();
    remove_dir();
  }

  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  int port() const { return port_; }
  const std::filesystem::path& dir() const { return dir_; }
  bool running() const { return running_; }

  //! A libpq conninfo over TCP: host=127.0.0.1 port=P dbname=postgres user=U [password=W].
  std::string conninfo(const std::string& user = "postgres", const std::string& pw = "") const {
    return conninfo_at("127.0.0.1", user, pw);
  }
  //! The same for another address the server listens on.
  std::string conninfo_at(const std::string& host, const std::string& user = "postgres",
                          const std::string& pw = "") const {
    std::string text = fmt::format("host={} port={} dbname=postgres user={}", host, port_, user);
    if (!pw.empty()) text += " password=" + pw;
    return text;
  }
  //! postgresql://U[:W]@127.0.0.1:P/postgres
  std::string url(const std::string& user = "postgres", const std::string& pw = "") const {
    return pw.empty() ? fmt::format("postgresql://{}@127.0.0.1:{}/postgres", user, port_)
                      : fmt::format("postgresql://{}:{}@127.0.0.1:{}/postgres", user, pw, port_);
  }
  //! Over the Unix socket in dir(), as the superuser.
  std::string admin_conninfo() const {
    return fmt::format("host={} port={} dbname=postgres user=postgres", dir_.string(), port_);
  }

  //! Runs `sql` on a fresh superuser connection; returns the first column of the first row
  //! ("" if none). Throws std::runtime_error on errors.
  std::string query(const std::string& sql) const {
    const auto r = execute(sql);
    if (PQresultStatus(r.get()) == PGRES_TUPLES_OK && PQntuples(r.get()) > 0 &&
        PQnfields(r.get()) > 0)
      return PQgetvalue(r.get(), 0, 0);
    return {};
  }

  //! All rows of the first column of `sql`.
  std::vector<std::string> query_column(const std::string& sql) const {
    const auto r = execute(sql);
    if (PQresultStatus(r.get()) != PGRES_TUPLES_OK)
      throw std::runtime_error("test query '" + sql + "' returned no rows");
    std::vector<std::string> values;
    for (int row = 0; row < PQntuples(r.get()); ++row)
      values.emplace_back(PQgetvalue(r.get(), row, 0));
    return values;
  }

  //! The server pid of the session holding the advisory lock `key`: objsubid 1 for
  //! pg_advisory_lock(bigint), 2 for the pair of int4 halves; 0 when nobody holds it.
  int lock_holder_pid(std::int64_t key, int objsubid = 1) const {
    const auto u = static_cast<std::uint64_t>(key);
    const auto pid =
        query(fmt::format("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                          "classid = {} AND objid = {} "
                          "AND objsubid = {}",
                          u >> 32, u & 0xffffffffu, objsubid));
    return pid.empty() ? 0 : std::atoi(pid.c_str());
  }

  //! How many sessions wait (not granted) for the advisory lock `key` (objsubid as above).
  int lock_waiters(std::int64_t key, int objsubid = 1) const {
    const auto u = static_cast<std::uint64_t>(key);
    return std::atoi(
        query(
            fmt::format("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                        "AND classid = {} AND objid = {} AND objsubid = {}",
                        u >> 32, u & 0xffffffffu, objsubid))
            .c_str());
  }

  //! pg_terminate_backend(pid); returns whether the server found it.
  bool terminate(int pid) const {
    return query(fmt::format("SELECT pg_terminate_backend({})", pid)) == "t";
  }

  //! Stops the server: `immediate` (a crash, the default), `fast` or `smart`.
  void stop(const char* mode = "immediate") {
    if (!running_) return;
    std::string ignored;
    run({bin_ + "/pg_ctl", "-D", (dir_ / "data").string(), "-m", mode, "-w", "-t", "60", "stop"},
        "pg_ctl stop", &ignored);
    running_ = false;
  }

  //! pg_ctl restart -m fast on the same port; throws on failure.
  void restart() {
    run({bin_ + "/pg_ctl", "-D", (dir_ / "data").string(), "-l", (dir_ / "server.log").string(),
         "-m", "fast", "-w", "-t", "60", "-o", fmt::format("-p {}", port_), "restart"},
        "pg_ctl restart");
    running_ = true;
  }

  //! The last `bytes` of the server log, for failure messages.
  std::string log_tail(std::size_t bytes = 2000) const {
    std::ifstream in(dir_ / "server.log");
    std::stringstream text;
    text << in.rdbuf();
    const auto all = text.str();
    return all.size() > bytes ? all.substr(all.size() - bytes) : all;
  }

 private:
  //! Runs `sql` on a fresh superuser connection; its result, which outlives the connection.
  //! Throws std::runtime_error when it cannot connect or the statement fails.
  std::unique_ptr<PGresult, void (*)(PGresult*)> execute(const std::string& sql) const {
    std::unique_ptr<PGconn, void (*)(PGconn*)> conn(PQconnectdb(admin_conninfo().c_str()),
                                                    &PQfinish);
    if (!conn || PQstatus(conn.get()) != CONNECTION_OK)
      throw std::runtime_error("test query: cannot connect: " +
                               std::string(PQerrorMessage(conn.get())));
    std::unique_ptr<PGresult, void (*)(PGresult*)> r(PQexec(conn.get(), sql.c_str()), &PQclear);
    const auto status = PQresultStatus(r.get());
    if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK)
      throw std::runtime_error("test query '" + sql + "' failed: " + PQresultErrorMessage(r.get()));
    return r;
  }

  void pick_user() {
    if (::geteuid() != 0) return;  // not root: run everything as ourselves
    for (const char* name : {"postgres", "nobody"}) {
      if (const passwd* pw = ::getpwnam(name)) {
        uid_ = pw->pw_uid;
        gid_ = pw->pw_gid;
        run_as_user_ = true;
        return;
      }
    }
    throw std::runtime_error(
        "running as root, and neither the 'postgres' nor the 'nobody' user exists");
  }

  bool start(std::string& error) {
    try {
      run({bin_ + "/pg_ctl", "-D", (dir_ / "data").string(), "-l", (dir_ / "server.log").string(),
           "-w", "-t", "60", "-o", fmt::format("-p {}", port_), "start"},
          "pg_ctl start");
      running_ = true;
      return true;
    } catch (const std::exception& e) {
      error = std::string(e.what()) + "\n" + log_tail();
      std::string ignored;  // a half-started server must not linger
      run({bin_ + "/pg_ctl", "-D", (dir_ / "data").string(), "-m", "immediate", "-w", "stop"},
          "pg_ctl stop", &ignored);
      return false;
    }
  }

  //! Runs a program as the cluster's user, output to dir()/commands.log. Throws (or, with
  //! `error`, fills it) if it does not exit with 0.
  void run(const std::vector<std::string>& args, const char* what,
           std::string* error = nullptr) const {
    const std::string log = (dir_ / "commands.log").string();
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<std::string> env_storage;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::strncmp(*e, "LC_ALL=", 7) != 0 && std::strncmp(*e, "PGDATA=", 7) != 0)
        env_storage.emplace_back(*e);
    }
    env_storage.emplace_back("LC_ALL=C");
    std::vector<char*> envp;
    for (auto& e : env_storage) envp.push_back(e.data());
    envp.push_back(nullptr);
    const std::string directory = dir_.string();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (fd >= 0) {
        ::dup2(fd, STDOUT_FILENO);
        ::dup2(fd, STDERR_FILENO);
        if (run_as_user_ && ::fchown(fd, uid_, gid_) != 0) {
        }
      }
      const int null = ::open("/dev/null", O_RDONLY);
      if (null >= 0) ::dup2(null, STDIN_FILENO);
      if (run_as_user_ &&
          (::setgroups(0, nullptr) != 0 || ::setgid(gid_) != 0 || ::setuid(uid_) != 0))
        ::_exit(126);
      if (::chdir(directory.c_str()) != 0) ::_exit(126);
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
    std::string message = fmt::format("{} failed (status {})", what, status);
    std::ifstream in(log);
    std::stringstream text;
    text << in.rdbuf();
    auto all = text.str();
    if (all.size() > 1500) all = all.substr(all.size() - 1500);
    message += ": " + all;
    if (error != nullptr) {
      *error = message;
      return;
    }
    throw std::runtime_error(message);
  }

  void remove_dir() {
    if (dir_.empty()) return;
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  std::string bin_;
  std::filesystem::path dir_;
  int port_ = 0;
  bool running_ = false;
  bool run_as_user_ = false;
  uid_t uid_ = 0;
  gid_t gid_ = 0;
};

}  // namespace wltest
