// tests/test_security.cpp: security: symlinks, permissions, sticky directories, other users' files.
// Helpers live in tests/support/; every test forks real processes where it needs more than one.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/interprocess/sync/file_lock.hpp>
#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "support/file_lab.hpp"

using namespace wltest;
using namespace wltest::file_lab;

namespace {

//! While another process holds `path` with `holder`, every mechanism that it excludes finds
//! the lock held: is_primary_worker() says secondary, try_lock() and try_lock_for() fail.
void check_contenders_refused(const fs::path& path, Mechanism holder) {
  for (const auto c : all_mechanisms) {
    if (!excludes(holder, c)) continue;
    INFO("contender mechanism: " << name_of(c));
    {
      const auto election = workerlock::is_primary_worker(path, quiet(c));
      CHECK(election.role == Role::secondary);
    }
    WorkerLock lock(path, quiet(c));
    CHECK_FALSE(lock.try_lock());
    CHECK_FALSE(lock.try_lock_for(std::chrono::milliseconds(20)));
  }
}

}  // namespace

TEST_CASE("security: a symlink planted at the lock path is refused and its target untouched",
          "[security]") {
  wltest::TempDir tmp;
  const auto target = tmp / "precious.txt";
  std::string content = "not a lock file; must survive byte for byte\n";
  for (int i = 0; i < 64; ++i) content += "line " + std::to_string(i) + " of precious data\n";
  REQUIRE(write_file(target, content));
  const timespec long_ago[2] = {{1000000000, 0}, {1000000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, target.c_str(), long_ago, 0) == 0);
  const auto before = stat_of(target);

  const auto link = tmp / "primary.lock";
  fs::create_symlink(target, link);
  for (const auto m : all_mechanisms) {
    require_refused_here(link, m, std::errc::too_many_symbolic_link_levels,
                         {"symbolic link", "never follows"});
  }
  auto holder = std::make_unique<Attempt>();
  attempt_holder_into(*holder, link);
  check_attempt(*holder, "lock_holder", link, std::errc::too_many_symbolic_link_levels,
                "inspect lock file", {"symbolic link"});

  const auto after = stat_of(target);
  CHECK(read_file(target) == content);
  CHECK(after.st_size == before.st_size);
  CHECK(after.st_ino == before.st_ino);
  CHECK(same_mtime(before, after));
  CHECK(fs::is_symlink(link));
  CHECK(fs::read_symlink(link) == target);
}

TEST_CASE("security: a dangling symlink at the lock path never creates its target", "[security]") {
  wltest::TempDir tmp;
  const auto target = tmp / "would-be-created.lock";
  const auto link = tmp / "primary.lock";
  fs::create_symlink(target, link);
  for (const auto m : all_mechanisms) {
    require_refused_here(link, m, std::errc::too_many_symbolic_link_levels,
                         {"symbolic link", "never follows"});
    CHECK(fs::symlink_status(target).type() == fs::file_type::not_found);
  }
  auto holder = std::make_unique<Attempt>();
  attempt_holder_into(*holder, link);
  check_attempt(*holder, "lock_holder", link, std::errc::too_many_symbolic_link_levels,
                "inspect lock file", {"symbolic link"});
  CHECK(fs::is_symlink(link));
  CHECK(fs::symlink_status(target).type() == fs::file_type::not_found);
}

TEST_CASE("security: new lock files are created 0644 at most, whatever the umask", "[security]") {
  wltest::TempDir tmp;
  struct Result {
    bool primary = false;
    mode_t mode = 0;
  };
  const std::array<std::pair<mode_t, mode_t>, 3> cases{
      {{0000, 0644}, {0022, 0644}, {0077, 0600}}};  // umask -> expected permissions
  for (const auto& umask_case : cases) {
    const mode_t mask = umask_case.first;
    const mode_t expected = umask_case.second;
    for (const auto m : all_mechanisms) {
      const auto path = tmp / ("umask-" + std::to_string(mask) + "-" + name_of(m) + ".lock");
      INFO("umask 0" << std::oct << mask << std::dec << ", mechanism " << name_of(m));
      wltest::Shared<Result> r;
      const int code = run_child([&] {
        ::umask(mask);
        const auto election = workerlock::is_primary_worker(path, quiet(m));
        r->primary = election.role == Role::primary;
        struct stat st {};
        if (::stat(path.c_str(), &st) != 0) return 10;
        r->mode = st.st_mode;
        return 0;
      });
      REQUIRE(code == 0);
      CHECK(r->primary);
      CHECK(S_ISREG(r->mode));
      CHECK((r->mode & 07777) == expected);
    }
  }
}

