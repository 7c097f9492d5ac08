// tests/test_holder.cpp: lock_holder(): who holds a lock, across mechanisms, file systems, threads
// and pid namespaces. Helpers live in tests/support/; every test forks real processes where it
// needs more than one.
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <boost/interprocess/sync/file_lock.hpp>
#include <catch2/catch.hpp>

#include <workerlock/holder.hpp>
#include <workerlock/worker_lock.hpp>
#include <workerlock/workerlock.hpp>

#include "support/election_lab.hpp"
#include "support/file_lab.hpp"
#include "support/fixtures.hpp"
#include "support/fork_lab.hpp"
#include "support/holder_lab.hpp"

using namespace wltest;
using namespace wltest::file_lab;
using namespace wltest::election_lab;
using namespace wltest::fork_lab;
using namespace wltest::holder_lab;

// Holder::pid used to be a pid_t with sentinels (-1: an OFD lock without a record, 0: a
// holder in another pid namespace), and kill(holder->pid, SIGTERM) with -1 signals every
// process the caller may signal. Now a caller cannot hand it to kill() without looking.
static_assert(!std::is_invocable_v<decltype(&::kill), decltype(workerlock::Holder::pid), int>,
              "kill(holder->pid, SIGTERM) must not compile: Holder::pid may be absent");
static_assert(std::is_same_v<decltype(workerlock::Holder::pid), std::optional<pid_t>>);
static_assert(std::is_same_v<decltype(workerlock::Holder::mechanism), Mechanism>);

TEST_CASE(
    "lock_holder: never drops this process's boost::interprocess::file_lock, even "
    "while another process holds an flock lock on the file",
    "[interop]") {
  const bool boost_first = GENERATE(true, false);
  INFO("boost's POSIX lock taken " << (boost_first ? "before" : "after") << " the flock lock");
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  REQUIRE(write_file(path, ""));
  const auto boost_busy_in_child = [&] {
    return run_child([&] {
             boost::interprocess::file_lock lock(path.c_str());
             return lock.try_lock() ? 10 : 20;
           }) == 20;
  };
  // flock and POSIX locks do not conflict, so both are held at once, listed in /proc/locks
  // in either order.
  boost::interprocess::file_lock ours(path.c_str());
  if (boost_first) REQUIRE(ours.try_lock());
  wltest::Shared<Handshake> hs;
  Child flock_holder([&] { return hold_until_released(*hs, path, quiet(Mechanism::flock)); });
  REQUIRE(holds(*hs));
  if (!boost_first) REQUIRE(ours.try_lock());
  REQUIRE(boost_busy_in_child());

  for (int round = 0; round < 3; ++round) {
    const auto who = workerlock::lock_holder(path);
    REQUIRE(who.has_value());
    CHECK((who->pid == ::getpid() || who->pid == flock_holder.pid()));
  }
  // Opening and closing the file here would have dropped our POSIX lock.
  CHECK(boost_busy_in_child());
  hs->release = true;
  REQUIRE(flock_holder.wait() == 0);
  CHECK(boost_busy_in_child());
  ours.unlock();
  CHECK_FALSE(boost_busy_in_child());
}

TEST_CASE("lock_holder: reports flock(1)'s kernel pid, not a stale record", "[interop]") {
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  // An earlier workerlock primary wrote its record, then exited.
  const int code = run_child([&] {
    const auto election = workerlock::is_primary_worker(path, quiet(Mechanism::flock));
    return election.role == Role::primary ? 0 : 1;
  });
  REQUIRE(code == 0);
  const std::string stale = read_file(path);
  REQUIRE_FALSE(stale.empty());
  const pid_t stale_pid = std::stoi(stale);

  Program holder(flock_holder_command(path));
  REQUIRE(holder.read_line() == "ready");
  REQUIRE(read_file(path) == stale);  // flock(1) does not write
  REQUIRE(stale_pid != holder.pid());
  const auto who = workerlock::lock_holder(path);
  REQUIRE(who.has_value());
  CHECK(who->pid == holder.pid());
  CHECK_FALSE(who->recorded);
  CHECK(who->mechanism == Mechanism::flock);
  CHECK_FALSE(who->acquired.has_value());
  REQUIRE(holder.wait() == 0);
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
}

