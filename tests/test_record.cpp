// tests/test_record.cpp: the holder record written into the lock file.
// Helpers live in tests/support/; every test forks real processes where it needs more than one.
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/election_lab.hpp"
#include "support/fixtures.hpp"
#include "support/lock_file_lab.hpp"

using namespace wltest;
using namespace wltest::election_lab;
using namespace wltest::lock_file_lab;

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "holder record: the primary's pid and acquired time via file text and cat and lock_holder",
    "[election]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  wltest::Shared<HolderBoard> board;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(mechanism));

  // As text, line by line.
  const auto text = read_file(path);
  INFO("file: " << text);
  const auto lines = split_lines(text);
  REQUIRE(lines.size() >= 2);
  CHECK(lines[0] == std::to_string(primary));
  CHECK(lines[1].rfind("acquired=", 0) == 0);
  CHECK(text.back() == '\n');
  const auto record = parse_exact_record(text);
  REQUIRE(record.has_value());
  CHECK(record->pid == primary);
  CHECK(seconds_apart(record->acquired, system_clock::now()) < 30.0);
  CHECK(record->host == host_name());
  CHECK(record->pid_namespace == pid_namespace_inode());
  CHECK(record->mechanism == workerlock::to_string(mechanism));

  // Through cat(1), as an operator would look.
  CHECK(run_command("cat " + shell_quote(path.string())) == text);
  CHECK(run_command("head -n 1 " + shell_quote(path.string())) == fmt::format("{}\n", primary));
  const auto copy = dir / "copy.txt";
  CHECK(std::system(
            ("cat " + shell_quote(path.string()) + " > " + shell_quote(copy.string())).c_str()) ==
        0);
  CHECK(read_file(copy) == text);

  // Through lock_holder() from the parent, which holds nothing.
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);
  CHECK(holder->recorded);
  REQUIRE(holder->acquired.has_value());
  CHECK(seconds_apart(*holder->acquired, system_clock::now()) < 30.0);
  CHECK(*holder->acquired == record->acquired);
  CHECK(holder->mechanism == mechanism);
  CHECK(holder->host == host_name());
  CHECK(holder->pid_namespace == pid_namespace_inode());

  board->release.store(true);
  CHECK(children.wait(primary) == 0);
  // Gone: nobody holds it, although the record stays in the file.
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
  CHECK(read_file(path) == text);
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "holder record: 20 secondaries leave the primary's record byte-for-byte intact",
                 "[election]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  wltest::Shared<HolderBoard> board;
  wltest::Shared<SecondaryBoard> others;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(mechanism));

  const auto before = read_file(path);
  REQUIRE(parse_exact_record(before).has_value());
  struct stat st_before {};
  REQUIRE(::stat(path.c_str(), &st_before) == 0);
  std::this_thread::sleep_for(20ms);  // so that a rewrite would show in the mtime too

  constexpr int kSecondaries = 20;
  std::vector<pid_t> pids;
  Gate all_forked;
  for (int i = 0; i < kSecondaries; ++i) {
    pids.push_back(children.spawn([&] {
      all_forked.pass();
      others->start.arrive_and_wait();
      auto [role, lock] = workerlock::is_primary_worker(path, quiet(mechanism));
      if (role != Role::secondary) return others->diag.fail("became primary while another holds");
      if (lock.owns_lock()) return others->diag.fail("secondary's handle owns the lock");
      if (lock.try_lock()) return others->diag.fail("try_lock() succeeded while another holds");
      const auto holder = workerlock::lock_holder(path);
      if (!holder || holder->pid != primary || !holder->recorded)
        return others->diag.fail(
            fmt::format("lock_holder says {}", holder ? holder->pid.value_or(-1) : -2));
      others->secondaries.fetch_add(1);
      return 0;
    }));
  }
  all_forked.open();
  REQUIRE(others->start.release_when(kSecondaries));
  int failures = 0;
  for (const pid_t pid : pids) failures += children.wait(pid) != 0 ? 1 : 0;
  INFO(others->diag.message());
  CHECK(failures == 0);
  CHECK(others->secondaries.load() == kSecondaries);

  const auto after = read_file(path);
  CHECK(after == before);
  struct stat st_after {};
  REQUIRE(::stat(path.c_str(), &st_after) == 0);
  CHECK(st_after.st_ino == st_before.st_ino);
  CHECK(st_after.st_size == st_before.st_size);
  CHECK(st_after.st_mtim.tv_sec == st_before.st_mtim.tv_sec);
  CHECK(st_after.st_mtim.tv_nsec == st_before.st_mtim.tv_nsec);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);

  board->release.store(true);
  CHECK(children.wait(primary) == 0);
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "holder record: a longer stale record is shrunk to exactly the new record",
                 "[election]") {
  const int kind = GENERATE(0, 1, 2);  // a file without any record is never written
  std::string stale;
  switch (kind) {
    case 0:  // a well-formed record, longer only by its pid's digits (4194303 is pid_max)
      stale = make_record(4194303, system_clock::now() - 1h, workerlock::to_string(mechanism),
                          host_name());
      break;
    case 1:  // a well-formed record with a long host name
      stale = make_record(4194303, system_clock::now() - 1h, "flock", std::string(300, 'h'));
      break;
    default:  // a record followed by a long garbage tail
      stale =
          make_record(1, system_clock::now(), "posix", host_name()) + std::string(5000, 'x') + "\n";
      break;
  }
  INFO("mechanism=" << workerlock::to_string(mechanism) << " stale kind=" << kind);
  REQUIRE(write_file(path, stale));

  wltest::Shared<HolderBoard> board;
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(mechanism));

  const auto text = read_file(path);
  INFO("file now: " << text.substr(0, 400));
  CHECK(text.size() < stale.size());
  CHECK(fs::file_size(path) == text.size());
  const auto record = parse_exact_record(text);  // exactly one record, nothing after it
  REQUIRE(record.has_value());
  CHECK(record->pid == primary);
  CHECK(record->mechanism == workerlock::to_string(mechanism));
  CHECK(seconds_apart(record->acquired, system_clock::now()) < 30.0);
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == primary);
  CHECK(holder->recorded);

  board->release.store(true);
  CHECK(children.wait(primary) == 0);
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "holder record: a file that is not a lock file is locked but never truncated or written",
    "[lock_file]") {
  const int kind = GENERATE(range(0, 4));
  const auto conf = dir / "important.conf";
  std::string content;
  switch (kind) {
    case 0:  // a configuration file that $WORKERLOCK_PATH named by mistake
      for (int i = 0; content.size() < 49780; ++i)
        content += fmt::format("setting_{} = value {}\n", i, i * 7);
      content.resize(49780);
      break;
    case 1:  // another tool's pidfile
      content = "12345\n";
      break;
    case 2:  // binary garbage shorter than a record
      for (int i = 0; i < 300; ++i) content += static_cast<char>((i * 37 + 11) % 256);
      break;
    default:  // one line without a newline
      content = "hello";
      break;
  }
  INFO("mechanism=" << workerlock::to_string(mechanism) << " kind=" << kind);
  REQUIRE(write_file(conf, content));
  const timespec long_ago[2] = {{1000000000, 0}, {1000000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, conf.c_str(), long_ago, 0) == 0);

  wltest::Shared<ForeignBoard> board;
  Children children;
  constexpr int workers = 4;
  for (int i = 0; i < workers; ++i) {
    children.spawn([&] {
      ::setenv("WORKERLOCK_PATH", conf.c_str(), 1);
      Options options;
      options.mechanism = mechanism;
      options.log = [&](LogLevel level, std::string_view line) {
        if (level == LogLevel::warning && line.find(conf.native()) != std::string_view::npos) {
          board->warnings_naming_path.fetch_add(1);
          board->warning.set(line);
        }
      };
      board->start.arrive_and_wait();
      std::error_code ec;
      auto election = workerlock::is_primary_worker(workerlock::default_lock_path(), options, ec);
      if (ec) {
        board->errors.fetch_add(1);
        return 2;
      }
      (election.role == Role::primary ? board->primaries : board->secondaries).fetch_add(1);
      const auto give_up = std::chrono::steady_clock::now() + 20s;
      while (!board->release.load() && std::chrono::steady_clock::now() < give_up)
        std::this_thread::sleep_for(1ms);
      return 0;
    });
  }
  REQUIRE(board->start.release_when(workers));
  REQUIRE(wltest::eventually(
      [&] { return board->primaries + board->secondaries + board->errors == workers; }));
  CHECK(board->errors.load() == 0);
  CHECK(board->primaries.load() == 1);
  CHECK(board->warnings_naming_path.load() == 1);
  INFO("warning: " << board->warning.str());
  CHECK_THAT(board->warning.str(), Catch::Matchers::Contains("not a workerlock lock file"));
  CHECK(other_process_try_lock(conf, mechanism) == kBusy);
  struct stat during {};
  REQUIRE(::stat(conf.c_str(), &during) == 0);
  CHECK(during.st_mtim.tv_sec == 1000000000);
  CHECK(read_file(conf) == content);
  board->release.store(true);
  CHECK(children.wait_all_failures() == 0);
  CHECK(read_file(conf) == content);

  // unlock_and_remove() releases it but never deletes it.
  const auto problem = in_child([&]() -> std::string {
    WorkerLock lock(conf, quiet(mechanism));
    if (!lock.try_lock()) return "try_lock failed";
    std::error_code ec;
    lock.unlock_and_remove(ec);
    if (ec != std::errc::operation_not_permitted) return "unlock_and_remove: " + ec.message();
    if (lock.owns_lock()) return "still held";
    return {};
  });
  CHECK(problem == "");
  CHECK(read_file(conf) == content);
  CHECK(other_process_try_lock(conf, mechanism) == kAcquired);
}

TEST_CASE("holder record: an empty file or one holding a record still gets the holder record",
          "[lock_file]") {
  const bool empty = GENERATE(true, false);
  wltest::TempDir dir;
  const auto path = dir / "ours.lock";
  REQUIRE(write_file(path, empty ? ""
                                 : "1\nacquired=2020-01-01T00:00:00.000000Z\nhost=x\n"
                                   "pidns=1\nmechanism=ofd\n" +
                                       std::string(2000, '#')));
  wltest::Shared<Text> warning;
  Children children;
  const pid_t child = children.spawn([&] {
    Options options;
    options.log = [&](LogLevel level, std::string_view line) {
      if (level != LogLevel::info) warning->set(line);
    };
    auto election = workerlock::is_primary_worker(path, options);
    return election.role == Role::primary ? 0 : 2;
  });
  CHECK(children.wait(child, 10s) == 0);
  CHECK(warning->str() == "");
  const auto text = read_file(path);
  CHECK(text.rfind(std::to_string(child) + "\n", 0) == 0);
  CHECK(text.size() < 512);
}
