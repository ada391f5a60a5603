// What the safetensors checksum (XXH64 of the data section, libllm/safetensors.h) costs: the hash
// alone over a buffer in memory, and a file of --gib GiB written (hashed as it is written, then
// fsynced) and verified (read back through the mapping and hashed), each timed --repeats times.
// usage: checksum-bench [--gib N] [--repeats N] [--dir DIR]   (DIR: where the file goes, /tmp)
#include <fmt/core.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <vector>

#include <libllm/cli.h>
#include <libllm/safetensors.h>

using namespace libllm;

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main(int argc, char** argv) {
  return cli::run("checksum-bench", [&] {
    cli::Args args(argc, argv, "checksum-bench [--gib N] [--repeats N] [--dir DIR]",
                   {{"--gib", "size of the buffer and the file, GiB", true, "2"},
                    {"--repeats", "timed rounds", true, "3"},
                    {"--dir", "folder for the file", true, "/tmp"}},
                   0);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    const int64_t gib = args.get_int("--gib"), repeats = args.get_int("--repeats");
    const std::string dir = args.get("--dir");
    const size_t bytes = static_cast<size_t>(gib) << 30;
    std::vector<uint8_t> data(bytes);
    for (size_t i = 0; i < bytes; i += 8) data[i] = static_cast<uint8_t>(i >> 3);  // (touched: resident)
    const std::string path = (std::filesystem::path(dir) / "checksum-bench.safetensors").string();
    const double gb = static_cast<double>(bytes) / 1e9;
    for (int64_t r = 0; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      const uint64_t h = safetensors::xxh64(data.data(), data.size());
      const double hash_s = seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
      safetensors::write(path, {{"x", safetensors::DType::U8, {static_cast<int64_t>(bytes)}, data.data()}});
      const double write_s = seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
      const bool checked = safetensors::File::open(path)->verify();  // (a new file: read again)
      const double verify_s = seconds_since(t0);
      fmt::print(
          "{:.2f} GB: hash {:.2f} s ({:.1f} GB/s) | write+fsync {:.2f} s | open+verify {:.2f} s ({:.1f} GB/s){} "
          "[{:016x}]\n",
          gb, hash_s, gb / hash_s, write_s, verify_s, gb / verify_s, checked ? "" : " NOT CHECKED", h);
    }
    std::filesystem::remove(path);
    return 0;
  });
}