TEST_CASE(
    "lock_holder: does not trust a record whose pid now belongs to a later process, "
    "when a program that writes no record holds an OFD lock",
    "[interop]") {
  using std::chrono::system_clock;
  wltest::TempDir tmp;
  const auto path = tmp / "primary.lock";
  const auto write_record = [&](pid_t pid, system_clock::time_point acquired) {
    char buffer[workerlock::detail::max_record_size];
    const auto n = workerlock::detail::format_record(buffer, pid, acquired, Mechanism::ofd);
    return write_file(path, std::string(buffer, n));
  };
  REQUIRE(write_record(1, system_clock::now()));

  // A live process unrelated to the lock, started just now.
  wltest::Shared<Handshake> bystander_hs;
  Child bystander([&] { return report_and_hold(*bystander_hs, true); });
  // A program that takes an OFD lock and writes nothing; the kernel shows no pid for it.
  wltest::Shared<Handshake> program_hs;
  Child program([&] {
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    struct flock whole {};
    whole.l_type = F_WRLCK;
    whole.l_whence = SEEK_SET;
    return report_and_hold(*program_hs, fd >= 0 && ::fcntl(fd, F_OFD_SETLK, &whole) == 0);
  });
  REQUIRE(holds(*bystander_hs, std::chrono::seconds(10)));
  REQUIRE(holds(*program_hs, std::chrono::seconds(10)));

  // The record names the bystander's pid but is dated an hour before it started: it was
  // written by an earlier process with the same pid, so it says nothing about this lock.
  REQUIRE(write_record(bystander.pid(), system_clock::now() - std::chrono::hours(1)));
  auto who = workerlock::lock_holder(path);
  REQUIRE(who.has_value());
  CHECK_FALSE(who->pid.has_value());
  CHECK(who->pid_unknown == workerlock::Holder::PidUnknown::ofd_lock_without_record);
  CHECK_FALSE(who->recorded);
  CHECK(who->mechanism == Mechanism::ofd);

  // Dated after the bystander started, the record could be its own, and is believed: for
  // OFD locks the kernel names no owner to check it against.
  REQUIRE(write_record(bystander.pid(), system_clock::now()));
  who = workerlock::lock_holder(path);
  REQUIRE(who.has_value());
  CHECK(who->pid == bystander.pid());
  CHECK(who->recorded);

  bystander_hs->release = true;
  program_hs->release = true;
  CHECK(bystander.wait() == 0);
  CHECK(program.wait() == 0);
}

TEST_CASE("lock_holder: returns nullopt for an unlocked file with a valid record", "[interop]") {
  wltest::TempDir tmp;
  for (const auto m : all_mechanisms) {
    INFO("mechanism of the departed holder: " << name_of(m));
    const auto path = tmp / ("departed-" + name_of(m) + ".lock");
    Child departed([&] {
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      return election.role == Role::primary ? 0 : 1;
    });
    const pid_t departed_pid = departed.pid();
    REQUIRE(departed.wait() == 0);
    const std::string record = read_file(path);
    REQUIRE_THAT(record, StartsWith(std::to_string(departed_pid) + "\nacquired="));
    REQUIRE_THAT(record, EndsWith("mechanism=" + name_of(m) + "\n"));
    std::error_code ec;
    CHECK_FALSE(workerlock::lock_holder(path, ec).has_value());
    CHECK_FALSE(ec);
    CHECK_FALSE(workerlock::lock_holder(path).has_value());
    CHECK(read_file(path) == record);  // lock_holder never writes
  }
}

