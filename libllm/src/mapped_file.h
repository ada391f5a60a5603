// A file mapped read-only: what the two weights readers (safetensors.cpp, torch_file.cpp) share.
// Private to the library; implemented in safetensors.cpp (torch-free).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace libllm::detail {

struct Mapping {
  const uint8_t* base = nullptr;  // start of the mapping; null for an empty file
  size_t size = 0;                // bytes (the file's size)
  // The file's identity when mapped (st_dev, st_ino, st_mtim and st_ctim in ns): the same four and
  // size name the same contents (a write changes st_ctim, which no one sets by hand, at the
  // kernel's timestamp granularity).
  uint64_t device = 0, inode = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
};

// Maps regular file `path` read-only. Errors (libllm::Error naming the path): it cannot be
// opened, is not a regular file, or cannot be mapped.
Mapping map_readonly(const std::string& path);
void unmap(const Mapping& m);

// Bus errors (SIGBUS: a mapped file that another program truncated while this one reads it) in a
// mapping recorded here end the process with one line naming the file and exit code 1, not a
// bare "Bus error". map_readonly / unmap record and forget their mappings; other mappings are
// recorded with these. A bus error elsewhere goes to the handler that was there before.
void note_mapping(const void* base, size_t size, const std::string& path);
void forget_mapping(const void* base);

// Drops the pages of [p, p + n) (inside a read-only mapping) from this process's resident memory;
// a neighbour sharing the first or last page is read back from the file when next used. Advice:
// a failure is harmless.
void release_pages(const uint8_t* p, size_t n);

}  // namespace libllm::detail
