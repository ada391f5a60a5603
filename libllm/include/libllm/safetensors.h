// Reading and writing safetensors files without LibTorch.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header
// length N, then N bytes of JSON header, then the data section. The header is an object mapping
// each tensor name to {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, with byte
// offsets relative to the start of the data section, plus an optional "__metadata__" object of
// string values. Tensor data is row-major and little-endian.
//
// Reading memory-maps the file and validates the whole header up front, so a File that opened
// successfully only hands out in-bounds pointers. Every failure is a libllm::Error naming the file
// (and the tensor when one is at fault). This header does not include torch; converting to and
// from torch::Tensor lives elsewhere.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace libllm::safetensors {

// Element types supported by libllm. Spelled in files as "F32", "F16", "BF16", "F64", "I64",
// "I32", "I16", "I8", "U8" and "BOOL".
enum class DType { F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL };

// Bytes per element (BOOL is one byte).
size_t dtype_size(DType dtype);

// The name used in safetensors headers, e.g. "BF16".
const char* dtype_name(DType dtype);

// Parses a header dtype name (case-sensitive). Throws libllm::Error naming `where` for names
// libllm does not support (e.g. "F8_E4M3" or "U32").
DType dtype_from_name(const std::string& name, const std::string& where);

// One tensor entry of a header.
struct TensorInfo {
  std::string name;            // key in the header
  DType dtype;                 // element type
  std::vector<int64_t> shape;  // dimensions; empty for a 0-dim scalar
  uint64_t begin = 0;          // first byte, relative to the data section
  uint64_t end = 0;            // one past the last byte, relative to the data section

  // Number of elements: the product of `shape` (1 for a scalar, 0 if any dimension is 0).
  int64_t numel() const;
};

// XXH64 (https://xxhash.com) of `size` bytes with `seed`: the hash of the files' checksums.
// xxh64("abc", 3) == 0x44bc2cf5ad770999, as `printf abc | xxhsum -H64` prints.
uint64_t xxh64(const void* data, size_t size, uint64_t seed = 0);

// The "__metadata__" key under which write() and StreamWriter record the XXH64 (seed 0) of the
// file's data section (every byte after the header) as 16 lowercase hex digits, so that damage
// done to a file after it was written is found when it is read (File::verify). Outside libllm:
// `N=$(od -An -t u8 -N 8 FILE); tail -c +$((9 + N)) FILE | xxhsum -H64` prints it.
inline constexpr const char* kChecksumKey = "libllm.data_xxh64";

// A read-only, memory-mapped safetensors file.
//
// open() rejects, with a libllm::Error naming the file: files shorter than 8 bytes, a header
// length past the end of the file or above 100 MB, a header that is not a JSON object, entries
// that miss dtype/shape/data_offsets or have wrong JSON types, unknown dtypes, negative
// dimensions, begin > end, data past the end of the data section, a byte size that differs from
// numel * dtype_size, overlapping tensors, duplicate names and a "__metadata__" entry that is not
// an object of strings. Gaps between tensors are allowed. Zero-size tensors never overlap anything.
//
// The mapping lives as long as the File; pointers from data() must not outlive it. A file
// truncated while mapped ends the process with an error naming it (see ShardSet, libllm/data.h).
class File {
 public:
  // Maps and validates the file at `path`.
  static std::shared_ptr<File> open(const std::string& path);

  File(const File&) = delete;
  File& operator=(const File&) = delete;
  // Unmaps the file.
  ~File();

