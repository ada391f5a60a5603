// safetensors reading (mmap + header validation) and atomic writing. See safetensors.h.
// Deliberately torch-free so that it compiles fast and can be tested on its own.
#include "libllm/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include "atomic_file.h"
#include "heartbeat.h"
#include "libllm/error.h"
#include "mapped_file.h"
#include "xxh64.h"

namespace libllm::safetensors {
namespace {

using detail::hex16;
using detail::Xxh64;

using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;  // 100 MB, as in the reference reader
constexpr int kMaxJsonDepth = 16;                           // a valid header needs 3 levels
constexpr size_t kMaxWriteChunk = size_t{1} << 30;          // bytes per write() call

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::F32, "F32", 4}, {DType::F16, "F16", 2},   {DType::BF16, "BF16", 2}, {DType::F64, "F64", 8},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4},   {DType::I16, "I16", 2},   {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1},
};

const DTypeEntry& entry_of(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  throw Error("", "invalid DType value " + std::to_string(static_cast<int>(dtype)));
}

std::string tensor_where(const std::string& path, const std::string& name) { return path + ": tensor '" + name + "'"; }

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string errno_text(int err) { return std::strerror(err); }

// Number of elements of `shape`; throws if a dimension is negative or the count overflows int64.
uint64_t checked_numel(const std::vector<int64_t>& shape, const std::string& where) {
  for (int64_t d : shape) {
    if (d < 0) throw Error(where, "shape " + shape_text(shape) + " has a negative dimension");
  }
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n) ||
        n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw Error(where, "shape " + shape_text(shape) + " has too many elements");
    }
  }
  return n;
}

// numel * dtype_size, overflow-checked.
uint64_t checked_nbytes(const std::vector<int64_t>& shape, DType dtype, const std::string& where) {
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(checked_numel(shape, where), uint64_t{dtype_size(dtype)}, &bytes)) {
    throw Error(where, "shape " + shape_text(shape) + " is too large for dtype " + dtype_name(dtype));
  }
  return bytes;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string le64_bytes(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// Closes a file descriptor on scope exit.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// ---- Reading ------------------------------------------------------------------------------

// Thrown from the JSON parser callback; converted to libllm::Error by parse_json().
struct HeaderProblem {
  int depth;
  std::string key;  // the duplicate key, or empty when nesting is too deep
};

// Parses the header text. nlohmann::json silently keeps the last of duplicate keys, so a parser
// callback tracks the keys of every open object; it also bounds the nesting depth.
json parse_json(const std::string& path, const uint8_t* text, size_t size) {
  std::vector<std::set<std::string>> open_objects;
  auto callback = [&](int depth, json::parse_event_t event, json& value) {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        [[fallthrough]];
      case json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth) throw HeaderProblem{depth, ""};
        break;
      case json::parse_event_t::key:
        if (!open_objects.back().insert(value.get_ref<const std::string&>()).second) {
          throw HeaderProblem{depth, value.get<std::string>()};
        }
        break;
      case json::parse_event_t::object_end:
        open_objects.pop_back();
        break;
      default:
        break;
    }
    return true;
  };
  const char* hint = "the file is corrupt or not a safetensors file";
  try {
    return json::parse(text, text + size, callback);
  } catch (const json::exception& e) {
    throw Error(path, std::string("header is not valid JSON: ") + e.what(), hint);
  } catch (const HeaderProblem& p) {
    if (p.key.empty()) throw Error(path, "header JSON is nested too deeply", hint);
    if (p.depth == 1) throw Error(tensor_where(path, p.key), "name appears twice in the header", hint);
    throw Error(path, "header has a duplicate key '" + p.key + "'", hint);
  }
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& value) {
  const std::string where = path + ": __metadata__";
  if (!value.is_object()) throw Error(where, "is not a JSON object");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, v] : value.items()) {
    if (!v.is_string()) throw Error(where, "value of '" + key + "' is not a string");
    metadata[key] = v.get<std::string>();
  }
  return metadata;
}

const json& require(const json& entry, const char* key, const std::string& where) {
  auto it = entry.find(key);
  if (it == entry.end()) throw Error(where, std::string("header entry has no \"") + key + "\"");
  return *it;
}

