// Whole small files written atomically: what the data preparation, the trainer's logs and
// records, and the spike supervisor's plan share. Private to the library; implemented in data.cpp.
#pragma once

#include <string>

namespace libllm::detail {

// Writes `bytes` as <path>.tmp-<pid>, flushes it to disk, then renames it to `path`: a kill at any
// moment leaves the old file or the new one whole. Errors (libllm::Error) name the file.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Copies the file `from` to `to` as write_file_atomic writes (flushed to disk, then renamed);
// an unreadable `from` is an Error naming it.
void copy_file_atomic(const std::string& from, const std::string& to);

// Best effort: flushes the folder holding `path` (its entries: a rename into it survives a power
// loss). Errors are ignored (the data itself is already synced).
void fsync_parent_dir(const std::string& path);

}  // namespace libllm::detail