TEST_CASE_METHOD(
    wltest::EachMechanism,
    "lock_holder: after a SIGKILL of the primary lock_holder reports nobody until the parent takes "
    "over",
    "[election]") {
  // With a helper: the primary forked a child (no exec) that outlives it.
  const bool with_helper = GENERATE(false, true);
  INFO("mechanism=" << workerlock::to_string(mechanism)
                    << " primary forked a helper: " << with_helper);
  wltest::Shared<HolderBoard> board;
  struct HelperCleanup {
    HolderBoard& board;
    ~HelperCleanup() {
      board.helper_may_exit.store(true);
      if (const pid_t helper = board.helper.load(); helper > 0) ::kill(helper, SIGKILL);
    }
  } helper_cleanup{*board};
  board->fork_helper.store(with_helper);
  Children children;
  const pid_t primary = spawn_primary(children, *board, path, quiet(mechanism));
  if (with_helper) REQUIRE(board->helper.load() > 0);
  const auto before = workerlock::lock_holder(path);
  REQUIRE(before.has_value());
  REQUIRE(before->pid == primary);

  const auto killed_at = steady_clock::now();
  REQUIRE(::kill(primary, SIGKILL) == 0);
  REQUIRE(children.wait(primary) == 128 + SIGKILL);
  if (with_helper) REQUIRE(::kill(board->helper.load(), 0) == 0);  // the helper lives on
  // Dead and reaped, nobody else has tried yet: nobody holds it, whatever the file says.
  const auto stale = read_file(path);
  CHECK(parse_exact_record(stale).has_value());
  std::error_code ec;
  CHECK_FALSE(workerlock::lock_holder(path, ec).has_value());
  CHECK_FALSE(ec);

  WorkerLock mine(path, quiet(mechanism));
  bool got = false;
  while (!(got = mine.try_lock()) && steady_clock::now() - killed_at < 5s) {
  }
  const auto latency_ms = to_ms(steady_clock::now() - killed_at);
  INFO("kill -> acquisition: " << latency_ms << " ms");
  REQUIRE(got);
  CHECK(latency_ms < 1000.0);  // woken by the kernel, not by a timeout; speed: tests/bench
  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == ::getpid());
  CHECK(holder->recorded);
  // Read through our own descriptor: opening and closing the file here would drop a POSIX
  // lock of this process (that is the kernel's rule, not the library's).
  const auto record = parse_exact_record(read_fd(mine.native_handle()));
  REQUIRE(record.has_value());
  CHECK(record->pid == ::getpid());

  // lock_holder() in the holding process must not have dropped the lock (the POSIX
  // close-releases trap): another process still cannot take it.
  wltest::Shared<Diag> diag;
  const pid_t prober = children.spawn([&] {
    WorkerLock other(path, quiet(mechanism));
    if (other.try_lock()) return diag->fail("took the lock the parent still holds");
    return 0;
  });
  INFO(diag->message());
  CHECK(children.wait(prober) == 0);
  CHECK(mine.owns_lock());
}

TEST_CASE_METHOD(wltest::EachMechanism,
                 "lock_holder: does not attribute a lock to the stale record of a dead holder",
                 "[election]") {
  INFO("mechanism=" << workerlock::to_string(mechanism));
  Children children;

  // An earlier primary writes its record, then exits.
  wltest::Shared<HolderBoard> first;
  const pid_t old = spawn_primary(children, *first, path, quiet(mechanism));
  first->release.store(true);
  REQUIRE(children.wait(old) == 0);
  REQUIRE(::kill(old, 0) != 0);
  const auto stale = parse_exact_record(read_file(path));
  REQUIRE(stale.has_value());
  REQUIRE(stale->pid == old);

  // Now a process that writes no record holds the lock (write_holder_record = false, or any
  // program that only locks the file). The dead process's record is still in the file.
  Options no_record = quiet(mechanism);
  no_record.write_holder_record = false;
  wltest::Shared<HolderBoard> second;
  const pid_t current = spawn_primary(children, *second, path, no_record);
  const auto still = parse_exact_record(read_file(path));
  REQUIRE(still.has_value());
  REQUIRE(still->pid == old);  // the new holder wrote nothing

  const auto holder = workerlock::lock_holder(path);
  REQUIRE(holder.has_value());
  INFO("lock_holder: pid=" << holder->pid.value_or(-1) << " recorded=" << holder->recorded
                           << " mechanism=" << workerlock::to_string(holder->mechanism));
  CHECK(holder->pid != old);  // a dead process holds nothing
  CHECK_FALSE(holder->recorded);
  CHECK_FALSE(holder->acquired.has_value());
  // holder.hpp: the kernel keeps no pid for an OFD lock of a program that wrote no record.
  if (mechanism == Mechanism::ofd) {
    CHECK_FALSE(holder->pid.has_value());
    CHECK(holder->pid_unknown == workerlock::Holder::PidUnknown::ofd_lock_without_record);
  } else {
    CHECK(holder->pid == current);
  }
  CHECK(holder->mechanism == mechanism);

  second->release.store(true);
  CHECK(children.wait(current) == 0);
}