std::vector<int64_t> parse_shape(const json& value, const std::string& where) {
  if (!value.is_array()) throw Error(where, "\"shape\" is not a JSON array");
  std::vector<int64_t> shape;
  for (const json& d : value) {
    if (!d.is_number_integer()) throw Error(where, "\"shape\" has a non-integer entry");
    if (d.is_number_unsigned() && d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw Error(where, "\"shape\" has a dimension that does not fit in int64");
    }
    shape.push_back(d.get<int64_t>());
  }
  return shape;
}

void parse_offsets(const json& value, const std::string& where, TensorInfo* info) {
  if (!value.is_array() || value.size() != 2 || !value[0].is_number_unsigned() || !value[1].is_number_unsigned()) {
    throw Error(where, "\"data_offsets\" is not a pair of non-negative integers");
  }
  info->begin = value[0].get<uint64_t>();
  info->end = value[1].get<uint64_t>();
}

// Parses and checks one tensor entry against the data section size.
TensorInfo parse_entry(const std::string& path, const std::string& name, const json& value, uint64_t data_size) {
  const std::string where = tensor_where(path, name);
  const char* hint = "the file is corrupt or was written by an incompatible tool";
  if (!value.is_object()) throw Error(where, "header entry is not a JSON object", hint);
  TensorInfo info;
  info.name = name;
  const json& dtype = require(value, "dtype", where);
  if (!dtype.is_string()) throw Error(where, "\"dtype\" is not a string", hint);
  info.dtype = dtype_from_name(dtype.get<std::string>(), where);
  info.shape = parse_shape(require(value, "shape", where), where);
  parse_offsets(require(value, "data_offsets", where), where, &info);
  const uint64_t nbytes = checked_nbytes(info.shape, info.dtype, where);
  const std::string range = "[" + std::to_string(info.begin) + ", " + std::to_string(info.end) + ")";
  if (info.begin > info.end) {
    throw Error(where, "data_offsets " + range + " begin after they end", hint);
  }
  if (info.end > data_size) {
    throw Error(
        where,
        "data_offsets " + range + " run past the end of the data section (" + std::to_string(data_size) + " bytes)",
        "the file may be truncated; download or convert it again");
  }
  if (info.end - info.begin != nbytes) {
    throw Error(where,
                "data_offsets " + range + " cover " + std::to_string(info.end - info.begin) + " bytes but dtype " +
                    dtype_name(info.dtype) + " and shape " + shape_text(info.shape) + " need " + std::to_string(nbytes),
                hint);
  }
  return info;
}

