// tests/support/contract_lab.hpp: small helpers for the public-contract tests.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <workerlock/workerlock.hpp>

#include "common.hpp"
#include "raw_fork.hpp"

#include "clock.hpp"
#include "files.hpp"
#include "names.hpp"

namespace wltest::contract_lab {

using namespace std::chrono_literals;
using workerlock::LogLevel;
using workerlock::Mechanism;
using workerlock::Options;
using workerlock::Role;
using workerlock::WorkerLock;

//! A sink that throws on every line, after counting it.
struct ThrowingSink {
  std::shared_ptr<int> lines = std::make_shared<int>(0);
  void operator()(LogLevel /*level*/, std::string_view /*line*/) const {
    ++*lines;
    throw std::runtime_error("the log sink throws");
  }
};

//! A sink that keeps every line.
struct KeepingSink {
  std::shared_ptr<std::vector<std::string>> lines = std::make_shared<std::vector<std::string>>();
  void operator()(LogLevel level, std::string_view line) const {
    lines->push_back(std::string(workerlock::to_string(level)) + ": " + std::string(line));
  }
};

}  // namespace wltest::contract_lab