TEST_CASE_METHOD(
    wltest::EachMechanismReaped,
    "lock_holder: POSIX trap: called in the holding process it names the holder and keeps the lock",
    "[fork]") {
  INFO(describe(mechanism));

  WorkerLock holder(path, quiet(mechanism));
  REQUIRE(holder.try_lock());
  REQUIRE(probe_from_other_process(path, mechanism) == Probe::busy);

  for (int round = 0; round < 3; ++round) {
    const auto seen = workerlock::lock_holder(path);
    REQUIRE(seen.has_value());
    CHECK(seen->pid == ::getpid());
    CHECK(seen->recorded);
    CHECK(seen->mechanism == mechanism);
    std::error_code ec;
    const auto again = workerlock::lock_holder(path, ec);
    CHECK_FALSE(ec);
    REQUIRE(again.has_value());
    CHECK(again->pid == ::getpid());
  }
  CHECK(holder.owns_lock());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  // Another process sees this process as the holder too.
  struct Book {
    std::atomic<pid_t> seen{-2};
  };
  wltest::Shared<Book> book;
  const pid_t child = reaper.watch(wltest::fork_child([&] {
    const auto seen = workerlock::lock_holder(path);
    book->seen = seen ? seen->pid.value_or(-1) : -1;
    return 0;
  }));
  CHECK(reaper.wait(child, 30s) == 0);
  CHECK(book->seen == ::getpid());
  CHECK(probe_from_other_process(path, mechanism) == Probe::busy);

  holder.unlock();
  CHECK_FALSE(workerlock::lock_holder(path).has_value());
}

// A race, so a time budget: a broken lock_holder is caught in well under a second typically
// (3.7 s at worst in 11 runs here); a correct one costs the whole budget.
TEST_CASE("lock_holder: in one thread never drops a POSIX lock another thread takes meanwhile",
          "[fork][threads][stress]") {
  wltest::TempDir dir;
  const auto path = dir / "primary.lock";
  wltest::Children reaper{wltest::adopt_orphans};
  const Mechanism mechanism = Mechanism::posix;
  // Another process takes and releases the lock in a loop. Two threads ask lock_holder():
  // while the other process holds, and no handle of ours has the file open, it may read the
  // record through a descriptor of its own, which it then closes. A third thread opens a
  // fresh handle and takes the lock whenever it can. Such a close() must never coincide with
  // the third thread holding: it would drop this process's POSIX lock without a word.

  struct Book {
    Exclusion exclusion;
    std::atomic<int> lost{0};
    std::atomic<int> queries{0};
    std::atomic<bool> stop{false};
  };
  wltest::Shared<Book> book;
  {
    WorkerLock create(path, quiet(mechanism));
    REQUIRE(create.try_lock());
  }
  const pid_t other = reaper.watch(wltest::fork_child([&] {
    WorkerLock lock(path, quiet(mechanism));
    while (!book->stop.load()) {
      lock.lock();
      book->exclusion.enter();
      book->exclusion.leave();
      lock.unlock();
    }
    return 0;
  }));
  const auto observer = [&] {
    while (!book->stop.load()) {
      std::error_code ec;
      (void)workerlock::lock_holder(path, ec);
      book->queries.fetch_add(1);
    }
  };
  const auto worker = [&] {
    while (!book->stop.load()) {
      WorkerLock lock(path, quiet(mechanism));  // a fresh handle: nothing of ours is open
      std::error_code ec;
      if (!lock.try_lock(ec)) continue;
      book->exclusion.enter();
      struct stat st {};
      ::fstat(lock.native_handle(), &st);
      if (!kernel_posix_lock_held_by(::getpid(), FileId{st.st_dev, st.st_ino})) {
        book->lost.fetch_add(1);
        book->stop = true;
      }
      book->exclusion.leave();
    }
  };
  std::thread first(observer);
  std::thread second(observer);
  std::thread third(worker);
  wltest::eventually([&] { return book->stop.load(); }, 5s);
  book->stop = true;
  first.join();
  second.join();
  third.join();
  CHECK(reaper.wait(other, 30s) == 0);
  INFO("lock_holder calls " << book->queries << ", entries " << book->exclusion.entries);
  CHECK(book->lost == 0);
  CHECK(book->exclusion.overlaps == 0);
}