TEST_CASE("security: a contender never truncates or rewrites the holder's record", "[security]") {
  wltest::TempDir tmp;
  for (const auto m : all_mechanisms) {
    INFO("holder mechanism: " << name_of(m));
    const auto path = tmp / ("held-" + name_of(m) + ".lock");
    wltest::Shared<Handshake> hs;
    Child holder([&] { return elect_and_hold_until_released(*hs, path, quiet(m)); });
    REQUIRE(holds(*hs));

    const std::string record = read_file(path);
    REQUIRE_THAT(record, StartsWith(std::to_string(holder.pid()) + "\n"));
    REQUIRE_THAT(record, EndsWith("mechanism=" + name_of(m) + "\n"));
    const auto before = stat_of(path);

    check_contenders_refused(path, m);
    const auto after = stat_of(path);
    CHECK(read_file(path) == record);
    CHECK(after.st_size == before.st_size);
    CHECK(after.st_ino == before.st_ino);
    CHECK(same_mtime(before, after));

    const auto who = workerlock::lock_holder(path);
    REQUIRE(who.has_value());
    CHECK(who->pid == holder.pid());
    CHECK(who->recorded);

    hs->release = true;
    CHECK(holder.wait() == 0);
  }
}

TEST_CASE("security: a contender leaves larger pre-existing content intact while it is held",
          "[security]") {
  wltest::TempDir tmp;
  std::string old;
  for (int i = 0; old.size() < 4096; ++i)
    old += "pre-existing content, line " + std::to_string(i) + "\n";
  for (const auto m : all_mechanisms) {
    INFO("holder mechanism: " << name_of(m));
    const auto path = tmp / ("big-" + name_of(m) + ".lock");
    REQUIRE(write_file(path, old));
    const timespec long_ago[2] = {{1000000000, 0}, {1000000000, 0}};
    REQUIRE(::utimensat(AT_FDCWD, path.c_str(), long_ago, 0) == 0);
    const auto before = stat_of(path);

    wltest::Shared<Handshake> hs;
    auto options = quiet(m);
    options.write_holder_record = false;  // holds without touching the bytes
    Child holder([&] { return hold_until_released(*hs, path, options); });
    REQUIRE(holds(*hs));

    check_contenders_refused(path, m);
    const auto during = stat_of(path);
    CHECK(read_file(path) == old);
    CHECK(during.st_size == static_cast<off_t>(old.size()));
    CHECK(same_mtime(before, during));

    hs->release = true;
    REQUIRE(holder.wait() == 0);
    CHECK(read_file(path) == old);

    // The next primary leaves it intact too: it holds no record, so it is no lock file of
    // ours to overwrite.
    {
      const auto election = workerlock::is_primary_worker(path, quiet(m));
      REQUIRE(election.role == Role::primary);
    }  // released before reading: reading would open and close the file
    CHECK(read_file(path) == old);
  }
}