  // The path given to open().
  const std::string& path() const { return path_; }
  // All tensors, ordered by data offset (ties by name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr if there is none.
  const TensorInfo* find(const std::string& name) const;
  // The tensor called `name`; throws libllm::Error "no tensor 'name'" naming the file if absent.
  const TensorInfo& at(const std::string& name) const;
  // Pointer to the first byte of `t` inside the mapping (t.end - t.begin bytes are readable).
  // `t` must come from this file; an out-of-range entry throws libllm::Error.
  const uint8_t* data(const TensorInfo& t) const;
  // Drops the mapped pages of `t` from this process's memory (they are read from the file again
  // if touched): a reader streaming a file larger than memory keeps its resident size small.
  // Pointers from data() stay valid.
  void release(const TensorInfo& t) const;
  // The "__metadata__" entry (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Reads the whole data section and checks it against the checksum its writer recorded
  // (kChecksumKey); true if it matched. False, reading nothing, for a file without one (written
  // by another tool, or by libllm before 2026-11). A malformed or different checksum throws
  // libllm::Error naming the file ("the file was damaged after it was written"). Read once a
  // File, and once a process for a file of the same device, inode, size and modification and
  // status-change times:
  // later calls return the first answer. The pages read leave this process's resident
  // memory as it goes (a file larger than memory can be checked).
  bool verify() const;

 private:
  explicit File(std::string path) : path_(std::move(path)) {}
  void map_file();
  void parse_header();

  std::string path_;
  const uint8_t* base_ = nullptr;  // start of the mapping
  size_t size_ = 0;                // size of the mapping (= file size)
  uint64_t data_offset_ = 0;       // 8 + header length
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
  mutable int verified_ = -1;                                   // verify()'s answer once known (0 or 1)
  std::tuple<uint64_t, uint64_t, int64_t, int64_t, uint64_t> identity_;  // device, inode, mtime, ctime (ns), size
};

// A tensor to write. `data` points at numel * dtype_size bytes, row-major, little-endian; they are
// copied during write(). `data` may be null only for zero-size tensors.
struct TensorView {
  std::string name;            // must be non-empty, unique and not "__metadata__"
  DType dtype;                 // element type
  std::vector<int64_t> shape;  // dimensions (non-negative); empty for a scalar
  const void* data;            // the bytes to write
};

// Writes `tensors` and `metadata` to `path` atomically: the bytes go to `path + ".tmp-<pid>"`,
// which is fsynced and then renamed over `path`. On any error the temporary file is removed, the
// previous file at `path` (if any) is left intact, and libllm::Error naming `path` is thrown
// (a full disk is reported as "disk full while writing ...").
//
// The header lists "__metadata__" first, then the tensors sorted by name; their data is laid out
// contiguously in the same order. The header is padded with spaces so that the data section
// starts at a multiple of 8 bytes. The metadata is `metadata` plus the data's checksum
// (kChecksumKey; a value `metadata` gives for it, as metadata copied from another file, is replaced).
void write(const std::string& path, const std::vector<TensorView>& tensors,
           const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes a file whose tensors arrive one at a time, for data too large to hold at once (a
// sharded model gathered unit by unit). The header, with every tensor's offsets, is written
// first, listing `tensors` in the order given, which is also their order in the data section; then
// add() each tensor's bytes in that order, then commit(). Until commit() the bytes go to
// `path + ".tmp-<pid>"`, which is removed if the writer is destroyed first; commit() fsyncs it
// and renames it over `path`. The checksum (kChecksumKey) is computed as the bytes arrive and
// written into the header at commit(). Errors as write()'s, and a tensor out of order, of the
// wrong size, or missing at commit() is an Error naming it.
class StreamWriter {
 public:
  struct Entry {
    std::string name;            // non-empty, unique, not "__metadata__"
    DType dtype;
    std::vector<int64_t> shape;  // non-negative; empty for a scalar
  };
  StreamWriter(const std::string& path, std::vector<Entry> tensors,
               const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
  ~StreamWriter();
  StreamWriter(const StreamWriter&) = delete;
  StreamWriter& operator=(const StreamWriter&) = delete;

  // The next tensor's bytes: `name` must be the next entry's, `nbytes` its numel * dtype_size.
  void add(const std::string& name, const void* data, uint64_t nbytes);
  void commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace libllm::safetensors