TEST_CASE("lock_holder: a holder whose pid cannot be told has no pid, and a reason",
          "[lock_holder]") {
  wltest::TempDir tmp;
  for (const Mechanism m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock}) {
    INFO("mechanism " << name_of(m));
    const auto path = tmp / fmt::format("{}.lock", name_of(m));
    HeldLock held(path, m, false);  // a program that writes no holder record
    REQUIRE(held.locked());
    const auto h = workerlock::lock_holder(path);
    INFO(describe(h));
    REQUIRE(h.has_value());
    CHECK(h->mechanism == m);
    CHECK_FALSE(h->recorded);
    CHECK_FALSE(h->pid_in_own_namespace.has_value());
    if (m == Mechanism::ofd) {
      // The kernel keeps no pid for OFD locks (/proc/locks and F_OFD_GETLK say -1).
      CHECK_FALSE(h->pid.has_value());
      CHECK(h->pid_unknown == PidUnknown::ofd_lock_without_record);
      CHECK(to_string(h->pid_unknown) == "ofd_lock_without_record");
    } else {
      CHECK(h->pid == held.pid());
      CHECK(h->pid_unknown == PidUnknown::pid_known);
    }
    // The hurried caller's line, written the only way it compiles: it signals the holder
    // (signal 0: a check that it may) or nobody, never a process group or everybody.
    if (h->pid) CHECK(::kill(*h->pid, 0) == 0);
  }
}

TEST_CASE(
    "lock_holder: a record whose pid does not fit a pid_t never yields pid 0 or a negative pid",
    "[lock_holder]") {
  wltest::TempDir tmp;
  struct ::stat ns {};
  REQUIRE(::stat("/proc/self/ns/pid", &ns) == 0);
  // 4294967296 narrows to 0 and 4294967295 to -1: kill(0) signals the caller's own process
  // group, kill(-1) everybody. A corrupt or crafted record must not get there.
  for (const char* pid_text : {"4294967296", "4294967295", "99999999999"}) {
    INFO("record pid " << pid_text);
    const auto path = tmp / fmt::format("wrap-{}.lock", pid_text);
    HeldLock held(path, Mechanism::ofd, false);  // the kernel shows no pid for an OFD lock
    REQUIRE(held.locked());
    {
      std::ofstream record(path, std::ios::trunc);
      record << pid_text << "\nacquired=2026-01-01T00:00:00.000000Z\nhost=h\npidns=" << ns.st_ino
             << "\nmechanism=ofd\n";
    }
    const auto h = workerlock::lock_holder(path);
    INFO(describe(h));
    REQUIRE(h.has_value());
    CHECK_FALSE(h->recorded);
    CHECK(no_pid_because(h, PidUnknown::ofd_lock_without_record));
  }
}

TEST_CASE("lock_holder: names the holder of a lock file on btrfs, in a subvolume too",
          "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("the lab mounts a loop device in its own mount namespace");
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  const int code = run_lab(
      [&]() -> int {
        if (!private_mount_namespace(*report)) return 1;
        const auto image = tmp / "btrfs.img";
        const auto top = tmp / "btrfs";
        fs::create_directory(top);
        if (::truncate(image.c_str(), 0) != 0) touch(image);
        if (::truncate(image.c_str(), 120 << 20) != 0) {
          report->fail(fmt::format("truncate {}: {}", image.string(), std::strerror(errno)));
          return 1;
        }
        if (run_status(fmt::format("mkfs.btrfs -q -f '{}' >/dev/null 2>&1", image.string())) != 0) {
          report->fail("mkfs.btrfs failed: install btrfs-progs (apt-get install btrfs-progs)");
          return 1;
        }
        if (run_status(fmt::format("mount -t btrfs -o loop '{}' '{}'", image.string(),
                                   top.string())) != 0) {
          report->fail(
              "mount -t btrfs -o loop failed: the kernel needs btrfs (modprobe btrfs) and a free "
              "loop device (losetup -f)");
          return 1;
        }
        Mounted mounted(top);
        const auto sub = top / "subvolume";
        if (run_status(fmt::format("btrfs subvolume create '{}' >/dev/null", sub.string())) != 0) {
          report->fail("btrfs subvolume create failed");
          return 1;
        }
        // The first file of each subvolume: the same inode number, two files.
        const auto in_top = top / "top.lock";
        const auto in_sub = sub / "sub.lock";
        touch(in_top);
        touch(in_sub);
        report->expect(inode_of(in_top) == inode_of(in_sub),
                       "the first files of two btrfs subvolumes should share an inode number");
        report->expect(device_of(in_top) != device_of(in_sub),
                       "a btrfs subvolume should have its own st_dev");
        check_holders(in_top, in_sub, *report);
        check_holders(in_sub, in_top, *report);
        return 0;
      },
      std::chrono::seconds(60));
  check_lab(code, *report);
}