// Sorts by data offset and rejects overlapping byte ranges (empty tensors overlap nothing).
void sort_and_check_overlap(const std::string& path, std::vector<TensorInfo>* tensors) {
  std::sort(tensors->begin(), tensors->end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  const TensorInfo* prev = nullptr;  // the non-empty tensor that ends last so far
  for (const TensorInfo& t : *tensors) {
    if (t.begin == t.end) continue;
    if (prev != nullptr && t.begin < prev->end) {
      throw Error(tensor_where(path, t.name), "data overlaps the data of tensor '" + prev->name + "'",
                  "the file is corrupt");
    }
    prev = &t;
  }
}

// ---- Writing ------------------------------------------------------------------------------

// The temporary file of write(): removed on destruction unless committed.
class TempFile {
 public:
  TempFile(const std::string& path, const std::string& tmp) : path_(path), tmp_(tmp) {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      throw Error(path_, "cannot create temporary file '" + tmp_ + "': " + errno_text(errno),
                  "check that the directory exists and is writable");
    }
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  void write_all(const void* data, uint64_t size);
  // Overwrites `size` bytes at `offset` (inside what write_all wrote).
  void write_at(uint64_t offset, const void* data, size_t size);
  void commit();

 private:
  [[noreturn]] void fail(const std::string& action, int err) const;

  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

void TempFile::fail(const std::string& action, int err) const {
  if (err == ENOSPC || err == EDQUOT) {
    throw Error(path_, "disk full while writing '" + tmp_ + "'", "free some disk space");
  }
  if (err == EFBIG)
    throw Error(path_, "file too large while writing '" + tmp_ + "'", "raise the file-size limit (ulimit -f) or free disk space");
  throw Error(path_, "cannot " + action + " '" + tmp_ + "': " + errno_text(err));
}

void TempFile::write_all(const void* data, uint64_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    detail::heartbeat("writing", path_);
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(size, kMaxWriteChunk));
    const ssize_t n = ::write(fd_, p, chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("write", errno);
    if (n == 0) fail("write", EIO);  // no progress and no error: do not spin
    p += n;
    size -= static_cast<uint64_t>(n);
  }
}

void TempFile::write_at(uint64_t offset, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::pwrite(fd_, p, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("write", n < 0 ? errno : EIO);
    p += n, offset += static_cast<uint64_t>(n), size -= static_cast<size_t>(n);
  }
}

void TempFile::commit() {
  // The kernel may hold much of a large file unwritten until this fsync, which on network storage
  // can take minutes: it runs beside a heartbeat, so that a supervisor does not take it for a
  // hang. The beats stop after the time the file takes at 10 MB/s, plus a minute: a sync stuck on
  // dead storage is still a hang.
  struct stat st {};
  const double allowed = 60 + (::fstat(fd_, &st) == 0 ? static_cast<double>(st.st_size) / 1e7 : 0);
  auto synced = std::async(std::launch::async, [fd = fd_] {
    while (::fsync(fd) != 0)
      if (errno != EINTR) return errno;
    return 0;
  });
  const auto start = std::chrono::steady_clock::now();
  while (synced.wait_for(std::chrono::seconds(1)) != std::future_status::ready)
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < allowed)
      detail::heartbeat("syncing", path_);
  if (const int err = synced.get(); err != 0) fail("fsync", err);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0 && errno != EINTR) fail("close", errno);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    throw Error(path_, "cannot rename '" + tmp_ + "' over the target: " + errno_text(err));
  }
  committed_ = true;
  detail::fsync_parent_dir(path_);
}

// The header JSON for `views`, in data order, padded with spaces to a multiple of 8 bytes. Its
// metadata begins with the checksum's entry, 16 zeros that `*checksum_at` locates (the writer puts
// the checksum there once it knows it); then `metadata` (any value it gives for kChecksumKey left out).
std::string build_header(const std::string& path, const std::vector<StreamWriter::Entry>& views,
                         const std::map<std::string, std::string>& metadata, size_t* checksum_at) {
  // Text is assembled by hand: a json object would sort "__metadata__" among the tensor names.
  std::string header = std::string("{\"__metadata__\":{\"") + kChecksumKey + "\":\"";
  *checksum_at = header.size();
  header += std::string(16, '0') + "\"";
  uint64_t offset = 0;
  try {
    for (const auto& [key, value] : metadata)
      if (key != kChecksumKey) header += "," + json(key).dump() + ":" + json(value).dump();
    header += "}";
    for (const StreamWriter::Entry& e : views) {
      const uint64_t nbytes = checked_nbytes(e.shape, e.dtype, tensor_where(path, e.name));
      if (__builtin_add_overflow(offset, nbytes, &offset)) {
        throw Error(path, "total tensor size overflows 64 bits");
      }
      nlohmann::ordered_json entry;
      entry["dtype"] = dtype_name(e.dtype);
      entry["shape"] = e.shape;
      entry["data_offsets"] = {offset - nbytes, offset};
      if (header.size() > 1) header += ",";
      header += json(e.name).dump() + ":" + entry.dump();
    }
  } catch (const json::exception& e) {
    throw Error(path, std::string("cannot encode the header: ") + e.what(),
                "tensor names and metadata must be valid UTF-8");
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  return header;
}

}  // namespace

// ---- Public API ---------------------------------------------------------------------------

size_t dtype_size(DType dtype) { return entry_of(dtype).size; }

const char* dtype_name(DType dtype) { return entry_of(dtype).name; }

DType dtype_from_name(const std::string& name, const std::string& where) {
  for (const DTypeEntry& e : kDTypes) {
    if (name == e.name) return e.dtype;
  }
  throw Error(where, "unsupported dtype '" + name + "'",
              "libllm reads F32, F16, BF16, F64, I64, I32, I16, I8, U8 and BOOL");
}