TEST_CASE(
    "security: a lock file of another user in a sticky world-writable directory is "
    "refused with EPERM",
    "[security]") {
  WLTEST_REQUIRE_ROOT("chowns files to other users and switches uid in children");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const auto sticky = tmp / "sticky";  // a /tmp look-alike, owned by root
  REQUIRE(::mkdir(sticky.c_str(), 0755) == 0);
  REQUIRE(::chmod(sticky.c_str(), 01777) == 0);

  // uid 65534 got there first: it ran an election itself (creating the file), then left.
  const auto planted = sticky / "planted.lock";
  REQUIRE(run_child([&] {
            if (!become(nobody)) return 10;
            const auto election = workerlock::is_primary_worker(planted, quiet(Mechanism::ofd));
            return election.role == Role::primary ? 0 : 11;
          }) == 0);
  REQUIRE(stat_of(planted).st_uid == nobody);

  // The same, made by chown, with content that must not change.
  const auto chowned = sticky / "chowned.lock";
  const std::string chowned_content = "planted by uid 65534\n";
  REQUIRE(write_file(chowned, chowned_content));
  REQUIRE(::chown(chowned.c_str(), nobody, nobody) == 0);
  REQUIRE(::chmod(chowned.c_str(), 0644) == 0);
  const auto chowned_before = stat_of(chowned);
  const std::string planted_content = read_file(planted);

  const std::initializer_list<std::string_view> mentions{
      "belongs to another user", "world-writable sticky directory", "hold the lock forever"};
  for (const auto& path : {planted, chowned}) {
    INFO("path: " << path.native());
    for (const auto m : all_mechanisms)
      require_refused_here(path, m, std::errc::operation_not_permitted, mentions);
  }
  const auto chowned_after = stat_of(chowned);
  CHECK(read_file(chowned) == chowned_content);
  CHECK(read_file(planted) == planted_content);
  CHECK(chowned_after.st_uid == nobody);
  CHECK(same_mtime(chowned_before, chowned_after));

  // Options::allow_foreign_owner lets the caller accept the risk.
  for (const auto m : all_mechanisms) {
    INFO("allow_foreign_owner, mechanism: " << name_of(m));
    auto options = quiet(m);
    options.allow_foreign_owner = true;
    const auto election = workerlock::is_primary_worker(chowned, options);
    CHECK(election.role == Role::primary);
    CHECK(election.lock.owns_lock());
  }

  // Any other ordinary user (uid 65533) is refused too, and allowed with the option.
  const auto shared_rw = sticky / "foreign-0666.lock";
  REQUIRE(write_file(shared_rw, ""));
  REQUIRE(::chown(shared_rw.c_str(), nobody, nobody) == 0);
  REQUIRE(::chmod(shared_rw.c_str(), 0666) == 0);
  struct Result {
    Refusal refusal;
    bool allowed_primary = false;
  };
  for (const auto m : all_mechanisms) {
    INFO("uid 65533, mechanism: " << name_of(m));
    wltest::Shared<Result> r;
    const int code = run_child([&] {
      if (!become(other_user)) return 10;
      attempt_into(r->refusal, shared_rw, quiet(m));
      auto options = quiet(m);
      options.allow_foreign_owner = true;
      const auto election = workerlock::is_primary_worker(shared_rw, options);
      r->allowed_primary = election.role == Role::primary;
      return 0;
    });
    REQUIRE(code == 0);
    check_refused(r->refusal, shared_rw, std::errc::operation_not_permitted, mentions);
    CHECK(r->allowed_primary);
  }
}

TEST_CASE(
    "security: a lock file of another user in a sticky directory is refused even while that "
    "user holds it",
    "[security]") {
  // The denial of service the check exists for: uid 65534 created the lock file in a /tmp
  // look-alike and holds it. Workers must get the EPERM explanation, not a silent
  // Role::secondary for as long as that user pleases.
  WLTEST_REQUIRE_ROOT("switches a child to uid 65534");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const auto sticky = tmp / "sticky";
  REQUIRE(::mkdir(sticky.c_str(), 0755) == 0);
  REQUIRE(::chmod(sticky.c_str(), 01777) == 0);
  const auto path = sticky / "squatted.lock";
  for (const auto m : all_mechanisms) {
    INFO("mechanism: " << name_of(m));
    wltest::Shared<Handshake> hs;
    Child squatter([&] {
      if (!become(nobody)) {
        hs->state = -1;
        return 10;
      }
      return elect_and_hold_until_released(*hs, path, quiet(m));
    });
    REQUIRE(holds(*hs));
    REQUIRE(stat_of(path).st_uid == nobody);
    const std::string record = read_file(path);

    require_refused_here(
        path, m, std::errc::operation_not_permitted,
        {"belongs to another user", "world-writable sticky directory", "hold the lock forever"});
    // A bounded wait reports the refusal too, instead of timing out as if merely busy.
    WorkerLock lock(path, quiet(m));
    std::error_code ec;
    CHECK_FALSE(lock.try_lock_for(std::chrono::milliseconds(100), ec));
    CHECK(ec == std::errc::operation_not_permitted);
    CHECK(read_file(path) == record);

    hs->release = true;
    CHECK(squatter.wait() == 0);
  }
}