TEST_CASE("lock_holder: names the holder of a lock file on overlayfs", "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("the lab mounts in its own mount namespace");
  wltest::TempDir tmp;  // on the root file system (ext4 here)
  wltest::Shared<LabReport> report;
  const int code = run_lab(
      [&]() -> int {
        if (!private_mount_namespace(*report)) return 1;
        const auto tmpfs = tmp / "tmpfs";
        fs::create_directory(tmpfs);
        if (::mount("workerlock-test", tmpfs.c_str(), "tmpfs", 0, "size=4m") != 0) {
          report->fail(fmt::format("mount tmpfs: {}", std::strerror(errno)));
          return 1;
        }
        Mounted tmpfs_mounted(tmpfs);
        // Two overlays: every layer on one tmpfs, and a lower layer on the TempDir's file
        // system under an upper layer on tmpfs (stat() then reports a layer's device).
        struct Layout {
          fs::path lower, upper, work, merged;
        };
        const Layout layouts[] = {
            {tmpfs / "lower", tmpfs / "upper", tmpfs / "work", tmp / "merged-samefs"},
            {tmp / "lower", tmpfs / "upper2", tmpfs / "work2", tmp / "merged-mixed"},
        };
        for (const auto& l : layouts) {
          for (const auto& d : {l.lower, l.upper, l.work, l.merged}) fs::create_directories(d);
          touch(l.lower / "lower.lock");  // in the lower layer: copied up when opened to lock
          const auto options = fmt::format("lowerdir={},upperdir={},workdir={}", l.lower.string(),
                                           l.upper.string(), l.work.string());
          if (::mount("overlay", l.merged.c_str(), "overlay", 0, options.c_str()) != 0) {
            report->fail(fmt::format("mount overlay {}: {}", options, std::strerror(errno)));
            return 1;
          }
          Mounted overlay(l.merged);
          check_holders(l.merged / "lower.lock", std::nullopt, *report);
          touch(l.merged / "upper.lock");
          check_holders(l.merged / "upper.lock", std::nullopt, *report);
        }
        return 0;
      },
      std::chrono::seconds(60));
  check_lab(code, *report);
}

TEST_CASE(
    "lock_holder: a holder outside the caller's pid namespace is reported as the header "
    "says for each mechanism",
    "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("unshare(CLONE_NEWPID) and mounting /proc");
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  const int code = run_lab(
      [&]() -> int {
        for (const Mechanism m : {Mechanism::ofd, Mechanism::posix, Mechanism::flock}) {
          for (const bool record : {true, false}) {
            const auto path = tmp / fmt::format("{}-{}.lock", name_of(m), record);
            const std::string what = fmt::format("{} lock {} a record held outside", name_of(m),
                                                 record ? "with" : "without");
            HeldLock held(path, m, record);
            if (!held.locked()) {
              report->fail(what + ": the holder could not lock it");
              continue;
            }
            const pid_t holder_pid = held.pid();
            const auto outer_namespace = pid_namespace_of("/proc/self/ns/pid");
            const int inner = in_new_pid_namespace(
                [&]() -> int {
                  const auto h = holder_of(path, *report);
                  const std::string got = describe(h);
                  if (m == Mechanism::flock) {
                    // The kernel hides it from /proc/locks, and F_OFD_GETLK ignores flock.
                    report->expect(!h, what + ": documented as nullopt, got " + got);
                  } else if (record) {
                    // The record's pid means another process here (pid 1 is this lab): it
                    // is reported as the pid in the holder's own namespace, never as pid.
                    report->expect(no_pid_because(h, PidUnknown::other_pid_namespace) &&
                                       h->recorded && h->pid_in_own_namespace == holder_pid &&
                                       h->pid_namespace == outer_namespace && h->mechanism == m,
                                   fmt::format("{}: expected no pid (other_pid_namespace) and "
                                               "the record's pid {} there, got {}",
                                               what, holder_pid, got));
                    if (m == Mechanism::posix) {
                      // A record that claims this namespace while the kernel says the holder
                      // is outside it is not the holder's: naming pid 1 (this lab's init), or
                      // 4294967296, which narrows to 0 (what the kernel shows here), and
                      // kill(0) would signal the caller's own process group.
                      char text[workerlock::detail::max_record_size];
                      const auto n = workerlock::detail::format_record(
                          text, 1, std::chrono::system_clock::now(), m);
                      for (const std::string forged_pid : {"1", "4294967296"}) {
                        const std::string forged_record = forged_pid + std::string(text + 1, n - 1);
                        const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
                        report->expect(
                            fd >= 0 && ::write(fd, forged_record.data(), forged_record.size()) ==
                                           static_cast<ssize_t>(forged_record.size()),
                            what + ": cannot write the record");
                        if (fd >= 0) ::close(fd);
                        const auto forged = holder_of(path, *report);
                        report->expect(no_pid_because(forged, PidUnknown::other_pid_namespace) &&
                                           !forged->recorded && !forged->pid_in_own_namespace,
                                       fmt::format("{}: a record claiming this namespace must "
                                                   "not name pid {} here, got {}",
                                                   what, forged_pid, describe(forged)));
                      }
                    }
                  } else {
                    const auto reason = m == Mechanism::ofd ? PidUnknown::ofd_lock_without_record
                                                            : PidUnknown::other_pid_namespace;
                    report->expect(no_pid_because(h, reason) && !h->recorded &&
                                       !h->pid_in_own_namespace && h->mechanism == m,
                                   fmt::format("{}: expected no pid ({}), got {}", what,
                                               to_string(reason), got));
                  }
                  return 0;
                },
                *report);
            report->expect(inner == 0,
                           fmt::format("{}: the namespace lab exited with {}", what, inner));
          }
        }
        return 0;
      },
      std::chrono::seconds(60));
  check_lab(code, *report);
}