int64_t TensorInfo::numel() const {
  uint64_t n = 1;  // unsigned: wraps instead of undefined behaviour on unvalidated shapes
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return static_cast<int64_t>(n);
}

std::shared_ptr<File> File::open(const std::string& path) {
  std::shared_ptr<File> file(new File(path));
  file->map_file();
  file->parse_header();
  return file;
}

File::~File() { detail::unmap({base_, size_}); }

void File::map_file() {
  const detail::Mapping m = detail::map_readonly(path_);
  base_ = m.base;
  size_ = m.size;
  identity_ = {m.device, m.inode, m.mtime_ns, m.ctime_ns, m.size};
  if (size_ < 8) {
    throw Error(path_, "file has " + std::to_string(size_) + " bytes, too few for a safetensors header (at least 8)",
                "the file may be truncated; download or convert it again");
  }
}

void File::parse_header() {
  const uint64_t header_size = read_le64(base_);
  const char* hint = "the file is corrupt, truncated or not a safetensors file";
  if (header_size > kMaxHeaderBytes) {
    throw Error(path_, "header length " + std::to_string(header_size) + " exceeds the 100 MB limit", hint);
  }
  if (header_size > size_ - 8) {
    throw Error(path_,
                "header length " + std::to_string(header_size) + " runs past the end of the file (" +
                    std::to_string(size_) + " bytes)",
                hint);
  }
  data_offset_ = 8 + header_size;
  const json header = parse_json(path_, base_ + 8, static_cast<size_t>(header_size));
  if (!header.is_object()) throw Error(path_, "header is not a JSON object", hint);
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      metadata_ = parse_metadata(path_, value);
    } else {
      tensors_.push_back(parse_entry(path_, key, value, size_ - data_offset_));
    }
  }
  sort_and_check_overlap(path_, &tensors_);
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

const TensorInfo* File::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::at(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (t == nullptr) throw Error(path_, "no tensor '" + name + "'");
  return *t;
}

const uint8_t* File::data(const TensorInfo& t) const {
  if (t.begin > t.end || t.end > size_ - data_offset_) {
    throw Error(tensor_where(path_, t.name), "byte range lies outside the data section",
                "use a TensorInfo obtained from this file");
  }
  detail::heartbeat("reading", path_);
  return base_ + data_offset_ + t.begin;
}

void File::release(const TensorInfo& t) const { detail::release_pages(data(t), t.end - t.begin); }

bool File::verify() const {
  if (verified_ >= 0) return verified_ == 1;
  const auto it = metadata_.find(kChecksumKey);
  if (it == metadata_.end()) return (verified_ = 0) == 1;
  // Files this process checked already (a checkpoint's optimizer.safetensors opened twice).
  static std::mutex mutex;
  static std::set<std::tuple<uint64_t, uint64_t, int64_t, int64_t, uint64_t>> checked;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (checked.count(identity_)) return (verified_ = 1) == 1;
  }
  const char* hint =
      "the file was damaged after it was written (a disk, copy or transfer error): restore it from a "
      "copy, or make it again";
  std::string stored = it->second;
  if (stored.size() != 16 || stored.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
    throw Error(path_ + ": __metadata__." + kChecksumKey, "'" + stored + "' is no checksum (16 hex digits)", hint);
  for (char& c : stored) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  // In 64 MiB pieces: a heartbeat for each (a large file on a slow disk takes minutes), and the
  // pages leave this process's resident memory once hashed.
  Xxh64 checksum;
  constexpr size_t kPiece = size_t{64} << 20;
  for (uint64_t at = data_offset_; at < size_; at += kPiece) {
    detail::heartbeat("verifying", path_);
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kPiece, size_ - at));
    checksum.update(base_ + at, n);
    detail::release_pages(base_ + at, n);
  }
  const std::string computed = hex16(checksum.digest());
  if (computed != stored)
    throw Error(
        path_, "the data does not match the checksum its writer recorded (" + stored + ", now " + computed + ")", hint);
  std::lock_guard<std::mutex> lock(mutex);
  checked.insert(identity_);
  verified_ = 1;
  return true;
}

