// Shared helpers for the tests: fixture paths, the golden numbers, scratch folders.
#pragma once

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "libllm/error.h"

namespace libllm::test {

// The message of the libllm::Error that fn throws ("" when it throws none).
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A file's bytes, and writing bytes to one.
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
inline void write_file(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// What fn writes to file descriptor `out` (1 or 2: fmt and stdio alike).
inline std::string output_of(int out, const std::function<void()>& fn) {
  std::fflush(nullptr);
  char name[] = "/tmp/libllm-test-output-XXXXXX";
  const int fd = ::mkstemp(name), saved = ::dup(out);
  ::dup2(fd, out);
  auto restore = [&] {
    std::fflush(nullptr);
    ::dup2(saved, out);
    ::close(saved);
    ::close(fd);
  };
  try {
    fn();
  } catch (...) {
    restore();
    ::unlink(name);
    throw;
  }
  restore();
  std::string text = read_file(name);
  ::unlink(name);
  return text;
}
inline std::string stdout_of(const std::function<void()>& fn) { return output_of(1, fn); }
inline std::string stderr_of(const std::function<void()>& fn) { return output_of(2, fn); }

// The JSON objects of a JSON Lines file (metrics.jsonl, events.jsonl, ...), blank lines skipped.
inline std::vector<nlohmann::json> jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

// The names in a folder, sorted.
inline std::vector<std::string> listing(const std::string& dir) {
  std::vector<std::string> names;
  for (auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

inline std::string fixture(const std::string& rel) { return std::string(LIBLLM_FIXTURES) + "/" + rel; }
inline std::string source(const std::string& rel) { return std::string(LIBLLM_SOURCE_DIR) + "/" + rel; }

// tests/fixtures/expected.json, made by tests/fixtures/make_fixtures.py (float64 reference).
inline const nlohmann::json& expected() {
  static const nlohmann::json j = [] {
    std::ifstream in(fixture("expected.json"));
    return nlohmann::json::parse(in);
  }();
  return j;
}

// A fresh empty folder under the system temp dir, removed when the object dies.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("libllm-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& rel) const { return (path / rel).string(); }
};

// (rows, cols) int64 tensor from a JSON array of arrays.
inline torch::Tensor tokens_from_json(const nlohmann::json& rows) {
  std::vector<int64_t> flat;
  for (const auto& r : rows)
    for (const auto& v : r) flat.push_back(v.get<int64_t>());
  return torch::tensor(flat, torch::kInt64).view({static_cast<int64_t>(rows.size()), -1});
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// Runs the hidden test case `tag` (e.g. "[.my_worker]") of this test program as `world` ranks,
// each a process of its own with a torchrun-style environment (a free port on 127.0.0.1) plus
// `env`; returns each rank's exit code (0 when its checks passed; -1 when killed).
inline std::vector<int> run_ranks(const std::string& tag, int world, const std::vector<std::string>& env = {}) {
  int port = 0;
  {  // a free port
    const int s = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      throw std::runtime_error("run_ranks: no free port");
    port = ntohs(a.sin_port);
    ::close(s);
  }
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> all = {"WORLD_SIZE=" + std::to_string(world), "RANK=" + std::to_string(r),
                                    "LOCAL_RANK=" + std::to_string(r),     "MASTER_ADDR=127.0.0.1",
                                    "MASTER_PORT=" + std::to_string(port), "OMP_NUM_THREADS=1"};
    all.insert(all.end(), env.begin(), env.end());
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("run_ranks: fork failed");
    if (pid == 0) {  // (only exec after fork: the parent's threads are not here)
      std::vector<char*> envp, argv;
      for (const auto& e : all) envp.push_back(const_cast<char*>(e.c_str()));
      envp.push_back(nullptr);
      const std::string self = "/proc/self/exe";
      argv = {const_cast<char*>(self.c_str()), const_cast<char*>(tag.c_str()), nullptr};
      ::execve(self.c_str(), argv.data(), envp.data());
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (const pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  }
  return codes;
}

}  // namespace libllm::test