TEST_CASE(
    "security: the sticky-directory check accepts root's files, the directory owner's "
    "files and files outside sticky directories",
    "[security]") {
  WLTEST_REQUIRE_ROOT("chowns files and switches uid in children");
  wltest::TempDir tmp;
  REQUIRE(::chmod(tmp.path().c_str(), 0755) == 0);
  const auto make_dir = [](const fs::path& dir, mode_t mode, uid_t owner) {
    REQUIRE(::mkdir(dir.c_str(), 0700) == 0);
    REQUIRE(::chown(dir.c_str(), owner, owner) == 0);
    REQUIRE(::chmod(dir.c_str(), mode) == 0);
  };
  const auto make_file = [](const fs::path& file, mode_t mode, uid_t owner) {
    REQUIRE(write_file(file, ""));
    REQUIRE(::chown(file.c_str(), owner, owner) == 0);
    REQUIRE(::chmod(file.c_str(), mode) == 0);
  };
  const auto sticky = tmp / "sticky";
  make_dir(sticky, 01777, 0);
  const auto open_dir = tmp / "world-writable-not-sticky";
  make_dir(open_dir, 0777, 0);
  const auto users_sticky = tmp / "sticky-owned-by-65534";
  make_dir(users_sticky, 01777, nobody);

  // Root's files are trusted: a 0666 root-owned file in a sticky directory is accepted,
  // whether the directory belongs to root (opened by uid 65534) or to uid 65534 (opened by
  // uid 65533, so that only the "owned by root" rule can accept it).
  const auto roots_in_roots_dir = sticky / "root-owned-0666.lock";
  make_file(roots_in_roots_dir, 0666, 0);
  const auto roots_in_users_dir = users_sticky / "root-owned-0666.lock";
  make_file(roots_in_users_dir, 0666, 0);
  struct Result {
    int ec = -1;
    bool primary = false;
  };
  const std::array<std::pair<fs::path, uid_t>, 2> root_owned{
      {{roots_in_roots_dir, nobody}, {roots_in_users_dir, other_user}}};
  for (const auto& path_and_user : root_owned) {
    const fs::path path = path_and_user.first;
    const uid_t user = path_and_user.second;
    for (const auto m : all_mechanisms) {
      INFO("uid " << user << " on root-owned " << path.native() << ", mechanism " << name_of(m));
      wltest::Shared<Result> r;
      const int code = run_child([&] {
        if (!become(user)) return 10;
        std::error_code ec;
        const auto election = workerlock::is_primary_worker(path, quiet(m), ec);
        r->ec = ec.value();
        r->primary = election.role == Role::primary;
        return 0;
      });
      REQUIRE(code == 0);
      CHECK(r->ec == 0);
      CHECK(r->primary);
    }
  }

  // root opening a file of uid 65534 where uid 65534 could not plant it against root's will.
  const auto not_sticky = open_dir / "foreign.lock";
  make_file(not_sticky, 0644, nobody);
  const auto dir_owners = users_sticky / "foreign.lock";
  make_file(dir_owners, 0644, nobody);
  for (const auto& path : {not_sticky, dir_owners}) {
    for (const auto m : all_mechanisms) {
      INFO("root on " << path.native() << ", mechanism " << name_of(m));
      std::error_code ec;
      const auto election = workerlock::is_primary_worker(path, quiet(m), ec);
      CHECK_FALSE(ec);
      CHECK(election.role == Role::primary);
    }
  }
}