struct StreamWriter::Impl {
  std::string path;
  std::vector<Entry> entries;
  std::vector<uint64_t> sizes;  // bytes of each entry
  size_t next = 0;              // the entry add() expects
  TempFile file;
  Xxh64 checksum;            // of the data section so far
  uint64_t checksum_at = 0;  // file offset of the checksum's 16 hex digits in the header
  Impl(const std::string& p, std::vector<Entry> e) : path(p), entries(std::move(e)), file(p, p + ".tmp-" + std::to_string(::getpid())) {}
};

StreamWriter::StreamWriter(const std::string& path, std::vector<Entry> tensors,
                           const std::map<std::string, std::string>& metadata) {
  std::vector<std::string> names;
  std::vector<uint64_t> sizes;
  for (const Entry& e : tensors) {
    if (e.name.empty()) throw Error(path, "a tensor has an empty name");
    if (e.name == "__metadata__") throw Error(tensor_where(path, e.name), "name is reserved for the metadata");
    names.push_back(e.name);
    sizes.push_back(checked_nbytes(e.shape, e.dtype, tensor_where(path, e.name)));
  }
  std::sort(names.begin(), names.end());
  for (size_t i = 1; i < names.size(); ++i)
    if (names[i] == names[i - 1]) throw Error(tensor_where(path, names[i]), "name is given twice");
  // The checksum's place is held by zeros until commit() knows it. A value given for it (metadata
  // copied from another file) is replaced.
  size_t checksum_at = 0;
  const std::string header = build_header(path, tensors, metadata, &checksum_at);
  impl_ = std::make_unique<Impl>(path, std::move(tensors));
  impl_->checksum_at = 8 + checksum_at;
  impl_->sizes = std::move(sizes);
  const std::string prefix = le64_bytes(header.size());
  impl_->file.write_all(prefix.data(), prefix.size());
  impl_->file.write_all(header.data(), header.size());
}

StreamWriter::~StreamWriter() = default;

void StreamWriter::add(const std::string& name, const void* data, uint64_t nbytes) {
  Impl& w = *impl_;
  if (w.next >= w.entries.size()) throw Error(tensor_where(w.path, name), "is one tensor too many");
  if (name != w.entries[w.next].name)
    throw Error(tensor_where(w.path, name), "came out of order: tensor '" + w.entries[w.next].name + "' is next");
  if (nbytes != w.sizes[w.next])
    throw Error(tensor_where(w.path, name),
                std::to_string(nbytes) + " bytes given, the header says " + std::to_string(w.sizes[w.next]));
  if (nbytes > 0 && data == nullptr) throw Error(tensor_where(w.path, name), "data pointer is null");
  w.checksum.update(data, nbytes);
  w.file.write_all(data, nbytes);
  ++w.next;
}

void StreamWriter::commit() {
  Impl& w = *impl_;
  if (w.next < w.entries.size())
    throw Error(tensor_where(w.path, w.entries[w.next].name), "was never added", "add every tensor before commit()");
  const std::string digest = hex16(w.checksum.digest());
  w.file.write_at(w.checksum_at, digest.data(), digest.size());
  w.file.commit();
}

void write(const std::string& path, const std::vector<TensorView>& tensors,
           const std::map<std::string, std::string>& metadata) {
  // Sorted by name, header and data alike; the stream writer checks names, sizes and pointers.
  std::vector<const TensorView*> views;
  for (const TensorView& t : tensors) views.push_back(&t);
  std::stable_sort(views.begin(), views.end(), [](const TensorView* a, const TensorView* b) { return a->name < b->name; });
  std::vector<StreamWriter::Entry> entries;
  for (const TensorView* t : views) entries.push_back({t->name, t->dtype, t->shape});
  StreamWriter writer(path, std::move(entries), metadata);
  for (const TensorView* t : views)
    writer.add(t->name, t->data, checked_nbytes(t->shape, t->dtype, tensor_where(path, t->name)));
  writer.commit();
}

uint64_t xxh64(const void* data, size_t size, uint64_t seed) {
  Xxh64 h(seed);
  h.update(data, size);
  return h.digest();
}

}  // namespace libllm::safetensors