TEST_CASE(
    "lock_holder: a holder inside a child pid namespace is named by its record there and by "
    "the kernel's pid here",
    "[lock_holder]") {
  WLTEST_REQUIRE_ROOT("unshare(CLONE_NEWPID) and mounting /proc");
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  struct Handshake {
    std::atomic<int> locked{0};  // 1 locked, -1 failed
    std::atomic<bool> release{false};
    std::atomic<std::uint64_t> pid_namespace{0};
  };
  const int code = run_lab(
      [&]() -> int {
        // stale: the record names another process of that namespace (pid 2), which let go;
        // then pid 1 holds a POSIX lock without writing a record.
        for (const std::string kind :
             {"ofd", "posix", "flock", "ofd-raw", "posix-raw", "flock-raw", "stale"}) {
          const auto path = tmp / (kind + ".lock");
          const Mechanism m = kind.rfind("ofd", 0) == 0     ? Mechanism::ofd
                              : kind.rfind("flock", 0) == 0 ? Mechanism::flock
                                                            : Mechanism::posix;
          const bool record = kind.find('-') == std::string::npos && kind != "stale";
          wltest::Shared<Handshake> hs;
          const pid_t lab = wltest::fork_child([&]() -> int {
            return in_new_pid_namespace(
                [&]() -> int {
                  hs->pid_namespace = pid_namespace_of("/proc/self/ns/pid");
                  if (kind == "stale") {
                    const pid_t writer = wltest::fork_child([&]() -> int {
                      workerlock::WorkerLock lock(path, workerlock::Options{}.with(m));
                      return lock.try_lock() ? 0 : 1;  // released at exit, the record stays
                    });
                    if (writer != 2 || wltest::wait_exit_code(writer) != 0) {
                      report->fail(fmt::format("stale: the record writer was pid {}", writer));
                      hs->locked = -1;
                      return 1;
                    }
                  }
                  HeldLock held(path, m, record);
                  (void)held;
                  hs->locked = held.locked() ? 1 : -1;
                  while (!hs->release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                  return 0;
                },
                *report);
          });
          if (!wltest::eventually([&] { return hs->locked.load() != 0; },
                                  std::chrono::seconds(20)) ||
              hs->locked != 1) {
            report->fail(kind + ": the holder in the new pid namespace did not lock");
            hs->release = true;
            wltest::wait_exit_code(lab);
            continue;
          }
          // The holder is HeldLock's child of pid 1: pid 2 (3 after the stale writer).
          const auto h = holder_of(path, *report);
          const std::string got = describe(h);
          if (record) {
            // The record's pid (2) is the holder's pid in its own namespace. Here the kernel
            // names it for POSIX and flock locks; an OFD lock shows no pid, and the record's
            // means another process here, so there is none.
            const pid_t expected = 2;
            const bool pid_ok = m == Mechanism::ofd
                                    ? no_pid_because(h, PidUnknown::other_pid_namespace)
                                    : h && h->pid && *h->pid != expected &&
                                          innermost_pid(*h->pid) == expected &&
                                          h->pid_unknown == PidUnknown::pid_known;
            report->expect(pid_ok && h->recorded && h->pid_in_own_namespace == expected &&
                               h->pid_namespace == hs->pid_namespace &&
                               h->pid_namespace != pid_namespace_of("/proc/self/ns/pid") &&
                               h->mechanism == m,
                           fmt::format("{}: expected the record's pid {} in namespace {}, got {}",
                                       kind, expected, hs->pid_namespace.load(), got));
          } else if (m == Mechanism::ofd) {
            report->expect(
                no_pid_because(h, PidUnknown::ofd_lock_without_record) && !h->recorded &&
                    !h->pid_in_own_namespace,
                fmt::format("{}: expected no pid (ofd_lock_without_record), got {}", kind, got));
          } else {
            // The kernel's pid, as this namespace numbers the holder.
            report->expect(
                h && !h->recorded && h->pid && *h->pid > 0 && h->mechanism == m &&
                    innermost_pid(*h->pid) == (kind == "stale" ? 3 : 2),
                fmt::format("{}: expected the kernel's pid of the holder, got {}", kind, got));
          }
          hs->release = true;
          const int exit_code = wltest::wait_exit_code(lab);
          report->expect(exit_code == 0,
                         fmt::format("{}: the namespace lab exited with {}", kind, exit_code));
        }
        return 0;
      },
      std::chrono::seconds(60));
  check_lab(code, *report);
}

TEST_CASE(
    "lock_holder: with descriptors 0, 1 and 2 closed it answers right and never reads "
    "through them",
    "[lock_holder]") {
  wltest::TempDir tmp;
  wltest::Shared<LabReport> report;
  const auto posix_file = tmp / "posix.lock";
  const auto ofd_file = tmp / "ofd.lock";
  const auto free_file = tmp / "free.lock";
  touch(free_file);
  const int code = run_lab(
      [&]() -> int {
        HeldLock posix(posix_file, Mechanism::posix, true);
        HeldLock ofd(ofd_file, Mechanism::ofd, true);
        if (!posix.locked() || !ofd.locked()) {
          report->fail("the holders could not lock");
          return 1;
        }
        const auto check = [&](const char* when) {
          const auto p = holder_of(posix_file, *report);
          report->expect(
              p && p->recorded && p->pid == posix.pid(),
              fmt::format("{}: posix holder {} expected, got {}", when, posix.pid(), describe(p)));
          const auto o = holder_of(ofd_file, *report);
          report->expect(
              o && o->recorded && o->pid == ofd.pid(),
              fmt::format("{}: ofd holder {} expected, got {}", when, ofd.pid(), describe(o)));
          const auto f = holder_of(free_file, *report);
          report->expect(!f, fmt::format("{}: free file, got {}", when, describe(f)));
        };
        // glibc's timegm() (parsing the record's date) loads /etc/localtime once per process
        // through a descriptor of its own: load it now, it is not the library's.
        ::tzset();
        ::close(0);
        ::close(1);
        ::close(2);
        if (!kill_on_read_of_standard_streams()) {
          report->fail("cannot install the seccomp filter");
          return 1;
        }
        check("0, 1, 2 closed");
        const auto left = wltest::open_standard_descriptors();
        report->expect(left.empty(), "descriptors left open at 0, 1, 2:" + left);
        // A daemon reopening its standard streams on /dev/null, then logging to stderr.
        for (int fd = 0; fd <= 2; ++fd) {
          if (::open("/dev/null", O_RDWR) != fd)
            report->fail(fmt::format("/dev/null not at {}", fd));
        }
        const char noise[] = "a log line on stderr\n";
        report->expect(::write(2, noise, sizeof noise - 1) == sizeof noise - 1, "write to fd 2");
        check("0, 1, 2 on /dev/null");
        return 0;
      },
      std::chrono::seconds(30));
  INFO("exit code 159 = SIGSYS: the library read through descriptor 0, 1 or 2");
  check_lab(code, *report);
}