namespace libllm::detail {

using safetensors::errno_text;
using safetensors::FdCloser;

namespace {

// The recorded mappings, in a fixed table that the signal handler reads without locks: a slot is
// published by storing its end last and retired by clearing its end first.
struct MappedSlot {
  std::atomic<uintptr_t> begin{0}, end{0};
  char path[512] = {};
};
constexpr size_t kMappedSlots = 1024;
MappedSlot g_mapped[kMappedSlots];
std::mutex g_mapped_mutex;  // (writers only)
struct sigaction g_previous_bus_action;

void write_stderr(const char* s) {
  for (size_t n = std::strlen(s); n > 0;) {
    const ssize_t w = ::write(2, s, n);
    if (w <= 0) return;
    s += w, n -= static_cast<size_t>(w);
  }
}

void on_bus_error(int, siginfo_t* info, void*) {
  const auto at = reinterpret_cast<uintptr_t>(info->si_addr);
  for (const MappedSlot& s : g_mapped) {
    const uintptr_t end = s.end.load(std::memory_order_acquire);
    if (end == 0 || at < s.begin.load(std::memory_order_relaxed) || at >= end) continue;
    write_stderr(program_invocation_short_name);
    write_stderr(": error: ");
    write_stderr(s.path);
    write_stderr(
        ": the file shrank while it was mapped (a bus error reading it): another program truncated or "
        "rewrote it during this run (hint: leave the data shards and checkpoints a job reads as they are "
        "until it ends; write new ones to another folder)\n");
    ::_exit(1);
  }
  // Not one of ours: the access runs again under the handler that was there before.
  ::sigaction(SIGBUS, &g_previous_bus_action, nullptr);
}

}  // namespace

void note_mapping(const void* base, size_t size, const std::string& path) {
  static std::once_flag installed;
  std::call_once(installed, [] {
    struct sigaction sa = {};
    sa.sa_sigaction = on_bus_error;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &g_previous_bus_action);
  });
  if (base == nullptr || size == 0) return;
  std::lock_guard<std::mutex> lock(g_mapped_mutex);
  for (MappedSlot& s : g_mapped) {
    if (s.end.load(std::memory_order_relaxed) != 0) continue;
    std::snprintf(s.path, sizeof(s.path), "%s", path.c_str());
    s.begin.store(reinterpret_cast<uintptr_t>(base), std::memory_order_relaxed);
    s.end.store(reinterpret_cast<uintptr_t>(base) + size, std::memory_order_release);
    return;
  }  // (a full table: that mapping's bus error is a plain one)
}

void forget_mapping(const void* base) {
  if (base == nullptr) return;
  std::lock_guard<std::mutex> lock(g_mapped_mutex);
  for (MappedSlot& s : g_mapped)
    if (s.end.load(std::memory_order_relaxed) != 0 &&
        s.begin.load(std::memory_order_relaxed) == reinterpret_cast<uintptr_t>(base)) {
      s.end.store(0, std::memory_order_release);
      s.begin.store(0, std::memory_order_relaxed);
      return;
    }
}

Mapping map_readonly(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw Error(path, "cannot open file: " + errno_text(err), err == ENOENT ? "check the path" : "");
  }
  FdCloser closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) throw Error(path, "cannot stat file: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) throw Error(path, "is not a regular file");
  Mapping m;
  m.size = static_cast<size_t>(st.st_size);
  m.device = static_cast<uint64_t>(st.st_dev);
  m.inode = static_cast<uint64_t>(st.st_ino);
  m.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  m.ctime_ns = static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
  if (m.size == 0) return m;
  void* p = ::mmap(nullptr, m.size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) throw Error(path, "cannot memory-map file: " + errno_text(errno));
  m.base = static_cast<const uint8_t*>(p);
  note_mapping(m.base, m.size, path);
  return m;
}

void unmap(const Mapping& m) {
  if (m.base == nullptr) return;
  forget_mapping(m.base);
  ::munmap(const_cast<uint8_t*>(m.base), m.size);
}

void release_pages(const uint8_t* p, size_t n) {
  if (n == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

}  // namespace libllm::detail
